"""`fleet-twin replay FILE [--json]`: print a flight recording; `rerun`: the recorded run again.

    fleet-twin replay run.jsonl.gz                   one readable line per record
    fleet-twin replay run.jsonl.gz --json            the records as JSON lines (docs/recorder.md)
    fleet-twin replay run.jsonl.gz --kind event --kind cmd --from 60 --to 120

`rerun(engine, records)` applies a recording's commands to a fresh engine at the simulated times
they were applied at, so that a seeded run recorded at speed 0 can be reproduced (and compared)
exactly; `twin_for(header)` builds the recorded fleet with the recorded seed and rate.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from twin import telemetry
from twin.catalog import Catalog, ConfigError
from twin.recorder import (
    Cmd,
    Header,
    Msg,
    Note,
    ReadStats,
    Record,
    Recorder,
    RecordingError,
    read_records,
)

__all__ = [
    "KINDS",
    "PACING_COMMANDS",
    "add_replay_parser",
    "cmd_replay",
    "format_record",
    "rerun",
    "start_recording",
    "twin_for",
]

#: What `--kind` selects: the record types and the telemetry message kinds.
KINDS: tuple[str, ...] = ("header", "cmd", "note", *telemetry.MESSAGE_KINDS)

#: Commands that change when snapshots are taken, not what the fleet does: `rerun` skips them.
PACING_COMMANDS = (telemetry.Pause, telemetry.Resume, telemetry.SetSpeed)


# ------------------------------------------------------------------------------------------------
# --record FILE


def start_recording(engine: Any, path: str | Path, **kwargs: Any) -> Recorder:
    """The flight recorder for `--record FILE` (`serve` and the console): attached to `engine`
    at once; closed by `close()` or when the interpreter exits. A path that cannot be written is
    a ConfigError (one line; exit status 2 from the command line)."""
    try:
        return Recorder(path, **kwargs).attach(engine)
    except RecordingError as e:
        raise ConfigError(str(e)) from None


# ------------------------------------------------------------------------------------------------
# the subcommand


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds, got {text!r}")
    return v


def add_replay_parser(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="print a flight recording (serve --record / fleet-twin --record)",
        description="Print the records of a flight recording (FILE, FILE.1, ...): one readable "
        "line each, or with --json the records themselves as JSON lines. A recording cut short "
        "by a kill is read up to its last flush.",
    )
    p.add_argument("file", help="the recording (its first segment)")
    p.add_argument("--json", action="store_true", help="print the records as JSON lines")
    p.add_argument(
        "--kind",
        action="append",
        choices=KINDS,
        metavar="KIND",
        help=f"only records of this kind (repeatable): {', '.join(KINDS)}",
    )
    p.add_argument(
        "--from", dest="start", type=_seconds, default=None, help="from this simulated time (s)"
    )
    p.add_argument(
        "--to", dest="end", type=_seconds, default=None, help="up to this simulated time (s)"
    )
    p.set_defaults(func=cmd_replay)


def _kind(rec: Record) -> str:
    if isinstance(rec, Msg):
        return str(rec.msg.__struct_config__.tag)
    return str(rec.__struct_config__.tag)


def _selected(rec: Record, a: argparse.Namespace) -> bool:
    if a.kind and _kind(rec) not in a.kind:
        return False
    if isinstance(rec, Msg | Cmd | Note):
        if a.start is not None and rec.t < a.start:
            return False
        if a.end is not None and rec.t > a.end:
            return False
    return True


def cmd_replay(a: argparse.Namespace) -> int:
    stats = ReadStats()
    out = sys.stdout
    try:
        for rec in read_records(a.file, stats=stats):
            if not _selected(rec, a):
                continue
            if a.json:
                out.write(msgspec.json.encode(rec).decode() + "\n")
            else:
                out.write(format_record(rec) + "\n")
        out.flush()
    except RecordingError as e:
        raise ConfigError(str(e)) from None
    except BrokenPipeError:
        # The reader went away (`| head`): not an error. Keep Python's exit flush quiet.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    for problem in stats.problems:
        sys.stderr.write(f"fleet-twin replay: {problem}\n")
    if stats.truncated:
        sys.stderr.write(
            f"fleet-twin replay: {a.file}: the recording ends in the middle of a write (a killed "
            f"or still running recorder); {stats.records} records read\n"
        )
    if stats.bad_lines:
        sys.stderr.write(f"fleet-twin replay: {a.file}: {stats.bad_lines} lines skipped\n")
    return 0


# ------------------------------------------------------------------------------------------------
# one line per record


def _n(v: float, fmt: str, scale: float = 1.0) -> str:
    """-1 (no data) as '-'."""
    return "-" if v < 0 else f"{v * scale:{fmt}}"


def _args(cmd: telemetry.Command) -> str:
    d = msgspec.to_builtins(cmd)
    for k in ("cmd", "id", "reply_to", "schema", "ts_ms"):
        d.pop(k, None)
    return " ".join(f"{k}={v}" for k, v in d.items())


def _message_text(m: telemetry.Message) -> str:
    T = telemetry
    if isinstance(m, T.Summary):
        return (
            f"arrived {m.arrived} done {m.done} rejected {m.rejected} in flight {m.in_flight}  "
            f"{m.tokens_per_s:.0f} tok/s  TTFT p99 {_n(m.ttft_p99_s, '.3f')} s  "
            f"TPOT p99 {_n(m.tpot_p99_s, '.1f', 1e3)} ms  "
            f"goodput {_n(m.goodput_fraction, '.1f', 100)}%  {m.power_w / 1e3:.1f} kW  "
            f"{m.policy}" + ("  [paused]" if m.paused else "")
        )
    if isinstance(m, T.Tier):
        return (
            f"{m.tier} ({m.role}) up {m.instances_up}/{m.instances} queue {m.queue} "
            f"batch {m.batch} util {m.utilisation:.2f} {m.tokens_per_s:.0f} tok/s "
            f"kv {m.kv_used_fraction * 100:.0f}% {m.power_w / 1e3:.1f} kW"
        )
    if isinstance(m, T.Chips):
        states = {s: m.state.count(s) for s in ("up", "failed", "draining")}
        return (
            f"{m.tier}: {len(m.ids)} chips, {states['up']} up, {states['failed']} failed, "
            f"{states['draining']} draining, {sum(m.power_w) / 1e3:.1f} kW"
        )
    if isinstance(m, T.Event):
        return f"{m.severity} {m.event} {m.target}: {m.detail}"
    if isinstance(m, T.Meta):
        tiers = ", ".join(f"{t.name} ({t.role})" for t in m.tiers)
        return f"{m.fleet}: model {m.model}, tiers {tiers}; {len(m.links)} links; run {m.run_id}"
    if isinstance(m, T.Status):
        return f"{m.fleet} {m.state} (run {m.run_id})"
    return _reply_text(m)


def _reply_text(r: telemetry.Reply) -> str:
    return f"ok: {r.detail}" if r.ok else f"error: {r.error}"


def format_record(rec: Record) -> str:
    """One readable line: simulated time, kind, what it says."""
    if isinstance(rec, Header):
        started = datetime.datetime.fromtimestamp(rec.started_ms / 1e3, datetime.UTC)
        seed = "-" if rec.seed is None else rec.seed
        rate = "-" if rec.rate_per_s is None else f"{rec.rate_per_s:g}/s"
        return (
            f"# {rec.format} v{rec.version}: fleet {rec.fleet}, run {rec.run_id}, seed {seed}, "
            f"rate {rate}, segment {rec.segment}, started {started:%Y-%m-%d %H:%M:%S} UTC "
            f"at t={rec.sim_time_s:g} s"
        )
    if isinstance(rec, Msg):
        kind = str(rec.msg.__struct_config__.tag)
        return f"{rec.t:10.3f}  {kind:<8} {_message_text(rec.msg)}"
    if isinstance(rec, Cmd):
        if rec.cmd is None:
            what = f"(a payload of {rec.payload_bytes} bytes)"
        else:
            what = f"{rec.cmd.__struct_config__.tag} {_args(rec.cmd)}".rstrip()
        return f"{rec.t:10.3f}  {'cmd':<8} {what} -> {_reply_text(rec.reply)}"
    return f"{rec.t:10.3f}  {'note':<8} {rec.note}: {rec.detail}"


# ------------------------------------------------------------------------------------------------
# rerun


def twin_for(
    header: Header, catalog: Catalog | None = None, *, fleet: str | Path | None = None
) -> Any:
    """A fresh `build.Twin` like the recorded one: the recorded fleet (a shipped name, or the
    fleet file `fleet`), seed and arrival rate."""
    from twin.build import new_twin
    from twin.catalog import load_catalog
    from twin.fleet import load_fleet, resolve_fleet_path

    catalog = catalog if catalog is not None else load_catalog()
    f = load_fleet(resolve_fleet_path(str(fleet) if fleet is not None else header.fleet), catalog)
    return new_twin(f, catalog, seed=header.seed, rate_per_s=header.rate_per_s)


def _payload(rec: Cmd) -> bytes:
    raw = base64.b64decode(rec.payload)
    if rec.payload_bytes > len(raw):  # an oversized payload was kept in part: its size counts
        raw += b" " * (rec.payload_bytes - len(raw))
    return raw


def _delta_to(now: float, t: float) -> float:
    """The run length that makes `run_for` (which ends at `now + delta`, in floating point) end
    exactly at t; when no sum lands on t exactly, the shortest that ends just past it."""
    base = t - now
    deltas = [base]
    lo = hi = base
    for _ in range(4):
        lo, hi = math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf)
        deltas = [lo, *deltas, hi]
    exact = [d for d in deltas if now + d == t]
    if exact:
        return min(exact, key=lambda d: abs(d - base))
    return next((d for d in deltas if now + d > t), base)


async def _run_to(engine: Any, t: float) -> None:
    """Run a stopped engine until its simulated time is t.

    A command was applied at the start of a tick, so t is where a tick ended: where `run_for`
    stopped (t is then reachable as now + delta) or a natural tick boundary (a run ending just
    past t stops there too, since a run ends within 1e-9 s of its end). Either way the ticks up
    to t are the recorded run's."""
    now = engine.sim_time_s
    if t > now:
        await engine.run_for(_delta_to(now, t))


async def rerun(
    engine: Any, records: Iterable[Record], *, until_s: float | None = None
) -> list[telemetry.Reply]:
    """Drive a fresh, stopped engine (`twin_for(header)`, same engine settings) through a
    recording's commands: each applied at the simulated time it was applied at when recorded,
    in the recorded order, refused payloads included; then on to `until_s` (default: the last
    recorded time). Returns the replies.

    Pacing commands (pause, resume, set_speed) are skipped: a rerun goes as fast as possible, and
    they change when snapshots are taken, not what the fleet does. A run recorded at speed 0 on a
    virtual clock is reproduced message for message (ts_ms and run_id aside), given that its
    engine was running when the commands came (as under `serve` and the console); one paced by a
    wall clock took its steps when the clock said, so its rerun is close but not identical."""
    cmds: list[Cmd] = []
    end = engine.sim_time_s
    for rec in records:
        if isinstance(rec, Cmd):
            cmds.append(rec)
        if isinstance(rec, Msg | Cmd) and math.isfinite(rec.t):
            end = max(end, rec.t)
    replies: list[telemetry.Reply] = []
    # The recorded engine was running when its commands came: its first tick (the snapshots at
    # the start) came before any of them, even one at the very start.
    await engine.run_for(0.0)
    for rec in sorted(cmds, key=lambda c: c.t):  # stable: same-time commands keep their order
        if isinstance(rec.cmd, PACING_COMMANDS):
            continue
        await _run_to(engine, rec.t)
        if rec.cmd is not None:
            replies.append(await engine.command(rec.cmd))
        else:
            replies.append(await engine.handle_payload(_payload(rec)))
    await _run_to(engine, end if until_s is None else until_s)
    return replies
