"""STP on the SmolVLM test bed: attention-output error of a VidKV cache with and without protection.

Per window: ``N_IMAGES`` seeded random images (64 visual tokens each) interleaved with wiki
eval text (``TEXT_PER_IMAGE`` tokens after each image) form the prefix; it is prefilled
into the cache under test (the prefill attends in full precision; the cache packs what its
policy says as it goes). Then ``SUFFIX`` further text tokens are fed teacher-forced in one
forward through that cache, and each decoder layer's attention output (``self_attn``, after
o_proj) on those tokens is compared with the same forward through the full-precision cache:
relative MSE = sum (a - a_fp)^2 / sum a_fp^2, per layer. Also the suffix's NLL.

Caches compared, all VidKV 1.5-bit keys / 1.58-bit values with the same residual:
``none`` (no protection), ``stp`` (dbquant.runtime.kv.stp.vlm_protected_tokens: the top ``ratio``
visual tokens by similarity of their merged embeddings to the mean text embedding get
~2.85-bit values: their ternary code plus a sign bit per value, see VidKVCodec), ``random`` (the same
number of visual tokens per window, chosen uniformly; several seeds). stp and random hold the same
bytes (measured with cache_nbytes).

The test bed's vision tower and connector are random (docs/PROTOCOLS.md): which visual tokens
matter is decided by the real SmolLM2 backbone's attention, but the "semantics" of the
relevance score are those of random features. Run:

    .venv/bin/python benchmarks/vlm_stp.py --json docs/bench/vlm_stp.json
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

N_IMAGES, TEXT_PER_IMAGE, SUFFIX = 4, 96, 128


def make_window(model, tok, text_ids: torch.Tensor, seed: int) -> tuple[dict, torch.Tensor]:
    """(prefix inputs for model(**...), suffix ids int64 [1, SUFFIX]) of one window."""
    from dbquant.model import testbed

    gen = torch.Generator().manual_seed(seed)
    # pixels as the image processor would give them: [-1, 1] after normalisation
    pixels = torch.rand(1, N_IMAGES, 3, testbed.IMAGE_SIZE, testbed.IMAGE_SIZE, generator=gen) * 2 - 1
    n_img = testbed.tokens_per_image()
    parts = []
    for i in range(N_IMAGES):
        parts += [torch.full((n_img,), model.config.image_token_id),
                  text_ids[i * TEXT_PER_IMAGE:(i + 1) * TEXT_PER_IMAGE]]
    prefix = torch.cat(parts)[None]
    suffix = text_ids[N_IMAGES * TEXT_PER_IMAGE:N_IMAGES * TEXT_PER_IMAGE + SUFFIX][None]
    return {"input_ids": prefix, "pixel_values": pixels}, suffix


@torch.no_grad()
def run_cache(model, prefix: dict, suffix: torch.Tensor, cache) -> tuple[list[torch.Tensor], float]:
    """Attention outputs float32 [SUFFIX, hidden] per layer on the suffix, and the suffix's mean NLL."""
    from dbquant.model.plan import decoder_blocks

    outs = []
    hooks = [b.self_attn.register_forward_hook(lambda _m, _i, o: outs.append(o[0][0].float().clone()))
             for b in decoder_blocks(model)]
    try:
        first = model(**prefix, past_key_values=cache, use_cache=True).logits[0, -1:]
        outs.clear()  # only the suffix forward is scored
        logits = model(input_ids=suffix, past_key_values=cache, use_cache=True).logits[0]
    finally:
        for h in hooks:
            h.remove()
    # predictions of suffix tokens: the prefix's last logit predicts suffix[0], then teacher forcing
    pred = torch.cat([first, logits[:-1]]).float()
    return outs, float(F.cross_entropy(pred, suffix[0]))


def cache_values(cache) -> list[torch.Tensor]:
    """Per layer, the values float32 [B, H, T, D] that the cache serves attention (dequantized past included)."""
    out = []
    for layer in cache.layers:
        # the dequantized past already holds the exact sink token(s) in their own positions
        _, dv = layer.dequantized() if hasattr(layer, "dequantized") else (None, None)
        parts = [dv, layer.values]
        out.append(torch.cat([t.float() for t in parts if t is not None], dim=-2))
    return out


def value_error_at(vals: list[torch.Tensor], ref: list[torch.Tensor], mask: torch.Tensor) -> float:
    """Relative MSE of the cached values at the tokens of ``mask`` (bool [1, T]), all layers pooled."""
    pos = mask[0].nonzero(as_tuple=True)[0]
    num = sum(float((v[..., pos, :] - r[..., pos, :]).square().sum()) for v, r in zip(vals, ref))
    return num / sum(float(r[..., pos, :].square().sum()) for r in ref)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.2, help="STP: fraction of visual tokens protected")
    ap.add_argument("--kv", default="1.5/1.58")
    ap.add_argument("--residual", type=int, nargs="+", default=[0, 128])
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)

    from dataclasses import asdict

    from dbquant.eval.data import load_text
    from dbquant.eval.wiki import wiki_windows
    from dbquant.model.sources import load_fp_model
    from dbquant.runtime.kv import cache_nbytes, make_cache, parse_kv
    from dbquant.runtime.kv.stp import vlm_protected_tokens

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_fp_model("smolvlm-testbed")
    need = N_IMAGES * TEXT_PER_IMAGE + SUFFIX
    texts = wiki_windows(tok, load_text("wiki", "eval"), seq_len=need, n_windows=a.windows)
    rows = []
    for residual in a.residual:
        spec = parse_kv(a.kv, residual=residual)
        acc: dict[str, list] = {}
        for w in range(a.windows):
            prefix, suffix = make_window(model, tok, texts[w], seed=w)
            fp_cache = make_cache(model, "fp")
            ref, nll_fp = run_cache(model, prefix, suffix, fp_cache)
            ref_vals = cache_values(fp_cache)
            visual = prefix["input_ids"] == model.config.image_token_id
            stp = vlm_protected_tokens(model, prefix, a.ratio)
            masks = {"none": None, "stp": stp}
            k = int(stp.sum())
            for s in range(a.random_seeds):
                g = torch.Generator().manual_seed(1000 + s)
                idx = visual[0].nonzero(as_tuple=True)[0]
                rnd = torch.zeros_like(visual)
                rnd[0, idx[torch.randperm(idx.numel(), generator=g)[:k]]] = True
                masks[f"random{s}"] = rnd
            for name, mask in masks.items():
                cache = make_cache(model, spec, protected=mask)
                outs, nll = run_cache(model, prefix, suffix, cache)
                rel = [float((o - r).square().sum() / r.square().sum()) for o, r in zip(outs, ref)]
                # how well the cache keeps the values of the tokens STP picks (whatever this cache protects)
                vals = cache_values(cache)
                v_err = value_error_at(vals, ref_vals, stp)
                v_err_visual = value_error_at(vals, ref_vals, visual)
                nb = cache_nbytes(cache)
                acc.setdefault(name, []).append({"rel_mse": rel, "nll": nll, "nll_fp": nll_fp,
                                                 "value_rel_mse_stp_tokens": v_err,
                                                 "value_rel_mse_visual": v_err_visual,
                                                 "bytes_per_token": nb["total"] / nb["tokens"],
                                                 "quantized_bytes": nb["quantized"],
                                                 "protected": int(k if mask is not None else 0)})
                print(f"residual {residual} window {w} {name:>8}: mean rel MSE {sum(rel) / len(rel):.4f}, "
                      f"NLL {nll:.4f} (fp {nll_fp:.4f}); values rel MSE at STP tokens {v_err:.4f}, "
                      f"all visual {v_err_visual:.4f}", file=sys.stderr)
        for name in ("none", "stp", "random"):
            runs = [r for n, rs in acc.items() if n == name or (name == "random" and n.startswith("random"))
                    for r in rs]
            n_layers = len(runs[0]["rel_mse"])
            per_layer = [sum(r["rel_mse"][i] for r in runs) / len(runs) for i in range(n_layers)]
            means = [sum(r["rel_mse"]) / n_layers for r in runs]
            rows.append({"residual": residual, "protection": name, "runs": len(runs),
                         "mean_rel_mse": sum(means) / len(means),
                         "mean_rel_mse_std_over_runs": float(torch.tensor(means).std()) if len(means) > 1 else 0.0,
                         "per_layer_rel_mse": per_layer,
                         "value_rel_mse_stp_tokens": sum(r["value_rel_mse_stp_tokens"] for r in runs) / len(runs),
                         "value_rel_mse_visual": sum(r["value_rel_mse_visual"] for r in runs) / len(runs),
                         "suffix_ppl": math.exp(sum(r["nll"] for r in runs) / len(runs)),
                         "suffix_ppl_fp": math.exp(sum(r["nll_fp"] for r in runs) / len(runs)),
                         "bytes_per_token": sum(r["bytes_per_token"] for r in runs) / len(runs),
                         "quantized_bytes": sum(r["quantized_bytes"] for r in runs) / len(runs),
                         "protected_tokens": runs[0]["protected"], "spec": asdict(spec)})
    res = {"benchmark": "vlm_stp", "model": "smolvlm-testbed", "kv": a.kv, "ratio": a.ratio,
           "windows": a.windows, "images_per_window": N_IMAGES, "visual_tokens_per_window": N_IMAGES * 64,
           "text_per_image": TEXT_PER_IMAGE, "suffix": SUFFIX, "random_seeds": a.random_seeds,
           "seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "rows": rows}
    for r in rows:
        print(f"residual {r['residual']:>4} {r['protection']:>6}: mean rel MSE {r['mean_rel_mse']:.5f} "
              f"(±{r['mean_rel_mse_std_over_runs']:.5f}), suffix PPL {r['suffix_ppl']:.3f} "
              f"(fp {r['suffix_ppl_fp']:.3f}), {r['bytes_per_token']:.0f} B/token; values rel MSE at STP "
              f"tokens {r['value_rel_mse_stp_tokens']:.4f}, all visual {r['value_rel_mse_visual']:.4f}")
    if a.json:
        from dbquant.format.files import write_json

        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
