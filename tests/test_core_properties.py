"""Random chaos over the core (hypothesis): sequences of operator actions (fail, recover and drain
chips or instances, degrade links, change the rate and the routing) between steps of random
length, adaptive or not. After every action and step nothing is lost
(`arrived == done + rejected + in_flight`), KV is never oversubscribed and the bookkeeping agrees
with the rows; two copies fed the same sequence with the same seed stay bit-identical."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin import core
from twin.build import Twin, new_twin
from twin.catalog import load_catalog
from twin.fleet import load_fleet, resolve_fleet_path

#: Small shipped fleets: disaggregated with two links, unified, composite decode (KV on hosts).
FLEETS = ("aws-cerebras", "tenstorrent-galaxy", "nvidia-lpx")
CATALOG = load_catalog()
LOADED = {name: load_fleet(resolve_fleet_path(name), CATALOG) for name in FLEETS}

Action = tuple[Any, ...]


def actions(twin: Twin) -> st.SearchStrategy[Action]:
    p = twin.params
    rate = RATE_PER_S
    chip = st.integers(0, p.n_chips - 1)
    inst = st.integers(0, p.n_inst - 1)
    weights = st.one_of(
        st.none(), st.lists(st.floats(0.0, 5.0), min_size=p.n_tiers, max_size=p.n_tiers)
    )
    ops: list[st.SearchStrategy[Action]] = [
        st.tuples(st.sampled_from(["fail", "recover", "drain"]), st.just("chip"), chip),
        st.tuples(st.sampled_from(["fail", "recover", "drain"]), st.just("instance"), inst),
        st.tuples(st.just("rate"), st.floats(0.0, 3.0 * rate)),
        st.tuples(st.just("policy"), st.sampled_from(core.POLICIES), weights),
    ]
    if p.n_links:
        ops.append(st.tuples(st.just("link"), st.integers(0, p.n_links - 1), st.floats(0.01, 1.0)))
    step = st.tuples(
        st.just("step"),
        st.one_of(st.floats(1e-4, 2.0), st.sampled_from([1e-6, 0.001, 0.1, 5.0])),
        st.booleans(),  # adaptive: one step, cut at the first event
    )
    advance = st.tuples(st.just("advance"), st.floats(0.01, 2.0))  # adaptive steps to t + dt
    return st.one_of(step, advance, *ops)


def apply(twin: Twin, act: Action, each: Any = None) -> None:
    """Apply an action; `each(twin)` runs after every step of an `advance`."""
    s, p = twin.state, twin.params
    kind = act[0]
    if kind in ("fail", "recover", "drain"):
        if act[1] == "chip":
            chips = np.array([act[2]], dtype=np.int64)
        else:
            start, n = int(p.inst_chip_start[act[2]]), int(p.inst_n_chips[act[2]])
            chips = np.arange(start, start + n, dtype=np.int64)
        {"fail": core.fail_chips, "recover": core.recover_chips, "drain": core.drain_chips}[kind](
            s, p, chips
        )
    elif kind == "link":
        core.set_link_factor(s, act[1], act[2])
    elif kind == "rate":
        core.set_rate(s, act[1])
    elif kind == "policy":
        w = None if act[2] is None else np.array(act[2], dtype=np.float64)
        core.set_policy(s, p, act[1], w)
    elif kind == "advance":
        end = s.t + act[1]
        while s.t < end - 1e-12:
            t0 = s.t
            took = core.step(s, p, min(1.0, end - s.t), adaptive=True)
            assert took > 0 and s.t == t0 + took
            if each is not None:
                each(twin)
    else:
        t0 = s.t
        took = core.step(s, p, act[1], adaptive=act[2])
        assert 0 < took <= act[1] * (1 + 1e-12) and s.t == t0 + took
        if not act[2]:
            assert took == act[1]


def check(twin: Twin) -> None:
    """The invariants, after any action or step."""
    s, p = twin.state, twin.params
    r = s.req
    core.check_conservation(s)
    live = r.phase != core.FREE
    # KV: never more reserved than there is room for, and the books agree with the rows
    assert (s.inst_kv_used <= p.inst_kv_capacity * (1 + 1e-9) + 1e-6).all()
    held = live & (r.kv_res > 0)
    booked = np.bincount(r.d_inst[held], weights=r.kv_res[held], minlength=p.n_inst)
    assert (np.abs(s.inst_kv_used - booked) <= 1.0 + 1e-9 * booked).all(), (s.inst_kv_used, booked)
    ph = r.phase[held]
    assert ((ph == core.KV_TRANSFER) | (ph == core.DECODE)).all()
    decoding = live & (r.phase == core.DECODE)
    assert (r.kv_res[decoding] > 0).all()  # a batch is admitted only with its KV reserved
    assert s.inst_up[r.d_inst[decoding]].all()  # nothing decodes on a failed instance
    # the prefill queue: exactly the rows waiting for or in prefill, on instances that are up,
    # kept in first-come-first-served order
    in_prefill = np.flatnonzero((r.phase == core.QUEUED_PREFILL) | (r.phase == core.PREFILL))
    assert np.array_equal(np.sort(s.pre_rows), in_prefill)
    assert np.array_equal(s.pre_keys >> core.KEY_SHIFT, r.p_inst[s.pre_rows])
    assert (np.diff(s.pre_keys) > 0).all()
    assert s.inst_up[r.p_inst[s.pre_rows]].all()
    # rows in flight point at real instances; nothing is negative or NaN where it should not be
    assert (r.p_inst[live] >= 0).all() and (r.p_inst[live] < p.n_inst).all()
    assert (r.prefill_left[live] >= 0).all() and (r.kv_left[live] >= 0).all()
    assert (r.decoded[live] <= r.output[live]).all()
    assert (r.retries[live] <= p.max_retries).all()
    assert np.isfinite(s.inst_energy_j).all() and (s.inst_power_w >= 0).all()
    failed = s.chip_status == core.CHIP_FAILED
    assert not s.inst_up[p.chip_inst[failed]].any()


def fingerprint(twin: Twin) -> list[Any]:
    """Every array and number of the state, as exact bytes."""
    out: list[Any] = []

    def add(obj: Any) -> None:
        if isinstance(obj, np.ndarray):
            out.append((obj.dtype.str, obj.shape, obj.tobytes()))
        elif isinstance(obj, np.random.Generator):
            out.append(repr(obj.bit_generator.state))
        elif isinstance(obj, int | float | bool | str | type(None)):
            out.append(repr(obj))
        elif isinstance(obj, tuple | list):
            for x in obj:
                add(x)
        elif hasattr(obj, "__dict__"):
            for k in sorted(vars(obj)):
                if k != "spec":
                    out.append(k)
                    v = getattr(obj, k)
                    # the free list is a stack: only its first n_free entries mean anything (the
                    # rest is np.empty memory after a grow, never read)
                    add(v[: obj.n_free] if isinstance(obj, core.Requests) and k == "free" else v)

    for f in fields(twin.state):
        out.append(f.name)
        add(getattr(twin.state, f.name))
    return out


#: Arrivals per second: enough to keep every tier busy, few enough for hundreds of examples.
RATE_PER_S = 20.0


def build(name: str, seed: int) -> Twin:
    return new_twin(LOADED[name], CATALOG, seed=seed, rate_per_s=RATE_PER_S)


@pytest.mark.parametrize("name", FLEETS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_random_chaos_keeps_conservation_kv_and_determinism(
    name: str, data: st.DataObject, seed: int
) -> None:
    a, b = build(name, seed), build(name, seed)
    seq = data.draw(st.lists(actions(a), min_size=1, max_size=25), label="actions")
    for act in seq:
        apply(a, act, check)
        apply(b, act)
        check(a)
        assert fingerprint(a) == fingerprint(b), act
    # and the run did something: time passed when it was asked to
    steps = [act for act in seq if act[0] in ("step", "advance")]
    assert (a.state.t > 0) == bool(steps)


@pytest.mark.parametrize("name", FLEETS)
def test_a_long_random_chaos_run(name: str) -> None:
    """One long run (seeded numpy, not hypothesis): 150 actions, a few hundred seconds,
    the invariants checked after every step."""
    rng = np.random.default_rng(2024)
    a, b = build(name, 9), build(name, 9)
    p = a.params
    rate = RATE_PER_S
    for _ in range(150):
        u = rng.random()
        act: Action
        if u < 0.4:
            act = ("advance", float(rng.uniform(0.1, 3.0)))
        elif u < 0.5:
            act = ("step", float(rng.uniform(0.01, 2.0)), bool(rng.random() < 0.5))
        elif u < 0.65:
            act = ("fail", "chip", int(rng.integers(p.n_chips)))
        elif u < 0.8:
            act = ("recover", "instance", int(rng.integers(p.n_inst)))
        elif u < 0.85:
            act = ("drain", "instance", int(rng.integers(p.n_inst)))
        elif u < 0.9 and p.n_links:
            act = ("link", int(rng.integers(p.n_links)), float(rng.uniform(0.01, 1.0)))
        elif u < 0.95:
            act = ("rate", float(rng.uniform(0.0, 3.0 * rate)))
        else:
            act = ("policy", str(rng.choice(core.POLICIES)), None)
        apply(a, act, check)
        apply(b, act)
        check(a)
    assert fingerprint(a) == fingerprint(b)
    assert a.state.t > 60 and a.state.done > 0 and a.state.retries > 0
