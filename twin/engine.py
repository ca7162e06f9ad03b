"""The live twin: an asyncio shell around the vectorised core (docs/live-contract.md).

Pacing. A clock (`WallClock`, or `VirtualClock` in tests) drives the loop. At speed s > 0,
simulated time aims at `sim_anchor + (clock.now() - wall_anchor) x s`; the anchors are reset when
the run starts, on resume and on a speed change, so paused time is not caught up afterwards. At
speed 0 each tick advances `tick_s` of simulated time, as fast as the machine allows. `lag_s`
(in every summary) is how far simulated time trails the paced target; it is 0 at speed 0.

A tick (every `tick_s` of clock time at speed > 0) does, in order:
1. apply the queued commands, in arrival order;
2. advance the core to the target with adaptive steps (`core.step(..., adaptive=True)`, never past
   the target), so events inside a tick keep their exact times; a tick spends at most about
   `tick_s` of clock time computing, the rest shows up as lag;
3. emit the snapshots that are due: by clock time at speed > 0 or while paused, by simulated time
   at speed 0 (the advance then stops exactly at the due times).

Events (commands applied or rejected, SLO breach and recovery, a burst ending) are sent at once.
Subscribers get everything through bounded queues: a full queue drops its oldest message and
counts it, so a slow subscriber never slows the simulation.

The core never sees a clock; simulated time comes only from the clock and the speed. `ts_ms` on
messages is wall-clock time (injectable as `wall_ms`).

Scenarios. The engine knows nothing of chaos scenarios (twin.engine may not import twin.chaos): a
scenario runner is installed from outside (`set_scenario_runner`, done by twin.chaos_live for
`fleet-twin serve` and the console's embedded twin) with the names it can run, which go into
`meta.scenarios`. `run_scenario` checks the name, refuses while one runs (or without a runner),
starts the runner as a background task and replies at once; the runner drives the twin through
`command()` like any client and reads it through a subscription, and the engine sends
`scenario_started` and, when the runner returns, `scenario_finished` with its verdict and a
one-line summary. `stop_scenario` cancels the task; the runner then runs the rollbacks.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import NamedTuple, Protocol

import msgspec
import numpy as np

from twin import core, telemetry
from twin.build import Twin
from twin.catalog import Catalog, load_catalog
from twin.simulate import MAX_STEP_S, MIN_STEP_S
from twin.snapshots import Rates, SnapshotBuilder, build_meta
from twin.telemetry import CommandError

__all__ = [
    "READ_ONLY_ERROR",
    "STOP_REASON",
    "Clock",
    "Engine",
    "ScenarioOutcome",
    "ScenarioRunner",
    "Subscription",
    "SubscriptionClosed",
    "VirtualClock",
    "WallClock",
]

READ_ONLY_ERROR = "read-only twin: commands are disabled"
#: The message of the cancellation that `stop_scenario` delivers to a running scenario.
STOP_REASON = "stopped by the operator (stop_scenario)"
_EPS = 1e-9
STREAMS = ("summary", "tier", "chips")


# ------------------------------------------------------------------------------------------------
# clocks


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, s: float) -> None: ...


class WallClock:
    """Monotonic seconds; sleeps for real."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, s: float) -> None:
        await asyncio.sleep(max(0.0, s))


class VirtualClock:
    """A clock that moves only when someone sleeps on it (tests never wait for real)."""

    def __init__(self, start: float = 0.0) -> None:
        self._t = start

    def now(self) -> float:
        return self._t

    async def sleep(self, s: float) -> None:
        self._t += max(0.0, s)
        await asyncio.sleep(0)  # let the other tasks run

    def advance(self, s: float) -> None:
        self._t += max(0.0, s)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


# ------------------------------------------------------------------------------------------------
# subscriptions


class SubscriptionClosed(Exception):
    """`get()` on a closed subscription with nothing left to read."""


class Subscription:
    """A bounded queue of messages. When full, the oldest message is dropped and counted."""

    def __init__(self, maxsize: int, on_close: Callable[[Subscription], None]) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.dropped = 0
        self._buf: deque[telemetry.Message] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        self._on_close = on_close

    def put(self, msg: telemetry.Message) -> None:
        """Never blocks: drops the oldest message if the queue is full."""
        if self._closed:
            return
        if len(self._buf) >= self.maxsize:
            self._buf.popleft()
            self.dropped += 1
        self._buf.append(msg)
        self._ready.set()

    async def get(self) -> telemetry.Message:
        while not self._buf:
            if self._closed:
                raise SubscriptionClosed("subscription closed")
            self._ready.clear()
            await self._ready.wait()
        return self._buf.popleft()

    def get_nowait(self) -> telemetry.Message | None:
        return self._buf.popleft() if self._buf else None

    def drain(self) -> list[telemetry.Message]:
        """Everything queued, oldest first, without waiting."""
        out = list(self._buf)
        self._buf.clear()
        return out

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._ready.set()
            self._on_close(self)

    def __aiter__(self) -> AsyncIterator[telemetry.Message]:
        return self

    async def __anext__(self) -> telemetry.Message:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None


# ------------------------------------------------------------------------------------------------
# scenarios (the runner is installed from outside: see the module docstring)


class ScenarioOutcome(NamedTuple):
    """What a scenario runner returns: its verdict (pass, fail, not-run, aborted) and one line."""

    verdict: str
    summary: str


#: `runner(engine, name)`: run scenario `name` on the engine until it is done (or cancelled, when
#: it must roll back what it changed and return, verdict "aborted").
ScenarioRunner = Callable[["Engine", str], Awaitable[ScenarioOutcome]]


# ------------------------------------------------------------------------------------------------
# the engine


class Engine:
    """A twin running live: paced clock, queued commands, snapshots to subscribers."""

    def __init__(
        self,
        twin: Twin,
        *,
        speed: float = 1.0,
        tick_s: float = 0.1,
        clock: Clock | None = None,
        read_only: bool = False,
        run_id: str | None = None,
        summary_hz: float = 5,
        tier_hz: float = 2,
        chip_hz: float = 1,
        catalog: Catalog | None = None,
        wall_ms: Callable[[], int] | None = None,
        latency_window_s: float = 10.0,
        rate_window_s: float = 2.0,
        min_step_s: float = MIN_STEP_S,
        scenario_runner: ScenarioRunner | None = None,
        scenarios: Sequence[str] = (),
    ) -> None:
        if not (math.isfinite(speed) and 0.0 <= speed <= telemetry.MAX_SPEED):
            raise ValueError(f"speed must be in [0, {telemetry.MAX_SPEED:g}], got {speed}")
        if not tick_s > 0:
            raise ValueError(f"tick_s must be > 0, got {tick_s}")
        hz = {"summary": summary_hz, "tier": tier_hz, "chips": chip_hz}
        for name, f in hz.items():
            if not (math.isfinite(f) and f > 0):
                raise ValueError(f"{name}_hz must be > 0, got {f}")
        self.twin = twin
        self.read_only = read_only
        self.run_id = run_id if run_id is not None else secrets.token_hex(6)
        self._state, self._params = twin.state, twin.params
        self._clock: Clock = clock if clock is not None else WallClock()
        self._wall_ms = wall_ms if wall_ms is not None else _wall_ms
        self._speed = float(speed)
        self._tick_s = float(tick_s)
        self._min_step_s = min_step_s
        self._period = {k: 1.0 / f for k, f in hz.items()}
        self._paused = False
        self._snap = SnapshotBuilder(
            twin, latency_window_s=latency_window_s, rate_window_s=rate_window_s
        )
        self._scenario_runner: ScenarioRunner | None = None
        self._scenarios: tuple[str, ...] = ()
        self._scenario: str | None = None  # the one running
        self._scenario_task: asyncio.Task[None] | None = None
        self._scenario_stopping = False
        self._meta = build_meta(
            twin,
            catalog if catalog is not None else load_catalog(),
            run_id=self.run_id,
            ts_ms=self._wall_ms(),
        )
        if scenario_runner is not None:
            self.set_scenario_runner(scenario_runner, scenarios)
        self._subs: list[Subscription] = []
        self._pending: deque[tuple[telemetry.Command, asyncio.Future[telemetry.Reply]]] = deque()
        self._running = False
        self._stop = False
        self._t_end: float | None = None
        self._anchor_wall = self._clock.now()
        self._anchor_sim = self._state.t
        self._due_wall = dict.fromkeys(STREAMS, self._anchor_wall)
        self._due_sim = dict.fromkeys(STREAMS, self._state.t)
        self._breach = {"ttft": False, "tpot": False}
        self._burst_until: float | None = None
        layout = twin.layout
        self._inst_index = {n: i for i, n in enumerate(layout.inst_names)}
        self._link_index = {n: i for i, n in enumerate(layout.link_names)}
        self._tier_index = {n: i for i, n in enumerate(layout.tier_names)}

    # -- properties ---------------------------------------------------------------------------
    @property
    def meta(self) -> telemetry.Meta:
        return self._meta

    @property
    def fleet(self) -> str:
        return self.twin.layout.fleet

    @property
    def speed(self) -> float:
        return self._speed

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def sim_time_s(self) -> float:
        return self._state.t

    @property
    def running(self) -> bool:
        return self._running

    @property
    def lag_s(self) -> float:
        """How far simulated time trails the paced target (0 at speed 0 or paused)."""
        if self._speed <= 0 or self._paused or not self._running:
            return 0.0
        target = self._anchor_sim + (self._clock.now() - self._anchor_wall) * self._speed
        lag = target - self._state.t
        return lag if lag > _EPS else 0.0

    @property
    def scenarios(self) -> tuple[str, ...]:
        """The scenarios `run_scenario` may name (none without a runner)."""
        return self._scenarios

    @property
    def scenario(self) -> str | None:
        """The scenario running now, if any."""
        return self._scenario

    def set_scenario_runner(self, runner: ScenarioRunner | None, names: Sequence[str]) -> None:
        """Install (or, with None, remove) the scenario runner and the names it runs; they go
        into `meta.scenarios`. Install it before the meta is published."""
        self._scenario_runner = runner
        self._scenarios = tuple(names) if runner is not None else ()
        self._meta = msgspec.structs.replace(self._meta, scenarios=list(self._scenarios))

    def status(self, state: str = "online") -> telemetry.Status:
        if state not in ("online", "offline"):
            raise ValueError(f"status must be 'online' or 'offline', got {state!r}")
        return telemetry.Status(
            ts_ms=self._wall_ms(),
            fleet=self.fleet,
            state="online" if state == "online" else "offline",
            run_id=self.run_id,
        )

    # -- subscriptions ------------------------------------------------------------------------
    def subscribe(self, maxsize: int = 256) -> Subscription:
        sub = Subscription(maxsize, self._unsubscribe)
        self._subs.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def _publish(self, msg: telemetry.Message) -> None:
        for sub in self._subs:
            sub.put(msg)

    @property
    def dropped(self) -> int:
        """The most messages any current subscriber has lost."""
        return max((s.dropped for s in self._subs), default=0)

    # -- commands -----------------------------------------------------------------------------
    async def command(self, cmd: telemetry.Command) -> telemetry.Reply:
        """Queue a command; it is applied between steps, in arrival order. When the engine is
        not running it is applied at once."""
        return await self.submit(cmd)

    def submit(self, cmd: telemetry.Command) -> asyncio.Future[telemetry.Reply]:
        """`command()` without the coroutine: the command is applied now and the future holds its
        reply. Now is always between steps: a tick never yields to the event loop mid-way, so any
        caller runs while the engine sleeps between ticks. Applying at once rather than at the
        next tick gives the same simulated time (the next tick would apply it before advancing)
        and saves up to a tick of wall-clock latency."""
        fut: asyncio.Future[telemetry.Reply] = asyncio.get_running_loop().create_future()
        self._apply_pending()
        fut.set_result(self._apply(cmd))
        return fut

    async def handle_payload(self, payload: bytes) -> telemetry.Reply:
        """Decode and apply a command; a payload that cannot be decoded gets an error reply."""
        try:
            cmd = telemetry.decode_command(payload)
        except CommandError as e:
            env = telemetry.peek_envelope(payload)
            if self.read_only:
                return self._reject(env.id, "payload", READ_ONLY_ERROR)
            return self._reject(env.id, "payload", str(e))
        return await self.command(cmd)

    def _apply_pending(self) -> None:
        while self._pending:
            cmd, fut = self._pending.popleft()
            reply = self._apply(cmd)
            if not fut.done():
                fut.set_result(reply)

    def _apply(self, cmd: telemetry.Command) -> telemetry.Reply:
        kind = str(cmd.__struct_config__.tag)
        if self.read_only:
            return self._reject(cmd.id, kind, READ_ONLY_ERROR)
        try:
            telemetry.check_command(cmd)
            detail = self._dispatch(cmd)
        except CommandError as e:
            return self._reject(cmd.id, kind, str(e))
        except Exception as e:  # a bug must not kill the twin: the sender hears of it
            return self._reject(cmd.id, kind, f"internal error: {type(e).__name__}: {e}")
        return telemetry.Reply(
            ts_ms=self._wall_ms(), id=cmd.id, ok=True, detail=detail, sim_time_s=self._state.t
        )

    def _reject(self, cmd_id: str, kind: str, error: str) -> telemetry.Reply:
        self._event("command_rejected", "warning", kind, error)
        return telemetry.Reply(
            ts_ms=self._wall_ms(), id=cmd_id, ok=False, error=error, sim_time_s=self._state.t
        )

    def emit_event(
        self, event: str, severity: telemetry.Severity, target: str, detail: str
    ) -> None:
        """Send an event to every subscriber (a scenario runner reports its steps with it)."""
        self._event(event, severity, target, detail)

    def _event(self, event: str, severity: telemetry.Severity, target: str, detail: str) -> None:
        self._publish(
            telemetry.Event(
                ts_ms=self._wall_ms(),
                sim_time_s=self._state.t,
                event=event,
                severity=severity,
                target=target,
                detail=detail,
            )
        )

    def _dispatch(self, cmd: telemetry.Command) -> str:
        """Apply a range-checked command; raise CommandError (changing nothing) if a name is
        unknown or the fleet cannot take it. Returns the reply's detail."""
        state, p = self._state, self._params
        T = telemetry
        if isinstance(cmd, T.Fail | T.Recover | T.Drain):
            chips, label = self._resolve_target(cmd.target)
            if isinstance(cmd, T.Fail):
                retries, rejected = state.retries, state.rejected_total
                down = core.fail_chips(state, p, chips)
                detail = (
                    f"{label} failed; {self._names(down)} down; "
                    f"{state.retries - retries} requests back to prefill, "
                    f"{state.rejected_total - rejected} rejected"
                )
                self._event("chip_failed", "error", cmd.target, detail)
            elif isinstance(cmd, T.Recover):
                up = core.recover_chips(state, p, chips)
                detail = f"{label} back in service; {self._names(up)} up"
                self._event("chip_recovered", "info", cmd.target, detail)
            else:
                insts = core.drain_chips(state, p, chips)
                detail = f"{label} draining; no new work for {self._names(insts)}"
                self._event("chip_draining", "info", cmd.target, detail)
            return detail
        if isinstance(cmd, T.DegradeLink | T.RestoreLink):
            link = self._resolve_link(cmd.link)
            old = float(state.link_factor[link])
            if isinstance(cmd, T.DegradeLink):
                core.set_link_factor(state, link, cmd.factor)
                detail = f"bandwidth x{old:g} -> x{cmd.factor:g}"
                self._event("link_degraded", "warning", cmd.link, detail)
            else:
                core.set_link_factor(state, link, 1.0)
                detail = f"bandwidth x{old:g} -> x1"
                self._event("link_restored", "info", cmd.link, detail)
            return detail
        if isinstance(cmd, T.SetRate):
            old_rate = state.workload.rate_per_s
            try:
                core.set_rate(state, cmd.rate_per_s)
            except ValueError as e:
                raise CommandError(f"rate_per_s: {e}") from None
            detail = f"arrival rate {old_rate:g} -> {cmd.rate_per_s:g} requests/s"
            self._event("rate_changed", "info", "workload", detail)
            return detail
        if isinstance(cmd, T.Burst):
            arrivals = state.workload.spec.arrivals
            if arrivals in ("trace", "closed"):
                raise CommandError(
                    f"burst: a {arrivals} workload sets its own arrival times; it has no rate"
                )
            until = state.t + cmd.duration_s
            state.workload.burst(cmd.factor, until, state.t)
            self._burst_until = until
            detail = f"burst: arrival rate x{cmd.factor:g} for {cmd.duration_s:g} s"
            self._event("rate_changed", "info", "workload", detail)
            return detail
        if isinstance(cmd, T.SetRouting):
            weights = None
            if cmd.weights:
                weights = state.tier_weight.copy()
                for name, w in cmd.weights.items():
                    if name not in self._tier_index:
                        raise CommandError(
                            f"weights.{name}: unknown tier {name!r} "
                            f"(expected one of: {', '.join(self._tier_index)})"
                        )
                    weights[self._tier_index[name]] = w
            old_policy = core.POLICIES[state.policy]
            core.set_policy(state, p, cmd.policy, weights)
            detail = f"routing {old_policy} -> {cmd.policy}"
            if cmd.weights:
                detail += " (weights " + ", ".join(f"{k}={v:g}" for k, v in cmd.weights.items())
                detail += ")"
            self._event("routing_changed", "info", "router", detail)
            return detail
        if isinstance(cmd, T.Pause):
            detail = "already paused" if self._paused else "paused"
            self._set_paused(True)
            self._event("paused", "info", "clock", detail)
            return detail
        if isinstance(cmd, T.Resume):
            detail = "resumed" if self._paused else "already running"
            self._set_paused(False)
            self._event("resumed", "info", "clock", detail)
            return detail
        if isinstance(cmd, T.SetSpeed):
            old_speed = self._speed
            self._set_speed(cmd.speed)
            detail = f"speed {_speed_text(old_speed)} -> {_speed_text(cmd.speed)}"
            self._event("speed_changed", "info", "clock", detail)
            return detail
        if isinstance(cmd, T.RunScenario):
            return self._start_scenario(cmd.name)
        if isinstance(cmd, T.StopScenario):
            return self._stop_scenario()
        raise CommandError(f"cmd: unsupported command {type(cmd).__name__}")  # pragma: no cover

    # -- scenarios ----------------------------------------------------------------------------
    def _start_scenario(self, name: str) -> str:
        if self._scenario_runner is None:
            raise CommandError("run_scenario: this twin has no scenario runner")
        if name not in self._scenarios:
            known = ", ".join(self._scenarios) or "none for this fleet"
            raise CommandError(f"name: unknown scenario {name!r} (expected one of: {known})")
        if self._scenario is not None:
            raise CommandError(
                f"run_scenario: scenario {self._scenario!r} is running "
                "(stop_scenario first, or wait for it to finish)"
            )
        runner = self._scenario_runner
        self._scenario = name
        self._scenario_stopping = False
        task = asyncio.get_running_loop().create_task(
            self._scenario_main(runner, name), name=f"scenario-{name}"
        )
        task.add_done_callback(self._scenario_done)
        self._scenario_task = task
        detail = f"scenario {name} started at t={self._state.t:.1f} s"
        self._event("scenario_started", "info", name, detail)
        return detail

    async def _scenario_main(self, runner: ScenarioRunner, name: str) -> None:
        try:
            outcome = await runner(self, name)
        except asyncio.CancelledError:
            outcome = ScenarioOutcome("aborted", "cancelled before it could roll back")
        except Exception as e:  # a broken runner must not take the twin down
            outcome = ScenarioOutcome("aborted", f"the scenario runner failed: {e}")
        finally:
            self._scenario = None
            self._scenario_task = None
            self._scenario_stopping = False
        severity: telemetry.Severity = "info" if outcome.verdict == "pass" else "warning"
        self._event("scenario_finished", severity, name, f"{outcome.verdict}: {outcome.summary}")

    def _scenario_done(self, task: asyncio.Task[None]) -> None:
        """A task cancelled before its first step never ran `_scenario_main`: clean up here."""
        if self._scenario_task is task:
            name = self._scenario or "?"
            self._scenario = None
            self._scenario_task = None
            self._scenario_stopping = False
            self._event("scenario_finished", "warning", name, "aborted: stopped before it started")

    def _stop_scenario(self) -> str:
        name, task = self._scenario, self._scenario_task
        if name is None or task is None:
            raise CommandError("stop_scenario: no scenario is running")
        if self._scenario_stopping:
            return f"scenario {name} is already stopping"
        self._scenario_stopping = True
        task.cancel(STOP_REASON)
        detail = f"stopping scenario {name}: its rollbacks run"
        self._event("scenario_stopping", "info", name, detail)
        return detail

    async def close_scenario(self, reason: str = "the twin is stopping") -> None:
        """Stop the running scenario, if any, and wait until it has rolled back (commands are
        applied at once when the engine is not running). For a twin that is shutting down."""
        task = self._scenario_task
        if task is None:
            return
        if not self._scenario_stopping:
            self._scenario_stopping = True
            task.cancel(reason)
        await asyncio.wait({task})

    def _resolve_target(self, target: str) -> tuple[np.ndarray, str]:
        """Chip indices of a chip id "<tier>/<k>/<j>" or an instance id "<tier>/<k>"."""
        p = self._params
        inst = self._inst_index.get(target)
        if inst is not None:
            start, n = int(p.inst_chip_start[inst]), int(p.inst_n_chips[inst])
            return np.arange(start, start + n, dtype=np.int64), f"instance {target} ({n} chips)"
        head, _, tail = target.rpartition("/")
        inst = self._inst_index.get(head)
        canonical = tail.isascii() and tail.isdecimal() and str(int(tail)) == tail
        if inst is not None and canonical and int(tail) < int(p.inst_n_chips[inst]):
            chip = int(p.inst_chip_start[inst]) + int(tail)
            return np.array([chip], dtype=np.int64), f"chip {target}"
        example = self.twin.layout.inst_names[0]
        raise CommandError(
            f"target: unknown chip or instance {target!r} "
            f"(expected '<tier>/<k>' or '<tier>/<k>/<j>', e.g. {example!r} or '{example}/0')"
        )

    def _resolve_link(self, name: str) -> int:
        link = self._link_index.get(name)
        if link is None:
            known = ", ".join(self._link_index) or "none: this fleet has no links"
            raise CommandError(f"link: unknown link {name!r} (expected one of: {known})")
        return link

    def _names(self, insts: np.ndarray) -> str:
        if insts.size == 0:
            return "no instance"
        names = [self.twin.layout.inst_names[i] for i in insts.tolist()]
        word = "instance" if len(names) == 1 else "instances"
        return f"{word} {', '.join(names)}"

    # -- pacing -------------------------------------------------------------------------------
    def _reanchor(self) -> None:
        self._anchor_wall = self._clock.now()
        self._anchor_sim = self._state.t

    def _by_sim_time(self) -> bool:
        return self._speed <= 0 and not self._paused

    def _set_speed(self, speed: float) -> None:
        was_sim = self._by_sim_time()
        self._speed = float(speed)
        self._reanchor()
        if was_sim != self._by_sim_time():
            self._reset_schedule()

    def _set_paused(self, paused: bool) -> None:
        was_sim = self._by_sim_time()
        self._paused = paused
        self._reanchor()
        if was_sim != self._by_sim_time():
            self._reset_schedule()

    def _reset_schedule(self) -> None:
        now = self._clock.now()
        for k in STREAMS:
            self._due_wall[k] = now
            self._due_sim[k] = self._state.t

    def _target(self, now: float) -> float:
        if self._speed > 0:
            target = self._anchor_sim + (now - self._anchor_wall) * self._speed
        else:
            target = min(self._state.t + self._tick_s, *self._due_sim.values())
        if self._t_end is not None:
            target = min(target, self._t_end)
        return target

    def _advance(self, now: float) -> None:
        """Adaptive steps up to the target; at most about one tick of clock time."""
        state, p = self._state, self._params
        target = self._target(now)
        deadline = now + self._tick_s
        while state.t < target - _EPS:
            core.step(
                state, p, min(MAX_STEP_S, target - state.t), adaptive=True, min_dt=self._min_step_s
            )
            if self._clock.now() > deadline:
                break
        if self._burst_until is not None and state.t >= self._burst_until:
            self._burst_until = None
            rate = state.workload.rate_per_s
            self._event("rate_changed", "info", "workload", f"burst over; rate {rate:g} requests/s")

    def _tick(self, now: float) -> None:
        self._apply_pending()
        if not self._paused:
            self._advance(now)
        self._emit_due()

    async def _loop(self) -> None:
        if self._running:
            raise RuntimeError("the engine is already running")
        clock = self._clock
        self._running = True
        self._reanchor()  # time spent not running is not caught up; the snapshot schedule holds
        next_tick = clock.now()
        try:
            while not self._stop:
                self._tick(clock.now())
                if self._t_end is not None and self._state.t >= self._t_end - _EPS:
                    break
                now = clock.now()
                if self._speed > 0 or self._paused:
                    next_tick += self._tick_s
                    if next_tick < now - self._tick_s:  # fell behind: no burst of catch-up ticks
                        next_tick = now
                    wake = next_tick
                    if self._t_end is not None and not self._paused:  # run_for ends mid-tick
                        end = self._anchor_wall + (self._t_end - self._anchor_sim) / self._speed
                        wake = min(wake, end)
                    await clock.sleep(wake - now)
                else:
                    next_tick = now
                    await clock.sleep(0.0)
        finally:
            self._running = False
            self._stop = False
            self._t_end = None
            self._apply_pending()  # nobody waits for a reply forever

    async def run(self) -> None:
        """Run until `stop()`, paced by the clock at the current speed."""
        self._t_end = None
        await self._loop()

    async def run_for(self, sim_s: float) -> None:
        """Run until `sim_s` more seconds of simulated time have passed (or `stop()`)."""
        if not (math.isfinite(sim_s) and sim_s >= 0):
            raise ValueError(f"sim_s must be a finite number >= 0, got {sim_s}")
        self._t_end = self._state.t + sim_s
        await self._loop()

    def stop(self) -> None:
        """Ask `run()` / `run_for()` to return after the current tick (a stop asked for before
        the run has started ends that run after its first tick)."""
        self._stop = True

    # -- snapshots ----------------------------------------------------------------------------
    def _emit_due(self) -> None:
        if self._by_sim_time():
            x, due = self._state.t, self._due_sim
        else:
            x, due = self._clock.now(), self._due_wall
        fire = []
        for k in STREAMS:
            if x >= due[k] - _EPS:
                fire.append(k)
                due[k] += self._period[k]
                if due[k] <= x + _EPS:
                    due[k] = x + self._period[k]
        if not fire:
            return
        ts = self._wall_ms()
        rates = self._snap.window.rates(self._state, record=True)
        if "summary" in fire:
            self._publish(self._summary(ts, rates, check_slo=True))
        if "tier" in fire:
            for msg in self._snap.tiers(ts_ms=ts, rates=rates):
                self._publish(msg)
        if "chips" in fire:
            for chips in self._snap.chips(ts_ms=ts, rates=rates):
                self._publish(chips)

    def _summary(self, ts: int, rates: Rates, *, check_slo: bool) -> telemetry.Summary:
        lat = self._snap.latency()
        if check_slo:
            self._check_slo(lat)
        return self._snap.summary(
            ts_ms=ts,
            lag_s=self.lag_s,
            speed=self._speed,
            paused=self._paused,
            dropped=self.dropped,
            rates=rates,
            latency=lat,
        )

    def _check_slo(self, lat: dict[str, float]) -> None:
        p = self._params
        for name, value, slo in (
            ("ttft", lat["ttft_p99_s"], p.slo_ttft_s),
            ("tpot", lat["tpot_p99_s"], p.slo_tpot_s),
        ):
            if not math.isfinite(value):
                continue
            over = value > slo
            if over != self._breach[name]:
                self._breach[name] = over
                upper = name.upper()
                if over:
                    detail = f"p99 {upper} {value:.3g} s over the {slo:g} s SLO"
                    self._event("slo_breach", "warning", name, detail)
                else:
                    detail = f"p99 {upper} {value:.3g} s back within the {slo:g} s SLO"
                    self._event("slo_recovered", "info", name, detail)

    def snapshot_now(self) -> list[telemetry.Message]:
        """Summary, tiers and chips as of now (not sent to subscribers; schedules unchanged)."""
        ts = self._wall_ms()
        rates = self._snap.window.rates(self._state, record=False)
        out: list[telemetry.Message] = [self._summary(ts, rates, check_slo=False)]
        out.extend(self._snap.tiers(ts_ms=ts, rates=rates))
        out.extend(self._snap.chips(ts_ms=ts, rates=rates))
        return out


def _speed_text(speed: float) -> str:
    return "as fast as possible" if speed <= 0 else f"{speed:g}x"
