"""Text for calibration and evaluation.

Sources (``load_text``):
  * ``wiki`` — the Wikipedia dump shipped in gensim's test data (offline, built-in);
    106 articles, ~3.1 MB. Article i (dump order, after dropping redirects and
    articles under 200 characters) is eval when i % 5 == 4, else calibration.
  * a local ``.txt`` file or a folder of ``.txt`` files — one document per file.
  * ``hf:NAME[:CONFIG]:SPLIT[:FIELD]`` — a Hugging Face dataset (needs hub access
    or a local datasets cache; FIELD defaults to ``text``; three parts mean
    NAME:CONFIG:SPLIT, so a field without a config is ``hf:NAME::SPLIT:FIELD``).
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import re
from pathlib import Path

import torch

from ..errors import DbquantError
from ..format.files import write_json
from ..model.sources import cache_dir

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_CACHE_VERSION = 2  # bump when the preprocessing changes
SPLITS = ("calibration", "eval")

SOURCE_FORMS = (
    "'wiki' (built-in Wikipedia text)",
    "a local .txt file or a folder of .txt files (one document per file)",
    "'hf:NAME[:CONFIG]:SPLIT[:FIELD]' (a Hugging Face dataset; FIELD defaults to 'text')",
)


def _parse_wiki() -> list[str]:
    """All kept articles of the gensim dump, in dump order (~2 s: cached by wiki_articles)."""
    if importlib.util.find_spec("gensim") is None:
        raise DbquantError("the built-in 'wiki' text needs the gensim package: `pip install gensim`.")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    articles = []
    with bz2.open(datapath(WIKI_DUMP)) as dump:
        for _title, markup, _pageid in extract_pages(dump):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            # filter_wiki strips markup but keeps the '' / ''' (italic / bold) quote runs
            # and leaves blank lines where templates were. Stripping the ends matters:
            # the reference PPL (16.08 for fp32 SmolLM2) is measured on stripped articles.
            text = re.sub(r"'{2,}", "", filter_wiki(markup)).strip()
            if len(text) >= 200:
                articles.append(text)
    return articles


def wiki_articles() -> list[str]:
    """All kept wiki articles (both splits) in dump order, cached as JSON in ``cache_dir()``."""
    path = cache_dir() / f"wiki-articles-v{WIKI_CACHE_VERSION}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    articles = _parse_wiki()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, articles, indent=None)  # atomic: a concurrent reader never sees half a file
    return articles


def wiki_split(split: str) -> list[str]:
    """The calibration or eval articles of the built-in wiki text (disjoint by construction)."""
    articles = wiki_articles()
    want_eval = split == "eval"
    return [a for i, a in enumerate(articles) if (i % 5 == 4) == want_eval]


def _load_local(path: Path) -> list[str]:
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DbquantError(f"folder {path} has no .txt files; put one document per .txt file in it.")
    docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return [d for d in docs if d.strip()]


def _load_hf(source: str) -> list[str]:
    parts = source[len("hf:"):].split(":")
    if len(parts) == 2:
        name, hf_split, config, field = parts[0], parts[1], None, "text"
    elif len(parts) == 3:
        name, config, hf_split, field = parts[0], parts[1], parts[2], "text"
    elif len(parts) == 4:
        name, config, hf_split, field = parts
    else:
        raise DbquantError(f"bad dataset source {source!r}; write hf:NAME[:CONFIG]:SPLIT[:FIELD].")
    import datasets

    try:
        ds = datasets.load_dataset(name, config or None, split=hf_split)
    except Exception as e:  # network, missing dataset, bad config: all user-fixable
        raise DbquantError(f"could not load dataset {source!r}: {e}") from e
    if field not in ds.column_names:
        raise DbquantError(f"dataset {source!r} has no field {field!r}; its fields: {ds.column_names}.")
    return [t for t in ds[field] if t and t.strip()]


def load_text(source: str, split: str) -> list[str]:
    """Documents of ``source`` as a list of strings.

    ``split`` ("calibration" or "eval") selects the wiki half; local files and hf
    sources return all their documents for either split (the hf split is in the source).
    """
    if split not in SPLITS:
        raise DbquantError(f"split must be one of {SPLITS}, not {split!r}.")
    if source == "wiki":
        return wiki_split(split)
    if source.startswith("hf:"):
        return _load_hf(source)
    path = Path(source).expanduser()
    if path.exists():
        return _load_local(path)
    raise DbquantError(f"unknown text source {source!r}. Accepted: {'; '.join(SOURCE_FORMS)}.")


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """The texts joined with blank lines, tokenized once without special tokens: int64 [T]."""
    # verbose=False: the text is far longer than model_max_length on purpose.
    return tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False, return_tensors="pt").input_ids[0]


def sample_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens from the stream ``ids`` (int64 [T]).

    Window starts are drawn uniformly (windows may overlap) from a generator seeded with
    ``seed``, so the same arguments always give the same batch.

    Returns: torch.int64 tensor [n_samples, seq_len].
    """
    if ids.numel() < seq_len:
        raise DbquantError(
            f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}; "
            "give more text or a shorter sequence length."
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_batches(tokenizer, texts: list[str], n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Random token windows of the calibration text: int64 [n_samples, seq_len] (see :func:`sample_windows`)."""
    return sample_windows(token_stream(tokenizer, texts), n_samples, seq_len, seed)
