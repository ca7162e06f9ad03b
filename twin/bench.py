"""`fleet-twin bench`: the performance figures (docs/performance.md).

B1 is the peers' workload (Vidur, DistServe, SplitwiseSim and BLIS publish speeds for it); B2 is
scale: a 10,000-chip fleet with 100,000 and 1,000,000 requests in flight. Each figure is the median
of several runs, with min and max. Benchmarks, not tests: these machines are shared and noisy.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from twin import core
from twin.build import assemble, instance_row
from twin.catalog import Catalog, load_catalog
from twin.workload import LengthSpec, Workload, WorkloadSpec

B1_REQUESTS = 10_000
B1_RATE = 4.0
# One H100 to one H100 over NVLink-class bandwidth (estimate: the peers' setups keep both phases in
# one node); the figure only matters for the handoff, which is small next to prefill and decode.
B1_LINK_BPS = 450e9
B1_LINK_S = 5e-6


def b1_twin(
    catalog: Catalog, seed: int = 0, requests: int = B1_REQUESTS
) -> tuple[core.Params, core.State]:
    """One prefill and one decode instance, each one h100-sxm serving llama-3.1-8b at bf16."""
    h100, model = catalog.systems["h100-sxm"], catalog.models["llama-3.1-8b"]
    rows = [
        instance_row(h100, model, "bf16", 1, role, model_id="llama-3.1-8b")
        for role in (core.ROLE_PREFILL, core.ROLE_DECODE)
    ]
    params = assemble(
        rows,
        [0, 1],
        [core.ROLE_PREFILL, core.ROLE_DECODE],
        ["prefill", "decode"],
        [(0, 1, B1_LINK_BPS, B1_LINK_S)],
        slo_ttft_s=2.0,
        slo_tpot_s=0.1,
        max_retries=3,
    )
    spec = WorkloadSpec(
        arrivals="poisson",
        rate_per_s=B1_RATE,
        prompt=LengthSpec(dist="uniform", low=64, high=1024),
        output=LengthSpec(dist="uniform", low=16, high=512),
        max_requests=requests,
    )
    rng = np.random.default_rng(seed)
    state = core.new_state(params, Workload(spec, rng), rng, ring_size=1 << 14)
    return params, state


def run_b1(catalog: Catalog, seed: int = 0, requests: int = B1_REQUESTS) -> dict[str, float]:
    params, state = b1_twin(catalog, seed, requests)
    wall0 = time.perf_counter()
    while state.done + state.rejected_total < requests:
        core.step(state, params, 1.0, adaptive=True)
    wall = time.perf_counter() - wall0
    ring = state.ring
    return {
        "wall_s": wall,
        "sim_s": state.t,
        "b1_realtime_factor": state.t / wall,
        "requests_per_wall_s": requests / wall,
        "steps": float(state.steps),
        "ttft_p50_s": float(np.median(ring.ttft[: ring.n])),
        "tpot_p50_s": float(np.median(ring.tpot[: ring.n])),
    }


def scaled_fleet(catalog: Catalog, chips: int = 10_000) -> Any:
    """The all-vendors fleet with every tier and link scaled up to about `chips` chips."""
    import msgspec

    from twin.fleet import load_fleet, resolve_fleet_path

    fleet = load_fleet(resolve_fleet_path("all-vendors"), catalog)
    total = sum(
        t.instances * (t.chips_per_instance + (t.kv_host.chips if t.kv_host else 0))
        for t in fleet.tiers
    )
    k = max(1, round(chips / total))
    tiers = [msgspec.structs.replace(t, instances=t.instances * k) for t in fleet.tiers]
    links = [
        msgspec.structs.replace(lk, bandwidth_gbps=lk.bandwidth_gbps * k) for lk in fleet.links
    ]
    return msgspec.structs.replace(fleet, tiers=tiers, links=links)


def run_b2(
    catalog: Catalog,
    targets: tuple[int, ...] = (100_000, 1_000_000),
    steps: int = 30,
    seed: int = 0,
) -> dict[str, float]:
    """Step time (dt = 0.1 s) with `targets` requests in flight on a 10,000-chip fleet."""
    from twin.build import new_twin

    fleet = scaled_fleet(catalog)
    twin = new_twin(fleet, catalog, seed=seed, ring_size=1 << 16)
    state, params = twin.state, twin.params
    out: dict[str, float] = {"chips": float(params.n_chips)}
    for target in targets:
        # raise the load until `target` requests are in flight, then hold it there
        rate = target / 2.0
        core.set_rate(state, rate)
        n = 0
        while state.in_flight < target:
            core.step(state, params, 0.1)
            n += 1
            if n % 20 == 0:  # the fleet keeps up: raise the load until it cannot
                rate *= 2.0
                core.set_rate(state, rate)
        core.set_rate(state, float(state.done) / max(state.t, 1.0))
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            core.step(state, params, 0.1)
            times.append(time.perf_counter() - t0)
        label = f"{target // 1000}k"
        out[f"b2_{label}_in_flight"] = float(state.in_flight)
        out[f"b2_{label}_step_mean_ms"] = 1e3 * statistics.fmean(times)
        out[f"b2_{label}_step_p99_ms"] = 1e3 * float(np.percentile(times, 99))
    out["b2_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def repeat(fn: Callable[[], dict[str, float]], runs: int) -> dict[str, dict[str, float]]:
    results = [fn() for _ in range(runs)]
    return {k: _stats([r[k] for r in results]) for k in results[0]}


def run_all(quick: bool = False, broker: str | None = None) -> dict[str, Any]:
    """Every benchmark this machine can run; B3 needs a broker URL."""
    catalog = load_catalog()
    runs = 3 if quick else 5
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "processor": platform.machine(),
        },
        "runs": runs,
    }
    gc.collect()
    out["b1"] = repeat(lambda: run_b1(catalog), runs)
    steps = 10 if quick else 30
    out["b2"] = repeat(lambda: run_b2(catalog, steps=steps), runs)
    if broker is not None:
        from twin.bench_live import run_b3

        out["b3"] = run_b3(catalog, broker, duration_s=20.0 if quick else 120.0)
    try:
        from twin.bench_console import run_b4
    except ImportError as e:  # the console is an optional part of an install
        out["b4"] = {"skipped": f"console not importable: {e}"}
    else:
        out["b4"] = run_b4(catalog, duration_s=15.0 if quick else 60.0)
    return out


def print_table(result: dict[str, Any]) -> None:
    print(f"fleet-twin bench  {result['date']}  {result['machine']}  median of {result['runs']}")
    for group in ("b1", "b2", "b3", "b4"):
        if group not in result:
            continue
        for key, v in result[group].items():
            if isinstance(v, str):
                print(f"  {key:<28} {v}")
            elif isinstance(v, dict):
                print(
                    f"  {key:<28} {v['median']:>12.3f}   (min {v['min']:.3f}, max {v['max']:.3f})"
                )
            else:
                print(f"  {key:<28} {v:>12.3f}")


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="performance figures (docs/performance.md)")
    p.add_argument("--quick", action="store_true", help="fewer runs and shorter live runs")
    p.add_argument("--json", action="store_true")
    p.add_argument("--broker", default=None, help="mqtt://HOST:PORT: also run B3 (live twin)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(a: Any) -> int:
    import json

    result = run_all(a.quick, a.broker)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0
