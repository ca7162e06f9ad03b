"""Wire schemas v1: every message and command round-trips, the committed v1 samples still decode,
and every bad command payload is refused with one line naming the field.

`python tests/test_telemetry.py` writes any v1 sample that is missing from tests/data/telemetry_v1
(it never overwrites one: the committed files are what v1 consumers send and receive).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from twin import routing, telemetry
from twin.telemetry import CommandError

SAMPLES_DIR = Path(__file__).resolve().parent / "data" / "telemetry_v1"
TS = 1_767_225_600_000

MESSAGES: dict[str, telemetry.Message] = {
    "status": telemetry.Status(ts_ms=TS, fleet="nvidia-groq", state="online", run_id="3f2a9c1d"),
    "meta": telemetry.Meta(
        ts_ms=TS,
        fleet="nvidia-groq",
        run_id="3f2a9c1d",
        model="llama-3.1-70b",
        slo_ttft_s=2.0,
        slo_tpot_s=0.05,
        tiers=[
            telemetry.TierMeta(
                name="h100-prefill",
                role="prefill",
                system="h100-sxm",
                vendor="NVIDIA",
                system_name="H100 SXM5",
                host_system="",
                instances=2,
                chips_per_instance=8,
                chips=16,
                precision="fp8",
                estimated=True,
                figures={
                    "fp8_tflops": telemetry.FigureMeta(
                        value=1979.0,
                        provenance="published",
                        source="https://glennklockwood.com/garden/processors/h100",
                    ),
                    "idle_w": telemetry.FigureMeta(
                        value=90.0, provenance="estimate", source="estimate: ~13% of TDP"
                    ),
                },
            )
        ],
        links=[
            telemetry.LinkMeta(
                name="h100-prefill->groq-decode",
                src="h100-prefill",
                dst="groq-decode",
                bandwidth_gbps=800.0,
                latency_us=20.0,
            )
        ],
        units={"_s": "s", "_w": "W", "tokens_per_s": "tokens/s"},
    ),
    "summary": telemetry.Summary(
        ts_ms=TS,
        sim_time_s=20.0,
        lag_s=0.0,
        speed=1.0,
        paused=False,
        arrivals_per_s=19.5,
        rate_per_s=20.0,
        arrived=408,
        done=384,
        rejected=0,
        rejected_no_capacity=0,
        rejected_retry_budget=0,
        in_flight=24,
        retries=0,
        tokens_per_s=6810.2,
        prefill_tokens_per_s=31368.7,
        ttft_p50_s=0.024,
        ttft_p99_s=0.149,
        tpot_p50_s=0.0041,
        tpot_p99_s=0.0041,
        goodput_fraction=1.0,
        power_w=75988.3,
        tokens_per_joule=0.0896,
        policy="least_loaded",
        dropped_snapshots=0,
        links=[
            telemetry.LinkStat(
                name="h100-prefill->groq-decode", gbps=5.05, moving=1, waiting=0, factor=1.0
            )
        ],
    ),
    "tier": telemetry.Tier(
        ts_ms=TS,
        tier="groq-decode",
        role="decode",
        instances=2,
        instances_up=2,
        instances_draining=0,
        queue=0,
        batch=24,
        utilisation=0.0037,
        tokens_per_s=6790.2,
        prefill_tokens_per_s=0.0,
        kv_used_fraction=0.09,
        power_w=70142.1,
        tokens_per_joule=0.0968,
        ttft_p50_s=0.024,
        ttft_p99_s=0.149,
        tpot_p50_s=0.0041,
        tpot_p99_s=-1.0,
    ),
    "chips": telemetry.Chips(
        ts_ms=TS,
        tier="h100-prefill",
        ids=["h100-prefill/0/0", "h100-prefill/0/1", "h100-prefill/1/0", "h100-prefill/1/1"],
        instance=[0, 0, 1, 1],
        state=["up", "up", "failed", "draining"],
        utilisation=[0.33, 0.33, 0.0, 0.1],
        power_w=[293.0, 293.0, 0.0, 151.0],
    ),
    "event": telemetry.Event(
        ts_ms=TS,
        sim_time_s=20.0,
        event="chip_failed",
        severity="error",
        target="groq-decode/0",
        detail="instance groq-decode/0 (576 chips) failed; instance groq-decode/0 down",
    ),
    "reply": telemetry.Reply(
        ts_ms=TS, id="op-17", ok=False, error="factor: expected a number in (0, 1], got 1.5"
    ),
}

COMMANDS: dict[str, telemetry.Command] = {
    "fail": telemetry.Fail(id="op-1", target="groq-decode/0"),
    "recover": telemetry.Recover(id="op-2", target="groq-decode/0/17"),
    "drain": telemetry.Drain(id="op-3", target="h100-prefill/1"),
    "degrade_link": telemetry.DegradeLink(id="op-4", link="h100-prefill->groq-decode", factor=0.25),
    "restore_link": telemetry.RestoreLink(id="op-5", link="h100-prefill->groq-decode"),
    "set_rate": telemetry.SetRate(id="op-6", rate_per_s=40.0),
    "burst": telemetry.Burst(id="op-7", factor=3.0, duration_s=10.0),
    "set_routing": telemetry.SetRouting(
        id="op-8", policy="weighted", weights={"h100-prefill": 2.0, "b200-prefill": 1.0}
    ),
    "pause": telemetry.Pause(id="op-9", reply_to="fleet-twin/v1/nvidia-groq/reply/console-1"),
    "resume": telemetry.Resume(id="op-10"),
    "set_speed": telemetry.SetSpeed(id="op-11", speed=10.0),
    "run_scenario": telemetry.RunScenario(id="op-12", name="nvidia-groq-lose-prefill"),
    "stop_scenario": telemetry.StopScenario(id="op-13"),
}


def _kind(obj: telemetry.Message | telemetry.Command) -> str:
    return str(obj.__struct_config__.tag)


def _sample_path(name: str) -> Path:
    return SAMPLES_DIR / f"{name}.json"


def _all_sample_names() -> list[str]:
    return [f"message-{k}" for k in MESSAGES] + [f"cmd-{k}" for k in COMMANDS]


# ------------------------------------------------------------------------------------------------
# round trips


def test_every_kind_has_a_sample() -> None:
    assert tuple(MESSAGES) == telemetry.MESSAGE_KINDS
    assert tuple(COMMANDS) == telemetry.COMMAND_KINDS
    assert all(_kind(m) == k for k, m in MESSAGES.items())
    assert all(_kind(c) == k for k, c in COMMANDS.items())


@pytest.mark.parametrize("kind", list(MESSAGES))
def test_message_round_trip(kind: str) -> None:
    msg = MESSAGES[kind]
    data = telemetry.encode(msg)
    assert telemetry.decode_message(data) == msg
    raw = json.loads(data)
    assert raw["kind"] == kind
    assert raw["schema"] == 1
    assert raw["ts_ms"] == TS


@pytest.mark.parametrize("kind", list(COMMANDS))
def test_command_round_trip(kind: str) -> None:
    cmd = COMMANDS[kind]
    data = telemetry.encode(cmd)
    assert telemetry.decode_command(data) == cmd
    assert json.loads(data)["cmd"] == kind


def test_minimal_commands_need_only_their_fields() -> None:
    """What a Node-RED flow or mosquitto_pub would send: no id, no schema, no ts_ms."""
    cmd = telemetry.decode_command(b'{"cmd":"set_rate","rate_per_s":5}')
    assert cmd == telemetry.SetRate(rate_per_s=5.0)
    assert telemetry.decode_command('{"cmd":"pause"}') == telemetry.Pause()
    routing_cmd = telemetry.decode_command(b'{"cmd":"set_routing","policy":"round_robin"}')
    assert routing_cmd == telemetry.SetRouting(policy="round_robin", weights={})


def test_unknown_fields_are_ignored() -> None:
    """A newer sender may add fields (schema evolution: new fields get defaults)."""
    cmd = telemetry.decode_command(b'{"cmd":"fail","target":"a/0","new_field":[1,2]}')
    assert cmd == telemetry.Fail(target="a/0")
    data = json.loads(telemetry.encode(MESSAGES["status"]))
    data["added_in_v1_1"] = {"x": 1}
    assert telemetry.decode_message(json.dumps(data).encode()) == MESSAGES["status"]


# Fields added to v1 after the first samples were committed: (kind, field, default, a value).
ADDED_FIELDS = [
    ("meta", "scenarios", [], ["nvidia-groq-lose-prefill"]),
    ("summary", "base_rate_per_s", -1.0, 16.0),
    ("summary", "weights", {}, {"h100-prefill": 2.0, "b200-prefill": 1.0, "groq-decode": 1.0}),
    ("tier", "sim_time_s", -1.0, 20.0),
    ("chips", "sim_time_s", -1.0, 20.0),
]


@pytest.mark.parametrize(
    ("kind", "field", "default", "value"), ADDED_FIELDS, ids=lambda x: str(x)[:20]
)
def test_added_fields_round_trip_and_default(
    kind: str, field: str, default: Any, value: Any
) -> None:
    """A field added to v1 comes last, has a default, round-trips, and is absent from the older
    committed sample, which still decodes (to the default)."""
    msg = MESSAGES[kind]
    fields = msgspec.structs.fields(type(msg))
    names = [f.name for f in fields]
    added = [f for k, f, _d, _v in ADDED_FIELDS if k == kind]
    assert names[-len(added) :] == added  # appended, in order
    assert getattr(msg, field) == default
    new = msgspec.structs.replace(msg, **{field: value})
    data = telemetry.encode(new)
    assert json.loads(data)[field] == value
    assert telemetry.decode_message(data) == new
    old = json.loads(_sample_path(f"message-{kind}").read_bytes())
    assert field not in old  # the sample predates the field
    decoded = telemetry.decode_message(json.dumps(old).encode())
    assert getattr(decoded, field) == default


def test_a_v1_consumer_reads_a_newer_summary() -> None:
    """An old consumer's decoder (v1 fields only) ignores the added fields."""

    class OldSummary(msgspec.Struct, kw_only=True):
        kind: str
        sim_time_s: float
        rate_per_s: float

    full = msgspec.structs.replace(
        MESSAGES["summary"], base_rate_per_s=16.0, weights={"groq-decode": 1.0}
    )
    old = msgspec.json.decode(telemetry.encode(full), type=OldSummary)
    assert (old.kind, old.sim_time_s, old.rate_per_s) == ("summary", 20.0, 20.0)


def test_structs_are_frozen() -> None:
    summary = MESSAGES["summary"]
    assert isinstance(summary, telemetry.Summary)
    with pytest.raises(AttributeError):
        summary.sim_time_s = 1.0  # type: ignore[misc]
    fail = COMMANDS["fail"]
    assert isinstance(fail, telemetry.Fail)
    with pytest.raises(AttributeError):
        fail.target = "x"  # type: ignore[misc]


def test_policies_match_the_router() -> None:
    assert telemetry.POLICIES == routing.POLICIES


# ------------------------------------------------------------------------------------------------
# committed v1 samples


@pytest.mark.parametrize("name", _all_sample_names())
def test_committed_v1_sample_decodes(name: str) -> None:
    path = _sample_path(name)
    assert path.is_file(), f"{path} is missing (run: python tests/test_telemetry.py)"
    data = path.read_bytes()
    obj: telemetry.Message | telemetry.Command
    if name.startswith("cmd-"):
        obj = telemetry.decode_command(data)
        expected: telemetry.Message | telemetry.Command = COMMANDS[name.removeprefix("cmd-")]
    else:
        obj = telemetry.decode_message(data)
        expected = MESSAGES[name.removeprefix("message-")]
    assert obj == expected
    # every field of the v1 sample is still a field of the struct, with the same JSON type
    raw = json.loads(data)
    again = json.loads(telemetry.encode(obj))
    for key, value in raw.items():
        assert key in again, f"{name}: field {key!r} disappeared"
        assert type(again[key]) is type(value) or {type(again[key]), type(value)} <= {int, float}


def test_no_stray_samples() -> None:
    on_disk = sorted(p.stem for p in SAMPLES_DIR.glob("*.json"))
    assert on_disk == sorted(_all_sample_names())


# ------------------------------------------------------------------------------------------------
# bad payloads


def _error(payload: bytes | str) -> str:
    with pytest.raises(CommandError) as err:
        telemetry.decode_command(payload)
    msg = str(err.value)
    assert "\n" not in msg
    assert "Traceback" not in msg
    return msg


@pytest.mark.parametrize(
    ("payload", "starts", "contains"),
    [
        (b"not json", "payload: ", "not valid JSON"),
        (b'{"cmd":"fail","target":', "payload: ", "not valid JSON"),
        (b"[1, 2]", "payload: ", "expected a JSON object"),
        (b'"fail"', "payload: ", "expected a JSON object"),
        (b"{}", "cmd: ", "missing required field"),
        (b'{"cmd":"explode"}', "cmd: ", "unknown command 'explode'"),
        (b'{"cmd":7}', "cmd: ", "expected a string"),
        (b'{"cmd":"fail"}', "target: ", "missing required field"),
        (b'{"cmd":"fail","target":3}', "target: ", "expected a string, got an integer"),
        (b'{"cmd":"degrade_link","link":"a->b"}', "factor: ", "missing required field"),
        (b'{"cmd":"degrade_link","link":"a->b","factor":"half"}', "factor: ", "expected a number"),
        (b'{"cmd":"degrade_link","link":"a->b","factor":1.5}', "factor: ", "(0, 1]"),
        (b'{"cmd":"degrade_link","link":"a->b","factor":0}', "factor: ", "(0, 1]"),
        (b'{"cmd":"degrade_link","link":"","factor":0.5}', "link: ", "empty"),
        (b'{"cmd":"set_rate","rate_per_s":-1}', "rate_per_s: ", "got -1"),
        (b'{"cmd":"set_rate","rate_per_s":1e999}', "rate_per_s: ", "out of range"),
        (b'{"cmd":"set_rate","rate_per_s":1e9}', "rate_per_s: ", "got 1000000000"),
        (b'{"cmd":"set_rate","rate_per_s":true}', "rate_per_s: ", "expected a number"),
        (b'{"cmd":"burst","factor":0.5,"duration_s":1}', "factor: ", "[1,"),
        (b'{"cmd":"burst","factor":2,"duration_s":0}', "duration_s: ", "(0,"),
        (b'{"cmd":"set_routing","policy":"random"}', "policy: ", "unknown routing policy"),
        (b'{"cmd":"set_routing","policy":"weighted","weights":[1]}', "weights: ", "an object"),
        (
            b'{"cmd":"set_routing","policy":"weighted","weights":{"a":1,"b":"x"}}',
            "weights.b: ",
            "expected a number",
        ),
        (
            b'{"cmd":"set_routing","policy":"weighted","weights":{"a":-1}}',
            "weights.a: ",
            ">= 0",
        ),
        (b'{"cmd":"set_speed","speed":-2}', "speed: ", "got -2"),
        (b'{"cmd":"set_speed","speed":"fast"}', "speed: ", "expected a number"),
        (b'{"cmd":"pause","id":5}', "id: ", "expected a string"),
        (b'{"cmd":"run_scenario"}', "name: ", "missing required field"),
        (b'{"cmd":"run_scenario","name":" "}', "name: ", "empty string"),
        (b'{"cmd":"run_scenario","name":7}', "name: ", "expected a string"),
    ],
)
def test_bad_payload_is_one_line_naming_the_field(
    payload: bytes, starts: str, contains: str
) -> None:
    msg = _error(payload)
    assert msg.startswith(starts), msg
    assert contains in msg, msg


def test_oversized_payload_is_refused_before_decoding() -> None:
    big = b'{"cmd":"pause","id":"' + b"x" * telemetry.MAX_PAYLOAD_BYTES + b'"}'
    msg = _error(big)
    assert msg.startswith("payload: ") and str(telemetry.MAX_PAYLOAD_BYTES) in msg
    # even broken JSON of that size is refused by size, not parsed
    msg = _error(b"[" * (telemetry.MAX_PAYLOAD_BYTES + 1))
    assert "limit" in msg
    assert telemetry.peek_envelope(big) == telemetry.Envelope()


def test_in_process_commands_are_range_checked_too() -> None:
    with pytest.raises(CommandError, match=r"^factor: "):
        telemetry.check_command(telemetry.DegradeLink(link="a->b", factor=float("nan")))
    with pytest.raises(CommandError, match=r"^speed: "):
        telemetry.check_command(telemetry.SetSpeed(speed=float("inf")))
    with pytest.raises(CommandError, match=r"^target: "):
        telemetry.check_command(telemetry.Fail(target=""))
    for cmd in COMMANDS.values():
        telemetry.check_command(cmd)


def test_envelope_is_read_from_bad_commands() -> None:
    env = telemetry.peek_envelope(b'{"cmd":"explode","id":"op-9","reply_to":"x/y"}')
    assert env == telemetry.Envelope(id="op-9", reply_to="x/y")
    assert telemetry.peek_envelope(b"garbage") == telemetry.Envelope()
    assert telemetry.peek_envelope(b'{"id": 5}') == telemetry.Envelope()


def test_decode_message_rejects_garbage() -> None:
    with pytest.raises(msgspec.DecodeError):
        telemetry.decode_message(b'{"kind":"nonsense"}')
    with pytest.raises(msgspec.DecodeError):
        telemetry.decode_message(b"{")


# ------------------------------------------------------------------------------------------------
# topics


def test_topics_follow_the_design_table() -> None:
    root = telemetry.topic_root("nvidia-groq")
    assert root == "fleet-twin/v1/nvidia-groq/"
    T = telemetry.TOPICS
    assert (T["status"].retained, T["status"].qos) == (True, 1)
    assert (T["meta"].retained, T["meta"].qos) == (True, 1)
    assert (T["summary"].retained, T["summary"].qos) == (False, 0)
    assert (T["tier"].retained, T["tier"].qos) == (False, 0)
    assert (T["chips"].retained, T["chips"].qos) == (False, 0)
    assert (T["event"].retained, T["event"].qos) == (False, 1)
    assert (T["cmd"].retained, T["cmd"].qos) == (False, 1)
    assert telemetry.command_topic("nvidia-groq") == root + "cmd"
    expected = {
        "status": root + "status",
        "meta": root + "meta",
        "summary": root + "summary",
        "tier": root + "tier/groq-decode",
        "chips": root + "chips/h100-prefill",
        "event": root + "event",
    }
    for kind, topic in expected.items():
        assert telemetry.topic_for(MESSAGES[kind], "nvidia-groq") == topic
    with pytest.raises(ValueError):
        telemetry.topic_for(MESSAGES["reply"], "nvidia-groq")


# ------------------------------------------------------------------------------------------------
# writing the samples (once)


def write_missing_samples() -> list[Path]:
    SAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    written = []
    objs: dict[str, telemetry.Message | telemetry.Command] = {
        **{f"message-{k}": v for k, v in MESSAGES.items()},
        **{f"cmd-{k}": v for k, v in COMMANDS.items()},
    }
    for name, obj in objs.items():
        path = _sample_path(name)
        if path.exists():
            continue
        path.write_bytes(msgspec.json.format(telemetry.encode(obj), indent=2) + b"\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_missing_samples():
        sys.stdout.write(f"wrote {p}\n")
