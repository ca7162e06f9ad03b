"""Fleet and tier figures from the core's state (numpy only): what `simulate` prints and what the
engine turns into telemetry. Latency percentiles cover the finished requests still in the state's
ring (the last `ring.size` completions), optionally only those finished after `since_s`.
"""

from __future__ import annotations

import numpy as np

from twin import core

LATENCY_KEYS = ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")


def _pct2(x: np.ndarray) -> tuple[float, float]:
    """p50 and p99 in one pass (NaN when empty)."""
    if x.size == 0:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(x, [50, 99])
    return float(p50), float(p99)


def latency(
    state: core.State, p: core.Params, *, since_s: float = -np.inf, tier: int | None = None
) -> dict[str, float]:
    """TTFT/TPOT p50/p99 and goodput over the ring's requests finished after `since_s`."""
    ring = state.ring
    sl = ring.valid()
    keep = ring.t_done[sl] > since_s
    if tier is not None:
        keep &= (ring.p_tier[sl] == tier) | (ring.d_tier[sl] == tier)
    ttft = ring.ttft[sl][keep]
    tpot = ring.tpot[sl][keep]
    multi = ring.output[sl][keep] > 1
    ok = (ttft <= p.slo_ttft_s) & (tpot <= p.slo_tpot_s)
    ttft_50, ttft_99 = _pct2(ttft)
    tpot_50, tpot_99 = _pct2(tpot[multi])
    return {
        "ttft_p50_s": ttft_50,
        "ttft_p99_s": ttft_99,
        "tpot_p50_s": tpot_50,
        "tpot_p99_s": tpot_99,
        "goodput_fraction": float(ok.mean()) if ok.size else float("nan"),
        "finished": int(ttft.size),
    }


def latency_by_tier(
    state: core.State, p: core.Params, *, since_s: float = -np.inf
) -> list[dict[str, float]]:
    """`latency(tier=i)` for every tier at once: the window is cut from the ring once."""
    ring = state.ring
    sl = ring.valid()
    keep = np.flatnonzero(ring.t_done[sl] > since_s)
    ttft, tpot = ring.ttft[keep], ring.tpot[keep]
    multi = ring.output[keep] > 1
    ok = (ttft <= p.slo_ttft_s) & (tpot <= p.slo_tpot_s)
    p_tier, d_tier = ring.p_tier[keep], ring.d_tier[keep]
    out = []
    for tier in range(p.n_tiers):  # a handful of tiers
        mine = (p_tier == tier) | (d_tier == tier)
        ttft_50, ttft_99 = _pct2(ttft[mine])
        tpot_50, tpot_99 = _pct2(tpot[mine & multi])
        good = ok[mine]
        out.append(
            {
                "ttft_p50_s": ttft_50,
                "ttft_p99_s": ttft_99,
                "tpot_p50_s": tpot_50,
                "tpot_p99_s": tpot_99,
                "goodput_fraction": float(good.mean()) if good.size else float("nan"),
                "finished": int(good.size),
            }
        )
    return out


def counters(state: core.State) -> dict[str, int]:
    """The conservation counters: arrived == done + rejected + in_flight."""
    out = {
        "arrived": state.arrived,
        "done": state.done,
        "rejected": state.rejected_total,
        "in_flight": state.in_flight,
        "retries": state.retries,
    }
    for i, reason in enumerate(core.REJECT_REASONS):
        out[f"rejected_{reason}"] = int(state.rejected[i])
    return out


def phase_counts(state: core.State, p: core.Params) -> np.ndarray:
    """[n_inst, 5] requests per instance and phase (prefill side for 0-1, decode side for 2-4)."""
    r = state.req
    live = np.flatnonzero(r.phase != core.FREE)
    ph = r.phase[live].astype(np.int64)
    inst = np.where(ph <= core.PREFILL, r.p_inst[live], r.d_inst[live])
    inst = np.where(inst < 0, r.p_inst[live], inst)
    ok = inst >= 0
    flat = inst[ok] * 5 + ph[ok]
    return np.bincount(flat, minlength=p.n_inst * 5).reshape(p.n_inst, 5)


def kv_used(state: core.State, p: core.Params) -> np.ndarray:
    """KV bytes reserved per instance, recounted from the request rows (the core keeps the same
    figure incrementally in `state.inst_kv_used`)."""
    r = state.req
    held = np.flatnonzero(r.kv_res > 0)
    return np.bincount(r.d_inst[held], weights=r.kv_res[held], minlength=p.n_inst)


def link_activity(state: core.State, p: core.Params) -> tuple[np.ndarray, np.ndarray]:
    """Per link: transfers moving, transfers waiting for KV room on their target."""
    r = state.req
    tr = (r.phase == core.KV_TRANSFER) & (r.link >= 0)
    moving = np.bincount(r.link[tr & (r.kv_res > 0)], minlength=p.n_links)
    waiting = np.bincount(r.link[tr & (r.kv_res == 0)], minlength=p.n_links)
    return moving, waiting


def tier_sum(p: core.Params, per_inst: np.ndarray) -> np.ndarray:
    return np.bincount(p.inst_tier, weights=per_inst, minlength=p.n_tiers)
