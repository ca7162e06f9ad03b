"""Placement of a batch of requests on candidate instances, vectorised (numpy only).

Each router policy reduces to one of three assignment kernels, all without a loop over requests:

- `water_fill`: jobs go, in arrival order, to the candidates with the lowest cost, each job raising
  its candidate's cost by `marginal x size` (the greedy "join the least loaded" rule, solved at once
  as a water level). least_loaded, latency_aware and power_aware differ only in cost and marginal.
- `rotate`: round robin from a persistent counter.
- `apportion`: operator-set shares, kept exact over time by carrying each candidate's remainder.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]

POLICIES = ("round_robin", "least_loaded", "latency_aware", "power_aware", "weighted")


def water_fill(cost: F64, marginal: F64, sizes: F64) -> I64:
    """Index into the candidates for each job (jobs in arrival order)."""
    k = sizes.size
    if k == 0:
        return np.empty(0, dtype=np.int64)
    if k == 1:
        return np.array([int(np.argmin(cost + marginal * sizes[0]))], dtype=np.int64)
    total = float(sizes.sum())
    order = np.argsort(cost, kind="stable")
    c = cost[order]
    inv_m = 1.0 / marginal[order]
    level = (total + np.cumsum(c * inv_m)) / np.cumsum(inv_m)
    nxt = np.append(c[1:], np.inf)
    p = int(np.argmax(level <= nxt))
    fill = np.clip(level[p] - c, 0.0, None) * inv_m
    fill[p + 1 :] = 0.0
    edges = np.cumsum(fill)
    edges /= edges[-1]
    mid = (np.cumsum(sizes) - 0.5 * sizes) / total
    j = np.minimum(np.searchsorted(edges, mid, side="right"), p)
    return order[j].astype(np.int64)


def rotate(n_candidates: int, k: int, counter: int) -> I64:
    """Round robin: job i goes to candidate (counter + i) mod n."""
    return (counter + np.arange(k, dtype=np.int64)) % n_candidates


def apportion(shares: F64, k: int, credit: F64) -> tuple[I64, F64]:
    """Split k jobs by `shares` (summing to 1) using largest remainders plus carried credit.

    The credit (what each candidate is owed or ahead, in jobs) keeps the split exact over many
    small batches; it is bounded to one job either way so a changed candidate set cannot starve.
    """
    want = credit + k * shares
    counts = np.floor(np.clip(want, 0.0, None)).astype(np.int64)
    if counts.sum() > k:  # credit promised more than this batch holds: split this batch alone
        want = k * shares
        counts = np.floor(want).astype(np.int64)
    short = k - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(want - counts), kind="stable")[:short]] += 1
    new_credit = np.clip(want - counts, -1.0, 1.0)
    return np.repeat(np.arange(shares.size, dtype=np.int64), counts), new_credit
