"""The operator console on the in-process link: every binding and palette action reaches the twin
and its effect shows; confirmations cancel; read-only refuses; help; snapshots.

The twin is real (a shipped fleet, fixed seed), run to a fixed simulated time on a virtual clock
before the console opens; the link does not run its clock afterwards (`run=False`), so commands
are applied at once and the screen is stable. One test runs the engine live on the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_textual_snapshot
from rich.text import Text
from textual.binding import Binding
from textual.command import CommandPalette
from textual.pilot import Pilot
from textual.widgets import Input

from tui.actions import ACTIONS, OPERATOR_ACTIONS, RATE_STEP
from tui.app import FleetApp
from tui.commands import FleetCommands
from tui.link_local import LocalLink
from tui.screens.ask import AskScreen
from tui.screens.confirm import ConfirmScreen
from tui.screens.help import HelpScreen
from tui.screens.main import MainScreen
from tui.screens.picker import PickScreen
from tui.screens.weights import WeightsScreen
from tui.widgets.chip_map import ChipMap
from tui.widgets.event_log import EventLog
from tui.widgets.header import FleetHeader
from tui.widgets.tier_table import TierTable
from twin import telemetry
from twin.build import new_twin
from twin.catalog import load_catalog
from twin.chaos_live import install_scenarios
from twin.engine import Engine, VirtualClock
from twin.fleet import load_fleet, resolve_fleet_path

HERE = Path(__file__).resolve().parent
FLEET = "nvidia-groq"  # 16 H100 + 8 B200 prefill, 2 x 576 Groq LPU decode; 2 KV links
SEED = 7
WARM_S = 20.0
SIZE = (160, 48)
CATALOG = load_catalog()


# ------------------------------------------------------------------------------------------------
# snapshots live in tests/snapshots/<test module>/ (not syrupy's __snapshots__)

_default_dirname = pytest_textual_snapshot.SVGImageExtension.dirname


def _dirname(cls: Any, *, test_location: Any) -> str:
    if Path(test_location.filepath).resolve() == Path(__file__).resolve():
        return str(HERE / "snapshots" / test_location.basename)
    return str(_default_dirname(test_location=test_location))


pytest_textual_snapshot.SVGImageExtension.dirname = classmethod(_dirname)  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------------
# helpers


def new_engine(fleet: str = FLEET, **kw: Any) -> Engine:
    twin = new_twin(load_fleet(resolve_fleet_path(fleet), CATALOG), CATALOG, seed=SEED)
    return Engine(twin, catalog=CATALOG, run_id="test-run", wall_ms=lambda: 0, **kw)


async def warm_link(fleet: str = FLEET, sim_s: float = WARM_S) -> LocalLink:
    """A link on an engine run to `sim_s` on a virtual clock, then set to 1x and paused."""
    engine = new_engine(fleet, speed=0, clock=VirtualClock())
    link = LocalLink(engine, run=False)  # subscribes now: the console gets the whole history
    await engine.run_for(sim_s)
    await engine.command(telemetry.SetSpeed(speed=1.0))
    await engine.command(telemetry.Pause())
    return link


def truth(engine: Engine) -> dict[str, Any]:
    """What the twin itself says now (its own snapshot, not the console's)."""
    snap = engine.snapshot_now()
    summary = next(m for m in snap if isinstance(m, telemetry.Summary))
    tiers = {m.tier: m for m in snap if isinstance(m, telemetry.Tier)}
    chips = {
        cid: state
        for m in snap
        if isinstance(m, telemetry.Chips)
        for cid, state in zip(m.ids, m.state, strict=True)
    }
    return {"summary": summary, "tiers": tiers, "chips": chips}


async def until(
    pilot: Pilot[Any], cond: Callable[[], bool], what: str, timeout: float = 5.0
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
    """Wait for the commands in flight (not the telemetry worker, which runs for ever)."""
    workers = [w for w in app.workers if w.group == "commands"]
    if workers:  # (an empty list would mean every worker)
        await app.workers.wait_for_complete(workers)


def ready(app: FleetApp) -> bool:
    s = app.store
    return s.meta is not None and s.summary is not None and len(s.chips) == len(s.meta.tiers)


@contextlib.asynccontextmanager
async def console(
    link: LocalLink, *, read_only: bool = False, size: tuple[int, int] = SIZE
) -> AsyncIterator[tuple[FleetApp, Pilot[Any]]]:
    app = FleetApp(link, read_only=read_only)
    try:
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: ready(app), "the first figures")
            await pilot.pause()
            yield app, pilot
    finally:
        await link.stop()


def text_of(widget: Any) -> str:
    """What a widget shows: its rendered text, or its lines for line-API widgets."""
    if isinstance(widget, ChipMap | EventLog):
        height = widget.virtual_size.height if isinstance(widget, ChipMap) else len(widget.lines)
        if isinstance(widget, EventLog):
            return "\n".join(strip.text for strip in widget.lines)
        rows = []
        saved = widget.scroll_offset.y
        for y in range(height):
            widget.scroll_to(y=y, animate=False, immediate=True)
            rows.append(widget.render_line(y - widget.scroll_offset.y).text)
        widget.scroll_to(y=saved, animate=False, immediate=True)
        return "\n".join(rows)
    rendered = widget.render()
    return rendered.plain if isinstance(rendered, Text) else str(rendered)


def log_kinds(app: FleetApp) -> list[tuple[str, str, str]]:
    return [(e.kind, e.severity, e.target) for e in app.store.log]


async def answer(pilot: Pilot[Any], keys: dict[type, tuple[str, ...]]) -> list[type]:
    """Walk through the dialogs an action opens, pressing `keys[dialog type]` in each."""
    seen: list[type] = []
    for _ in range(6):
        await pilot.pause()
        screen = pilot.app.screen
        kind = type(screen)
        if kind not in (ConfirmScreen, PickScreen, AskScreen, WeightsScreen):
            break
        seen.append(kind)
        await pilot.press(*keys.get(kind, ("enter",)))
    await commands_done(pilot.app)
    await pilot.pause()
    return seen


# ------------------------------------------------------------------------------------------------
# the screen


async def test_every_panel_is_populated() -> None:
    link = await warm_link()
    async with console(link) as (app, _pilot):
        meta = app.store.meta
        assert meta is not None
        header = text_of(app.main.query_one(FleetHeader))
        assert FLEET in header and "sim 0:00:20.0" in header and "PAUSED" in header
        assert "embedded" in header and "req/s" in header and "tok/s" in header
        tiers = text_of(app.main.query_one(TierTable))
        for label in ("h100", "b200", "groq"):
            assert label in tiers
        assert "PREFILL" in tiers and "DECODE" in tiers and "≈" in tiers  # estimates marked
        assert "2/2" in tiers and "1/1" in tiers
        latency = text_of(app.main.query_one("LatencyPanel"))
        assert "TTFT" in latency and "TPOT" in latency and "goodput" in latency
        assert "≤2s" in latency and "≤50ms" in latency
        links = text_of(app.main.query_one("KvLinks"))
        assert "h100→groq" in links and "b200→groq" in links and "GB/s" in links
        chip_map = app.main.query_one(ChipMap)
        assert chip_map.chip_count == 16 + 8 + 2 * 576
        cells = text_of(chip_map)
        assert "h100-prefill" in cells and "■" in cells
        detail = text_of(app.main.query_one("ChipDetail"))
        assert "h100-prefill/0/0" in detail and "NVIDIA" in detail
        assert "published" in detail  # provenance of its system's figures
        assert "console on embedded twin" in text_of(app.main.query_one(EventLog))
        # histories: the sparklines have points from the 20 s the twin ran
        assert len(app.store.tier_history["groq-decode"]) >= 10
        assert len(app.store.ttft_history) >= 10


async def test_live_engine_moves_and_pauses() -> None:
    """On the wall clock at 1x the header's simulated time moves; space pauses it."""
    engine = new_engine(speed=1.0)
    link = LocalLink(engine)
    async with console(link) as (app, pilot):
        t0 = app.store.sim_time_s
        await until(pilot, lambda: app.store.sim_time_s > t0 + 0.5, "simulated time to move")
        await pilot.press("space")
        await until(
            pilot, lambda: app.store.summary is not None and app.store.summary.paused, "paused"
        )
        t1 = app.store.sim_time_s
        await pilot.pause(0.5)
        assert app.store.sim_time_s == pytest.approx(t1, abs=0.11)
        assert "PAUSED" in text_of(app.main.query_one(FleetHeader))
        assert ("paused", "info", "clock") in log_kinds(app)


# ------------------------------------------------------------------------------------------------
# failing a chip: confirm, cancel, effect


async def test_fail_chip_shows_on_map_tiers_and_log() -> None:
    link = await warm_link()
    async with console(link) as (app, pilot):
        chip_map = app.main.query_one(ChipMap)
        assert chip_map.has_focus
        await pilot.press("right", "right")  # h100-prefill/0/2
        ref = chip_map.selected
        assert ref is not None and ref.chip_id == "h100-prefill/0/2"
        await pilot.press("f")
        assert isinstance(app.screen, ConfirmScreen)
        assert "h100-prefill/0/2" in str(app.screen.question)
        await pilot.press("y")
        await commands_done(app)
        await until(
            pilot,
            lambda: app.store.tiers["h100-prefill"].instances_up == 1,
            "the tier's instance count to drop",
        )
        assert truth(link.engine)["chips"]["h100-prefill/0/2"] == "failed"
        assert chip_map.chip_state(ref) is not None and chip_map.chip_state(ref)[0] == "failed"
        first_row = text_of(chip_map).splitlines()[0]
        assert "■■✗■■■■■" in first_row  # the failed chip, by glyph
        assert "1/2" in text_of(app.main.query_one(TierTable))
        kinds = log_kinds(app)
        assert ("chip_failed", "error", "h100-prefill/0/2") in kinds
        assert ("reply", "ok", "fail h100-prefill/0/2") in kinds
        log_text = text_of(app.main.query_one(EventLog))
        assert "chip_failed" in log_text and "fail h100-prefill/0/2" in log_text
        assert "1 chip" in text_of(app.main.query_one(FleetHeader))
        assert "DOWN" in text_of(app.main.query_one("ChipDetail"))


@pytest.mark.parametrize("cancel_key", ["n", "escape"])
async def test_fail_confirmation_can_be_cancelled(cancel_key: str) -> None:
    link = await warm_link()
    async with console(link) as (app, pilot):
        before = truth(link.engine)
        for key in ("f", "F"):
            await pilot.press(key)
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press(cancel_key)
            await pilot.pause()
            assert isinstance(app.screen, MainScreen)
        await pilot.press("f", "enter")  # Enter on the dialog presses Cancel (it has the focus)
        await pilot.pause()
        await commands_done(app)
        after = truth(link.engine)
        assert after["chips"] == before["chips"]
        assert all(t.instances_up == t.instances for t in after["tiers"].values())
        assert not any(k == "reply" for k, _, _ in log_kinds(app))
        assert sum(1 for e in app.store.log if "cancelled" in e.text) == 3


async def test_chip_map_keys_and_mouse_select() -> None:
    link = await warm_link()
    async with console(link) as (app, pilot):
        chip_map = app.main.query_one(ChipMap)
        await pilot.press("end")
        ref = chip_map.selected
        assert ref is not None and ref.tier == "groq-decode" and ref.instance == 1
        await pilot.press("home")
        assert chip_map.selected is not None and chip_map.selected.chip_id == "h100-prefill/0/0"
        await pilot.press("down")
        assert chip_map.selected is not None and chip_map.selected.tier != "h100-prefill"
        await pilot.press("up", "right")
        assert chip_map.selected is not None and chip_map.selected.chip_id == "h100-prefill/0/1"
        # a click on the 4th chip of the b200 block (label "b200-prefill " then the chips)
        row0 = text_of(chip_map).splitlines()[0]
        x = row0.index("b200-prefill") + len("b200-prefill ") + 3
        await pilot.click(ChipMap, offset=(x + 1, 1))  # +1: the panel's border
        assert chip_map.selected is not None and chip_map.selected.chip_id == "b200-prefill/0/3"
        assert "b200-prefill/0/3" in text_of(app.main.query_one("ChipDetail"))
        # c cycles the collapse mode: every instance one cell, then back to auto
        await pilot.press("c", "c")
        assert chip_map.mode == "instances"
        assert chip_map.collapsed_instances == 2 + 1 + 2
        await pilot.press("c")
        assert chip_map.mode == "auto"


# ------------------------------------------------------------------------------------------------
# every binding reaches the twin

_DIALOG_KEYS: dict[type, tuple[str, ...]] = {
    ConfirmScreen: ("y",),
    PickScreen: ("down", "enter"),  # the second option
    AskScreen: ("7", "enter"),  # the field is selected: typing replaces it
    WeightsScreen: ("3", "enter"),  # the first tier's share
}


def _expect(action: str, engine: Engine, before: dict[str, Any]) -> None:
    """Assert the effect of `action` on the twin itself."""
    now = truth(engine)
    s0, s1 = before["summary"], now["summary"]
    chips = now["chips"]
    if action == "fail_chip":
        assert chips["h100-prefill/0/0"] == "failed"
        assert sum(v == "failed" for v in chips.values()) == 1
    elif action == "fail_instance":
        assert all(chips[f"h100-prefill/0/{j}"] == "failed" for j in range(8))
    elif action in ("recover_chip", "recover_instance"):
        assert all(v == "up" for v in chips.values())
    elif action == "drain_chip":
        assert now["tiers"]["h100-prefill"].instances_draining == 1
    elif action == "drain_instance":
        assert all(chips[f"h100-prefill/0/{j}"] == "draining" for j in range(8))
    elif action == "degrade_link":
        factors = {ls.name: ls.factor for ls in s1.links}
        assert factors == {"h100-prefill->groq-decode": 1.0, "b200-prefill->groq-decode": 0.25}
    elif action == "restore_link":
        assert all(ls.factor == 1.0 for ls in s1.links)
    elif action == "rate_up":
        assert s1.rate_per_s == pytest.approx(s0.rate_per_s * RATE_STEP)
    elif action == "rate_down":
        assert s1.rate_per_s == pytest.approx(round(s0.rate_per_s / RATE_STEP, 2))
    elif action == "set_rate":
        assert s1.rate_per_s == 7.0
    elif action == "burst":
        assert s1.rate_per_s == pytest.approx(s0.rate_per_s * 5)  # x5 for 10 s
    elif action == "routing":
        assert (s0.policy, s1.policy) == ("least_loaded", "latency_aware")
    elif action == "weights":
        assert s1.policy == "weighted"
    elif action == "toggle_pause":
        assert (s0.paused, s1.paused) == (True, False)
    elif action == "speed_up":
        assert (s0.speed, s1.speed) == (1.0, 2.0)
    elif action == "speed_down":
        assert (s0.speed, s1.speed) == (1.0, 0.5)
    else:
        raise AssertionError(f"no expectation for {action}")


async def _setup(action: str, engine: Engine) -> None:
    """The state an action needs first (applied to the twin directly, not via the console)."""
    if action == "recover_chip":
        await engine.command(telemetry.Fail(target="h100-prefill/0/0"))
    elif action == "recover_instance":
        await engine.command(telemetry.Fail(target="h100-prefill/0"))
    elif action == "restore_link":
        await engine.command(telemetry.DegradeLink(link="b200-prefill->groq-decode", factor=0.5))


@pytest.mark.parametrize("spec", [s for s in ACTIONS if s.changes_twin], ids=lambda s: s.action)
async def test_every_binding_reaches_the_twin(spec: Any) -> None:
    link = await warm_link()
    await _setup(spec.action, link.engine)
    async with console(link) as (app, pilot):
        before = truth(link.engine)
        n_log = app.store.log_seq
        key = spec.keys.split(",")[0]
        await pilot.press(key)
        await answer(pilot, _DIALOG_KEYS)
        await until(
            pilot,
            lambda: any(e.kind == "reply" for e in app.store.log if e.seq > n_log),
            f"the reply to {spec.action}",
        )
        replies = [e for e in app.store.log if e.seq > n_log and e.kind == "reply"]
        assert [r.severity for r in replies] == ["ok"], replies
        _expect(spec.action, link.engine, before)
        # the event log on screen has the reply
        assert replies[0].target in text_of(app.main.query_one(EventLog))


async def test_zoom_maximizes_the_focused_panel() -> None:
    link = await warm_link()
    async with console(link) as (app, pilot):
        await pilot.press("z")
        assert app.screen.maximized is app.main.query_one(ChipMap)
        await pilot.press("z")
        assert app.screen.maximized is None


async def test_error_reply_is_shown() -> None:
    """A command the twin refuses: its error is in the event log and raised as a notification."""
    link = await warm_link()
    async with console(link) as (app, pilot):
        main = app.main
        main.send_cmd(telemetry.Fail(target="no-such-tier/9"), "fail no-such-tier/9")
        await commands_done(app)
        await until(pilot, lambda: any(e.kind == "reply" for e in app.store.log), "the reply")
        reply = next(e for e in app.store.log if e.kind == "reply")
        assert reply.severity == "error" and "unknown chip or instance" in reply.text
        assert "unknown chip or instance" in text_of(app.main.query_one(EventLog))
        assert any("unknown chip or instance" in str(n.message) for n in app._notifications)


# ------------------------------------------------------------------------------------------------
# the command palette


async def test_palette_lists_every_action() -> None:
    link = await warm_link()
    async with console(link) as (app, _pilot):
        provider = FleetCommands(app.screen)
        titles = {name for name, _, _ in provider.entries(everything=False)}
        assert {s.title for s in ACTIONS} <= titles
        more = {name for name, _, _ in provider.entries(everything=True)}
        assert "Degrade link h100-prefill->groq-decode x0.5" in more
        assert "Routing: power_aware" in more and "Fail instance groq-decode/1" in more


@pytest.mark.parametrize("spec", [s for s in ACTIONS if s.changes_twin], ids=lambda s: s.action)
async def test_every_palette_action_reaches_the_twin(spec: Any) -> None:
    """Each palette entry of an action runs the same action (dialogs included)."""
    link = await warm_link()
    await _setup(spec.action, link.engine)
    async with console(link) as (app, pilot):
        before = truth(link.engine)
        n_log = app.store.log_seq
        provider = FleetCommands(app.screen)
        entry = next(e for e in provider.entries(everything=False) if e[0] == spec.title)
        result = entry[2]()
        if asyncio.iscoroutine(result):
            await result
        await answer(pilot, _DIALOG_KEYS)
        await until(
            pilot,
            lambda: any(e.kind == "reply" for e in app.store.log if e.seq > n_log),
            f"the reply to {spec.action}",
        )
        _expect(spec.action, link.engine, before)


async def test_palette_ui_fails_a_chip_and_sets_routing() -> None:
    """Through the real palette: Ctrl+P, type, Enter."""
    link = await warm_link()
    async with console(link) as (app, pilot):
        await pilot.press("ctrl+p")
        await until(pilot, lambda: isinstance(app.screen, CommandPalette), "the palette")
        await pilot.press(*"fail chip")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        await pilot.press("y")
        await commands_done(app)
        await until(
            pilot,
            lambda: truth(link.engine)["chips"]["h100-prefill/0/0"] == "failed",
            "the chip to fail",
        )
        await pilot.press("ctrl+p")
        await until(pilot, lambda: isinstance(app.screen, CommandPalette), "the palette")
        await pilot.press(*"routing: power_aware")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await commands_done(app)
        await until(
            pilot,
            lambda: app.store.summary is not None and app.store.summary.policy == "power_aware",
            "the routing change to show",
        )
        assert "power_aware" in text_of(app.main.query_one(FleetHeader))


# ------------------------------------------------------------------------------------------------
# chaos scenarios from the palette


async def test_palette_runs_a_shipped_scenario() -> None:
    """Ctrl+P, "run scenario", Enter, then space: the embedded twin, resumed at "as fast as
    possible", runs the fleet's scenario; the event log shows it start, step and finish with its
    verdict. (Paused while typing: a busy twin makes every Pilot key press wait for idle.)"""
    engine = new_engine("tenstorrent-galaxy", speed=0.0)
    install_scenarios(engine, catalog=CATALOG)
    name = "tenstorrent-galaxy-lose-quarter"
    await engine.command(telemetry.Pause())
    link = LocalLink(engine)
    async with console(link) as (app, pilot):
        provider = FleetCommands(app.screen)
        titles = [n for n, _, _ in provider.entries(everything=False)]
        assert f"Run scenario: {name}" in titles and "Stop scenario" in titles
        await pilot.press("ctrl+p")
        await until(pilot, lambda: isinstance(app.screen, CommandPalette), "the palette")
        await pilot.press(*"run scenario")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await commands_done(app)
        await until(
            pilot, lambda: "scenario_started" in [e.kind for e in app.store.log], "the start"
        )
        reply = next(e for e in app.store.log if e.kind == "reply")
        assert reply.severity == "ok" and reply.target == f"scenario {name}"
        assert engine.scenario == name and engine.paused  # it waits for the twin to move
        await pilot.press("space")  # resume
        await until(
            pilot,
            lambda: "scenario_finished" in [e.kind for e in app.store.log],
            "the verdict",
            timeout=60.0,
        )
        finished = next(e for e in app.store.log if e.kind == "scenario_finished")
        assert finished.target == name and finished.text.startswith("pass: "), finished.text
        kinds = [e.kind for e in app.store.log]
        assert "scenario_step" in kinds and "chip_failed" in kinds
        shown = text_of(app.main.query_one(EventLog))
        assert "scenario_started" in shown and "scenario_finish" in shown  # (kind truncated)
        # nothing is running now: "Stop scenario" gets the twin's error
        seen = len(app.store.log)
        app.main.stop_scenario()
        await commands_done(app)
        replies = lambda: [e for e in list(app.store.log)[seen:] if e.kind == "reply"]  # noqa: E731
        await until(pilot, lambda: bool(replies()), "the reply")
        assert replies()[0].severity == "error"
        assert "no scenario is running" in replies()[0].text


async def test_no_scenarios_no_run_entries() -> None:
    """A twin without a runner (or none for its fleet) offers no "Run scenario" entry."""
    link = await warm_link()
    async with console(link) as (app, _pilot):
        titles = [n for n, _, _ in FleetCommands(app.screen).entries(everything=True)]
        assert not [t for t in titles if t.startswith("Run scenario")]


async def test_rate_keys_step_the_base_rate_during_a_burst() -> None:
    link = await warm_link()
    engine = link.engine
    base = engine.twin.state.workload.rate_per_s
    await engine.command(telemetry.Burst(factor=5.0, duration_s=30.0))
    async with console(link) as (app, pilot):
        assert app.store.summary is not None
        assert app.store.summary.rate_per_s == pytest.approx(5 * base)
        assert app.store.summary.base_rate_per_s == base
        await pilot.press("plus")
        await commands_done(app)
        assert engine.twin.state.workload.rate_per_s == pytest.approx(round(base * RATE_STEP, 2))
        await until(pilot, lambda: app.store.summary.base_rate_per_s != base, "the new rate")
        await pilot.press("minus")
        await commands_done(app)
        assert engine.twin.state.workload.rate_per_s == pytest.approx(
            round(round(base * RATE_STEP, 2) / RATE_STEP, 2)
        )


async def test_weights_dialog_shows_the_current_weights() -> None:
    link = await warm_link()
    await link.engine.command(
        telemetry.SetRouting(policy="weighted", weights={"b200-prefill": 3.0})
    )
    async with console(link) as (app, pilot):
        await pilot.press("w")
        await until(pilot, lambda: isinstance(app.screen, WeightsScreen), "the dialog")
        hints = [i.placeholder for i in app.screen.query("Input").results(Input)]
        assert hints == ["keep (1)", "keep (3)", "keep (1)"]
        await pilot.press("escape")


# ------------------------------------------------------------------------------------------------
# read-only and help


async def test_read_only_hides_and_refuses_everything() -> None:
    link = await warm_link()
    install_scenarios(link.engine, catalog=CATALOG)  # offered by the twin, hidden by the console
    async with console(link, read_only=True) as (app, pilot):
        before = truth(link.engine)
        shown = {b.binding.action for b in app.screen.active_bindings.values()}
        assert not shown & OPERATOR_ACTIONS
        assert "READ-ONLY" in text_of(app.main.query_one(FleetHeader))
        provider = FleetCommands(app.screen)
        titles = {n for n, _, _ in provider.entries(everything=True)}
        assert not titles & {s.title for s in ACTIONS if s.changes_twin}
        assert not any(
            t.startswith(("Degrade", "Fail", "Routing", "Speed", "Rate", "Run scenario", "Stop"))
            for t in titles
        )
        for spec in ACTIONS:
            if spec.changes_twin:
                await pilot.press(spec.keys.split(",")[0])
                await pilot.pause()
                assert isinstance(app.screen, MainScreen), spec.action  # no dialog opened
        app.main.send_cmd(telemetry.Pause(), "pause")  # even a direct call is refused
        app.main.run_scenario("nvidia-groq-lose-prefill")
        app.main.stop_scenario()
        await commands_done(app)
        refused = [e for e in app.store.log if e.kind == "read-only"]
        assert len(refused) == len(OPERATOR_ACTIONS) + 3
        assert "read-only" in text_of(app.main.query_one(EventLog))
        after = truth(link.engine)
        assert after["chips"] == before["chips"]
        assert after["summary"].rate_per_s == before["summary"].rate_per_s
        assert after["summary"].paused and after["summary"].speed == 1.0
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert not any("Change the twin" in title for title, _ in app.screen.sections)


async def test_help_overlay_lists_every_binding() -> None:
    link = await warm_link()
    async with console(link) as (app, pilot):
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = str(app.screen.query_one("#help-text").render())
        for spec in ACTIONS:
            assert spec.key_display in text and spec.help in text
        for b in ChipMap.BINDINGS:
            assert getattr(b, "description", "") in text
        for binding in app.main.BINDINGS:
            if isinstance(binding, Binding) and not app.main.check_action(binding.action, ()):
                continue  # not offered on this link (seek: a replay only)
            assert getattr(binding, "key_display", "") in text
        assert "ctrl+p" in text and "Quit" in text
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


# ------------------------------------------------------------------------------------------------
# a big fleet: 2,000 chips stay readable


def _big_meta() -> tuple[telemetry.Meta, dict[str, telemetry.Chips]]:
    """Telemetry of a synthetic 2,048-chip fleet: 4 tiers of 64 x 8 chips."""
    tiers = []
    chips = {}
    for i, role in enumerate(("prefill", "prefill", "decode", "decode")):
        name = f"t{i}-{role}"
        tiers.append(
            telemetry.TierMeta(
                name=name,
                role=role,
                system="h100-sxm",
                vendor="NVIDIA",
                system_name="H100",
                host_system="",
                instances=64,
                chips_per_instance=8,
                chips=512,
                precision="fp8",
                estimated=False,
                figures={},
            )
        )
        ids = [f"{name}/{k}/{j}" for k in range(64) for j in range(8)]
        chips[name] = telemetry.Chips(
            ts_ms=0,
            tier=name,
            ids=ids,
            instance=[k for k in range(64) for _ in range(8)],
            state=["failed" if n == 100 else "draining" if n == 300 else "up" for n in range(512)],
            utilisation=[(n % 10) / 10 for n in range(512)],
            power_w=[500.0] * 512,
        )
    meta = telemetry.Meta(
        ts_ms=0,
        fleet="big",
        run_id="r",
        model="m",
        slo_ttft_s=1,
        slo_tpot_s=0.05,
        tiers=tiers,
        links=[],
        units={},
    )
    return meta, chips


async def test_chip_map_collapses_2000_chips_to_fit() -> None:
    from textual.app import App, ComposeResult

    meta, chips = _big_meta()

    class MapApp(App[None]):
        def compose(self) -> ComposeResult:
            yield ChipMap()

    app = MapApp()
    async with app.run_test(size=(80, 20)) as pilot:
        chip_map = app.query_one(ChipMap)
        chip_map.set_meta(meta)
        chip_map.set_chips(chips)
        await pilot.pause()
        assert chip_map.chip_count == 2048
        # 2,048 chips do not fit 80 x 20: instances collapsed until the map fits
        assert chip_map.collapsed_instances > 0
        assert chip_map.virtual_size.height <= chip_map.size.height
        started = time.perf_counter()
        text = text_of(chip_map)
        assert time.perf_counter() - started < 0.5
        assert "✗" in text and "◌" in text and "▣" in text  # failed / draining, not by colour
        chip_map.mode = "chips"  # every chip: it scrolls instead
        await pilot.pause()
        assert chip_map.collapsed_instances == 0
        assert chip_map.virtual_size.height > chip_map.size.height
        await pilot.press("end")
        assert chip_map.selected is not None and chip_map.selected.chip_id == "t3-decode/63/7"


# ------------------------------------------------------------------------------------------------
# snapshots (fixed seed, fixed simulated time, paused: stable)


def _snapshot_app(*, fleet: str = FLEET) -> FleetApp:
    link = asyncio.run(warm_link(fleet))
    return FleetApp(link)


async def _settle(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, FleetApp)
    await until(pilot, lambda: ready(app), "the first figures")
    await pilot.pause()
    app.refresh_view()
    await pilot.pause()


def test_snapshot_main_screen(snap_compare: Any) -> None:
    assert snap_compare(_snapshot_app(), terminal_size=SIZE, run_before=_settle)


def test_snapshot_chip_map(snap_compare: Any) -> None:
    """The chip map zoomed, a chip failed and one instance draining."""

    async def run_before(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, FleetApp)
        await _settle(pilot)
        await pilot.press("right", "right", "f", "y")
        await commands_done(app)
        await pilot.press("end", "D")
        await commands_done(app)
        await until(pilot, lambda: app.main.query_one(ChipMap).failed == 1, "the failure")
        await until(pilot, lambda: app.main.query_one(ChipMap).draining == 576, "the drain")
        await pilot.press("home", "z")
        await pilot.pause()

    assert snap_compare(_snapshot_app(), terminal_size=(120, 40), run_before=run_before)


def test_snapshot_all_vendors_small_terminal(snap_compare: Any) -> None:
    """The default fleet at 80 x 24: every panel present, smaller."""
    assert snap_compare(
        _snapshot_app(fleet="all-vendors"), terminal_size=(80, 24), run_before=_settle
    )


# ------------------------------------------------------------------------------------------------
# the command line: mistakes are one line and exit 2, before any console opens


def test_cli_mistakes_fail_before_the_console(capsys: pytest.CaptureFixture[str]) -> None:
    from twin.cli import main

    assert main(["no-such-fleet"]) == 2
    assert "unknown fleet" in capsys.readouterr().err
    assert main(["tui", "--fleet", "nvidia-groq", "--broker", "http://localhost"]) == 2
    assert "mqtt://HOST:PORT" in capsys.readouterr().err
    for argv, what in (
        (["nvidia-groq", "--speed", "-1"], "--speed"),
        (["tui", "--broker", "mqtt://localhost:1883"], "--fleet"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert what in capsys.readouterr().err
