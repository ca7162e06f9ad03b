"""`fleet-twin tui --replay FILE`: a flight recording played back in the console (`ReplayLink`):
the recorded values show; pause stops simulated time; seek jumps; speed changes; every action
that would change the twin is refused; the command line's mistakes are one line, exit 2.

The recording is a short seeded run of a small fleet, made once at speed 0 on a virtual clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from rich.text import Text
from textual.command import CommandPalette
from textual.pilot import Pilot

from tui.app import FleetApp
from tui.commands import FleetCommands
from tui.format import sim_clock
from tui.link import REPLAY_REFUSED
from tui.link_replay import ReplayLink
from tui.operator import parse_sim_time
from tui.screens.ask import AskScreen
from tui.widgets.header import FleetHeader
from tui.widgets.tier_table import TierTable
from twin import telemetry
from twin.build import new_twin
from twin.catalog import load_catalog
from twin.cli import main
from twin.engine import Engine, VirtualClock
from twin.fleet import load_fleet, resolve_fleet_path
from twin.recorder import Msg, Recorder, read_records

FLEET = "aws-cerebras"  # two prefill tiers, one decode tier (2 instances), two links
SEED = 5
DURATION_S = 40.0
FAILED = "cerebras-decode/0"
SIZE = (160, 48)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded run at speed 0: 40 simulated seconds, a decode instance failed at 10 s."""
    path = tmp_path_factory.mktemp("replay") / "run.jsonl.gz"

    async def record() -> None:
        catalog = load_catalog()
        clock = VirtualClock()
        twin = new_twin(load_fleet(resolve_fleet_path(FLEET), catalog), catalog, seed=SEED)
        engine = Engine(twin, speed=0.0, clock=clock, catalog=catalog, run_id="replay-test")
        rec = Recorder(path).attach(engine)
        await engine.run_for(10.0)
        await engine.command(telemetry.Fail(target=FAILED, id="f1"))
        await engine.run_for(DURATION_S - 10.0)
        rec.close()

    asyncio.run(record())
    return path


def last_recorded(path: Path) -> tuple[telemetry.Summary, dict[str, telemetry.Tier]]:
    summary: telemetry.Summary | None = None
    tiers: dict[str, telemetry.Tier] = {}
    for rec in read_records(path):
        if isinstance(rec, Msg) and isinstance(rec.msg, telemetry.Summary):
            summary = rec.msg
        elif isinstance(rec, Msg) and isinstance(rec.msg, telemetry.Tier):
            tiers[rec.msg.tier] = rec.msg
    assert summary is not None
    return summary, tiers


def text_of(widget: Any) -> str:
    rendered = widget.render()
    return rendered.plain if isinstance(rendered, Text) else str(rendered)


def header(app: FleetApp) -> str:
    return text_of(app.main.query_one(FleetHeader))


async def until(
    pilot: Pilot[Any], cond: Callable[[], bool], what: str, timeout: float = 10.0
) -> None:
    app = pilot.app
    assert isinstance(app, FleetApp)
    deadline = time.monotonic() + timeout
    while True:
        app.refresh_view()
        if cond():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


async def commands_done(app: Any) -> None:
    workers = [w for w in app.workers if w.group == "commands"]
    if workers:
        await app.workers.wait_for_complete(workers)


def sim_now(app: FleetApp) -> float:
    return app.store.sim_time_s


@contextlib.asynccontextmanager
async def console(link: ReplayLink) -> AsyncIterator[tuple[FleetApp, Pilot[Any]]]:
    app = FleetApp(link)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(
                pilot,
                lambda: app.store.summary is not None and len(app.store.chips) == 3,
                "the first picture",
            )
            yield app, pilot
    finally:
        await link.stop()


# ------------------------------------------------------------------------------------------------
# the link on its own


async def test_the_link_plays_pauses_and_refuses(recording: Path) -> None:
    link = ReplayLink(recording, speed=0.0)
    assert link.fleet == FLEET and link.state == "replay" and link.can_seek
    assert link.where == f"replay {recording}"
    start, now, end = link.timeline
    assert start == now == 0.0 and math.isclose(end, DURATION_S, abs_tol=0.3)
    await link.start()
    got: list[telemetry.Message] = []

    async def read() -> None:
        async for msg in link.messages():
            got.append(msg)
            if isinstance(msg, telemetry.Event) and msg.event == "replay_end":
                return

    await asyncio.wait_for(read(), 20.0)
    assert isinstance(got[0], telemetry.Meta)
    assert link.at_end and link.paused and link.timeline[1] == end
    assert any(isinstance(m, telemetry.Event) and m.event == "chip_failed" for m in got)
    summaries = [m for m in got if isinstance(m, telemetry.Summary)]
    assert summaries[-1].paused and summaries[-1].speed == 0.0  # as played, not as recorded
    recorded, _ = last_recorded(recording)
    assert summaries[-1].sim_time_s == recorded.sim_time_s and summaries[-1].done == recorded.done
    # pacing commands act on the playback; the rest are refused
    reply = await link.command(telemetry.SetSpeed(speed=4.0, id="s"))
    assert reply.ok and link.speed == 4.0 and reply.id == "s"
    assert not (await link.command(telemetry.SetSpeed(speed=-1.0))).ok
    for cmd in (
        telemetry.Fail(target=FAILED, id="x"),
        telemetry.SetRate(rate_per_s=5.0),
        telemetry.RunScenario(name="anything"),
    ):
        reply = await link.command(cmd)
        assert not reply.ok and reply.error == REPLAY_REFUSED and reply.id == cmd.id
    assert (await link.command(telemetry.Resume())).ok  # at the end: from the start again
    assert not link.paused and link.timeline[1] < 1.0
    assert link.seek(-5.0) == 0.0 and link.seek(1e9) == end and link.seek(12.5) == 12.5
    await link.stop()


def test_parse_sim_time() -> None:
    assert parse_sim_time("90") == 90.0
    assert parse_sim_time("1:30") == 90.0
    assert parse_sim_time(" 0:01:30.5 ") == 90.5
    assert parse_sim_time(sim_clock(3723.4)) == pytest.approx(3723.4)
    for bad in ("", "x", "-1", "1:2:3:4", "nan", "inf", "1:-2"):
        assert parse_sim_time(bad) is None, bad


# ------------------------------------------------------------------------------------------------
# the console


async def test_the_console_shows_the_recorded_values(recording: Path) -> None:
    summary, tiers = last_recorded(recording)
    async with console(ReplayLink(recording, speed=0.0)) as (app, pilot):
        as_played = msgspec.structs.replace(summary, speed=0.0, paused=True, lag_s=0.0)
        await until(pilot, lambda: app.store.summary == as_played, "the end of the recording")
        await pilot.pause()
        app.refresh_view()
        top = header(app)
        assert FLEET in top and "REPLAY" in top and str(recording) in top
        assert f"sim {sim_clock(summary.sim_time_s)}" in top and "PAUSED" in top
        assert f"in flight {summary.in_flight}  done {summary.done}" in top
        table = text_of(app.main.query_one(TierTable))
        for name, tier in tiers.items():
            assert app.store.tiers[name] == tier
        decode = tiers["cerebras-decode"]
        assert decode.instances_up == decode.instances - 1  # the failure was recorded
        assert f"{decode.instances_up}/{decode.instances}" in table
        assert any(e.kind == "chip_failed" and e.target.startswith(FAILED) for e in app.store.log)
        assert any(e.kind == "replay_end" for e in app.store.log)


async def test_pause_seek_and_speed(recording: Path) -> None:
    async with console(ReplayLink(recording, speed=2.0)) as (app, pilot):
        assert app.main.check_action("seek_back", ()) and app.main.check_action("toggle_pause", ())
        assert not app.main.check_action("fail_chip", ())
        await until(pilot, lambda: sim_now(app) >= 1.0, "simulated time to run")
        assert "▶ 2x" in header(app)
        # pause: simulated time stops
        await pilot.press("space")
        await commands_done(app)
        await until(pilot, lambda: "PAUSED" in header(app), "PAUSED")
        await pilot.pause(0.2)
        paused_at = sim_now(app)
        await pilot.pause(0.6)
        app.refresh_view()
        assert sim_now(app) == paused_at and "PAUSED" in header(app)
        # seek: the palette's "Seek to..." asks for a time
        await pilot.press("ctrl+p")
        await until(pilot, lambda: isinstance(app.screen, CommandPalette), "the palette")
        await pilot.press(*"seek to")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, AskScreen), "the time dialog")
        await pilot.press(*"0:00:25", "enter")  # the field is selected: typing replaces it
        await until(pilot, lambda: abs(sim_now(app) - 25.0) < 1.0, "the seek to 25 s")
        assert f"sim {sim_clock(sim_now(app))}" in header(app) and "PAUSED" in header(app)
        assert any(e.kind == "seek" for e in app.store.log)
        # [ and ] jump 10 s
        await pilot.press("left_square_bracket")
        await until(pilot, lambda: abs(sim_now(app) - 15.0) < 1.0, "the seek back to 15 s")
        await pilot.press("right_square_bracket", "right_square_bracket")
        await until(pilot, lambda: abs(sim_now(app) - 35.0) < 1.0, "the seek forward to 35 s")
        assert f"sim {sim_clock(sim_now(app))}" in header(app)
        # speed: > doubles it (2x -> 5x), and playing on moves simulated time again
        await pilot.press("greater_than_sign")
        await commands_done(app)
        await until(pilot, lambda: "5x" in header(app), "5x in the header")
        assert app.link.speed == 5.0  # type: ignore[attr-defined]
        before = sim_now(app)
        await pilot.press("space")
        await commands_done(app)
        await until(pilot, lambda: sim_now(app) > before + 0.5, "time to move at 5x")
        assert "PAUSED" not in header(app)
        replies = [e for e in app.store.log if e.kind == "reply"]
        assert all(e.severity == "ok" for e in replies) and len(replies) == 3


async def test_fleet_actions_are_refused(recording: Path) -> None:
    async with console(ReplayLink(recording, speed=1.0)) as (app, pilot):
        await pilot.press("f")  # fail chip: refused at once, no confirmation
        await pilot.pause()
        await until(
            pilot,
            lambda: any(e.kind == "replay" and REPLAY_REFUSED in e.text for e in app.store.log),
            "the refusal in the log",
        )
        assert app.screen is app.main  # no dialog opened
        entry = next(e for e in app.store.log if e.kind == "replay")
        assert entry.severity == "error" and "fail chip" in entry.text
        # and a command that reaches the link anyway gets its error reply in the log
        app.send(telemetry.Fail(target=FAILED), f"fail {FAILED}")
        await commands_done(app)
        assert any(
            e.kind == "reply" and e.severity == "error" and REPLAY_REFUSED in e.text
            for e in app.store.log
        )
        titles = [n for n, _, _ in FleetCommands(app.screen).entries(everything=True)]
        assert "Seek to..." in titles and "Pause" in titles and "Speed 2x" in titles
        assert not any(
            t.startswith(("Fail", "Run scenario", "Rate", "Routing", "Degrade")) for t in titles
        )
        sections = dict(app.help_sections())
        assert any(s.startswith("Replay") for s in sections)
        assert not any(s.startswith("Change the twin") for s in sections)


# ------------------------------------------------------------------------------------------------
# the command line


def test_cli_replay_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tui", "--replay", str(tmp_path / "missing.file")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.file" in err and "no such recording" in err
    not_gz = tmp_path / "notes.txt"
    not_gz.write_text("hello\n")
    assert main(["tui", "--replay", str(not_gz)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    for argv, what in (
        (["tui", "--replay", "x.gz", "--broker", "mqtt://localhost:1883"], "--broker"),
        (["tui", "--replay", "x.gz", "--speed", "-1"], "--speed"),
        (["tui", "--fleet", FLEET, "--broker", "mqtt://localhost:1883", "--speed", "2"], "--speed"),
        (["tui"], "--replay"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and what in err, (argv, err)
