"""The hardware and model catalog: `fleets/hardware.toml` and `fleets/models.toml`.

The schema is docs/catalog-schema.md. Every hardware number is a `Figure` that carries its
provenance (a published URL, or a derived, estimated or fitted value), so the twin can show
where each number comes from. Loading checks the files strictly; any mistake raises a
`ConfigError` with a one-line message "<file>: <key.path>: <what was wrong>", the key path
written as in TOML (e.g. `systems.h100-sxm.mfu.value`, `models."llama-3.1-8b".layers`).
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import re
import tomllib
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec

__all__ = [
    "BYTES_PER_ELEMENT",
    "PRECISIONS",
    "ROLES",
    "USABLE_MEMORY_FRACTION",
    "Catalog",
    "ConfigError",
    "Figure",
    "MemoryTier",
    "Model",
    "Precision",
    "Provenance",
    "Role",
    "System",
    "fits",
    "fleets_dir",
    "load_catalog",
    "provenance_of",
]

Precision = Literal["bf16", "fp8"]
PRECISIONS: tuple[Precision, ...] = ("bf16", "fp8")

Role = Literal["prefill", "decode", "unified"]
ROLES: tuple[Role, ...] = ("prefill", "decode", "unified")

WeightsTier = Literal["sram", "hbm"]
Provenance = Literal["published", "derived", "estimate", "fitted"]

#: Bytes per parameter and per KV-cache element.
BYTES_PER_ELEMENT: dict[Precision, int] = {"bf16": 2, "fp8": 1}

#: Share of a chip's weights tier that can hold model weights and KV cache. The runtime,
#: activations, communication buffers and allocator fragmentation take the rest.
USABLE_MEMORY_FRACTION = 0.9

HARDWARE_FILE = "hardware.toml"
MODELS_FILE = "models.toml"

_URL = re.compile(r"https?://\S+")
_T = TypeVar("_T")
_PROVENANCE_HELP = (
    'expected one or more http(s):// URLs separated by " ; ", '
    'or "derived: ...", "estimate: ..." or "fitted: ..."'
)


class ConfigError(Exception):
    """A catalog or fleet file is wrong. The message is one line, meant for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))

    @classmethod
    def at(cls, file: Path | str, path: Sequence[str | int], what: str) -> ConfigError:
        """An error at a key path (TOML terms) of a file."""
        where = key_path(path)
        return cls(f"{file}: {where}: {what}" if where else f"{file}: {what}")


def key_path(segments: Sequence[str | int]) -> str:
    """A key path as TOML writes it: bare keys joined by dots, other keys quoted, [i] indices."""
    out = ""
    for seg in segments:
        if isinstance(seg, int):
            out += f"[{seg}]"
            continue
        part = seg if re.fullmatch(r"[A-Za-z0-9_-]+", seg) else '"' + seg.replace('"', '\\"') + '"'
        out = f"{out}.{part}" if out else part
    return out


def provenance_of(source: str) -> Provenance | None:
    """The provenance a source string declares, or None if it is not a valid source."""
    text = source.strip()
    for prefix in ("derived", "estimate", "fitted"):
        if text.startswith(prefix + ":") and text[len(prefix) + 1 :].strip():
            return prefix
    parts = [p.strip() for p in text.split(" ; ")]
    if parts and all(_URL.fullmatch(p) for p in parts):
        return "published"
    return None


# ----------------------------------------------------------------------------- structs


class Figure(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A number with its provenance: a URL, or "derived:", "estimate:" or "fitted:" text."""

    value: float
    source: str

    @property
    def provenance(self) -> Provenance:
        found = provenance_of(self.source)
        if found is None:
            raise ConfigError(f"figure source {self.source!r}: {_PROVENANCE_HELP}")
        return found

    @property
    def is_estimate(self) -> bool:
        return self.provenance == "estimate"


class MemoryTier(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One memory tier of a chip: capacity in GB (1e9 bytes), bandwidth in TB/s (1e12 B/s)."""

    capacity_gb: Figure
    bandwidth_tbps: Figure


class System(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One accelerator system of the catalog. Figures are per chip unless named otherwise."""

    vendor: str
    name: str
    status: str = ""
    roles: tuple[Role, ...]
    chips_per_system: int
    system: str = ""
    mem_type: str = ""
    weights_in: WeightsTier
    interconnect: str = ""
    notes: str = ""

    bf16_tflops: Figure
    fp8_tflops: Figure
    fp4_tflops: Figure | None = None
    sram: MemoryTier | None = None
    hbm: MemoryTier | None = None
    dram: MemoryTier | None = None
    interconnect_gbps: Figure
    idle_w: Figure
    peak_w: Figure

    mfu: Figure
    mbu: Figure
    t_layer_us: Figure
    t_hop_us: Figure
    prefill_chunk_tokens: Figure
    speculative: dict[str, Figure] = {}

    def peak_flops(self, precision: Precision) -> float:
        """Dense peak FLOP/s per chip at a precision."""
        figure = self.bf16_tflops if precision == "bf16" else self.fp8_tflops
        return figure.value * 1e12

    def weights_tier(self) -> MemoryTier:
        """The memory tier that holds weights and KV cache (`weights_in`)."""
        tier = self.sram if self.weights_in == "sram" else self.hbm
        if tier is None:  # load_catalog rejects this; only hand-built systems get here
            raise ConfigError(f"{self.name}: weights_in = {self.weights_in!r} but no such tier")
        return tier

    def mem_capacity_bytes(self) -> float:
        """Bytes per chip in the weights tier."""
        return self.weights_tier().capacity_gb.value * 1e9

    def mem_bandwidth_Bps(self) -> float:
        """Bytes per second per chip of the weights tier."""
        return self.weights_tier().bandwidth_tbps.value * 1e12

    def speculative_factor(self, model_id: str) -> float:
        """Tokens accepted per decode iteration for a model (1.0 without speculative decoding)."""
        figure = self.speculative.get(model_id)
        return 1.0 if figure is None else figure.value

    def figures(self) -> dict[str, Figure]:
        """Every figure by dotted name, e.g. "hbm.capacity_gb", "speculative.llama-3.1-70b"."""
        out: dict[str, Figure] = {}
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if isinstance(value, Figure):
                out[name] = value
            elif isinstance(value, MemoryTier):
                out[f"{name}.capacity_gb"] = value.capacity_gb
                out[f"{name}.bandwidth_tbps"] = value.bandwidth_tbps
            elif name == "speculative":
                for model_id, figure in value.items():
                    out[f"{name}.{model_id}"] = figure
        return out


class Model(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A dense transformer's shape."""

    name: str
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    ffn_hidden: int
    vocab: int
    max_ctx: int
    params: int
    source: str

    def weight_bytes(self, precision: Precision) -> int:
        return self.params * BYTES_PER_ELEMENT[precision]

    def kv_bytes_per_token(self, precision: Precision) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * BYTES_PER_ELEMENT[precision]


class Catalog(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """All systems and models, by id."""

    systems: dict[str, System]
    models: dict[str, Model]

    def system(self, system_id: str) -> System:
        try:
            return self.systems[system_id]
        except KeyError:
            known = ", ".join(sorted(self.systems))
            raise ConfigError(f"unknown system {system_id!r} (known: {known})") from None

    def model(self, model_id: str) -> Model:
        try:
            return self.models[model_id]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise ConfigError(f"unknown model {model_id!r} (known: {known})") from None


def fits(
    system: System, model: Model, precision: Precision, chips: int
) -> tuple[bool, float, float]:
    """Whether the model's weights fit the chips' weights tier.

    Returns (fits, needed weight bytes, usable bytes = chips * capacity * USABLE_MEMORY_FRACTION).
    """
    needed = float(model.weight_bytes(precision))
    usable = chips * system.mem_capacity_bytes() * USABLE_MEMORY_FRACTION
    return needed <= usable, needed, usable


# ----------------------------------------------------------------------------- loading


def fleets_dir() -> Path:
    """The `fleets` directory: `twin/_fleets` in a wheel install, else the repo's `fleets/`."""
    packaged = importlib.resources.files("twin").joinpath("_fleets")
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "fleets"


@functools.lru_cache(maxsize=16)
def _load_cached(directory: Path) -> Catalog:
    models_path = directory / MODELS_FILE
    hardware_path = directory / HARDWARE_FILE
    models = _decode_table(read_toml(models_path), "models", Model, models_path)
    for model_id, model in models.items():
        _check_model(models_path, model_id, model)
    systems = _decode_table(read_toml(hardware_path), "systems", System, hardware_path)
    for system_id, system in systems.items():
        _check_system(hardware_path, system_id, system, models)
    return Catalog(systems=systems, models=models)


def load_catalog(directory: Path | None = None) -> Catalog:
    """Load and check `hardware.toml` and `models.toml` from a directory (default: fleets_dir()).

    The result is cached per directory; `clear_catalog_cache()` forgets it.
    """
    return _load_cached((fleets_dir() if directory is None else directory).resolve())


def clear_catalog_cache() -> None:
    _load_cached.cache_clear()


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(path, text, str(exc)) from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None


_TOML_AT = re.compile(r"^(?P<msg>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)$", re.S)
_TOML_HEADER = re.compile(r"^\s*\[\[?\s*(?P<name>[^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_TOML_KEY = re.compile(r"^\s*(?P<key>[A-Za-z0-9_\-\"'.]+?)\s*=")


def _syntax_error(path: Path, text: str, message: str) -> ConfigError:
    """A TOML syntax error, located by the enclosing table and the key on the bad line."""
    match = _TOML_AT.match(message)
    if match is None:
        return ConfigError(f"{path}: invalid TOML: {message}")
    line, col = int(match["line"]), int(match["col"])
    lines = text.splitlines()
    table = ""
    for candidate in reversed(lines[: line - 1]):
        header = _TOML_HEADER.match(candidate)
        if header:
            table = header["name"]
            break
    key_match = _TOML_KEY.match(lines[line - 1]) if 0 < line <= len(lines) else None
    where = ".".join(part for part in (table, key_match["key"] if key_match else "") if part)
    location = f"{where} (line {line}, column {col})" if where else f"line {line}, column {col}"
    return ConfigError(f"{path}: {location}: invalid TOML: {match['msg']}")


def _decode_table(raw: dict[str, Any], top: str, cls: type[_T], path: Path) -> dict[str, _T]:
    """Decode the `[<top>.<id>]` tables of a file into structs of type `cls`."""
    for key in raw:
        if key != top:
            raise ConfigError.at(path, [key], f"unknown key (expected only [{top}.<id>] tables)")
    table = raw.get(top)
    if not isinstance(table, dict) or not table:
        raise ConfigError.at(path, [top], f"expected at least one [{top}.<id>] table")
    out: dict[str, _T] = {}
    for item_id, item in table.items():
        where: list[str | int] = [top, item_id]
        if not isinstance(item, dict):
            raise ConfigError.at(path, where, f"expected a table, got {_toml_type(item)}")
        try:
            out[item_id] = msgspec.convert(item, cls)
        except msgspec.ValidationError as exc:
            raise _validation_error(path, where, item, cls, str(exc)) from None
    return out


# msgspec's names for types, in TOML words.
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
_MSGSPEC_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.S)
_MSGSPEC_SEGMENT = re.compile(r"\.(?P<field>[^.\[]+)|\[(?P<index>\d+)\]|\[\.\.\.\]")
_ANY_KEY = object()  # msgspec writes `[...]` for a dict key


def _validation_error(
    path: Path, prefix: list[str | int], raw: Any, cls: type, message: str
) -> ConfigError:
    """Translate a msgspec error ("... - at `$.a[...].b`") into key-path terms."""
    match = _MSGSPEC_AT.match(message)
    msg, at = (match["msg"], match["path"]) if match else (message, "")
    segments: list[object] = []
    for seg in _MSGSPEC_SEGMENT.finditer(at):
        if seg["field"] is not None:
            segments.append(seg["field"])
        elif seg["index"] is not None:
            segments.append(int(seg["index"]))
        else:
            segments.append(_ANY_KEY)
    keys, value, typ = _resolve(raw, cls, segments)
    where = prefix + keys

    unknown = re.match(r"Object contains unknown field `(?P<name>[^`]*)`", msg)
    if unknown:
        fields = ", ".join(_struct_fields(typ))
        return ConfigError.at(
            path, [*where, unknown["name"]], f"unknown key (expected one of: {fields})"
        )
    missing = re.match(r"Object missing required field `(?P<name>[^`]*)`", msg)
    if missing:
        return ConfigError.at(path, [*where, missing["name"]], "missing required key")
    wrong = re.match(r"Expected `(?P<want>[^`]*)`, got `(?P<got>[^`]*)`", msg)
    if wrong:
        want = " or ".join(_TYPE_WORDS.get(w.strip(), w.strip()) for w in wrong["want"].split("|"))
        return ConfigError.at(path, where, f"expected {want}, got {_toml_type(value)} {value!r}")
    if msg.startswith("Invalid enum value"):
        choices = ", ".join(repr(c) for c in get_args(_unwrap_optional(typ)))
        return ConfigError.at(path, where, f"invalid value {value!r} (expected one of: {choices})")
    return ConfigError.at(path, where, msg[:1].lower() + msg[1:])


def _resolve(raw: Any, typ: Any, segments: Sequence[object]) -> tuple[list[str | int], Any, Any]:
    """Follow msgspec path segments through the raw data and the type.

    Returns the key path (dict keys filled in), the raw value there and its expected type.
    """
    keys: list[str | int] = []
    for seg in segments:
        typ = _unwrap_optional(typ)
        if seg is _ANY_KEY:
            value_type = get_args(typ)[1] if get_origin(typ) is dict else Any
            bad = (
                [k for k, v in raw.items() if not _converts(v, value_type)]
                if isinstance(raw, dict)
                else []
            )
            key = bad[0] if bad else "?"
            keys.append(key)
            raw, typ = (raw.get(key) if isinstance(raw, dict) else None), value_type
        elif isinstance(seg, int):
            keys.append(seg)
            raw = raw[seg] if isinstance(raw, list) and seg < len(raw) else None
            args = get_args(typ)
            typ = args[0] if args else Any
        else:
            assert isinstance(seg, str)
            keys.append(seg)
            raw = raw.get(seg) if isinstance(raw, dict) else None
            typ = _field_type(typ, seg)
    return keys, raw, typ


def _converts(value: Any, typ: Any) -> bool:
    try:
        msgspec.convert(value, typ)
    except msgspec.ValidationError:
        return False
    return True


def _unwrap_optional(typ: Any) -> Any:
    if get_origin(typ) in (Union, types.UnionType):
        args = [a for a in get_args(typ) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return typ


def _struct_fields(typ: Any) -> list[str]:
    typ = _unwrap_optional(typ)
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
        return [f.name for f in msgspec.structs.fields(typ)]
    return []


def _field_type(typ: Any, name: str) -> Any:
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
        for field in msgspec.structs.fields(typ):
            if field.name == name:
                return field.type
    return Any


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


# ----------------------------------------------------------------------------- checks

_Check = Callable[[float], bool]

# Range of each figure's value: (test, what is expected).
_RANGES: dict[str, tuple[_Check, str]] = {
    "bf16_tflops": (lambda v: v > 0, "> 0"),
    "fp8_tflops": (lambda v: v > 0, "> 0"),
    "fp4_tflops": (lambda v: v > 0, "> 0"),
    "capacity_gb": (lambda v: v >= 0, ">= 0"),
    "bandwidth_tbps": (lambda v: v >= 0, ">= 0"),
    "interconnect_gbps": (lambda v: v >= 0, ">= 0"),
    "idle_w": (lambda v: v >= 0, ">= 0"),
    "peak_w": (lambda v: v > 0, "> 0"),
    "mfu": (lambda v: 0 < v <= 1, "0 < mfu <= 1"),
    "mbu": (lambda v: 0 < v <= 1, "0 < mbu <= 1"),
    "t_layer_us": (lambda v: v >= 0, ">= 0"),
    "t_hop_us": (lambda v: v >= 0, ">= 0"),
    "prefill_chunk_tokens": (lambda v: v >= 1 and v == int(v), "a whole number >= 1"),
    "speculative": (lambda v: v >= 1, ">= 1 (tokens per decode iteration)"),
}


def _check_figure(file: Path, where: list[str | int], figure: Figure, rule: str) -> None:
    if provenance_of(figure.source) is None:
        raise ConfigError.at(file, [*where, "source"], f"{_PROVENANCE_HELP}, got {figure.source!r}")
    if not math.isfinite(figure.value):
        raise ConfigError.at(
            file, [*where, "value"], f"expected a finite number, got {figure.value}"
        )
    check, expected = _RANGES[rule]
    if not check(figure.value):
        raise ConfigError.at(file, [*where, "value"], f"expected {expected}, got {figure.value:g}")


def _check_system(file: Path, system_id: str, system: System, models: Mapping[str, Model]) -> None:
    base: list[str | int] = ["systems", system_id]
    if system.chips_per_system < 1:
        raise ConfigError.at(
            file, [*base, "chips_per_system"], f"expected >= 1, got {system.chips_per_system}"
        )
    if not system.roles:
        raise ConfigError.at(file, [*base, "roles"], "expected at least one role")
    if len(set(system.roles)) != len(system.roles):
        raise ConfigError.at(file, [*base, "roles"], "a role is listed twice")
    for name in system.__struct_fields__:
        value = getattr(system, name)
        if isinstance(value, Figure):
            _check_figure(file, [*base, name], value, name)
        elif isinstance(value, MemoryTier):
            _check_figure(file, [*base, name, "capacity_gb"], value.capacity_gb, "capacity_gb")
            _check_figure(
                file, [*base, name, "bandwidth_tbps"], value.bandwidth_tbps, "bandwidth_tbps"
            )
    for model_id, figure in system.speculative.items():
        where = [*base, "speculative", model_id]
        if model_id not in models:
            known = ", ".join(sorted(models))
            raise ConfigError.at(file, where, f"unknown model id (known: {known})")
        _check_figure(file, where, figure, "speculative")
    if system.idle_w.value > system.peak_w.value:
        raise ConfigError.at(
            file,
            [*base, "idle_w", "value"],
            f"expected idle_w <= peak_w ({system.peak_w.value:g}), got {system.idle_w.value:g}",
        )
    tier = system.sram if system.weights_in == "sram" else system.hbm
    if tier is None:
        raise ConfigError.at(
            file,
            [*base, "weights_in"],
            f'weights_in = "{system.weights_in}" but the system has no {system.weights_in} table',
        )
    for part in ("capacity_gb", "bandwidth_tbps"):
        if getattr(tier, part).value <= 0:
            raise ConfigError.at(
                file,
                [*base, system.weights_in, part, "value"],
                "expected > 0 (this tier holds the weights: weights_in)",
            )


_MODEL_INTS = ("layers", "hidden", "q_heads", "kv_heads", "head_dim", "ffn_hidden", "vocab")


def _check_model(file: Path, model_id: str, model: Model) -> None:
    base: list[str | int] = ["models", model_id]
    for name in (*_MODEL_INTS, "max_ctx", "params"):
        value = getattr(model, name)
        if value < 1:
            raise ConfigError.at(file, [*base, name], f"expected >= 1, got {value}")
    if model.q_heads % model.kv_heads:
        raise ConfigError.at(
            file,
            [*base, "kv_heads"],
            f"expected a divisor of q_heads ({model.q_heads}), got {model.kv_heads}",
        )
    if provenance_of(model.source) is None:
        raise ConfigError.at(file, [*base, "source"], f"{_PROVENANCE_HELP}, got {model.source!r}")
