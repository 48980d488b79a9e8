"""Fault injection for tests: kill this process at a named point, as a power cut or an OOM kill would.

Set ``DBQUANT_FAULT=POINT`` (or ``POINT#N``: the N-th time the point is reached) in the
environment of a dbquant process; when the code reaches that point the process sends itself
SIGKILL (no ``finally``, no cleanup). Points: ``saved:FILE`` after the run-state file FILE
(``state.pt``, ``init.pt``, ``teacher.pt``, ``block-000.pt``, ``final.pt``, ...) was written
atomically, and ``output:before-rename`` when the checkpoint is complete in its temp folder
but not yet renamed into place. Unset (always, outside tests), a point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "DBQUANT_FAULT"
_seen: dict[str, int] = {}


def point(name: str) -> None:
    """Kill the process here if ``DBQUANT_FAULT`` names this point (and this is its N-th visit)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition("#")
    if target != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
