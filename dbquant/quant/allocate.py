"""Bit allocation: choose one (k, group size, offset) option per linear under an average-bits budget.

Pure arithmetic over numbers the caller measured: for linear i and option o, ``cost[i][o]`` is
the bits the packed layout stores (``LinearLayout.storage_bits``: planes with their padding and
every scale and offset at its stored float16 width) and ``error[i][o]`` an estimate of what the
quantization costs the model (``dbquant.calibration.sensitivity``). Minimise sum error subject to
sum cost <= budget_bits, a multiple-choice knapsack, solved greedily on each linear's lower convex
hull of (cost, error): start every linear at its cheapest option, then repeatedly take the
upgrade with the largest error drop per added bit among those that still fit. The budget is a
hard limit: an upgrade that does not fit is never taken.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from ..errors import DbquantError


@dataclass(frozen=True)
class Choice:
    """The allocation: ``picks[i]`` is the option index chosen for linear i; ``bits`` their total cost."""

    picks: tuple[int, ...]
    bits: int
    error: float


def hull(costs: list[int], errors: list[float]) -> list[int]:
    """Option indices on the lower convex hull of (cost, error), by increasing cost.

    Dominated options (no cheaper, no lower error) are dropped; along the hull each step buys
    less error drop per bit than the one before, which is what makes greedy steps well ordered.
    """
    order = sorted(range(len(costs)), key=lambda o: (costs[o], errors[o]))
    front = []  # Pareto front: strictly decreasing error with increasing cost
    for o in order:
        if not front or errors[o] < errors[front[-1]]:
            if front and costs[o] == costs[front[-1]]:
                front.pop()
            front.append(o)
    out: list[int] = []
    for o in front:  # monotone chain: keep slopes (error drop per bit) decreasing
        while len(out) >= 2:
            a, b = out[-2], out[-1]
            # b lies on or above the segment a -> o: it is not on the lower hull
            if (errors[b] - errors[a]) * (costs[o] - costs[a]) >= (errors[o] - errors[a]) * (costs[b] - costs[a]):
                out.pop()
            else:
                break
        out.append(o)
    return out


def allocate(costs: list[list[int]], errors: list[list[float]], budget_bits: int) -> Choice:
    """Pick one option per linear with total cost <= ``budget_bits``, greedily minimising total error.

    Args:
        costs: per linear, the stored bits of each option (ints > 0).
        errors: per linear, the estimated error of each option (same shape as ``costs``).
        budget_bits: the most bits all linears together may store.
    Raises:
        DbquantError when even the cheapest option of every linear exceeds the budget.
    """
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ValueError("costs and errors must list the same non-empty options per linear")
    hulls = [hull(c, e) for c, e in zip(costs, errors)]
    pos = [0] * len(hulls)
    picks = [h[0] for h in hulls]
    used = sum(c[p] for c, p in zip(costs, picks))
    if used > budget_bits:
        raise DbquantError(f"the budget of {budget_bits} bits is below the cheapest allocation ({used} bits): "
                           "raise --target-bpw")
    heap = []

    def push(i: int) -> None:
        if pos[i] + 1 < len(hulls[i]):
            a, b = hulls[i][pos[i]], hulls[i][pos[i] + 1]
            gain = (errors[i][a] - errors[i][b]) / (costs[i][b] - costs[i][a])
            heapq.heappush(heap, (-gain, i, pos[i]))

    for i in range(len(hulls)):
        push(i)
    while heap:
        _, i, at = heapq.heappop(heap)
        if at != pos[i]:
            continue  # stale entry
        a, b = hulls[i][at], hulls[i][at + 1]
        extra = costs[i][b] - costs[i][a]
        if used + extra > budget_bits:
            continue  # does not fit; this linear stays where it is (cheaper upgrades elsewhere may fit)
        used += extra
        pos[i] += 1
        picks[i] = b
        push(i)
    return Choice(tuple(picks), used, float(sum(e[p] for e, p in zip(errors, picks))))
