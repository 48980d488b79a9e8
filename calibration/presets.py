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
    # block-wise alone (16 steps, no DAD) was 90.4 (docs/RESULTS.md, issue 14 rows). 34 -> 28 DAD
    # steps pay for the ~30 s of chat text that --calib auto generates (46 steps where bf16 is fast:
    # 45.14 in 242.6 s of quantize on AMD Zen 5, RESULTS' chat-text section; 34 with AMX, where
    # block-wise and the teacher run in bf16 too: 46.80 in 296.8 s with 38 and an fp32 teacher).
    "fast": dict(blockwise=True, bw_samples=32, bw_seq_len=256, bw_steps=8, bw_batch=2,
                 bw_lr=1e-2, bw_lr_weight=5e-3, bw_inputs="quant",
                 dad=True, dad_samples=48, dad_seq_len=256, dad_steps=28, dad_batch=2),
    # <= 20 min on a quiet 2-core CPU: block-wise, then DAD training scales and latent weights, on
    # 256 windows. Steps set for fp32 on the reference CPU (predicted 19.8 min with --target-bpw and
    # the chat text of --calib auto, which took 113 -> 106 steps); where bf16 is fast, DAD gets
    # what it saves in the same time (calibration/budget.py, bf16_dividend: 176 steps on AMD Zen 5,
    # 123 with AMX, whose bf16 steps are only ~0.95x the reference's fp32 ones: 133 took 22.2 min
    # there (33.80), 160 steps with an fp32 teacher gave 32.96 in 23.5 min there). With
    # --target-bpw 2.5 (docs/RESULTS.md, issue 14 default rows): on AMD Zen 5 that balance, 64
    # block-wise / 243 DAD steps on wiki alone, gave wiki PPL 31.99 (1 thread; 32.21 in the timed
    # 2-thread run, 19 min 11 s) against 32.93 for 16 / 338 and 34.33 for the former 40 / 150 on 128
    # windows; on the Xeon the former preset gave 34.13. A quarter of chat text: 32.52 at 227 steps.
    "default": dict(blockwise=True, bw_samples=64, bw_seq_len=256, bw_steps=64, bw_batch=2,
                    bw_lr=1e-2, bw_lr_weight=5e-3, bw_inputs="quant",
                    dad=True, dad_samples=256, dad_seq_len=256, dad_steps=106, dad_batch=2,
                    dad_train="scales+weights"),
    # <= 3 h (176 min predicted on the reference CPU in fp32 with --target-bpw 2.5): DAD gets most of the time, on
    # 2048 windows of 512 tokens (~1.2 passes at 4 windows a step); block-wise twice `default`'s steps and more.
    # The counts are what --time-budget 175 chose for this window count on AMD Zen 4, where bf16 turns 321 DAD
    # steps into 615: wiki PPL 23.84, code 23.06, in 147 min of quantize, not quiet (docs/RESULTS.md, issue 14
    # `best`). On 1024 windows the former 128 / 300 steps gave 24.60 (523 steps on Zen 4) and 287 / 674 gave
    # 24.45: more passes over the same windows stopped paying, more distinct windows did.
    "best": dict(blockwise=True, bw_samples=128, bw_seq_len=256, bw_steps=262, bw_batch=2,
                 bw_lr=1e-2, bw_lr_weight=5e-3, bw_inputs="quant",
                 dad=True, dad_samples=2048, dad_seq_len=512, dad_steps=321, dad_batch=4,
                 dad_train="scales+weights"),
}

# Values shared by every preset (an explicit option still wins).
COMMON = dict(dad_lr=5e-3, dad_lr_weight=2e-3, dad_train="scales", dad_weighting="uniform",
              dad_temperature=1.0, dad_ce_weight=0.0, dad_topk=64, grad_clip=1.0,
              dad_teacher="topk", dad_autocast="auto", bw_autocast="auto")


def preset_values(name: str) -> dict:
    """Every stage option's value under preset ``name`` (``COMMON`` overridden by the preset's own)."""
    if name not in PRESETS:
        raise DbquantError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return {**COMMON, **PRESETS[name]}
