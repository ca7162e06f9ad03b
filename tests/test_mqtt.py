"""The twin on MQTT, against a real Mosquitto (a private one per test, see conftest.py).

In-process tests run the engine and the bridge as asyncio tasks at 20x real time; where process
behaviour matters (SIGKILL and the Last Will, SIGTERM, a broker that is not there yet, `watch`),
`python -m twin` runs as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest
from broker import Broker, free_port, make_tls_files, mosquitto_path
from conftest import ACL_USERS
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from twin import telemetry
from twin.build import new_twin
from twin.catalog import ConfigError, load_catalog
from twin.cli import main as cli_main
from twin.engine import Engine
from twin.fleet import load_fleet, resolve_fleet_path
from twin.mqtt import Backoff, BrokerConfig, MqttBridge, parse_broker_url
from twin.serve import credentials, format_summary

REPO = Path(__file__).resolve().parent.parent
FLEET = "nvidia-groq"  # 3 tiers, 5 instances, 2 links: small and quick
ROOT = telemetry.topic_root(FLEET)
CMD = telemetry.command_topic(FLEET)
SPEED = 20.0
DECODE_CHIP = "groq-decode/0/0"


# ------------------------------------------------------------------------------------------------
# helpers


def make_engine(*, speed: float = SPEED, read_only: bool = False) -> Engine:
    catalog = load_catalog()
    twin = new_twin(load_fleet(resolve_fleet_path(FLEET), catalog), catalog, seed=7)
    return Engine(twin, speed=speed, read_only=read_only, catalog=catalog)


@contextlib.asynccontextmanager
async def running_twin(
    url: str, *, speed: float = SPEED, read_only: bool = False, **bridge_kw: Any
) -> AsyncIterator[tuple[Engine, MqttBridge]]:
    """Engine + bridge as tasks; connected on entry, stopped (status offline) on exit."""
    engine = make_engine(speed=speed, read_only=read_only)
    bridge = MqttBridge(engine, url, read_only=read_only, **bridge_kw)
    tasks = [asyncio.create_task(engine.run()), asyncio.create_task(bridge.run())]
    try:
        await bridge.wait_connected(5)
        yield engine, bridge
    finally:
        engine.stop()
        bridge.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


class Listener:
    """A test client: subscribes to topics and keeps what arrives, decoded (commands excluded)."""

    def __init__(
        self,
        broker: Broker,
        topics: list[str],
        *,
        protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V5,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.client = aiomqtt.Client(
            "127.0.0.1",
            broker.port,
            protocol=protocol,
            username=username,
            password=password,
            timeout=5,
        )
        self.topics = topics
        self.pending: list[tuple[aiomqtt.Message, Any]] = []
        self.seen: list[aiomqtt.Message] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Listener:
        await self.client.__aenter__()
        for t in self.topics:
            await self.client.subscribe(t, qos=1)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for m in self.client.messages:
            if str(m.topic) == CMD:
                continue
            self.seen.append(m)
            self.pending.append((m, telemetry.decode_message(_payload(m))))
            self._arrived.set()

    async def next(
        self,
        pred: Callable[[aiomqtt.Message, Any], bool] = lambda m, msg: True,
        timeout: float = 5.0,
    ) -> tuple[aiomqtt.Message, Any]:
        """The oldest message not yet taken (and its decoded telemetry) for which
        pred(message, decoded); messages that do not match stay for a later call."""
        async with asyncio.timeout(timeout):
            while True:
                for i, (m, msg) in enumerate(self.pending):
                    if pred(m, msg):
                        del self.pending[i]
                        return m, msg
                self._arrived.clear()
                await self._arrived.wait()

    async def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        await self.client.publish(topic, payload, qos=1, **kw)


def _payload(m: aiomqtt.Message) -> bytes:
    assert isinstance(m.payload, bytes)
    return m.payload


def kind(msg: Any) -> str:
    return str(msg.__struct_config__.tag)


def is_kind(k: str, **fields: Any) -> Callable[[aiomqtt.Message, Any], bool]:
    def pred(m: aiomqtt.Message, msg: Any) -> bool:
        return kind(msg) == k and all(getattr(msg, f) == v for f, v in fields.items())

    return pred


def request_props(response_topic: str, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    return props


def correlation(m: aiomqtt.Message) -> bytes | None:
    return getattr(m.properties, "CorrelationData", None)


def chip_states(engine: Engine) -> dict[str, str]:
    out: dict[str, str] = {}
    for msg in engine.snapshot_now():
        if isinstance(msg, telemetry.Chips):
            out.update(zip(msg.ids, msg.state, strict=True))
    return out


def conserved(s: telemetry.Summary) -> bool:
    return s.arrived == s.done + s.rejected + s.in_flight


async def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(ENV_PW, None)
    env.pop("FLEET_TWIN_MQTT_USERNAME", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


ENV_PW = "FLEET_TWIN_MQTT_PASSWORD"


async def start_cli(*args: str, stdout: int = subprocess.DEVNULL) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "twin",
        *args,
        cwd=REPO,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
    )


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


# ------------------------------------------------------------------------------------------------
# telemetry


async def test_every_kind_arrives_and_late_subscribers_get_status_and_meta(broker: Broker) -> None:
    async with running_twin(broker.url) as (engine, bridge), Listener(broker, [ROOT + "#"]) as sub:
        tiers = list(engine.twin.layout.tier_names)
        want = {"status", "meta", "summary", "event", "reply"}
        want |= {f"tier/{t}" for t in tiers} | {f"chips/{t}" for t in tiers}
        # An event and a reply need a command: one without a response topic -> <root>reply.
        await sub.publish(CMD, telemetry.encode(telemetry.SetRate(id="r1", rate_per_s=25.0)))
        seen: dict[str, tuple[aiomqtt.Message, Any]] = {}
        async with asyncio.timeout(8):
            while not want <= seen.keys():
                m, msg = await sub.next()
                suffix = str(m.topic).removeprefix(ROOT)
                if kind(msg) == "event" and msg.event != "rate_changed":
                    continue
                seen[suffix] = (m, msg)
        now_ms = time.time() * 1000

        m, status = seen["status"]
        assert m.retain and m.qos == 1
        assert (status.state, status.fleet, status.run_id) == ("online", FLEET, engine.run_id)
        assert status.schema == telemetry.SCHEMA == 1
        m, meta = seen["meta"]
        assert m.retain
        assert meta.fleet == FLEET and meta.run_id == engine.run_id
        assert [t.name for t in meta.tiers] == tiers
        assert meta.slo_ttft_s > 0 and meta.slo_tpot_s > 0 and meta.units
        assert {ln.name for ln in meta.links} == set(engine.twin.layout.link_names)

        _, s = seen["summary"]
        assert s.sim_time_s > 0 and s.speed == SPEED and not s.paused
        assert conserved(s) and s.arrived > 0
        assert s.tokens_per_s >= 0 and s.power_w > 0 and s.tokens_per_joule >= 0
        assert s.goodput_fraction == -1.0 or 0.0 <= s.goodput_fraction <= 1.0
        assert abs(now_ms - s.ts_ms) < 10_000
        for t in tiers:
            _, tier = seen[f"tier/{t}"]
            assert tier.tier == t and tier.role in ("prefill", "decode", "unified")
            assert 0 <= tier.instances_up <= tier.instances and tier.instances > 0
            assert 0.0 <= tier.utilisation <= 1.0 and tier.power_w > 0
            _, chips = seen[f"chips/{t}"]
            n = len(chips.ids)
            assert n > 0 and len(chips.state) == len(chips.power_w) == len(chips.utilisation) == n
            assert set(chips.state) == {"up"} and min(chips.power_w) > 0
        m, event = seen["event"]
        assert m.qos == 1 and (event.event, event.target) == ("rate_changed", "workload")
        m, reply = seen["reply"]
        assert (reply.id, reply.ok, reply.error) == ("r1", True, "")

        # A subscriber that comes late still gets the retained status and meta.
        async with Listener(broker, [ROOT + "status", ROOT + "meta"]) as late:
            m1, st = await late.next(is_kind("status"), timeout=2)
            m2, mt = await late.next(is_kind("meta"), timeout=2)
            assert m1.retain and st.state == "online" and st.run_id == engine.run_id
            assert m2.retain and mt.run_id == engine.run_id
        assert bridge.connects == 1


# ------------------------------------------------------------------------------------------------
# commands


async def test_command_round_trip_mqtt5(broker: Broker) -> None:
    reply_topic = ROOT + "reply/test-v5"
    async with (
        running_twin(broker.url) as (engine, _),
        Listener(broker, [reply_topic, ROOT + "event", ROOT + "chips/+"]) as sub,
    ):
        cmd = telemetry.Fail(id="f1", target=DECODE_CHIP)
        await sub.publish(CMD, telemetry.encode(cmd), properties=request_props(reply_topic, b"c-1"))
        m, reply = await sub.next(is_kind("reply"))
        assert str(m.topic) == reply_topic
        assert correlation(m) == b"c-1"
        assert (reply.id, reply.ok, reply.error) == ("f1", True, "")
        assert DECODE_CHIP in reply.detail
        _, event = await sub.next(is_kind("event", event="chip_failed"))
        assert event.target == DECODE_CHIP and event.severity == "error"
        # The next chips snapshot of the tier (made after the command was applied) shows it.
        _, chips = await sub.next(
            lambda m, msg: (
                is_kind("chips", tier="groq-decode")(m, msg) and msg.ts_ms >= reply.ts_ms
            ),
            timeout=3,
        )
        states = dict(zip(chips.ids, chips.state, strict=True))
        assert states[DECODE_CHIP] == "failed"
        assert chip_states(engine)[DECODE_CHIP] == "failed"


async def test_command_round_trip_mqtt311_reply_to_and_default_reply_topic(broker: Broker) -> None:
    reply_topic = ROOT + "reply/test-v311"
    async with (
        running_twin(broker.url) as (engine, _),
        Listener(
            broker, [reply_topic, ROOT + "reply"], protocol=aiomqtt.ProtocolVersion.V311
        ) as sub,
    ):
        fail = telemetry.Fail(id="f2", target="groq-decode/0", reply_to=reply_topic)
        await sub.publish(CMD, telemetry.encode(fail))
        m, reply = await sub.next(is_kind("reply"))
        assert str(m.topic) == reply_topic
        assert (reply.id, reply.ok) == ("f2", True)
        assert "instance groq-decode/0" in reply.detail
        assert {s for c, s in chip_states(engine).items() if c.startswith("groq-decode/0/")} == {
            "failed"
        }
        # No response topic, no reply_to: the reply goes to <root>reply.
        await sub.publish(CMD, telemetry.encode(telemetry.Recover(id="r2", target="groq-decode/0")))
        m, reply = await sub.next(is_kind("reply"))
        assert str(m.topic) == ROOT + "reply"
        assert (reply.id, reply.ok) == ("r2", True)
        assert set(chip_states(engine).values()) == {"up"}


BAD_COMMANDS: list[tuple[bytes, str]] = [
    (b"this is not json", "payload"),
    (b"[1, 2, 3]", "payload"),
    (b'{"cmd": "explode", "id": "x"}', "unknown command 'explode'"),
    (b'{"cmd": "fail", "id": "x"}', "target: missing"),
    (b'{"cmd": "fail", "target": 5}', "target: expected a string"),
    (b'{"cmd": "fail", "target": "nope-decode/9/9"}', "unknown chip or instance 'nope-decode/9/9'"),
    (b'{"cmd": "fail", "target": "groq-decode/0/99999"}', "'groq-decode/0/99999'"),
    (b'{"cmd": "degrade_link", "link": "h100-prefill->groq-decode", "factor": 1.5}', "factor"),
    (b'{"cmd": "degrade_link", "link": "a->b", "factor": 0.5}', "unknown link 'a->b'"),
    (b'{"cmd": "set_rate", "rate_per_s": -3}', "rate_per_s"),
    (b'{"cmd": "set_speed", "speed": "fast"}', "speed: expected a number"),
    (b'{"cmd": "set_routing", "policy": "random"}', "policy"),
    (b'{"cmd": "set_routing", "policy": "weighted", "weights": {"x": 1}}', "weights.x"),
    (b'{"cmd": "pause", "pad": "' + b"x" * 70_000 + b'"}', "byte limit"),
]


async def test_bad_commands_get_error_replies_and_change_nothing(broker: Broker) -> None:
    reply_topic = ROOT + "reply/test-bad"
    async with (
        running_twin(broker.url) as (engine, bridge),
        Listener(broker, [reply_topic, ROOT + "summary"]) as sub,
    ):
        _, before = await sub.next(is_kind("summary"))
        for i, (payload, _) in enumerate(BAD_COMMANDS):
            props = request_props(reply_topic, str(i).encode())
            await sub.publish(CMD, payload, properties=props)
        for i, (payload, expected) in enumerate(BAD_COMMANDS):
            m, reply = await sub.next(is_kind("reply"))
            assert correlation(m) == str(i).encode(), (i, reply)
            assert not reply.ok, payload[:80]
            assert expected in reply.error, (payload[:80], reply.error)
            assert "\n" not in reply.error
        # Nothing changed, and the twin keeps running.
        assert set(chip_states(engine).values()) == {"up"}
        _, after = await sub.next(is_kind("summary"))
        assert after.sim_time_s > before.sim_time_s
        assert after.rate_per_s == before.rate_per_s and after.speed == SPEED
        assert after.policy == before.policy
        assert [ln.factor for ln in after.links] == [1.0] * len(after.links)
        assert conserved(after)
        assert bridge.connected and bridge.commands == len(BAD_COMMANDS)
        # ... and still takes a good command.
        props = request_props(reply_topic, b"ok")
        await sub.publish(CMD, telemetry.encode(telemetry.Pause(id="p")), properties=props)
        _, reply = await sub.next(is_kind("reply"))
        assert reply.ok and reply.id == "p"


async def test_read_only_twin_refuses_every_command(broker: Broker) -> None:
    reply_topic = ROOT + "reply/test-ro"
    async with (
        running_twin(broker.url, read_only=True) as (engine, _),
        Listener(broker, [reply_topic]) as sub,
    ):
        payloads = [
            telemetry.encode(telemetry.Fail(id="a", target=DECODE_CHIP)),
            telemetry.encode(telemetry.SetRate(id="b", rate_per_s=1.0)),
            b"not json at all",
        ]
        for p in payloads:
            await sub.publish(CMD, p, properties=request_props(reply_topic, b"ro"))
        for _ in payloads:
            _, reply = await sub.next(is_kind("reply"))
            assert not reply.ok and "read-only" in reply.error
        assert set(chip_states(engine).values()) == {"up"}
        assert engine.twin.state.workload.rate_per_s == engine.twin.fleet.workload.rate_per_s


async def test_read_only_bridge_on_a_writable_engine(broker: Broker) -> None:
    engine = make_engine()
    bridge = MqttBridge(engine, broker.url, read_only=True)
    tasks = [asyncio.create_task(engine.run()), asyncio.create_task(bridge.run())]
    try:
        await bridge.wait_connected(5)
        async with Listener(broker, [ROOT + "reply"]) as sub:
            await sub.publish(CMD, telemetry.encode(telemetry.Fail(id="w", target=DECODE_CHIP)))
            _, reply = await sub.next(is_kind("reply"))
            assert (reply.id, reply.ok) == ("w", False) and "read-only" in reply.error
        assert set(chip_states(engine).values()) == {"up"}
    finally:
        engine.stop()
        bridge.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def test_the_bridge_keeps_up_with_an_engine_running_flat_out(broker: Broker) -> None:
    """At speed 0 the engine computes without pause and leaves the bridge one event-loop turn
    per tick; the bridge must still get everything out (all-vendors: ~5 messages per tick).
    The subscriber is another process (mosquitto_sub): one in this event loop would itself be
    starved by the engine."""
    exe = shutil.which("mosquitto_sub")
    if exe is None:
        pytest.skip("mosquitto_sub is not installed (package mosquitto-clients)")
    catalog = load_catalog()
    twin = new_twin(load_fleet(resolve_fleet_path("all-vendors"), catalog), catalog, seed=3)
    engine = Engine(twin, speed=0, catalog=catalog)
    bridge = MqttBridge(engine, broker.url)
    topic = telemetry.topic_root("all-vendors") + "summary"
    tasks = [asyncio.create_task(engine.run()), asyncio.create_task(bridge.run())]
    sub = await asyncio.create_subprocess_exec(
        exe, "-p", str(broker.port), "-t", topic, stdout=subprocess.PIPE, limit=1 << 20
    )
    try:
        await bridge.wait_connected(5)
        assert sub.stdout is not None
        received: list[telemetry.Summary] = []

        async def read() -> None:
            assert sub.stdout is not None
            while line := await sub.stdout.readline():
                msg = telemetry.decode_message(line)
                assert isinstance(msg, telemetry.Summary)
                received.append(msg)

        reader = asyncio.create_task(read())
        await asyncio.sleep(2.0)
        behind = engine.sim_time_s - received[-1].sim_time_s
        reader.cancel()
        last = received[-1]
        assert len(received) > 20
        assert last.dropped_snapshots == 0 and bridge.dropped_backlog == 0
        # The newest summary out is only a few ticks (0.1 s of simulated time each) behind.
        assert behind < 3.0, (behind, len(received))
        assert all(conserved(s) for s in received)
    finally:
        await stop_process(sub)
        engine.stop()
        bridge.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


# ------------------------------------------------------------------------------------------------
# the broker goes away


async def test_broker_restart_reconnects_and_the_twin_keeps_running(broker: Broker) -> None:
    async with running_twin(broker.url) as (engine, bridge):
        async with Listener(broker, [ROOT + "summary"]) as sub:
            _, s0 = await sub.next(is_kind("summary"))
        t0 = engine.sim_time_s
        # Down for a second; the event loop (and so the engine) runs on meanwhile.
        await asyncio.to_thread(broker.restart, 1.0)
        t_down = engine.sim_time_s
        assert t_down - t0 >= 0.5 * SPEED, "the engine stalled while the broker was away"
        await wait_until(lambda: bridge.connects >= 2 and bridge.connected, 8, "a reconnect")
        async with Listener(broker, [ROOT + "status", ROOT + "summary", ROOT + "meta"]) as sub:
            m, status = await sub.next(is_kind("status"))
            assert m.retain and status.state == "online" and status.run_id == engine.run_id
            await sub.next(is_kind("meta"))
            _, s1 = await sub.next(is_kind("summary"))
        assert s1.sim_time_s >= t_down > s0.sim_time_s
        assert conserved(s0) and conserved(s1)
        assert s1.arrived > s0.arrived
        assert bridge.dropped_offline > 0


# ------------------------------------------------------------------------------------------------
# the process (subprocess: `python -m twin serve`)


async def test_sigkill_makes_the_broker_publish_the_last_will(broker: Broker) -> None:
    proc = await start_cli("serve", FLEET, "--broker", broker.url, "--speed", "5")
    try:
        async with Listener(broker, [ROOT + "status"]) as sub:
            _, online = await sub.next(is_kind("status", state="online"), timeout=15)
            proc.kill()
            await proc.wait()
            _, offline = await sub.next(is_kind("status", state="offline"), timeout=5)
            assert offline.run_id == online.run_id and offline.fleet == FLEET
        async with Listener(broker, [ROOT + "status"]) as late:
            m, st = await late.next(timeout=2)
            assert m.retain and st.state == "offline" and st.run_id == online.run_id
    finally:
        await stop_process(proc)


async def test_serve_waits_for_a_missing_broker_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    late_broker = Broker(tmp_path / "late", port=free_port())
    proc = await start_cli("serve", FLEET, "--broker", late_broker.url, "--speed", "5")
    try:
        await asyncio.sleep(1.5)  # the twin starts, finds no broker, retries
        assert proc.returncode is None
        late_broker.start()
        async with Listener(late_broker, [ROOT + "status"]) as sub:
            _, online = await sub.next(is_kind("status", state="online"), timeout=12)
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(proc.wait(), 10)
            _, offline = await sub.next(is_kind("status", state="offline"), timeout=3)
            assert offline.run_id == online.run_id
        assert rc == 0
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        assert "Traceback" not in err, err
        unavailable = [ln for ln in err.splitlines() if "unavailable" in ln]
        assert len(unavailable) == 1, err
        assert late_broker.url in unavailable[0]
        assert "connected to" in err and "status offline published" in err
    finally:
        await stop_process(proc)
        late_broker.stop()


# ------------------------------------------------------------------------------------------------
# ACL (the shipped deploy/mosquitto/acl, a password file made now with mosquitto_passwd -b)


async def test_acl_only_the_operator_account_can_command(acl_broker: Broker) -> None:
    def creds(user: str) -> dict[str, Any]:
        return {"username": user, "password": ACL_USERS[user]}

    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", acl_broker.port, timeout=3):
            pass
    async with (
        running_twin(acl_broker.url, **creds("twin")) as (engine, bridge),
        Listener(acl_broker, [ROOT + "reply/#"], **creds("operator")) as op,
        Listener(acl_broker, [ROOT + "summary", ROOT + "status"], **creds("viewer")) as viewer,
    ):
        # The viewer reads telemetry ...
        await viewer.next(is_kind("summary"))
        await viewer.next(is_kind("status", state="online"))
        # ... but its command is dropped by the broker (the PUBACK says not authorised).
        sneaky = telemetry.Fail(id="viewer", target=DECODE_CHIP, reply_to=ROOT + "reply/v")
        await viewer.publish(CMD, telemetry.encode(sneaky))
        # Then the operator's (the viewer's PUBACK came first, so the broker has seen it).
        ok = telemetry.Resume(id="operator", reply_to=ROOT + "reply/op")
        await op.publish(CMD, telemetry.encode(ok))
        _, reply = await op.next(is_kind("reply"))
        assert (reply.id, reply.ok) == ("operator", True)
        assert bridge.commands == 1
        assert set(chip_states(engine).values()) == {"up"}
        assert not [m for m in op.seen if b'"viewer"' in _payload(m)]
        # The same command from the operator takes effect.
        fail = telemetry.Fail(id="op-fail", target=DECODE_CHIP, reply_to=ROOT + "reply/op")
        await op.publish(CMD, telemetry.encode(fail))
        _, reply = await op.next(is_kind("reply"))
        assert (reply.id, reply.ok) == ("op-fail", True)
        assert chip_states(engine)[DECODE_CHIP] == "failed"


async def test_tls_broker(tmp_path: Path) -> None:
    if mosquitto_path() is None or shutil.which("openssl") is None:
        pytest.skip("mosquitto and openssl are needed")
    tls = make_tls_files(tmp_path / "tls")
    b = Broker(tmp_path / "mosquitto-tls", tls=tls)
    b.start()
    try:
        assert b.url.startswith("mqtts://")
        # No CA given: the system store does not know the test CA, so no connection.
        engine = make_engine()
        untrusted = MqttBridge(engine, b.url)
        task = asyncio.create_task(untrusted.run())
        await asyncio.sleep(1.0)
        assert not untrusted.connected
        untrusted.stop()
        await asyncio.wait_for(task, 10)
        async with running_twin(b.url, tls_ca=str(tls.ca_cert)) as (engine, bridge):
            assert bridge.connected and bridge.config.url.tls
            ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
            async with aiomqtt.Client("127.0.0.1", b.port, tls_context=ctx) as c:
                await c.subscribe(ROOT + "status")
                async with asyncio.timeout(3):
                    m = await anext(aiter(c.messages))
                st = telemetry.decode_message(_payload(m))
                assert isinstance(st, telemetry.Status) and st.state == "online"
    finally:
        b.stop()


# ------------------------------------------------------------------------------------------------
# watch


async def test_watch_json_prints_summary_lines(broker: Broker) -> None:
    async with running_twin(broker.url):
        proc = await start_cli(
            "watch", "--broker", broker.url, "--fleet", FLEET, "--json", "--count", "3",
            stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 10)
        finally:
            await stop_process(proc)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    msgs = [telemetry.decode_message(line) for line in lines]
    summaries = [m for m in msgs if isinstance(m, telemetry.Summary)]
    assert len(summaries) == 3
    assert all(conserved(s) and s.sim_time_s > 0 for s in summaries)
    assert [m.state for m in msgs if isinstance(m, telemetry.Status)] == ["online"]
    assert all(json.loads(line)["kind"] in ("summary", "status") for line in lines)


async def test_watch_prints_a_line_per_summary_and_exits_0_on_ctrl_c(broker: Broker) -> None:
    async with running_twin(broker.url):
        proc = await start_cli(
            "watch", "--broker", broker.url, "--fleet", FLEET, stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            lines: list[str] = []
            async with asyncio.timeout(8):
                while len([ln for ln in lines if ln.startswith("t=")]) < 2:
                    lines.append((await proc.stdout.readline()).decode())
            proc.send_signal(signal.SIGINT)
            rc = await asyncio.wait_for(proc.wait(), 5)
        finally:
            await stop_process(proc)
    assert rc == 0
    assert lines[0].startswith(f"# {FLEET} online")
    line = next(ln for ln in lines if ln.startswith("t="))
    for word in ("/s", "tok", "TTFT p99", "TPOT p99", "goodput", "kW", "in flight"):
        assert word in line, line
    assert proc.stderr is not None
    assert "Traceback" not in (await proc.stderr.read()).decode()


def test_format_summary_marks_missing_data() -> None:
    s = telemetry.Summary(
        ts_ms=0, sim_time_s=12.5, lag_s=0.0, speed=1.0, paused=False, arrivals_per_s=3.0,
        rate_per_s=3.0, arrived=10, done=5, rejected=0, rejected_no_capacity=0,
        rejected_retry_budget=0, in_flight=5, retries=0, tokens_per_s=1234.0,
        prefill_tokens_per_s=9999.0, ttft_p50_s=-1.0, ttft_p99_s=-1.0, tpot_p50_s=0.01,
        tpot_p99_s=0.02, goodput_fraction=-1.0, power_w=25_000.0, tokens_per_joule=0.05,
        policy="least_loaded", dropped_snapshots=0, links=[],
    )  # fmt: skip
    line = format_summary(s)
    assert "t=     12.5s" in line and "TTFT p99       - s" in line
    assert "TPOT p99   20.0 ms" in line and "goodput     -%" in line and "25.0 kW" in line


# ------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://localhost", "localhost", 1883, False),
        ("mqtt://10.0.0.5:1884", "10.0.0.5", 1884, False),
        ("mqtts://broker.example:8884", "broker.example", 8884, True),
        ("MQTTS://broker.example/", "broker.example", 8883, True),
        ("mqtt://[::1]:1883", "::1", 1883, False),
    ],
)
def test_broker_urls(url: str, host: str, port: int, tls: bool) -> None:
    u = parse_broker_url(url)
    assert (u.host, u.port, u.tls) == (host, port, tls)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("localhost:1883", "expected mqtt://HOST:PORT"),
        ("http://localhost:1883", "unknown scheme 'http'"),
        ("mqtt://localhost:99999", "expected mqtt://HOST:PORT"),
        ("mqtt://localhost:port", "expected mqtt://HOST:PORT"),
        ("mqtt://:1883", "no host"),
        ("mqtt://user:secret@localhost", "credentials do not belong in the URL"),
        ("mqtt://localhost:1883/topic", "unexpected path"),
    ],
)
def test_bad_broker_urls_are_one_line_config_errors(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_broker_url(url)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_tls_options_need_mqtts_and_existing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="need an mqtts://"):
        BrokerConfig.make("mqtt://localhost", tls_ca=str(tmp_path / "ca.pem"))
    with pytest.raises(ConfigError, match=r"--tls-ca .*: no such file"):
        BrokerConfig.make("mqtts://localhost", tls_ca=str(tmp_path / "ca.pem"))
    assert BrokerConfig.make("mqtts://localhost").tls_context is not None


def test_credentials_from_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    monkeypatch.delenv(ENV_PW, raising=False)
    monkeypatch.delenv("FLEET_TWIN_MQTT_USERNAME", raising=False)
    pw = tmp_path / "pw"
    pw.write_text("s3cret\nignored\n")

    def ns(**kw: Any) -> argparse.Namespace:
        return argparse.Namespace(**{"username": None, "password_file": None, **kw})

    assert credentials(ns()) == (None, None)
    assert credentials(ns(username="u", password_file=str(pw))) == ("u", "s3cret")
    with pytest.raises(ConfigError, match="needs --username"):
        credentials(ns(password_file=str(pw)))
    with pytest.raises(ConfigError, match="cannot read"):
        credentials(ns(username="u", password_file=str(tmp_path / "missing")))
    monkeypatch.setenv(ENV_PW, "from-env")
    monkeypatch.setenv("FLEET_TWIN_MQTT_USERNAME", "envuser")
    assert credentials(ns()) == ("envuser", "from-env")
    assert credentials(ns(username="u", password_file=str(pw))) == ("u", "s3cret")


def test_cli_mistakes_are_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["serve", FLEET, "--broker", "http://localhost:1883"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown scheme 'http'" in err
    with pytest.raises(SystemExit) as e:
        cli_main(["serve", FLEET, "--broker", "mqtt://localhost", "--password", "x"])
    assert e.value.code == 2
    assert "unrecognized arguments: --password" in capsys.readouterr().err
    assert cli_main(["watch", "--broker", "tcp://x", "--fleet", FLEET]) == 2
    assert "fleet-twin: error: --broker 'tcp://x'" in capsys.readouterr().err


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    import random

    b = Backoff(rng=random.Random(1))
    delays = [b.delay() for _ in range(8)]
    for d, nominal in zip(delays, [0.5, 1, 2, 4, 8, 10, 10, 10], strict=True):
        assert 0.75 * nominal <= d <= min(10.0, 1.25 * nominal)
    b.reset()
    assert b.delay() <= 0.625


def test_topics_and_payloads_match_the_wire_contract() -> None:
    # DESIGN.md's table: retained status/meta QoS 1; summary/tier/chips QoS 0; event/cmd QoS 1.
    spec = {k: (v.retained, v.qos) for k, v in telemetry.TOPICS.items()}
    assert spec == {
        "status": (True, 1),
        "meta": (True, 1),
        "summary": (False, 0),
        "tier": (False, 0),
        "chips": (False, 0),
        "event": (False, 1),
        "cmd": (False, 1),
    }
    assert msgspec.json.decode(telemetry.encode(telemetry.Pause()))["cmd"] == "pause"
