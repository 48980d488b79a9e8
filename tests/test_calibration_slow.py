"""fdb-dad on the real SmolLM2, cut down to a few minutes: a PPL ceiling the block-wise-only pipeline cannot meet."""

import pytest

pytestmark = pytest.mark.slow

# Measured 56.56 (4 windows) for the run below, and 96.5 for the pipeline before issue 14 at the
# same kind of budget (8 block-wise steps per block on 16 x 128 tokens, no DAD); the former `fast`
# preset (16 block-wise steps on 32 x 256 tokens, no DAD) scores 90.4 on 32 windows. For scale,
# on 32 windows: fp32 16.1, data-free FDB init 2.1e4, activation-weighted FDB init 206, RTN
# ~1e5-1e6; a pipeline that drops its trained scales or scrambles the planes lands in the thousands.
PPL_CEILING = 75.0


def test_smollm2_short_blockwise_then_dad_beats_blockwise_alone(tmp_path):
    from dbquant.eval.protocols import evaluate
    from dbquant.model.sources import load_fp_model
    from dbquant.quantize import QuantizeOptions, quantize

    try:
        model, tok = load_fp_model("smollm2-135m")
    except Exception as e:  # the model package is not installed here
        pytest.skip(f"SmolLM2 unavailable: {e}")
    # the `fast` preset's shape (a short block-wise pass, then DAD), cut down: 4 steps per block
    # and 12 DAD steps, both on 16 x 128 tokens
    opts = QuantizeOptions(preset="fast", group_size=64, bw_samples=16, bw_seq_len=128, bw_steps=4, bw_batch=2,
                           dad=True, dad_samples=16, dad_seq_len=128, dad_steps=12, dad_batch=2, iters=2,
                           work_dir=str(tmp_path / "work"))
    report = quantize(model, tok, opts, progress=False, model_id="smollm2-135m")
    assert report["bpw"] == pytest.approx(2.5)
    assert len(report["calibration"]["blockwise"]["blocks"]) == 30
    dad = report["calibration"]["dad"]
    assert dad["steps"] == 12 and dad["last_kl"] < dad["first_kl"], dad
    res = evaluate(model, tok, "wiki", n_windows=4, progress=False)
    assert res["ppl"] < PPL_CEILING, res
