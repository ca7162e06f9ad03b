"""Hostile input (hypothesis): what a network or an operator's typo can throw at the twin.

- Commands: random bytes, random JSON values and well-typed-but-wrong commands (out-of-range
  numbers, unknown targets, links and tiers, one kind's fields under another kind's tag) at
  `telemetry.decode_command` and at a running engine through `handle_payload`: every one gets a
  Reply (an error for what is wrong, ok for what is valid), the twin keeps ticking and stepping,
  and request conservation holds. Oversized payloads are refused before they are decoded. Then
  500 of the same kind through a real Mosquitto to an MQTT bridge (`fleet-twin serve`'s path):
  a reply for each, the bridge stays connected, the engine keeps running.
- Files: random mutations of the shipped fleet, catalog and scenario files: a valid load or a
  ConfigError with a one-line message naming the file; never another exception.

The counts of what was tried are printed at the end of the module (pytest's terminal).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from twin import core, telemetry
from twin import telemetry as T
from twin.build import new_twin
from twin.catalog import Catalog, ConfigError, clear_catalog_cache, fleets_dir, load_catalog
from twin.chaos import ComparePlan, Plan, load_plan, scenarios_dir
from twin.engine import Engine, VirtualClock
from twin.fleet import Fleet, load_fleet, resolve_fleet_path

FLEET = "aws-cerebras"
TIERS = ("trn2-prefill", "trn3-prefill", "cerebras-decode")
LINKS = ("trn2-prefill->cerebras-decode", "trn3-prefill->cerebras-decode")
MAX = telemetry.MAX_PAYLOAD_BYTES

COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and COUNTS:
        tried = ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items()))
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nhostile input tried: {tried}")


# module constants, not fixtures: hypothesis prints a failing example's arguments
CATALOG: Catalog = load_catalog()
FLEET_OBJ: Fleet = load_fleet(resolve_fleet_path(FLEET), CATALOG)


def one_line(error: str) -> None:
    assert error and "\n" not in error and "\r" not in error, repr(error)


# ------------------------------------------------------------------------------------------------
# strategies


#: Numbers around and beyond every limit the commands have.
EDGE_FLOATS = [
    0.0,
    -0.0,
    -1.0,
    1.0,
    0.5,
    0.999999,
    1.000001,
    5e-324,
    1e-300,
    T.MAX_RATE_PER_S,
    T.MAX_RATE_PER_S * (1 + 1e-15),
    T.MAX_BURST_FACTOR,
    T.MAX_BURST_FACTOR + 0.5,
    T.MAX_DURATION_S,
    T.MAX_DURATION_S + 1,
    T.MAX_SPEED,
    T.MAX_SPEED * 2,
    1e308,
    -1e308,
    math.inf,
    -math.inf,
    math.nan,
]
FLOATS = st.one_of(
    st.sampled_from(EDGE_FLOATS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-10.0, 50.0),
)
#: Targets near the real ones: wrong indices, odd digits, bad separators (and a few valid).
TARGETS = [
    "cerebras-decode/0",
    "cerebras-decode/1/3",
    "trn2-prefill/1/15",
    "trn3-prefill/0",
    "cerebras-decode/2",
    "cerebras-decode/0/4",
    "trn2-prefill/1/16",
    "cerebras-decode/-1",
    "cerebras-decode/0/-1",
    "cerebras-decode/0/²",  # str.isdigit() but not int()
    "cerebras-decode/0/٣",  # an Arabic-Indic 3
    "cerebras-decode/0/1e3",
    "cerebras-decode/0/99999999999999999999999999",
    "cerebras-decode//0",
    "cerebras-decode/0/0/0",
    "cerebras-decode",
    "/0",
    "/",
    "",
    " ",
    "Cerebras-Decode/0",
    "cerebras-decode/0\n",
    "cerebras-decode/\x000",
]
NAMES = st.one_of(st.sampled_from(TARGETS), st.text(max_size=40))
LINK_NAMES = st.one_of(
    st.sampled_from([*LINKS, "trn2-prefill->trn3-prefill", "->", "", "trn2-prefill -> x"]),
    st.text(max_size=40),
)
POLICY_NAMES = st.one_of(
    st.sampled_from([*T.POLICIES, "", "LEAST_LOADED", "least-loaded", "random"]),
    st.text(max_size=20),
)
WEIGHTS = st.dictionaries(
    st.one_of(st.sampled_from(TIERS), st.text(max_size=20)), FLOATS, max_size=4
)
IDS = st.one_of(st.just(""), st.text(max_size=12))

COMMANDS: st.SearchStrategy[T.Command] = st.one_of(
    st.builds(T.Fail, target=NAMES, id=IDS),
    st.builds(T.Recover, target=NAMES, id=IDS),
    st.builds(T.Drain, target=NAMES, id=IDS),
    st.builds(T.DegradeLink, link=LINK_NAMES, factor=FLOATS, id=IDS),
    st.builds(T.RestoreLink, link=LINK_NAMES, id=IDS),
    st.builds(T.SetRate, rate_per_s=FLOATS, id=IDS),
    st.builds(T.Burst, factor=FLOATS, duration_s=FLOATS, id=IDS),
    st.builds(T.SetRouting, policy=POLICY_NAMES, weights=WEIGHTS, id=IDS),
    st.builds(T.Pause, id=IDS),
    st.builds(T.Resume, id=IDS),
    st.builds(T.SetSpeed, speed=FLOATS, id=IDS),
)

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
FIELD_NAMES = [
    "cmd",
    "id",
    "reply_to",
    "schema",
    "ts_ms",
    "target",
    "link",
    "factor",
    "rate_per_s",
    "duration_s",
    "policy",
    "weights",
    "speed",
]


@st.composite
def wrong_kind_payloads(draw: st.DrawFn) -> bytes:
    """A command's fields under another (or an unknown) `cmd` tag, some of them dropped,
    retyped or added."""
    d: dict[str, Any] = msgspec.to_builtins(draw(COMMANDS))
    d = {k: v for k, v in d.items() if not (isinstance(v, float) and not math.isfinite(v))}
    d["cmd"] = draw(st.one_of(st.sampled_from(T.COMMAND_KINDS), st.text(max_size=12), JSON_VALUES))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["drop", "retype", "add"]))
        key = draw(st.sampled_from(FIELD_NAMES))
        if action == "drop":
            d.pop(key, None)
        else:
            d[key] = draw(JSON_VALUES)
    return json.dumps(d).encode()


def deep(n: int, opener: str = '{"a":', closer: str = "}", inner: str = "1") -> str:
    return opener * n + inner + closer * n


#: Payloads of particular interest, always tried (hypothesis @example).
NESTED = [
    deep(1200).encode(),
    ('{"cmd":"pause","x":' + deep(1200, "[", "]", "") + "}").encode(),
    ('{"cmd":"set_routing","policy":"weighted","weights":' + deep(1200) + "}").encode(),
]


# ------------------------------------------------------------------------------------------------
# the decoder


def check_decode(payload: bytes | str) -> T.Command | None:
    """decode_command gives a Command or a one-line CommandError, nothing else; so does
    peek_envelope give an Envelope."""
    COUNTS["payloads (decoder)"] += 1
    assert isinstance(T.peek_envelope(payload), T.Envelope)
    try:
        cmd = T.decode_command(payload)
    except T.CommandError as e:
        one_line(str(e))
        assert ": " in str(e)
        return None
    T.check_command(cmd)  # what decodes is in range
    assert T.decode_command(T.encode(cmd)) == cmd
    return cmd


@settings(max_examples=1500, deadline=None)
@given(payload=st.binary(max_size=300))
@example(payload=b"\xef\xbb\xbf{}")
@example(payload=b'{"cmd":"fail","target":"\\ud800"}')
def test_random_bytes_at_the_decoder(payload: bytes) -> None:
    check_decode(payload)


@settings(max_examples=1500, deadline=None)
@given(value=JSON_VALUES)
def test_random_json_at_the_decoder(value: Any) -> None:
    text = json.dumps(value)
    check_decode(text.encode())
    check_decode(text)


@settings(max_examples=1500, deadline=None)
@given(cmd=COMMANDS)
def test_well_typed_wrong_commands_at_the_decoder(cmd: T.Command) -> None:
    got = check_decode(T.encode(cmd))
    try:
        T.check_command(cmd)
        valid = True
    except T.CommandError as e:
        one_line(str(e))
        valid = False
    if valid:  # a valid command survives the trip (NaN and infinities cannot: JSON has none)
        assert got == cmd
    else:
        assert got is None


@settings(max_examples=1500, deadline=None)
@given(payload=wrong_kind_payloads())
def test_wrong_kinds_at_the_decoder(payload: bytes) -> None:
    check_decode(payload)


@pytest.mark.parametrize("payload", NESTED, ids=["object", "unknown-field", "weights"])
def test_deeply_nested_json_is_an_error_not_a_crash(payload: bytes) -> None:
    """~1000 levels (2-7 KB, well under the size limit) exhaust msgspec's recursion limit."""
    assert len(payload) < MAX
    assert check_decode(payload) is None


class _NoDecoding:
    def decode(self, payload: Any) -> Any:
        raise AssertionError("an oversized payload was decoded")


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(extra=st.integers(1, 5000), as_text=st.booleans(), cmd=COMMANDS)
def test_oversized_payloads_are_refused_before_decoding(
    monkeypatch: pytest.MonkeyPatch, extra: int, as_text: bool, cmd: T.Command
) -> None:
    COUNTS["payloads (oversized)"] += 1
    body = T.encode(T.Pause(id="big"))
    payload = body[:-1] + b" " * (MAX - len(body) + extra) + b"}"  # valid JSON, too big
    assert len(payload) == MAX + extra
    with monkeypatch.context() as m:
        m.setattr(telemetry, "_COMMAND_DECODER", _NoDecoding())
        m.setattr(telemetry, "_ENVELOPE_DECODER", _NoDecoding())
        with pytest.raises(
            T.CommandError, match=rf"^payload: {MAX + extra} bytes is over the {MAX}-byte limit$"
        ):
            T.decode_command(payload.decode() if as_text else payload)
        assert T.peek_envelope(payload) == T.Envelope()
    # the size is in bytes, not characters; at the limit it decodes
    padded = T.encode(T.SetRouting(policy="weighted", weights={"é" * 10: 1.0}))
    at_limit = padded[:-1] + b" " * (MAX - len(padded)) + b"}"
    assert len(at_limit) == MAX and T.decode_command(at_limit).id == ""
    text = '{"cmd":"pause","id":"' + "é" * (MAX // 2) + '"}'
    assert len(text) < MAX < len(text.encode())
    with pytest.raises(T.CommandError, match="over the"):
        T.decode_command(text)


# ------------------------------------------------------------------------------------------------
# a running engine


class HybridClock(VirtualClock):
    """Virtual time for sleeping (no test waits), plus the real time spent computing, so that
    a tick's compute deadline holds even at a huge speed."""

    def __init__(self) -> None:
        super().__init__()
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return super().now() + (time.perf_counter() - self._t0)


def check_state(engine: Engine) -> None:
    st_, p = engine.twin.state, engine.twin.params
    core.check_conservation(st_)
    assert (st_.inst_kv_used <= p.inst_kv_capacity * (1 + 1e-9) + 1.0).all()


async def ticking(engine: Engine, sub: Any, task: asyncio.Task[None], *, steps: bool) -> None:
    """A new summary arrives (the engine ticks); with `steps`, simulated time moves too."""
    sub.drain()
    t0 = engine.sim_time_s
    async with asyncio.timeout(20):
        while True:
            msgs = sub.drain()
            if any(isinstance(m, T.Summary) for m in msgs) and (
                not steps or engine.sim_time_s > t0
            ):
                return
            if task.done():
                raise AssertionError(f"the engine stopped: {task.exception()!r}")
            await asyncio.sleep(0)


async def answered(call: Any, task: asyncio.Task[None]) -> T.Reply:
    """The reply to a command, or AssertionError if the engine dies first (or 20 s pass)."""
    reply_task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait(
        {reply_task, task}, timeout=20, return_when=asyncio.FIRST_COMPLETED
    )
    if reply_task in done:
        return reply_task.result()
    reply_task.cancel()
    if task.done():
        raise AssertionError(f"the engine stopped: {task.exception()!r}")
    raise AssertionError("no reply within 20 s")


async def against_engine(payloads: list[bytes | T.Command]) -> None:
    engine = Engine(
        new_twin(FLEET_OBJ, CATALOG, seed=3),
        speed=0.0,
        tick_s=0.05,
        clock=HybridClock(),
        catalog=CATALOG,
        summary_hz=10,
    )
    sub = engine.subscribe(maxsize=1 << 14)
    task = asyncio.create_task(engine.run())
    try:
        await ticking(engine, sub, task, steps=True)
        for payload in payloads:
            if isinstance(payload, bytes):
                COUNTS["payloads (running engine)"] += 1
                env = T.peek_envelope(payload)
                reply = await answered(engine.handle_payload(payload), task)
                assert reply.id == env.id
            else:
                COUNTS["commands (running engine, not decoded)"] += 1
                reply = await answered(engine.command(payload), task)
                assert reply.id == payload.id
            assert isinstance(reply, T.Reply)
            if reply.ok:
                assert reply.error == ""
            else:
                one_line(reply.error)
            check_state(engine)
            await ticking(engine, sub, task, steps=False)  # paused or slowed, it still ticks
            check_state(engine)
            for fix in (T.SetSpeed(speed=0.0), T.Resume()):
                assert (await answered(engine.command(fix), task)).ok
            await ticking(engine, sub, task, steps=True)
            check_state(engine)
    finally:
        engine.stop()
        await asyncio.wait({task}, timeout=20)
    assert task.exception() is None


PAYLOADS = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    COMMANDS.map(T.encode),
    wrong_kind_payloads(),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(st.one_of(PAYLOADS, COMMANDS), min_size=1, max_size=3))
@example(payloads=[b'{"cmd":"fail","target":"cerebras-decode/0/\xc2\xb2","id":"sup"}'])
@example(payloads=[NESTED[1]])
@example(payloads=[T.SetRate(rate_per_s=T.MAX_RATE_PER_S), T.Fail(target="cerebras-decode/0")])
@example(payloads=[T.Burst(factor=T.MAX_BURST_FACTOR, duration_s=T.MAX_DURATION_S)])
@example(payloads=[T.SetSpeed(speed=T.MAX_SPEED)])
@example(payloads=[T.SetSpeed(speed=5e-324), T.Pause()])
def test_hostile_payloads_at_a_running_engine(payloads: list[bytes | T.Command]) -> None:
    asyncio.run(against_engine(payloads))


def test_a_superscript_digit_in_a_target_gets_an_error_reply() -> None:
    """'²'.isdigit() is True but int('²') raises: the engine must answer, not die."""
    payload = '{"cmd":"fail","target":"cerebras-decode/0/²","id":"x"}'.encode()
    asyncio.run(against_engine([payload]))


def test_oversized_payload_at_a_running_engine() -> None:
    body = T.encode(T.Fail(target="cerebras-decode/0", id="big"))
    payload = body[:-1] + b" " * (MAX + 1 - len(body)) + b"}"

    async def go() -> None:
        engine = Engine(
            new_twin(FLEET_OBJ, CATALOG, seed=1), speed=0.0, clock=VirtualClock(), catalog=CATALOG
        )
        sub = engine.subscribe(maxsize=1 << 12)
        task = asyncio.create_task(engine.run())
        reply = await engine.handle_payload(payload)
        assert (
            not reply.ok and reply.error == f"payload: {MAX + 1} bytes is over the {MAX}-byte limit"
        )
        assert reply.id == ""  # not even the envelope is read
        assert not engine.twin.state.chip_status.any()  # nothing changed
        await ticking(engine, sub, task, steps=True)
        engine.stop()
        await task

    asyncio.run(go())


# ------------------------------------------------------------------------------------------------
# files


KEY_LINE = r"^\s*[A-Za-z0-9_\"'.-]+\s*="
VALUES = [
    '"text"',
    '""',
    "-1",
    "0",
    "-0.5",
    "0.5",
    "1e309",
    "inf",
    "-inf",
    "nan",
    "true",
    "[]",
    "[1, 2]",
    '["a"]',
    "{}",
    "{ a = 1 }",
    "9223372036854775807",
    "-9223372036854775808",
    "99999999999999999999999",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    '"../../../etc/passwd"',
    '"prefill"',
    '"decode"',
    '"unified"',
    '"weighted"',
    '"trace"',
    '"bursty"',
    '"fp8"',
    '"lognormal"',
    '"h100-sxm"',
    '"groq-lpu-v1"',
    '"llama-3.1-8b"',
    '"estimate: x"',
    "1000000000000",
    "1e-320",
]
HEADERS = [
    "[slo]",
    "[[slo]]",
    "[router]",
    "[workload]",
    "[[tiers]]",
    "[tiers]",
    "[[links]]",
    "[workload.prompt]",
    "[[method]]",
    "[[expect]]",
    "[steady-state]",
    "[[runs]]",
    "[x]",
]
MUTATIONS = (
    "delete",
    "retype",
    "negate",
    "unknown",
    "duplicate",
    "bytes",
    "truncate",
    "header",
    "swap",
    "deep",
    "blank",
)


def _key_lines(lines: list[str]) -> list[int]:
    import re

    return [i for i, line in enumerate(lines) if re.match(KEY_LINE, line)]


@st.composite
def mutations(draw: st.DrawFn, sources: dict[str, bytes]) -> tuple[str, bytes, list[str]]:
    """(file name, mutated bytes, what was done) from one of `sources`."""
    import re

    name = draw(st.sampled_from(sorted(sources)))
    data = sources[name]
    done: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(MUTATIONS))
        done.append(kind)
        if kind in ("bytes", "truncate"):
            at = draw(st.integers(0, len(data)))
            if kind == "truncate":
                data = data[:at]
            else:
                data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
            continue
        text = data.decode("utf-8", "surrogateescape")
        lines = text.splitlines(keepends=True) or [""]
        keys = _key_lines(lines)
        i = draw(st.sampled_from(keys)) if keys else 0
        key, eq, _ = lines[i].partition("=")
        if kind == "delete" and keys:
            del lines[i]
        elif kind == "retype" and eq:
            new = draw(st.one_of(st.sampled_from(VALUES), st.text(max_size=12).map(json.dumps)))
            lines[i] = f"{key}= {new}\n"
        elif kind == "negate" and eq:
            lines[i] = re.sub(r"(?<![\w.-])(\d)", r"-\1", lines[i], count=1)
        elif kind == "unknown":
            at = draw(st.integers(0, len(lines)))
            lines.insert(at, draw(st.sampled_from(["bogus_key = 1\n", "tiers = 3\n", "x.y = 2\n"])))
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "header":
            at = draw(st.integers(0, len(lines)))
            lines.insert(at, draw(st.sampled_from(HEADERS)) + "\n")
        elif kind == "swap" and eq and len(keys) > 1:
            j = draw(st.sampled_from(keys))
            lines[i] = f"{key}={lines[j].partition('=')[2]}"
        elif kind == "deep" and eq:
            n = draw(st.sampled_from([3, 40, 1500]))
            lines[i] = (
                f"{key}= {deep(n, '[', ']', '1')}\n"
                if draw(st.booleans())
                else (f"{key}= {deep(n, '{ a = ', ' }', '1')}\n")
            )
        elif kind == "blank" and eq:
            lines[i] = f"{key}=\n"
        data = "".join(lines).encode("utf-8", "surrogateescape")
    return name, data, done


def _sources(directory: Path, names: list[str]) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in names}


FLEET_FILES = _sources(
    fleets_dir(),
    sorted(p.name for p in fleets_dir().glob("*.toml") if p.stem not in ("hardware", "models")),
)
CATALOG_FILES = _sources(fleets_dir(), ["hardware.toml", "models.toml"])
SCENARIO_FILES = _sources(scenarios_dir(), sorted(p.name for p in scenarios_dir().glob("*.toml")))


def config_error_ok(e: ConfigError, path: Path) -> None:
    msg = str(e)
    one_line(msg)
    assert msg.startswith(str(path)), msg


def buildable(f: Fleet) -> bool:
    """Small enough to build and step in a test (load_fleet sets no upper bounds)."""
    chips = sum(
        t.instances * (t.chips_per_instance + (t.kv_host.chips if t.kv_host else 0))
        for t in f.tiers
    )
    lengths = [
        getattr(d, k)
        for d in (f.workload.prompt, f.workload.output)
        for k in ("value", "high", "max", "median")
    ]
    return (
        chips <= 20_000
        and f.workload.rate_per_s <= 2_000
        and f.workload.burst_factor <= 10
        and all(v is None or v <= 200_000 for v in lengths)
        and (f.workload.prompt.sigma or 0) <= 3
        and (f.workload.output.sigma or 0) <= 3
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@settings(max_examples=1000, deadline=None)
@given(m=mutations(FLEET_FILES))
@example(
    m=(
        "aws-cerebras.toml",
        b"x = " + deep(1500, "[", "]", "1").encode() + b"\n" + FLEET_FILES["aws-cerebras.toml"],
        ["deep"],
    )
)
def test_mutated_fleet_files(workdir: Path, m: tuple[str, bytes, list[str]]) -> None:
    name, data, _ = m
    path = workdir / name  # the same file name: a fleet's name must be its file's stem
    path.write_bytes(data)
    COUNTS["fleet files"] += 1
    try:
        f = load_fleet(path, CATALOG)
    except ConfigError as e:
        config_error_ok(e, path)
        return
    COUNTS["fleet files loaded"] += 1
    if not buildable(f):
        COUNTS["fleet files loaded, too big to build"] += 1
        return
    twin = new_twin(f, CATALOG, seed=1)
    core.run_until(twin.state, twin.params, 0.5, max_dt=0.1)
    core.check_conservation(twin.state)


@settings(max_examples=300, deadline=None)
@given(m=mutations(CATALOG_FILES))
def test_mutated_catalog_files(workdir: Path, m: tuple[str, bytes, list[str]]) -> None:
    name, data, _ = m
    d = workdir / "catalog"
    d.mkdir(exist_ok=True)
    for other, original in CATALOG_FILES.items():
        (d / other).write_bytes(data if other == name else original)
    COUNTS["catalog files"] += 1
    clear_catalog_cache()
    try:
        cat = load_catalog(d)
    except ConfigError as e:
        one_line(str(e))
        assert str(d) in str(e), str(e)
        return
    finally:
        clear_catalog_cache()
    COUNTS["catalog files loaded"] += 1
    for fleet_name in ("aws-cerebras", "nvidia-lpx"):  # the fleets against the mutated catalog
        try:
            load_fleet(resolve_fleet_path(fleet_name), cat)
        except ConfigError as e:
            one_line(str(e))


@settings(max_examples=600, deadline=None)
@given(m=mutations(SCENARIO_FILES))
def test_mutated_scenario_files(workdir: Path, m: tuple[str, bytes, list[str]]) -> None:
    name, data, _ = m
    d = workdir / "scenarios"
    d.mkdir(exist_ok=True)
    path = d / name
    path.write_bytes(data)
    COUNTS["scenario files"] += 1
    try:
        plan = load_plan(path, catalog=CATALOG)
    except ConfigError as e:
        config_error_ok(e, path)
        return
    assert isinstance(plan, Plan | ComparePlan)
    COUNTS["scenario files loaded"] += 1


@pytest.mark.parametrize("opener,closer", [("[", "]"), ("{ a = ", " }")], ids=["array", "table"])
def test_deeply_nested_toml_is_a_config_error(workdir: Path, opener: str, closer: str) -> None:
    """tomllib recurses once per level: ~1000 levels (a 3 KB file) exhaust Python's stack."""
    value = deep(1500, opener, closer, "1")
    path = workdir / "aws-cerebras.toml"
    path.write_bytes(f"x = {value}\n".encode() + FLEET_FILES["aws-cerebras.toml"])
    with pytest.raises(ConfigError) as e:
        load_fleet(path, CATALOG)
    config_error_ok(e.value, path)
    scenario = workdir / "scenarios" / "deep.toml"
    scenario.parent.mkdir(exist_ok=True)
    scenario.write_text(f"x = {value}\n")
    with pytest.raises(ConfigError) as e:
        load_plan(scenario, catalog=CATALOG)
    config_error_ok(e.value, scenario)


def test_shipped_files_are_untouched() -> None:
    """The mutations worked on copies."""
    assert _sources(fleets_dir(), sorted(FLEET_FILES)) == FLEET_FILES
    assert _sources(scenarios_dir(), sorted(SCENARIO_FILES)) == SCENARIO_FILES


# ------------------------------------------------------------------------------------------------
# the same through a real broker: `fleet-twin serve`'s path (MQTT -> bridge -> engine -> reply)

#: Values for numeric fields over MQTT: wrong types, out of range, and a few small valid ones (a
#: valid rate of 1e5 would flood a twin running on the wall clock).
MQTT_NUMBERS: list[Any] = [-1, 0, 0.5, 2, 30, 1e6, 1e308, -1e308, "1", None, [], {}, True, 1e400]
MQTT_FIELDS: dict[str, list[Any]] = {
    "target": [*TARGETS, 5, None],
    "link": [*LINKS, "", "x->y", 3],
    "policy": [*T.POLICIES, "", "random", None],
    "weights": [{}, {"trn3-prefill": 2.0}, {"nope": 1}, {"trn2-prefill": -1}, {"a": "b"}, []],
    "factor": MQTT_NUMBERS,
    "rate_per_s": MQTT_NUMBERS,
    "duration_s": MQTT_NUMBERS,
    "speed": MQTT_NUMBERS,
    "id": ["", "x", 7, None, "é" * 50],
    "reply_to": ["", "#", "a/+/b", "fleet-twin/v1/aws-cerebras/cmd", "\x00"],
    "schema": [1, 2, -1, "1"],
}


def mqtt_payloads(n: int, seed: int) -> list[bytes]:
    """Hostile payloads from a seeded generator (hypothesis cannot drive one broker session)."""
    import random

    rnd = random.Random(seed)
    out: list[bytes] = [
        *NESTED,
        '{"cmd":"fail","target":"cerebras-decode/0/²","id":"sup"}'.encode(),
        b'{"cmd":"pause","id":"' + b"x" * MAX + b'"}',  # oversized
        b"",
        b"\x00" * 16,
        b"null",
        b"\xef\xbb\xbf{}",
        b'{"cmd":"fail","target":"a","cmd":"pause"}',
    ]

    def value(depth: int = 0) -> Any:
        k = rnd.randrange(7 if depth < 3 else 4)
        if k == 0:
            return rnd.choice([None, True, False])
        if k == 1:
            return rnd.choice([0, -1, 2**63, 1.5, -1e300])
        if k == 2:
            return "".join(chr(rnd.randrange(1, 0x3000)) for _ in range(rnd.randrange(12)))
        if k == 3:
            return rnd.choice(TARGETS)
        if k in (4, 5):
            return [value(depth + 1) for _ in range(rnd.randrange(4))]
        return {str(value(depth + 1)): value(depth + 1) for _ in range(rnd.randrange(4))}

    while len(out) < n:
        k = rnd.randrange(3)
        if k == 0:
            out.append(rnd.randbytes(rnd.randrange(200)))
        elif k == 1:
            out.append(json.dumps(value()).encode())
        else:
            d: dict[str, Any] = {"cmd": rnd.choice([*T.COMMAND_KINDS, "", "FAIL", "reboot"])}
            for key in rnd.sample(sorted(MQTT_FIELDS), rnd.randrange(1, 5)):
                d[key] = rnd.choice(MQTT_FIELDS[key])
            text = json.dumps(d, allow_nan=True).replace("Infinity", "1e400")
            out.append(text.encode())
    return out


async def test_hostile_payloads_through_a_real_broker(broker: Any) -> None:
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from twin.mqtt import MqttBridge

    payloads = mqtt_payloads(500, seed=7)
    root = T.topic_root(FLEET)
    reply_topic = root + "reply/hostile"
    engine = Engine(new_twin(FLEET_OBJ, CATALOG, seed=2), speed=20.0, catalog=CATALOG)
    bridge = MqttBridge(engine, broker.url)
    tasks = [asyncio.create_task(engine.run()), asyncio.create_task(bridge.run())]
    replies: dict[int, T.Reply] = {}
    try:
        await bridge.wait_connected(10)
        async with aiomqtt.Client(
            "127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5, timeout=10
        ) as client:
            await client.subscribe(reply_topic, qos=1)
            await client.subscribe(root + "summary", qos=0)

            async def read() -> None:
                async for m in client.messages:
                    msg = T.decode_message(m.payload if isinstance(m.payload, bytes) else b"")
                    cid = getattr(m.properties, "CorrelationData", None)
                    if isinstance(msg, T.Reply) and cid is not None:
                        replies[int(cid)] = msg

            reader = asyncio.create_task(read())
            try:
                for i, payload in enumerate(payloads):
                    props = Properties(PacketTypes.PUBLISH)
                    props.ResponseTopic = reply_topic
                    props.CorrelationData = str(i).encode()
                    await client.publish(T.command_topic(FLEET), payload, qos=1, properties=props)
                    COUNTS["payloads (real broker)"] += 1
                deadline = time.monotonic() + 30
                while len(replies) < len(payloads):
                    missing = sorted(set(range(len(payloads))) - replies.keys())
                    assert time.monotonic() < deadline, (
                        len(missing),
                        [payloads[i][:80] for i in missing[:5]],
                        reader.exception() if reader.done() else None,
                    )
                    assert not any(t.done() for t in tasks), [
                        t.exception() for t in tasks if t.done()
                    ]
                    await asyncio.sleep(0.05)
                for fix in (T.SetSpeed(speed=20.0, id="s"), T.Resume(id="r")):
                    props = Properties(PacketTypes.PUBLISH)
                    props.ResponseTopic = reply_topic
                    props.CorrelationData = str(len(replies)).encode()
                    await client.publish(
                        T.command_topic(FLEET), T.encode(fix), qos=1, properties=props
                    )
                t0 = engine.sim_time_s
                async with asyncio.timeout(20):
                    while engine.sim_time_s <= t0 + 1.0:
                        assert not any(t.done() for t in tasks), [
                            t.exception() for t in tasks if t.done()
                        ]
                        await asyncio.sleep(0.05)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await reader
        for reply in replies.values():
            assert reply.ok or (reply.error and "\n" not in reply.error), reply
        assert sum(not r.ok for r in replies.values()) > len(payloads) // 2
        assert bridge.connected and engine.running
        check_state(engine)
    finally:
        engine.stop()
        bridge.stop()
        await asyncio.wait(tasks, timeout=20)
