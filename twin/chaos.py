"""Scripted chaos scenarios: the format, the loader, the runner and the journal (docs/chaos.md).

A scenario is a TOML file in the shape Chaos Toolkit users know: a steady-state hypothesis (probes
on telemetry metrics) checked before the method, as a gate, and after it; a method of timed
actions in simulated seconds; rollbacks that always run; invariants checked at every snapshot
(request conservation always among them); and expectations tied to an action ("within 30 s after
`recover-decode`, ttft_p99_s < 2"). A file with `[[runs]]` is a comparison instead: the same load
on several fleets, and relations between their measured metrics.

Everything in a file is checked before anything runs: unknown keys, actions, metrics, selector
keys and names (tiers, vendors, systems, instances, chips, links, action names) are one
`ConfigError` line, `<file>: <key.path>: <what was expected>`, listing the valid names.

The runner drives a `Driver`: in-process (an `Engine` on a `VirtualClock` at speed 0, as fast as
the machine allows; deterministic), a live twin over MQTT (`twin.chaos_mqtt`, at the twin's own
pace) or the live engine of this process (`twin.chaos_live`: the `run_scenario` command). All
feed the same `Observer` with telemetry messages, so a scenario means the same thing in every
mode. The journal is plain JSON; everything that depends on the wall clock is under its
`wall` key, so the same scenario with the same seed gives the same journal without it.
"""

from __future__ import annotations

import bisect
import datetime
import math
import operator
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args, get_origin

import msgspec
import numpy as np

from twin import telemetry
from twin.catalog import Catalog, ConfigError, fleets_dir, key_path, load_catalog, read_toml
from twin.fleet import POLICIES, Fleet, load_fleet, resolve_fleet_path

__all__ = [
    "ACTIONS",
    "COMPARE_METRICS",
    "LINK_METRICS",
    "SUMMARY_METRICS",
    "TIER_METRICS",
    "ChaosAborted",
    "ComparePlan",
    "CompareScenario",
    "Driver",
    "InProcessDriver",
    "Observer",
    "Plan",
    "Scenario",
    "exit_status",
    "load_plan",
    "rate_restore_steps",
    "rate_setup_steps",
    "resolve_scenario_path",
    "run_compare",
    "run_plan",
    "run_plan_async",
    "shipped_scenarios",
    "tier_mismatch",
]

JOURNAL_VERSION = 1
_EPS = 1e-9

# ------------------------------------------------------------------------------------------------
# metric names (the telemetry messages' field names)

_NOT_METRICS = frozenset({"schema", "ts_ms"})


def _numeric_fields(cls: type[msgspec.Struct]) -> tuple[str, ...]:
    return tuple(
        f.name
        for f in msgspec.structs.fields(cls)
        if f.name not in _NOT_METRICS and f.type in (int, float)
    )


#: Fleet-wide metrics: the numeric fields of a telemetry `summary` message.
SUMMARY_METRICS: tuple[str, ...] = _numeric_fields(telemetry.Summary)
#: Per-tier metrics (a probe with `tier = "..."`): the numeric fields of a `tier` message.
TIER_METRICS: tuple[str, ...] = _numeric_fields(telemetry.Tier)
#: Per-link metrics (a probe with `link = "<from>-><to>"`): the fields of a summary's link stat.
LINK_METRICS: tuple[str, ...] = _numeric_fields(telemetry.LinkStat)
#: Fields that are -1.0 when there is no data (no request finished in the window, a trace).
NO_DATA_METRICS = frozenset(
    {
        "ttft_p50_s",
        "ttft_p99_s",
        "tpot_p50_s",
        "tpot_p99_s",
        "goodput_fraction",
        "rate_per_s",
        "base_rate_per_s",
        "sim_time_s",  # a tier message from a twin older than the field
    }
)
#: What a comparison measures per run, over the measured period (after the warm-up).
COMPARE_METRICS: tuple[str, ...] = (
    "arrived",
    "done",
    "rejected",
    "rejected_no_capacity",
    "rejected_retry_budget",
    "in_flight",
    "retries",
    "arrivals_per_s",
    "tokens_per_s",
    "prefill_tokens_per_s",
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "goodput_fraction",
    "goodput_per_s",
    "power_w",
    "tokens_per_joule",
    "chips",
)

# ------------------------------------------------------------------------------------------------
# the file format (msgspec Structs: frozen, keyword-only, unknown keys rejected)

Op = Literal["<", "<=", ">", ">=", "==", "!="]
Aggregate = Literal["mean", "max", "min"]
Holds = Literal["eventually", "always"]
Unit = Literal["instance", "chip"]
Names = str | list[str]

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


class _S(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class Probe(_S, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A metric, an operator and a value; over the latest snapshot, or aggregated (mean, max or
    min; mean by default) over the snapshots of the last `window_s` simulated seconds."""

    name: str = ""
    metric: str
    op: Op
    value: float
    tier: str | None = None
    link: str | None = None
    window_s: float | None = None
    aggregate: Aggregate | None = None


class Expect(Probe, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A probe tied to an action: within `within_s` after `after` was applied (and, with
    `from_s`, not before `from_s` after it), it holds at some snapshot (`holds = "eventually"`,
    the default) or at every snapshot (`"always"`)."""

    after: str
    within_s: float
    from_s: float = 0.0
    holds: Holds = "eventually"


class SteadyState(_S, frozen=True, kw_only=True, forbid_unknown_fields=True):
    title: str = ""
    probes: list[Probe]


class Selector(_S, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which chips an action hits. Filters (tier, role, vendor, system) narrow the fleet's
    instances; `count` or `fraction` take some of them (the first ones, or a random choice with
    the scenario's seed); `unit = "chip"` counts chips instead of instances. `instance` and `chip`
    name targets outright; `targets_of` takes the targets of an earlier action."""

    tier: Names | None = None
    role: Names | None = None
    vendor: Names | None = None
    system: Names | None = None
    instance: Names | None = None
    chip: Names | None = None
    unit: Unit = "instance"
    count: int | None = None
    fraction: float | None = None
    random: bool = False
    targets_of: str | None = None


class _Action(_S, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="action"):
    name: str = ""
    at_s: float | None = None  # method: required; rollbacks: not allowed (they run at the end)


class FailAction(_Action, tag="fail", frozen=True, kw_only=True, forbid_unknown_fields=True):
    selector: Selector


class RecoverAction(_Action, tag="recover", frozen=True, kw_only=True, forbid_unknown_fields=True):
    selector: Selector


class DrainAction(_Action, tag="drain", frozen=True, kw_only=True, forbid_unknown_fields=True):
    selector: Selector


class DegradeLinkAction(
    _Action, tag="degrade_link", frozen=True, kw_only=True, forbid_unknown_fields=True
):
    link: Names | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    to: str | None = None
    factor: float


class RestoreLinkAction(
    _Action, tag="restore_link", frozen=True, kw_only=True, forbid_unknown_fields=True
):
    link: Names | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    to: str | None = None


class SetRateAction(_Action, tag="set_rate", frozen=True, kw_only=True, forbid_unknown_fields=True):
    rate_per_s: float


class BurstAction(_Action, tag="burst", frozen=True, kw_only=True, forbid_unknown_fields=True):
    factor: float
    duration_s: float


class SetRoutingAction(
    _Action, tag="set_routing", frozen=True, kw_only=True, forbid_unknown_fields=True
):
    policy: str
    weights: dict[str, float] = {}


class SetSpeedAction(
    _Action, tag="set_speed", frozen=True, kw_only=True, forbid_unknown_fields=True
):
    speed: float


Action = (
    FailAction
    | RecoverAction
    | DrainAction
    | DegradeLinkAction
    | RestoreLinkAction
    | SetRateAction
    | BurstAction
    | SetRoutingAction
    | SetSpeedAction
)
ACTIONS: tuple[str, ...] = tuple(
    str(t.__struct_config__.tag) for t in get_args(Action) if t.__struct_config__.tag
)


class Scenario(_S, frozen=True, kw_only=True, forbid_unknown_fields=True):
    title: str
    description: str = ""
    fleet: str
    seed: int = 0
    warmup_s: float = 20.0
    duration_s: float
    rate_per_s: float | None = None
    steady_state: SteadyState | None = msgspec.field(default=None, name="steady-state")
    method: list[Action] = []
    rollbacks: list[Action] = []
    invariants: list[Probe] = []
    expect: list[Expect] = []


class Run(_S, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One fleet of a comparison, with optional overrides of the scenario's rate and the fleet's
    SLOs and routing policy. Every run gets the workload (lengths, arrivals) of the first run."""

    name: str
    fleet: str
    rate_per_s: float | None = None
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    policy: str | None = None


class Relation(_S, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`left.metric op factor x right.metric`, or `left.metric op value`."""

    name: str = ""
    metric: str
    left: str
    op: Op
    right: str | None = None
    factor: float = 1.0
    value: float | None = None


class CompareScenario(_S, frozen=True, kw_only=True, forbid_unknown_fields=True):
    title: str
    description: str = ""
    seed: int = 0
    warmup_s: float = 20.0
    duration_s: float
    rate_per_s: float | None = None
    runs: list[Run]
    compare: list[Relation]


# ------------------------------------------------------------------------------------------------
# the resolved plan


@dataclass(frozen=True)
class Check:
    """A probe, an invariant or an expectation, resolved against the fleet."""

    kind: str  # "probe" | "invariant" | "expect"
    key: str  # where it is in the file, e.g. "expect[0]"
    name: str
    metric: str
    op: str
    threshold: float
    scope: str = "summary"  # "summary" | "tier" | "link"
    scope_name: str = ""
    window_s: float = 0.0
    aggregate: str = "mean"
    after: str = ""
    within_s: float = 0.0
    from_s: float = 0.0
    holds: str = "eventually"
    #: Built-in checks compute their value from the whole summary message.
    fn: Callable[[telemetry.Summary], float] | None = None
    description: str = ""

    def label(self) -> str:
        if self.description:
            return self.description
        where = {"tier": f"{self.scope_name}.", "link": f"{self.scope_name}."}.get(self.scope, "")
        what = f"{where}{self.metric}"
        if self.window_s > 0:
            what = f"{self.aggregate} {what} over {self.window_s:g} s"
        return f"{what} {self.op} {self.threshold:g}"

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "metric": self.metric}
        if self.scope != "summary":
            out[self.scope] = self.scope_name
        out["op"] = self.op
        out["threshold"] = self.threshold
        if self.window_s > 0:
            out["window_s"] = self.window_s
            out["aggregate"] = self.aggregate
        if self.kind == "expect":
            out.update(after=self.after, within_s=self.within_s, holds=self.holds)
            if self.from_s > 0:
                out["from_s"] = self.from_s
        return out


@dataclass(frozen=True)
class Step:
    """One action of the method or the rollbacks, with the commands it sends."""

    phase: str  # "setup" | "method" | "rollback" | "restore"
    key: str  # "method[2]"
    name: str
    action: str
    at_s: float | None
    commands: tuple[telemetry.Command, ...]
    targets: tuple[str, ...] = ()
    spec: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    path: Path
    scenario: Scenario
    fleet: Fleet
    fleet_path: Path
    catalog: Catalog
    seed: int
    warmup_s: float
    duration_s: float
    rate_per_s: float | None
    before: tuple[Check, ...]
    after: tuple[Check, ...]
    steps: tuple[Step, ...]
    rollbacks: tuple[Step, ...]
    invariants: tuple[Check, ...]
    expects: tuple[Check, ...]
    link_names: tuple[str, ...]


@dataclass(frozen=True)
class RunSpec:
    name: str
    fleet: Fleet
    fleet_path: Path
    rate_per_s: float
    slo_ttft_s: float
    slo_tpot_s: float
    policy: str


@dataclass(frozen=True)
class ComparePlan:
    path: Path
    scenario: CompareScenario
    catalog: Catalog
    runs: tuple[RunSpec, ...]


# ------------------------------------------------------------------------------------------------
# loading and validation


def scenarios_dir() -> Path:
    return fleets_dir() / "scenarios"


def shipped_scenarios() -> list[str]:
    d = scenarios_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def resolve_scenario_path(name_or_path: str) -> Path:
    """A path to a scenario file, or the name of a shipped one (`fleets/scenarios/<name>.toml`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.suffix == ".toml" or "/" in name_or_path or "\\" in name_or_path:
        raise ConfigError(f"{name_or_path}: no such scenario file")
    shipped = shipped_scenarios()
    if name_or_path in shipped:
        return scenarios_dir() / f"{name_or_path}.toml"
    raise ConfigError(
        f"{name_or_path}: unknown scenario (expected a path to a .toml file or one of: "
        f"{', '.join(shipped) or 'none shipped'})"
    )


def load_plan(
    path: str | Path,
    *,
    fleet: str | None = None,
    catalog: Catalog | None = None,
) -> Plan | ComparePlan:
    """Read, validate and resolve a scenario file; ConfigError (one line) if anything is wrong.
    `fleet` (a shipped name or a path) overrides the scenario's fleet."""
    path = Path(path)
    raw = read_toml(path)
    catalog = catalog if catalog is not None else load_catalog()
    if "runs" in raw:
        if fleet is not None:
            raise ConfigError(f"{path}: --fleet: a comparison names its own fleets in [[runs]]")
        cmp = _convert(raw, CompareScenario, path)
        return _Resolver(path, raw, catalog).compare(cmp)
    scenario = _convert(raw, Scenario, path)
    return _Resolver(path, raw, catalog).scenario(scenario, fleet)


def _convert(raw: dict[str, Any], cls: type[Any], path: Path) -> Any:
    try:
        return msgspec.convert(raw, cls)
    except msgspec.ValidationError as e:
        key, what = _translate(str(e), raw, cls)
        raise ConfigError(f"{path}: {key}: {what}") from None


# -- msgspec error translation ------------------------------------------------------------------

_AT_RE = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
_TYPE_WORDS = {
    "float": "a number",
    "int": "an integer",
    "str": "a string",
    "bool": "a boolean",
    "object": "a table",
    "array": "an array",
    "null": "nothing",
}


def _split_path(path: str) -> list[str | int]:
    return [
        int(tok[1:-1]) if tok.startswith("[") else tok
        for tok in re.findall(r"[^.\[\]]+|\[\d+\]", path)
    ]


def _raw_at(raw: Any, segs: Sequence[str | int]) -> Any:
    node = raw
    for s in segs:
        try:
            node = node[s]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _struct_members(tp: Any) -> list[type[msgspec.Struct]]:
    args = get_args(tp) if get_origin(tp) is not None or type(tp).__name__ == "UnionType" else ()
    members = [a for a in (args or (tp,)) if isinstance(a, type) and issubclass(a, msgspec.Struct)]
    return members


def _type_at(root: type[Any], segs: Sequence[str | int], raw: Any) -> Any:
    """The annotation a key path points at; for a tagged union, the member the raw tag names."""
    tp: Any = root
    done: list[str | int] = []
    for s in segs:
        members = _struct_members(tp)
        if isinstance(s, int):
            origin = get_origin(tp)
            if origin is list:
                tp = get_args(tp)[0]
            else:
                lists = [a for a in get_args(tp) if get_origin(a) is list]
                if not lists:
                    return None
                tp = get_args(lists[0])[0]
            done.append(s)
            continue
        if len(members) > 1:
            tag = _raw_at(raw, [*done, "action"])
            members = [m for m in members if m.__struct_config__.tag == tag]
        if not members:
            return None
        fields = {f.encode_name: f.type for f in msgspec.structs.fields(members[0])}
        if s not in fields:
            return None
        tp = fields[s]
        done.append(s)
    members = _struct_members(tp)
    if len(members) > 1:
        tag = _raw_at(raw, [*done, "action"])
        members = [m for m in members if m.__struct_config__.tag == tag] or members[:1]
    return members[0] if len(members) == 1 else tp


def _translate(msg: str, raw: dict[str, Any], root: type[Any]) -> tuple[str, str]:
    """msgspec's `Object contains unknown field `x` - at `$.method[0]`` -> (`method[0].x`,
    `unknown key (expected one of: ...)`)."""
    msg = " ".join(msg.split())
    m = _AT_RE.match(msg)
    what = m.group("what") if m else msg
    path = ((m.group("path") or "") if m else "").removeprefix(".")
    if path.endswith("[...]"):  # a value inside a table of numbers: name its key
        path = path.removesuffix("[...]")
        node = _raw_at(raw, _split_path(path))
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, bool) or not isinstance(v, int | float):
                    path = f"{path}.{k}"
                    break
    segs = _split_path(path)
    where = key_path(segs) or "(top level)"
    if um := re.match(r"Object contains unknown field `(.+)`", what):
        tp = _type_at(root, segs, raw)
        allowed = (
            [f.encode_name for f in msgspec.structs.fields(tp)]
            if isinstance(tp, type) and issubclass(tp, msgspec.Struct)
            else []
        )
        if tp is not None and getattr(tp.__struct_config__, "tag_field", None):
            allowed = [a for a in allowed if a != tp.__struct_config__.tag_field]
            allowed = ["action", *allowed]
        hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        return key_path([*segs, um.group(1)]), f"unknown key{hint}"
    if mm := re.match(r"Object missing required field `(.+)`", what):
        return key_path([*segs, mm.group(1)]), "missing required key"
    value = _raw_at(raw, segs)
    if segs and segs[-1] == "action" and what.startswith("Invalid value"):
        return where, f"unknown action {value!r} (expected one of: {', '.join(ACTIONS)})"
    if what.startswith("Invalid enum value"):
        tp = _type_at(root, segs, raw)
        choices = [str(a) for a in get_args(tp)] if get_origin(tp) is Literal else []
        hint = f" (expected one of: {', '.join(choices)})" if choices else ""
        return where, f"invalid value {value!r}{hint}"
    if tm := re.match(r"Expected `(.+?)`, got `(.+?)`$", what):
        exp = " or ".join(_TYPE_WORDS.get(x.strip(), x.strip()) for x in tm.group(1).split("|"))
        got = _TYPE_WORDS.get(tm.group(2), tm.group(2))
        shown = f" {value!r}" if isinstance(value, str | int | float) else ""
        return where, f"expected {exp}, got {got}{shown}"
    return where, what[:1].lower() + what[1:]


# -- semantic checks and resolution ---------------------------------------------------------------


@dataclass(frozen=True)
class _Inst:
    name: str
    tier: str
    role: str
    system: str
    vendor: str
    n_chips: int


def _names(v: Names | None) -> list[str]:
    if v is None:
        return []
    return [v] if isinstance(v, str) else list(v)


def _listing(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


class _Resolver:
    def __init__(self, path: Path, raw: dict[str, Any], catalog: Catalog) -> None:
        self.path = path
        self.raw = raw
        self.catalog = catalog

    def fail(self, segs: Sequence[str | int], what: str) -> ConfigError:
        return ConfigError.at(self.path, segs, what)

    # -- fleets ---------------------------------------------------------------------------------
    def _fleet(self, value: str, segs: Sequence[str | int]) -> tuple[Fleet, Path]:
        """A shipped fleet name, or a path (relative to the scenario file, then to the current
        directory)."""
        local = self.path.parent / value
        try:
            fleet_path = local if local.is_file() else resolve_fleet_path(value)
        except ConfigError as e:
            raise self.fail(segs, str(e)) from None
        return load_fleet(fleet_path, self.catalog), fleet_path

    # -- numbers --------------------------------------------------------------------------------
    def _positive(self, segs: Sequence[str | int], v: float) -> None:
        if not (math.isfinite(v) and v > 0):
            raise self.fail(segs, f"expected a number > 0, got {v:g}")

    def _nonneg(self, segs: Sequence[str | int], v: float) -> None:
        if not (math.isfinite(v) and v >= 0):
            raise self.fail(segs, f"expected a number >= 0, got {v:g}")

    # -- a scenario -----------------------------------------------------------------------------
    def scenario(self, sc: Scenario, fleet_override: str | None) -> Plan:
        if fleet_override is not None:
            try:
                fleet_path = resolve_fleet_path(fleet_override)
            except ConfigError as e:
                raise ConfigError(f"--fleet: {e}") from None
            fleet = load_fleet(fleet_path, self.catalog)
        else:
            fleet, fleet_path = self._fleet(sc.fleet, ["fleet"])
        self._positive(["duration_s"], sc.duration_s)
        self._nonneg(["warmup_s"], sc.warmup_s)
        if sc.rate_per_s is not None:
            self._rate(["rate_per_s"], sc.rate_per_s)
        if sc.seed < 0:
            raise self.fail(["seed"], f"expected an integer >= 0, got {sc.seed}")
        self.fleet = fleet
        self.insts = _instances(fleet, self.catalog)
        self.tiers = [t.name for t in fleet.tiers]
        self.links = [f"{lk.from_}->{lk.to}" for lk in fleet.links]
        self.seed = sc.seed

        before: list[Check] = []
        if sc.steady_state is not None:
            if not sc.steady_state.probes:
                raise self.fail(["steady-state", "probes"], "expected at least one probe")
            for i, pr in enumerate(sc.steady_state.probes):
                segs: list[str | int] = ["steady-state", "probes", i]
                c = self._check("probe", segs, pr)
                if c.window_s > sc.warmup_s + _EPS:
                    raise self.fail(
                        [*segs, "window_s"],
                        f"the window ({c.window_s:g} s) is longer than the warm-up before the "
                        f"first check (warmup_s = {sc.warmup_s:g})",
                    )
                before.append(c)

        names: dict[str, str] = {}  # action name -> key
        raw_steps: list[tuple[str, int, Action]] = [
            ("method", i, a) for i, a in enumerate(sc.method)
        ]
        raw_steps += [("rollbacks", i, a) for i, a in enumerate(sc.rollbacks)]
        for part, i, a in raw_steps:
            segs = [part, i]
            if part == "method":
                if a.at_s is None:
                    raise self.fail([*segs, "at_s"], "missing required key")
                if not (math.isfinite(a.at_s) and 0 <= a.at_s <= sc.duration_s):
                    raise self.fail(
                        [*segs, "at_s"],
                        f"expected a time in [0, duration_s = {sc.duration_s:g}], got {a.at_s:g}",
                    )
            elif a.at_s is not None:
                raise self.fail(
                    [*segs, "at_s"], "rollbacks run at the end of the scenario; remove at_s"
                )
            name = a.name or f"{a.__struct_config__.tag}-{part}[{i}]"
            if name in names:
                raise self.fail([*segs, "name"], f"{name!r} is already the name of {names[name]}")
            names[name] = key_path(segs)
        self.action_names = names
        self.raw_actions = {
            (a.name or f"{a.__struct_config__.tag}-{p}[{i}]"): (p, i, a) for p, i, a in raw_steps
        }
        self.targets_cache: dict[str, tuple[str, ...]] = {}
        steps = [self._step("method", i, a) for i, a in enumerate(sc.method)]
        steps.sort(key=lambda s: s.at_s or 0.0)  # stable: file order at equal times
        rollbacks = [self._step("rollback", i, a) for i, a in enumerate(sc.rollbacks)]

        invariants = [
            self._check("invariant", ["invariants", i], p) for i, p in enumerate(sc.invariants)
        ]
        expects: list[Check] = []
        method_at = {s.name: s.at_s or 0.0 for s in steps}
        for i, ex in enumerate(sc.expect):
            segs = ["expect", i]
            if ex.after not in method_at:
                raise self.fail(
                    [*segs, "after"],
                    f"unknown action {ex.after!r} (expected the name of a method action: "
                    f"{_listing(list(method_at))})",
                )
            self._positive([*segs, "within_s"], ex.within_s)
            self._nonneg([*segs, "from_s"], ex.from_s)
            if ex.from_s >= ex.within_s:
                raise self.fail(
                    [*segs, "from_s"],
                    f"expected less than within_s ({ex.within_s:g}), got {ex.from_s:g}",
                )
            end = method_at[ex.after] + ex.within_s
            if end > sc.duration_s + _EPS:
                raise self.fail(
                    [*segs, "within_s"],
                    f"the window ends at {end:g} s, after the scenario's end "
                    f"(duration_s = {sc.duration_s:g})",
                )
            expects.append(self._check("expect", segs, ex))
        return Plan(
            path=self.path,
            scenario=sc,
            fleet=fleet,
            fleet_path=fleet_path,
            catalog=self.catalog,
            seed=sc.seed,
            warmup_s=sc.warmup_s,
            duration_s=sc.duration_s,
            rate_per_s=sc.rate_per_s,
            before=tuple(before),
            after=tuple(before),
            steps=tuple(steps),
            rollbacks=tuple(rollbacks),
            invariants=(*_builtin_invariants(), *invariants),
            expects=tuple(expects),
            link_names=tuple(self.links),
        )

    def _link_hint(self) -> str:
        if not self.links:
            return f"fleet {self.fleet.name!r} has no links"
        return f"expected one of: {', '.join(self.links)}"

    def _rate(self, segs: Sequence[str | int], v: float) -> None:
        if not (math.isfinite(v) and 0 <= v <= telemetry.MAX_RATE_PER_S):
            raise self.fail(
                segs, f"expected a rate in [0, {telemetry.MAX_RATE_PER_S:g}] requests/s, got {v:g}"
            )

    # -- probes ---------------------------------------------------------------------------------
    def _check(self, kind: str, segs: list[str | int], p: Probe) -> Check:
        if p.tier is not None and p.link is not None:
            raise self.fail([*segs, "link"], "a probe reads a tier or a link, not both")
        if p.tier is not None:
            if p.tier not in self.tiers:
                raise self.fail(
                    [*segs, "tier"],
                    f"unknown tier {p.tier!r} (expected one of: {_listing(self.tiers)})",
                )
            scope, scope_name, valid = "tier", p.tier, TIER_METRICS
        elif p.link is not None:
            if p.link not in self.links:
                raise self.fail(
                    [*segs, "link"],
                    f"unknown link {p.link!r} ({self._link_hint()})",
                )
            scope, scope_name, valid = "link", p.link, LINK_METRICS
        else:
            scope, scope_name, valid = "summary", "", SUMMARY_METRICS
        if p.metric not in valid:
            what = {"tier": "tier metric", "link": "link metric"}.get(scope, "metric")
            raise self.fail(
                [*segs, "metric"],
                f"unknown {what} {p.metric!r} (expected one of: {', '.join(valid)})",
            )
        if not math.isfinite(p.value):
            raise self.fail([*segs, "value"], f"expected a finite number, got {p.value}")
        window = 0.0
        if p.window_s is not None:
            self._positive([*segs, "window_s"], p.window_s)
            window = p.window_s
        elif p.aggregate is not None:
            raise self.fail([*segs, "aggregate"], "an aggregate needs a window_s")
        name = p.name or key_path(segs)
        base = Check(
            kind=kind,
            key=key_path(segs),
            name=name,
            metric=p.metric,
            op=p.op,
            threshold=float(p.value),
            scope=scope,
            scope_name=scope_name,
            window_s=window,
            aggregate=p.aggregate or "mean",
        )
        if isinstance(p, Expect):
            return Check(
                **{
                    **base.__dict__,
                    "after": p.after,
                    "within_s": p.within_s,
                    "from_s": p.from_s,
                    "holds": p.holds,
                }
            )
        return base

    # -- actions --------------------------------------------------------------------------------
    def _step(self, phase: str, i: int, a: Action) -> Step:
        part = "method" if phase == "method" else "rollbacks"
        segs: list[str | int] = [part, i]
        tag = str(a.__struct_config__.tag)
        name = a.name or f"{tag}-{part}[{i}]"
        spec = msgspec.to_builtins(a)
        T = telemetry
        targets: tuple[str, ...] = ()
        cmds: list[telemetry.Command]
        if isinstance(a, FailAction | RecoverAction | DrainAction):
            targets = self._targets(name, [*segs, "selector"])
            if isinstance(a, FailAction):
                cmds = [T.Fail(target=t) for t in targets]
            elif isinstance(a, RecoverAction):
                cmds = [T.Recover(target=t) for t in targets]
            else:
                cmds = [T.Drain(target=t) for t in targets]
        elif isinstance(a, DegradeLinkAction | RestoreLinkAction):
            links = self._links(segs, a)
            targets = tuple(links)
            if isinstance(a, DegradeLinkAction):
                cmds = [T.DegradeLink(link=lk, factor=a.factor) for lk in links]
            else:
                cmds = [T.RestoreLink(link=lk) for lk in links]
        elif isinstance(a, SetRateAction):
            cmds = [T.SetRate(rate_per_s=a.rate_per_s)]
        elif isinstance(a, BurstAction):
            if self.fleet.workload.arrivals == "trace":
                raise self.fail(
                    [*segs, "action"], "a trace workload sets its own arrival times; no burst"
                )
            cmds = [T.Burst(factor=a.factor, duration_s=a.duration_s)]
        elif isinstance(a, SetRoutingAction):
            for tier in a.weights:
                if tier not in self.tiers:
                    raise self.fail(
                        [*segs, "weights", tier],
                        f"unknown tier {tier!r} (expected one of: {_listing(self.tiers)})",
                    )
            cmds = [T.SetRouting(policy=a.policy, weights=dict(a.weights))]
        elif isinstance(a, SetSpeedAction):
            cmds = [T.SetSpeed(speed=a.speed)]
        else:  # pragma: no cover - the union is closed
            raise self.fail([*segs, "action"], f"unsupported action {tag!r}")
        for c in cmds:
            try:
                T.check_command(c)
            except T.CommandError as e:
                raise ConfigError(f"{self.path}: {key_path(segs)}.{e}") from None
        return Step(
            phase=phase,
            key=key_path(segs),
            name=name,
            action=tag,
            at_s=a.at_s,
            commands=tuple(cmds),
            targets=targets,
            spec=spec,
        )

    def _links(self, segs: list[str | int], a: DegradeLinkAction | RestoreLinkAction) -> list[str]:
        explicit = _names(a.link)
        if explicit and (a.from_ is not None or a.to is not None):
            raise self.fail([*segs, "link"], "name links with link, or with from/to, not both")
        if explicit:
            for lk in explicit:
                if lk not in self.links:
                    raise self.fail(
                        [*segs, "link"],
                        f"unknown link {lk!r} ({self._link_hint()})",
                    )
            return explicit
        if a.from_ is None and a.to is None:
            raise self.fail(
                [*segs, "link"], "missing required key (a link name, or from and/or to)"
            )
        for key, v in (("from", a.from_), ("to", a.to)):
            if v is not None and v not in self.tiers:
                raise self.fail(
                    [*segs, key], f"unknown tier {v!r} (expected one of: {_listing(self.tiers)})"
                )
        out = [
            f"{lk.from_}->{lk.to}"
            for lk in self.fleet.links
            if (a.from_ is None or lk.from_ == a.from_) and (a.to is None or lk.to == a.to)
        ]
        if not out:
            raise self.fail(
                [*segs, "from" if a.from_ is not None else "to"],
                f"no link matches ({self._link_hint()})",
            )
        return out

    def _targets(self, name: str, segs: list[str | int]) -> tuple[str, ...]:
        """Resolve a selector to instance or chip ids (cached per action name, so `targets_of`
        gets exactly the same choice)."""
        if name in self.targets_cache:
            return self.targets_cache[name]
        part, i, a = self.raw_actions[name]
        assert isinstance(a, FailAction | RecoverAction | DrainAction)
        sel = a.selector
        out = self._select(sel, segs, name, part, i)
        self.targets_cache[name] = out
        return out

    def _select(
        self, sel: Selector, segs: list[str | int], name: str, part: str, index: int
    ) -> tuple[str, ...]:
        filters = {"tier": sel.tier, "role": sel.role, "vendor": sel.vendor, "system": sel.system}
        given = {k for k, v in filters.items() if v is not None}
        picks = {"count": sel.count, "fraction": sel.fraction}
        if sel.targets_of is not None:
            others = [k for k in (*given, *(k for k, v in picks.items() if v is not None))]
            if sel.instance is not None or sel.chip is not None or others or sel.random:
                raise self.fail([*segs, "targets_of"], "targets_of takes no other selector keys")
            ref = sel.targets_of
            entry = self.raw_actions.get(ref)
            selecting = [
                n
                for n, (_, _, x) in self.raw_actions.items()
                if isinstance(x, FailAction | RecoverAction | DrainAction) and n != name
            ]
            if entry is None or not isinstance(entry[2], FailAction | RecoverAction | DrainAction):
                raise self.fail(
                    [*segs, "targets_of"],
                    f"unknown action {ref!r} (expected the name of a fail, recover or drain "
                    f"action: {_listing(selecting)})",
                )
            if ref == name:
                raise self.fail([*segs, "targets_of"], "an action cannot take its own targets")
            p2, i2, _ = entry
            return self._targets(ref, [p2, i2, "selector"])
        explicit = sel.instance is not None or sel.chip is not None
        if explicit:
            if sel.instance is not None and sel.chip is not None:
                raise self.fail([*segs, "chip"], "name instances or chips, not both")
            extra = [*given, *(k for k, v in picks.items() if v is not None)]
            if extra or sel.random:
                key = "instance" if sel.instance is not None else "chip"
                raise self.fail(
                    [*segs, key],
                    f"{key} names its targets; it takes no "
                    f"{', '.join(extra) or 'random'} (use tier/role/vendor/system to choose)",
                )
            if sel.instance is not None:
                valid = {x.name for x in self.insts}
                out = _names(sel.instance)
                for x in out:
                    if x not in valid:
                        raise self.fail(
                            [*segs, "instance"],
                            f"unknown instance {x!r} (expected one of: "
                            f"{_listing([y.name for y in self.insts])})",
                        )
                return tuple(out)
            out = _names(sel.chip)
            by_name = {x.name: x for x in self.insts}
            for c in out:
                head, _, tail = c.rpartition("/")
                inst = by_name.get(head)
                if inst is None or not tail.isdigit() or int(tail) >= inst.n_chips:
                    ex = self.insts[0]
                    raise self.fail(
                        [*segs, "chip"],
                        f"unknown chip {c!r} (expected '<tier>/<k>/<j>' of this fleet, e.g. "
                        f"'{ex.name}/0'; {ex.name} has chips 0-{ex.n_chips - 1})",
                    )
            return tuple(out)
        cands = list(self.insts)
        for key, valid_list, attr in (
            ("tier", self.tiers, "tier"),
            ("role", sorted({x.role for x in self.insts}), "role"),
            ("vendor", sorted({x.vendor for x in self.insts}), "vendor"),
            ("system", sorted({x.system for x in self.insts}), "system"),
        ):
            wanted = _names(filters[key])
            if not wanted:
                continue
            fold = {v.casefold(): v for v in valid_list}
            chosen: set[str] = set()
            for w in wanted:
                hit = (
                    fold.get(w.casefold()) if key == "vendor" else (w if w in valid_list else None)
                )
                if hit is None:
                    raise self.fail(
                        [*segs, key],
                        f"unknown {key} {w!r} (expected one of: {_listing(valid_list)})",
                    )
                chosen.add(hit)
            cands = [x for x in cands if getattr(x, attr) in chosen]
        if not cands:
            raise self.fail(segs, "the selector matches no instance of this fleet")
        units: list[str] = (
            [x.name for x in cands]
            if sel.unit == "instance"
            else [f"{x.name}/{j}" for x in cands for j in range(x.n_chips)]
        )
        n = len(units)
        if sel.count is not None and sel.fraction is not None:
            raise self.fail([*segs, "fraction"], "give count or fraction, not both")
        k = n
        if sel.count is not None:
            if not 1 <= sel.count <= n:
                raise self.fail(
                    [*segs, "count"],
                    f"expected 1 to {n} (the selector matches {n} {sel.unit}s), got {sel.count}",
                )
            k = sel.count
        elif sel.fraction is not None:
            if not (math.isfinite(sel.fraction) and 0 < sel.fraction <= 1):
                raise self.fail([*segs, "fraction"], f"expected (0, 1], got {sel.fraction:g}")
            k = max(1, math.floor(sel.fraction * n + 0.5))
        if sel.random:
            salt = 0 if part == "method" else 1
            rng = np.random.default_rng([self.seed, salt, index])
            idx = np.sort(rng.choice(n, size=k, replace=False))
            return tuple(units[int(j)] for j in idx)
        return tuple(units[:k])

    # -- a comparison ---------------------------------------------------------------------------
    def compare(self, sc: CompareScenario) -> ComparePlan:
        self._positive(["duration_s"], sc.duration_s)
        self._nonneg(["warmup_s"], sc.warmup_s)
        if sc.rate_per_s is not None:
            self._rate(["rate_per_s"], sc.rate_per_s)
        if len(sc.runs) < 2:
            raise self.fail(["runs"], "expected at least two runs to compare")
        runs: list[RunSpec] = []
        seen: set[str] = set()
        first: Fleet | None = None
        for i, r in enumerate(sc.runs):
            segs: list[str | int] = ["runs", i]
            if r.name in seen:
                raise self.fail([*segs, "name"], f"{r.name!r} is already the name of a run")
            seen.add(r.name)
            fleet, fleet_path = self._fleet(r.fleet, [*segs, "fleet"])
            if first is None:
                first = fleet
            elif fleet.workload.model != first.workload.model:
                raise self.fail(
                    [*segs, "fleet"],
                    f"serves {fleet.workload.model}, but the first run's fleet serves "
                    f"{first.workload.model}: a comparison needs the same model",
                )
            rate = r.rate_per_s if r.rate_per_s is not None else sc.rate_per_s
            if rate is None:
                rate = first.workload.rate_per_s
            self._rate([*segs, "rate_per_s"], rate)
            for key, v in (("slo_ttft_s", r.slo_ttft_s), ("slo_tpot_s", r.slo_tpot_s)):
                if v is not None:
                    self._positive([*segs, key], v)
            if r.policy is not None and r.policy not in POLICIES:
                raise self.fail(
                    [*segs, "policy"],
                    f"unknown routing policy {r.policy!r} (expected one of: {', '.join(POLICIES)})",
                )
            slo = msgspec.structs.replace(
                fleet.slo,
                ttft_s=r.slo_ttft_s if r.slo_ttft_s is not None else fleet.slo.ttft_s,
                tpot_s=r.slo_tpot_s if r.slo_tpot_s is not None else fleet.slo.tpot_s,
            )
            router = fleet.router
            if r.policy is not None:
                router = msgspec.structs.replace(router, policy=r.policy)
            workload = msgspec.structs.replace(first.workload, rate_per_s=rate)
            fleet = msgspec.structs.replace(fleet, slo=slo, router=router, workload=workload)
            runs.append(
                RunSpec(
                    name=r.name,
                    fleet=fleet,
                    fleet_path=fleet_path,
                    rate_per_s=rate,
                    slo_ttft_s=slo.ttft_s,
                    slo_tpot_s=slo.tpot_s,
                    policy=router.policy,
                )
            )
        names = [r.name for r in runs]
        if not sc.compare:
            raise self.fail(["compare"], "expected at least one relation")
        for i, rel in enumerate(sc.compare):
            segs = ["compare", i]
            if rel.metric not in COMPARE_METRICS:
                raise self.fail(
                    [*segs, "metric"],
                    f"unknown metric {rel.metric!r} (expected one of: "
                    f"{', '.join(COMPARE_METRICS)})",
                )
            for key, run in (("left", rel.left), ("right", rel.right)):
                if run is not None and run not in names:
                    raise self.fail(
                        [*segs, key], f"unknown run {run!r} (expected one of: {_listing(names)})"
                    )
            if (rel.right is None) == (rel.value is None):
                raise self.fail([*segs, "right"], "give right (a run) or value (a number)")
            if not (math.isfinite(rel.factor) and rel.factor > 0):
                raise self.fail([*segs, "factor"], f"expected a number > 0, got {rel.factor:g}")
        return ComparePlan(path=self.path, scenario=sc, catalog=self.catalog, runs=tuple(runs))


def _instances(fleet: Fleet, catalog: Catalog) -> list[_Inst]:
    out: list[_Inst] = []
    for t in fleet.tiers:
        vendor = catalog.systems[t.system].vendor
        n = t.chips_per_instance + (t.kv_host.chips if t.kv_host else 0)
        out += [
            _Inst(f"{t.name}/{k}", t.name, t.role, t.system, vendor, n) for k in range(t.instances)
        ]
    return out


def _conservation(s: telemetry.Summary) -> float:
    return float(s.arrived - (s.done + s.rejected + s.in_flight))


def _reasons(s: telemetry.Summary) -> float:
    return float(s.rejected - (s.rejected_no_capacity + s.rejected_retry_budget))


def _builtin_invariants() -> tuple[Check, ...]:
    return (
        Check(
            kind="invariant",
            key="(built in)",
            name="conservation",
            metric="arrived - (done + rejected + in_flight)",
            op="==",
            threshold=0.0,
            fn=_conservation,
            description="conservation: arrived == done + rejected + in_flight",
        ),
        Check(
            kind="invariant",
            key="(built in)",
            name="rejections-have-a-reason",
            metric="rejected - (rejected_no_capacity + rejected_retry_budget)",
            op="==",
            threshold=0.0,
            fn=_reasons,
            description="every rejection has a reason: "
            "rejected == rejected_no_capacity + rejected_retry_budget",
        ),
    )


# ------------------------------------------------------------------------------------------------
# observing telemetry and evaluating checks


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(float(x), nd)


def _margin(op: str, value: float, threshold: float) -> float:
    """How far `value` is from satisfying `op threshold` (0 when it holds)."""
    if op in ("<", "<="):
        return max(0.0, value - threshold)
    if op in (">", ">="):
        return max(0.0, threshold - value)
    if op == "==":
        return abs(value - threshold)
    return 0.0 if value != threshold else 1.0


def _holds(op: str, value: float, threshold: float) -> bool:
    return _OPS[op](value, threshold)


def _slack(op: str, value: float, threshold: float) -> float:
    """How far `value` is inside the check (negative when it fails)."""
    if op in ("<", "<="):
        return threshold - value
    if op in (">", ">="):
        return value - threshold
    return -_margin(op, value, threshold)


def _closer(op: str, a: float, b: float, threshold: float) -> bool:
    """Is `a` closer than `b` to satisfying the check?"""
    return _margin(op, a, threshold) < _margin(op, b, threshold)


class _InvariantState:
    def __init__(self, check: Check) -> None:
        self.check = check
        self.checks = 0
        self.violations = 0
        self.first: tuple[float, float] | None = None
        self.worst: tuple[float, float] | None = None

    def see(self, t: float, v: float) -> None:
        c = self.check
        self.checks += 1
        if _holds(c.op, v, c.threshold):
            return
        self.violations += 1
        if self.first is None:
            self.first = (t, v)
        if self.worst is None or _margin(c.op, v, c.threshold) > _margin(
            c.op, self.worst[1], c.threshold
        ):
            self.worst = (t, v)

    @property
    def held(self) -> bool:
        return self.violations == 0

    def result(self) -> dict[str, Any]:
        c = self.check
        out: dict[str, Any] = {"name": c.name, "check": c.label(), "key": c.key}
        out["verdict"] = "held" if self.held else "failed"
        out["checks"] = self.checks
        out["violations"] = self.violations
        if self.first is not None:
            out["first_violation"] = {"sim_time_s": _r(self.first[0]), "value": _r(self.first[1])}
        if self.worst is not None:
            out["worst"] = {
                "sim_time_s": _r(self.worst[0]),
                "value": _r(self.worst[1]),
                "margin": _r(_margin(c.op, self.worst[1], c.threshold)),
            }
        return out


class _ExpectState:
    def __init__(self, check: Check) -> None:
        self.check = check
        self.t_action: float | None = None
        self.checks = 0
        self.held_at: tuple[float, float] | None = None
        self.violation: tuple[float, float] | None = None
        self.best: tuple[float, float] | None = None
        self.worst: tuple[float, float] | None = None
        self.closed = False

    def start(self, t: float) -> None:
        self.t_action = t

    @property
    def t_end(self) -> float | None:
        return None if self.t_action is None else self.t_action + self.check.within_s

    def see(self, t: float, v: float | None) -> None:
        c = self.check
        if self.t_action is None or self.closed or t <= self.t_action + c.from_s + _EPS:
            return
        if t > self.t_action + c.within_s + _EPS:
            self.closed = True
            return
        if v is None:
            return
        self.checks += 1
        ok = _holds(c.op, v, c.threshold)
        if self.best is None or _closer(c.op, v, self.best[1], c.threshold):
            self.best = (t, v)
        if self.worst is None or _slack(c.op, v, c.threshold) < _slack(
            c.op, self.worst[1], c.threshold
        ):
            self.worst = (t, v)
        if c.holds == "eventually":
            if ok and self.held_at is None:
                self.held_at = (t, v)
                self.closed = True
        elif not ok and self.violation is None:
            self.violation = (t, v)
            self.closed = True

    @property
    def verdict(self) -> str:
        c = self.check
        if self.t_action is None:
            return "not-run"
        if c.holds == "eventually":
            return "held" if self.held_at is not None else "failed"
        if self.violation is not None:
            return "failed"
        return "held" if self.checks > 0 else "no-data"

    def result(self) -> dict[str, Any]:
        c = self.check
        out: dict[str, Any] = {**c.spec(), "key": c.key, "check": c.label()}
        out["verdict"] = self.verdict
        out["action_sim_time_s"] = _r(self.t_action)
        out["checks"] = self.checks
        ta = self.t_action or 0.0
        if self.held_at is not None:
            out["held_after_s"] = _r(self.held_at[0] - ta)
            out["value"] = _r(self.held_at[1])
        elif self.violation is not None:
            out["violated_after_s"] = _r(self.violation[0] - ta)
            out["value"] = _r(self.violation[1])
            out["margin"] = _r(_margin(c.op, self.violation[1], c.threshold))
        elif c.holds == "always" and self.worst is not None:
            out["value"] = _r(self.worst[1])  # held throughout: the closest it came to failing
            out["worst_after_s"] = _r(self.worst[0] - ta)
        elif self.best is not None:
            out["value"] = _r(self.best[1])  # never held: the closest it came
            out["closest_after_s"] = _r(self.best[0] - ta)
            out["margin"] = _r(_margin(c.op, self.best[1], c.threshold))
        return out


class Observer:
    """Telemetry in (summaries, tiers, events), check results out.

    Summaries carry their simulated time; a tier message gets the time of the latest summary
    (in-process both are emitted together; from MQTT they come at their own rates)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.now = -math.inf
        self.t: list[float] = []
        self.summaries: list[telemetry.Summary] = []
        self.tier_t: dict[str, list[float]] = {}
        self.tiers: dict[str, list[telemetry.Tier]] = {}
        self.events: list[dict[str, Any]] = []
        self.invariants = [_InvariantState(c) for c in plan.invariants]
        self.expects = [_ExpectState(c) for c in plan.expects]

    # -- input ----------------------------------------------------------------------------------
    def feed(self, msgs: Sequence[telemetry.Message]) -> None:
        for m in msgs:
            if isinstance(m, telemetry.Summary):
                self.now = m.sim_time_s
                self.t.append(m.sim_time_s)
                self.summaries.append(m)
                self._on_sample("summary", "", m.sim_time_s)
            elif isinstance(m, telemetry.Tier):
                if not self.summaries:
                    continue  # no time yet
                t = self._tier_time(m)
                self.tier_t.setdefault(m.tier, []).append(t)
                self.tiers.setdefault(m.tier, []).append(m)
                self._on_sample("tier", m.tier, t)
            elif isinstance(m, telemetry.Event):
                self.events.append(
                    {
                        "sim_time_s": _r(m.sim_time_s),
                        "event": m.event,
                        "severity": m.severity,
                        "target": m.target,
                        "detail": m.detail,
                    }
                )

    def _tier_time(self, m: telemetry.Tier) -> float:
        """A tier message's simulated time: its own `sim_time_s` when the schema has one, else
        that of the summary sent with it (same `ts_ms`: in-process they always go together),
        else the latest summary's plus the wall time since then at the twin's speed."""
        own = getattr(m, "sim_time_s", None)
        s = self.summaries[-1]
        if isinstance(own, int | float) and own >= 0:
            t = float(own)
        elif m.ts_ms == s.ts_ms or s.paused or s.speed <= 0:
            t = s.sim_time_s
        else:
            t = s.sim_time_s + max(0, m.ts_ms - s.ts_ms) / 1000.0 * s.speed
        prev = self.tier_t.get(m.tier)
        return max(t, prev[-1]) if prev else t

    def action_applied(self, name: str, t: float) -> None:
        for e in self.expects:
            if e.check.after == name and e.t_action is None:
                e.start(t)

    # -- values ---------------------------------------------------------------------------------
    def _series(self, c: Check) -> tuple[list[float], Sequence[Any]]:
        if c.scope == "tier":
            return self.tier_t.get(c.scope_name, []), self.tiers.get(c.scope_name, [])
        return self.t, self.summaries

    @staticmethod
    def _extract(c: Check, msg: Any) -> float | None:
        if c.fn is not None:
            return c.fn(msg)
        if c.scope == "link":
            for lk in msg.links:
                if lk.name == c.scope_name:
                    return float(getattr(lk, c.metric))
            return None
        v = float(getattr(msg, c.metric))
        if c.metric in NO_DATA_METRICS and v < 0:
            return None
        return v

    def value_at(self, c: Check, t: float) -> float | None:
        """The check's value at simulated time t: the latest snapshot, or the aggregate over the
        snapshots in (t - window_s, t]. None when there is no data."""
        ts, rows = self._series(c)
        hi = bisect.bisect_right(ts, t + _EPS)
        if hi == 0:
            return None
        if c.window_s <= 0:
            return self._extract(c, rows[hi - 1])
        lo = bisect.bisect_right(ts, t - c.window_s + _EPS)
        vals = [v for v in (self._extract(c, rows[i]) for i in range(lo, hi)) if v is not None]
        if not vals:
            return None
        if c.aggregate == "max":
            return max(vals)
        if c.aggregate == "min":
            return min(vals)
        return math.fsum(vals) / len(vals)

    def _on_sample(self, scope: str, name: str, t: float) -> None:
        def mine(c: Check) -> bool:
            if scope == "tier":
                return c.scope == "tier" and c.scope_name == name
            return c.scope in ("summary", "link")

        for inv in self.invariants:
            if mine(inv.check):
                v = self.value_at(inv.check, t)
                if v is not None:
                    inv.see(t, v)
        for e in self.expects:
            if e.t_action is not None and not e.closed and mine(e.check):
                e.see(t, self.value_at(e.check, t))

    # -- the steady-state hypothesis ----------------------------------------------------------
    def hypothesis(self, checks: Sequence[Check], t: float) -> dict[str, Any]:
        probes = []
        ok = True
        for c in checks:
            v = self.value_at(c, t)
            if v is None:
                verdict = "no-data"
            else:
                verdict = "held" if _holds(c.op, v, c.threshold) else "failed"
            ok = ok and verdict == "held"
            entry: dict[str, Any] = {**c.spec(), "key": c.key, "check": c.label()}
            entry.update(value=_r(v), verdict=verdict)
            if v is not None and verdict == "failed":
                entry["margin"] = _r(_margin(c.op, v, c.threshold))
            probes.append(entry)
        return {"sim_time_s": _r(t), "verdict": "held" if ok else "failed", "probes": probes}

    def close(self) -> None:
        """End of the run: no more samples count for the expectations."""
        for e in self.expects:
            e.closed = True

    # -- final metrics --------------------------------------------------------------------------
    def final(self) -> dict[str, Any]:
        out: dict[str, Any] = {"summary": None, "tiers": {}}
        if self.summaries:
            out["summary"] = _message_dict(self.summaries[-1])
        for name, rows in self.tiers.items():
            out["tiers"][name] = _message_dict(rows[-1])
        return out


def _message_dict(msg: msgspec.Struct) -> dict[str, Any]:
    d = msgspec.to_builtins(msg)
    for k in ("ts_ms", "schema", "kind", "lag_s", "dropped_snapshots", "speed"):
        d.pop(k, None)
    return {k: (_r(v) if isinstance(v, float) else v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------------
# drivers


class Driver(Protocol):
    """What the runner needs from a twin: simulated time, advancing it, and commands."""

    mode: str

    @property
    def now(self) -> float: ...

    async def start(self, obs: Observer) -> None: ...

    async def advance_to(self, t: float, obs: Observer) -> None: ...

    async def command(self, cmd: telemetry.Command, obs: Observer) -> telemetry.Reply: ...

    async def close(self) -> None: ...

    def setup_steps(self) -> list[Step]: ...

    def restore_steps(self) -> list[Step]: ...

    def step_applied(self, entry: dict[str, Any]) -> None:
        """A step (its journal entry) was applied: a live twin may announce it."""

    def info(self) -> dict[str, Any]: ...


def rate_setup_steps(plan: Plan) -> list[Step]:
    """On a live twin (which has its own rate): set the scenario's `rate_per_s`, if it has one."""
    if plan.rate_per_s is None:
        return []
    return [
        Step(
            phase="setup",
            key="rate_per_s",
            name="scenario-rate",
            action="set_rate",
            at_s=None,
            commands=(telemetry.SetRate(rate_per_s=plan.rate_per_s),),
        )
    ]


def rate_restore_steps(plan: Plan, old_rate: float | None) -> list[Step]:
    """On a live twin: put back the rate it had before `rate_setup_steps` (when known)."""
    if plan.rate_per_s is None or old_rate is None or old_rate < 0:
        return []
    return [
        Step(
            phase="restore",
            key="rate_per_s",
            name="restore-rate",
            action="set_rate",
            at_s=None,
            commands=(telemetry.SetRate(rate_per_s=old_rate),),
        )
    ]


def tier_mismatch(plan: Plan, meta: telemetry.Meta) -> str | None:
    """Why a live twin (its meta) is not the scenario's fleet, or None when its tiers match."""
    want = [t.name for t in plan.fleet.tiers]
    got = [t.name for t in meta.tiers]
    if want == got:
        return None
    return (
        f"the twin of fleet {meta.fleet!r} has tiers {', '.join(got)}; "
        f"the scenario's fleet file has {', '.join(want)}"
    )


class InProcessDriver:
    """The fleet in this process: an Engine on a VirtualClock at speed 0 (as fast as possible).
    Summaries and tiers are both emitted at `snapshot_hz` of simulated time, together."""

    mode = "in-process"

    def __init__(self, plan: Plan, *, snapshot_hz: float = 5.0) -> None:
        from twin.build import new_twin
        from twin.engine import Engine, VirtualClock

        twin = new_twin(plan.fleet, plan.catalog, seed=plan.seed, rate_per_s=plan.rate_per_s)
        self.engine = Engine(
            twin,
            speed=0.0,
            clock=VirtualClock(),
            run_id="chaos",
            summary_hz=snapshot_hz,
            tier_hz=snapshot_hz,
            chip_hz=0.1,
            catalog=plan.catalog,
        )
        self.sub = self.engine.subscribe(maxsize=1 << 20)

    @property
    def now(self) -> float:
        return self.engine.sim_time_s

    async def start(self, obs: Observer) -> None:
        return None

    async def advance_to(self, t: float, obs: Observer) -> None:
        while self.engine.sim_time_s < t - _EPS:
            await self.engine.run_for(min(t - self.engine.sim_time_s, 600.0))
            obs.feed(self.sub.drain())

    async def command(self, cmd: telemetry.Command, obs: Observer) -> telemetry.Reply:
        if isinstance(cmd, telemetry.SetSpeed):
            return telemetry.Reply(
                ts_ms=0,
                id=cmd.id,
                ok=True,
                detail="not applied in-process (the run goes as fast as possible); "
                "speed applies to a live twin (--broker)",
                sim_time_s=self.engine.sim_time_s,
            )
        reply = await self.engine.command(cmd)
        obs.feed(self.sub.drain())
        return reply

    async def close(self) -> None:
        self.sub.close()

    def setup_steps(self) -> list[Step]:
        return []  # the scenario's rate and seed went into the twin when it was built

    def restore_steps(self) -> list[Step]:
        return []

    def step_applied(self, entry: dict[str, Any]) -> None:
        return None

    def info(self) -> dict[str, Any]:
        return {}


# ------------------------------------------------------------------------------------------------
# the runner


def _command_dict(cmd: telemetry.Command) -> dict[str, Any]:
    d = msgspec.to_builtins(cmd)
    for k in ("id", "reply_to", "schema", "ts_ms"):
        d.pop(k, None)
    return d


def _reply_dict(reply: telemetry.Reply) -> dict[str, Any]:
    return {
        "ok": reply.ok,
        "error": reply.error,
        "detail": reply.detail,
        "sim_time_s": _r(reply.sim_time_s),
    }


def exit_status(verdict: str) -> int:
    return 0 if verdict == "pass" else 1


def _fmt_num(v: float | None) -> str:
    if v is None:
        return "no data"
    return f"{v:.4g}"


async def _apply(
    step: Step, driver: Driver, obs: Observer, t0: float, failures: list[str]
) -> dict[str, Any]:
    replies = []
    applied_at: float | None = None
    for cmd in step.commands:
        reply = await driver.command(cmd, obs)
        if applied_at is None:
            applied_at = reply.sim_time_s
        replies.append({"command": _command_dict(cmd), "reply": _reply_dict(reply)})
        if not reply.ok:
            failures.append(
                f"{step.key} ({step.name}): the twin refused {_command_dict(cmd)}: {reply.error}"
            )
    t = applied_at if applied_at is not None else driver.now
    if step.phase == "method":
        obs.action_applied(step.name, t)
    entry = {
        "phase": step.phase,
        "key": step.key,
        "name": step.name,
        "action": step.action,
        "at_s": step.at_s,
        "sim_time_s": _r(t),
        "since_method_start_s": _r(t - t0),
        "targets": list(step.targets),
        "ok": all(r["reply"]["ok"] for r in replies),
        "commands": replies,
    }
    driver.step_applied(entry)
    return entry


class ChaosAborted(Exception):
    """The run could not go on (a live twin stopped publishing, paused, or went away)."""


async def run_plan_async(plan: Plan, driver: Driver | None = None) -> dict[str, Any]:
    """Run a scenario on a driver (in-process by default) and return its journal."""
    wall0 = time.perf_counter()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    drv: Driver = driver if driver is not None else InProcessDriver(plan)
    obs = Observer(plan)
    failures: list[str] = []
    actions: list[dict[str, Any]] = []
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    verdict = "fail"
    t0 = 0.0
    method_started = rolled_back = False
    try:
        await drv.start(obs)
        t0 = t_start = drv.now
        for step in drv.setup_steps():
            actions.append(await _apply(step, drv, obs, t_start, failures))
        await drv.advance_to(t_start + plan.warmup_s, obs)
        t0 = drv.now
        if plan.before:
            before = obs.hypothesis(plan.before, t0)
        if before is not None and before["verdict"] != "held":
            verdict = "not-run"
            failures.insert(0, "steady state before the method: " + _probe_failures(before))
        else:
            method_started = True
            for step in plan.steps:
                await drv.advance_to(t0 + (step.at_s or 0.0), obs)
                actions.append(await _apply(step, drv, obs, t0, failures))
            t_end = t0 + plan.duration_s
            for e in obs.expects:  # a live twin may apply an action late: see its window out
                if e.t_end is not None:
                    t_end = max(t_end, e.t_end)
            await drv.advance_to(t_end, obs)
            obs.close()
            if plan.after:
                after = obs.hypothesis(plan.after, drv.now)
                if after["verdict"] != "held":
                    failures.append("steady state after the method: " + _probe_failures(after))
            rolled_back = True
            for step in plan.rollbacks:
                actions.append(await _apply(step, drv, obs, t0, failures))
    except ChaosAborted as e:
        verdict = "aborted"
        failures.insert(0, f"aborted: {e}")
    finally:
        try:
            if method_started and not rolled_back:  # stopped half-way: undo what we can
                for step in plan.rollbacks:
                    actions.append(await _apply(step, drv, obs, t0, failures))
            for step in drv.restore_steps():
                actions.append(await _apply(step, drv, obs, t0, failures))
        except ChaosAborted as e:
            failures.append(f"rollback aborted: {e}")
        finally:
            await drv.close()
    obs.close()
    invariants = [s.result() for s in obs.invariants]
    for inv in invariants:
        if inv["verdict"] != "held":
            w = inv.get("worst", {})
            failures.append(
                f"invariant {inv['name']} ({inv['check']}): {inv['violations']} of "
                f"{inv['checks']} snapshots violate it; worst {w.get('value')} at "
                f"t={w.get('sim_time_s')} s"
            )
    expectations = [e.result() for e in obs.expects] if verdict != "not-run" else []
    for ex in expectations:
        if ex["verdict"] != "held":
            failures.append(
                f"{ex['key']}: within {ex['within_s']:g} s after {ex['after']}, "
                f"{ex['check']}: {ex['verdict']} ({_expect_detail(ex)})"
            )
    if verdict not in ("not-run", "aborted"):
        verdict = "pass" if not failures else "fail"
    sc = plan.scenario
    journal: dict[str, Any] = {
        "journal": JOURNAL_VERSION,
        "kind": "scenario",
        "scenario": {
            "file": str(plan.path),
            "title": sc.title,
            "description": sc.description,
            "fleet": plan.fleet.name,
            "fleet_file": str(plan.fleet_path),
            "warmup_s": plan.warmup_s,
            "duration_s": plan.duration_s,
            "rate_per_s": plan.rate_per_s,
        },
        "seed": plan.seed,
        "mode": drv.mode,
        "verdict": verdict,
        "exit_status": exit_status(verdict),
        "method_start_sim_time_s": _r(t0),
        "steady_state": {"before": before, "after": after},
        "actions": actions,
        "invariants": invariants,
        "expectations": expectations,
        "failures": failures,
        "events": obs.events,
        "final": obs.final(),
    }
    info = drv.info()
    if info:
        journal["twin"] = info
    wall = time.perf_counter() - wall0
    sim = (obs.t[-1] - obs.t[0]) if len(obs.t) > 1 else 0.0
    journal["wall"] = {
        "started_utc": started,
        "wall_time_s": round(wall, 3),
        "simulated_s": round(sim, 3),
        "x_real_time": round(sim / wall, 1) if wall > 0 else None,
    }
    return journal


def _probe_failures(h: dict[str, Any]) -> str:
    bad = [p for p in h["probes"] if p["verdict"] != "held"]
    return "; ".join(f"{p['check']}: {p['verdict']} (value {_fmt_num(p['value'])})" for p in bad)


def _expect_detail(ex: dict[str, Any]) -> str:
    if ex["verdict"] == "not-run":
        return "the action was never applied"
    if "margin" in ex:
        return f"value {_fmt_num(ex.get('value'))}, off by {_fmt_num(ex['margin'])}"
    return "no data in the window"


def run_plan(plan: Plan) -> dict[str, Any]:
    """Run a scenario in-process (as fast as possible) and return its journal."""
    import asyncio

    return asyncio.run(run_plan_async(plan))


# ------------------------------------------------------------------------------------------------
# comparisons


@dataclass
class _Simulated:
    """One simulated run of a comparison: the twin after its warm-up and measured period, and
    the counters at the start of the measured period."""

    twin: Any
    t_from: float
    counters: dict[str, int]
    out0: Any
    pre0: Any
    e0: Any
    wall_s: float


def _simulate(
    spec: RunSpec, catalog: Catalog, seed: int, warmup_s: float, duration_s: float
) -> _Simulated:
    from twin import metrics, simulate
    from twin.build import new_twin

    w0 = time.perf_counter()
    twin = new_twin(spec.fleet, catalog, seed=seed, rate_per_s=spec.rate_per_s, ring_size=1 << 20)
    state = twin.state
    simulate.run(twin, warmup_s)
    sim = _Simulated(
        twin=twin,
        t_from=state.t,
        counters=metrics.counters(state),
        out0=state.inst_output_tokens.copy(),
        pre0=state.inst_prefill_tokens.copy(),
        e0=state.inst_energy_j.copy(),
        wall_s=0.0,
    )
    simulate.run(twin, duration_s)
    sim.wall_s = time.perf_counter() - w0
    return sim


def _measure(spec: RunSpec, sim: _Simulated) -> dict[str, Any]:
    """Figures over the measured period, with the run's SLOs (goodput depends on them)."""
    import dataclasses

    from twin import metrics

    twin = sim.twin
    state, layout = twin.state, twin.layout
    p = dataclasses.replace(twin.params, slo_ttft_s=spec.slo_ttft_s, slo_tpot_s=spec.slo_tpot_s)
    t_from = sim.t_from
    dt = state.t - t_from
    c0, c1 = sim.counters, metrics.counters(state)
    out = state.inst_output_tokens - sim.out0
    pre = state.inst_prefill_tokens - sim.pre0
    energy = state.inst_energy_j - sim.e0
    lat = metrics.latency(state, p, since_s=t_from)
    finished = lat["finished"]
    gp = lat["goodput_fraction"]
    e_total = float(energy.sum())

    def num(x: float) -> float | None:
        return _r(x) if math.isfinite(x) else None

    m: dict[str, Any] = {
        k: c1[k] - c0[k]
        for k in (
            "arrived",
            "done",
            "rejected",
            "rejected_no_capacity",
            "rejected_retry_budget",
            "retries",
        )
    }
    m["in_flight"] = c1["in_flight"]
    m["arrivals_per_s"] = num(m["arrived"] / dt)
    m["tokens_per_s"] = num(float(out.sum()) / dt)
    m["prefill_tokens_per_s"] = num(float(pre.sum()) / dt)
    for k in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s"):
        m[k] = num(lat[k])
    m["goodput_fraction"] = num(gp)
    m["goodput_per_s"] = num(gp * finished / dt) if math.isfinite(gp) else 0.0
    m["power_w"] = num(e_total / dt)
    m["tokens_per_joule"] = num(float(out.sum()) / e_total) if e_total > 0 else 0.0
    m["chips"] = int(p.n_chips)
    tiers: dict[str, Any] = {}
    out_t = metrics.tier_sum(p, out)
    pre_t = metrics.tier_sum(p, pre)
    e_t = metrics.tier_sum(p, energy)
    for i, name in enumerate(layout.tier_names):
        role = layout.tier_roles[i]
        lt = metrics.latency(state, p, since_s=t_from, tier=i)
        work = pre_t[i] if role == "prefill" else out_t[i]
        tiers[name] = {
            "role": role,
            "system": layout.tier_system[i],
            "instances": layout.tier_instances[i],
            "tokens_per_s": num(out_t[i] / dt),
            "prefill_tokens_per_s": num(pre_t[i] / dt),
            "power_w": num(e_t[i] / dt),
            "tokens_per_joule": num(work / e_t[i]) if e_t[i] > 0 else 0.0,
            **{k: num(lt[k]) for k in ("ttft_p99_s", "tpot_p50_s", "tpot_p99_s")},
            "goodput_fraction": num(lt["goodput_fraction"]),
        }
    conserved = c1["arrived"] == c1["done"] + c1["rejected"] + c1["in_flight"]
    return {
        "fleet": spec.fleet.name,
        "fleet_file": str(spec.fleet_path),
        "rate_per_s": spec.rate_per_s,
        "slo_ttft_s": spec.slo_ttft_s,
        "slo_tpot_s": spec.slo_tpot_s,
        "policy": spec.policy,
        "measured_from_s": _r(t_from),
        "measured_s": _r(dt),
        "conservation": "held" if conserved else "failed",
        "metrics": m,
        "tiers": tiers,
    }


def _sim_key(spec: RunSpec) -> tuple[Any, ...]:
    """Runs that differ only in their SLOs share one simulation (the SLOs only change how
    goodput is counted), unless the routing policy reads the SLOs (power_aware)."""
    slo = (spec.slo_ttft_s, spec.slo_tpot_s) if spec.policy == "power_aware" else ()
    return (str(spec.fleet_path.resolve()), spec.rate_per_s, spec.policy, *slo)


def run_compare(plan: ComparePlan) -> dict[str, Any]:
    """Run every fleet of a comparison in-process and check its relations."""
    wall0 = time.perf_counter()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    sc = plan.scenario
    results: dict[str, Any] = {}
    walls: dict[str, float] = {}
    sims: dict[tuple[Any, ...], _Simulated] = {}
    for spec in plan.runs:
        sk = _sim_key(spec)
        fresh = sk not in sims
        if fresh:
            sims[sk] = _simulate(spec, plan.catalog, sc.seed, sc.warmup_s, sc.duration_s)
        results[spec.name] = _measure(spec, sims[sk])
        results[spec.name]["shares_simulation"] = not fresh
        walls[spec.name] = round(sims[sk].wall_s, 3) if fresh else 0.0
    failures: list[str] = []
    relations = []
    for i, rel in enumerate(sc.compare):
        key = f"compare[{i}]"
        left = results[rel.left]["metrics"][rel.metric]
        if rel.right is not None:
            right = results[rel.right]["metrics"][rel.metric]
            threshold = None if right is None else rel.factor * right
            shown = f"{rel.factor:g} x {rel.right}" if rel.factor != 1 else rel.right
        else:
            right = None
            threshold = rel.value
            shown = f"{rel.value:g}"
        check = (
            f"{rel.left}.{rel.metric} {rel.op} {shown}.{rel.metric}"
            if rel.right
            else (f"{rel.left}.{rel.metric} {rel.op} {shown}")
        )
        if left is None or threshold is None:
            verdict = "no-data"
        else:
            verdict = "held" if _holds(rel.op, left, threshold) else "failed"
        entry: dict[str, Any] = {
            "key": key,
            "name": rel.name or key,
            "check": check,
            "left": left,
            "right": right,
            "threshold": _r(threshold),
            "verdict": verdict,
        }
        if left is not None and right not in (None, 0) and rel.right is not None:
            entry["ratio"] = _r(left / right)
        if verdict != "held":
            if left is not None and threshold is not None:
                entry["margin"] = _r(_margin(rel.op, left, threshold))
            failures.append(
                f"{key} {rel.name or ''}: {check}: {verdict} "
                f"({_fmt_num(left)} vs {_fmt_num(threshold)})".replace("  ", " ")
            )
        relations.append(entry)
    for name, res in results.items():
        if res["conservation"] != "held":
            failures.append(f"run {name}: conservation violated")
    verdict = "pass" if not failures else "fail"
    wall = time.perf_counter() - wall0
    return {
        "journal": JOURNAL_VERSION,
        "kind": "compare",
        "scenario": {
            "file": str(plan.path),
            "title": sc.title,
            "description": sc.description,
            "warmup_s": sc.warmup_s,
            "duration_s": sc.duration_s,
            "rate_per_s": sc.rate_per_s,
        },
        "seed": sc.seed,
        "mode": "in-process",
        "verdict": verdict,
        "exit_status": exit_status(verdict),
        "runs": results,
        "relations": relations,
        "failures": failures,
        "wall": {"started_utc": started, "wall_time_s": round(wall, 3), "runs_wall_s": walls},
    }
