"""Vision-language models: where the language model, vision tower and projector live.

The table is data, one row per family (a ``model_type`` of transformers 5.x), checked
against each class built from a tiny random config (tests/test_vlm.py). dbquant quantizes
the language model's decoder linears; the vision tower and projector stay in full
precision unless asked (``--quantize-vision``: plan module set ``vision``), because they
are a small share of the weights and errors there reach every visual token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from ..errors import DbquantError


@dataclass(frozen=True)
class VLMFamily:
    """Module paths (dotted, from the ``...ForConditionalGeneration`` model) of one VLM family.

    language_model: the text decoder stack (its ``.layers`` are the decoder blocks).
    vision: the vision tower. projector: the vision->text projector (may lie inside
    ``vision``, as Qwen2-VL's merger does). image_token: the config attribute holding the
    image placeholder token id (the positions visual features are scattered into).
    mrope: the decoder's positions depend on where images sit (M-RoPE): its forward needs
    ``mm_token_type_ids`` (1 at image tokens), and the image's placeholder run is wrapped in
    the config's ``vision_start_token_id`` / ``vision_end_token_id`` tokens.
    """

    classes: str  # the transformers classes this row was checked against (documentation)
    language_model: str
    vision: str
    projector: str
    image_token: str = "image_token_id"
    mrope: bool = False


# To add a family: build it from a tiny random config, print its named_children, add a
# row, and add the config to tests/test_vlm.py's FAMILIES.
VLM_FAMILIES: dict[str, VLMFamily] = {
    "llava": VLMFamily("LlavaForConditionalGeneration", "model.language_model", "model.vision_tower",
                       "model.multi_modal_projector"),
    "llava_next": VLMFamily("LlavaNextForConditionalGeneration", "model.language_model", "model.vision_tower",
                            "model.multi_modal_projector"),
    "llava_onevision": VLMFamily("LlavaOnevisionForConditionalGeneration", "model.language_model",
                                 "model.vision_tower", "model.multi_modal_projector"),
    "qwen2_vl": VLMFamily("Qwen2VLForConditionalGeneration", "model.language_model", "model.visual",
                          "model.visual.merger", mrope=True),
    "qwen2_5_vl": VLMFamily("Qwen2_5_VLForConditionalGeneration", "model.language_model", "model.visual",
                            "model.visual.merger", mrope=True),
    "smolvlm": VLMFamily("SmolVLMForConditionalGeneration", "model.text_model", "model.vision_model",
                         "model.connector"),
    "idefics3": VLMFamily("Idefics3ForConditionalGeneration", "model.text_model", "model.vision_model",
                          "model.connector"),
    # Gemma-3 image-text: a gemma3_text decoder (sandwich norms, q/k norms, local/global layers)
    # behind a SigLIP tower; the projector pools the patches to mm_tokens_per_image tokens.
    "gemma3": VLMFamily("Gemma3ForConditionalGeneration", "model.language_model", "model.vision_tower",
                        "model.multi_modal_projector"),
    "paligemma": VLMFamily("PaliGemmaForConditionalGeneration", "model.language_model", "model.vision_tower",
                           "model.multi_modal_projector"),
    "mistral3": VLMFamily("Mistral3ForConditionalGeneration", "model.language_model", "model.vision_tower",
                          "model.multi_modal_projector"),
    "aya_vision": VLMFamily("AyaVisionForConditionalGeneration", "model.language_model", "model.vision_tower",
                            "model.multi_modal_projector"),
    "internvl": VLMFamily("InternVLForConditionalGeneration", "model.language_model", "model.vision_tower",
                          "model.multi_modal_projector"),
}


def is_vlm(config) -> bool:
    """Whether a model config (or model) describes a vision-language model (it has a vision sub-config)."""
    config = getattr(config, "config", config)
    return getattr(config, "vision_config", None) is not None or "vision_config" in (
        getattr(config, "sub_configs", None) or {})


def vlm_family(model_or_config) -> VLMFamily | None:
    """The family row of a VLM; None for a text-only model; ``DbquantError`` for an unknown VLM."""
    config = getattr(model_or_config, "config", model_or_config)
    if not is_vlm(config):
        return None
    row = VLM_FAMILIES.get(getattr(config, "model_type", None))
    if row is None:
        name = type(model_or_config).__name__ if hasattr(model_or_config, "config") else config.model_type
        raise DbquantError(
            f"unsupported vision-language model {name} (model_type {config.model_type!r}); dbquant knows "
            f"{sorted(VLM_FAMILIES)}. To add it, build it from a tiny config, find the paths of its language "
            "model (the module holding `.layers`), vision tower and projector, and add a VLMFamily row to "
            "VLM_FAMILIES in dbquant/model/vlm.py (and its config to tests/test_vlm.py)")
    return row


def image_token_id(model_or_config) -> int:
    """The image placeholder token id of a VLM (``DbquantError`` if the config has none)."""
    config = getattr(model_or_config, "config", model_or_config)
    row = vlm_family(config)
    tid = None if row is None else getattr(config, row.image_token, None)
    if tid is None:
        raise DbquantError(f"{type(model_or_config).__name__} has no image token id "
                           f"(config.{row.image_token if row else 'image_token_id'}); is it a VLM?")
    return int(tid)


def language_model(model: nn.Module) -> nn.Module:
    """The module whose ``.layers`` are the decoder blocks (the model itself's ``model`` for LLMs)."""
    row = vlm_family(model)
    return model.get_submodule(row.language_model) if row else model.get_submodule("model")


def vision_linears(model: nn.Module) -> list[str]:
    """Names of every nn.Linear in the vision tower and projector, in model order."""
    row = vlm_family(model)
    if row is None:
        raise DbquantError(f"module set 'vision' (--quantize-vision) needs a vision-language model; "
                           f"{type(model).__name__} has no vision tower")
    roots = (row.vision + ".", row.projector + ".")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(roots)]


def auto_model_class(config: dict):
    """The transformers Auto class that loads a model folder, from its config.json (as a dict).

    VLMs load as ``AutoModelForImageTextToText`` (their ``...ForConditionalGeneration``),
    text-only models as ``AutoModelForCausalLM``.
    """
    return AutoModelForImageTextToText if "vision_config" in config else AutoModelForCausalLM


# Files of a model folder that describe its image preprocessing (and a processor's own chat
# template, in the older .json form); copied into quantized checkpoints.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json")


def processor_files(folder) -> dict[str, str]:
    """``{file name: text}`` of the image-processor files present in a model folder."""
    return {n: (Path(folder) / n).read_text() for n in PROCESSOR_FILES if (Path(folder) / n).is_file()}


def image_prompt_inputs(folder, model, tokenizer, image_path: str, prompt: str, chat: bool = True) -> dict:
    """Inputs for ``model.generate(**inputs)``: one image, then ``prompt``.

    Uses the folder's full processor when it loads (real checkpoints: it knows the
    family's image tokens and layout); otherwise its image processor alone, with the
    image's placeholder tokens (as many as the vision tower yields features) put before
    the prompt (the test bed, whose tokenizer has no image markup).
    Returns ``input_ids`` int64 [1, T] and the processor's pixel tensors (float32).
    """
    from PIL import Image

    try:
        image = Image.open(image_path).convert("RGB")
    except OSError as e:
        raise DbquantError(f"--image {image_path}: cannot read it as an image ({e})") from None
    try:
        processor = AutoProcessor.from_pretrained(folder)
        if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
            raise TypeError("not a multimodal processor")
    except (ImportError, OSError, TypeError, ValueError, KeyError):
        processor = None
    if processor is not None:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        # raw: the processor's own image marker (e.g. "<image>") first, which it expands to placeholders
        text = (processor.apply_chat_template(messages, add_generation_prompt=True) if chat
                else getattr(processor, "image_token", "") + prompt)
        return dict(processor(images=[image], text=text, return_tensors="pt"))
    try:
        image_processor = AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise DbquantError(f"{folder} has no image processor (preprocessor_config.json) to prepare --image ({e}); "
                           "quantize from a folder that has one, or copy it into the checkpoint") from None
    pixels = dict(image_processor(images=[image], return_tensors="pt"))
    with torch.no_grad():
        feats = model.model.get_image_features(**pixels)
    feats = getattr(feats, "pooler_output", feats)
    n = sum(f.shape[:-1].numel() for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[:-1].numel()
    if chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    # the image first, then the (templated) prompt: the text attends to the image
    tid = image_token_id(model)
    placeholder = [tid] * n
    if vlm_family(model).mrope:
        placeholder = [model.config.vision_start_token_id, *placeholder, model.config.vision_end_token_id]
    ids = torch.cat([torch.tensor([placeholder], dtype=ids.dtype), ids], dim=1)
    return {"input_ids": ids, **pixels, **mm_token_types(model, ids)}


def mm_token_types(model, input_ids):
    """``{"mm_token_type_ids": int64 [B, T]}`` (1 at image tokens) for M-RoPE families, else ``{}``.

    input_ids: int64 [B, T]. The processor of a Qwen2-VL-style model returns this tensor;
    the model needs it to give image tokens their 2-D positions.
    """
    if not vlm_family(model).mrope:
        return {}
    return {"mm_token_type_ids": (input_ids == image_token_id(model)).long()}


def calibration_inputs(model: nn.Module) -> str:
    """What the calibration stages feed (recorded in the run log and report)."""
    return "text-only (language model)" if vlm_family(model) is not None else "text"
