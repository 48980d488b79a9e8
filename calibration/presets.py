"""Presets for ``--method fdb-dad``: how much data and how many steps each stage gets.

Budgets are wall times for SmolLM2-135M on the 2-core development CPU (see docs/CALIBRATION.md
for the measurements behind them). Any option given explicitly overrides its preset value.

Keys are field names of ``dbquant.quantize.QuantizeOptions``; ``QuantizeOptions.resolved``
refuses a key that is no field and a ``stage_option`` field that no preset value fills, so a
new stage option is its field there plus its value here (in ``COMMON`` when every preset
shares it).
"""

from __future__ import annotations

from dbquant.errors import DbquantError

PRESETS: dict[str, dict] = {
    # <= 5 min: a short block-wise pass, then DAD. At equal settings otherwise, moving time from
    # block-wise (16 -> 8 steps/block) to DAD (24 -> 34 steps) measured wiki PPL 49.6 -> 47.0;
    # block-wise alone (16 steps, no DAD) was 90.4 (docs/RESULTS.md, issue 14 rows).
    "fast": dict(blockwise=True, bw_samples=32, bw_seq_len=256, bw_steps=8, bw_batch=2,
                 bw_lr=1e-2, bw_lr_weight=5e-3, bw_inputs="quant",
                 dad=True, dad_samples=48, dad_seq_len=256, dad_steps=34, dad_batch=2),
    # <= 20 min on a quiet 2-core CPU: block-wise, then DAD training scales and latent weights.
    # With --target-bpw 2.5 (docs/RESULTS.md, issue 14 default rows, 1 thread): 34.08 with weights
    # trained (36.96 scales only, uniform layout); moving time to DAD (16 block-wise / 200 DAD
    # steps on 160 windows) gave 34.62 and ran past the budget; 16 / 250 on 256 windows 32.99 in
    # ~25 min.
    "default": dict(blockwise=True, bw_samples=64, bw_seq_len=256, bw_steps=40, bw_batch=2,
                    bw_lr=1e-2, bw_lr_weight=5e-3, bw_inputs="quant",
                    dad=True, dad_samples=128, dad_seq_len=256, dad_steps=150, dad_batch=2,
                    dad_train="scales+weights"),
    # hours on this CPU (minutes on a GPU): more data, more steps, longer DAD training weights too.
    "best": dict(blockwise=True, bw_samples=128, bw_seq_len=512, bw_steps=300, bw_batch=4,
                 bw_lr=1e-2, bw_lr_weight=5e-3, bw_inputs="quant",
                 dad=True, dad_samples=256, dad_seq_len=512, dad_steps=500, dad_batch=4,
                 dad_train="scales+weights"),
}

# Values shared by every preset (an explicit option still wins).
COMMON = dict(dad_lr=5e-3, dad_lr_weight=2e-3, dad_train="scales", dad_weighting="uniform",
              dad_temperature=1.0, dad_ce_weight=0.0, dad_topk=64, grad_clip=1.0,
              dad_teacher="topk", dad_autocast="auto")


def preset_values(name: str) -> dict:
    """Every stage option's value under preset ``name`` (``COMMON`` overridden by the preset's own)."""
    if name not in PRESETS:
        raise DbquantError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return {**COMMON, **PRESETS[name]}
