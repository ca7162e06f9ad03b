"""Fleet files: every shipped fleet loads, and every kind of mistake is one clear line."""

from __future__ import annotations

import copy
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from twin.catalog import ConfigError, fleets_dir, load_catalog
from twin.fleet import Fleet, load_fleet, load_trace, resolve_fleet_path, shipped_fleets

SHIPPED = [
    "all-vendors",
    "aws-cerebras",
    "gpu-colocated",
    "intel-sambanova",
    "lumai-optical",
    "nvidia-groq",
    "nvidia-lpx",
    "tenstorrent-galaxy",
]


@pytest.fixture(scope="module")
def catalog() -> Any:
    return load_catalog()


def _raw(name: str) -> dict[str, Any]:
    return tomllib.loads((fleets_dir() / f"{name}.toml").read_text())


def _val(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_val(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_val(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _dump(raw: dict[str, Any]) -> str:
    """A minimal TOML writer: every top-level key as `key = <inline value>`."""
    return "".join(f"{json.dumps(k)} = {_val(v)}\n" for k, v in raw.items())


def _write(tmp_path: Path, name: str, raw: dict[str, Any]) -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(_dump(raw))
    return p


def _tier_index(raw: dict[str, Any], role: str, nth: int = 0) -> int:
    return [i for i, t in enumerate(raw["tiers"]) if t["role"] == role][nth]


def _assert_one_line(err: ConfigError, path: Path, key: str, *fragments: str) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    assert "Traceback" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    assert f": {key}: " in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


# --------------------------------------------------------------------------------------------
# Shipped fleets
# --------------------------------------------------------------------------------------------


def test_shipped_fleet_names() -> None:
    assert shipped_fleets() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_fleet_loads(name: str, catalog: Any) -> None:
    fleet = load_fleet(fleets_dir() / f"{name}.toml", catalog)
    assert isinstance(fleet, Fleet)
    assert fleet.name == name
    assert fleet.description
    assert fleet.workload.model == "llama-3.1-70b"
    assert all(t.model == "llama-3.1-70b" for t in fleet.tiers)
    for ln in fleet.links:
        assert ln.source.startswith(("http://", "https://", "estimate:", "derived:")), ln.source


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_fleet_starts_with_a_comment(name: str) -> None:
    first = (fleets_dir() / f"{name}.toml").read_text().lstrip().splitlines()[0]
    assert first.startswith("#")


def _chips(fleet: Fleet) -> int:
    total = 0
    for t in fleet.tiers:
        per = t.chips_per_instance + (t.kv_host.chips if t.kv_host else 0)
        total += per * t.instances
    return total


def test_design_pairings(catalog: Any) -> None:
    def systems(name: str, role: str) -> set[str]:
        f = load_fleet(fleets_dir() / f"{name}.toml", catalog)
        return {t.system for t in f.tiers if t.role == role}

    lpx = load_fleet(fleets_dir() / "nvidia-lpx.toml", catalog)
    (decode,) = lpx.tiers_with_role("decode")
    assert decode.kv_host is not None
    assert catalog.systems[decode.kv_host.system].vendor == "NVIDIA"
    for name in ("tenstorrent-galaxy", "gpu-colocated"):
        f = load_fleet(fleets_dir() / f"{name}.toml", catalog)
        assert {t.role for t in f.tiers} == {"unified"}
        assert f.links == []
    lumai = load_fleet(fleets_dir() / "lumai-optical.toml", catalog)
    assert "estimates only" in lumai.description
    # all-vendors holds every prefill and decode system of the pairings
    every_prefill: set[str] = set()
    every_decode: set[str] = set()
    for name in ("nvidia-lpx", "nvidia-groq", "aws-cerebras", "intel-sambanova", "lumai-optical"):
        every_prefill |= systems(name, "prefill")
        every_decode |= systems(name, "decode")
    assert systems("all-vendors", "prefill") == every_prefill
    assert systems("all-vendors", "decode") == every_decode


def test_all_vendors_links_every_prefill_to_every_decode_and_stays_small(catalog: Any) -> None:
    f = load_fleet(fleets_dir() / "all-vendors.toml", catalog)
    pre = {t.name for t in f.tiers_with_role("prefill")}
    dec = {t.name for t in f.tiers_with_role("decode")}
    assert {(ln.from_, ln.to) for ln in f.links} == {(a, b) for a in pre for b in dec}
    assert _chips(f) <= 2500
    assert f.router.policy == "least_loaded"


# --------------------------------------------------------------------------------------------
# Resolving names
# --------------------------------------------------------------------------------------------


def test_resolve_by_name() -> None:
    assert resolve_fleet_path("all-vendors") == fleets_dir() / "all-vendors.toml"


def test_resolve_by_path(tmp_path: Path) -> None:
    p = tmp_path / "mine.toml"
    p.write_text("")
    assert resolve_fleet_path(str(p)) == p


def test_resolve_unknown_name_lists_shipped() -> None:
    with pytest.raises(ConfigError) as e:
        resolve_fleet_path("no-such-fleet")
    msg = str(e.value)
    assert "\n" not in msg
    assert "no-such-fleet" in msg
    assert "all-vendors" in msg and "nvidia-groq" in msg


def test_resolve_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such fleet file"):
        resolve_fleet_path(str(tmp_path / "nope.toml"))


def test_missing_fleet_file(tmp_path: Path, catalog: Any) -> None:
    p = tmp_path / "gone.toml"
    with pytest.raises(ConfigError) as e:
        load_fleet(p, catalog)
    assert str(e.value).startswith(f"{p}: ")


# --------------------------------------------------------------------------------------------
# Mistakes: each is one line naming the file and the key path
# --------------------------------------------------------------------------------------------

Mutator = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutator:
    """A mutator setting raw[a][b][0][c] = value for path 'a.b.0.c'."""

    def mutate(raw: dict[str, Any]) -> None:
        keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split(".")]
        node: Any = raw
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return mutate


def _del(path: str) -> Mutator:
    def mutate(raw: dict[str, Any]) -> None:
        keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split(".")]
        node: Any = raw
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]

    return mutate


def _decode_chips(n: int) -> Mutator:
    def mutate(raw: dict[str, Any]) -> None:
        raw["tiers"][_tier_index(raw, "decode")]["chips_per_instance"] = n

    return mutate


def _duplicate_tier_name(raw: dict[str, Any]) -> None:
    raw["tiers"][1]["name"] = raw["tiers"][0]["name"]


def _link_from_decode(raw: dict[str, Any]) -> None:
    raw["links"][0]["from"] = raw["links"][0]["to"]


def _link_to_prefill(raw: dict[str, Any]) -> None:
    raw["links"][0]["to"] = raw["links"][0]["from"]


def _unlink_second_prefill(raw: dict[str, Any]) -> None:
    name = raw["tiers"][1]["name"]
    assert raw["tiers"][1]["role"] == "prefill"
    raw["links"] = [ln for ln in raw["links"] if ln["from"] != name]


def _unlink_last_decode(raw: dict[str, Any]) -> None:
    name = raw["tiers"][-1]["name"]
    assert raw["tiers"][-1]["role"] == "decode"
    raw["links"] = [ln for ln in raw["links"] if ln["to"] != name]


def _only_decode_tiers(raw: dict[str, Any]) -> None:
    raw["tiers"] = [t for t in raw["tiers"] if t["role"] == "decode"]
    raw["links"] = []


def _kv_host_on_prefill(raw: dict[str, Any]) -> None:
    raw["tiers"][0]["kv_host"] = {"system": raw["tiers"][0]["system"], "chips": 2}


def _lumai_as_decode(raw: dict[str, Any]) -> None:
    i = _tier_index(raw, "prefill")
    raw["tiers"][i]["role"] = "decode"


def _other_tier_model(raw: dict[str, Any]) -> None:
    raw["tiers"][0]["model"] = "llama-3.1-8b"


# (fleet to copy, mutation, key path expected in the message, fragments expected in the message)
MISTAKES: list[tuple[str, Mutator, str, tuple[str, ...]]] = [
    ("nvidia-groq", _set("tiers.0.chips", 8), "tiers[0].chips", ("unknown key", "instances")),
    ("nvidia-groq", _set("slo.p99", 1.0), "slo.p99", ("unknown key",)),
    ("nvidia-groq", _set("links.0.speed", 1.0), "links[0].speed", ("unknown key",)),
    (
        "nvidia-groq",
        _set("tiers.0.instances", "two"),
        "tiers[0].instances",
        ("expected an integer", "got a string"),
    ),
    ("nvidia-groq", _set("links.0.bandwidth_gbps", "fast"), "links[0].bandwidth_gbps", ()),
    ("nvidia-groq", _set("links.0.from", 3), "links[0].from", ("expected a string",)),
    ("nvidia-groq", _set("router.weights", {"x": "a"}), "router.weights.x", ()),
    ("nvidia-groq", _set("tiers", {"a": 1}), "tiers", ("expected an array",)),
    ("nvidia-groq", _set("router.policy", "random"), "router.policy", ("least_loaded",)),
    ("nvidia-groq", _set("tiers.0.role", "both"), "tiers[0].role", ("unified",)),
    ("nvidia-groq", _set("tiers.0.precision", "fp4"), "tiers[0].precision", ("fp8",)),
    ("nvidia-groq", _del("slo.tpot_s"), "slo.tpot_s", ("missing",)),
    ("nvidia-groq", _del("tiers.0.system"), "tiers[0].system", ("missing",)),
    ("nvidia-groq", _set("tiers.0.chips_per_instance", 0), "tiers[0].chips_per_instance", ()),
    ("nvidia-groq", _set("tiers.0.instances", -1), "tiers[0].instances", ()),
    ("nvidia-groq", _set("workload.rate_per_s", 0.0), "workload.rate_per_s", ()),
    ("nvidia-groq", _set("workload.rate_per_s", float("nan")), "workload.rate_per_s", ()),
    ("nvidia-groq", _set("links.0.bandwidth_gbps", -5.0), "links[0].bandwidth_gbps", ()),
    ("nvidia-groq", _set("links.0.latency_us", -1.0), "links[0].latency_us", ()),
    ("nvidia-groq", _set("slo.ttft_s", 0.0), "slo.ttft_s", ()),
    ("nvidia-groq", _set("tiers.0.spec_decode", 0.5), "tiers[0].spec_decode", ()),
    (
        "nvidia-groq",
        _set("tiers.0.system", "h100"),
        "tiers[0].system",
        ("unknown system 'h100'", "h100-sxm", "groq-lpu-v1"),
    ),
    ("nvidia-groq", _set("workload.model", "gpt-5"), "workload.model", ("llama-3.1-70b",)),
    ("nvidia-groq", _set("tiers.0.model", "gpt-5"), "tiers[0].model", ("unknown model",)),
    ("nvidia-groq", _other_tier_model, "tiers[0].model", ("llama-3.1-70b",)),
    ("lumai-optical", _lumai_as_decode, "tiers[0].role", ("decode", "prefill")),
    ("nvidia-groq", _decode_chips(64), "chips_per_instance", ("needs", "GB", "usable")),
    ("aws-cerebras", _decode_chips(2), "chips_per_instance", ("needs", "GB", "usable")),
    ("nvidia-groq", _duplicate_tier_name, "tiers[1].name", ("duplicate",)),
    ("nvidia-groq", _link_from_decode, "links[0].from", ("prefill",)),
    ("nvidia-groq", _link_to_prefill, "links[0].to", ("decode",)),
    ("nvidia-groq", _set("links.0.to", "nowhere"), "links[0].to", ("unknown tier",)),
    ("nvidia-groq", _unlink_second_prefill, "tiers[1]", ("no link",)),
    ("intel-sambanova", _unlink_last_decode, "tiers[3]", ("not linked",)),
    ("nvidia-groq", _only_decode_tiers, "tiers", ("prefill", "unified")),
    ("nvidia-groq", _set("tiers", []), "tiers", ("at least one",)),
    ("nvidia-groq", _kv_host_on_prefill, "tiers[0].kv_host", ("decode",)),
    ("nvidia-lpx", _set("tiers.1.kv_host.system", "nope"), "tiers[1].kv_host.system", ()),
    ("nvidia-lpx", _set("tiers.1.kv_host.chips", 0), "tiers[1].kv_host.chips", ()),
    ("nvidia-lpx", _set("tiers.1.kv_host.extra", 0), "tiers[1].kv_host.extra", ("unknown key",)),
    ("nvidia-groq", _set("name", "something-else"), "name", ("nvidia-groq",)),
    ("nvidia-groq", _set("tiers.0.name", "a/b"), "tiers[0].name", ("MQTT",)),
    ("nvidia-groq", _set("router.weights", {"nosuch": 1.0}), "router.weights.nosuch", ()),
    (
        "nvidia-groq",
        _set("router.weights", {"groq-decode": -1.0}),
        "router.weights.groq-decode",
        (">= 0",),
    ),
    ("nvidia-groq", _set("workload.arrivals", "trace"), "workload.trace", ("trace",)),
    ("nvidia-groq", _set("workload.trace", "missing.csv"), "workload.trace", ("missing.csv",)),
    (
        "nvidia-groq",
        _set("workload.prompt", {"dist": "lognormal", "median": 1000}),
        "workload.prompt.sigma",
        ("missing",),
    ),
    ("nvidia-groq", _set("workload.output", {"dist": "fixed"}), "workload.output.value", ()),
    (
        "nvidia-groq",
        _set("workload.output", {"dist": "uniform", "low": 500, "high": 10}),
        "workload.output.high",
        (">= low",),
    ),
    (
        "nvidia-groq",
        _set("workload.output", {"dist": "fixed", "value": 10, "low": 1}),
        "workload.output.low",
        ("not used",),
    ),
    ("nvidia-groq", _set("workload.output", {"dist": "poisson"}), "workload.output.dist", ()),
    ("nvidia-groq", _set("workload.burst_factor", 0.5), "", ()),  # poisson ignores burst_*
    (
        "nvidia-groq",
        lambda raw: raw["workload"].update(arrivals="bursty", burst_factor=0.5),
        "workload.burst_factor",
        (">= 1",),
    ),
]


@pytest.mark.parametrize(
    ("base", "mutate", "key", "fragments"),
    MISTAKES,
    ids=[f"{i:02d}-{m[2] or 'ok'}" for i, m in enumerate(MISTAKES)],
)
def test_mistake(
    tmp_path: Path,
    catalog: Any,
    base: str,
    mutate: Mutator,
    key: str,
    fragments: tuple[str, ...],
) -> None:
    raw = copy.deepcopy(_raw(base))
    mutate(raw)
    path = _write(tmp_path, base, raw)
    if not key:  # the mutation is allowed
        load_fleet(path, catalog)
        return
    with pytest.raises(ConfigError) as e:
        load_fleet(path, catalog)
    if key == "chips_per_instance":
        key = f"tiers[{_tier_index(raw, 'decode')}].chips_per_instance"
    _assert_one_line(e.value, path, key, *fragments)


def test_unknown_system_lists_every_valid_id(tmp_path: Path, catalog: Any) -> None:
    raw = _raw("nvidia-groq")
    raw["tiers"][0]["system"] = "h100"
    path = _write(tmp_path, "nvidia-groq", raw)
    with pytest.raises(ConfigError) as e:
        load_fleet(path, catalog)
    for system_id in catalog.systems:
        assert system_id in str(e.value)


def test_not_fitting_says_how_many_chips(tmp_path: Path, catalog: Any) -> None:
    raw = _raw("nvidia-groq")
    i = _tier_index(raw, "decode")
    raw["tiers"][i]["chips_per_instance"] = 64
    path = _write(tmp_path, "nvidia-groq", raw)
    with pytest.raises(ConfigError, match=r"expected at least \d+ chips per instance"):
        load_fleet(path, catalog)


def test_toml_syntax_error_names_the_line(tmp_path: Path, catalog: Any) -> None:
    text = (fleets_dir() / "nvidia-groq.toml").read_text()
    lines = text.splitlines()
    n = next(i for i, ln in enumerate(lines) if ln.startswith("[slo]"))
    lines.insert(n + 1, "ttft_s = = 2.0")
    path = tmp_path / "nvidia-groq.toml"
    path.write_text("\n".join(lines))
    with pytest.raises(ConfigError) as e:
        load_fleet(path, catalog)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert f"line {n + 2}" in msg


def test_unreadable_fleet_file(tmp_path: Path, catalog: Any) -> None:
    path = tmp_path / "nvidia-groq.toml"
    path.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(ConfigError) as e:
        load_fleet(path, catalog)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: ")


# --------------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------------


def _trace_fleet(tmp_path: Path, trace_text: str) -> Path:
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "t.csv").write_text(trace_text)
    raw = _raw("nvidia-groq")
    raw["workload"]["arrivals"] = "trace"
    raw["workload"]["trace"] = "traces/t.csv"
    return _write(tmp_path, "nvidia-groq", raw)


def test_trace_fleet_loads_and_trace_path_is_absolute(tmp_path: Path, catalog: Any) -> None:
    path = _trace_fleet(tmp_path, "timestamp_s,input_tokens,output_tokens\n0,100,10\n0.5,200,20\n")
    fleet = load_fleet(path, catalog)
    assert Path(fleet.workload.trace).is_absolute()
    assert Path(fleet.workload.trace) == (tmp_path / "traces" / "t.csv").resolve()
    assert load_trace(fleet.workload.trace) == ([0.0, 0.5], [100, 200], [10, 20])


def test_bad_trace_row_names_trace_file_and_line(tmp_path: Path, catalog: Any) -> None:
    path = _trace_fleet(tmp_path, "timestamp_s,input_tokens,output_tokens\n0,100,10\n1,abc,20\n")
    with pytest.raises(ConfigError) as e:
        load_fleet(path, catalog)
    msg = _assert_one_line(e.value, path, "workload.trace", "t.csv:3", "input_tokens")
    assert msg.count(":") >= 4


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("", "", "empty"),
        ("timestamp_s,input_tokens,output_tokens\n", "", "no rows"),
        ("a,b,c\n1,2,3\n", ":1", "timestamp_s"),
        ("timestamp_s,input_tokens,output_tokens\n0,1\n", ":2", "fields"),
        ("timestamp_s,input_tokens,output_tokens\nx,1,1\n", ":2", "timestamp"),
        ("timestamp_s,input_tokens,output_tokens\n1,1,1\n0,1,1\n", ":3", "time order"),
        ("timestamp_s,input_tokens,output_tokens\n0,1,0\n", ":2", "output_tokens"),
        ("timestamp_s,input_tokens,output_tokens\n0,1.5,3\n", ":2", "input_tokens"),
    ],
)
def test_bad_traces(tmp_path: Path, text: str, where: str, what: str) -> None:
    p = tmp_path / "t.csv"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_trace(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}{where}: "), msg
    assert what in msg


def test_missing_trace(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such trace file"):
        load_trace(tmp_path / "nope.csv")


def test_azure_and_mooncake_shaped_traces(tmp_path: Path) -> None:
    azure = tmp_path / "azure.csv"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
    )
    ts, ins, outs = load_trace(azure)
    assert ts[0] == 0.0 and ts[1] == pytest.approx(4.314579, abs=1e-6)
    assert ins == [374, 396] and outs == [44, 109]
    moon = tmp_path / "mooncake.csv"
    moon.write_text("timestamp,input_length,output_length,hash_ids\n0,6955,52,x\n1500,100,1,y\n")
    assert load_trace(moon) == ([0.0, 1.5], [6955, 100], [52, 1])
