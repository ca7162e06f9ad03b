"""The MQTT side of the live twin: the only module in `twin/` that imports aiomqtt.

`MqttBridge` connects an `Engine` to a broker (schema v1, DESIGN.md's topic table, which
`twin.telemetry.TOPICS` encodes):

- on every (re)connect: subscribe to `<root>cmd`, publish the retained `status` (online, with
  the run id and schema) and the retained `meta`, then a fresh snapshot (summary, tiers, chips);
  the Last Will is the retained `status` offline, and a clean shutdown publishes it explicitly;
- telemetry: every message of the engine's (bounded) subscription goes to `topic_for(msg)`
  with its QoS and retain flag. The bridge never blocks the engine: the subscription drops its
  oldest messages when the bridge falls behind. While the broker is away, summaries, tiers and
  chips are dropped (stale live figures are worthless; a fresh snapshot follows the reconnect)
  and events are kept (the last `EVENT_BACKLOG`) and published after it;
- commands: MQTT 5. A reply goes to the request's response topic with its correlation data;
  failing that (an MQTT 3.1.1 client) to the payload's `reply_to`; failing both, to
  `<root>reply`. Every command gets a reply, errors included (`Engine.handle_payload`);
- reconnects forever, with jittered exponential backoff (0.5 s doubling to 10 s), logging one
  line per connection state change.

`watch_messages` is the read side used by `fleet-twin watch` (and anything else that wants the
twin's telemetry without the engine).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from twin import telemetry
from twin.catalog import ConfigError

if TYPE_CHECKING:
    from twin.engine import Engine, Subscription

__all__ = [
    "BACKOFF_INITIAL_S",
    "BACKOFF_MAX_S",
    "Backoff",
    "BrokerConfig",
    "BrokerUrl",
    "MqttBridge",
    "parse_broker_url",
    "watch_messages",
]

log = logging.getLogger("twin.mqtt")
# paho's own chatter (via aiomqtt) only when something is wrong.
_PAHO_LOG = logging.getLogger("twin.mqtt.paho")
_PAHO_LOG.setLevel(logging.WARNING)

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 10.0
#: A connection that lived this long resets the backoff to its initial delay.
STABLE_CONNECTION_S = 5.0
#: Events kept while the broker is away, published after the reconnect (oldest dropped first).
EVENT_BACKLOG = 256
#: The engine's subscription, in messages (summary + tiers + chips of a few ticks).
SUBSCRIPTION_SIZE = 1024
#: Publishes handed to the client and not finished yet, beyond which QoS 0 telemetry is dropped
#: (a broker or network slower than the twin must not grow memory without bound).
MAX_PENDING_PUBLISHES = 2048
#: A command the engine has not applied within this long gets an error reply.
COMMAND_TIMEOUT_S = 10.0
#: MQTT keepalive: a dead broker is noticed within ~1.5x this when nothing else fails first.
KEEPALIVE_S = 15
#: Connect / subscribe / acknowledged-publish timeout.
OP_TIMEOUT_S = 5.0

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


# ------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerUrl:
    """`mqtt://HOST[:PORT]` (1883) or `mqtts://HOST[:PORT]` (TLS, 8883); ConfigError otherwise."""
    text = url.strip()
    bad = f"--broker {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT"
    if "://" not in text:
        raise ConfigError(bad)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{bad} ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ConfigError(f"{bad} (unknown scheme {parts.scheme!r})")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"--broker {url!r}: credentials do not belong in the URL; use --username and "
            "--password-file (or FLEET_TWIN_MQTT_PASSWORD)"
        )
    if not parts.hostname:
        raise ConfigError(f"{bad} (no host)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{bad} (unexpected path or query)")
    if port == 0:
        raise ConfigError(f"{bad} (port 0)")
    return BrokerUrl(parts.hostname, port or _DEFAULT_PORTS[scheme], scheme == "mqtts")


def _tls_context(
    url: BrokerUrl, ca: str | None, cert: str | None, key: str | None
) -> ssl.SSLContext | None:
    if not url.tls:
        if ca or cert or key:
            raise ConfigError(
                f"--broker {url}: TLS options need an mqtts:// URL (this one is plain MQTT)"
            )
        return None
    if key and not cert:
        raise ConfigError("--tls-key needs --tls-cert")
    for opt, path in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{opt} {path}: no such file")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"TLS setup: {' '.join(str(e).split())}") from None
    return ctx


@dataclass(frozen=True)
class BrokerConfig:
    """Everything needed to open a connection: parsed URL, credentials, TLS, client id."""

    url: BrokerUrl
    username: str | None = None
    password: str | None = None
    tls_context: ssl.SSLContext | None = None
    client_id: str | None = None

    @classmethod
    def make(
        cls,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        client_id: str | None = None,
    ) -> BrokerConfig:
        parsed = parse_broker_url(url)
        if password is not None and not username:
            raise ConfigError("a broker password needs a --username")
        if client_id is not None and not client_id.strip():
            raise ConfigError("--client-id: expected a non-empty string")
        return cls(
            url=parsed,
            username=username or None,
            password=password,
            tls_context=_tls_context(parsed, tls_ca, tls_cert, tls_key),
            client_id=client_id,
        )

    def client(self, *, identifier: str, will: aiomqtt.Will | None = None) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self.url.host,
            self.url.port,
            username=self.username,
            password=self.password,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            clean_start=True,
            keepalive=KEEPALIVE_S,
            timeout=OP_TIMEOUT_S,
            tls_context=self.tls_context,
            logger=_PAHO_LOG,
        )
        # aiomqtt warns past 10 unfinished calls; the bridge bounds them itself.
        client.pending_calls_threshold = MAX_PENDING_PUBLISHES + 64
        return client


class Backoff:
    """Jittered exponential backoff: 0.5 s doubling to 10 s, each delay x U(0.75, 1.25)."""

    def __init__(
        self,
        initial_s: float = BACKOFF_INITIAL_S,
        max_s: float = BACKOFF_MAX_S,
        rng: random.Random | None = None,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._next = initial_s
        self._rng = rng or random.Random()

    def reset(self) -> None:
        self._next = self.initial_s

    def delay(self) -> float:
        d = min(self.max_s, self._next * self._rng.uniform(0.75, 1.25))
        self._next = min(self.max_s, self._next * 2.0)
        return d


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    cause = e.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {' '.join(str(cause).split())}"
    return text or type(e).__name__


def _valid_publish_topic(topic: str) -> bool:
    return (
        bool(topic)
        and "+" not in topic
        and "#" not in topic
        and "\x00" not in topic
        and len(topic.encode()) <= 65535
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


class _ConnectionLog:
    """One log line per connection state change; repeats go to DEBUG."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.state = "starting"

    def connected(self, detail: str) -> None:
        self.state = "connected"
        log.info("%s: connected to %s", self.what, detail)

    def failed(self, url: BrokerUrl, e: BaseException) -> None:
        if self.state == "connected":
            log.warning("%s: connection to %s lost (%s); reconnecting", self.what, url, _reason(e))
        elif self.state != "retrying":
            log.warning(
                "%s: broker %s unavailable (%s); retrying every %g-%g s",
                self.what,
                url,
                _reason(e),
                BACKOFF_INITIAL_S,
                BACKOFF_MAX_S,
            )
        else:
            log.debug("%s: broker %s still unavailable (%s)", self.what, url, _reason(e))
        self.state = "retrying"

    def closed(self, detail: str) -> None:
        self.state = "closed"
        log.info("%s: %s", self.what, detail)


async def _sleep_or_stop(stop: asyncio.Event, delay_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay_s)


# ------------------------------------------------------------------------------------------------
# the bridge


class MqttBridge:
    """Publishes an engine's telemetry and feeds it commands, over one MQTT 5 connection that is
    re-established forever. `await run()` until `stop()`; a clean stop publishes status offline.
    """

    def __init__(
        self,
        engine: Engine,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        client_id: str | None = None,
        read_only: bool = False,
    ) -> None:
        self.engine = engine
        self.config = BrokerConfig.make(
            url,
            username=username,
            password=password,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            client_id=client_id,
        )
        self.read_only = read_only
        self.fleet: str = engine.fleet
        self.run_id: str = engine.run_id
        self.root: str = telemetry.topic_root(self.fleet)
        self.cmd_topic: str = telemetry.command_topic(self.fleet)
        self.reply_topic: str = self.root + "reply"
        self.client_id: str = client_id or f"fleet-twin-{self.fleet}-{self.run_id[:8]}"[:64]
        #: Connections made so far (1 after the first connect, 2 after a reconnect, ...).
        self.connects = 0
        #: Telemetry messages published / dropped while disconnected (not counting events).
        self.published = 0
        self.dropped_offline = 0
        #: Telemetry messages dropped because MAX_PENDING_PUBLISHES were unfinished.
        self.dropped_backlog = 0
        self.commands = 0
        self._client: aiomqtt.Client | None = None
        self._stop = asyncio.Event()
        self._connected = asyncio.Event()
        self._events: collections.deque[telemetry.Message] = collections.deque(maxlen=EVENT_BACKLOG)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = _ConnectionLog(f"mqtt bridge {self.fleet}")
        self._backoff = Backoff()

    # --------------------------------------------------------------------------------------------
    # public

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    def stop(self) -> None:
        """Ask `run()` to publish status offline, disconnect and return."""
        self._stop.set()

    async def run(self) -> None:
        sub = self.engine.subscribe(maxsize=SUBSCRIPTION_SIZE)
        pump = asyncio.create_task(self._pump(sub), name="mqtt-pump")
        try:
            await self._connection_loop()
        finally:
            pump.cancel()
            sub.close()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    # --------------------------------------------------------------------------------------------
    # connection

    def _status(self, state: str) -> telemetry.Status:
        return self.engine.status(state)

    def _will(self) -> aiomqtt.Will:
        spec = telemetry.TOPICS["status"]
        return aiomqtt.Will(
            topic=self.root + spec.suffix,
            payload=telemetry.encode(self._status("offline")),
            qos=spec.qos,
            retain=spec.retained,
        )

    async def _connection_loop(self) -> None:
        while not self._stop.is_set():
            client = self.config.client(identifier=self.client_id, will=self._will())
            started = time.monotonic()
            try:
                async with client:
                    await self._on_connect(client)
                    try:
                        await self._serve(client)
                    finally:
                        self._client = None
                        self._connected.clear()
                    # stop() was called: say goodbye while the connection still stands.
                    await self._publish_status(client, "offline")
                    self._log.closed(
                        f"status offline published; disconnected from {self.config.url}"
                    )
                    return
            except aiomqtt.MqttError as e:
                self._client = None
                self._connected.clear()
                if time.monotonic() - started >= STABLE_CONNECTION_S:
                    self._backoff.reset()
                self._log.failed(self.config.url, e)
            await _sleep_or_stop(self._stop, self._backoff.delay())
        await self._last_word()

    async def _last_word(self) -> None:
        """Stopped while the broker was away: one short try to leave status offline behind."""
        client = self.config.client(identifier=self.client_id, will=self._will())
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                async with client:
                    await self._publish_status(client, "offline")
            self._log.closed(f"status offline published to {self.config.url}")
        except (aiomqtt.MqttError, TimeoutError) as e:
            self._log.closed(f"stopped without reaching {self.config.url} ({_reason(e)})")

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.cmd_topic, qos=telemetry.TOPICS["cmd"].qos)
        await self._publish_status(client, "online")
        await self._publish(client, self.engine.meta)
        self.connects += 1
        self._client = client
        self._connected.set()
        self._log.connected(
            f"{self.config.url} as {self.client_id} (topics {self.root}#, "
            f"commands {'refused: read-only' if self.read_only else 'accepted'})"
        )
        # Events that happened while the broker was away, then the figures as they are now.
        while self._events:
            self._send(client, self._events.popleft())
        for msg in self.engine.snapshot_now():
            self._send(client, msg)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Commands until stop() (returns) or the connection is lost (raises MqttError)."""
        commands = asyncio.create_task(self._command_loop(client), name="mqtt-commands")
        stopper = asyncio.create_task(self._stop.wait(), name="mqtt-stop")
        try:
            done, _ = await asyncio.wait({commands, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if commands in done:
                commands.result()  # raises the MqttError of a lost connection
                raise aiomqtt.MqttError("the message stream ended")
        finally:
            for t in (commands, stopper):
                t.cancel()
            await asyncio.gather(commands, stopper, return_exceptions=True)

    async def _command_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if not message.topic.matches(self.cmd_topic):
                continue
            await self._handle_command(client, message)

    # --------------------------------------------------------------------------------------------
    # commands

    async def _handle_command(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        self.commands += 1
        raw = message.payload
        payload = raw if isinstance(raw, bytes) else bytes(str(raw or ""), "utf-8")
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        envelope = telemetry.peek_envelope(payload)
        topic = self.reply_topic
        for candidate in (response_topic, envelope.reply_to):
            if candidate and _valid_publish_topic(candidate):
                topic = candidate
                break
        reply = await self._reply_for(payload, envelope)
        properties = Properties(PacketTypes.PUBLISH)
        if correlation:
            properties.CorrelationData = correlation
        properties.ContentType = "application/json"
        self._spawn(
            client.publish(
                topic,
                telemetry.encode(reply),
                qos=telemetry.REPLY_QOS,
                retain=False,
                properties=properties,
            )
        )

    async def _reply_for(self, payload: bytes, envelope: telemetry.Envelope) -> telemetry.Reply:
        if self.read_only and not self.engine.read_only:
            from twin.engine import READ_ONLY_ERROR

            # A read-only bridge on a writable engine (e.g. the console's own twin, mirrored):
            # refuse here, in the engine's words.
            return telemetry.Reply(
                ts_ms=_now_ms(),
                id=envelope.id,
                ok=False,
                error=READ_ONLY_ERROR,
                sim_time_s=self.engine.sim_time_s,
            )
        try:
            return await asyncio.wait_for(self.engine.handle_payload(payload), COMMAND_TIMEOUT_S)
        except TimeoutError:
            return telemetry.Reply(
                ts_ms=_now_ms(),
                id=envelope.id,
                ok=False,
                error=f"timeout: the engine did not apply it within {COMMAND_TIMEOUT_S:g} s",
                sim_time_s=self.engine.sim_time_s,
            )

    # --------------------------------------------------------------------------------------------
    # telemetry

    async def _pump(self, sub: Subscription) -> None:
        """Engine subscription -> broker, for the bridge's whole life (connected or not).

        Everything queued is taken at once and handed to the client without waiting for each
        publish to complete: a busy engine (a tick can take ~tick_s of CPU at high speed) leaves
        the bridge one event-loop turn per tick, and one message per turn would fall behind."""
        from twin.engine import SubscriptionClosed

        while True:
            try:
                first = await sub.get()
            except SubscriptionClosed:
                return
            for msg in [first, *sub.drain()]:
                client = self._client
                if client is not None:
                    self._send(client, msg)
                elif isinstance(msg, telemetry.Event):
                    self._events.append(msg)
                else:
                    self.dropped_offline += 1

    def _send(self, client: aiomqtt.Client, msg: Any) -> None:
        """Queue one message on the client without waiting; QoS 0 telemetry is dropped (and
        counted) while MAX_PENDING_PUBLISHES publishes are still unfinished."""
        spec = telemetry.TOPICS[msg.__struct_config__.tag]
        if spec.qos == 0 and len(self._tasks) >= MAX_PENDING_PUBLISHES:
            self.dropped_backlog += 1
            return
        topic = telemetry.topic_for(msg, self.fleet)
        self._spawn(
            client.publish(topic, telemetry.encode(msg), qos=spec.qos, retain=spec.retained)
        )
        self.published += 1

    async def _publish(self, client: aiomqtt.Client, msg: Any) -> None:
        """Publish one message and wait until it is sent (QoS 0) or acknowledged (QoS 1)."""
        spec = telemetry.TOPICS[msg.__struct_config__.tag]
        topic = telemetry.topic_for(msg, self.fleet)
        await client.publish(topic, telemetry.encode(msg), qos=spec.qos, retain=spec.retained)
        self.published += 1

    async def _publish_status(self, client: aiomqtt.Client, state: str) -> None:
        await self._publish(client, self._status(state))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            log.debug("mqtt publish failed: %s", _reason(e))


# ------------------------------------------------------------------------------------------------
# the read side (fleet-twin watch)


async def watch_messages(
    config: BrokerConfig,
    fleet: str,
    suffixes: Sequence[str] = ("summary", "status"),
    *,
    stop: asyncio.Event | None = None,
) -> AsyncGenerator[tuple[str, bytes], None]:
    """(topic, payload) of every message on `<root><suffix>` for each suffix, reconnecting
    forever with the bridge's backoff; returns when `stop` is set."""
    stop = stop or asyncio.Event()
    root = telemetry.topic_root(fleet)
    topics = [root + s for s in suffixes]
    backoff = Backoff()
    state = _ConnectionLog(f"watch {fleet}")
    identifier = config.client_id or f"fleet-twin-watch-{uuid.uuid4().hex[:12]}"
    while not stop.is_set():
        started = time.monotonic()
        try:
            async with config.client(identifier=identifier) as client:
                for t in topics:
                    await client.subscribe(t, qos=1)
                state.connected(f"{config.url} ({', '.join(topics)})")
                stopper = asyncio.ensure_future(stop.wait())
                try:
                    it = client.messages.__aiter__()
                    while True:
                        nxt = asyncio.ensure_future(it.__anext__())
                        done, _ = await asyncio.wait(
                            {nxt, stopper}, return_when=asyncio.FIRST_COMPLETED
                        )
                        if nxt not in done:
                            nxt.cancel()
                            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                                await nxt
                            return
                        m = nxt.result()
                        raw = m.payload
                        payload = raw if isinstance(raw, bytes) else str(raw or "").encode()
                        yield str(m.topic), payload
                finally:
                    stopper.cancel()
        except aiomqtt.MqttError as e:
            if time.monotonic() - started >= STABLE_CONNECTION_S:
                backoff.reset()
            state.failed(config.url, e)
        await _sleep_or_stop(stop, backoff.delay())
