"""The remote link: the console attached to a twin over MQTT 5 (the only tui module that imports
aiomqtt).

- Subscribes to the fleet's status, meta (both retained), summary, tier/+, chips/+ and event
  topics, and to its own reply topic `<root>reply/<client id>`.
- Commands go to `<root>cmd` at QoS 1 with an MQTT 5 response topic and correlation data (and the
  same in the payload's `id` / `reply_to`, for a bridge that only reads those); the reply is awaited
  for `command_timeout_s`, then an error reply says that none came.
- Reconnects by itself forever, with jittered exponential backoff. The link is `stale` when the
  connection is lost or nothing arrived for more than `STALE_AFTER_S`; the values already received
  stay with the console, which marks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
import uuid
from collections.abc import AsyncIterator

import aiomqtt
import msgspec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tui.link import STALE_AFTER_S, LinkState, Mailbox, TwinLink, error_reply
from twin import telemetry

__all__ = ["MqttLink"]

#: Topic suffixes the console reads, under `telemetry.topic_root(fleet)`.
SUBSCRIPTIONS = ("status", "meta", "summary", "tier/+", "chips/+", "event")


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


class MqttLink(TwinLink):
    """A TwinLink to a remote twin (`fleet-twin serve`) through an MQTT broker."""

    def __init__(
        self,
        host: str,
        port: int,
        fleet: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        client_id: str | None = None,
        stale_after_s: float = STALE_AFTER_S,
        command_timeout_s: float = 5.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 5.0,
        keepalive_s: int = 5,
        maxsize: int = 4096,
    ) -> None:
        self.host = host
        self.port = port
        self.fleet = fleet
        self.username = username
        self.password = password
        self.tls_context = tls_context
        self.client_id = client_id or f"fleet-twin-console-{uuid.uuid4().hex[:12]}"
        self.stale_after_s = stale_after_s
        self.command_timeout_s = command_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.keepalive_s = keepalive_s
        self.root = telemetry.topic_root(fleet)
        self.cmd_topic = telemetry.command_topic(fleet)
        self.reply_topic = f"{self.root}reply/{self.client_id}"
        #: Successful connections so far.
        self.connects = 0
        self._mailbox = Mailbox(maxsize)
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._pending: dict[str, asyncio.Future[telemetry.Reply]] = {}
        self._last_rx: float | None = None
        self._lost_at: float | None = None
        self._twin_offline = False
        self._detail = "connecting"

    # -- state -----------------------------------------------------------------------------
    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls_context else 'mqtt'}://{host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def state(self) -> LinkState:
        if self._twin_offline:
            return "offline"
        if self._last_rx is None:
            return "offline"
        if self._client is None or time.monotonic() - self._last_rx > self.stale_after_s:
            return "stale"
        return "connected"

    @property
    def stale_since(self) -> float | None:
        if self.state in ("stale", "offline") and self._last_rx is not None:
            return self._last_rx
        return None

    @property
    def detail(self) -> str:
        if self._twin_offline:
            return "the twin is offline"
        if self._client is None:
            return self._detail
        if self._last_rx is None:
            return "waiting for the twin"
        if time.monotonic() - self._last_rx > self.stale_after_s:
            return "connected, but the twin is silent"
        return ""

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._connection_loop(), name="fleet-twin-mqtt")

    async def stop(self) -> None:
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._fail_pending("the console is closing")
        self._mailbox.close()

    async def messages(self) -> AsyncIterator[telemetry.Message]:
        async for msg in self._mailbox:
            yield msg

    # -- commands --------------------------------------------------------------------------
    async def command(self, cmd: telemetry.Command) -> telemetry.Reply:
        client = self._client
        cmd_id = cmd.id or uuid.uuid4().hex
        if client is None:
            return error_reply(
                cmd_id, f"not connected to {self.where} ({self._detail}); the command was not sent"
            )
        cmd = msgspec.structs.replace(cmd, id=cmd_id, reply_to=self.reply_topic)
        fut: asyncio.Future[telemetry.Reply] = asyncio.get_running_loop().create_future()
        self._pending[cmd_id] = fut
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = cmd_id.encode()
        props.ContentType = "application/json"
        try:
            await client.publish(
                self.cmd_topic, telemetry.encode(cmd), qos=1, retain=False, properties=props
            )
            return await asyncio.wait_for(fut, self.command_timeout_s)
        except TimeoutError:
            return error_reply(
                cmd_id,
                f"no reply from the twin within {self.command_timeout_s:g} s "
                "(is it running, and may this account publish commands?)",
            )
        except aiomqtt.MqttError as e:
            return error_reply(cmd_id, f"could not send it: {_reason(e)}")
        finally:
            self._pending.pop(cmd_id, None)

    def _fail_pending(self, why: str) -> None:
        for cmd_id, fut in list(self._pending.items()):
            if not fut.done():
                fut.set_result(error_reply(cmd_id, f"no reply: {why}"))
        self._pending.clear()

    # -- connection ------------------------------------------------------------------------
    def _client_for(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            keepalive=self.keepalive_s,
            timeout=5.0,
            tls_context=self.tls_context,
        )

    async def _connection_loop(self) -> None:
        delay = self.backoff_initial_s
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                async with self._client_for() as client:
                    for suffix in SUBSCRIPTIONS:
                        await client.subscribe(self.root + suffix, qos=1)
                    await client.subscribe(self.reply_topic, qos=1)
                    self._client = client
                    self.connects += 1
                    self._detail = ""
                    async for message in client.messages:
                        self._on_message(message)
                    raise aiomqtt.MqttError("the message stream ended")
            except aiomqtt.MqttError as e:
                self._detail = f"broker unreachable: {_reason(e)}"
            finally:
                if self._client is not None:
                    self._lost_at = time.monotonic()
                self._client = None
                # A broker going down hands out its clients' Last Wills (the twin's "offline"):
                # that says nothing about the twin. The retained status tells after a reconnect.
                self._twin_offline = False
                self._fail_pending("the connection to the broker was lost")
            if time.monotonic() - started > 5.0:
                delay = self.backoff_initial_s
            wait = min(self.backoff_max_s, delay) * random.uniform(0.8, 1.2)
            self._detail += f"; retrying in {wait:.1f} s"
            delay = min(self.backoff_max_s, delay * 2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)

    def _on_message(self, message: aiomqtt.Message) -> None:
        raw = message.payload
        payload = raw if isinstance(raw, bytes | bytearray) else str(raw or "").encode()
        try:
            msg = telemetry.decode_message(bytes(payload))
        except msgspec.DecodeError:
            return  # a kind this console does not know (a newer twin), or garbage
        if isinstance(msg, telemetry.Reply):
            props = message.properties
            corr = getattr(props, "CorrelationData", None) if props is not None else None
            key = corr.decode(errors="replace") if isinstance(corr, bytes) else msg.id
            fut = self._pending.get(key) or self._pending.get(msg.id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        self._last_rx = time.monotonic()
        if isinstance(msg, telemetry.Status):
            self._twin_offline = msg.state == "offline"
        elif self._twin_offline and not isinstance(msg, telemetry.Meta):
            self._twin_offline = False  # telemetry flows again: the twin is back
        self._mailbox.put(msg)
