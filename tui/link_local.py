"""The embedded link: the twin's engine runs in the console's own event loop.

The only tui module that may import the engine (the import-linter contract says so). Telemetry
comes from an engine subscription made when the link is created, so nothing the engine says before
the console starts reading is lost. After a command the engine accepted, a fresh snapshot follows
at once, so the operator sees its effect without waiting for the next 1 Hz chip message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from tui.link import LinkState, TwinLink, error_reply
from twin import telemetry
from twin.engine import Engine

__all__ = ["LocalLink"]

#: How long stop() waits for the engine to finish its tick.
_STOP_TIMEOUT_S = 5.0


class LocalLink(TwinLink):
    """A TwinLink on an in-process `twin.engine.Engine`.

    `run=True` (the console): `start()` runs the engine, paced by its clock, until `stop()`.
    `run=False`: the engine is driven by its owner (tests run it to a fixed simulated time first);
    commands are then applied at once and each is followed by a snapshot.
    """

    def __init__(self, engine: Engine, *, run: bool = True, maxsize: int = 16384) -> None:
        self.engine = engine
        self.fleet = engine.fleet
        self._run = run
        self._sub = engine.subscribe(maxsize=maxsize)
        self._task: asyncio.Task[None] | None = None
        self._started = False

    @property
    def state(self) -> LinkState:
        if self._task is not None and self._task.done() and not self._task.cancelled():
            return "offline" if self._task.exception() is not None else "embedded"
        return "embedded"

    @property
    def detail(self) -> str:
        if self._task is not None and self._task.done() and not self._task.cancelled():
            exc = self._task.exception()
            if exc is not None:
                return f"the engine stopped: {exc}"
        return ""

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        # What the twin looks like now, after anything the owner already ran.
        for msg in self.engine.snapshot_now():
            self._sub.put(msg)
        if self._run and not self.engine.running:
            self._task = asyncio.create_task(self.engine.run(), name="fleet-twin-engine")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self.engine.stop()
            try:
                await asyncio.wait_for(task, _STOP_TIMEOUT_S)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            except Exception:  # the engine's own failure: already shown as the link's detail
                pass
        # A scenario still running rolls back (at once: the engine has stopped).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.engine.close_scenario(), _STOP_TIMEOUT_S)
        self._sub.close()

    async def messages(self) -> AsyncIterator[telemetry.Message]:
        yield self.engine.meta
        async for msg in self._sub:
            yield msg

    async def command(self, cmd: telemetry.Command) -> telemetry.Reply:
        try:
            reply = await self.engine.command(cmd)
        except Exception as e:  # never let a command take the console down
            return error_reply(cmd.id, f"the engine failed on it: {e}", self.engine.sim_time_s)
        if reply.ok:
            for msg in self.engine.snapshot_now():
                self._sub.put(msg)
        return reply
