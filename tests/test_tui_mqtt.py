"""The operator console on the MQTT link, against a real Mosquitto and a headless twin (an Engine
on the wall clock and its MqttBridge, in this process): a chip failed from the console comes back
as telemetry; a broker that dies leaves the values on screen marked stale, and the console
reconnects by itself when it returns."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from broker import Broker
from test_tui import commands_done, new_engine, ready, text_of, truth, until
from textual.pilot import Pilot

from tui.app import FleetApp
from tui.commands import FleetCommands
from tui.link_mqtt import MqttLink
from tui.widgets.chip_map import ChipMap
from tui.widgets.header import FleetHeader
from tui.widgets.tier_table import TierTable
from twin import telemetry
from twin.chaos_live import install_scenarios
from twin.engine import Engine
from twin.mqtt import MqttBridge

SIZE = (160, 48)


@contextlib.asynccontextmanager
async def headless_twin(
    broker: Broker, *, scenarios: bool = False
) -> AsyncIterator[tuple[Engine, MqttBridge]]:
    engine = new_engine(speed=1.0)
    if scenarios:  # as `fleet-twin serve` does
        install_scenarios(engine)
    bridge = MqttBridge(engine, broker.url)
    tasks = [asyncio.create_task(engine.run()), asyncio.create_task(bridge.run())]
    try:
        await bridge.wait_connected(10)
        yield engine, bridge
    finally:
        engine.stop()
        bridge.stop()
        for t in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(t, 15)


@contextlib.asynccontextmanager
async def remote_console(
    broker: Broker, fleet: str
) -> AsyncIterator[tuple[FleetApp, Pilot[Any], MqttLink]]:
    link = MqttLink("127.0.0.1", broker.port, fleet, backoff_initial_s=0.2, backoff_max_s=1.0)
    app = FleetApp(link)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: ready(app), "the twin's telemetry over MQTT", timeout=20)
            yield app, pilot, link
    finally:
        await link.stop()


async def test_console_fails_a_chip_over_mqtt(broker: Broker) -> None:
    async with (
        headless_twin(broker) as (engine, _bridge),
        remote_console(broker, engine.fleet) as (app, pilot, link),
    ):
        assert link.state == "connected"
        header = text_of(app.main.query_one(FleetHeader))
        assert f"mqtt://127.0.0.1:{broker.port}" in header and "nvidia-groq" in header
        chip_map = app.main.query_one(ChipMap)
        await pilot.press("right")
        assert chip_map.selected is not None and chip_map.selected.chip_id == "h100-prefill/0/1"
        await pilot.press("f", "y")
        await commands_done(app)
        reply = next(e for e in app.store.log if e.kind == "reply")
        assert reply.severity == "ok", reply
        assert truth(engine)["chips"]["h100-prefill/0/1"] == "failed"
        # ...and the change comes back through the broker: map, tier row, event log
        await until(
            pilot,
            lambda: (
                chip_map.chip_state(chip_map.selected) is not None  # type: ignore[arg-type]
                and chip_map.chip_state(chip_map.selected)[0] == "failed"
            ),  # type: ignore[arg-type,index]
            "the failed chip's telemetry",
            timeout=10,
        )
        await until(
            pilot,
            lambda: app.store.tiers["h100-prefill"].instances_up == 1,
            "the tier's instances up to drop",
            timeout=10,
        )
        assert "1/2" in text_of(app.main.query_one(TierTable))
        assert "✗" in text_of(chip_map).splitlines()[0]
        assert any(e.kind == "chip_failed" for e in app.store.log)  # the twin's event, via MQTT
        # an error reply comes back too, and is shown
        app.main.send_cmd(telemetry.Fail(target="nope/0"), "fail nope/0")
        await commands_done(app)
        errors = [e for e in app.store.log if e.kind == "reply" and e.severity == "error"]
        assert errors and "unknown chip or instance" in errors[0].text


async def test_console_runs_and_stops_a_scenario_over_mqtt(broker: Broker) -> None:
    """The twin's scenarios come with its retained meta; run_scenario and stop_scenario go over
    the broker and their events come back."""
    name = "nvidia-groq-lose-prefill"
    async with (
        headless_twin(broker, scenarios=True) as (engine, _bridge),
        remote_console(broker, engine.fleet) as (app, pilot, _link),
    ):
        assert app.store.meta is not None and app.store.meta.scenarios == [name]
        titles = [n for n, _, _ in FleetCommands(app.screen).entries(everything=False)]
        assert f"Run scenario: {name}" in titles and "Stop scenario" in titles
        rate = engine.twin.state.workload.rate_per_s
        app.main.run_scenario(name)
        await commands_done(app)
        assert [e.severity for e in app.store.log if e.kind == "reply"] == ["ok"]
        await until(
            pilot,
            lambda: any(e.kind == "scenario_started" for e in app.store.log),
            "scenario_started over MQTT",
            timeout=10,
        )
        await until(
            pilot,
            lambda: engine.twin.state.workload.rate_per_s == 60.0,
            "the scenario's rate (its warm-up runs at 1x)",
            timeout=10,
        )
        app.main.stop_scenario()
        await commands_done(app)
        await until(
            pilot,
            lambda: any(e.kind == "scenario_finished" for e in app.store.log),
            "scenario_finished over MQTT",
            timeout=10,
        )
        finished = next(e for e in app.store.log if e.kind == "scenario_finished")
        assert finished.text.startswith("aborted: stopped by the operator"), finished.text
        assert engine.twin.state.workload.rate_per_s == rate  # put back
        assert engine.scenario is None


async def test_broker_loss_marks_stale_then_recovers(broker: Broker) -> None:
    async with (
        headless_twin(broker) as (engine, bridge),
        remote_console(broker, engine.fleet) as (app, pilot, link),
    ):
        header = app.main.query_one(FleetHeader)
        tiers_before = text_of(app.main.query_one(TierTable))
        t_before = app.store.sim_time_s
        broker.kill()  # SIGKILL: no goodbye to anyone
        await until(pilot, lambda: link.state == "stale", "the link to go stale", timeout=10)
        await until(pilot, lambda: "STALE since" in text_of(header), "the header to say stale")
        assert app.main.has_class("-stale")
        # the values stay on screen, marked
        assert text_of(app.main.query_one(TierTable)) == tiers_before
        assert app.store.summary is not None
        await pilot.pause(1.5)
        app.refresh_view()
        since = text_of(header).split("STALE since ")[1].split(" s")[0]
        assert int(since) >= 1
        # a command now cannot be delivered: the error says so
        await pilot.press("plus")
        await commands_done(app)
        err = [e for e in app.store.log if e.kind == "reply" and e.severity == "error"]
        assert err and "not connected" in err[-1].text
        assert any(e.kind == "link" and "stale" in e.text for e in app.store.log)
        # the broker comes back on the same port: bridge and console reconnect by themselves
        broker.start()
        started = time.monotonic()
        await until(
            pilot, lambda: link.state == "connected", "the console to reconnect", timeout=30
        )
        await until(
            pilot,
            lambda: app.store.sim_time_s > t_before + 1.0,
            "fresh figures after the reconnect",
            timeout=15,
        )
        assert link.connects >= 2 and bridge.connects >= 2
        assert "STALE" not in text_of(header) and not app.main.has_class("-stale")
        assert any(e.kind == "link" and "connected" in e.text for e in app.store.log)
        assert time.monotonic() - started < 30


async def test_no_broker_is_offline_and_commands_get_an_error() -> None:
    from broker import free_port

    link = MqttLink("127.0.0.1", free_port(), "nvidia-groq", backoff_initial_s=0.1)
    await link.start()
    try:
        await asyncio.sleep(0.3)
        assert link.state == "offline" and link.stale_since is None
        assert "broker unreachable" in link.detail
        reply = await link.command(telemetry.Pause())
        assert not reply.ok and "not connected" in reply.error
    finally:
        await link.stop()
