"""From a validated fleet file and the hardware catalog to the core's arrays.

This is where hardware figures become model parameters (docs/model.md):

- effective compute  = chips x dense peak at the tier's precision x MFU
- effective bandwidth = chips x bandwidth of the memory tier that holds the weights x MBU
- KV capacity       = chips x that tier's capacity x usable fraction - weight bytes
- fixed latency     = layers x t_layer + pipeline hops x t_hop, where an SRAM machine needs at least
                      ceil(weights / usable SRAM per chip) chips in its layer pipeline
- a composite decode instance (`kv_host`, the LPX pairing) reads weights on its own chips and the
  KV cache on its host chips, in parallel, and keeps its KV on the host chips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from twin import core
from twin.catalog import USABLE_MEMORY_FRACTION, Catalog, Model, System
from twin.workload import LengthSpec, Workload, WorkloadSpec

if TYPE_CHECKING:
    from twin.fleet import Fleet, LengthDist


@dataclass(frozen=True, kw_only=True)
class InstanceRow:
    """One instance's model parameters (SI units)."""

    role: int
    flops: float
    w_bw: float
    kv_bw: float
    kv_separate: bool
    weight_bytes: float
    kv_capacity: float
    t_fixed: float
    spec: float
    chunk: float
    flops_per_token: float
    attn_coef: float
    kv_bpt: float
    chip_idle_w: tuple[float, ...]
    chip_peak_w: tuple[float, ...]


def pipeline_hops(system: System, model: Model, precision: str) -> int:
    """Chip-to-chip hops a token crosses: only SRAM machines pipeline layers across chips."""
    if system.weights_in != "sram":
        return 0
    per_chip = system.mem_capacity_bytes() * USABLE_MEMORY_FRACTION
    return max(0, math.ceil(model.weight_bytes(precision) / per_chip) - 1)  # type: ignore[arg-type]


def instance_row(
    system: System,
    model: Model,
    precision: str,
    chips: int,
    role: int,
    *,
    model_id: str,
    spec: float | None = None,
    kv_host: System | None = None,
    kv_host_chips: int = 0,
) -> InstanceRow:
    p = precision
    weight_bytes = model.weight_bytes(p)  # type: ignore[arg-type]
    flops = chips * system.peak_flops(p) * system.mfu.value  # type: ignore[arg-type]
    w_bw = chips * system.mem_bandwidth_Bps() * system.mbu.value
    hops = pipeline_hops(system, model, precision)
    t_fixed = (model.layers * system.t_layer_us.value + hops * system.t_hop_us.value) * 1e-6
    idle = [system.idle_w.value] * chips
    peak = [system.peak_w.value] * chips
    if kv_host is not None and kv_host_chips > 0:
        kv_bw = kv_host_chips * kv_host.mem_bandwidth_Bps() * kv_host.mbu.value
        kv_cap = kv_host_chips * kv_host.mem_capacity_bytes() * USABLE_MEMORY_FRACTION
        idle += [kv_host.idle_w.value] * kv_host_chips
        peak += [kv_host.peak_w.value] * kv_host_chips
        separate = True
    else:
        kv_bw = w_bw
        kv_cap = chips * system.mem_capacity_bytes() * USABLE_MEMORY_FRACTION - weight_bytes
        separate = False
    return InstanceRow(
        role=role,
        flops=flops,
        w_bw=w_bw,
        kv_bw=kv_bw,
        kv_separate=separate,
        weight_bytes=weight_bytes,
        kv_capacity=max(kv_cap, 0.0),
        t_fixed=t_fixed,
        spec=system.speculative_factor(model_id) if spec is None else spec,
        chunk=float(system.prefill_chunk_tokens.value),
        flops_per_token=2.0 * model.params,
        attn_coef=model.layers * model.hidden / model.params,
        kv_bpt=model.kv_bytes_per_token(p),  # type: ignore[arg-type]
        chip_idle_w=tuple(idle),
        chip_peak_w=tuple(peak),
    )


def assemble(
    rows: list[InstanceRow],
    inst_tier: list[int],
    tier_roles: list[int],
    tier_names: list[str],
    links: list[tuple[int, int, float, float]],
    *,
    slo_ttft_s: float,
    slo_tpot_s: float,
    max_retries: int,
) -> core.Params:
    """Stack per-instance rows into the core's arrays. links: (src tier, dst tier, B/s, s)."""

    def col(name: str) -> np.ndarray:
        return np.array([getattr(r, name) for r in rows], dtype=np.float64)

    n_chips = np.array([len(r.chip_idle_w) for r in rows], dtype=np.int64)
    chip_start = np.concatenate([[0], np.cumsum(n_chips)[:-1]]).astype(np.int64)
    n_tiers = len(tier_names)
    link_of = np.full((n_tiers, n_tiers), -1, dtype=np.int64)
    for i, (src, dst, _, _) in enumerate(links):
        link_of[src, dst] = i
    return core.Params(
        inst_tier=np.array(inst_tier, dtype=np.int32),
        inst_role=np.array([r.role for r in rows], dtype=np.int8),
        inst_flops=col("flops"),
        inst_w_bw=col("w_bw"),
        inst_kv_bw=col("kv_bw"),
        inst_kv_separate=np.array([r.kv_separate for r in rows], dtype=bool),
        inst_weight_bytes=col("weight_bytes"),
        inst_kv_capacity=col("kv_capacity"),
        inst_t_fixed=col("t_fixed"),
        inst_spec=col("spec"),
        inst_chunk=col("chunk"),
        inst_flops_per_token=col("flops_per_token"),
        inst_attn_coef=col("attn_coef"),
        inst_kv_bpt=col("kv_bpt"),
        inst_chip_start=chip_start,
        inst_n_chips=n_chips,
        chip_inst=np.repeat(np.arange(len(rows), dtype=np.int64), n_chips),
        chip_idle_w=np.array([w for r in rows for w in r.chip_idle_w], dtype=np.float64),
        chip_peak_w=np.array([w for r in rows for w in r.chip_peak_w], dtype=np.float64),
        tier_role=np.array(tier_roles, dtype=np.int8),
        tier_names=tuple(tier_names),
        link_src=np.array([lk[0] for lk in links], dtype=np.int64),
        link_dst=np.array([lk[1] for lk in links], dtype=np.int64),
        link_bw=np.array([lk[2] for lk in links], dtype=np.float64),
        link_lat=np.array([lk[3] for lk in links], dtype=np.float64),
        link_of=link_of,
        slo_ttft_s=slo_ttft_s,
        slo_tpot_s=slo_tpot_s,
        max_retries=max_retries,
    )


@dataclass(frozen=True, kw_only=True)
class FleetLayout:
    """Names for the core's rows: what telemetry and the console label things with."""

    fleet: str
    tier_names: tuple[str, ...]
    tier_roles: tuple[str, ...]
    tier_system: tuple[str, ...]
    tier_host_system: tuple[str, ...]  # "" unless a composite tier
    tier_instances: tuple[int, ...]
    inst_names: tuple[str, ...]
    chip_system: tuple[str, ...]
    link_names: tuple[str, ...]


def build_params(fleet: Fleet, catalog: Catalog) -> tuple[core.Params, FleetLayout]:
    rows: list[InstanceRow] = []
    inst_tier: list[int] = []
    inst_names: list[str] = []
    chip_system: list[str] = []
    tier_index = {t.name: i for i, t in enumerate(fleet.tiers)}
    for ti, tier in enumerate(fleet.tiers):
        system = catalog.systems[tier.system]
        model = catalog.models[tier.model]
        host = catalog.systems[tier.kv_host.system] if tier.kv_host else None
        host_chips = tier.kv_host.chips if tier.kv_host else 0
        row = instance_row(
            system,
            model,
            tier.precision,
            tier.chips_per_instance,
            core.ROLES.index(tier.role),
            model_id=tier.model,
            spec=tier.spec_decode,
            kv_host=host,
            kv_host_chips=host_chips,
        )
        for k in range(tier.instances):
            rows.append(row)
            inst_tier.append(ti)
            inst_names.append(f"{tier.name}/{k}")
            chip_system += [tier.system] * tier.chips_per_instance
            if tier.kv_host:
                chip_system += [tier.kv_host.system] * host_chips
    links = [
        (tier_index[lk.from_], tier_index[lk.to], lk.bandwidth_gbps * 1e9, lk.latency_us * 1e-6)
        for lk in fleet.links
    ]
    params = assemble(
        rows,
        inst_tier,
        [core.ROLES.index(t.role) for t in fleet.tiers],
        [t.name for t in fleet.tiers],
        links,
        slo_ttft_s=fleet.slo.ttft_s,
        slo_tpot_s=fleet.slo.tpot_s,
        max_retries=fleet.max_retries,
    )
    layout = FleetLayout(
        fleet=fleet.name,
        tier_names=tuple(t.name for t in fleet.tiers),
        tier_roles=tuple(t.role for t in fleet.tiers),
        tier_system=tuple(t.system for t in fleet.tiers),
        tier_host_system=tuple(t.kv_host.system if t.kv_host else "" for t in fleet.tiers),
        tier_instances=tuple(t.instances for t in fleet.tiers),
        inst_names=tuple(inst_names),
        chip_system=tuple(chip_system),
        link_names=tuple(f"{lk.from_}->{lk.to}" for lk in fleet.links),
    )
    return params, layout


def length_spec(d: LengthDist) -> LengthSpec:
    return LengthSpec(
        dist=d.dist,
        value=int(d.value or 0),
        low=int(d.low or 0),
        high=int(d.high or 0),
        median=float(d.median or 0.0),
        sigma=float(d.sigma or 0.0),
        min=int(d.min) if d.min is not None else 1,
        max=int(d.max) if d.max is not None else 1 << 20,
    )


def workload_spec(fleet: Fleet) -> WorkloadSpec:
    from twin.fleet import load_trace

    w = fleet.workload
    trace: tuple[list[float], list[int], list[int]] = ([], [], [])
    if w.arrivals == "trace":
        trace = load_trace(w.trace)
    return WorkloadSpec(
        arrivals=w.arrivals,
        rate_per_s=w.rate_per_s,
        prompt=length_spec(w.prompt),
        output=length_spec(w.output),
        burst_factor=w.burst_factor,
        burst_on_s=w.burst_on_s,
        burst_off_s=w.burst_off_s,
        trace_t_s=tuple(trace[0]),
        trace_prompt=tuple(trace[1]),
        trace_output=tuple(trace[2]),
    )


@dataclass
class Twin:
    """A fleet ready to step: params, state and names."""

    params: core.Params
    state: core.State
    layout: FleetLayout
    fleet: Fleet


def new_twin(
    fleet: Fleet,
    catalog: Catalog,
    *,
    seed: int | None = None,
    rate_per_s: float | None = None,
    ring_size: int = 1 << 16,
) -> Twin:
    params, layout = build_params(fleet, catalog)
    rng = np.random.default_rng(fleet.seed if seed is None else seed)
    spec = workload_spec(fleet)
    if rate_per_s is not None:
        spec = WorkloadSpec(**{**spec.__dict__, "rate_per_s": rate_per_s})
    weights = np.array([fleet.router.weights.get(n, 1.0) for n in layout.tier_names])
    state = core.new_state(
        params,
        Workload(spec, rng),
        rng,
        policy=fleet.router.policy,
        tier_weights=weights,
        ring_size=ring_size,
    )
    return Twin(params=params, state=state, layout=layout, fleet=fleet)
