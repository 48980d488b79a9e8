"""fdb-dad on the real SmolLM2, cut down to a few minutes: a PPL ceiling the block-wise-only pipeline cannot meet."""

import pytest

pytestmark = pytest.mark.slow

# Measured 56.68 (4 windows) for the run below (55.35 with --calib wiki, 56.56 before the chat
# default: another C++ build and CPU), and 96.5 for the pipeline before issue 14 at the
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
    # and 12 DAD steps, both on 16 x 128 tokens; --calib auto, as a user gets it
    opts = QuantizeOptions(preset="fast", group_size=64, bw_samples=16, bw_seq_len=128, bw_steps=4, bw_batch=2,
                           dad=True, dad_samples=16, dad_seq_len=128, dad_steps=12, dad_batch=2, iters=2,
                           work_dir=str(tmp_path / "work"))
    report = quantize(model, tok, opts, progress=False, model_id="smollm2-135m")
    assert report["options"]["calib"] == "wiki:0.75,chat:0.25"
    assert report["bpw"] == pytest.approx(2.5)
    assert len(report["calibration"]["blockwise"]["blocks"]) == 30
    dad = report["calibration"]["dad"]
    assert dad["steps"] == 12 and dad["last_kl"] < dad["first_kl"], dad
    res = evaluate(model, tok, "wiki", n_windows=4, progress=False)
    assert res["ppl"] < PPL_CEILING, res
    # the chat quarter of the data keeps the turn open: this run answers "The capital of France was
    # founded by the Kingdom of France, ..."; with --calib wiki it answers with EOS first (nothing)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    new = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    answer = tok.decode(new, skip_special_tokens=True)
    assert new[0] != tok.eos_token_id and len(answer.split()) >= 4, answer
