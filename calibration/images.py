"""Image+text calibration samples for a VLM's block-wise reconstruction and DAD (``--calib-images DIR``).

DIR holds images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``) each with a caption in a text
file of the same stem (``cat.png`` + ``cat.txt``). Sample i is: image i's placeholder
tokens and caption (as the model folder's processor writes them), then calibration text
tokens up to the stage's sequence length, so every sample has the same length (block-wise
stacks the captured first-block inputs into one [S, T, H] tensor). Each stage uses every
image once; its samples beyond the images stay text windows. Samples run through the
whole VLM one at a time (their image tensors differ in shape between families).

Block-wise reconstruction and DAD both use these samples (each stage on its own text
windows). Families whose decoder positions depend on the image (M-RoPE: Qwen2-VL,
Qwen2.5-VL) get per-sample position embeddings in block-wise
(:class:`~dbquant.calibration.blockwise.PerSample`) and their ``mm_token_type_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dbquant.calibration.runstate import tensor_digest
from dbquant.errors import DbquantError
from dbquant.model.vlm import image_prompt_inputs, mm_token_types, vlm_family

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class MultimodalSamples:
    """Block-wise calibration samples of one length, some with an image.

    input_ids: int64 [S, T]. pixels: S dicts of the processor's image tensors for that
    sample (batch 1; an empty dict for a text-only sample). n_images: samples with an image.
    """

    input_ids: torch.Tensor
    pixels: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def inputs(self, i: int) -> dict:
        """``model(**...)`` inputs of sample i: input_ids int64 [1, T] and its image tensors (if any)."""
        return {"input_ids": self.input_ids[i:i + 1], **self.pixels[i]}

    @property
    def n_images(self) -> int:
        return sum(1 for p in self.pixels if p)

    def digest(self) -> str:
        return tensor_digest(self.input_ids, *[t for p in self.pixels for _, t in sorted(p.items())])


def image_caption_pairs(folder: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) of every image in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DbquantError(f"--calib-images {folder}: not a directory")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DbquantError(f"--calib-images {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise DbquantError(f"--calib-images {folder}: no caption for {', '.join(missing[:5])}; put each image's "
                           "caption in a .txt file of the same name (cat.png + cat.txt)")
    return [(p, p.with_suffix(".txt").read_text().strip()) for p in images]


def multimodal_samples(model, tokenizer, model_folder, images_dir, text_windows: torch.Tensor) -> MultimodalSamples:
    """Replace the first calibration windows by image+caption samples of the same length.

    text_windows: int64 [S, T] (a stage's text windows). Returns S samples: one per
    image (at most S), then the remaining text windows unchanged.
    """
    if vlm_family(model) is None:
        raise DbquantError(f"--calib-images needs a vision-language model; {type(model).__name__} has no vision tower")
    s, t = text_windows.shape
    filler = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids, pixels = text_windows.clone(), [{} for _ in range(s)]
    for i, (path, caption) in enumerate(image_caption_pairs(images_dir)[:s]):
        inputs = image_prompt_inputs(model_folder, model, tokenizer, str(path), caption, chat=False)
        sample = inputs.pop("input_ids")[0]
        for k in ("attention_mask", "token_type_ids", "mm_token_type_ids"):  # per token: rebuilt for the full row
            inputs.pop(k, None)
        n_image = int((sample == model.config.image_token_id).sum())
        if sample.numel() > t:  # cut the caption, never the image's placeholder tokens
            if n_image >= t:
                raise DbquantError(f"an image takes {n_image} tokens; a sequence length of {t} "
                                   "(--bw-seq-len, --dad-seq-len) leaves no room for text")
            sample = sample[:t]
            if int((sample == model.config.image_token_id).sum()) != n_image:
                raise DbquantError(f"{path.name}: its image tokens end beyond the sequence length {t}; "
                                   "raise --bw-seq-len / --dad-seq-len")
        ids[i, :sample.numel()] = sample  # the rest of the row keeps its calibration text
        # ... except the image token id, which the model would take for an image's placeholder
        tail = ids[i, sample.numel():]
        tail[tail == model.config.image_token_id] = filler
        pixels[i] = {**inputs, **mm_token_types(model, ids[i:i + 1])}
    return MultimodalSamples(ids, pixels)
