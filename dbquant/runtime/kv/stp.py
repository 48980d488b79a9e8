"""Semantic token protection (VidKV's STP): which visual tokens get finer values.

The visual tokens most related to the text get ~2.85-bit values in a VidKV cache with
1.58-bit values (their ternary code plus a sign bit per value that refines it, see
``codecs.VidKVCodec.quantize_values``); the rest stay ternary. Relevance of a visual token = the cosine
similarity of its embedding to the mean text-token embedding of the same sequence
(our reading of "similarity of visual-token embeddings to the text-token embeddings").
Pass the result to ``make_cache(model, "1.5/1.58", protected=mask)``.
"""

from __future__ import annotations

import math

import torch

from ...errors import DbquantError
from ...model.vlm import image_token_id, vlm_family


def protected_tokens(visual_mask: torch.Tensor, embeddings: torch.Tensor, ratio: float = 0.2,
                     text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The top ``ratio`` of each row's visual tokens by similarity to its text tokens.

    visual_mask: bool [B, T], True at visual tokens. embeddings: float [B, T, E] (the
    input embeddings of every token). text_mask: bool [B, T] (default: every non-visual
    token). Returns bool [B, T]: True at protected tokens (ceil(ratio * n_visual) per row;
    none in a row without visual or without text tokens).
    """
    if visual_mask.dtype != torch.bool or visual_mask.dim() != 2:
        raise DbquantError(f"visual_mask must be bool [batch, tokens], got {visual_mask.dtype} "
                           f"{tuple(visual_mask.shape)}")
    if embeddings.shape[:2] != visual_mask.shape:
        raise DbquantError(f"embeddings {tuple(embeddings.shape)} do not match visual_mask "
                           f"{tuple(visual_mask.shape)} in [batch, tokens]")
    if not 0 <= ratio <= 1:
        raise DbquantError(f"STP ratio must be in [0, 1], got {ratio}")
    text = ~visual_mask if text_mask is None else text_mask & ~visual_mask
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    out = torch.zeros_like(visual_mask)
    for b in range(visual_mask.shape[0]):
        vis = visual_mask[b].nonzero(as_tuple=True)[0]
        k = math.ceil(ratio * vis.numel())
        if k == 0 or not text[b].any():
            continue
        anchor = torch.nn.functional.normalize(e[b, text[b]].mean(0), dim=0)
        sim = e[b, vis] @ anchor
        out[b, vis[sim.topk(k).indices]] = True
    return out


class _Stop(Exception):
    pass


@torch.no_grad()
def vlm_input_embeddings(model, inputs: dict) -> torch.Tensor:
    """The language model's input embeddings of a VLM's multimodal inputs (image features merged in).

    inputs: what ``model(**inputs)`` takes (``input_ids`` int64 [B, T], pixel tensors).
    Returns float [B, T, hidden]: captured at the language model's entry, so the vision tower
    and projector run and the decoder does not.
    """
    row = vlm_family(model)
    if row is None:
        raise DbquantError(f"STP for images needs a vision-language model, not a {type(model).__name__}")
    seen = {}

    def pre_hook(_mod, args, kwargs):
        seen["e"] = kwargs.get("inputs_embeds")
        raise _Stop

    handle = model.get_submodule(row.language_model).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if seen.get("e") is None:
        raise DbquantError(f"{type(model).__name__} did not pass inputs_embeds to its language model; "
                           "STP cannot see the merged image features")
    return seen["e"]


def vlm_protected_tokens(model, inputs: dict, ratio: float = 0.2) -> torch.Tensor:
    """STP mask of a VLM prompt: visual tokens are those holding the model's image token id.

    Returns bool [B, T] for ``make_cache(model, "1.5/1.58", protected=...)``: the top
    ``ratio`` of each row's visual tokens by similarity of their merged embeddings (the
    projected image features) to the mean text-token embedding.
    """
    visual = inputs["input_ids"] == image_token_id(model)
    return protected_tokens(visual, vlm_input_embeddings(model, inputs), ratio)
