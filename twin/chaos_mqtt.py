"""`fleet-twin chaos --broker URL`: a scenario rehearsed on a live twin, over MQTT.

The driver reads the twin's telemetry (retained status and meta, summary, tier/+, event) and sends
the scenario's actions as commands on `<root>cmd`, at QoS 1, each with an `id` and a `reply_to`
topic of its own (`<root>reply/<client id>`), and waits for the reply. It goes at the twin's pace:
simulated time is what the twin's summaries say, and an action is sent when a summary shows its
time has come, so it lands at the twin's next tick (the journal records when: the reply's
`sim_time_s`). The connection comes from `twin.mqtt.BrokerConfig` (the only aiomqtt user builds
the client; this module only calls its methods).

Before anything is sent, the twin must answer: its retained meta must be there within the connect
timeout and describe the scenario's fleet (the same tiers), else a one-line ConfigError (exit 2).
A twin that goes offline, or whose simulated time stands still for `stall_timeout_s` (paused,
stopped), aborts the run (exit 1); what was changed is rolled back as far as the twin still
listens. With `rate_per_s` in the scenario, the twin's rate is set at the start and put back at
the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from typing import Any

import msgspec

from twin import telemetry
from twin.catalog import ConfigError
from twin.chaos import (
    ChaosAborted,
    Observer,
    Plan,
    Step,
    rate_restore_steps,
    rate_setup_steps,
    tier_mismatch,
)
from twin.mqtt import BrokerConfig

__all__ = ["MqttDriver"]

log = logging.getLogger("twin.chaos")

#: Topic suffixes read, under `telemetry.topic_root(fleet)`.
SUBSCRIPTIONS = ("status", "meta", "summary", "tier/+", "event")


def _reason(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class MqttDriver:
    """Drives a live twin (`fleet-twin serve`, or any twin behind an `MqttBridge`)."""

    mode = "broker"

    def __init__(
        self,
        plan: Plan,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        client_id: str | None = None,
        stall_timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        command_timeout_s: float = 15.0,
    ) -> None:
        self.plan = plan
        self.config = BrokerConfig.make(
            url,
            username=username,
            password=password,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            client_id=client_id,
        )
        self.fleet = plan.fleet.name
        self.root = telemetry.topic_root(self.fleet)
        self.client_id = client_id or f"fleet-twin-chaos-{uuid.uuid4().hex[:12]}"
        self.reply_topic = f"{self.root}reply/{self.client_id}"
        self.stall_timeout_s = stall_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._reader: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[telemetry.Message] = asyncio.Queue()
        self._replies: dict[str, asyncio.Future[telemetry.Reply]] = {}
        self._meta: telemetry.Meta | None = None
        self._meta_seen = asyncio.Event()
        self._offline = False
        self._lost: str | None = None
        self._now = -math.inf
        self._moved_at = time.monotonic()
        self._seq = 0
        self._old_rate: float | None = None
        self._rate_set = False

    # -- connection -----------------------------------------------------------------------------
    @property
    def now(self) -> float:
        return self._now

    async def start(self, obs: Observer) -> None:
        url = self.config.url
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                client = self.config.client(identifier=self.client_id)
                self._client = await self._stack.enter_async_context(client)
                for suffix in SUBSCRIPTIONS:
                    await self._client.subscribe(self.root + suffix, qos=1)
                await self._client.subscribe(self.reply_topic, qos=1)
        except Exception as e:  # aiomqtt.MqttError, OSError, TimeoutError
            await self.close()
            raise ConfigError(f"--broker {url}: cannot connect ({_reason(e)})") from None
        self._reader = asyncio.create_task(self._read(), name="chaos-mqtt-reader")
        try:
            await asyncio.wait_for(self._meta_seen.wait(), self.connect_timeout_s)
        except TimeoutError:
            await self.close()
            raise ConfigError(
                f"--broker {url}: no twin publishes fleet {self.fleet!r} there (no retained "
                f"{self.root}meta within {self.connect_timeout_s:g} s)"
            ) from None
        meta = self._meta
        assert meta is not None
        mismatch = tier_mismatch(self.plan, meta)
        if mismatch is not None:
            await self.close()
            raise ConfigError(f"--broker {url}: {mismatch}")
        # the first summary gives the twin's simulated time
        self._moved_at = time.monotonic()
        while self._now == -math.inf:
            obs.feed([await self._next()])
        log.info(
            "chaos: attached to fleet %s (run %s) at t=%.1f s", self.fleet, meta.run_id, self._now
        )

    async def _read(self) -> None:
        try:
            async for m in self._client.messages:
                topic = str(m.topic)
                raw = m.payload
                payload = raw if isinstance(raw, bytes) else str(raw or "").encode()
                try:
                    msg = telemetry.decode_message(payload)
                except msgspec.DecodeError:
                    continue  # a kind this version does not know
                if isinstance(msg, telemetry.Reply):
                    fut = self._replies.pop(msg.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                    continue
                if topic == self.reply_topic:
                    continue
                if isinstance(msg, telemetry.Meta):
                    self._meta = msg
                    self._meta_seen.set()
                elif isinstance(msg, telemetry.Status):
                    self._offline = msg.state == "offline"
                self._queue.put_nowait(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the connection is gone
            self._lost = _reason(e)
            log.warning("chaos: connection to %s lost (%s)", self.config.url, self._lost)
        finally:
            for cid, fut in self._replies.items():
                if not fut.done():
                    fut.set_result(
                        telemetry.Reply(
                            ts_ms=0,
                            id=cid,
                            ok=False,
                            error=f"the connection was lost ({self._lost or 'closed'})",
                            sim_time_s=self._now,
                        )
                    )

    async def _next(self) -> telemetry.Message:
        """The next message; ChaosAborted when the twin stalls, goes offline or away."""
        while True:
            if self._lost is not None and self._queue.empty():
                raise ChaosAborted(f"the connection to {self.config.url} was lost ({self._lost})")
            if self._offline and self._queue.empty():
                raise ChaosAborted(f"the twin of fleet {self.fleet!r} went offline")
            left = self.stall_timeout_s - (time.monotonic() - self._moved_at)
            if left <= 0:
                raise ChaosAborted(
                    f"the twin's simulated time has not moved for {self.stall_timeout_s:g} s "
                    f"(stuck at t={self._now:.1f} s: paused or stopped?)"
                )
            try:
                msg = await asyncio.wait_for(self._queue.get(), min(left, 1.0))
            except TimeoutError:
                continue
            if isinstance(msg, telemetry.Summary):
                if self._old_rate is None:  # the rate to put back at the end (not a burst's)
                    rate = msg.base_rate_per_s if msg.base_rate_per_s >= 0 else msg.rate_per_s
                    if rate >= 0:
                        self._old_rate = rate
                if msg.sim_time_s > self._now:
                    self._now = msg.sim_time_s
                    self._moved_at = time.monotonic()
            return msg

    async def advance_to(self, t: float, obs: Observer) -> None:
        while self._now < t - 1e-9:
            obs.feed([await self._next()])

    async def command(self, cmd: telemetry.Command, obs: Observer) -> telemetry.Reply:
        self._seq += 1
        cid = f"{self.client_id}-{self._seq}"
        cmd = msgspec.structs.replace(cmd, id=cid, reply_to=self.reply_topic)
        fut: asyncio.Future[telemetry.Reply] = asyncio.get_running_loop().create_future()
        self._replies[cid] = fut
        try:
            if self._client is None or self._lost is not None:
                raise ChaosAborted(f"the connection to {self.config.url} was lost")
            try:
                await self._client.publish(
                    telemetry.command_topic(self.fleet), telemetry.encode(cmd), qos=1
                )
            except Exception as e:  # aiomqtt.MqttError
                raise ChaosAborted(f"cannot send a command ({_reason(e)})") from None
            try:
                return await asyncio.wait_for(fut, self.command_timeout_s)
            except TimeoutError:
                return telemetry.Reply(
                    ts_ms=0,
                    id=cid,
                    ok=False,
                    error=f"no reply from the twin within {self.command_timeout_s:g} s",
                    sim_time_s=self._now,
                )
        finally:
            self._replies.pop(cid, None)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        with contextlib.suppress(Exception):
            await self._stack.aclose()
        self._client = None

    # -- setup and restore ----------------------------------------------------------------------
    def setup_steps(self) -> list[Step]:
        return rate_setup_steps(self.plan)

    def restore_steps(self) -> list[Step]:
        if self._client is None:
            return []
        return rate_restore_steps(self.plan, self._old_rate)

    def step_applied(self, entry: dict[str, Any]) -> None:
        return None

    def info(self) -> dict[str, Any]:
        meta = self._meta
        return {
            "broker": str(self.config.url),
            "fleet": self.fleet,
            "run_id": meta.run_id if meta is not None else None,
            "rate_before_per_s": self._old_rate,
        }
