"""VLMs (issue 7): part finding per family, language-model-only quantization, checkpoints, STP.

Every family of dbquant.model.vlm.VLM_FAMILIES is built from a tiny random config offline
(tests/tiny_vlms.py). The real-backbone test bed (smolvlm-testbed) is tested in
test_vlm_testbed.py.
"""

import json
import math

import pytest
import torch
from torch import nn

import dbquant
from dbquant.errors import DbquantError
from dbquant.model.modules import PackedLinear
from dbquant.model.plan import make_plan
from dbquant.model.vlm import VLM_FAMILIES, image_token_id, vision_linears, vlm_family
from dbquant.quantize import QuantizeOptions, quantize

from .conftest import TINY_TEXT, make_tiny_model, make_tokenizer
from .tiny_vlms import CLIP_LIKE, IMAGE_TOKEN, TEXT, image_inputs, make_tiny_vlm
from .tolerances import ACCUMULATED_GRAD_ATOL, ACCUMULATED_GRAD_RTOL, FP32_REORDER

FAMILIES = sorted(VLM_FAMILIES)


def _vision_state(model) -> dict[str, torch.Tensor]:
    row = vlm_family(model)
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.startswith((row.vision + ".", row.projector + "."))}


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_selects_the_language_model_only(family):
    model = make_tiny_vlm(family)
    row = vlm_family(model)
    plan = make_plan(model, 32)
    lm_linears = [n for n, m in model.get_submodule(row.language_model).named_modules() if isinstance(m, nn.Linear)]
    assert [p.name for p in plan] == [f"{row.language_model}.{n}" for n in lm_linears]
    assert len(plan) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    vis = vision_linears(model)
    assert vis and all(n.startswith((row.vision + ".", row.projector + ".")) for n in vis)
    with_vision = [p.name for p in make_plan(model, 32, modules=("decoder", "vision"))]
    assert sorted(with_vision) == sorted([p.name for p in plan] + vis)
    assert image_token_id(model) == IMAGE_TOKEN


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_save_load_generate(tmp_path, family):
    model = make_tiny_vlm(family)
    vision_before = _vision_state(model)
    inputs = image_inputs(model)
    quantize(model, None, QuantizeOptions(method="fdb", calib=None, group_size=32), progress=False)
    after = _vision_state(model)
    assert after.keys() == vision_before.keys()
    assert all(torch.equal(after[k], v) for k, v in vision_before.items())  # vision tower untouched
    assert not any(isinstance(m, PackedLinear) for m in model.get_submodule(vlm_family(model).vision).modules())
    with torch.no_grad():
        expect = model(**inputs).logits
    dbquant.save(model, tmp_path / "q")
    a = dbquant.load(tmp_path / "q")
    b = type(model).from_pretrained(tmp_path / "q")
    assert type(a) is type(model)
    with torch.no_grad():
        assert torch.equal(a(**inputs).logits, expect)
        assert torch.equal(b(**inputs).logits, expect)
    out = a.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("family", ["smolvlm", "qwen2_vl"])
def test_quantize_vision_packs_the_tower(tmp_path, family):
    model = make_tiny_vlm(family)
    inputs = image_inputs(model)
    quantize(model, None, QuantizeOptions(method="fdb", calib=None, group_size=32, modules=("decoder", "vision")),
             progress=False)
    row = vlm_family(model)
    packed = [n for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    assert any(n.startswith(row.vision + ".") for n in packed) and any(n.startswith(row.projector + ".")
                                                                        for n in packed)
    dbquant.save(model, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(dbquant.load(tmp_path / "q")(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("family", ["smolvlm", "qwen2_vl"])  # a Llama and an M-RoPE language model
def test_fdb_dad_calibrates_text_only_through_the_language_model(tmp_path, tiny_tokenizer, family):
    calib = tmp_path / "calib.txt"
    calib.write_text(TINY_TEXT)
    model = make_tiny_vlm(family)
    vision_before = _vision_state(model)
    report = quantize(model, tiny_tokenizer, QuantizeOptions(
        preset="fast", calib=str(calib), group_size=32, bw_samples=4, bw_seq_len=32, bw_steps=3, dad_samples=4,
        dad_seq_len=32, dad_steps=2, work_dir=str(tmp_path / "work")), progress=False)
    assert report["calibration"]["inputs"] == "text-only (language model)"
    assert len(report["calibration"]["blockwise"]["blocks"]) == 2
    assert all(math.isfinite(b["last_loss"]) and b["last_loss"] >= 0  # a trained block reports its MSE
               for b in report["calibration"]["blockwise"]["blocks"])
    assert all(torch.equal(_vision_state(model)[k], v) for k, v in vision_before.items())
    with torch.no_grad():
        assert torch.isfinite(model(**image_inputs(model)).logits).all()


def test_unknown_vlm_family_is_refused():
    import transformers as T

    cfg = T.LlavaNextVideoConfig(text_config=T.LlamaConfig(**TEXT), vision_config=T.CLIPVisionConfig(**CLIP_LIKE),
                                 image_token_id=IMAGE_TOKEN, video_token_id=291, image_grid_pinpoints=[[32, 32]])
    model = T.LlavaNextVideoForConditionalGeneration(cfg)
    with pytest.raises(DbquantError,
                       match="LlavaNextVideoForConditionalGeneration.*VLM_FAMILIES in dbquant/model/vlm.py"):
        make_plan(model, 32)
    with pytest.raises(DbquantError, match="unsupported vision-language model"):
        quantize(model, None, QuantizeOptions(method="fdb", calib=None), progress=False)


def test_vision_module_set_needs_a_vlm():
    with pytest.raises(DbquantError, match="needs a vision-language model"):
        make_plan(make_tiny_model(), 32, modules=("decoder", "vision"))


def test_saved_tensor_names_follow_transformers_legacy_layout(tmp_path):
    """LLaVA saves its language model as language_model.model.*; the loader's checks must find it."""
    model = make_tiny_vlm("llava")
    quantize(model, None, QuantizeOptions(method="fdb", calib=None, group_size=32), progress=False)
    dbquant.save(model, tmp_path / "q")
    from dbquant.format.files import read_header

    keys = set(read_header(tmp_path / "q" / "model.safetensors"))
    assert "language_model.model.layers.0.self_attn.q_proj.qweight" in keys
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["modules"][0] == "model.language_model.layers.0.self_attn.q_proj"
    # a truly missing tensor is still caught under the legacy name
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "q" / "model.safetensors")
    del sd["language_model.model.layers.1.mlp.down_proj.scales"]
    save_file(sd, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DbquantError, match="missing tensor language_model.model.layers.1.mlp.down_proj.scales"):
        dbquant.load(tmp_path / "q")


# ------------------------------------------------------------------ STP


@pytest.mark.parametrize("family", ["smolvlm", "llava_next", "qwen2_vl"])
def test_stp_positions_come_from_the_image_token(family):
    from dbquant.runtime.kv.stp import vlm_input_embeddings, vlm_protected_tokens

    model = make_tiny_vlm(family)
    inputs = image_inputs(model, text_ids=[5, 6, 7, 8, 9, 10, 11, 12])
    visual = inputs["input_ids"] == IMAGE_TOKEN
    mask = vlm_protected_tokens(model, inputs, ratio=0.5)
    assert mask.shape == visual.shape and mask.dtype == torch.bool
    assert not (mask & ~visual).any()  # only visual tokens are protected
    assert int(mask.sum()) == -(-int(visual.sum()) // 2)  # ceil(0.5 * n_visual)
    # the merged embeddings differ from the token embeddings exactly at the image positions
    emb = vlm_input_embeddings(model, inputs)
    plain = model.get_input_embeddings()(inputs["input_ids"])
    assert torch.equal(emb[~visual], plain[~visual]) and not torch.allclose(emb[visual], plain[visual])
    # the chosen tokens are the visual ones most similar to the mean text embedding
    e = torch.nn.functional.normalize(emb[0], dim=-1)
    anchor = torch.nn.functional.normalize(e[~visual[0]].mean(0), dim=0)
    sim = (e @ anchor)[visual[0]]
    assert sim[mask[0][visual[0]]].min() >= sim[~mask[0][visual[0]]].max()


def test_stp_cache_keeps_protected_values_at_two_bits():
    """Protected visual tokens in a VidKV cache decode closer to the truth than unprotected ones."""
    from dbquant.runtime.kv import make_cache, parse_kv
    from dbquant.runtime.kv.stp import vlm_protected_tokens

    model = make_tiny_vlm("smolvlm")
    inputs = image_inputs(model, text_ids=list(range(5, 65)))  # 4 visual + 60 text tokens
    mask = vlm_protected_tokens(model, inputs, ratio=0.5)
    fp = make_cache(model, "fp")
    from dbquant.runtime.kv.spec import KVSpec

    # everything packed: no full-precision tail, and no attention-sink tokens where the spec has them
    overrides = {"residual": 0, **({"sink": 0} if "sink" in KVSpec.__dataclass_fields__ else {})}
    q = make_cache(model, parse_kv("1.5/1.58", **overrides), protected=mask)
    with torch.no_grad():
        model(**inputs, past_key_values=fp)
        model(**inputs, past_key_values=q)
    layer = q.layers[0]
    assert layer.n_packed == 64
    _, v = layer.dequantized()
    err = (v - fp.layers[0].values[..., :64, :]).square().mean(dim=(0, 1, 3))
    pos = mask[0].nonzero(as_tuple=True)[0]
    unprot_visual = ((inputs["input_ids"][0] == IMAGE_TOKEN) & ~mask[0]).nonzero(as_tuple=True)[0]
    assert err[pos].mean() < err[unprot_visual].mean()


# ------------------------------------------------------------------ CLI


def test_cli_quantize_vision_and_generate_with_image(tmp_path, capsys, tiny_tokenizer):
    from PIL import Image
    from transformers import SmolVLMImageProcessor

    from dbquant.cli import main

    src = tmp_path / "vlm"
    make_tiny_vlm("smolvlm").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    SmolVLMImageProcessor(do_image_splitting=False, size={"longest_edge": 32},
                          max_image_size={"longest_edge": 32}).save_pretrained(src)
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--method", "fdb", "--calib", "none", "--group-size", "32",
                 "--quantize-vision", "-o", str(out)]) == 0
    assert (out / "preprocessor_config.json").is_file()  # the image preprocessing travels with the checkpoint
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert any(m.startswith("model.vision_model.") for m in modules)
    assert any(m.startswith("model.connector.") for m in modules)
    img = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (200, 30, 90)).save(img)
    capsys.readouterr()
    assert main(["generate", str(out), "--image", str(img), "--prompt", "fox", "--raw", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "engine hf" in err and "[3 tokens" in err
    # an unreadable image is a user error: one message, exit 2
    assert main(["generate", str(src), "--image", str(tmp_path / "missing.png"), "--prompt", "x"]) == 2
    assert "cannot read it as an image" in capsys.readouterr().err


def test_generate_with_image_through_the_folders_full_processor(tmp_path, capsys):
    """A folder with a full processor (LLaVA's: image processor, tokenizer with an <image> token, chat
    template) prepares --image with it, in the source folder and in the quantized checkpoint."""
    import transformers as T
    from PIL import Image

    from dbquant.cli import main
    from dbquant.model.vlm import image_prompt_inputs

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    cfg = T.LlavaConfig(text_config=T.LlamaConfig(**dict(TEXT, vocab_size=len(tok))),
                        vision_config=T.CLIPVisionConfig(**CLIP_LIKE),
                        image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = T.LlavaForConditionalGeneration(cfg).eval()
    template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}ASSISTANT:")
    proc = T.LlavaProcessor(image_processor=T.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                     crop_size={"height": 32, "width": 32}),
                            tokenizer=tok, patch_size=8, num_additional_image_tokens=1, image_token="<image>",
                            vision_feature_select_strategy=cfg.vision_feature_select_strategy, chat_template=template)
    src = tmp_path / "llava"
    model.save_pretrained(src)
    proc.save_pretrained(src)
    img = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (200, 30, 90)).save(img)
    inputs = image_prompt_inputs(src, model, tok, str(img), "fox")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "fox"}]}]
    expect = proc(images=[Image.open(img).convert("RGB")], text=proc.apply_chat_template(messages,
                                                                                       add_generation_prompt=True),
                  return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expect["input_ids"])  # the processor's template and expansion
    assert torch.equal(inputs["pixel_values"], expect["pixel_values"])
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == 16
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--method", "fdb", "--calib", "none", "--group-size", "32", "-o", str(out)]) == 0
    assert type(T.AutoProcessor.from_pretrained(out)) is T.LlavaProcessor  # the processor travels with it
    capsys.readouterr()
    assert main(["generate", str(out), "--image", str(img), "--prompt", "fox", "--max-new-tokens", "3"]) == 0
    assert f"prompt {expect['input_ids'].shape[1]} tokens" in capsys.readouterr().err


# ------------------------------------------------------------------ calibration with images


def _vlm_folder_with_images(tmp_path, tokenizer, family="smolvlm", n_images=3):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessorPil, SmolVLMImageProcessor

    src = tmp_path / "vlm"
    make_tiny_vlm(family).save_pretrained(src)
    tokenizer.save_pretrained(src)
    if vlm_family(make_tiny_vlm(family)).mrope:  # 4-pixel patches merged 2x2, as in tests/tiny_vlms.py
        Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=16 * 16 * 4, patch_size=4, merge_size=2,
                                 temporal_patch_size=2).save_pretrained(src)
    else:
        SmolVLMImageProcessor(do_image_splitting=False, size={"longest_edge": 32},
                              max_image_size={"longest_edge": 32}).save_pretrained(src)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(n_images):
        Image.new("RGB", (40 + 8 * i, 30), (60 * i, 30, 90)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("the quick brown fox")
    return AutoModelForImageTextToText.from_pretrained(src).eval(), src, images


def test_calib_images_feed_blockwise_through_the_vlm(tmp_path, tiny_tokenizer):
    from dbquant.calibration.blockwise import capture_block_inputs
    from dbquant.calibration.images import multimodal_samples

    model, src, images = _vlm_folder_with_images(tmp_path, tiny_tokenizer)
    text = torch.randint(0, 280, (4, 32), generator=torch.Generator().manual_seed(0))
    samples = multimodal_samples(model, tiny_tokenizer, src, images, text)
    assert samples.n_images == 3 and samples.input_ids.shape == (4, 32)
    assert torch.equal(samples.input_ids[3], text[3])  # beyond the images: text windows unchanged
    visual = samples.input_ids == IMAGE_TOKEN
    assert visual[:3].sum(1).tolist() == [4, 4, 4] and not visual[3].any()
    x, _ = capture_block_inputs(model, samples)
    plain = model.get_input_embeddings()(samples.input_ids)
    with torch.no_grad():
        assert torch.equal(x[~visual], plain[~visual])  # text positions: token embeddings
        assert not torch.allclose(x[visual], plain[visual])  # image positions: projected image features
    calib = tmp_path / "calib.txt"
    calib.write_text(TINY_TEXT)
    report = quantize(model, tiny_tokenizer, QuantizeOptions(
        preset="fast", calib=str(calib), calib_images=str(images), group_size=32, bw_samples=4, bw_seq_len=32,
        bw_steps=2, dad_steps=0, work_dir=str(tmp_path / "work")), progress=False)
    assert report["calibration"]["inputs"].startswith("block-wise: 3 image+text samples and 1 text windows")


def test_calib_images_give_mrope_models_per_sample_positions(tmp_path, tiny_tokenizer):
    """Qwen2-VL: each image+text sample's first-block inputs are exactly those of a whole-VLM forward."""
    from dbquant.calibration.blockwise import PerSample, call_block, capture_block_inputs
    from dbquant.calibration.images import multimodal_samples
    from dbquant.model.plan import decoder_blocks

    model, src, images = _vlm_folder_with_images(tmp_path, tiny_tokenizer, family="qwen2_vl")
    text = torch.randint(0, 280, (4, 48), generator=torch.Generator().manual_seed(0))
    samples = multimodal_samples(model, tiny_tokenizer, src, images, text)
    assert samples.n_images == 3
    for i in range(3):  # the image's run is wrapped in vision start/end; M-RoPE's token types travel along
        ids = samples.input_ids[i]
        n = int((ids == IMAGE_TOKEN).sum())
        assert ids[0] == model.config.vision_start_token_id and ids[n + 1] == model.config.vision_end_token_id
        assert torch.equal(samples.pixels[i]["mm_token_type_ids"][0], (ids == IMAGE_TOKEN).long())
    x, kwargs = capture_block_inputs(model, samples)
    assert isinstance(kwargs["position_embeddings"], PerSample)
    cos, _ = kwargs["position_embeddings"].value
    assert cos.shape == (4, 48, cos.shape[-1])
    assert not torch.equal(cos[0], cos[3])  # image positions are 2-D; the text window's are 1-D
    block, outs = decoder_blocks(model)[0], {}
    handle = block.register_forward_hook(lambda _m, _a, out: outs.__setitem__("y", out[0] if isinstance(out, tuple)
                                                                              else out))
    with torch.no_grad():
        for i in range(4):
            model(**samples.inputs(i), use_cache=False)
            mine = call_block(block, x[i:i + 1], kwargs, torch.tensor([i]))
            torch.testing.assert_close(mine, outs["y"], rtol=FP32_REORDER, atol=FP32_REORDER)
    handle.remove()


def test_fdb_dad_with_images_runs_blockwise_and_dad_through_the_vlm(tmp_path, tiny_tokenizer):
    model, src, images = _vlm_folder_with_images(tmp_path, tiny_tokenizer, family="qwen2_vl")
    calib = tmp_path / "calib.txt"
    calib.write_text(TINY_TEXT)
    vision_before = _vision_state(model)
    report = quantize(model, tiny_tokenizer, QuantizeOptions(
        preset="default", calib=str(calib), calib_images=str(images), group_size=32, bw_samples=4, bw_seq_len=48,
        bw_steps=2, dad_samples=4, dad_seq_len=48, dad_steps=3, dad_batch=2, work_dir=str(tmp_path / "work")),
        progress=False)
    cal = report["calibration"]
    assert cal["inputs"] == ("block-wise: 3 image+text samples and 1 text windows through the VLM; "
                             "DAD: 3 image+text samples and 1 text windows through the VLM")
    assert all(math.isfinite(cal["dad"][k]) and cal["dad"][k] >= 0 for k in ("first_kl", "last_kl"))  # KL >= 0
    assert all(torch.equal(_vision_state(model)[k], v) for k, v in vision_before.items())
    dbquant.save(model, tmp_path / "q")
    inputs = image_inputs(model)
    with torch.no_grad():
        assert torch.equal(dbquant.load(tmp_path / "q")(**inputs).logits, model(**inputs).logits)


def test_dad_on_samples_one_at_a_time_equals_the_batched_step():
    """Micro-batches (how image+text samples run) accumulate exactly the batched step's gradient."""
    from dbquant.calibration.blockwise import to_fakequant
    from dbquant.calibration.dad import DADConfig, distill, teacher_cache
    from dbquant.calibration.images import MultimodalSamples
    from dbquant.calibration.runstate import RunState, make_fingerprint
    from dbquant.quant import fdb

    ids = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(1))
    samples = MultimodalSamples(ids, [{} for _ in range(4)])
    trained = []
    for data in (ids, samples):
        model = make_tiny_model()
        plan = make_plan(model, 32)
        teacher = teacher_cache(model, data, topk=16, progress=False)
        init = {p.name: fdb.quantize_fdb(model.get_submodule(p.name).weight.detach(), 32) for p in plan}
        to_fakequant(model, [p.name for p in plan], init)
        distill(model, data, teacher, DADConfig(steps=3, batch_size=4, lr=1e-2, warmup=0),
                RunState(None, make_fingerprint(test=True)), progress=False)
        trained.append((teacher, {n: t.clone() for n, t in model.state_dict().items()}))
    (t_batched, batched), (t_single, single) = trained
    for k in t_batched:
        torch.testing.assert_close(t_single[k], t_batched[k], rtol=FP32_REORDER, atol=FP32_REORDER)
    assert batched.keys() == single.keys()
    for k in batched:
        torch.testing.assert_close(single[k], batched[k], rtol=ACCUMULATED_GRAD_RTOL, atol=ACCUMULATED_GRAD_ATOL)


def test_calib_images_errors(tmp_path, tiny_tokenizer):
    from dbquant.calibration.images import image_caption_pairs, multimodal_samples

    model, src, images = _vlm_folder_with_images(tmp_path, tiny_tokenizer, n_images=1)
    (images / "0.txt").unlink()
    with pytest.raises(DbquantError, match="no caption for 0.png"):
        image_caption_pairs(images)
    with pytest.raises(DbquantError, match="needs a vision-language model"):
        multimodal_samples(make_tiny_model(), tiny_tokenizer, src, images, torch.zeros(2, 32, dtype=torch.long))
    with pytest.raises(DbquantError, match="needs --method fdb-dad with block-wise or DAD on"):
        QuantizeOptions(method="fdb", calib_images=str(images)).check()
    with pytest.raises(DbquantError, match="needs --method fdb-dad with block-wise or DAD on"):
        QuantizeOptions(preset="fast", calib="wiki", calib_images=str(images), blockwise=False, dad=False).check()
