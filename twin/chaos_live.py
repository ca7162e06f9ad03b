"""Chaos scenarios on the live twin: the `run_scenario` command (the console's palette, MQTT).

The engine knows nothing of scenarios; `install_scenarios(engine)` gives it a runner
(`Engine.set_scenario_runner`) and the names of the scenarios it can run, which the engine puts in
its meta (`Meta.scenarios`). Those are the shipped scenarios written for the twin's fleet: the
file's `fleet` is the twin's fleet name and its fleet file has the twin's tiers (comparisons run
several fleets and are never offered).

A scenario runs through the same runner as `fleet-twin chaos` (`chaos.run_plan_async`), on a
`LiveDriver`:

- it goes at the twin's pace: simulated time is what the engine's own summaries say (a
  subscription), so the operator's speed and pauses hold; the warm-up starts at the first summary
  after `run_scenario`, and each action is sent once a summary shows that
  `warm-up end + at_s` has come (it lands at the twin's next tick; the journal says when);
- actions are ordinary commands (`Engine.command`), so their events (chip_failed, rate_changed,
  ...) reach every subscriber; each step also sends a `scenario_step` event;
- probes, invariants and expectations read the same subscription (summaries, tier messages with
  their own `sim_time_s`, events);
- the scenario's `rate_per_s` is set at the start and the rate from before is put back at the end;
  the scenario's seed only chooses `random = true` targets (the twin keeps its own);
- `stop_scenario` (a cancellation of the runner's task) makes the next wait end the run as
  `aborted`: the commands already sent finish, the rollbacks run if the method had started, and
  the rate is restored. A stop during the final rollbacks lets them finish.

The journal is `chaos.run_plan_async`'s, with mode "live"; with `journal_dir` each run writes
`<dir>/<scenario>-<run id>-<n>.json`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twin import telemetry
from twin.catalog import Catalog, ConfigError, load_catalog, read_toml
from twin.chaos import (
    ChaosAborted,
    Observer,
    Plan,
    Step,
    load_plan,
    rate_restore_steps,
    rate_setup_steps,
    run_plan_async,
    scenarios_dir,
    shipped_scenarios,
    tier_mismatch,
)
from twin.engine import Engine, ScenarioOutcome, SubscriptionClosed

__all__ = ["LiveDriver", "LiveScenarios", "install_scenarios", "scenarios_for"]

log = logging.getLogger("twin.chaos")

_EPS = 1e-9


class LiveDriver:
    """A `chaos.Driver` on an engine running in this process (at its own pace)."""

    mode = "live"

    def __init__(self, plan: Plan, engine: Engine, name: str, *, maxsize: int = 1 << 16) -> None:
        self.plan = plan
        self.engine = engine
        self.name = name
        self.sub = engine.subscribe(maxsize=maxsize)
        self._now = -math.inf
        self._old_rate: float | None = None
        self._speed: float | None = None
        self._stop: str | None = None

    @property
    def now(self) -> float:
        return self._now

    def _cancelled(self, e: asyncio.CancelledError) -> str:
        """`stop_scenario` (or a twin shutting down) cancelled the task: remember why and carry
        on, so that the run can end as `aborted` and roll back."""
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        reason = e.args[0] if e.args and isinstance(e.args[0], str) else "cancelled"
        if self._stop is None:
            self._stop = reason
        return self._stop

    async def _next(self) -> telemetry.Message:
        if self._stop is not None:
            raise ChaosAborted(self._stop)
        try:
            msg = await self.sub.get()
        except asyncio.CancelledError as e:
            raise ChaosAborted(self._cancelled(e)) from None
        except SubscriptionClosed:
            raise ChaosAborted("the twin's telemetry stream was closed") from None
        if isinstance(msg, telemetry.Summary):
            if self._old_rate is None:
                base = msg.base_rate_per_s if msg.base_rate_per_s >= 0 else msg.rate_per_s
                self._old_rate = base if base >= 0 else None
                self._speed = msg.speed
            self._now = max(self._now, msg.sim_time_s)
        return msg

    async def start(self, obs: Observer) -> None:
        mismatch = tier_mismatch(self.plan, self.engine.meta)
        if mismatch is not None:
            raise ChaosAborted(mismatch)
        while self._now == -math.inf:  # the first summary gives the twin's simulated time
            obs.feed([await self._next()])

    async def advance_to(self, t: float, obs: Observer) -> None:
        while self._now < t - _EPS:
            obs.feed([await self._next()])

    async def command(self, cmd: telemetry.Command, obs: Observer) -> telemetry.Reply:
        # Shielded: a stop that arrives while a command waits for its tick lets it finish (the
        # engine applies it anyway) and takes effect at the next wait.
        inner = self.engine.submit(cmd)
        while True:
            try:
                return await asyncio.shield(inner)
            except asyncio.CancelledError as e:
                self._cancelled(e)

    def step_applied(self, entry: dict[str, Any]) -> None:
        n = len(entry["commands"])
        what = f"{entry['phase']} {entry['key']} {entry['name']}: {entry['action']}"
        if entry["targets"]:
            shown = ", ".join(entry["targets"][:4])
            more = f" (+{len(entry['targets']) - 4} more)" if len(entry["targets"]) > 4 else ""
            what += f" {shown}{more}"
        if entry["phase"] == "method":
            what += f" at +{entry['since_method_start_s']:.1f} s"
        if entry["ok"]:
            self.engine.emit_event("scenario_step", "info", self.name, what)
        else:
            errors = [c["reply"]["error"] for c in entry["commands"] if not c["reply"]["ok"]]
            self.engine.emit_event(
                "scenario_step",
                "warning",
                self.name,
                f"{what}: {len(errors)} of {n} commands refused ({errors[0]})",
            )

    async def close(self) -> None:
        self.sub.close()

    def setup_steps(self) -> list[Step]:
        return rate_setup_steps(self.plan)

    def restore_steps(self) -> list[Step]:
        return rate_restore_steps(self.plan, self._old_rate)

    def info(self) -> dict[str, Any]:
        return {
            "fleet": self.engine.fleet,
            "run_id": self.engine.run_id,
            "rate_before_per_s": self._old_rate,
            "speed": self._speed,
        }


def _n(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _one_line(journal: dict[str, Any]) -> str:
    """The verdict's reason, on one line."""
    failures: list[str] = journal["failures"]
    sim = journal["wall"]["simulated_s"]
    if not failures:
        checks = (
            len(journal["invariants"])
            + len(journal["expectations"])
            + sum(len(h["probes"]) for h in journal["steady_state"].values() if h is not None)
        )
        steps = sum(1 for a in journal["actions"] if a["phase"] in ("method", "rollback"))
        return f"{_n(steps, 'action')}, {_n(checks, 'check')} held over {sim:g} s simulated"
    first = " ".join(failures[0].split())
    if journal["verdict"] == "aborted":
        rolled = sum(1 for a in journal["actions"] if a["phase"] == "rollback")
        method = sum(1 for a in journal["actions"] if a["phase"] == "method")
        undo = f"{_n(rolled, 'rollback')} run" if method else "before the method: nothing to undo"
        return f"{first.removeprefix('aborted: ')}; {undo}"
    more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
    return first + more


class LiveScenarios:
    """The scenario runner `install_scenarios` gives an engine: `await runner(engine, name)`."""

    def __init__(self, plans: dict[str, Plan], *, journal_dir: Path | None = None) -> None:
        self.plans = plans
        self.journal_dir = journal_dir
        #: The latest journal of each scenario run here.
        self.journals: dict[str, dict[str, Any]] = {}
        self._runs = 0

    @property
    def names(self) -> list[str]:
        return list(self.plans)

    async def __call__(self, engine: Engine, name: str) -> ScenarioOutcome:
        plan = self.plans[name]
        self._runs += 1
        journal = await run_plan_async(plan, LiveDriver(plan, engine, name))
        self.journals[name] = journal
        line = _one_line(journal)
        if self.journal_dir is not None:
            path = self.journal_dir / f"{name}-{engine.run_id}-{self._runs}.json"
            try:
                self.journal_dir.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(journal, indent=2, allow_nan=False) + "\n")
                line += f"; journal {path}"
            except OSError as e:
                line += f"; journal not written ({e.strerror or e})"
        log.info("scenario %s: %s: %s", name, journal["verdict"], line)
        return ScenarioOutcome(str(journal["verdict"]), line)


def scenarios_for(
    fleet: str, *, catalog: Catalog | None = None, paths: Sequence[Path] | None = None
) -> dict[str, Plan]:
    """The scenarios (shipped, or `paths`) written for fleet `fleet`, loaded and checked, by
    name (the file's stem). Comparisons, other fleets' scenarios and invalid files are left out
    (an invalid one with a warning in the log)."""
    catalog = catalog if catalog is not None else load_catalog()
    if paths is None:
        paths = [scenarios_dir() / f"{n}.toml" for n in shipped_scenarios()]
    plans: dict[str, Plan] = {}
    for path in paths:
        try:
            raw = read_toml(path)
            target = raw.get("fleet")
            if "runs" in raw or not isinstance(target, str) or Path(target).stem != fleet:
                continue
            plan = load_plan(path, catalog=catalog)
        except ConfigError as e:
            log.warning("scenario %s left out: %s", path, e)
            continue
        if isinstance(plan, Plan) and plan.fleet.name == fleet:
            plans[path.stem] = plan
    return plans


def install_scenarios(
    engine: Engine,
    *,
    catalog: Catalog | None = None,
    journal_dir: Path | str | None = None,
    paths: Sequence[Path] | None = None,
) -> LiveScenarios:
    """Give `engine` a scenario runner for the scenarios of its fleet (`scenarios_for`) whose
    fleet file has the engine's tiers. Call it before the engine's meta is published."""
    plans = {
        name: plan
        for name, plan in scenarios_for(engine.fleet, catalog=catalog, paths=paths).items()
        if tier_mismatch(plan, engine.meta) is None
    }
    runner = LiveScenarios(plans, journal_dir=Path(journal_dir) if journal_dir else None)
    engine.set_scenario_runner(runner, runner.names)
    return runner
