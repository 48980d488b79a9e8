"""Tiny random-config VLMs of every family in dbquant.model.vlm.VLM_FAMILIES, built offline.

Text sizes are those of tests/conftest.py's tiny Llama; vision towers have 2 layers of
width 32 on 32x32 images. Image token id 290 lies inside the 300-token vocabulary.
"""

import torch

IMAGE_TOKEN = 290
VOCAB = 300
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
CLIP_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8)
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3]}
GEMMA3_IMAGE_TOKENS = 4
QWEN_IDS = dict(image_token_id=IMAGE_TOKEN, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293)


def _config(family: str):
    import transformers as T

    if family == "llava":
        return T.LlavaConfig(text_config=T.LlamaConfig(**TEXT), vision_config=T.CLIPVisionConfig(**CLIP_LIKE),
                             image_token_id=IMAGE_TOKEN)
    if family == "llava_next":
        return T.LlavaNextConfig(text_config=T.LlamaConfig(**TEXT), vision_config=T.CLIPVisionConfig(**CLIP_LIKE),
                                 image_token_id=IMAGE_TOKEN, image_grid_pinpoints=[[32, 32]])
    if family == "llava_onevision":
        return T.LlavaOnevisionConfig(text_config=T.Qwen2Config(**TEXT),
                                      vision_config=T.SiglipVisionConfig(**CLIP_LIKE), image_token_id=IMAGE_TOKEN,
                                      image_grid_pinpoints=[[32, 32]])
    if family == "qwen2_vl":
        return T.Qwen2VLConfig(text_config=dict(TEXT, rope_parameters=MROPE),
                               vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4,
                                                  spatial_merge_size=2, temporal_patch_size=2), **QWEN_IDS)
    if family == "qwen2_5_vl":
        return T.Qwen2_5_VLConfig(text_config=dict(TEXT, rope_parameters=MROPE),
                                  vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                                                     num_heads=2, patch_size=4, spatial_merge_size=2,
                                                     temporal_patch_size=2, fullatt_block_indexes=[1],
                                                     window_size=16), **QWEN_IDS)
    if family in ("smolvlm", "idefics3"):
        cls = T.SmolVLMConfig if family == "smolvlm" else T.Idefics3Config
        return cls(text_config=T.LlamaConfig(**TEXT), vision_config=dict(CLIP_LIKE), image_token_id=IMAGE_TOKEN,
                   scale_factor=2)
    if family == "gemma3":  # 32 / 8 = 4 x 4 SigLIP patches, pooled to 2 x 2 image tokens
        return T.Gemma3Config(text_config=T.Gemma3TextConfig(**TEXT, head_dim=16, sliding_window=8),
                              vision_config=T.SiglipVisionConfig(**CLIP_LIKE), image_token_id=IMAGE_TOKEN,
                              mm_tokens_per_image=GEMMA3_IMAGE_TOKENS, boi_token_index=291, eoi_token_index=292)
    if family == "paligemma":  # every one of the 4 x 4 patches is an image token
        return T.PaliGemmaConfig(text_config=T.GemmaConfig(**TEXT, head_dim=16),
                                 vision_config=T.SiglipVisionConfig(**CLIP_LIKE, projection_dim=64),
                                 image_token_id=IMAGE_TOKEN, projection_dim=64)
    if family == "mistral3":  # Pixtral patches merged 2 x 2
        return T.Mistral3Config(text_config=T.MistralConfig(**TEXT),
                                vision_config=T.PixtralVisionConfig(**CLIP_LIKE, head_dim=16),
                                image_token_id=IMAGE_TOKEN, spatial_merge_size=2)
    if family == "aya_vision":  # a Cohere decoder; SigLIP patches pixel-shuffled 2 x 2
        return T.AyaVisionConfig(text_config=T.CohereConfig(**TEXT), vision_config=T.SiglipVisionConfig(**CLIP_LIKE),
                                 image_token_id=IMAGE_TOKEN, downsample_factor=2)
    if family == "internvl":
        return T.InternVLConfig(text_config=T.Qwen2Config(**TEXT), image_token_id=IMAGE_TOKEN, downsample_ratio=0.5,
                                vision_config=T.InternVLVisionConfig(
                                    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=[32, 32], patch_size=[8, 8]))
    raise KeyError(family)


def make_tiny_vlm(family: str, seed: int = 0):
    """A tiny random VLM of ``family`` (fp32, eval mode)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(_config(family), dtype=torch.float32).eval()


def image_inputs(model, text_ids: list[int] | None = None, seed: int = 0) -> dict:
    """Model inputs holding one random image: placeholder tokens + the family's pixel tensors.

    Returns a dict for ``model(**inputs)`` / ``generate``: ``input_ids`` int64 [1, T] and
    ``pixel_values`` float32 (shape per family), plus ``image_grid_thw`` / ``image_sizes`` /
    ``mm_token_type_ids`` where the family needs them.
    """
    gen = torch.Generator().manual_seed(seed)
    text_ids = text_ids or [5, 6, 7, 8, 9, 10]
    mt = model.config.model_type
    if mt in ("qwen2_vl", "qwen2_5_vl"):
        vc = model.config.vision_config
        grid = torch.tensor([[1, 4, 4]])  # t, h, w patches
        n_patches = int(grid.prod())
        pix = torch.randn(n_patches, 3 * vc.temporal_patch_size * vc.patch_size ** 2, generator=gen)
        n_tokens = n_patches // vc.spatial_merge_size ** 2
        ids = [292] + [IMAGE_TOKEN] * n_tokens + [293] + text_ids
        ids = torch.tensor([ids])
        # M-RoPE needs to know which tokens are image tokens (the processor's mm_token_type_ids)
        return {"input_ids": ids, "pixel_values": pix, "image_grid_thw": grid,
                "mm_token_type_ids": (ids == IMAGE_TOKEN).long()}
    pix = torch.randn(1, 3, 32, 32, generator=gen)
    if mt in ("smolvlm", "idefics3"):
        n_tokens = (32 // 8) ** 2 // model.config.scale_factor ** 2
        return {"input_ids": torch.tensor([[IMAGE_TOKEN] * n_tokens + text_ids]), "pixel_values": pix[:, None]}
    if mt == "gemma3":
        return {"input_ids": torch.tensor([[IMAGE_TOKEN] * GEMMA3_IMAGE_TOKENS + text_ids]), "pixel_values": pix}
    # 4 x 4 patches: PaliGemma keeps all, the rest merge 2 x 2
    if mt in ("paligemma", "mistral3", "aya_vision", "internvl"):
        n_tokens = 16 if mt == "paligemma" else 4
        extra = {"image_sizes": torch.tensor([[32, 32]])} if mt == "mistral3" else {}
        return {"input_ids": torch.tensor([[IMAGE_TOKEN] * n_tokens + text_ids]), "pixel_values": pix, **extra}
    if mt == "llava":
        return {"input_ids": torch.tensor([[IMAGE_TOKEN] * 16 + text_ids]), "pixel_values": pix}
    # llava_next / onevision: anyres patches (base + 1 tile) and an image size; the token count
    # follows from the model's own packing, so ask it.
    sizes = torch.tensor([[32, 32]])
    pv = pix[:, None].expand(1, 2, 3, 32, 32).contiguous()
    n_tokens = int(model.model.get_image_features(
        pv, sizes, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        return_dict=True).pooler_output[0].shape[0]) \
        if hasattr(model.model, "get_image_features") else 0
    return {"input_ids": torch.tensor([[IMAGE_TOKEN] * n_tokens + text_ids]), "pixel_values": pv, "image_sizes": sizes}
