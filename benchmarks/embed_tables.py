"""Size and wiki PPL of a checkpoint's input embedding / output projection stored as quantized tables.

Takes one dbquant checkpoint quantized with ``--embed-bits fp32`` (dense embedding) and, for each
variant, stores the tables exactly as ``dbquant quantize --embed-bits B --head-bits H
--embed-group G`` does (``dbquant.model.embedding.quantize_tables``, run after calibration there
too, on the same untouched fp32 embedding), saves the result to ``OUT/VARIANT`` and evaluates it
with the wiki protocol. The decoder is the same calibration in every row, so the rows differ
only in the tables; one calibration serves every variant (a ``fast`` run is minutes to an hour on
a shared 2-core machine).

With ``--fp``, CHECKPOINT is a full-precision model (e.g. ``smollm2-135m``): the tables are
applied to it in memory (nothing saved; sizes are the layouts'), which isolates what the tables
alone cost on an unquantized decoder.

Usage: python benchmarks/embed_tables.py CHECKPOINT OUT [--variants fp32:auto,8:auto,4:auto:32,...]
       [--windows 32] [--fp] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def retable(checkpoint: str, out: Path, embed_bits: str, head_bits: str, group: int | None):
    """Load ``checkpoint``, store its tables as asked, save to ``out``; return the reloaded model."""
    from transformers import AutoTokenizer

    import dbquant
    from dbquant.format.embedding import TABLE_VERSION
    from dbquant.model import embedding as embedlib
    from dbquant.model.hf import DbquantConfig, attach
    from dbquant.model.modules import PackedLinear
    from dbquant.model.plan import LinearPlan, bits_summary
    from dbquant.quantize import EMBED_BITS

    model = dbquant.load(checkpoint)
    tables = embedlib.make_table_plan(model, EMBED_BITS[embed_bits], group, head_bits)
    embedlib.quantize_tables(model, tables)
    plan = [LinearPlan(n, m.layout, m.bias is not None) for n, m in model.named_modules()
            if isinstance(m, PackedLinear)]
    old = model.config.quantization_config.to_dict()
    old.pop("quant_method", None)
    cfg = DbquantConfig(**{**old, "tables": [t.to_dict() for t in tables], "bpw": bits_summary(plan, model, tables),
                           "format_version": TABLE_VERSION if tables else old["format_version"]})
    attach(model, cfg)
    dbquant.save(model, out, AutoTokenizer.from_pretrained(checkpoint), overwrite=True)
    return dbquant.load(out)


def fp_tables(name: str, embed_bits: str, head_bits: str, group: int | None):
    """The full-precision model ``name`` with its tables stored as asked (in memory) and its bits summary."""
    from dbquant.model import embedding as embedlib
    from dbquant.model.plan import bits_summary
    from dbquant.model.sources import load_fp_model
    from dbquant.quantize import EMBED_BITS

    model = load_fp_model(name)[0].eval()
    tables = embedlib.make_table_plan(model, EMBED_BITS[embed_bits], group, head_bits)
    embedlib.quantize_tables(model, tables)
    bits = bits_summary([], model, tables)
    return model, {"checkpoint_bytes": bits["checkpoint_bytes"], "checkpoint_bpw": bits["checkpoint_bpw"]}


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from dbquant.eval.protocols import evaluate
    from dbquant.model.checkpoint import measured_bits

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--variants", default="fp32:auto,8:auto,4:auto:32,4:auto:64,4:8:32,fp16:auto")
    ap.add_argument("--windows", type=int, default=32, help="wiki windows (0: sizes only, no evaluation)")
    ap.add_argument("--fp", action="store_true", help="CHECKPOINT is a full-precision model; tables in memory only")
    ap.add_argument("--json", help="write the results here (atomically)")
    a = ap.parse_args(argv)
    from dbquant.model.sources import resolve_model
    tok = AutoTokenizer.from_pretrained(resolve_model(a.checkpoint) if a.fp else a.checkpoint)
    rows = []
    for v in a.variants.split(","):
        embed_bits, head_bits, *g = v.split(":")
        group = int(g[0]) if g else None
        if a.fp:
            model, size = fp_tables(a.checkpoint, embed_bits, head_bits, group)
        else:
            path = Path(a.out) / v.replace(":", "-")
            model = retable(a.checkpoint, path, embed_bits, head_bits, group)
            size = {**measured_bits(path, model), "du_b": sum(f.stat().st_size for f in path.iterdir() if f.is_file())}
        res = evaluate(model, tok, n_windows=a.windows, progress=False) if a.windows else {"ppl": None, "tokens": 0}
        rows.append({"variant": v, "embed_bits": embed_bits, "head_bits": head_bits, "embed_group": group,
                     "wiki_ppl": res["ppl"], "tokens": res["tokens"], **size})
        print(json.dumps(rows[-1]), flush=True)
        del model
    if a.json:
        from dbquant.format.files import write_json

        write_json(a.json, {"benchmark": "embed_tables", "checkpoint": a.checkpoint, "fp": a.fp,
                            "windows": a.windows, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
