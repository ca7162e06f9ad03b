"""The replay link: a flight recording (docs/recorder.md) played back in the console.

`ReplayLink(path)` opens the recording with `twin.recorder.Playback` (a missing or foreign file
raises `RecordingError`, one line) and plays its first run paced by a simulated clock: every tick
the clock advances by the wall time elapsed x the replay speed (not while paused) and the frames
recorded up to it are handed to the console. Speed 0 plays as fast as the console takes them.

It speaks the console's commands as a twin would: `Pause`, `Resume` and `SetSpeed` act on the
playback and reply ok; every other command is refused ("replay: the recording cannot be
changed"). `seek(t)` (the console's `[` / `]` and "Seek to...") moves the playback and repaints
from the picture at that time. The summaries it passes on carry the replay's own speed and pause,
so the header shows how the recording plays, not how it was recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import msgspec

from tui.format import sim_clock, speed_text
from tui.link import REPLAY_REFUSED, LinkState, Mailbox, TwinLink, error_reply
from twin import telemetry
from twin.recorder import Playback

__all__ = ["ReplayLink"]
#: How often the player wakes up (wall seconds).
TICK_S = 0.05
#: At speed 0, messages waiting for the console before the player waits for it to catch up.
_HIGH_WATER = 2048
#: At speed 0, simulated seconds played per batch.
_BATCH_S = 1.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class ReplayLink(TwinLink):
    """A TwinLink on a recording: paced playback with pause, speed and seek."""

    def __init__(
        self,
        path: str | Path,
        *,
        speed: float = 1.0,
        tick_s: float = TICK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(speed) and speed >= 0):
            raise ValueError(f"speed must be >= 0, got {speed}")
        self.path = Path(path)
        self.playback = Playback(self.path)
        self.fleet = self.playback.fleet
        self.speed = float(speed)
        self.paused = False
        self._tick_s = tick_s
        self._clock = clock
        self._sim_s = self.playback.start_s  # the replay's simulated clock
        self._box = Mailbox(maxsize=1 << 16)
        self._summary: telemetry.Summary | None = None  # the latest, as recorded
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False

    # -- what the console reads ----------------------------------------------------------------
    @property
    def state(self) -> LinkState:
        return "replay"

    @property
    def where(self) -> str:
        return f"replay {self.path}"

    @property
    def detail(self) -> str:
        pb = self.playback
        end = "end of the recording" if self.at_end else f"to {sim_clock(pb.end_s)}"
        return f"{sim_clock(self._sim_s)} {end}"

    @property
    def can_seek(self) -> bool:
        return True

    @property
    def timeline(self) -> tuple[float, float, float]:
        return self.playback.start_s, self._sim_s, self.playback.end_s

    @property
    def at_end(self) -> bool:
        return self.playback.at_end

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._paint(self.playback.seek(self._sim_s))
        self._task = asyncio.create_task(self._play(), name="fleet-twin-replay")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._box.close()

    async def messages(self) -> AsyncIterator[telemetry.Message]:
        async for msg in self._box:
            yield msg

    # -- playing -------------------------------------------------------------------------------
    def _as_played(self, s: telemetry.Summary) -> telemetry.Summary:
        return msgspec.structs.replace(s, speed=self.speed, paused=self.paused, lag_s=0.0)

    def _put(self, messages: Iterable[telemetry.Message]) -> None:
        for msg in messages:
            if isinstance(msg, telemetry.Summary):
                self._summary = msg
                msg = self._as_played(msg)
            self._box.put(msg)

    def _paint(self, picture: list[telemetry.Message]) -> None:
        """Replace what the console was about to get with the picture at the clock."""
        self._box.clear()
        self._put(picture)

    def _repaint_summary(self) -> None:
        """The latest summary again, with the replay's speed and pause (after a change)."""
        if self._summary is not None:
            self._box.put(self._as_played(self._summary))

    async def _play(self) -> None:
        pb = self.playback
        last = self._clock()
        while not self._stopping:
            now = self._clock()
            elapsed, last = now - last, now
            if self.paused:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):  # (wait_for can swallow a cancel)
                        await self._wake.wait()
                last = self._clock()
                continue
            if self.speed > 0:
                self._sim_s = min(self._sim_s + elapsed * self.speed, pb.end_s)
                self._put(f.message for f in pb.advance_to(self._sim_s))
            else:
                while len(self._box) < _HIGH_WATER and not pb.at_end:
                    frames = pb.advance_to(pb.position_s + _BATCH_S)
                    if frames:
                        self._sim_s = frames[-1].sim_time_s
                    self._put(f.message for f in frames)
            if pb.at_end:
                self._sim_s = pb.end_s
                self.paused = True
                self._repaint_summary()
                self._box.put(
                    telemetry.Event(
                        ts_ms=_now_ms(),
                        sim_time_s=pb.end_s,
                        event="replay_end",
                        severity="info",
                        target=self.fleet,
                        detail="end of the recording (space plays it again from the start)",
                    )
                )
                continue
            await asyncio.sleep(self._tick_s if self.speed > 0 or len(self._box) else 0.01)

    # -- control -------------------------------------------------------------------------------
    def seek(self, sim_time_s: float) -> float:
        """Jump to `sim_time_s` (clamped to the recording) and repaint from there."""
        start, _, end = self.timeline
        t = float(sim_time_s)
        t = start if math.isnan(t) else min(max(t, start), end)
        self._sim_s = t
        self._paint(self.playback.seek(t))
        self._wake.set()
        return t

    async def command(self, cmd: telemetry.Command) -> telemetry.Reply:
        t = self._sim_s
        if isinstance(cmd, telemetry.Pause):
            self.paused = True
            detail = f"replay paused at {sim_clock(t)}"
        elif isinstance(cmd, telemetry.Resume):
            if self.at_end:
                self.seek(self.playback.start_s)
                detail = "replay from the start"
            else:
                detail = f"replay resumed at {sim_clock(t)}"
            self.paused = False
        elif isinstance(cmd, telemetry.SetSpeed):
            if not (math.isfinite(cmd.speed) and cmd.speed >= 0):
                return error_reply(cmd.id, f"speed must be >= 0, got {cmd.speed}", t)
            self.speed = float(cmd.speed)
            detail = f"replay at {speed_text(self.speed)}"
        else:
            return error_reply(cmd.id, REPLAY_REFUSED, t)
        self._repaint_summary()
        self._wake.set()
        return telemetry.Reply(
            ts_ms=_now_ms(), id=cmd.id, ok=True, detail=detail, sim_time_s=self._sim_s
        )
