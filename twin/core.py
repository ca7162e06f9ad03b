"""The vectorised step function: state as arrays, one row per request slot, instance, chip, link.

numpy only: no asyncio, msgspec, aiomqtt or Textual here, and no clock. `step(state, params, dt)`
advances every row at once. Within a step the rates set at its start hold; events that fall inside
it (a prefill or decode finishing, a transfer landing) get exact, interpolated timestamps, and the
transitions they cause (routing, KV reservation, batch admission, arrivals) happen at its end. With
`adaptive=True` the step is cut at the first event so that no rate is held past a change.

Request lifecycle: queued_prefill -> prefill -> kv_transfer -> queued_decode -> decode -> done,
or rejected with a reason. Unified instances skip the transfer. The invariant
`arrived == done + rejected + in_flight` holds after every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from twin import routing
from twin.workload import Workload

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
I32 = NDArray[np.int32]
I8 = NDArray[np.int8]
B = NDArray[np.bool_]

# request phases
FREE = -1
QUEUED_PREFILL, PREFILL, KV_TRANSFER, QUEUED_DECODE, DECODE = 0, 1, 2, 3, 4
PHASES = ("queued_prefill", "prefill", "kv_transfer", "queued_decode", "decode")
# tier / instance roles
ROLE_PREFILL, ROLE_DECODE, ROLE_UNIFIED = 0, 1, 2
ROLES = ("prefill", "decode", "unified")
# chip status
CHIP_UP, CHIP_FAILED, CHIP_DRAINING = 0, 1, 2
CHIP_STATES = ("up", "failed", "draining")
# rejection reasons
REJECT_NO_CAPACITY, REJECT_RETRY_BUDGET = 0, 1
REJECT_REASONS = ("no_capacity", "retry_budget")
POLICIES = routing.POLICIES

_TOL = 1e-9  # relative tolerance for "finished" on float work counters


@dataclass(frozen=True, kw_only=True)
class Params:
    """Static description of a fleet, one row per instance, chip, tier and link (SI units)."""

    # instances
    inst_tier: I32
    inst_role: I8
    inst_flops: F64  # effective FLOP/s: chips x peak x MFU
    inst_w_bw: F64  # effective B/s for weight reads: chips x bandwidth x MBU
    inst_kv_bw: F64  # effective B/s for KV reads (kv-host chips for a composite instance)
    inst_kv_separate: B  # composite: weights and KV are read by different chips, in parallel
    inst_weight_bytes: F64
    inst_kv_capacity: F64  # bytes of KV the instance can hold
    inst_t_fixed: F64  # s per iteration: layers x t_layer + hops x t_hop
    inst_spec: F64  # tokens per decode iteration (speculative decoding; 1 = none)
    inst_chunk: F64  # prefill token budget per iteration
    inst_flops_per_token: F64  # 2 x parameters
    inst_attn_coef: F64  # prefill attention work per token^2, in tokens (layers x hidden / params)
    inst_kv_bpt: F64  # KV bytes per token
    inst_chip_start: I64
    inst_n_chips: I64
    # chips (contiguous per instance)
    chip_inst: I64
    chip_idle_w: F64
    chip_peak_w: F64
    # tiers
    tier_role: I8
    tier_names: tuple[str, ...]
    # links: prefill tier -> decode tier
    link_src: I64
    link_dst: I64
    link_bw: F64  # B/s shared by the transfers on the link
    link_lat: F64  # s
    link_of: I64  # [n_tiers, n_tiers] -> link index or -1
    # service level
    slo_ttft_s: float
    slo_tpot_s: float
    max_retries: int

    @property
    def n_inst(self) -> int:
        return int(self.inst_tier.size)

    @property
    def n_chips(self) -> int:
        return int(self.chip_inst.size)

    @property
    def n_tiers(self) -> int:
        return int(self.tier_role.size)

    @property
    def n_links(self) -> int:
        return int(self.link_src.size)


class Requests:
    """Preallocated request slots with a free list; grows by doubling when full."""

    COLS_F = ("t_arrive", "t_first", "prefill_left", "decoded", "kv_left", "lat_left", "kv_res")
    COLS_I = ("prompt", "output", "p_inst", "d_inst", "link", "retries", "seq")

    def __init__(self, capacity: int = 1024) -> None:
        self.phase: I8 = np.full(capacity, FREE, dtype=np.int8)
        self.t_arrive: F64 = np.zeros(capacity)
        self.t_first: F64 = np.full(capacity, np.nan)
        self.prefill_left: F64 = np.zeros(capacity)  # tokens of prefill work left (attention incl.)
        self.decoded: F64 = np.zeros(capacity)  # output tokens produced so far
        self.kv_left: F64 = np.zeros(capacity)  # KV bytes still to move
        self.lat_left: F64 = np.zeros(capacity)  # link latency still to pass
        self.kv_res: F64 = np.zeros(capacity)  # KV bytes reserved on d_inst
        self.prompt: I64 = np.zeros(capacity, dtype=np.int64)
        self.output: I64 = np.zeros(capacity, dtype=np.int64)
        self.p_inst: I64 = np.full(capacity, -1, dtype=np.int64)
        self.d_inst: I64 = np.full(capacity, -1, dtype=np.int64)
        self.link: I64 = np.full(capacity, -1, dtype=np.int64)
        self.retries: I64 = np.zeros(capacity, dtype=np.int64)
        self.seq: I64 = np.zeros(capacity, dtype=np.int64)
        self.free: I64 = np.arange(capacity - 1, -1, -1, dtype=np.int64)  # a stack
        self.n_free = capacity

    @property
    def capacity(self) -> int:
        return int(self.phase.size)

    def alloc(self, k: int) -> I64:
        while self.n_free < k:
            self._grow()
        rows = self.free[self.n_free - k : self.n_free][::-1].copy()
        self.n_free -= k
        return rows

    def release(self, rows: I64) -> None:
        self.phase[rows] = FREE
        k = rows.size
        self.free[self.n_free : self.n_free + k] = rows
        self.n_free += k

    def _grow(self) -> None:
        old = self.capacity
        new = old * 2
        for name in ("phase", *self.COLS_F, *self.COLS_I):
            a = getattr(self, name)
            fill = FREE if name == "phase" else (np.nan if name == "t_first" else 0)
            if name in ("p_inst", "d_inst", "link"):
                fill = -1
            b = np.full(new, fill, dtype=a.dtype)
            b[:old] = a
            setattr(self, name, b)
        free = np.empty(new, dtype=np.int64)
        free[: self.n_free] = self.free[: self.n_free]
        added = np.arange(new - 1, old - 1, -1, dtype=np.int64)
        free[self.n_free : self.n_free + added.size] = added
        self.free = free
        self.n_free += added.size


class Ring:
    """The last `size` finished requests' latencies, for windowed percentiles."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.t_done: F64 = np.zeros(size)
        self.ttft: F64 = np.zeros(size)
        self.tpot: F64 = np.zeros(size)
        self.output: F64 = np.zeros(size)
        self.p_tier: I64 = np.zeros(size, dtype=np.int64)
        self.d_tier: I64 = np.zeros(size, dtype=np.int64)
        self.pos = 0
        self.n = 0

    def push(self, t_done: F64, ttft: F64, tpot: F64, out: F64, p_tier: I64, d_tier: I64) -> None:
        k = t_done.size
        if k == 0:
            return
        if k > self.size:
            sl = slice(k - self.size, k)
            t_done, ttft, tpot, out = t_done[sl], ttft[sl], tpot[sl], out[sl]
            p_tier, d_tier = p_tier[sl], d_tier[sl]
            k = self.size
        idx = (self.pos + np.arange(k)) % self.size
        self.t_done[idx] = t_done
        self.ttft[idx] = ttft
        self.tpot[idx] = tpot
        self.output[idx] = out
        self.p_tier[idx] = p_tier
        self.d_tier[idx] = d_tier
        self.pos = int((self.pos + k) % self.size)
        self.n = min(self.size, self.n + k)

    def valid(self) -> slice:
        return slice(0, self.n)


@dataclass(kw_only=True)
class State:
    """Everything that changes: request slots, instance/chip/link status, counters."""

    t: float
    rng: np.random.Generator
    workload: Workload
    req: Requests
    chip_status: I8
    inst_up: B
    inst_draining: B
    inst_up_idle_w: F64  # sum of idle power of the instance's chips that are not failed
    inst_up_dyn_w: F64  # sum of (peak - idle) of those chips
    link_factor: F64
    policy: int
    tier_weight: F64
    ring: Ring
    # counters (cumulative)
    arrived: int = 0
    done: int = 0
    done_ok: int = 0  # met both SLOs
    rejected: I64 = field(default_factory=lambda: np.zeros(len(REJECT_REASONS), dtype=np.int64))
    retries: int = 0
    next_seq: int = 0
    rr_counter: int = 0
    steps: int = 0
    inst_prefill_tokens: F64 = field(default_factory=lambda: np.zeros(0))
    inst_output_tokens: F64 = field(default_factory=lambda: np.zeros(0))
    inst_energy_j: F64 = field(default_factory=lambda: np.zeros(0))
    inst_done: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    link_bytes: F64 = field(default_factory=lambda: np.zeros(0))
    weight_credit: F64 = field(default_factory=lambda: np.zeros(0))
    # last step's per-instance view (for telemetry and routing)
    inst_util: F64 = field(default_factory=lambda: np.zeros(0))
    inst_t_iter: F64 = field(default_factory=lambda: np.zeros(0))
    inst_power_w: F64 = field(default_factory=lambda: np.zeros(0))

    @property
    def in_flight(self) -> int:
        return self.req.capacity - self.req.n_free

    @property
    def rejected_total(self) -> int:
        return int(self.rejected.sum())


def new_state(
    params: Params,
    workload: Workload,
    rng: np.random.Generator,
    *,
    policy: str = "least_loaded",
    tier_weights: F64 | None = None,
    capacity: int = 1024,
    ring_size: int = 1 << 16,
) -> State:
    """A fleet at time 0: every chip up, nothing in flight."""
    n, c = params.n_inst, params.n_chips
    weights = np.ones(params.n_tiers) if tier_weights is None else np.asarray(tier_weights, float)
    state = State(
        t=0.0,
        rng=rng,
        workload=workload,
        req=Requests(capacity),
        chip_status=np.zeros(c, dtype=np.int8),
        inst_up=np.ones(n, dtype=bool),
        inst_draining=np.zeros(n, dtype=bool),
        inst_up_idle_w=np.zeros(n),
        inst_up_dyn_w=np.zeros(n),
        link_factor=np.ones(params.n_links),
        policy=POLICIES.index(policy),
        tier_weight=weights,
        ring=Ring(ring_size),
        inst_prefill_tokens=np.zeros(n),
        inst_output_tokens=np.zeros(n),
        inst_energy_j=np.zeros(n),
        inst_done=np.zeros(n, dtype=np.int64),
        link_bytes=np.zeros(params.n_links),
        weight_credit=np.zeros(n),
        inst_util=np.zeros(n),
        inst_t_iter=np.zeros(n),
        inst_power_w=np.zeros(n),
    )
    _refresh_instances(state, params)
    state.inst_power_w = state.inst_up_idle_w.copy()
    return state


# ------------------------------------------------------------------------------------------------
# helpers


def _group_excl_cumsum(groups: I64, values: F64) -> F64:
    """Exclusive running sum of `values` within each run of equal, adjacent `groups`."""
    cs = np.cumsum(values)
    excl = cs - values
    if groups.size == 0:
        return excl
    start = np.empty(groups.size, dtype=bool)
    start[0] = True
    np.not_equal(groups[1:], groups[:-1], out=start[1:])
    base = excl[start]
    return excl - base[np.cumsum(start) - 1]


def _fcfs(rows: I64, group: I64, seq: I64) -> tuple[I64, I64]:
    """Rows sorted first-come-first-served within each group; returns (rows, their groups)."""
    order = np.lexsort((seq, group))
    return rows[order], group[order]


def _prefill_work(prompt: I64 | F64, attn_coef: F64) -> F64:
    """Prefill work in token-equivalents: each token costs 2P FLOPs plus causal attention."""
    p = np.asarray(prompt, dtype=np.float64)
    return p + attn_coef * p * p


# ------------------------------------------------------------------------------------------------
# the step


@dataclass(frozen=True)
class _Rates:
    pre_rate: F64  # prefill token-equivalents per second, per instance
    dec_rate: F64  # tokens per second per decoding request, per instance
    util: F64
    t_iter: F64


def _rates(state: State, p: Params, pre_rows: I64, dec_rows: I64) -> _Rates:
    r = state.req
    n = p.n_inst
    q_work = np.bincount(r.p_inst[pre_rows], weights=r.prefill_left[pre_rows], minlength=n)
    di = r.d_inst[dec_rows]
    batch = np.bincount(di, minlength=n).astype(np.float64)
    ctx = (r.prompt[dec_rows] + r.decoded[dec_rows]) * p.inst_kv_bpt[di]
    kv_read = np.bincount(di, weights=ctx, minlength=n)
    chunk = np.minimum(p.inst_chunk, q_work)
    compute_t = (batch * p.inst_spec + chunk) * p.inst_flops_per_token / p.inst_flops
    mem_w = p.inst_weight_bytes / p.inst_w_bw
    mem_kv = kv_read / p.inst_kv_bw
    mem_t = np.where(p.inst_kv_separate, np.maximum(mem_w, mem_kv), mem_w + mem_kv)
    busy = np.maximum(mem_t, compute_t)
    t_iter = p.inst_t_fixed + busy
    active = (batch > 0) | (chunk > 0)
    iters = np.where(active, 1.0 / t_iter, 0.0)
    return _Rates(
        pre_rate=iters * chunk,
        dec_rate=iters * p.inst_spec,
        util=np.where(active, busy / t_iter, 0.0),
        t_iter=np.where(active, t_iter, 0.0),
    )


def step(
    state: State, p: Params, dt: float, *, adaptive: bool = False, min_dt: float = 1e-3
) -> float:
    """Advance the fleet by `dt` simulated seconds (or to the first event if `adaptive`).

    Returns the time actually advanced.
    """
    r = state.req
    ph = r.phase
    t0 = state.t
    pre_rows = np.flatnonzero(((ph == QUEUED_PREFILL) | (ph == PREFILL)) & (r.p_inst >= 0))
    dec_rows = np.flatnonzero(ph == DECODE)
    mov_rows = np.flatnonzero((ph == KV_TRANSFER) & (r.kv_res > 0))
    rates = _rates(state, p, pre_rows, dec_rows)

    # prefill: each instance's budget is shared first come, first served
    s_rows, s_inst = _fcfs(pre_rows, r.p_inst[pre_rows], r.seq[pre_rows])
    left = r.prefill_left[s_rows]
    before = _group_excl_cumsum(s_inst, left)
    pre_rate = rates.pre_rate[s_inst]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_pre = np.where(pre_rate > 0, (before + left) / pre_rate, np.inf)
    # decode: every request in a batch advances by tokens-per-iteration each iteration
    di = r.d_inst[dec_rows]
    dec_rate = rates.dec_rate[di]
    remaining = r.output[dec_rows] - r.decoded[dec_rows]
    t_dec = remaining / dec_rate
    # KV transfers: latency first, then bytes at an equal share of the link's bandwidth
    lk = r.link[mov_rows]
    n_on_link = np.bincount(lk, minlength=p.n_links)
    share = p.link_bw[lk] * state.link_factor[lk] / n_on_link[lk]
    lat = r.lat_left[mov_rows]
    with np.errstate(divide="ignore"):
        t_mov = lat + r.kv_left[mov_rows] / share

    if adaptive:
        nxt = min(
            dt,
            state.workload.next_time() - t0,
            float(t_pre.min()) if t_pre.size else np.inf,
            float(t_dec.min()) if t_dec.size else np.inf,
            float(t_mov.min()) if t_mov.size else np.inf,
        )
        dt = min(dt, max(min_dt, nxt))
    t1 = t0 + dt

    # --- progress over (t0, t1]
    done_pre = t_pre <= dt * (1 + _TOL)
    prog = np.clip(pre_rate * dt - before, 0.0, left)
    r.prefill_left[s_rows] = np.where(done_pre, 0.0, left - prog)
    r.phase[s_rows[prog > 0]] = PREFILL
    tok_frac = 1.0 / (1.0 + p.inst_attn_coef[s_inst] * r.prompt[s_rows])
    state.inst_prefill_tokens += np.bincount(s_inst, weights=prog * tok_frac, minlength=p.n_inst)

    done_dec = t_dec <= dt * (1 + _TOL)
    gained = np.minimum(dec_rate * dt, remaining)
    r.decoded[dec_rows] += gained
    state.inst_output_tokens += np.bincount(di, weights=gained, minlength=p.n_inst)

    lat_used = np.minimum(lat, dt)
    moved = np.minimum(share * (dt - lat_used), r.kv_left[mov_rows])
    done_mov = t_mov <= dt * (1 + _TOL)
    r.lat_left[mov_rows] = lat - lat_used
    r.kv_left[mov_rows] -= moved
    state.link_bytes += np.bincount(lk, weights=moved, minlength=p.n_links)

    state.inst_util = rates.util
    state.inst_t_iter = rates.t_iter
    state.inst_power_w = state.inst_up_idle_w + rates.util * state.inst_up_dyn_w
    state.inst_energy_j += state.inst_power_w * dt
    state.t = t1
    state.steps += 1

    # --- transitions at t1
    _finish_prefill(state, p, s_rows[done_pre], t0 + t_pre[done_pre])
    _finish_decode(state, p, dec_rows[done_dec], t0 + t_dec[done_dec])
    land = mov_rows[done_mov]
    r.phase[land] = DECODE  # KV was reserved when the transfer started
    r.kv_left[land] = 0.0
    r.lat_left[land] = 0.0
    _route_decode(state, p)
    _reserve_kv(state, p)
    _admit_arrivals(state, t1)
    _route_prefill(state, p)
    return dt


def _finish_prefill(state: State, p: Params, rows: I64, t_done: F64) -> None:
    r = state.req
    if rows.size == 0:
        return
    first = np.isnan(r.t_first[rows])
    r.t_first[rows[first]] = t_done[first]
    r.decoded[rows] = np.maximum(r.decoded[rows], 1.0)  # prefill emits the first token
    pi = r.p_inst[rows]
    np.add.at(state.inst_output_tokens, pi[first], 1.0)
    single = r.output[rows] <= 1
    if single.any():
        _complete(state, p, rows[single], t_done[single], pi[single])
        rows, pi = rows[~single], pi[~single]
    unified = p.inst_role[pi] == ROLE_UNIFIED
    u = rows[unified]
    r.phase[u] = QUEUED_DECODE
    r.d_inst[u] = r.p_inst[u]
    d = rows[~unified]
    r.phase[d] = KV_TRANSFER
    r.d_inst[d] = -1


def _finish_decode(state: State, p: Params, rows: I64, t_done: F64) -> None:
    if rows.size:
        r = state.req
        r.decoded[rows] = r.output[rows]
        _complete(state, p, rows, t_done, r.d_inst[rows])


def _complete(state: State, p: Params, rows: I64, t_done: F64, d_inst: I64) -> None:
    r = state.req
    ttft = r.t_first[rows] - r.t_arrive[rows]
    out = r.output[rows].astype(np.float64)
    tpot = np.where(out > 1, (t_done - r.t_first[rows]) / np.maximum(out - 1, 1), 0.0)
    ok = (ttft <= p.slo_ttft_s) & (tpot <= p.slo_tpot_s)
    state.done += rows.size
    state.done_ok += int(ok.sum())
    np.add.at(state.inst_done, d_inst, 1)
    p_tier = p.inst_tier[r.p_inst[rows]].astype(np.int64)
    state.ring.push(t_done, ttft, tpot, out, p_tier, p.inst_tier[d_inst].astype(np.int64))
    r.kv_res[rows] = 0.0
    r.release(rows)
    state.workload.on_done(np.sort(t_done))


def _reject(state: State, rows: I64, reason: int) -> None:
    if rows.size:
        state.rejected[reason] += rows.size
        state.req.kv_res[rows] = 0.0
        state.req.release(rows)


def _admit_arrivals(state: State, t1: float) -> None:
    t, prompt, output = state.workload.take_until(t1)
    k = t.size
    if k == 0:
        return
    r = state.req
    rows = r.alloc(k)
    r.phase[rows] = QUEUED_PREFILL
    r.t_arrive[rows] = t
    r.t_first[rows] = np.nan
    r.prompt[rows] = prompt
    r.output[rows] = np.maximum(output, 1)
    r.prefill_left[rows] = 0.0  # set when routed (work depends on the instance's model)
    r.decoded[rows] = 0.0
    r.kv_left[rows] = 0.0
    r.lat_left[rows] = 0.0
    r.kv_res[rows] = 0.0
    r.p_inst[rows] = -1
    r.d_inst[rows] = -1
    r.link[rows] = -1
    r.retries[rows] = 0
    r.seq[rows] = state.next_seq + np.arange(k)
    state.next_seq += k
    state.arrived += k


# ------------------------------------------------------------------------------------------------
# routing


def _outstanding_tokens(state: State, p: Params) -> F64:
    """Per instance: prefill work queued plus decode tokens still to generate."""
    r = state.req
    ph = r.phase
    pre = np.flatnonzero(((ph == QUEUED_PREFILL) | (ph == PREFILL)) & (r.p_inst >= 0))
    dec = np.flatnonzero((ph >= KV_TRANSFER) & (r.d_inst >= 0))
    n = p.n_inst
    load = np.zeros(n)
    load += np.bincount(r.p_inst[pre], weights=r.prefill_left[pre], minlength=n)
    load += np.bincount(r.d_inst[dec], weights=r.output[dec] - r.decoded[dec], minlength=n)
    return load


def _nominal_prefill_rate(p: Params) -> F64:
    """Prefill tokens per second of an instance running full chunks."""
    t = p.inst_t_fixed + np.maximum(
        p.inst_weight_bytes / p.inst_w_bw, p.inst_chunk * p.inst_flops_per_token / p.inst_flops
    )
    return p.inst_chunk / t


def _assign(
    state: State, p: Params, cand: I64, sizes: F64, load: F64, rate: F64, decode: bool
) -> I64:
    """Candidate instance (from `cand`) for each job, by the state's routing policy."""
    policy = POLICIES[state.policy]
    k = sizes.size
    if policy == "round_robin":
        j = routing.rotate(cand.size, k, state.rr_counter)
        state.rr_counter += k
        return cand[j]
    if policy == "weighted":
        w = state.tier_weight[p.inst_tier[cand]]
        per_tier = np.bincount(p.inst_tier[cand], minlength=p.n_tiers)[p.inst_tier[cand]]
        shares = w / per_tier
        if shares.sum() <= 0:
            shares = np.ones(cand.size)
        shares = shares / shares.sum()
        j, credit = routing.apportion(shares, k, state.weight_credit[cand])
        state.weight_credit[cand] = credit
        return cand[j]
    if policy == "least_loaded":
        cost, marginal = load[cand], np.ones(cand.size)
    else:
        seconds = load[cand] / rate[cand]
        marginal = 1.0 / rate[cand]
        if policy == "latency_aware":
            cost = seconds + (state.inst_t_iter[cand] if decode else 0.0)
        else:  # power_aware: joules per token, rising with queueing delay
            inst_w = state.inst_up_idle_w[cand] + state.inst_up_dyn_w[cand]
            j_per_tok = inst_w / rate[cand]
            scale = p.slo_tpot_s if decode else p.slo_ttft_s
            cost = j_per_tok * (1.0 + seconds / scale)
            marginal = j_per_tok / (rate[cand] * scale)
    return cand[routing.water_fill(cost, marginal, sizes)]


def _eligible(state: State, p: Params) -> B:
    return state.inst_up & ~state.inst_draining


def _route_prefill(state: State, p: Params) -> None:
    r = state.req
    rows = np.flatnonzero((r.phase == QUEUED_PREFILL) & (r.p_inst < 0))
    if rows.size == 0:
        return
    rows = rows[np.argsort(r.seq[rows], kind="stable")]
    cand = np.flatnonzero(_eligible(state, p) & (p.inst_role != ROLE_DECODE))
    if cand.size == 0:
        _reject(state, rows, REJECT_NO_CAPACITY)
        return
    load = _outstanding_tokens(state, p)
    rate = _nominal_prefill_rate(p)
    sizes = r.prompt[rows].astype(np.float64)
    inst = _assign(state, p, cand, sizes, load, rate, decode=False)
    r.p_inst[rows] = inst
    r.prefill_left[rows] = _prefill_work(r.prompt[rows], p.inst_attn_coef[inst])


def _route_decode(state: State, p: Params) -> None:
    r = state.req
    rows = np.flatnonzero((r.phase == KV_TRANSFER) & (r.d_inst < 0))
    if rows.size == 0:
        return
    rows = rows[np.argsort(r.seq[rows], kind="stable")]
    elig = _eligible(state, p) & (p.inst_role == ROLE_DECODE)
    load = None
    src_tier = p.inst_tier[r.p_inst[rows]]
    for tier in np.unique(src_tier):  # a loop over prefill tiers (a handful), not requests
        sel = rows[src_tier == tier]
        links = p.link_of[tier]
        cand = np.flatnonzero(elig & (links[p.inst_tier] >= 0))
        if cand.size == 0:
            _reject(state, sel, REJECT_NO_CAPACITY)
            continue
        if load is None:
            load = _outstanding_tokens(state, p)
        rate = np.where(
            state.inst_t_iter > 0, p.inst_spec / np.maximum(state.inst_t_iter, 1e-12), 0
        )
        rate = np.maximum(rate, p.inst_spec / (p.inst_t_fixed + p.inst_weight_bytes / p.inst_w_bw))
        sizes = (r.output[sel] - r.decoded[sel]).astype(np.float64)
        inst = _assign(state, p, cand, sizes, load, rate, decode=True)
        r.d_inst[sel] = inst
        r.link[sel] = links[p.inst_tier[inst]]
        np.add.at(load, inst, sizes)


def _reserve_kv(state: State, p: Params) -> None:
    """Reserve KV for transfers waiting on their target and for unified requests awaiting a batch.

    First come, first served per instance; a request larger than the whole instance is rejected.
    """
    r = state.req
    ph = r.phase
    wait = np.flatnonzero(
        ((ph == KV_TRANSFER) | (ph == QUEUED_DECODE)) & (r.kv_res == 0) & (r.d_inst >= 0)
    )
    if wait.size == 0:
        return
    n = p.n_inst
    held = np.flatnonzero(r.kv_res > 0)
    used = np.bincount(r.d_inst[held], weights=r.kv_res[held], minlength=n)
    rows, inst = _fcfs(wait, r.d_inst[wait], r.seq[wait])
    need = (r.prompt[rows] + r.output[rows]) * p.inst_kv_bpt[inst]
    too_big = need > p.inst_kv_capacity[inst]
    if too_big.any():
        _reject(state, rows[too_big], REJECT_NO_CAPACITY)
        rows, inst, need = rows[~too_big], inst[~too_big], need[~too_big]
    before = _group_excl_cumsum(inst, need)
    ok = before + need <= p.inst_kv_capacity[inst] - used[inst]
    rows, inst, need = rows[ok], inst[ok], need[ok]
    r.kv_res[rows] = need
    transfer = r.phase[rows] == KV_TRANSFER
    t_rows = rows[transfer]
    r.kv_left[t_rows] = r.prompt[t_rows] * p.inst_kv_bpt[inst[transfer]]
    r.lat_left[t_rows] = p.link_lat[r.link[t_rows]]
    r.phase[rows[~transfer]] = DECODE


# ------------------------------------------------------------------------------------------------
# operator actions: functions on the state that the engine and scenarios call


def _refresh_instances(state: State, p: Params) -> None:
    up_chip = state.chip_status != CHIP_FAILED
    n = p.n_inst
    failed = np.bincount(p.chip_inst, weights=~up_chip, minlength=n)
    draining = np.bincount(p.chip_inst, weights=state.chip_status == CHIP_DRAINING, minlength=n)
    state.inst_up = failed == 0
    state.inst_draining = draining > 0
    idle = p.chip_idle_w * up_chip
    state.inst_up_idle_w = np.bincount(p.chip_inst, weights=idle, minlength=n).astype(np.float64)
    dyn = (p.chip_peak_w - p.chip_idle_w) * up_chip
    state.inst_up_dyn_w = np.bincount(p.chip_inst, weights=dyn, minlength=n).astype(np.float64)


def fail_chips(state: State, p: Params, chips: I64) -> I64:
    """Fail chips; their instances go down. Returns the instances newly taken down.

    Prefill work on a downed instance is re-queued; its decode requests lose their KV and go back
    to prefill (a retry; past the retry budget they are rejected); transfers to it restart
    elsewhere, transfers from it lose their KV and go back to prefill.
    """
    chips = np.asarray(chips, dtype=np.int64)
    was_up = state.inst_up.copy()
    state.chip_status[chips] = CHIP_FAILED
    _refresh_instances(state, p)
    down = np.flatnonzero(was_up & ~state.inst_up)
    if down.size:
        _evict(state, p, down)
    return down


def recover_chips(state: State, p: Params, chips: I64) -> I64:
    """Return chips to service (failed or draining). Returns the instances that came back up."""
    chips = np.asarray(chips, dtype=np.int64)
    was_up = state.inst_up.copy()
    state.chip_status[chips] = CHIP_UP
    _refresh_instances(state, p)
    return np.flatnonzero(~was_up & state.inst_up)


def drain_chips(state: State, p: Params, chips: I64) -> I64:
    """Stop routing new work to the chips' instances; work already there finishes."""
    chips = np.asarray(chips, dtype=np.int64)
    up = state.chip_status[chips] == CHIP_UP
    state.chip_status[chips[up]] = CHIP_DRAINING
    _refresh_instances(state, p)
    return np.unique(p.chip_inst[chips])


def _evict(state: State, p: Params, down: I64) -> None:
    r = state.req
    ph = r.phase
    live = ph != FREE
    is_down = np.zeros(p.n_inst, dtype=bool)
    is_down[down] = True
    p_down = live & (r.p_inst >= 0) & is_down[np.maximum(r.p_inst, 0)]
    d_down = live & (r.d_inst >= 0) & is_down[np.maximum(r.d_inst, 0)]
    in_prefill = (ph == QUEUED_PREFILL) | (ph == PREFILL)
    # prefill work is simply re-queued
    requeue = np.flatnonzero(in_prefill & p_down)
    r.phase[requeue] = QUEUED_PREFILL
    r.p_inst[requeue] = -1
    # KV lost: decode on a downed instance, or a transfer whose source went down
    transfer = ph == KV_TRANSFER
    lost = np.flatnonzero((~in_prefill & d_down & ~transfer) | (transfer & p_down))
    # transfer target went down but the source still holds the KV: pick another target
    retarget = np.flatnonzero(transfer & d_down & ~p_down)
    r.d_inst[retarget] = -1
    r.link[retarget] = -1
    r.kv_res[retarget] = 0.0
    r.kv_left[retarget] = 0.0
    r.lat_left[retarget] = 0.0
    if lost.size:
        r.retries[lost] += 1
        state.retries += lost.size
        over = lost[r.retries[lost] > p.max_retries]
        back = lost[r.retries[lost] <= p.max_retries]
        _reject(state, over, REJECT_RETRY_BUDGET)
        r.phase[back] = QUEUED_PREFILL
        r.p_inst[back] = -1
        r.d_inst[back] = -1
        r.link[back] = -1
        r.kv_res[back] = 0.0
        r.kv_left[back] = 0.0
        r.lat_left[back] = 0.0
        r.decoded[back] = 0.0
    _route_decode(state, p)
    _route_prefill(state, p)


def set_link_factor(state: State, link: int, factor: float) -> None:
    """Degrade (factor < 1) or restore (1) a link's bandwidth."""
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"link bandwidth factor must be in (0, 1], got {factor}")
    state.link_factor[link] = factor


def set_rate(state: State, rate_per_s: float) -> None:
    if rate_per_s < 0:
        raise ValueError(f"arrival rate must be >= 0, got {rate_per_s}")
    state.workload.set_rate(rate_per_s, state.t)


def set_policy(state: State, p: Params, policy: str, tier_weights: F64 | None = None) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown routing policy {policy!r}; expected one of {POLICIES}")
    if tier_weights is not None:
        w = np.asarray(tier_weights, dtype=np.float64)
        if w.shape != (p.n_tiers,) or (w < 0).any():
            raise ValueError("tier weights must be one non-negative number per tier")
        state.tier_weight = w
        state.weight_credit[:] = 0.0
    state.policy = POLICIES.index(policy)


# ------------------------------------------------------------------------------------------------
# running


def run_until(state: State, p: Params, t_end: float, *, max_dt: float = 1.0) -> int:
    """Advance with adaptive steps (at most `max_dt` each) to `t_end`; returns the step count."""
    n = 0
    while state.t < t_end - 1e-12:
        step(state, p, min(max_dt, t_end - state.t), adaptive=True)
        n += 1
    return n


def check_conservation(state: State) -> None:
    """Raise AssertionError if a request was lost or counted twice."""
    live = int(np.count_nonzero(state.req.phase != FREE))
    if live != state.in_flight:
        raise AssertionError(f"free list out of step: {live} live rows, {state.in_flight} in use")
    total = state.done + state.rejected_total + state.in_flight
    if state.arrived != total:
        raise AssertionError(
            f"conservation broken: arrived {state.arrived} != done {state.done} + rejected "
            f"{state.rejected_total} + in flight {state.in_flight}"
        )
