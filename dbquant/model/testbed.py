"""The SmolVLM test bed (docs/PROTOCOLS.md): a VLM whose text backbone is the real SmolLM2-135M.

No real VLM weights exist offline, so ``smolvlm-testbed`` is
``SmolVLMForConditionalGeneration`` with SmolLM2's config as ``text_config`` and its
weights in ``model.text_model.*`` / ``lm_head`` (no missing keys), a small seeded random
SigLIP vision tower and connector, and image token id 49151. Its vision features carry no
meaning: it tests plumbing (part finding, calibration, checkpoints, the KV cache on real
text activations with image tokens among them), never image understanding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from ..errors import DbquantError

log = logging.getLogger(__name__)

NAME = "smolvlm-testbed"
IMAGE_TOKEN_ID = 49151  # docs/PROTOCOLS.md (the last id of SmolLM2's vocabulary)
IMAGE_SIZE, PATCH, SCALE = 256, 16, 2  # 16x16 patches, pixel-shuffled by 2: 64 tokens per image
VISION = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
              image_size=IMAGE_SIZE, patch_size=PATCH)
SEED = 0


def tokens_per_image() -> int:
    return (IMAGE_SIZE // PATCH) ** 2 // SCALE ** 2


def build(smollm2_dir: Path, target: Path) -> None:
    """Write the test bed into the (empty, temporary) folder ``target``: model, tokenizer, image processor."""
    # imported here: touching this name makes transformers warn when torchvision is absent
    from transformers import SmolVLMImageProcessor

    text_cfg = LlamaConfig.from_pretrained(smollm2_dir)
    cfg = SmolVLMConfig(text_config=text_cfg.to_dict(), vision_config=dict(VISION), image_token_id=IMAGE_TOKEN_ID,
                        scale_factor=SCALE, tie_word_embeddings=text_cfg.tie_word_embeddings)
    torch.manual_seed(SEED)  # the random vision tower and connector
    vlm = SmolVLMForConditionalGeneration(cfg).float().eval()
    text = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    state = {("lm_head." + k[len("lm_head."):] if k.startswith("lm_head.")
              else "model.text_model." + k[len("model."):]): v
             for k, v in text.state_dict().items()}
    missing, unexpected = vlm.load_state_dict(state, strict=False)
    # everything of the text side must come from SmolLM2; only vision parts may stay random
    bad = [k for k in missing if not k.startswith(("model.vision_model.", "model.connector."))]
    if bad or unexpected:
        raise DbquantError(f"SmolLM2 weights do not fit the test bed: missing {bad[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        vlm.tie_weights()
    vlm.save_pretrained(target)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(target)
    SmolVLMImageProcessor(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                          max_image_size={"longest_edge": IMAGE_SIZE}).save_pretrained(target)
