"""From the core's state to telemetry messages: meta, summary, tier and chips snapshots.

The engine owns pacing and scheduling; this module only turns arrays into wire messages.

- Rates (tokens/s, arrivals/s, power, tokens/J, link GB/s, and utilisation, which follows from
  the energy drawn) are counter differences between snapshots: the current counters minus those
  of the latest recorded sample at least `rate_window_s` of simulated time older (or the oldest
  sample, early on). While the twin is paused the counters stand still and so do the rates.
- Latency percentiles and goodput cover the requests finished in the last `latency_window_s` of
  simulated time (`metrics.latency(since_s=...)`).
- NaN never reaches the wire: "no data" is telemetry.NO_DATA (-1.0).
- Per-chip arrays are built with numpy and converted with one `tolist()` per array.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from twin import core, metrics, telemetry
from twin.build import Twin
from twin.catalog import Catalog, Figure, System

F64 = NDArray[np.float64]

#: Units of the wire fields and of the catalog figures in meta (by field name or suffix).
UNITS: dict[str, str] = {
    "ts_ms": "ms since the Unix epoch (wall clock)",
    "_s": "s (simulated time unless named wall)",
    "_us": "us",
    "_w": "W",
    "_per_s": "per second of simulated time",
    "tokens_per_s": "tokens/s",
    "arrivals_per_s": "requests/s",
    "rate_per_s": "requests/s",
    "tokens_per_joule": "tokens/J",
    "gbps": "GB/s (1e9 bytes/s)",
    "bandwidth_gbps": "GB/s (1e9 bytes/s)",
    "capacity_gb": "GB (1e9 bytes)",
    "bandwidth_tbps": "TB/s (1e12 bytes/s)",
    "_tflops": "TFLOP/s, dense",
    "interconnect_gbps": "GB/s (1e9 bytes/s), bidirectional",
    "prefill_chunk_tokens": "tokens",
    "mfu": "fraction (0-1)",
    "mbu": "fraction (0-1)",
    "_fraction": "fraction (0-1)",
    "utilisation": "fraction (0-1)",
    "speed": "x real time (0 = as fast as possible)",
    "speculative": "tokens per decode iteration",
    "no_data": str(telemetry.NO_DATA),
}


def num(x: float) -> float:
    """A float for the wire: NaN and infinities become NO_DATA."""
    return float(x) if math.isfinite(x) else telemetry.NO_DATA


# ------------------------------------------------------------------------------------------------
# meta


def _figure_meta(f: Figure) -> telemetry.FigureMeta:
    return telemetry.FigureMeta(value=float(f.value), provenance=f.provenance, source=f.source)


def build_meta(
    twin: Twin, catalog: Catalog, *, run_id: str, ts_ms: int, scenarios: Sequence[str] = ()
) -> telemetry.Meta:
    fleet, layout = twin.fleet, twin.layout
    tiers: list[telemetry.TierMeta] = []
    for t in fleet.tiers:
        system: System = catalog.systems[t.system]
        figures = {k: _figure_meta(v) for k, v in system.figures().items()}
        estimated = any(v.is_estimate for v in system.figures().values())
        host_chips = 0
        if t.kv_host is not None:
            host = catalog.systems[t.kv_host.system]
            host_chips = t.kv_host.chips
            figures.update({f"kv_host.{k}": _figure_meta(v) for k, v in host.figures().items()})
            estimated = estimated or any(v.is_estimate for v in host.figures().values())
        tiers.append(
            telemetry.TierMeta(
                name=t.name,
                role=t.role,
                system=t.system,
                vendor=system.vendor,
                system_name=system.name,
                host_system=t.kv_host.system if t.kv_host else "",
                instances=t.instances,
                chips_per_instance=t.chips_per_instance,
                chips=t.instances * (t.chips_per_instance + host_chips),
                precision=t.precision,
                estimated=estimated,
                figures=figures,
            )
        )
    links = [
        telemetry.LinkMeta(
            name=name,
            src=lk.from_,
            dst=lk.to,
            bandwidth_gbps=float(lk.bandwidth_gbps),
            latency_us=float(lk.latency_us),
        )
        for name, lk in zip(layout.link_names, fleet.links, strict=True)
    ]
    return telemetry.Meta(
        ts_ms=ts_ms,
        fleet=layout.fleet,
        run_id=run_id,
        model=fleet.workload.model,
        slo_ttft_s=float(fleet.slo.ttft_s),
        slo_tpot_s=float(fleet.slo.tpot_s),
        tiers=tiers,
        links=links,
        units=dict(UNITS),
        scenarios=list(scenarios),
    )


# ------------------------------------------------------------------------------------------------
# rates


@dataclass(frozen=True)
class Sample:
    """Cumulative counters at one simulated time."""

    t: float
    arrived: int
    out_tokens: F64  # per instance
    prefill_tokens: F64  # per instance
    energy_j: F64  # per instance
    link_bytes: F64  # per link

    @classmethod
    def of(cls, state: core.State) -> Sample:
        return cls(
            t=state.t,
            arrived=state.arrived,
            out_tokens=state.inst_output_tokens.copy(),
            prefill_tokens=state.inst_prefill_tokens.copy(),
            energy_j=state.inst_energy_j.copy(),
            link_bytes=state.link_bytes.copy(),
        )


@dataclass(frozen=True)
class Rates:
    """Per second of simulated time over the rate window."""

    arrivals: float
    out_tokens: F64  # per instance
    prefill_tokens: F64
    power_w: F64  # per instance: energy difference / time
    util: F64  # per instance: mean utilisation over the window, from the power drawn
    energy_j: F64  # per instance: joules spent in the window (for tokens per joule)
    out_window: F64  # per instance: tokens in the window
    prefill_window: F64
    link_bps: F64  # per link


class RateWindow:
    """Recorded samples of the counters; rates are differences over about `window_s`."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._hist: deque[Sample] = deque()

    def rates(self, state: core.State, *, record: bool = True) -> Rates:
        now = Sample.of(state)
        base = self._base(now.t)
        if record:
            self._hist.append(now)
            cutoff = now.t - self.window_s
            while len(self._hist) >= 2 and self._hist[1].t <= cutoff:
                self._hist.popleft()
        if base is None:  # nothing older yet: no rates, power as drawn now
            zeros = np.zeros_like(now.out_tokens)
            return Rates(
                arrivals=0.0,
                out_tokens=zeros,
                prefill_tokens=zeros,
                power_w=state.inst_power_w.copy(),
                util=np.where(state.inst_up, state.inst_util, 0.0),
                energy_j=zeros,
                out_window=zeros,
                prefill_window=zeros,
                link_bps=np.zeros_like(now.link_bytes),
            )
        dt = now.t - base.t
        d_out = now.out_tokens - base.out_tokens
        d_pre = now.prefill_tokens - base.prefill_tokens
        d_energy = now.energy_j - base.energy_j
        power = d_energy / dt
        # power = idle + utilisation x (peak - idle) over the chips that are up, so the mean
        # utilisation over the window follows from the energy the instance drew
        dyn = state.inst_up_dyn_w
        with np.errstate(divide="ignore", invalid="ignore"):
            util = np.where(dyn > 0, (power - state.inst_up_idle_w) / dyn, 0.0)
        return Rates(
            arrivals=(now.arrived - base.arrived) / dt,
            out_tokens=d_out / dt,
            prefill_tokens=d_pre / dt,
            power_w=power,
            util=np.where(state.inst_up, np.clip(util, 0.0, 1.0), 0.0),
            energy_j=d_energy,
            out_window=d_out,
            prefill_window=d_pre,
            link_bps=(now.link_bytes - base.link_bytes) / dt,
        )

    def _base(self, t: float) -> Sample | None:
        """The latest sample at least window_s old, else the oldest one older than t."""
        cutoff = t - self.window_s
        best: Sample | None = None
        for s in self._hist:
            if s.t <= cutoff:
                best = s
            elif best is None and s.t < t:
                return s
            else:
                break
        return best


# ------------------------------------------------------------------------------------------------
# snapshots


class SnapshotBuilder:
    """Turns a twin's state into summary, tier and chips messages."""

    def __init__(
        self, twin: Twin, *, latency_window_s: float = 10.0, rate_window_s: float = 2.0
    ) -> None:
        self.twin = twin
        self.latency_window_s = latency_window_s
        self.window = RateWindow(rate_window_s)
        p, layout = twin.params, twin.layout
        self._tier_inst = [np.flatnonzero(p.inst_tier == i) for i in range(p.n_tiers)]
        chip_tier = p.inst_tier[p.chip_inst]
        self._tier_chips = [np.flatnonzero(chip_tier == i) for i in range(p.n_tiers)]
        j = np.arange(p.n_chips) - p.inst_chip_start[p.chip_inst]
        first_inst = np.array([ix[0] if ix.size else 0 for ix in self._tier_inst], dtype=np.int64)
        k = p.chip_inst - first_inst[chip_tier]
        self._chip_ids = [
            [f"{layout.inst_names[p.chip_inst[c]]}/{j[c]}" for c in chips.tolist()]
            for chips in self._tier_chips
        ]
        self._chip_k = [k[chips].tolist() for chips in self._tier_chips]
        self._chip_states = np.array(core.CHIP_STATES)

    # -- summary ----------------------------------------------------------------------------
    def summary(
        self,
        *,
        ts_ms: int,
        lag_s: float,
        speed: float,
        paused: bool,
        dropped: int,
        rates: Rates,
        latency: dict[str, float],
    ) -> telemetry.Summary:
        tw = self.twin
        state, p = tw.state, tw.params
        c = metrics.counters(state)
        moving, waiting = metrics.link_activity(state, p)
        energy = float(rates.energy_j.sum())
        links = [
            telemetry.LinkStat(
                name=name,
                gbps=float(rates.link_bps[i]) / 1e9,
                moving=int(moving[i]),
                waiting=int(waiting[i]),
                factor=float(state.link_factor[i]),
            )
            for i, name in enumerate(tw.layout.link_names)
        ]
        return telemetry.Summary(
            ts_ms=ts_ms,
            sim_time_s=float(state.t),
            lag_s=float(lag_s),
            speed=float(speed),
            paused=paused,
            arrivals_per_s=float(rates.arrivals),
            rate_per_s=offered_rate(state),
            arrived=c["arrived"],
            done=c["done"],
            rejected=c["rejected"],
            rejected_no_capacity=c["rejected_no_capacity"],
            rejected_retry_budget=c["rejected_retry_budget"],
            in_flight=c["in_flight"],
            retries=c["retries"],
            tokens_per_s=float(rates.out_tokens.sum()),
            prefill_tokens_per_s=float(rates.prefill_tokens.sum()),
            ttft_p50_s=num(latency["ttft_p50_s"]),
            ttft_p99_s=num(latency["ttft_p99_s"]),
            tpot_p50_s=num(latency["tpot_p50_s"]),
            tpot_p99_s=num(latency["tpot_p99_s"]),
            goodput_fraction=num(latency["goodput_fraction"]),
            power_w=float(rates.power_w.sum()),
            tokens_per_joule=float(rates.out_window.sum()) / energy if energy > 0 else 0.0,
            policy=core.POLICIES[state.policy],
            dropped_snapshots=dropped,
            links=links,
            base_rate_per_s=base_rate(state),
            weights={
                name: float(w)
                for name, w in zip(tw.layout.tier_names, state.tier_weight.tolist(), strict=True)
            },
        )

    def latency(self, tier: int | None = None) -> dict[str, float]:
        state = self.twin.state
        return metrics.latency(
            state, self.twin.params, since_s=state.t - self.latency_window_s, tier=tier
        )

    # -- tiers ------------------------------------------------------------------------------
    def tiers(self, *, ts_ms: int, rates: Rates) -> list[telemetry.Tier]:
        tw = self.twin
        state, p, layout = tw.state, tw.params, tw.layout
        phases = metrics.phase_counts(state, p)
        queue = metrics.tier_sum(
            p, (phases[:, core.QUEUED_PREFILL] + phases[:, core.QUEUED_DECODE])
        )
        batch = metrics.tier_sum(p, phases[:, core.DECODE].astype(np.float64))
        kv_used = metrics.tier_sum(p, state.inst_kv_used)
        up = state.inst_up
        kv_cap = metrics.tier_sum(p, np.where(up, p.inst_kv_capacity, 0.0))
        n_up = metrics.tier_sum(p, up.astype(np.float64))
        n_drain = metrics.tier_sum(p, (up & state.inst_draining).astype(np.float64))
        util_sum = metrics.tier_sum(p, rates.util)
        out_s = metrics.tier_sum(p, rates.out_tokens)
        pre_s = metrics.tier_sum(p, rates.prefill_tokens)
        power = metrics.tier_sum(p, rates.power_w)
        energy = metrics.tier_sum(p, rates.energy_j)
        out_w = metrics.tier_sum(p, rates.out_window)
        pre_w = metrics.tier_sum(p, rates.prefill_window)
        latencies = metrics.latency_by_tier(state, p, since_s=state.t - self.latency_window_s)
        msgs: list[telemetry.Tier] = []
        for i, name in enumerate(layout.tier_names):
            role = layout.tier_roles[i]
            work = pre_w[i] if role == "prefill" else out_w[i]
            lat = latencies[i]
            msgs.append(
                telemetry.Tier(
                    ts_ms=ts_ms,
                    tier=name,
                    role=role,
                    instances=int(self._tier_inst[i].size),
                    instances_up=int(n_up[i]),
                    instances_draining=int(n_drain[i]),
                    queue=int(queue[i]),
                    batch=int(batch[i]),
                    utilisation=float(util_sum[i] / n_up[i]) if n_up[i] > 0 else 0.0,
                    tokens_per_s=float(out_s[i]),
                    prefill_tokens_per_s=float(pre_s[i]),
                    kv_used_fraction=float(kv_used[i] / kv_cap[i]) if kv_cap[i] > 0 else 0.0,
                    power_w=float(power[i]),
                    tokens_per_joule=float(work / energy[i]) if energy[i] > 0 else 0.0,
                    ttft_p50_s=num(lat["ttft_p50_s"]),
                    ttft_p99_s=num(lat["ttft_p99_s"]),
                    tpot_p50_s=num(lat["tpot_p50_s"]),
                    tpot_p99_s=num(lat["tpot_p99_s"]),
                    sim_time_s=float(state.t),
                )
            )
        return msgs

    # -- chips ------------------------------------------------------------------------------
    def chips(self, *, ts_ms: int, rates: Rates) -> list[telemetry.Chips]:
        tw = self.twin
        state, p = tw.state, tw.params
        status = state.chip_status
        failed = status == core.CHIP_FAILED
        util = np.where(failed, 0.0, rates.util[p.chip_inst])
        power = np.where(failed, 0.0, p.chip_idle_w + (p.chip_peak_w - p.chip_idle_w) * util)
        msgs: list[telemetry.Chips] = []
        for i, name in enumerate(tw.layout.tier_names):
            sel = self._tier_chips[i]
            msgs.append(
                telemetry.Chips(
                    ts_ms=ts_ms,
                    tier=name,
                    ids=list(self._chip_ids[i]),
                    instance=list(self._chip_k[i]),
                    state=self._chip_states[status[sel]].tolist(),
                    utilisation=util[sel].tolist(),
                    power_w=power[sel].tolist(),
                    sim_time_s=float(state.t),
                )
            )
        return msgs


def base_rate(state: core.State) -> float:
    """The arrival rate the workload is set to, before any burst multiplier (periodic bursts
    of a bursty workload and `burst` commands); NO_DATA for a trace or a closed loop."""
    w = state.workload
    if w.spec.arrivals in ("trace", "closed"):
        return telemetry.NO_DATA
    return float(w.rate_per_s)


def offered_rate(state: core.State) -> float:
    """The mean arrival rate the workload is set to now (bursts included); NO_DATA for a trace
    or a closed loop, which have no rate."""
    w = state.workload
    s = w.spec
    if s.arrivals in ("trace", "closed"):
        return telemetry.NO_DATA
    rate = w.rate_per_s
    period = s.burst_on_s + s.burst_off_s
    if s.arrivals == "bursty" and s.burst_on_s > 0 and math.fmod(state.t, period) < s.burst_on_s:
        rate *= w.burst_factor
    if state.t < w.burst_until_s:
        rate *= w.burst_extra
    return float(rate)
