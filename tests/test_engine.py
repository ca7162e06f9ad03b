"""The live engine on a shipped fleet, paced by a VirtualClock (no test ever sleeps)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
import pytest

from twin import core, telemetry
from twin.build import Twin, new_twin
from twin.catalog import Catalog, load_catalog
from twin.chaos import scenarios_dir
from twin.chaos_live import install_scenarios, scenarios_for
from twin.engine import READ_ONLY_ERROR, Engine, ScenarioOutcome, VirtualClock
from twin.fleet import Fleet, Slo, load_fleet, resolve_fleet_path

FLEET = "nvidia-groq"
M = TypeVar("M", bound=telemetry.Message)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="module")
def fleet(catalog: Catalog) -> Fleet:
    return load_fleet(resolve_fleet_path(FLEET), catalog)


@pytest.fixture
def make(fleet: Fleet, catalog: Catalog) -> Callable[..., tuple[Engine, VirtualClock]]:
    def _make(
        *, seed: int = 7, fleet_: Fleet | None = None, **kw: Any
    ) -> tuple[Engine, VirtualClock]:
        clock = VirtualClock()
        twin = new_twin(fleet_ or fleet, catalog, seed=seed)
        kw.setdefault("wall_ms", lambda: int(clock.now() * 1000))
        return Engine(twin, clock=clock, catalog=catalog, **kw), clock

    return _make


def of(msgs: list[telemetry.Message], kind: type[M]) -> list[M]:
    return [m for m in msgs if isinstance(m, kind)]


def last_chips(msgs: list[telemetry.Message], tier: str) -> telemetry.Chips:
    return [m for m in of(msgs, telemetry.Chips) if m.tier == tier][-1]


def last_tier(msgs: list[telemetry.Message], tier: str) -> telemetry.Tier:
    return [m for m in of(msgs, telemetry.Tier) if m.tier == tier][-1]


def conserved(s: telemetry.Summary) -> bool:
    return s.arrived == s.done + s.rejected + s.in_flight


def fingerprint(e: Engine) -> Any:
    """Everything a command could change, plus a full snapshot (ts_ms aside)."""
    st = e.twin.state
    snap = [msgspec.structs.replace(m, ts_ms=0) for m in e.snapshot_now()]
    return (
        st.chip_status.tolist(),
        st.link_factor.tolist(),
        st.workload.rate_per_s,
        st.workload.burst_extra,
        st.policy,
        st.tier_weight.tolist(),
        e.speed,
        e.paused,
        st.t,
        st.arrived,
        snap,
    )


# ------------------------------------------------------------------------------------------------
# pacing


async def test_speed_1_tracks_the_clock(make: Callable[..., tuple[Engine, VirtualClock]]) -> None:
    e, clock = make(speed=1.0)
    sub = e.subscribe(10_000)
    await e.run_for(10.0)
    assert e.sim_time_s == pytest.approx(10.0)
    assert clock.now() == pytest.approx(10.0, abs=0.11)
    summaries = of(sub.drain(), telemetry.Summary)
    assert summaries
    for s in summaries:
        assert 0.0 <= s.lag_s < 0.1
        assert abs(s.sim_time_s - s.ts_ms / 1000) < 0.1 + 1e-6  # sim time = clock time
        assert s.speed == 1.0 and not s.paused
        assert conserved(s)
    assert summaries[-1].arrived > 100
    assert summaries[-1].tokens_per_s > 0
    core.check_conservation(e.twin.state)


async def test_speed_10(make: Callable[..., tuple[Engine, VirtualClock]]) -> None:
    e, clock = make(speed=10.0)
    sub = e.subscribe(10_000)
    await e.run_for(20.0)
    assert e.sim_time_s == pytest.approx(20.0)
    assert clock.now() == pytest.approx(2.0, abs=0.11)
    summaries = of(sub.drain(), telemetry.Summary)
    for s in summaries:
        assert abs(s.sim_time_s - 10 * s.ts_ms / 1000) < 10 * 0.1 + 1e-6
        assert s.lag_s < 10 * 0.1
    assert len(summaries) == pytest.approx(2.0 * 5 + 1, abs=1)  # 5 Hz of clock time


async def test_speed_0_runs_as_fast_as_possible(
    make: Callable[..., tuple[Engine, VirtualClock]],
) -> None:
    e, clock = make(speed=0.0)
    sub = e.subscribe(10_000)
    await e.run_for(30.0)
    assert e.sim_time_s == pytest.approx(30.0)
    assert clock.now() == 0.0  # never waited
    summaries = of(sub.drain(), telemetry.Summary)
    # snapshots by simulated time: 5 Hz of sim time, at exact multiples of 0.2 s
    assert len(summaries) == 30 * 5 + 1
    for i, s in enumerate(summaries):
        assert s.sim_time_s == pytest.approx(0.2 * i)
        assert s.lag_s == 0.0 and s.speed == 0.0


async def test_schedule_holds_across_short_runs(
    make: Callable[..., tuple[Engine, VirtualClock]],
) -> None:
    """A chaos runner advancing in slices gets the same snapshot rate as one long run."""
    for speed in (0.0, 1.0):
        e, _ = make(speed=speed)
        sub = e.subscribe(100_000)
        for _ in range(100):
            await e.run_for(0.05)
        assert e.sim_time_s == pytest.approx(5.0)
        assert len(of(sub.drain(), telemetry.Summary)) == pytest.approx(5 * 5 + 1, abs=1)


async def test_set_speed_while_running(make: Callable[..., tuple[Engine, VirtualClock]]) -> None:
    e, clock = make(speed=1.0)
    await e.run_for(1.0)
    reply = await e.command(telemetry.SetSpeed(speed=0, id="s"))
    assert reply.ok and "as fast as possible" in reply.detail
    t_clock = clock.now()
    await e.run_for(20.0)
    assert clock.now() == t_clock
    reply = await e.command(telemetry.SetSpeed(speed=4))
    assert reply.ok
    await e.run_for(4.0)
    assert clock.now() == pytest.approx(t_clock + 1.0, abs=0.11)


async def test_pause_stops_sim_time(make: Callable[..., tuple[Engine, VirtualClock]]) -> None:
    e, clock = make(speed=1.0)
    await e.run_for(2.0)
    sub = e.subscribe(10_000)
    reply = await e.command(telemetry.Pause(id="p"))
    assert reply.ok and reply.id == "p"
    t_sim, t_clock = e.sim_time_s, clock.now()
    task = asyncio.create_task(e.run())
    summaries: list[telemetry.Summary] = []
    while len(summaries) < 10:
        msg = await sub.get()
        if isinstance(msg, telemetry.Summary):
            summaries.append(msg)
    assert clock.now() - t_clock >= 1.8  # summaries keep coming by clock time...
    assert all(s.paused and s.sim_time_s == t_sim for s in summaries)  # ...but time stands still
    assert all(s.lag_s == 0.0 for s in summaries)
    # resume while running: the command is queued and applied at the next tick
    reply = await e.command(telemetry.Resume(id="r"))
    assert reply.ok and reply.sim_time_s == t_sim
    t_resume = clock.now()
    seen: list[telemetry.Message] = []
    while e.sim_time_s < t_sim + 1.0:
        seen.append(await sub.get())
    e.stop()
    await task
    assert e.sim_time_s - t_sim == pytest.approx(clock.now() - t_resume, abs=0.11)
    events = [m.event for m in of(seen + sub.drain(), telemetry.Event)]
    assert events == ["resumed"]


async def test_stop_ends_run(make: Callable[..., tuple[Engine, VirtualClock]]) -> None:
    e, _ = make(speed=1.0)
    task = asyncio.create_task(e.run())
    for _ in range(5):
        await asyncio.sleep(0)
    assert e.running
    e.stop()
    await asyncio.wait_for(task, 1.0)
    assert not e.running


async def test_snapshot_rates_match_the_configured_hz(
    make: Callable[..., tuple[Engine, VirtualClock]],
) -> None:
    e, _ = make(speed=1.0, summary_hz=10, tier_hz=4, chip_hz=1)
    n_tiers = len(e.meta.tiers)
    sub = e.subscribe(100_000)
    await e.run_for(20.0)
    msgs = sub.drain()
    assert len(of(msgs, telemetry.Summary)) == pytest.approx(20 * 10 + 1, abs=1)
    assert len(of(msgs, telemetry.Tier)) == pytest.approx((20 * 4 + 1) * n_tiers, abs=n_tiers)
    assert len(of(msgs, telemetry.Chips)) == pytest.approx((20 * 1 + 1) * n_tiers, abs=n_tiers)
    # each tier and chips message names a tier of the fleet, and every tier is covered
    tiers = {t.name for t in e.meta.tiers}
    assert {m.tier for m in of(msgs, telemetry.Tier)} == tiers
    assert {m.tier for m in of(msgs, telemetry.Chips)} == tiers

    e0, _ = make(speed=0.0, summary_hz=4, tier_hz=2, chip_hz=1)
    sub0 = e0.subscribe(100_000)
    await e0.run_for(20.0)
    msgs = sub0.drain()
    assert len(of(msgs, telemetry.Summary)) == 20 * 4 + 1
    assert len(of(msgs, telemetry.Tier)) == (20 * 2 + 1) * n_tiers
    assert len(of(msgs, telemetry.Chips)) == (20 * 1 + 1) * n_tiers


# ------------------------------------------------------------------------------------------------
# commands


async def test_fail_an_instance(make: Callable[..., tuple[Engine, VirtualClock]]) -> None:
    e, _ = make(speed=0.0)
    sub = e.subscribe(100_000)
    await e.run_for(10.0)
    before = last_tier(sub.drain(), "groq-decode")
    assert before.instances_up == 2
    reply = await e.command(telemetry.Fail(target="groq-decode/0", id="f1"))
    assert reply.ok and reply.id == "f1" and not reply.error
    assert "groq-decode/0" in reply.detail
    (event,) = of(sub.drain(), telemetry.Event)
    assert (event.event, event.target, event.severity) == ("chip_failed", "groq-decode/0", "error")
    await e.run_for(1.0)
    msgs = sub.drain()
    chips = last_chips(msgs, "groq-decode")
    for cid, state, util, power in zip(
        chips.ids, chips.state, chips.utilisation, chips.power_w, strict=True
    ):
        if cid.startswith("groq-decode/0/"):
            assert (state, util, power) == ("failed", 0.0, 0.0)
        else:
            assert state == "up" and power > 0
    assert sum(s == "failed" for s in chips.state) == 576
    tier = last_tier(msgs, "groq-decode")
    assert tier.instances_up == 1
    for s in of(msgs, telemetry.Summary):
        assert conserved(s)
    assert of(msgs, telemetry.Summary)[-1].retries > 0
    core.check_conservation(e.twin.state)

    # recover: back up
    reply = await e.command(telemetry.Recover(target="groq-decode/0"))
    assert reply.ok
    await e.run_for(1.0)
    msgs = sub.drain()
    assert "chip_recovered" in [m.event for m in of(msgs, telemetry.Event)]
    assert set(last_chips(msgs, "groq-decode").state) == {"up"}
    assert last_tier(msgs, "groq-decode").instances_up == 2


async def test_fail_and_drain_single_chips(
    make: Callable[..., tuple[Engine, VirtualClock]],
) -> None:
    e, _ = make(speed=0.0)
    sub = e.subscribe(100_000)
    await e.run_for(2.0)
    assert (await e.command(telemetry.Fail(target="h100-prefill/1/3"))).ok
    assert (await e.command(telemetry.Drain(target="b200-prefill/0/0"))).ok
    await e.run_for(1.0)
    msgs = sub.drain()
    h100 = last_chips(msgs, "h100-prefill")
    failed = [cid for cid, s in zip(h100.ids, h100.state, strict=True) if s == "failed"]
    assert failed == ["h100-prefill/1/3"]
    assert h100.instance == [0] * 8 + [1] * 8
    assert last_tier(msgs, "h100-prefill").instances_up == 1
    b200 = last_chips(msgs, "b200-prefill")
    assert b200.state[0] == "draining" and set(b200.state[1:]) == {"up"}
    tier = last_tier(msgs, "b200-prefill")
    assert (tier.instances_up, tier.instances_draining) == (1, 1)
    events = [m.event for m in of(msgs, telemetry.Event)]
    assert events[:2] == ["chip_failed", "chip_draining"]


async def test_link_commands(make: Callable[..., tuple[Engine, VirtualClock]]) -> None:
    e, _ = make(speed=0.0)
    sub = e.subscribe(100_000)
    link = "h100-prefill->groq-decode"
    reply = await e.command(telemetry.DegradeLink(link=link, factor=0.25))
    assert reply.ok and "0.25" in reply.detail
    await e.run_for(1.0)
    msgs = sub.drain()
    stats = {ls.name: ls for ls in of(msgs, telemetry.Summary)[-1].links}
    assert stats[link].factor == 0.25
    assert stats["b200-prefill->groq-decode"].factor == 1.0
    assert "link_degraded" in [m.event for m in of(msgs, telemetry.Event)]
    assert (await e.command(telemetry.RestoreLink(link=link))).ok
    await e.run_for(0.5)
    msgs = sub.drain()
    assert {ls.factor for ls in of(msgs, telemetry.Summary)[-1].links} == {1.0}
    assert "link_restored" in [m.event for m in of(msgs, telemetry.Event)]


async def test_rate_and_burst(make: Callable[..., tuple[Engine, VirtualClock]]) -> None:
    e, _ = make(speed=0.0)
    sub = e.subscribe(100_000)
    await e.run_for(5.0)
    assert of(sub.drain(), telemetry.Summary)[-1].rate_per_s == e.twin.fleet.workload.rate_per_s
    assert (await e.command(telemetry.SetRate(rate_per_s=50.0))).ok
    await e.run_for(5.0)
    msgs = sub.drain()
    last = of(msgs, telemetry.Summary)[-1]
    assert last.rate_per_s == 50.0
    assert 25.0 < last.arrivals_per_s < 90.0
    assert "rate_changed" in [m.event for m in of(msgs, telemetry.Event)]

    reply = await e.command(telemetry.Burst(factor=3.0, duration_s=4.0))
    assert reply.ok
    await e.run_for(3.0)
    assert of(sub.drain(), telemetry.Summary)[-1].rate_per_s == 150.0
    await e.run_for(2.0)
    msgs = sub.drain()
    assert of(msgs, telemetry.Summary)[-1].rate_per_s == 50.0
    over = [m for m in of(msgs, telemetry.Event) if m.event == "rate_changed"]
    assert over and "burst over" in over[0].detail

    assert (await e.command(telemetry.SetRate(rate_per_s=0.0))).ok
    n = e.twin.state.arrived
    await e.run_for(3.0)
    assert e.twin.state.arrived == n
    assert of(sub.drain(), telemetry.Summary)[-1].arrivals_per_s == 0.0


async def test_set_routing(make: Callable[..., tuple[Engine, VirtualClock]]) -> None:
    e, _ = make(speed=0.0)
    sub = e.subscribe(100_000)
    await e.run_for(3.0)
    reply = await e.command(
        telemetry.SetRouting(policy="weighted", weights={"h100-prefill": 0.0, "b200-prefill": 1.0})
    )
    assert reply.ok and "weighted" in reply.detail
    await e.run_for(5.0)
    msgs = sub.drain()
    assert of(msgs, telemetry.Summary)[-1].policy == "weighted"
    assert last_tier(msgs, "h100-prefill").prefill_tokens_per_s == 0.0
    assert last_tier(msgs, "b200-prefill").prefill_tokens_per_s > 0.0
    (event,) = [m for m in of(msgs, telemetry.Event) if m.event == "routing_changed"]
    assert "least_loaded -> weighted" in event.detail
    # weights not named keep their value
    assert (await e.command(telemetry.SetRouting(policy="round_robin"))).ok
    assert e.twin.state.tier_weight.tolist()[:2] == [0.0, 1.0]


@pytest.mark.parametrize(
    ("cmd", "error_start", "names"),
    [
        (telemetry.Fail(target="groq-decode/0/9999"), "target: ", "groq-decode/0/9999"),
        (telemetry.Fail(target="groq-decode/2"), "target: ", "groq-decode/2"),
        (telemetry.Recover(target="nope"), "target: ", "nope"),
        (telemetry.Drain(target="h100-prefill/0/x"), "target: ", "h100-prefill/0/x"),
        (telemetry.DegradeLink(link="h100-prefill->groq-decode", factor=1.5), "factor: ", "1.5"),
        (telemetry.DegradeLink(link="a->b", factor=0.5), "link: ", "a->b"),
        (telemetry.RestoreLink(link="groq-decode->h100-prefill"), "link: ", "groq-decode"),
        (telemetry.SetRouting(policy="random"), "policy: ", "random"),
        (
            telemetry.SetRouting(policy="weighted", weights={"b200-prefill": 1.0, "tpu": 2.0}),
            "weights.tpu: ",
            "unknown tier",
        ),
        (telemetry.SetRate(rate_per_s=-1.0), "rate_per_s: ", "-1"),
        (telemetry.SetRate(rate_per_s=math.nan), "rate_per_s: ", "nan"),
        (telemetry.Burst(factor=0.5, duration_s=1.0), "factor: ", "0.5"),
        (telemetry.Burst(factor=2.0, duration_s=-1.0), "duration_s: ", "-1"),
        (telemetry.SetSpeed(speed=-1.0), "speed: ", "-1"),
    ],
)
async def test_bad_command_changes_nothing(
    make: Callable[..., tuple[Engine, VirtualClock]],
    cmd: telemetry.Command,
    error_start: str,
    names: str,
) -> None:
    e, _ = make(speed=0.0)
    await e.run_for(2.0)
    sub = e.subscribe()
    before = fingerprint(e)
    reply = await e.command(msgspec.structs.replace(cmd, id="bad-1"))
    assert not reply.ok and reply.id == "bad-1" and reply.detail == ""
    assert reply.error.startswith(error_start), reply.error
    assert names in reply.error
    assert "\n" not in reply.error
    assert fingerprint(e) == before
    (event,) = sub.drain()
    assert isinstance(event, telemetry.Event)
    assert event.event == "command_rejected" and event.detail == reply.error


async def test_read_only_refuses_every_command(
    make: Callable[..., tuple[Engine, VirtualClock]],
) -> None:
    e, _ = make(speed=0.0, read_only=True)
    await e.run_for(1.0)
    before = fingerprint(e)
    commands: list[telemetry.Command] = [
        telemetry.Fail(target="groq-decode/0"),
        telemetry.Recover(target="groq-decode/0"),
        telemetry.Drain(target="groq-decode/0"),
        telemetry.DegradeLink(link="h100-prefill->groq-decode", factor=0.5),
        telemetry.RestoreLink(link="h100-prefill->groq-decode"),
        telemetry.SetRate(rate_per_s=1.0),
        telemetry.Burst(factor=2.0, duration_s=1.0),
        telemetry.SetRouting(policy="round_robin"),
        telemetry.Pause(),
        telemetry.Resume(),
        telemetry.SetSpeed(speed=2.0),
        telemetry.RunScenario(name="nvidia-groq-lose-prefill"),
        telemetry.StopScenario(),
    ]
    install_scenarios(e)
    assert e.meta.scenarios == ["nvidia-groq-lose-prefill"]
    for cmd in commands:
        reply = await e.command(cmd)
        assert not reply.ok and reply.error == READ_ONLY_ERROR
    reply = await e.handle_payload(b'{"cmd":"pause","id":"x"}')
    assert (reply.ok, reply.error, reply.id) == (False, READ_ONLY_ERROR, "x")
    reply = await e.handle_payload(b"garbage")
    assert (reply.ok, reply.error) == (False, READ_ONLY_ERROR)
    assert fingerprint(e) == before


async def test_handle_payload(make: Callable[..., tuple[Engine, VirtualClock]]) -> None:
    e, _ = make(speed=0.0)
    reply = await e.handle_payload(b'{"cmd":"set_rate","rate_per_s":7,"id":"q1"}')
    assert reply.ok and reply.id == "q1"
    assert e.twin.state.workload.rate_per_s == 7.0
    reply = await e.handle_payload(b'{"cmd":"degrade_link","id":"q2","link":"x","factor":2}')
    assert not reply.ok and reply.id == "q2" and reply.error.startswith("factor: ")
    reply = await e.handle_payload(b'{"cmd":"teleport","id":"q3"}')
    assert not reply.ok and reply.id == "q3" and reply.error.startswith("cmd: ")
    reply = await e.handle_payload(b"\xff\xfe")
    assert not reply.ok and reply.id == "" and reply.error.startswith("payload: ")


async def test_commands_apply_in_arrival_order_between_ticks(
    make: Callable[..., tuple[Engine, VirtualClock]],
) -> None:
    e, _ = make(speed=1.0)
    sub = e.subscribe(100_000)
    task = asyncio.create_task(e.run())
    await asyncio.sleep(0)
    replies = await asyncio.gather(
        e.command(telemetry.SetRate(rate_per_s=5.0, id="a")),
        e.command(telemetry.SetRate(rate_per_s=6.0, id="b")),
        e.command(telemetry.Fail(target="nope", id="c")),
        e.command(telemetry.SetRate(rate_per_s=7.0, id="d")),
    )
    e.stop()
    await task
    assert [r.id for r in replies] == ["a", "b", "c", "d"]
    assert [r.ok for r in replies] == [True, True, False, True]
    assert len({r.sim_time_s for r in replies}) == 1  # same tick
    assert e.twin.state.workload.rate_per_s == 7.0
    events = of(sub.drain(), telemetry.Event)
    assert [m.event for m in events] == [
        "rate_changed",
        "rate_changed",
        "command_rejected",
        "rate_changed",
    ]


async def test_trace_workload_has_no_rate_to_set(
    make: Callable[..., tuple[Engine, VirtualClock]], fleet: Fleet, tmp_path: Any
) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("timestamp_s,input_tokens,output_tokens\n0.0,100,10\n0.5,200,20\n")
    wl = msgspec.structs.replace(fleet.workload, arrivals="trace", trace=str(trace))
    e, _ = make(speed=0.0, fleet_=msgspec.structs.replace(fleet, workload=wl))
    before = fingerprint(e)
    for cmd in (telemetry.SetRate(rate_per_s=3.0), telemetry.Burst(factor=2, duration_s=1)):
        reply = await e.command(cmd)
        assert not reply.ok and "trace" in reply.error
    assert fingerprint(e) == before
    s = e.snapshot_now()[0]
    assert isinstance(s, telemetry.Summary) and s.rate_per_s == telemetry.NO_DATA


# ------------------------------------------------------------------------------------------------
# subscribers, SLO events, determinism, meta


async def test_slow_subscriber_drops_oldest(
    make: Callable[..., tuple[Engine, VirtualClock]],
) -> None:
    e, _ = make(speed=0.0)
    slow = e.subscribe(maxsize=4)
    fast = e.subscribe(maxsize=100_000)
    await e.run_for(10.0)
    assert e.sim_time_s == pytest.approx(10.0)  # the sim kept advancing
    assert fast.dropped == 0
    everything = fast.drain()
    assert slow.dropped == len(everything) - 4
    assert slow.drain() == everything[-4:]  # the newest survive
    summaries = of(everything, telemetry.Summary)
    assert summaries[-1].dropped_snapshots > 0
    assert summaries[-1].dropped_snapshots <= slow.dropped
    slow.close()
    await e.run_for(0.2)
    assert of(fast.drain(), telemetry.Summary)[-1].dropped_snapshots == 0  # closed: forgotten


async def test_subscription_iterates_until_closed(
    make: Callable[..., tuple[Engine, VirtualClock]],
) -> None:
    e, _ = make(speed=0.0)
    sub = e.subscribe()
    await e.run_for(0.2)
    sub.close()
    got = [msg async for msg in sub]
    assert got and isinstance(got[0], telemetry.Summary)
    await e.run_for(0.2)
    assert len(sub) == 0


async def test_slo_breach_and_recovery_events(
    make: Callable[..., tuple[Engine, VirtualClock]], fleet: Fleet
) -> None:
    tight = msgspec.structs.replace(fleet, slo=Slo(ttft_s=0.05, tpot_s=1.0))
    e, _ = make(speed=0.0, fleet_=tight)
    sub = e.subscribe(100_000)
    await e.run_for(10.0)
    events = of(sub.drain(), telemetry.Event)
    breach = [m for m in events if m.event == "slo_breach"]
    assert breach and breach[0].target == "ttft" and breach[0].severity == "warning"
    # light load: short queues, p99 TTFT falls back under the SLO once the window has passed
    assert (await e.command(telemetry.SetRate(rate_per_s=0.5))).ok
    await e.run_for(30.0)
    events = of(sub.drain(), telemetry.Event)
    assert "slo_recovered" in [m.event for m in events]


async def test_same_seed_same_commands_same_summaries(
    make: Callable[..., tuple[Engine, VirtualClock]],
) -> None:
    async def script(e: Engine) -> list[telemetry.Message]:
        sub = e.subscribe(100_000)
        await e.run_for(3.0)
        await e.command(telemetry.Fail(target="h100-prefill/0"))
        await e.run_for(2.0)
        await e.command(telemetry.SetRate(rate_per_s=35.0))
        await e.command(telemetry.DegradeLink(link="b200-prefill->groq-decode", factor=0.1))
        await e.run_for(3.0)
        return [msgspec.structs.replace(m, ts_ms=0) for m in sub.drain()]

    a = await script(make(seed=11, speed=1.0)[0])
    b = await script(make(seed=11, speed=1.0)[0])
    assert of(a, telemetry.Summary) == of(b, telemetry.Summary)
    assert a == b
    c = await script(make(seed=12, speed=1.0)[0])
    assert of(a, telemetry.Summary) != of(c, telemetry.Summary)


async def test_snapshot_now_and_no_nan(make: Callable[..., tuple[Engine, VirtualClock]]) -> None:
    e, _ = make(speed=0.0)
    first = e.snapshot_now()  # before anything finished: no data is -1, never NaN
    s = first[0]
    assert isinstance(s, telemetry.Summary)
    assert s.ttft_p99_s == telemetry.NO_DATA and s.goodput_fraction == telemetry.NO_DATA
    await e.run_for(5.0)
    msgs = e.snapshot_now()
    n_tiers = len(e.meta.tiers)
    assert len(msgs) == 1 + 2 * n_tiers
    for m in first + msgs:
        data = telemetry.encode(m)
        assert b"NaN" not in data and b"null" not in data and b"Infinity" not in data
        assert telemetry.decode_message(data) == m
    assert isinstance(msgs[0], telemetry.Summary) and msgs[0].ttft_p99_s > 0


@pytest.mark.parametrize("name", ["all-vendors", "tenstorrent-galaxy", "nvidia-lpx"])
async def test_shipped_fleets_run_live(name: str, catalog: Catalog) -> None:
    twin = new_twin(load_fleet(resolve_fleet_path(name), catalog), catalog, seed=1)
    e = Engine(twin, speed=0.0, clock=VirtualClock(), catalog=catalog)
    sub = e.subscribe(100_000)
    await e.run_for(3.0)
    msgs = sub.drain() + e.snapshot_now()
    assert len(of(msgs, telemetry.Summary)) == 3 * 5 + 2
    for m in msgs:
        data = telemetry.encode(m)
        assert b"null" not in data
        assert telemetry.decode_message(data) == m
        if isinstance(m, telemetry.Summary):
            assert conserved(m)
    assert of(msgs, telemetry.Summary)[-1].arrived > 0
    chips = of(msgs, telemetry.Chips)
    assert sum(len(c.ids) for c in chips[-len(e.meta.tiers) :]) == twin.params.n_chips


async def test_stop_before_the_run_starts(
    make: Callable[..., tuple[Engine, VirtualClock]],
) -> None:
    e, _ = make(speed=1.0)
    task = asyncio.create_task(e.run())
    e.stop()
    await asyncio.wait_for(task, 1.0)
    await e.run_for(0.5)  # the stop was used up by that run
    assert e.sim_time_s == pytest.approx(0.5)


def test_meta_describes_the_fleet(make: Callable[..., tuple[Engine, VirtualClock]]) -> None:
    e, _ = make(run_id="run-1")
    meta = e.meta
    assert (meta.fleet, meta.run_id, meta.model) == (FLEET, "run-1", "llama-3.1-70b")
    assert (meta.slo_ttft_s, meta.slo_tpot_s) == (2.0, 0.05)
    assert [t.name for t in meta.tiers] == ["h100-prefill", "b200-prefill", "groq-decode"]
    groq = meta.tiers[2]
    assert (groq.role, groq.vendor, groq.instances, groq.chips) == ("decode", "Groq", 2, 1152)
    assert groq.figures["fp8_tflops"].provenance == "estimate"
    assert groq.estimated
    for t in meta.tiers:
        assert t.figures
        assert {f.provenance for f in t.figures.values()} <= {
            "published",
            "derived",
            "estimate",
            "fitted",
        }
        assert t.estimated == any(f.provenance == "estimate" for f in t.figures.values())
    assert [ln.name for ln in meta.links] == [
        "h100-prefill->groq-decode",
        "b200-prefill->groq-decode",
    ]
    assert meta.links[0].bandwidth_gbps == 800.0
    assert meta.units["_w"] == "W"
    status = e.status("offline")
    assert (status.state, status.run_id, status.schema) == ("offline", "run-1", 1)
    assert telemetry.decode_message(telemetry.encode(meta)) == meta


def test_composite_tier_meta_counts_host_chips(catalog: Catalog) -> None:
    fleet = load_fleet(resolve_fleet_path("nvidia-lpx"), catalog)
    twin: Twin = new_twin(fleet, catalog, seed=0)
    e = Engine(twin, clock=VirtualClock(), catalog=catalog)
    (tier,) = [t for t in e.meta.tiers if t.host_system]
    spec = fleet.tier(tier.name)
    assert spec.kv_host is not None
    assert tier.chips == spec.instances * (spec.chips_per_instance + spec.kv_host.chips)
    assert any(k.startswith("kv_host.") for k in tier.figures)
    chips = [m for m in e.snapshot_now() if isinstance(m, telemetry.Chips) and m.tier == tier.name]
    assert len(chips[0].ids) == tier.chips
    n = spec.chips_per_instance + spec.kv_host.chips
    assert chips[0].ids[n - 1] == f"{tier.name}/0/{n - 1}"  # kv-host chips after the own ones
    assert np.array_equal(chips[0].instance, np.repeat(np.arange(spec.instances), n))


# ------------------------------------------------------------------------------------------------
# new summary, tier and chips fields


async def test_base_rate_weights_and_snapshot_times(
    make: Callable[..., tuple[Engine, VirtualClock]],
) -> None:
    e, _ = make(speed=0.0)
    base = e.twin.state.workload.rate_per_s
    await e.run_for(1.0)
    await e.command(telemetry.Burst(factor=4.0, duration_s=5.0))
    await e.command(telemetry.SetRouting(policy="weighted", weights={"h100-prefill": 3.0}))
    snap = e.snapshot_now()
    (s,) = of(snap, telemetry.Summary)
    assert s.rate_per_s == pytest.approx(4 * base) and s.base_rate_per_s == base
    assert s.weights == {"h100-prefill": 3.0, "b200-prefill": 1.0, "groq-decode": 1.0}
    for m in [*of(snap, telemetry.Tier), *of(snap, telemetry.Chips)]:
        assert m.sim_time_s == s.sim_time_s == e.sim_time_s
    sub = e.subscribe(10_000)
    await e.run_for(6.0)  # the burst ends
    summaries = of(sub.drain(), telemetry.Summary)
    assert summaries[-1].rate_per_s == summaries[-1].base_rate_per_s == base
    assert {m.base_rate_per_s for m in summaries} == {base}


# ------------------------------------------------------------------------------------------------
# scenarios on the live engine (run_scenario / stop_scenario)


async def until(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Let the engine task run (virtual clock: no real sleeping) until `cond()` holds."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0)


def events_of(msgs: list[telemetry.Message], prefix: str = "") -> list[telemetry.Event]:
    return [m for m in of(msgs, telemetry.Event) if m.event.startswith(prefix)]


async def test_run_scenario_runs_a_shipped_scenario_to_its_verdict(catalog: Catalog) -> None:
    """The shortest shipped scenario, on its own fleet, at speed 0: every step lands on time, the
    rate is set and put back, and the verdict is the in-process run's."""
    galaxy = load_fleet(resolve_fleet_path("tenstorrent-galaxy"), catalog)
    e = Engine(new_twin(galaxy, catalog, seed=3), speed=0.0, clock=VirtualClock(), catalog=catalog)
    runner = install_scenarios(e, catalog=catalog)
    name = "tenstorrent-galaxy-lose-quarter"
    assert e.meta.scenarios == [name] and e.scenarios == (name,)
    rate = e.twin.state.workload.rate_per_s
    sub = e.subscribe(1 << 20)
    task = asyncio.create_task(e.run())
    reply = await e.command(telemetry.RunScenario(name=name, id="s1"))
    assert reply.ok and reply.id == "s1" and name in reply.detail
    assert e.scenario == name
    await until(lambda: e.scenario is None, "the scenario to finish")
    e.stop()
    await task
    msgs = sub.drain()
    kinds = [m.event for m in events_of(msgs, "scenario")]
    assert kinds[0] == "scenario_started" and kinds[-1] == "scenario_finished"
    assert kinds.count("scenario_step") == 5  # setup, 2 method actions, 1 rollback, restore
    finished = events_of(msgs, "scenario_finished")[0]
    assert finished.target == name and finished.severity == "info"
    assert finished.detail.startswith("pass: "), finished.detail
    # the actions went through the normal command path: their own events are there
    failed = events_of(msgs, "chip_failed")
    assert [m.target for m in failed] == ["galaxy-unified/2"]
    assert events_of(msgs, "chip_recovered")
    journal = runner.journals[name]
    assert journal["verdict"] == "pass" and journal["mode"] == "live", journal["failures"]
    method = [a for a in journal["actions"] if a["phase"] == "method"]
    assert [a["since_method_start_s"] for a in method] == [20.0, 70.0]  # exact at speed 0
    assert [a["phase"] for a in journal["actions"]] == [
        "setup",
        "method",
        "method",
        "rollback",
        "restore",
    ]
    assert journal["twin"]["rate_before_per_s"] == rate
    assert e.twin.state.workload.rate_per_s == rate  # put back
    assert not e.twin.state.chip_status.any()  # all up again


async def _never_ending(engine: Engine, name: str) -> ScenarioOutcome:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def test_run_scenario_refusals_change_nothing(
    make: Callable[..., tuple[Engine, VirtualClock]],
) -> None:
    e, _ = make(speed=0.0)
    await e.run_for(1.0)
    before = fingerprint(e)
    sub = e.subscribe()
    # no runner installed
    assert e.meta.scenarios == [] and e.scenarios == ()
    reply = await e.command(telemetry.RunScenario(name="nvidia-groq-lose-prefill"))
    assert not reply.ok and reply.error == "run_scenario: this twin has no scenario runner"
    # nothing to stop
    reply = await e.command(telemetry.StopScenario())
    assert not reply.ok and reply.error == "stop_scenario: no scenario is running"
    # an unknown name
    e.set_scenario_runner(_never_ending, ["a", "b"])
    assert e.meta.scenarios == ["a", "b"]
    reply = await e.command(telemetry.RunScenario(name="c"))
    assert not reply.ok
    assert reply.error == "name: unknown scenario 'c' (expected one of: a, b)"
    assert e.scenario is None
    assert fingerprint(e) == before
    assert [m.event for m in events_of(sub.drain())] == ["command_rejected"] * 3
    # one at a time
    reply = await e.command(telemetry.RunScenario(name="a"))
    assert reply.ok and e.scenario == "a"
    await asyncio.sleep(0)  # the runner starts (and waits for ever)
    reply = await e.command(telemetry.RunScenario(name="b"))
    assert not reply.ok and reply.error.startswith("run_scenario: scenario 'a' is running")
    assert e.scenario == "a"
    # a runner that ignores the stop is cancelled all the same: "aborted"
    reply = await e.command(telemetry.StopScenario())
    assert reply.ok and reply.detail == "stopping scenario a: its rollbacks run"
    await until(lambda: e.scenario is None, "the scenario to end")
    finished = events_of(sub.drain(), "scenario_finished")
    assert [m.detail for m in finished] == ["aborted: cancelled before it could roll back"]
    assert fingerprint(e) == before

    # a runner that raises ends its scenario, not the twin
    async def broken(engine: Engine, name: str) -> ScenarioOutcome:
        raise RuntimeError("boom")

    e.set_scenario_runner(broken, ["a"])
    assert (await e.command(telemetry.RunScenario(name="a"))).ok
    await until(lambda: e.scenario is None, "the broken scenario to end")
    finished = events_of(sub.drain(), "scenario_finished")
    assert [m.detail for m in finished] == ["aborted: the scenario runner failed: boom"]


async def test_stop_before_the_task_starts(
    make: Callable[..., tuple[Engine, VirtualClock]],
) -> None:
    e, _ = make(speed=0.0, scenario_runner=_never_ending, scenarios=["a"])
    sub = e.subscribe()
    assert e.meta.scenarios == ["a"]
    assert (await e.command(telemetry.RunScenario(name="a"))).ok
    assert (await e.command(telemetry.StopScenario())).ok  # the same tick: it never ran
    await until(lambda: e.scenario is None, "the scenario to end")
    assert [m.event for m in events_of(sub.drain(), "scenario")] == [
        "scenario_started",
        "scenario_stopping",
        "scenario_finished",
    ]


STOPPABLE = """
title = "lose a prefill node for a long time"
fleet = "nvidia-groq"
seed = 1
warmup_s = 2
duration_s = 300
rate_per_s = 12

[[method]]
name = "lose"
at_s = 1
action = "fail"
selector = { instance = "h100-prefill/0" }

[[method]]
name = "worse"
at_s = 200
action = "degrade_link"
link = "h100-prefill->groq-decode"
factor = 0.5

[[rollbacks]]
action = "recover"
selector = { tier = "h100-prefill" }

[[rollbacks]]
action = "restore_link"
link = "h100-prefill->groq-decode"
"""


@pytest.mark.parametrize("how", ["stop_scenario", "shutdown"])
async def test_stop_scenario_rolls_back(
    make: Callable[..., tuple[Engine, VirtualClock]], tmp_path: Path, how: str
) -> None:
    path = tmp_path / "stoppable.toml"
    path.write_text(STOPPABLE)
    e, _ = make(speed=0.0)
    rate = e.twin.state.workload.rate_per_s
    runner = install_scenarios(e, paths=[path], journal_dir=tmp_path / "journals")
    assert e.meta.scenarios == ["stoppable"]
    sub = e.subscribe(1 << 20)
    task = asyncio.create_task(e.run())
    assert (await e.command(telemetry.RunScenario(name="stoppable"))).ok
    state = e.twin.state
    await until(lambda: bool(state.chip_status.any()), "the failure")
    assert state.workload.rate_per_s == 12.0
    if how == "stop_scenario":
        reply = await e.command(telemetry.StopScenario())
        assert reply.ok
        assert (await e.command(telemetry.StopScenario())).detail.endswith("already stopping")
        await until(lambda: e.scenario is None, "the scenario to stop")
        e.stop()
        await task
    else:  # the twin shuts down (serve, the console): stopped engine, rollbacks at once
        e.stop()
        await task
        await e.close_scenario()
        assert e.scenario is None
    assert not state.chip_status.any()  # rolled back
    assert state.link_factor.tolist() == [1.0, 1.0]
    assert state.workload.rate_per_s == rate  # put back
    finished = events_of(sub.drain(), "scenario_finished")
    assert len(finished) == 1 and finished[0].detail.startswith("aborted: ")
    assert "; 2 rollbacks run" in finished[0].detail
    journal = runner.journals["stoppable"]
    assert journal["verdict"] == "aborted"
    phases = [a["phase"] for a in journal["actions"]]
    assert phases == ["setup", "method", "rollback", "rollback", "restore"]  # "worse" never ran
    reason = "stopped by the operator" if how == "stop_scenario" else "the twin is stopping"
    assert reason in journal["failures"][0]
    (written,) = (tmp_path / "journals").glob("stoppable-*.json")
    assert json.loads(written.read_text())["verdict"] == "aborted"
    assert str(written) in finished[0].detail


def test_scenarios_offered_are_the_fleets_own(catalog: Catalog, tmp_path: Path) -> None:
    groq = scenarios_for("nvidia-groq", catalog=catalog)
    assert list(groq) == ["nvidia-groq-lose-prefill"]
    assert list(scenarios_for("all-vendors", catalog=catalog)) == [
        "all-vendors-lose-vendor",
        "all-vendors-route-away",
    ]
    assert scenarios_for("no-such-fleet", catalog=catalog) == {}
    # comparisons and broken files are left out
    bad = tmp_path / "bad.toml"
    bad.write_text(STOPPABLE.replace('action = "fail"', 'action = "explode"'))
    compare = scenarios_dir() / "compare-distserve-tpot-slo.toml"
    assert scenarios_for("nvidia-groq", catalog=catalog, paths=[bad, compare]) == {}
