"""Fleet files (`fleets/<name>.toml`): load, validate, resolve names, read traces.

The schema is docs/catalog-schema.md. Every mistake in a fleet file becomes one `ConfigError`
whose message is a single line: `<file>: <key.path>: <what was expected>`, e.g.
`fleets/x.toml: tiers[2].chips_per_instance: llama-3.1-70b at fp8 needs 75.1 GB ...`.

tomllib + msgspec only: no numpy, asyncio, Textual or aiomqtt here.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, get_origin

import msgspec

from twin.catalog import (
    Catalog,
    ConfigError,
    Model,
    Precision,
    Role,
    System,
    fits,
    fleets_dir,
    load_catalog,
    read_toml,
)

Policy = Literal["round_robin", "least_loaded", "latency_aware", "power_aware", "weighted"]
Arrivals = Literal["poisson", "bursty", "trace"]
Dist = Literal["fixed", "uniform", "lognormal"]

POLICIES: tuple[str, ...] = get_args(Policy)

# Files in fleets/ that are the catalog, not fleets.
_CATALOG_STEMS = frozenset({"hardware", "models"})
# Names end up in MQTT topics (`fleet-twin/v1/<fleet>/tier/<tier>`): no `/`, `+`, `#` or spaces.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
# The largest instance `load_fleet` searches for when it says how many chips a model needs.
_MAX_CHIPS = 1 << 17
# Upper bounds: past these a fleet could not be built or stepped on any machine.
MAX_INSTANCES = 100_000  # per tier
MAX_RATE_PER_S = 1e6
MAX_TOKENS = 1 << 20  # any token length


class Slo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    ttft_s: float
    tpot_s: float


class Router(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    policy: Policy = "least_loaded"
    weights: dict[str, float] = {}  # tier name -> share (used by `weighted`)


class LengthDist(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Token lengths: `fixed` (value), `uniform` (low, high) or `lognormal` (median, sigma,
    optional min and max clip)."""

    dist: Dist
    value: int | None = None
    low: int | None = None
    high: int | None = None
    median: float | None = None
    sigma: float | None = None
    min: int | None = None
    max: int | None = None


class Workload(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str
    arrivals: Arrivals = "poisson"
    rate_per_s: float
    burst_factor: float = 3.0
    burst_on_s: float = 5.0
    burst_off_s: float = 20.0
    # CSV trace. In the file: relative to the fleet file. After `load_fleet`: an absolute path
    # (or "" when there is none).
    trace: str = ""
    prompt: LengthDist
    output: LengthDist


class KvHost(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Decode tiers only: attention and the KV cache live on these chips (e.g. Rubin GPUs next
    to Groq 3 LPUs, which run the feed-forward part)."""

    system: str
    chips: int


class Tier(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    role: Role
    system: str
    chips_per_instance: int
    instances: int
    model: str
    precision: Precision
    # Tokens per decode iteration. None: the catalog's speculative[model], else 1.
    spec_decode: float | None = None
    kv_host: KvHost | None = None


class Link(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    from_: str = msgspec.field(name="from")  # a prefill tier
    to: str  # a decode tier
    bandwidth_gbps: float  # GB/s shared by every KV transfer on the link
    latency_us: float
    source: str


class Fleet(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    description: str = ""
    seed: int = 0
    max_retries: int = 3
    slo: Slo
    router: Router = Router()
    workload: Workload
    tiers: list[Tier]
    links: list[Link] = []

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    def tiers_with_role(self, role: str) -> list[Tier]:
        return [t for t in self.tiers if t.role == role]


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def shipped_fleets() -> list[str]:
    """Names of the fleet files shipped in `fleets_dir()`, sorted."""
    d = fleets_dir()
    return sorted(p.stem for p in d.glob("*.toml") if p.stem not in _CATALOG_STEMS)


def resolve_fleet_path(name_or_path: str) -> Path:
    """A path to a .toml file, or the bare name of a shipped fleet such as `all-vendors`."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    looks_like_path = p.suffix == ".toml" or "/" in name_or_path or "\\" in name_or_path
    if looks_like_path:
        raise ConfigError(f"{name_or_path}: no such fleet file")
    shipped = shipped_fleets()
    if name_or_path in shipped:
        return fleets_dir() / f"{name_or_path}.toml"
    raise ConfigError(
        f"{name_or_path}: unknown fleet (expected a path to a .toml file or one of: "
        f"{', '.join(shipped) or 'none shipped'})"
    )


def load_fleet(path: str | Path, catalog: Catalog | None = None) -> Fleet:
    """Read and validate a fleet file against the catalog (the shipped one by default).

    The returned `Fleet` has `workload.trace` made absolute (resolved against the fleet file).
    """
    path = Path(path)
    where = str(path)
    raw = read_toml(path)  # a missing file, bad UTF-8 or a TOML syntax error: ConfigError
    try:
        fleet = msgspec.convert(raw, Fleet)
    except msgspec.ValidationError as e:
        key, what = _translate_validation_error(str(e), raw)
        raise ConfigError(f"{where}: {key}: {what}") from None
    if catalog is None:
        catalog = load_catalog()
    _Checker(fleet, path, catalog).run()
    if fleet.workload.trace:
        trace = str((path.parent / fleet.workload.trace).resolve())
        fleet = msgspec.structs.replace(
            fleet, workload=msgspec.structs.replace(fleet.workload, trace=trace)
        )
    return fleet


_TRACE_COLUMNS: dict[str, tuple[str, ...]] = {
    # canonical name: accepted header names (case-insensitive)
    "timestamp_s": ("timestamp_s", "timestamp_ms", "timestamp", "arrival_time"),
    "input_tokens": ("input_tokens", "input_length", "contexttokens", "prompt_tokens"),
    "output_tokens": ("output_tokens", "output_length", "generatedtokens", "completion_tokens"),
}


def load_trace(path: str | Path) -> tuple[list[float], list[int], list[int]]:
    """Read a request trace: CSV with a header row; returns (timestamp_s, input_tokens,
    output_tokens), times in seconds from the first row.

    Columns are found by header name (case-insensitive; other columns are ignored):
    - time: `timestamp_s` (seconds), `timestamp_ms` or `timestamp` (milliseconds, the Mooncake
      trace), or Azure's `TIMESTAMP` as a date-time string (`2023-11-16 18:15:46.68`);
    - prompt: `input_tokens`, `input_length` (Mooncake) or `ContextTokens` (Azure);
    - output: `output_tokens`, `output_length` (Mooncake) or `GeneratedTokens` (Azure).
    Rows must be in time order. A bad row raises ConfigError naming the file and line.
    """
    path = Path(path)
    where = str(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return _read_trace(where, csv.reader(f))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such trace file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{where}: cannot read the trace: {_one_line(str(e))}") from None


# --------------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------------

_CsvReader = Any  # the type of csv.reader(...) (`_csv.reader`), which has .line_num


def _read_trace(where: str, rows: _CsvReader) -> tuple[list[float], list[int], list[int]]:
    header: list[str] | None = None
    line = 0
    for row in rows:
        line = rows.line_num
        if any(c.strip() for c in row):
            header = [c.strip().lower() for c in row]
            break
    if header is None:
        raise ConfigError(f"{where}: empty trace (expected a header row and one row per request)")
    cols: dict[str, int] = {}
    for canon, names in _TRACE_COLUMNS.items():
        for name in names:
            if name in header:
                cols[canon] = header.index(name)
                break
        else:
            raise ConfigError(
                f"{where}:{line}: header has no {canon} column (expected a header naming "
                f"timestamp_s,input_tokens,output_tokens; got {','.join(header)})"
            )
    t_col = header[cols["timestamp_s"]]
    scale = 1e-3 if t_col in ("timestamp_ms", "timestamp") else 1.0
    need = max(cols.values()) + 1
    ts: list[float] = []
    ins: list[int] = []
    outs: list[int] = []
    t0: float | None = None
    prev = -math.inf
    for row in rows:
        line = rows.line_num
        if not any(c.strip() for c in row):
            continue
        if len(row) < need:
            raise ConfigError(f"{where}:{line}: expected {need} fields, got {len(row)}")
        raw_t = row[cols["timestamp_s"]].strip()
        t = _parse_time(raw_t, scale)
        if t is None:
            raise ConfigError(
                f"{where}:{line}: timestamp: expected a finite number of seconds or a date-time, "
                f"got {raw_t!r}"
            )
        if t < prev:
            raise ConfigError(f"{where}:{line}: timestamp: rows must be in time order")
        prev = t
        if t0 is None:
            t0 = t
        n_in = _parse_count(row[cols["input_tokens"]])
        if n_in is None:
            raise ConfigError(
                f"{where}:{line}: input_tokens: expected a whole number >= 1, "
                f"got {row[cols['input_tokens']].strip()!r}"
            )
        n_out = _parse_count(row[cols["output_tokens"]])
        if n_out is None:
            raise ConfigError(
                f"{where}:{line}: output_tokens: expected a whole number >= 1, "
                f"got {row[cols['output_tokens']].strip()!r}"
            )
        ts.append(t - t0)
        ins.append(n_in)
        outs.append(n_out)
    if not ts:
        raise ConfigError(f"{where}: trace has a header but no rows")
    return ts, ins, outs


def _parse_time(s: str, scale: float) -> float | None:
    try:
        v = float(s) * scale
    except ValueError:
        try:
            d = datetime.fromisoformat(s)
        except ValueError:
            return None
        v = (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()
    return v if math.isfinite(v) else None


def _parse_count(s: str) -> int | None:
    s = s.strip()
    try:
        v = int(s)
    except ValueError:
        try:
            f = float(s)
        except ValueError:
            return None
        if not math.isfinite(f) or f != int(f):
            return None
        v = int(f)
    return v if v >= 1 else None


# --------------------------------------------------------------------------------------------
# msgspec error translation
# --------------------------------------------------------------------------------------------

_AT_RE = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
_TYPE_WORDS = {
    "float": "a number",
    "int": "an integer",
    "str": "a string",
    "bool": "a boolean",
    "object": "a table",
    "array": "an array",
    "null": "nothing",
    "datetime": "a date-time",
    "date": "a date",
    "time": "a time",
}


def _translate_validation_error(msg: str, raw: dict[str, Any]) -> tuple[str, str]:
    """msgspec's `Expected `int`, got `str` - at `$.tiers[0].instances`` ->
    (`tiers[0].instances`, `expected an integer, got a string 'two'`)."""
    msg = _one_line(msg)
    m = _AT_RE.match(msg)
    what = m.group("what") if m else msg
    path = (m.group("path") or "") if m else ""
    path = path.removeprefix(".")
    if path.endswith("[...]"):
        path = _name_dict_key(path[: -len("[...]")], raw)
    top = path or "(top level)"
    if um := re.match(r"Object contains unknown field `(.+)`", what):
        key = _key(um.group(1))
        allowed = _fields_at(path)
        hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        return (f"{path}.{key}" if path else key), f"unknown key{hint}"
    if mm := re.match(r"Object missing required field `(.+)`", what):
        key = _key(mm.group(1))
        return (f"{path}.{key}" if path else key), "missing required key"
    value = _raw_at(path, raw)
    if re.match(r"Invalid enum value", what):
        choices = _choices_at(path)
        hint = f" (expected one of: {', '.join(choices)})" if choices else ""
        return top, f"invalid value {value!r}{hint}"
    if tm := re.match(r"Expected `(.+?)`, got `(.+?)`$", what):
        exp = " or ".join(_TYPE_WORDS.get(x.strip(), x.strip()) for x in tm.group(1).split("|"))
        got = _TYPE_WORDS.get(tm.group(2), tm.group(2))
        shown = f" {value!r}" if isinstance(value, str | int | float) else ""
        return top, f"expected {exp}, got {got}{shown}"
    return top, what[:1].lower() + what[1:]


def _key(name: str) -> str:
    """A key as TOML writes it in a dotted path: bare if it can be, else quoted."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else '"' + name.replace('"', '\\"') + '"'


def _raw_at(path: str, raw: dict[str, Any]) -> Any:
    node: Any = raw
    for p in _split_path(path):
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for tok in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        parts.append(int(tok[1:-1]) if tok.startswith("[") else tok)
    return parts


def _name_dict_key(path: str, raw: dict[str, Any]) -> str:
    """`router.weights[...]` -> `router.weights.<the key whose value is not a number>`."""
    node = _raw_at(path, raw)
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                return f"{path}.{_key(str(k))}"
    return path


def _type_at(path: str) -> Any:
    """The Struct (or other) type that the key path points at, walking Fleet's annotations."""
    tp: Any = Fleet
    for p in _split_path(path):
        tp = _unwrap(tp)
        if isinstance(p, int):
            if get_origin(tp) is list:
                tp = get_args(tp)[0]
                continue
            return None
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            by_name = {f.encode_name: f.type for f in msgspec.structs.fields(tp)}
            if p not in by_name:
                return None
            tp = by_name[p]
            continue
        return None
    return _unwrap(tp)


def _unwrap(tp: Any) -> Any:
    """Drop `| None` from an annotation."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) is not Literal and len(args) == 1 and type(None) in get_args(tp):
        return args[0]
    return tp


def _fields_at(path: str) -> list[str]:
    tp = _type_at(path)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return [f.encode_name for f in msgspec.structs.fields(tp)]
    return []


def _choices_at(path: str) -> list[str]:
    tp = _type_at(path)
    if get_origin(tp) is Literal:
        return [str(a) for a in get_args(tp)]
    return []


def _one_line(s: str) -> str:
    return " ".join(s.split())


# --------------------------------------------------------------------------------------------
# Semantic checks
# --------------------------------------------------------------------------------------------


class _Checker:
    def __init__(self, fleet: Fleet, path: Path, catalog: Catalog) -> None:
        self.f = fleet
        self.path = path
        self.cat = catalog

    def fail(self, key: str, what: str) -> NoReturn:
        raise ConfigError(f"{self.path}: {key}: {_one_line(what)}")

    def run(self) -> None:
        self.top()
        self.slo_router_workload()
        self.tiers()
        self.links()
        self.router_weights()
        self.trace()

    # -- helpers ---------------------------------------------------------------------------

    def positive(
        self, key: str, v: float, what: str = "a positive number", *, most: float = math.inf
    ) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            self.fail(key, f"expected {what}, got {v}")
        if not v > 0:
            self.fail(key, f"expected {what}, got {v}")
        if v > most:
            self.fail(key, f"expected {what} of at most {most:g}, got {v}")

    def non_negative(self, key: str, v: float) -> None:
        if (isinstance(v, float) and not math.isfinite(v)) or v < 0:
            self.fail(key, f"expected a number >= 0, got {v}")

    def name_ok(self, key: str, name: str) -> None:
        if not _NAME_RE.match(name):
            self.fail(
                key,
                f"expected a name of letters, digits, '-', '_' or '.' (it is used in MQTT "
                f"topics), got {name!r}",
            )

    # -- sections --------------------------------------------------------------------------

    def top(self) -> None:
        f = self.f
        if f.name != self.path.stem:
            self.fail("name", f"expected {self.path.stem!r} (the file stem), got {f.name!r}")
        self.name_ok("name", f.name)
        self.non_negative("seed", f.seed)
        self.non_negative("max_retries", f.max_retries)

    def slo_router_workload(self) -> None:
        f = self.f
        self.positive("slo.ttft_s", f.slo.ttft_s, "a positive number of seconds")
        self.positive("slo.tpot_s", f.slo.tpot_s, "a positive number of seconds")
        w = f.workload
        if w.model not in self.cat.models:
            self.fail("workload.model", f"unknown model {w.model!r} {_one_of(self.cat.models)}")
        self.positive(
            "workload.rate_per_s",
            w.rate_per_s,
            "a positive rate in requests/s",
            most=MAX_RATE_PER_S,
        )
        if w.arrivals == "bursty":
            if not (math.isfinite(w.burst_factor) and w.burst_factor >= 1):
                self.fail("workload.burst_factor", f"expected a number >= 1, got {w.burst_factor}")
            self.positive("workload.burst_on_s", w.burst_on_s, "a positive number of seconds")
            self.positive("workload.burst_off_s", w.burst_off_s, "a positive number of seconds")
        self.length_dist("workload.prompt", w.prompt)
        self.length_dist("workload.output", w.output)

    def length_dist(self, key: str, d: LengthDist) -> None:
        needs = {
            "fixed": ("value",),
            "uniform": ("low", "high"),
            "lognormal": ("median", "sigma"),
        }[d.dist]
        allowed = set(needs) | ({"min", "max"} if d.dist == "lognormal" else set())
        for name in ("value", "low", "high", "median", "sigma", "min", "max"):
            v = getattr(d, name)
            if name in needs and v is None:
                self.fail(f"{key}.{name}", f"missing required key for dist = {d.dist!r}")
            if name not in allowed and v is not None:
                self.fail(
                    f"{key}.{name}",
                    f"not used by dist = {d.dist!r} "
                    f"(expected only: dist, {', '.join(sorted(allowed))})",
                )
            if v is not None and name == "sigma":
                self.non_negative(f"{key}.{name}", v)
            elif v is not None:
                self.positive(f"{key}.{name}", v, most=MAX_TOKENS)
        if d.dist == "uniform" and d.low is not None and d.high is not None and d.low > d.high:
            self.fail(f"{key}.high", f"expected high >= low ({d.low}), got {d.high}")
        if d.dist == "lognormal" and d.min is not None and d.max is not None and d.min > d.max:
            self.fail(f"{key}.max", f"expected max >= min ({d.min}), got {d.max}")

    def tiers(self) -> None:
        f = self.f
        if not f.tiers:
            self.fail("tiers", "expected at least one [[tiers]] table")
        seen: dict[str, int] = {}
        for i, t in enumerate(f.tiers):
            k = f"tiers[{i}]"
            self.name_ok(f"{k}.name", t.name)
            if t.name in seen:
                self.fail(
                    f"{k}.name", f"duplicate tier name {t.name!r} (also tiers[{seen[t.name]}])"
                )
            seen[t.name] = i
            system = self.cat.systems.get(t.system)
            if system is None:
                self.fail(f"{k}.system", f"unknown system {t.system!r} {_one_of(self.cat.systems)}")
            model = self.cat.models.get(t.model)
            if model is None:
                self.fail(f"{k}.model", f"unknown model {t.model!r} {_one_of(self.cat.models)}")
            if t.model != f.workload.model:
                self.fail(
                    f"{k}.model",
                    f"expected the workload's model {f.workload.model!r}, got {t.model!r}",
                )
            if t.role not in system.roles:
                self.fail(
                    f"{k}.role",
                    f"system {t.system!r} cannot take role {t.role!r} "
                    f"(it supports: {', '.join(system.roles)})",
                )
            self.positive(
                f"{k}.chips_per_instance",
                t.chips_per_instance,
                "a positive chip count",
                most=_MAX_CHIPS,
            )
            self.positive(
                f"{k}.instances", t.instances, "a positive instance count", most=MAX_INSTANCES
            )
            if t.spec_decode is not None and not (
                math.isfinite(t.spec_decode) and t.spec_decode >= 1
            ):
                self.fail(
                    f"{k}.spec_decode",
                    f"expected tokens per decode iteration >= 1, got {t.spec_decode}",
                )
            if t.kv_host is not None:
                if t.role != "decode":
                    self.fail(
                        f"{k}.kv_host", f"only decode tiers take a kv_host; role is {t.role!r}"
                    )
                if t.kv_host.system not in self.cat.systems:
                    self.fail(
                        f"{k}.kv_host.system",
                        f"unknown system {t.kv_host.system!r} {_one_of(self.cat.systems)}",
                    )
                self.positive(f"{k}.kv_host.chips", t.kv_host.chips, "a positive chip count")
            ok, needed, usable = fits(system, model, t.precision, t.chips_per_instance)
            if not ok:
                least = _least_chips(system, model, t.precision, t.chips_per_instance)
                more = f"at least {least}" if least else f"more than {_MAX_CHIPS}"
                self.fail(
                    f"{k}.chips_per_instance",
                    f"{t.model} at {t.precision} needs {needed / 1e9:.1f} GB but "
                    f"{t.chips_per_instance} x {t.system} give {usable / 1e9:.1f} GB usable "
                    f"(expected {more} chips per instance)",
                )
        if not any(t.role in ("prefill", "unified") for t in f.tiers):
            self.fail("tiers", "expected at least one tier with role 'prefill' or 'unified'")

    def links(self) -> None:
        f = self.f
        by_name = {t.name: t for t in f.tiers}
        pairs: dict[tuple[str, str], int] = {}
        for i, ln in enumerate(f.links):
            k = f"links[{i}]"
            src = by_name.get(ln.from_)
            if src is None:
                self.fail(f"{k}.from", f"unknown tier {ln.from_!r} {_one_of(by_name)}")
            elif src.role != "prefill":
                self.fail(
                    f"{k}.from", f"expected a prefill tier, {ln.from_!r} has role {src.role!r}"
                )
            dst = by_name.get(ln.to)
            if dst is None:
                self.fail(f"{k}.to", f"unknown tier {ln.to!r} {_one_of(by_name)}")
            elif dst.role != "decode":
                self.fail(f"{k}.to", f"expected a decode tier, {ln.to!r} has role {dst.role!r}")
            if (ln.from_, ln.to) in pairs:
                self.fail(
                    k,
                    f"duplicate link {ln.from_!r} -> {ln.to!r} "
                    f"(also links[{pairs[ln.from_, ln.to]}])",
                )
            pairs[ln.from_, ln.to] = i
            self.positive(f"{k}.bandwidth_gbps", ln.bandwidth_gbps, "a positive bandwidth in GB/s")
            self.non_negative(f"{k}.latency_us", ln.latency_us)
            if not ln.source.strip():
                self.fail(f"{k}.source", "expected a URL or 'estimate: ...'")
        linked_from = {a for a, _ in pairs}
        linked_to = {b for _, b in pairs}
        for i, t in enumerate(f.tiers):
            if t.role == "prefill" and t.name not in linked_from:
                self.fail(
                    f"tiers[{i}]",
                    f"prefill tier {t.name!r} has no link to a decode tier "
                    f"(expected a [[links]] entry with from = {t.name!r})",
                )
            if t.role == "decode" and t.name not in linked_to:
                self.fail(
                    f"tiers[{i}]",
                    f"decode tier {t.name!r} is not linked from any prefill tier "
                    f"(expected a [[links]] entry with to = {t.name!r})",
                )

    def router_weights(self) -> None:
        names = [t.name for t in self.f.tiers]
        for tier_name, share in self.f.router.weights.items():
            k = f"router.weights.{_key(tier_name)}"
            if tier_name not in names:
                self.fail(k, f"unknown tier {tier_name!r} {_one_of(names)}")
            self.non_negative(k, share)

    def trace(self) -> None:
        w = self.f.workload
        if w.arrivals == "trace" and not w.trace:
            self.fail("workload.trace", "expected a trace file (CSV) when arrivals = 'trace'")
        if w.trace:
            try:
                load_trace(self.path.parent / w.trace)
            except ConfigError as e:
                self.fail("workload.trace", str(e))


def _one_of(names: Iterable[str]) -> str:
    return f"(expected one of: {', '.join(sorted(names))})"


def _least_chips(system: System, model: Model, precision: Precision, start: int) -> int | None:
    """The smallest chip count > start that fits the model (fits is monotone in chips), or None
    beyond _MAX_CHIPS."""

    def ok(n: int) -> bool:
        return fits(system, model, precision, n)[0]

    lo, hi = max(start, 0), max(start, 1)
    while not ok(hi):
        lo = hi
        hi *= 2
        if hi > _MAX_CHIPS:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


__all__ = [
    "POLICIES",
    "Fleet",
    "KvHost",
    "LengthDist",
    "Link",
    "Router",
    "Slo",
    "Tier",
    "Workload",
    "load_fleet",
    "load_trace",
    "resolve_fleet_path",
    "shipped_fleets",
]
