"""`fleet-twin simulate`: a whole fleet, open loop, as fast as the machine allows."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from twin import core, metrics
from twin.build import Twin

# Adaptive steps jump from event to event but never finer than MIN_STEP_S (events inside a step
# still get exact, interpolated timestamps) nor longer than MAX_STEP_S.
MIN_STEP_S = 0.002
MAX_STEP_S = 0.25


def run(twin: Twin, duration_s: float, *, min_step_s: float = MIN_STEP_S) -> float:
    """Advance `twin` by `duration_s` simulated seconds; returns the wall time taken."""
    state, params = twin.state, twin.params
    t_end = state.t + duration_s
    wall0 = time.perf_counter()
    while state.t < t_end - 1e-12:
        core.step(state, params, min(MAX_STEP_S, t_end - state.t), adaptive=True, min_dt=min_step_s)
    return time.perf_counter() - wall0


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)


def report(twin: Twin, wall_time_s: float) -> dict[str, Any]:
    """The figures `simulate` prints, fleet-wide and per tier."""
    state, p, layout = twin.state, twin.params, twin.layout
    t = max(state.t, 1e-12)
    out_tokens = float(state.inst_output_tokens.sum())
    energy = float(state.inst_energy_j.sum())
    lat = metrics.latency(state, p)
    result: dict[str, Any] = {
        "fleet": layout.fleet,
        "sim_time_s": round(state.t, 6),
        "wall_time_s": round(wall_time_s, 6),
        **metrics.counters(state),
        **{k: _num(lat[k]) for k in metrics.LATENCY_KEYS},
        "goodput_fraction": _num(lat["goodput_fraction"]),
        "tokens_per_s": _num(out_tokens / t),
        "prefill_tokens_per_s": _num(float(state.inst_prefill_tokens.sum()) / t),
        "power_w": _num(energy / t),
        "tokens_per_joule": _num(out_tokens / energy) if energy > 0 else 0.0,
    }
    out_t = metrics.tier_sum(p, state.inst_output_tokens)
    pre_t = metrics.tier_sum(p, state.inst_prefill_tokens)
    energy_t = metrics.tier_sum(p, state.inst_energy_j)
    up_t = metrics.tier_sum(p, state.inst_up.astype(np.float64))
    tiers: dict[str, Any] = {}
    for i, name in enumerate(layout.tier_names):
        lt = metrics.latency(state, p, tier=i)
        role = layout.tier_roles[i]
        work = pre_t[i] if role == "prefill" else out_t[i]
        tiers[name] = {
            "role": role,
            "system": layout.tier_system[i],
            "instances": layout.tier_instances[i],
            "instances_up": int(up_t[i]),
            **{k: _num(lt[k]) for k in metrics.LATENCY_KEYS},
            "goodput_fraction": _num(lt["goodput_fraction"]),
            "tokens_per_s": _num(out_t[i] / t),
            "prefill_tokens_per_s": _num(pre_t[i] / t),
            "power_w": _num(energy_t[i] / t),
            "tokens_per_joule": _num(work / energy_t[i]) if energy_t[i] > 0 else 0.0,
        }
    result["tiers"] = tiers
    return result
