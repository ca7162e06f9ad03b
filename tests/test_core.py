"""The core's rules: conservation, determinism, failures, draining, links, routing, power."""

from __future__ import annotations

import hashlib

import msgspec
import numpy as np
import pytest

from twin import core, metrics
from twin.build import Twin, new_twin
from twin.catalog import load_catalog
from twin.fleet import load_fleet, resolve_fleet_path


def make(name: str = "nvidia-groq", seed: int = 0, rate: float | None = None, **fleet_changes):
    catalog = load_catalog()
    fleet = load_fleet(resolve_fleet_path(name), catalog)
    if fleet_changes:
        fleet = msgspec.structs.replace(fleet, **fleet_changes)
    return new_twin(fleet, catalog, seed=seed, rate_per_s=rate)


def digest(twin: Twin) -> str:
    s, r = twin.state, twin.state.req
    h = hashlib.sha256()
    for a in (
        r.phase,
        r.t_arrive,
        r.t_first,
        r.prefill_left,
        r.decoded,
        r.kv_left,
        r.kv_res,
        r.p_inst,
        r.d_inst,
        s.inst_energy_j,
        s.inst_output_tokens,
        s.chip_status,
    ):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(repr((s.t, s.arrived, s.done, s.rejected.tolist(), s.retries)).encode())
    return h.hexdigest()


def chaos_step(twin: Twin, rng: np.random.Generator) -> None:
    """One random operator action (the same sequence for the same rng)."""
    s, p = twin.state, twin.params
    action = rng.integers(0, 8)
    chip = rng.integers(0, p.n_chips, size=rng.integers(1, 4))
    if action == 0:
        core.fail_chips(s, p, chip)
    elif action == 1:
        core.recover_chips(s, p, chip)
    elif action == 2:
        core.drain_chips(s, p, chip)
    elif action == 3 and p.n_links:
        core.set_link_factor(s, int(rng.integers(0, p.n_links)), float(rng.uniform(0.05, 1.0)))
    elif action == 4:
        core.set_rate(s, float(rng.uniform(0.0, 40.0)))
    elif action == 5:
        core.set_policy(s, p, core.POLICIES[int(rng.integers(0, len(core.POLICIES)))])
    elif action == 6:
        core.recover_chips(s, p, np.arange(p.n_chips))


def check_invariants(twin: Twin) -> None:
    s, p, r = twin.state, twin.params, twin.state.req
    core.check_conservation(s)
    live = r.phase != core.FREE
    assert set(np.unique(r.phase[live]).tolist()) <= set(range(5))
    used = metrics.kv_used(s, p)
    assert (used <= p.inst_kv_capacity * (1 + 1e-9)).all(), "KV oversubscribed"
    assert np.allclose(used, s.inst_kv_used, rtol=1e-9, atol=1.0), "KV bookkeeping drifted"
    # nothing is placed on an instance that is down
    assigned = live & (r.p_inst >= 0) & (r.phase <= core.PREFILL)
    assert s.inst_up[r.p_inst[assigned]].all()
    dec = live & (r.d_inst >= 0) & (r.kv_res > 0)
    assert s.inst_up[r.d_inst[dec]].all()
    assert (r.prefill_left[live] >= 0).all() and (r.decoded[live] <= r.output[live]).all()


@pytest.mark.parametrize("name", ["nvidia-groq", "aws-cerebras", "all-vendors", "gpu-colocated"])
def test_conservation_through_random_chaos(name: str) -> None:
    twin = make(name, seed=3)
    rng = np.random.default_rng(11)
    for i in range(1500):
        core.step(twin.state, twin.params, float(rng.uniform(0.005, 0.4)), adaptive=bool(i % 2))
        if i % 25 == 0:
            chaos_step(twin, rng)
        check_invariants(twin)
    assert twin.state.done > 100
    assert twin.state.arrived == twin.state.done + twin.state.rejected_total + twin.state.in_flight


def test_two_seeded_copies_run_in_lockstep() -> None:
    a, b = make(seed=5), make(seed=5)
    ra, rb = np.random.default_rng(1), np.random.default_rng(1)
    for i in range(600):
        if i % 40 == 0:
            chaos_step(a, ra)
            chaos_step(b, rb)
        core.step(a.state, a.params, 0.05, adaptive=True)
        core.step(b.state, b.params, 0.05, adaptive=True)
        assert digest(a) == digest(b), f"diverged at step {i}"
    assert a.state.done > 0


def test_other_seed_gives_other_run() -> None:
    a, b = make(seed=1), make(seed=2)
    core.run_until(a.state, a.params, 30.0)
    core.run_until(b.state, b.params, 30.0)
    assert digest(a) != digest(b)


def _run_until_decoding(twin: Twin, inst: int) -> None:
    r = twin.state.req
    for _ in range(5000):
        core.step(twin.state, twin.params, 0.05, adaptive=True)
        if np.count_nonzero((r.phase == core.DECODE) & (r.d_inst == inst)) >= 3:
            return
    raise AssertionError("instance never got decode work")


def test_failing_a_decode_chip_sends_its_requests_back_to_prefill() -> None:
    twin = make()
    s, p, r = twin.state, twin.params, twin.state.req
    inst = int(np.flatnonzero(p.inst_role == core.ROLE_DECODE)[0])
    _run_until_decoding(twin, inst)
    victims = np.flatnonzero((r.phase == core.DECODE) & (r.d_inst == inst))
    retries0 = s.retries
    down = core.fail_chips(s, p, np.array([p.inst_chip_start[inst]]))
    assert down.tolist() == [inst]
    assert not s.inst_up[inst]
    assert s.retries == retries0 + victims.size
    assert (r.retries[victims] == 1).all()
    assert (r.phase[victims] <= core.PREFILL).all()
    assert (r.decoded[victims] == 0).all() and (r.kv_res[victims] == 0).all()
    assert not ((r.phase != core.FREE) & (r.d_inst == inst)).any()
    check_invariants(twin)
    # the failed chip draws nothing; its instance's other chips still idle
    chips = slice(p.inst_chip_start[inst], p.inst_chip_start[inst] + p.inst_n_chips[inst])
    assert s.inst_up_idle_w[inst] == pytest.approx(
        p.chip_idle_w[chips].sum() - p.chip_idle_w[chips][0]
    )
    up = core.recover_chips(s, p, np.array([p.inst_chip_start[inst]]))
    assert up.tolist() == [inst] and s.inst_up[inst]


def test_failing_a_prefill_instance_requeues_its_work() -> None:
    twin = make()
    s, p, r = twin.state, twin.params, twin.state.req
    pre = np.flatnonzero(p.inst_role == core.ROLE_PREFILL)
    for _ in range(2000):
        core.step(s, p, 0.02, adaptive=True)
        if np.count_nonzero((r.phase <= core.PREFILL) & (r.phase >= 0) & (r.p_inst == pre[0])) >= 2:
            break
    queued = np.flatnonzero((r.phase <= core.PREFILL) & (r.phase >= 0) & (r.p_inst == pre[0]))
    assert queued.size >= 2
    core.fail_chips(s, p, np.array([p.inst_chip_start[pre[0]]]))
    # re-routed to another prefill instance, work restarted, not a retry
    assert (r.p_inst[queued] != pre[0]).all()
    assert (r.retries[queued] == 0).all()
    check_invariants(twin)


def test_retry_budget_spent_is_a_counted_rejection() -> None:
    twin = make(max_retries=0)
    s, p, r = twin.state, twin.params, twin.state.req
    inst = int(np.flatnonzero(p.inst_role == core.ROLE_DECODE)[0])
    _run_until_decoding(twin, inst)
    n = np.count_nonzero((r.phase >= core.KV_TRANSFER) & (r.d_inst == inst) & (r.kv_res > 0))
    core.fail_chips(s, p, np.array([p.inst_chip_start[inst]]))
    assert s.rejected[core.REJECT_RETRY_BUDGET] >= n > 0
    check_invariants(twin)


def test_no_capacity_anywhere_rejects_with_a_reason() -> None:
    twin = make()
    s, p = twin.state, twin.params
    pre_chips = np.flatnonzero(p.inst_role[p.chip_inst] != core.ROLE_DECODE)
    core.fail_chips(s, p, pre_chips)
    core.run_until(s, p, 20.0)
    assert s.rejected[core.REJECT_NO_CAPACITY] > 0
    assert s.arrived > 0
    check_invariants(twin)


def test_drained_instance_takes_no_new_work_and_empties() -> None:
    twin = make()
    s, p, r = twin.state, twin.params, twin.state.req
    dec = np.flatnonzero(p.inst_role == core.ROLE_DECODE)
    inst = int(dec[0])
    _run_until_decoding(twin, inst)
    seq_at_drain = s.next_seq
    core.drain_chips(s, p, np.array([p.inst_chip_start[inst]]))
    assert s.inst_draining[inst] and s.inst_up[inst]
    core.run_until(s, p, s.t + 120.0)
    live = r.phase != core.FREE
    late = live & (r.seq >= seq_at_drain)
    assert not (late & (r.d_inst == inst)).any()
    assert not (live & (r.d_inst == inst) & (r.phase == core.DECODE)).any(), "drain did not finish"
    assert s.inst_done[inst] > 0
    core.recover_chips(s, p, np.array([p.inst_chip_start[inst]]))
    assert not s.inst_draining[inst]


def test_degraded_link_slows_the_kv_handoff() -> None:
    tpot, moving = [], []
    for factor in (1.0, 0.002):
        twin = make(seed=4)
        for link in range(twin.params.n_links):
            core.set_link_factor(twin.state, link, factor)
        samples = []
        while twin.state.t < 60.0:
            core.step(twin.state, twin.params, 0.05, adaptive=True)
            samples.append(metrics.link_activity(twin.state, twin.params)[0].sum())
            check_invariants(twin)
        tpot.append(metrics.latency(twin.state, twin.params)["tpot_p50_s"])
        moving.append(np.mean(samples))
    # the same bytes take 500x longer: more transfers in flight at once, and a slower second token
    assert moving[1] > 5 * moving[0]
    assert tpot[1] > tpot[0] * 1.1
    with pytest.raises(ValueError, match="factor"):
        core.set_link_factor(make().state, 0, 1.5)


def test_arrival_rate_change_takes_effect() -> None:
    twin = make(rate=1.0)
    core.run_until(twin.state, twin.params, 100.0)
    slow = twin.state.arrived
    core.set_rate(twin.state, 10.0)
    core.run_until(twin.state, twin.params, 200.0)
    fast = twin.state.arrived - slow
    assert 50 < slow < 160 and 800 < fast < 1200


@pytest.mark.parametrize("policy", core.POLICIES)
def test_every_policy_spreads_load_and_conserves(policy: str) -> None:
    twin = make("all-vendors", seed=2, rate=600.0)  # more than any one prefill tier can take
    core.set_policy(twin.state, twin.params, policy)
    core.run_until(twin.state, twin.params, 8.0)
    check_invariants(twin)
    assert twin.state.done > 0
    p = twin.params
    used = np.bincount(p.inst_tier, weights=twin.state.inst_prefill_tokens, minlength=p.n_tiers)
    prefill_tiers = np.flatnonzero(p.tier_role == core.ROLE_PREFILL)
    assert (used[prefill_tiers] > 0).sum() >= 2, "all prefill went to one tier"


def test_power_aware_prefers_the_efficient_tier_at_low_load() -> None:
    twin = make("all-vendors", seed=2, rate=5.0)
    p = twin.params
    core.set_policy(twin.state, p, "power_aware")
    core.run_until(twin.state, p, 30.0)
    used = np.bincount(p.inst_tier, weights=twin.state.inst_prefill_tokens, minlength=p.n_tiers)
    watts = np.bincount(p.chip_inst, weights=p.chip_peak_w, minlength=p.n_inst)
    j_per_token = watts / core._nominal_prefill_rate(p)
    prefill = np.flatnonzero(p.inst_role == core.ROLE_PREFILL)
    best_tier = p.inst_tier[prefill[np.argmin(j_per_token[prefill])]]
    assert used[best_tier] == used.max() > 0


def test_weighted_routing_follows_operator_shares() -> None:
    twin = make("all-vendors", seed=2)
    p = twin.params
    weights = np.zeros(p.n_tiers)
    target = int(np.flatnonzero(p.tier_role == core.ROLE_PREFILL)[0])
    weights[target] = 1.0
    weights[p.tier_role == core.ROLE_DECODE] = 1.0
    core.set_policy(twin.state, p, "weighted", weights)
    core.run_until(twin.state, p, 30.0)
    used = np.bincount(p.inst_tier, weights=twin.state.inst_prefill_tokens, minlength=p.n_tiers)
    prefill = p.tier_role == core.ROLE_PREFILL
    assert used[target] > 0 and used[prefill].sum() == used[target]
    with pytest.raises(ValueError, match="policy"):
        core.set_policy(twin.state, p, "fastest")


def test_idle_fleet_draws_idle_power() -> None:
    twin = make(rate=1e-9)
    s, p = twin.state, twin.params
    core.run_until(s, p, 10.0)
    assert s.inst_power_w.sum() == pytest.approx(p.chip_idle_w.sum())
    core.fail_chips(s, p, np.arange(p.n_chips))
    core.step(s, p, 1.0)
    assert s.inst_power_w.sum() == 0.0


def test_loaded_fleet_draws_more_than_idle_and_at_most_peak() -> None:
    twin = make("all-vendors")
    core.run_until(twin.state, twin.params, 60.0)
    p = twin.params
    power = twin.state.inst_energy_j.sum() / 60.0
    assert p.chip_idle_w.sum() < power <= p.chip_peak_w.sum()
