"""Perplexity on code: the ``code`` protocol, a second genre that calibration never sees.

Text: :data:`CODE_FILES`, 24 modules of the Python standard library (found under
``sysconfig.get_paths()["stdlib"]``; each has been a plain ``.py`` file in every CPython from
3.10 on), read as UTF-8 in this order and joined with blank lines. Their content changes between
Python versions, so the result records every file's sha256: compare two PPLs only when the
lists match. A missing file is refused (some distributions strip the sources).

Windowing and BOS rule: as the wiki protocol (:func:`dbquant.eval.wiki.wiki_windows`):
non-overlapping ``seq_len``-token windows of the stream tokenized without special tokens, the
first token replaced by BOS where the tokenizer adds one. One difference: the ``n_windows``
kept are spread evenly over the stream (window i of N available is kept when it is
``floor(j * N / n)`` for some j < n) rather than the first n, so that every file counts and
not only the first (argparse alone is ~25k tokens).
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch

from ..errors import DbquantError
from .wiki import wiki_windows

CODE_FILES = ("argparse.py", "ast.py", "bisect.py", "calendar.py", "configparser.py", "contextlib.py", "copy.py",
              "csv.py", "dataclasses.py", "difflib.py", "enum.py", "fractions.py", "functools.py", "heapq.py",
              "inspect.py", "ipaddress.py", "numbers.py", "pprint.py", "queue.py", "shlex.py", "statistics.py",
              "textwrap.py", "tokenize.py", "typing.py")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_files(names: tuple[str, ...] | None = None) -> list[dict]:
    """[{"name", "sha256", "text"}] of the listed standard-library files (default :data:`CODE_FILES`), in order.

    Raises DbquantError naming every missing file and the folder searched.
    """
    names = CODE_FILES if names is None else names
    root = stdlib_dir()
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise DbquantError(f"--protocol code needs the Python standard library's sources, but {missing} "
                           f"{'is' if len(missing) == 1 else 'are'} missing from {root} (a Python without .py "
                           "sources? install the full python3 package)")
    out = []
    for n in names:
        raw = (root / n).read_bytes()
        out.append({"name": n, "sha256": hashlib.sha256(raw).hexdigest(), "text": raw.decode("utf-8")})
    return out


def spread(windows: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows of ``windows`` ([N, seq_len]) spread evenly (rows floor(j * N / n)); all when n >= N."""
    total = windows.shape[0]
    if n >= total:
        return windows
    return windows[[j * total // n for j in range(n)]]


def code_windows(tokenizer, files: list[dict], seq_len: int = 512, n_windows: int = 32) -> torch.Tensor:
    """The protocol's token windows: int64 [min(n_windows, available), seq_len]."""
    every = wiki_windows(tokenizer, [f["text"] for f in files], seq_len=seq_len, n_windows=1 << 62)
    return spread(every, n_windows)
