"""Wire schemas of the live twin (schema v1): telemetry messages out, commands in.

msgspec only: no numpy, asyncio, aiomqtt or Textual here, so that consumers (the console, MQTT
bridges, tests) can read the twin's messages without pulling in the simulation.

Every message is a frozen, keyword-only msgspec Struct in a tagged union whose tag field is `kind`
("status", "meta", "summary", "tier", "chips", "event", "reply"); every command is one in a union
tagged by `cmd` ("fail", "recover", "drain", "degrade_link", "restore_link", "set_rate", "burst",
"set_routing", "pause", "resume", "set_speed", "run_scenario", "stop_scenario"). All carry
`schema` (1) and `ts_ms` (wall clock, milliseconds since the epoch; optional on commands). The
payloads are flat JSON objects of numbers and strings: "no data" is -1.0, never NaN or null.
docs/live-contract.md is the contract.

Schema evolution (what keeps old consumers working):

- A new field always gets a default and goes at the end of its Struct.
- No field is ever removed, renamed, reordered or given another type.
- A `kind` or `cmd` tag never changes meaning; new messages and commands get new tags.
- `schema` (and the `v1` in the topic root) is bumped only for a change that breaks these rules.
- Decoders ignore fields they do not know, so a newer sender can talk to an older receiver.

Errors: `decode_command` raises `CommandError` whose message is one line naming the field
(`factor: expected a number, got a string`); a payload larger than MAX_PAYLOAD_BYTES is refused
before it is parsed. `decode_message` raises `msgspec.DecodeError` (ValidationError is a subclass);
a consumer should skip such a message (it may be of a newer kind).
"""

from __future__ import annotations

import math
import re
from typing import Literal, NamedTuple

import msgspec

__all__ = [
    "COMMAND_KINDS",
    "MAX_PAYLOAD_BYTES",
    "MESSAGE_KINDS",
    "NO_DATA",
    "POLICIES",
    "REPLY_QOS",
    "SCHEMA",
    "TOPICS",
    "Burst",
    "Chips",
    "Command",
    "CommandError",
    "DegradeLink",
    "Drain",
    "Envelope",
    "Event",
    "Fail",
    "FigureMeta",
    "LinkMeta",
    "LinkStat",
    "Message",
    "Meta",
    "Pause",
    "Recover",
    "Reply",
    "RestoreLink",
    "Resume",
    "RunScenario",
    "SetRate",
    "SetRouting",
    "SetSpeed",
    "Status",
    "StopScenario",
    "Summary",
    "Tier",
    "TierMeta",
    "TopicSpec",
    "check_command",
    "command_topic",
    "decode_command",
    "decode_message",
    "encode",
    "peek_envelope",
    "topic_for",
    "topic_root",
]

SCHEMA = 1
#: Commands larger than this are refused before decoding.
MAX_PAYLOAD_BYTES = 64 * 1024
#: The value of a figure that has no data yet (JSON has no NaN).
NO_DATA = -1.0

# Limits that keep a command from wrecking the twin (e.g. a million requests per second). They are
# far beyond any sensible operator setting.
MAX_RATE_PER_S = 100_000.0
MAX_BURST_FACTOR = 1000.0
MAX_DURATION_S = 7 * 86_400.0
MAX_SPEED = 100_000.0

#: Routing policies (the same tuple as twin.routing.POLICIES, which this module may not import).
POLICIES: tuple[str, ...] = (
    "round_robin",
    "least_loaded",
    "latency_aware",
    "power_aware",
    "weighted",
)

Severity = Literal["info", "warning", "error"]
ChipState = Literal["up", "failed", "draining"]


# ------------------------------------------------------------------------------------------------
# messages (tag field "kind")


class _Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    schema: int = SCHEMA
    ts_ms: int


class Status(_Message, tag="status", frozen=True, kw_only=True):
    """Retained; `offline` is also the MQTT Last Will."""

    fleet: str
    state: Literal["online", "offline"]
    run_id: str


class FigureMeta(msgspec.Struct, frozen=True, kw_only=True):
    """One hardware figure: value, provenance (published|derived|estimate|fitted) and source."""

    value: float
    provenance: str
    source: str


class TierMeta(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: str
    system: str
    vendor: str
    system_name: str
    host_system: str  # "" unless the tier is composite (KV on host chips)
    instances: int
    chips_per_instance: int
    chips: int  # total, kv-host chips included
    precision: str
    estimated: bool  # any hardware figure of its systems is an estimate
    figures: dict[str, FigureMeta]  # "hbm.capacity_gb", ...; host figures as "kv_host.<name>"


class LinkMeta(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # "<from>-><to>"
    src: str
    dst: str
    bandwidth_gbps: float
    latency_us: float


class Meta(_Message, tag="meta", frozen=True, kw_only=True):
    """Retained topology: tiers, links, hardware with provenance, SLOs, units."""

    fleet: str
    run_id: str
    model: str
    slo_ttft_s: float
    slo_tpot_s: float
    tiers: list[TierMeta]
    links: list[LinkMeta]
    units: dict[str, str]
    #: Scenarios a `run_scenario` command may name: the shipped ones written for this fleet
    #: (empty when the twin has no scenario runner).
    scenarios: list[str] = []


class LinkStat(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    gbps: float  # GB/s of KV moved, averaged over the rate window
    moving: int  # transfers moving bytes
    waiting: int  # transfers waiting for KV room on their target
    factor: float  # bandwidth factor (1 = healthy)


class Summary(_Message, tag="summary", frozen=True, kw_only=True):
    """Fleet totals, 4-10 Hz. Latency and goodput over the last window of simulated time."""

    sim_time_s: float
    lag_s: float
    speed: float
    paused: bool
    arrivals_per_s: float
    rate_per_s: float
    arrived: int
    done: int
    rejected: int
    rejected_no_capacity: int
    rejected_retry_budget: int
    in_flight: int
    retries: int
    tokens_per_s: float
    prefill_tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    goodput_fraction: float
    power_w: float
    tokens_per_joule: float
    policy: str
    dropped_snapshots: int
    links: list[LinkStat]
    #: The arrival rate set (`set_rate`) before any burst multiplier; -1 for a trace or a
    #: closed loop, which have no rate. `rate_per_s` is what is offered now, bursts included.
    base_rate_per_s: float = NO_DATA
    #: The router's share of each tier (tier name -> weight; `weighted` routing reads them).
    weights: dict[str, float] = {}


class Tier(_Message, tag="tier", frozen=True, kw_only=True):
    """One tier, 2-4 Hz."""

    tier: str
    role: str
    instances: int
    instances_up: int
    instances_draining: int
    queue: int
    batch: int
    utilisation: float
    tokens_per_s: float
    prefill_tokens_per_s: float
    kv_used_fraction: float
    power_w: float
    tokens_per_joule: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    #: The simulated time of this snapshot (-1 from a twin that predates the field).
    sim_time_s: float = NO_DATA


class Chips(_Message, tag="chips", frozen=True, kw_only=True):
    """Per-chip arrays of one tier, 1 Hz (one message per tier, not per chip)."""

    tier: str
    ids: list[str]
    instance: list[int]  # k of "<tier>/<k>"
    state: list[str]  # "up" | "failed" | "draining"
    utilisation: list[float]
    power_w: list[float]
    #: The simulated time of this snapshot (-1 from a twin that predates the field).
    sim_time_s: float = NO_DATA


class Event(_Message, tag="event", frozen=True, kw_only=True):
    sim_time_s: float
    event: str
    severity: Severity
    target: str
    detail: str


class Reply(_Message, tag="reply", frozen=True, kw_only=True):
    """The answer to one command (errors included); `id` echoes the command's id."""

    id: str
    ok: bool
    error: str = ""
    detail: str = ""
    sim_time_s: float = 0.0


Message = Status | Meta | Summary | Tier | Chips | Event | Reply
MESSAGE_KINDS: tuple[str, ...] = ("status", "meta", "summary", "tier", "chips", "event", "reply")


# ------------------------------------------------------------------------------------------------
# commands (tag field "cmd")


class _Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="cmd"):
    id: str = ""
    reply_to: str = ""  # MQTT 3.1.1 fallback for the MQTT 5 response topic
    schema: int = SCHEMA
    ts_ms: int = 0


class Fail(_Command, tag="fail", frozen=True, kw_only=True):
    target: str  # chip "<tier>/<k>/<j>" or instance "<tier>/<k>"


class Recover(_Command, tag="recover", frozen=True, kw_only=True):
    target: str


class Drain(_Command, tag="drain", frozen=True, kw_only=True):
    target: str


class DegradeLink(_Command, tag="degrade_link", frozen=True, kw_only=True):
    link: str  # "<from>-><to>"
    factor: float  # (0, 1]


class RestoreLink(_Command, tag="restore_link", frozen=True, kw_only=True):
    link: str


class SetRate(_Command, tag="set_rate", frozen=True, kw_only=True):
    rate_per_s: float  # >= 0


class Burst(_Command, tag="burst", frozen=True, kw_only=True):
    factor: float  # >= 1
    duration_s: float  # > 0


class SetRouting(_Command, tag="set_routing", frozen=True, kw_only=True):
    policy: str
    weights: dict[str, float] = {}  # tier name -> share; tiers not named keep theirs


class Pause(_Command, tag="pause", frozen=True, kw_only=True):
    pass


class Resume(_Command, tag="resume", frozen=True, kw_only=True):
    pass


class SetSpeed(_Command, tag="set_speed", frozen=True, kw_only=True):
    speed: float  # > 0: x real time; 0: as fast as possible


class RunScenario(_Command, tag="run_scenario", frozen=True, kw_only=True):
    """Run a shipped chaos scenario on the live twin (one of `Meta.scenarios`)."""

    name: str


class StopScenario(_Command, tag="stop_scenario", frozen=True, kw_only=True):
    """Stop the running scenario; its rollbacks run."""


Command = (
    Fail
    | Recover
    | Drain
    | DegradeLink
    | RestoreLink
    | SetRate
    | Burst
    | SetRouting
    | Pause
    | Resume
    | SetSpeed
    | RunScenario
    | StopScenario
)
COMMAND_KINDS: tuple[str, ...] = (
    "fail",
    "recover",
    "drain",
    "degrade_link",
    "restore_link",
    "set_rate",
    "burst",
    "set_routing",
    "pause",
    "resume",
    "set_speed",
    "run_scenario",
    "stop_scenario",
)


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """What can be read from a command payload even when the command itself is bad."""

    id: str = ""
    reply_to: str = ""


# ------------------------------------------------------------------------------------------------
# encoding and decoding (one module-level encoder and decoder set, reused)

_ENCODER = msgspec.json.Encoder()
_MESSAGE_DECODER = msgspec.json.Decoder(Message)
_COMMAND_DECODER = msgspec.json.Decoder(Command)
_ENVELOPE_DECODER = msgspec.json.Decoder(Envelope)


class CommandError(Exception):
    """A command that cannot be decoded or is out of range. The message is one line naming the
    field, e.g. `factor: expected a number in (0, 1], got 1.5`."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def encode(msg: Message | Command) -> bytes:
    """JSON bytes of a message or command."""
    return _ENCODER.encode(msg)


def decode_message(payload: bytes | str) -> Message:
    """A telemetry message; raises msgspec.DecodeError (or its subclass ValidationError)."""
    return _MESSAGE_DECODER.decode(payload)


def decode_command(payload: bytes | str) -> Command:
    """A command, decoded and range-checked; raises CommandError with a one-line reason."""
    size = len(payload.encode() if isinstance(payload, str) else payload)
    if size > MAX_PAYLOAD_BYTES:
        raise CommandError(f"payload: {size} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        cmd = _COMMAND_DECODER.decode(payload)
    except msgspec.ValidationError as e:
        raise CommandError(_translate(str(e), payload)) from None
    except msgspec.DecodeError as e:
        why = _one_line(str(e)).removeprefix("JSON is malformed: ")
        raise CommandError(f"payload: not valid JSON ({why})") from None
    except RecursionError:
        raise CommandError("payload: nested too deeply") from None
    check_command(cmd)
    return cmd


def peek_envelope(payload: bytes | str) -> Envelope:
    """The `id` and `reply_to` of a payload, best effort (empty when it cannot be read), so that
    even a bad command gets a reply that its sender can match."""
    size = len(payload.encode() if isinstance(payload, str) else payload)
    if size > MAX_PAYLOAD_BYTES:
        return Envelope()
    try:
        return _ENVELOPE_DECODER.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return Envelope()


_TYPE_WORDS = {
    "float": "a number",
    "int": "an integer",
    "str": "a string",
    "bool": "a boolean",
    "object": "an object",
    "array": "an array",
    "null": "null",
}
_AT_RE = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")


def _translate(msg: str, payload: bytes | str) -> str:
    """msgspec's `Expected `float`, got `str` - at `$.factor`` -> `factor: expected a number,
    got a string`."""
    msg = _one_line(msg)
    m = _AT_RE.match(msg)
    what = m.group("what") if m else msg
    path = ((m.group("path") or "") if m else "").removeprefix(".")
    if path.endswith("[...]"):  # a value inside a dict: name its key
        path = _dict_key_path(path.removesuffix("[...]"), payload)
    if mm := re.match(r"Object missing required field `(.+)`", what):
        key = f"{path}.{mm.group(1)}" if path else mm.group(1)
        return f"{key}: missing required field"
    field = path or "payload"
    if path == "cmd" and (im := re.match(r"Invalid value '(.*)'$", what)):
        return f"cmd: unknown command {im.group(1)!r} (expected one of: {', '.join(COMMAND_KINDS)})"
    if tm := re.match(r"Expected `(.+?)`(?:, got `(.+?)`)?$", what):
        exp = " or ".join(_TYPE_WORDS.get(x.strip(), x.strip()) for x in tm.group(1).split("|"))
        if path == "" and tm.group(1) == "object":
            return f"payload: expected a JSON object, got {_TYPE_WORDS.get(tm.group(2), 'other')}"
        got = f", got {_TYPE_WORDS.get(tm.group(2), tm.group(2))}" if tm.group(2) else ""
        return f"{field}: expected {exp}{got}"
    if what == "Number out of range":
        return f"{field}: number out of range"
    return f"{field}: {what[:1].lower()}{what[1:]}"


def _dict_key_path(path: str, payload: bytes | str) -> str:
    """`weights` -> `weights.<the first key whose value is not a number>`."""
    try:
        raw = msgspec.json.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return path
    node = raw.get(path) if isinstance(raw, dict) and "." not in path else None
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                return f"{path}.{k}"
    return path


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _finite(field: str, v: float) -> None:
    if not math.isfinite(v):
        raise CommandError(f"{field}: expected a finite number, got {v}")


def check_command(cmd: Command) -> None:
    """Range checks that need no fleet (the engine checks names against its fleet).

    Raises CommandError naming the field."""
    if isinstance(cmd, Fail | Recover | Drain):
        if not cmd.target:
            raise CommandError("target: expected a chip or instance id, got an empty string")
    elif isinstance(cmd, DegradeLink):
        if not cmd.link:
            raise CommandError("link: expected a link name '<from>-><to>', got an empty string")
        if not (math.isfinite(cmd.factor) and 0.0 < cmd.factor <= 1.0):
            raise CommandError(f"factor: expected a number in (0, 1], got {cmd.factor}")
    elif isinstance(cmd, RestoreLink):
        if not cmd.link:
            raise CommandError("link: expected a link name '<from>-><to>', got an empty string")
    elif isinstance(cmd, SetRate):
        _finite("rate_per_s", cmd.rate_per_s)
        if not 0.0 <= cmd.rate_per_s <= MAX_RATE_PER_S:
            raise CommandError(
                f"rate_per_s: expected a rate in [0, {MAX_RATE_PER_S:g}] requests/s, "
                f"got {cmd.rate_per_s}"
            )
    elif isinstance(cmd, Burst):
        _finite("factor", cmd.factor)
        if not 1.0 <= cmd.factor <= MAX_BURST_FACTOR:
            raise CommandError(
                f"factor: expected a burst factor in [1, {MAX_BURST_FACTOR:g}], got {cmd.factor}"
            )
        _finite("duration_s", cmd.duration_s)
        if not 0.0 < cmd.duration_s <= MAX_DURATION_S:
            raise CommandError(
                f"duration_s: expected seconds in (0, {MAX_DURATION_S:g}], got {cmd.duration_s}"
            )
    elif isinstance(cmd, SetRouting):
        if cmd.policy not in POLICIES:
            raise CommandError(
                f"policy: unknown routing policy {cmd.policy!r} "
                f"(expected one of: {', '.join(POLICIES)})"
            )
        for name, w in cmd.weights.items():
            if not (math.isfinite(w) and w >= 0.0):
                raise CommandError(f"weights.{name}: expected a share >= 0, got {w}")
    elif isinstance(cmd, RunScenario):
        if not cmd.name.strip():
            raise CommandError("name: expected a scenario name, got an empty string")
    elif isinstance(cmd, SetSpeed):
        _finite("speed", cmd.speed)
        if not 0.0 <= cmd.speed <= MAX_SPEED:
            raise CommandError(
                f"speed: expected x real time in (0, {MAX_SPEED:g}] or 0 (as fast as possible), "
                f"got {cmd.speed}"
            )


# ------------------------------------------------------------------------------------------------
# topics


class TopicSpec(NamedTuple):
    """Where a kind of message goes, under `topic_root(fleet)`; `{tier}` is the tier's name."""

    suffix: str
    retained: bool
    qos: int


def topic_root(fleet: str) -> str:
    return f"fleet-twin/v{SCHEMA}/{fleet}/"


#: DESIGN.md's topic table, by message kind (plus "cmd", the commands' topic). Replies go to the
#: command's MQTT 5 response topic (or its `reply_to`), QoS REPLY_QOS, not retained.
TOPICS: dict[str, TopicSpec] = {
    "status": TopicSpec("status", True, 1),
    "meta": TopicSpec("meta", True, 1),
    "summary": TopicSpec("summary", False, 0),
    "tier": TopicSpec("tier/{tier}", False, 0),
    "chips": TopicSpec("chips/{tier}", False, 0),
    "event": TopicSpec("event", False, 1),
    "cmd": TopicSpec("cmd", False, 1),
}
REPLY_QOS = 1


def topic_for(msg: Message, fleet: str) -> str:
    """The topic a message is published on. Replies have none of their own: ValueError."""
    if isinstance(msg, Reply):
        raise ValueError("a reply goes to its command's response topic, not to a fleet topic")
    kind = msg.__struct_config__.tag
    spec = TOPICS[str(kind)]
    tier = msg.tier if isinstance(msg, Tier | Chips) else ""
    return topic_root(fleet) + spec.suffix.format(tier=tier)


def command_topic(fleet: str) -> str:
    return topic_root(fleet) + TOPICS["cmd"].suffix
