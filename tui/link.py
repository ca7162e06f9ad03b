"""The console's only door to a twin: a `TwinLink` gives telemetry messages out and takes commands.

Three implementations: `tui.link_local.LocalLink` (the twin in-process, "embedded"),
`tui.link_mqtt.MqttLink` (a remote twin over MQTT 5) and `tui.link_replay.ReplayLink` (a flight
recording played back: pause, speed and seek work, every other command is refused). The console
never sees anything else of the twin: what it shows comes from `messages()`, what it changes goes
through `command()`, and the reply (an error included) comes back as a `telemetry.Reply`.

Link states, as the header shows them:

- ``embedded``: the twin runs in this process; its data is never stale.
- ``connected``: attached to a broker and the twin's messages arrive (one within the last
  `STALE_AFTER_S`).
- ``stale``: data was received, but the broker connection is lost or nothing arrived for more than
  `STALE_AFTER_S`; the values stay on screen, marked, and `stale_since` says since when.
- ``offline``: never received anything yet (connecting), or the twin said it went offline (its
  retained status / Last Will).
- ``replay``: a recording played back (`can_seek`); its data is never stale.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator
from typing import Literal

from twin import telemetry

__all__ = ["REPLAY_REFUSED", "STALE_AFTER_S", "LinkState", "Mailbox", "TwinLink", "error_reply"]

LinkState = Literal["embedded", "connected", "stale", "offline", "replay"]

#: No message for longer than this marks a remote link stale (summaries come at 4-10 Hz).
STALE_AFTER_S = 3.0
#: A replay link's error reply to every command that would change the twin.
REPLAY_REFUSED = "replay: the recording cannot be changed"


def error_reply(cmd_id: str, error: str, sim_time_s: float = 0.0) -> telemetry.Reply:
    """A Reply for a command that never reached the twin (or got no answer)."""
    return telemetry.Reply(
        ts_ms=time.time_ns() // 1_000_000, id=cmd_id, ok=False, error=error, sim_time_s=sim_time_s
    )


class TwinLink(ABC):
    """A twin as the console sees it: a stream of telemetry messages and a command call."""

    #: The fleet's name (the topic segment on MQTT).
    fleet: str

    @property
    @abstractmethod
    def state(self) -> LinkState:
        """embedded | connected | stale | offline | replay (see the module docstring)."""

    @property
    def stale_since(self) -> float | None:
        """`time.monotonic()` of the last fresh message while the link is stale or offline with
        data on screen; None while the data is fresh (or there never was any)."""
        return None

    @property
    def where(self) -> str:
        """Where the twin is: "in-process" or the broker's URL."""
        return "in-process"

    @property
    def detail(self) -> str:
        """A short reason for the current state ("" when all is well)."""
        return ""

    @property
    def can_seek(self) -> bool:
        """True for a recording played back: the console offers `seek` and refuses the actions
        that would change the twin."""
        return False

    def seek(self, sim_time_s: float) -> float:
        """Jump to `sim_time_s` (clamped to the recording); returns the time jumped to. Only a
        link whose `can_seek` is True has it."""
        raise NotImplementedError("this link cannot seek")

    @property
    def timeline(self) -> tuple[float, float, float]:
        """(start, now, end) in simulated seconds, for a link that can seek."""
        raise NotImplementedError("this link has no timeline")

    @abstractmethod
    async def start(self) -> None:
        """Begin: start the twin (embedded) or the connection loop (remote). Returns at once."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop and release everything; safe to call twice."""

    @abstractmethod
    def messages(self) -> AsyncIterator[telemetry.Message]:
        """Telemetry messages, oldest first, for as long as the link lives. The first ones say
        what the twin is (meta) and what it looks like now (summary, tiers, chips)."""

    @abstractmethod
    async def command(self, cmd: telemetry.Command) -> telemetry.Reply:
        """Send one command and return the twin's reply, or an error reply when it could not be
        delivered or was not answered in time. Never raises for a refused command."""


class Mailbox:
    """A bounded message queue that never blocks its writer: when full, the oldest message is
    dropped and counted (live figures that old are worthless; the next snapshot replaces them)."""

    def __init__(self, maxsize: int = 4096) -> None:
        self.maxsize = maxsize
        self.dropped = 0
        self._buf: deque[telemetry.Message] = deque()
        self._ready = asyncio.Event()
        self._closed = False

    def put(self, msg: telemetry.Message) -> None:
        if self._closed:
            return
        if len(self._buf) >= self.maxsize:
            self._buf.popleft()
            self.dropped += 1
        self._buf.append(msg)
        self._ready.set()

    def clear(self) -> None:
        """Forget the messages waiting (a replay that seeks)."""
        self._buf.clear()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def __len__(self) -> int:
        return len(self._buf)

    async def __aiter__(self) -> AsyncIterator[telemetry.Message]:
        while True:
            while self._buf:
                yield self._buf.popleft()
            if self._closed:
                return
            self._ready.clear()
            await self._ready.wait()
