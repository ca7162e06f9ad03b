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
KEY_SHIFT = 40  # queue keys: instance << KEY_SHIFT | arrival sequence number
# Share of a chip's dynamic power (peak - idle) drawn while an iteration waits on memory rather
# than compute. Estimate: Splitwise (Patel et al., ISCA 2024) measured the memory-bound token phase
# well below TDP, and capping token-phase GPUs' power cost it little throughput.
MEMORY_BOUND_POWER = 0.5


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
    # derived once (not constructor arguments)
    inst_mem_w_s: F64 = field(init=False)  # s per iteration to read the weights
    inst_s_per_token: F64 = field(init=False)  # s of compute per token in an iteration
    inst_nominal_prefill: F64 = field(init=False)  # prefill tokens/s running full chunks

    def __post_init__(self) -> None:
        mem_w = self.inst_weight_bytes / self.inst_w_bw
        s_tok = self.inst_flops_per_token / self.inst_flops
        t_chunk = self.inst_t_fixed + np.maximum(mem_w, self.inst_chunk * s_tok)
        object.__setattr__(self, "inst_mem_w_s", mem_w)
        object.__setattr__(self, "inst_s_per_token", s_tok)
        object.__setattr__(self, "inst_nominal_prefill", self.inst_chunk / t_chunk)

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
        free = np.zeros(new, dtype=np.int64)
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
    inst_kv_used: F64 = field(default_factory=lambda: np.zeros(0))  # bytes reserved
    # the prefill queue in first-come-first-served order per instance, kept sorted by
    # key = instance << KEY_SHIFT | seq (new rows are merged in, it is never re-sorted)
    pre_rows: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pre_keys: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    kv_wait: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # awaiting KV room
    kv_freed: bool = False  # KV was released since the waiting rows last tried to reserve
    inst_queued_work: F64 = field(default_factory=lambda: np.zeros(0))  # at the last step's start
    inst_load: F64 | None = None  # outstanding tokens, computed at most once per step
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
        inst_kv_used=np.zeros(n),
        inst_queued_work=np.zeros(n),
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


def _fcfs_order(group: I64, seq: I64) -> I64:
    """Permutation putting rows first-come-first-served within each group."""
    return np.argsort((group << KEY_SHIFT) | seq, kind="stable")


def _prefill_work(prompt: I64 | F64, attn_coef: F64) -> F64:
    """Prefill work in token-equivalents: each token costs 2P FLOPs plus causal attention."""
    p = np.asarray(prompt, dtype=np.float64)
    return p + attn_coef * p * p


def _bsum(idx: I64, weights: F64, n: int) -> F64:
    """Per-bin sums as float64 (also for empty input)."""
    if idx.size == 0:
        return np.zeros(n)
    return np.bincount(idx, weights=weights, minlength=n).astype(np.float64, copy=False)


# ------------------------------------------------------------------------------------------------
# the step


@dataclass(frozen=True)
class _Rates:
    pre_rate: F64  # prefill token-equivalents per second, per instance
    dec_rate: F64  # tokens per second per decoding request, per instance
    util: F64
    power_frac: F64  # share of dynamic power drawn
    t_iter: F64
    q_work: F64  # queued prefill work per instance


def _rates(state: State, p: Params, q_rows: I64, q_inst: I64, dec_rows: I64, di: I64) -> _Rates:
    r = state.req
    n = p.n_inst
    q_work = _bsum(q_inst, r.prefill_left[q_rows], n)
    # The chunk an iteration carries is set by the queued requests' whole prompts, not by what is
    # left of them: a prompt shorter than the budget is one iteration however the steps fall.
    q_full = _bsum(q_inst, _prefill_work(r.prompt[q_rows], p.inst_attn_coef[q_inst]), n)
    chunk = np.minimum(p.inst_chunk, q_full)
    if dec_rows.size:
        batch = np.bincount(di, minlength=n).astype(np.float64)
        ctx = (r.prompt[dec_rows] + r.decoded[dec_rows]) * p.inst_kv_bpt[di]
        mem_kv = np.bincount(di, weights=ctx, minlength=n) / p.inst_kv_bw
        mem_t = np.where(
            p.inst_kv_separate, np.maximum(p.inst_mem_w_s, mem_kv), p.inst_mem_w_s + mem_kv
        )
        work = batch * p.inst_spec + chunk
    else:
        batch = np.zeros(n)
        mem_t = p.inst_mem_w_s
        work = chunk
    compute_t = work * p.inst_s_per_token
    busy = np.maximum(mem_t, compute_t)
    t_iter = p.inst_t_fixed + busy
    active = (batch > 0) | (chunk > 0)
    iters = np.where(active, 1.0 / t_iter, 0.0)
    # dynamic power: full while the compute units are the bottleneck, a fraction while waiting on
    # memory
    power_t = compute_t + MEMORY_BOUND_POWER * (busy - compute_t)
    return _Rates(
        pre_rate=iters * chunk,
        dec_rate=iters * p.inst_spec,
        util=busy * iters,
        power_frac=power_t * iters,
        t_iter=np.where(active, t_iter, 0.0),
        q_work=q_work,
    )


def step(
    state: State, p: Params, dt: float, *, adaptive: bool = False, min_dt: float = 1e-3
) -> float:
    """Advance the fleet by `dt` simulated seconds (or to the first event if `adaptive`).

    Returns the time actually advanced.
    """
    r = state.req
    n = p.n_inst
    t0 = state.t
    q_rows = state.pre_rows
    q_inst = state.pre_keys >> KEY_SHIFT
    dec_rows = np.flatnonzero(r.phase == DECODE)
    di = r.d_inst[dec_rows]
    mov_rows = np.flatnonzero(r.phase == KV_TRANSFER)
    if mov_rows.size:
        mov_rows = mov_rows[r.kv_res[mov_rows] > 0]
    rates = _rates(state, p, q_rows, q_inst, dec_rows, di)
    state.inst_queued_work = rates.q_work
    inf = np.inf

    # prefill: each instance's budget is shared first come, first served
    if q_rows.size:
        left = r.prefill_left[q_rows]
        before = _group_excl_cumsum(q_inst, left)
        pre_rate = rates.pre_rate[q_inst]
        t_pre = np.divide(before + left, pre_rate, out=np.full(left.size, inf), where=pre_rate > 0)
        next_pre = float(t_pre.min())
    else:
        next_pre = inf
    # decode: every request in a batch advances by tokens-per-iteration each iteration
    if dec_rows.size:
        dec_rate = rates.dec_rate[di]
        remaining = r.output[dec_rows] - r.decoded[dec_rows]
        t_dec = remaining / dec_rate
        next_dec = float(t_dec.min())
    else:
        next_dec = inf
    # KV transfers: latency first, then bytes at an equal share of the link's bandwidth
    if mov_rows.size:
        lk = r.link[mov_rows]
        n_on_link = np.bincount(lk, minlength=p.n_links)
        share = p.link_bw[lk] * state.link_factor[lk] / n_on_link[lk]
        lat = r.lat_left[mov_rows]
        t_mov = lat + r.kv_left[mov_rows] / share
        next_mov = float(t_mov.min())
    else:
        next_mov = inf

    if adaptive:
        nxt = min(state.workload.next_time() - t0, next_pre, next_dec, next_mov)
        dt = min(dt, max(min_dt, nxt))
    t1 = t0 + dt
    horizon = dt * (1 + _TOL)

    # --- progress over (t0, t1]
    done_pre_rows = done_dec_rows = land = np.zeros(0, dtype=np.int64)
    if q_rows.size:
        prog = np.clip(pre_rate * dt - before, 0.0, left)
        moved_any = prog > 0
        r.prefill_left[q_rows] = left - prog
        r.phase[q_rows[moved_any]] = PREFILL
        tok = prog / (1.0 + p.inst_attn_coef[q_inst] * r.prompt[q_rows])
        state.inst_prefill_tokens += np.bincount(q_inst, weights=tok, minlength=n)
        if next_pre <= horizon:
            done = t_pre <= horizon
            done_pre_rows = q_rows[done]
            t_done_pre = t0 + t_pre[done]
            r.prefill_left[done_pre_rows] = 0.0
            keep = ~done
            state.pre_rows = q_rows[keep]
            state.pre_keys = state.pre_keys[keep]
    if dec_rows.size:
        gained = np.minimum(dec_rate * dt, remaining)
        r.decoded[dec_rows] += gained
        state.inst_output_tokens += np.bincount(di, weights=gained, minlength=n)
        if next_dec <= horizon:
            done = t_dec <= horizon
            done_dec_rows = dec_rows[done]
            t_done_dec = t0 + t_dec[done]
    if mov_rows.size:
        lat_used = np.minimum(lat, dt)
        moved = np.minimum(share * (dt - lat_used), r.kv_left[mov_rows])
        r.lat_left[mov_rows] = lat - lat_used
        r.kv_left[mov_rows] -= moved
        state.link_bytes += np.bincount(lk, weights=moved, minlength=p.n_links)
        if next_mov <= horizon:
            land = mov_rows[t_mov <= horizon]

    state.inst_util = rates.util
    state.inst_t_iter = rates.t_iter
    state.inst_power_w = state.inst_up_idle_w + rates.power_frac * state.inst_up_dyn_w
    state.inst_energy_j += state.inst_power_w * dt
    state.t = t1
    state.steps += 1
    state.inst_load = None  # routing recomputes outstanding tokens once, if it needs them

    # --- transitions at t1
    to_reserve = np.zeros(0, dtype=np.int64)
    if done_pre_rows.size:
        unified_rows, transfer_rows = _finish_prefill(state, p, done_pre_rows, t_done_pre)
        to_reserve = np.concatenate([unified_rows, _route_decode(state, p, transfer_rows)])
    if done_dec_rows.size:
        r.decoded[done_dec_rows] = r.output[done_dec_rows]
        _complete(state, p, done_dec_rows, t_done_dec, r.d_inst[done_dec_rows])
    if land.size:
        r.phase[land] = DECODE  # KV was reserved when the transfer started
        r.kv_left[land] = 0.0
        r.lat_left[land] = 0.0
    _reserve_kv(state, p, to_reserve)
    arrivals = _admit_arrivals(state, t1)
    if arrivals.size:
        _route_prefill(state, p, arrivals)
    return dt


def _finish_prefill(state: State, p: Params, rows: I64, t_done: F64) -> tuple[I64, I64]:
    """First token out. Returns (rows awaiting a batch on their unified instance, rows to hand
    off to a decode tier)."""
    r = state.req
    first = np.isnan(r.t_first[rows])
    r.t_first[rows[first]] = t_done[first]
    r.decoded[rows] = np.maximum(r.decoded[rows], 1.0)  # prefill emits the first token
    pi = r.p_inst[rows]
    state.inst_output_tokens += _bsum(pi[first], np.ones(int(first.sum())), p.n_inst)
    single = r.output[rows] <= 1
    if single.any():
        _complete(state, p, rows[single], t_done[single], pi[single])
        rows, pi = rows[~single], pi[~single]
    unified = p.inst_role[pi] == ROLE_UNIFIED
    u = rows[unified]
    r.phase[u] = QUEUED_DECODE
    r.d_inst[u] = pi[unified]
    d = rows[~unified]
    r.phase[d] = KV_TRANSFER
    r.d_inst[d] = -1
    return u, d


def _complete(state: State, p: Params, rows: I64, t_done: F64, d_inst: I64) -> None:
    r = state.req
    ttft = r.t_first[rows] - r.t_arrive[rows]
    out = r.output[rows].astype(np.float64)
    tpot = np.where(out > 1, (t_done - r.t_first[rows]) / np.maximum(out - 1, 1), 0.0)
    ok = (ttft <= p.slo_ttft_s) & (tpot <= p.slo_tpot_s)
    state.done += rows.size
    state.done_ok += int(ok.sum())
    state.inst_done += np.bincount(d_inst, minlength=p.n_inst)
    p_tier = p.inst_tier[r.p_inst[rows]].astype(np.int64)
    state.ring.push(t_done, ttft, tpot, out, p_tier, p.inst_tier[d_inst].astype(np.int64))
    _release_kv(state, p, rows)
    r.release(rows)
    state.workload.on_done(np.sort(t_done))


def _release_kv(state: State, p: Params, rows: I64) -> None:
    r = state.req
    held = rows[r.kv_res[rows] > 0]
    if held.size:
        state.inst_kv_used -= np.bincount(
            r.d_inst[held], weights=r.kv_res[held], minlength=p.n_inst
        )
        np.maximum(state.inst_kv_used, 0.0, out=state.inst_kv_used)
        r.kv_res[held] = 0.0
        state.kv_freed = True


def _reject(state: State, p: Params, rows: I64, reason: int) -> None:
    if rows.size:
        state.rejected[reason] += rows.size
        _release_kv(state, p, rows)
        state.req.release(rows)


def _admit_arrivals(state: State, t1: float) -> I64:
    t, prompt, output = state.workload.take_until(t1)
    k = t.size
    if k == 0:
        return np.zeros(0, dtype=np.int64)
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
    return rows


# ------------------------------------------------------------------------------------------------
# routing


def _outstanding_tokens(state: State, p: Params) -> F64:
    """Per instance: queued prefill work plus decode tokens still to generate (once per step)."""
    if state.inst_load is None:
        r = state.req
        dec = np.flatnonzero(r.phase >= KV_TRANSFER)
        dec = dec[r.d_inst[dec] >= 0]
        load = state.inst_queued_work.copy()
        load += _bsum(r.d_inst[dec], (r.output[dec] - r.decoded[dec]).astype(np.float64), p.n_inst)
        state.inst_load = load
    return state.inst_load


def _nominal_prefill_rate(p: Params) -> F64:
    """Prefill tokens per second of an instance running full chunks."""
    return p.inst_nominal_prefill


def _assign(state: State, p: Params, cand: I64, sizes: F64, decode: bool) -> I64:
    """Candidate instance (from `cand`) for each job, by the state's routing policy."""
    policy = POLICIES[state.policy]
    k = sizes.size
    if cand.size == 1:  # nothing to decide
        return np.repeat(cand, k)
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
    load = _outstanding_tokens(state, p)
    if policy == "least_loaded":
        cost, marginal = load[cand], np.ones(cand.size)
    else:
        if decode:
            busy = np.where(state.inst_t_iter > 0, state.inst_t_iter, 0.0)
            t_iter = np.maximum(busy[cand], p.inst_t_fixed[cand] + p.inst_mem_w_s[cand])
            rate = p.inst_spec[cand] / t_iter
        else:
            rate = p.inst_nominal_prefill[cand]
        seconds = load[cand] / rate
        marginal = 1.0 / rate
        if policy == "latency_aware":
            cost = seconds + (t_iter if decode else 0.0)
        else:  # power_aware: joules per token, rising with queueing delay
            inst_w = state.inst_up_idle_w[cand] + state.inst_up_dyn_w[cand]
            j_per_tok = inst_w / rate
            scale = p.slo_tpot_s if decode else p.slo_ttft_s
            cost = j_per_tok * (1.0 + seconds / scale)
            marginal = j_per_tok / (rate * scale)
    inst = cand[routing.water_fill(cost, marginal, sizes)]
    load += _bsum(inst, sizes, p.n_inst)
    return inst


def _eligible(state: State) -> B:
    return state.inst_up & ~state.inst_draining


def _route_prefill(state: State, p: Params, rows: I64) -> None:
    """Place requests waiting for prefill on prefill/unified instances and join their queues."""
    r = state.req
    rows = rows[np.argsort(r.seq[rows], kind="stable")]
    cand = np.flatnonzero(_eligible(state) & (p.inst_role != ROLE_DECODE))
    if cand.size == 0:
        _reject(state, p, rows, REJECT_NO_CAPACITY)
        return
    sizes = r.prompt[rows].astype(np.float64)
    inst = _assign(state, p, cand, sizes, decode=False)
    r.p_inst[rows] = inst
    r.phase[rows] = QUEUED_PREFILL
    r.prefill_left[rows] = _prefill_work(r.prompt[rows], p.inst_attn_coef[inst])
    keys = (inst << KEY_SHIFT) | r.seq[rows]
    order = np.argsort(keys, kind="stable")
    keys, rows = keys[order], rows[order]
    if state.pre_keys.size == 0:
        state.pre_keys, state.pre_rows = keys, rows
        return
    at = np.searchsorted(state.pre_keys, keys)
    state.pre_keys = np.insert(state.pre_keys, at, keys)
    state.pre_rows = np.insert(state.pre_rows, at, rows)


def _route_decode(state: State, p: Params, rows: I64) -> I64:
    """Pick a decode instance, in a tier linked to the prefill tier, for each handoff.

    Returns the rows now waiting to reserve KV on their target.
    """
    if rows.size == 0:
        return rows
    r = state.req
    rows = rows[np.argsort(r.seq[rows], kind="stable")]
    elig = _eligible(state) & (p.inst_role == ROLE_DECODE)
    src_tier = p.inst_tier[r.p_inst[rows]]
    placed = []
    tiers = [int(src_tier[0])] if (src_tier == src_tier[0]).all() else np.unique(src_tier)
    for tier in tiers:  # a loop over prefill tiers (a handful), not requests
        sel = rows if len(tiers) == 1 else rows[src_tier == tier]
        links = p.link_of[tier]
        cand = np.flatnonzero(elig & (links[p.inst_tier] >= 0))
        if cand.size == 0:
            _reject(state, p, sel, REJECT_NO_CAPACITY)
            continue
        sizes = (r.output[sel] - r.decoded[sel]).astype(np.float64)
        inst = _assign(state, p, cand, sizes, decode=True)
        r.d_inst[sel] = inst
        r.link[sel] = links[p.inst_tier[inst]]
        placed.append(sel)
    return np.concatenate(placed) if placed else np.zeros(0, dtype=np.int64)


def _reserve_kv(state: State, p: Params, new: I64) -> None:
    """Reserve KV for transfers waiting on their target and for unified requests awaiting a batch.

    First come, first served per instance; a request larger than the whole instance is rejected.
    Waiting rows retry only when KV was freed or new rows joined.
    """
    if new.size == 0 and (state.kv_wait.size == 0 or not state.kv_freed):
        return
    state.kv_freed = False
    r = state.req
    cand = np.concatenate([state.kv_wait, new]) if state.kv_wait.size else new
    ph = r.phase[cand]
    valid = ((ph == KV_TRANSFER) | (ph == QUEUED_DECODE)) & (r.kv_res[cand] == 0)
    cand = cand[valid & (r.d_inst[cand] >= 0)]
    if cand.size == 0:
        state.kv_wait = cand
        return
    if state.kv_wait.size and new.size:
        cand = np.unique(cand)  # a reused row can be both waiting and new
    inst = r.d_inst[cand]
    order = _fcfs_order(inst, r.seq[cand])
    rows, inst = cand[order], inst[order]
    need = (r.prompt[rows] + r.output[rows]) * p.inst_kv_bpt[inst]
    too_big = need > p.inst_kv_capacity[inst]
    if too_big.any():
        _reject(state, p, rows[too_big], REJECT_NO_CAPACITY)
        rows, inst, need = rows[~too_big], inst[~too_big], need[~too_big]
    before = _group_excl_cumsum(inst, need)
    ok = before + need <= p.inst_kv_capacity[inst] - state.inst_kv_used[inst]
    state.kv_wait = rows[~ok]
    rows, inst, need = rows[ok], inst[ok], need[ok]
    if rows.size == 0:
        return
    r.kv_res[rows] = need
    state.inst_kv_used += np.bincount(inst, weights=need, minlength=p.n_inst)
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
    is_down = np.zeros(p.n_inst, dtype=bool)
    is_down[down] = True
    live = ph != FREE
    p_down = live & (r.p_inst >= 0) & is_down[np.maximum(r.p_inst, 0)]
    d_down = live & (r.d_inst >= 0) & is_down[np.maximum(r.d_inst, 0)]
    in_prefill = (ph == QUEUED_PREFILL) | (ph == PREFILL)
    # prefill work is simply re-queued (and restarts)
    q_down = is_down[state.pre_keys >> KEY_SHIFT]
    if q_down.any():
        state.pre_rows = state.pre_rows[~q_down]
        state.pre_keys = state.pre_keys[~q_down]
    requeue = np.flatnonzero(in_prefill & p_down)
    # KV lost: decode on a downed instance, or a transfer whose source went down
    transfer = ph == KV_TRANSFER
    lost = np.flatnonzero((~in_prefill & d_down & ~transfer) | (transfer & p_down))
    # transfer target went down but the source still holds the KV: pick another target
    retarget = np.flatnonzero(transfer & d_down & ~p_down)
    _release_kv(state, p, np.concatenate([lost, retarget]))
    r.d_inst[retarget] = -1
    r.link[retarget] = -1
    r.kv_left[retarget] = 0.0
    r.lat_left[retarget] = 0.0
    back = np.zeros(0, dtype=np.int64)
    if lost.size:
        r.retries[lost] += 1
        state.retries += lost.size
        over = lost[r.retries[lost] > p.max_retries]
        back = lost[r.retries[lost] <= p.max_retries]
        _reject(state, p, over, REJECT_RETRY_BUDGET)
        r.d_inst[back] = -1
        r.link[back] = -1
        r.kv_left[back] = 0.0
        r.lat_left[back] = 0.0
        r.decoded[back] = 0.0
    state.inst_queued_work = _bsum(
        state.pre_keys >> KEY_SHIFT, r.prefill_left[state.pre_rows], p.n_inst
    )
    state.inst_load = None
    _reserve_kv(state, p, _route_decode(state, p, retarget))
    again = np.concatenate([requeue, back])
    if again.size:
        _route_prefill(state, p, again)


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
