"""The flight recorder: file format, rotation, kill safety, playback, `fleet-twin replay`, and a
seeded run reproduced from its recording (docs/recorder.md)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin import core, telemetry
from twin.build import new_twin
from twin.catalog import Catalog, ConfigError, load_catalog
from twin.cli import main
from twin.engine import Engine, VirtualClock
from twin.fleet import Fleet, load_fleet, resolve_fleet_path
from twin.recorder import (
    Cmd,
    Frame,
    Header,
    Msg,
    Note,
    Playback,
    ReadStats,
    Record,
    Recorder,
    RecordingError,
    read_records,
    record_engine,
    segment_path,
    segment_paths,
)
from twin.replay import format_record, rerun, start_recording, twin_for

FLEET = "aws-cerebras"  # two prefill tiers, one decode tier, two links
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="module")
def fleet(catalog: Catalog) -> Fleet:
    return load_fleet(resolve_fleet_path(FLEET), catalog)


def make_engine(fleet: Fleet, catalog: Catalog, *, seed: int = 11, **kw: Any) -> Engine:
    clock = VirtualClock()
    kw.setdefault("wall_ms", lambda: int(clock.now() * 1000))
    kw.setdefault("run_id", "test")
    return Engine(
        new_twin(fleet, catalog, seed=seed), speed=0.0, clock=clock, catalog=catalog, **kw
    )


def strip(msg: telemetry.Message) -> telemetry.Message:
    """A message without what differs between two runs of the same thing (ts_ms, run_id)."""
    msg = msgspec.structs.replace(msg, ts_ms=0)
    if isinstance(msg, telemetry.Meta):
        msg = msgspec.structs.replace(msg, run_id="")
    return msg


def telemetry_of(recs: list[Record]) -> list[tuple[float, telemetry.Message]]:
    """(t, message) of the summary, tier, chips and event messages of a recording."""
    kinds = (telemetry.Summary, telemetry.Tier, telemetry.Chips, telemetry.Event)
    return [(r.t, strip(r.msg)) for r in recs if isinstance(r, Msg) and isinstance(r.msg, kinds)]


async def recorded_run(
    fleet: Fleet, catalog: Catalog, path: Path, seconds: float = 6.0, **kw: Any
) -> tuple[Engine, Recorder]:
    engine = make_engine(fleet, catalog)
    rec = Recorder(path, **kw).attach(engine)
    await engine.run_for(seconds / 2)
    await engine.command(telemetry.Fail(target="cerebras-decode/0", id="f1"))
    await engine.run_for(seconds / 2)
    rec.close()
    return engine, rec


# ------------------------------------------------------------------------------------------------
# the file


async def test_round_trip(tmp_path: Path, fleet: Fleet, catalog: Catalog) -> None:
    path = tmp_path / "run.jsonl.gz"
    engine = make_engine(fleet, catalog)
    sub = engine.subscribe(maxsize=1 << 16)
    rec = Recorder(path).attach(engine)
    await engine.run_for(4.0)
    rec.close()
    sent = sub.drain()
    recs = list(read_records(path))
    header, first = recs[0], recs[1]
    assert isinstance(header, Header)
    assert (header.fleet, header.run_id, header.seed, header.segment) == (FLEET, "test", 11, 0)
    assert header.rate_per_s == fleet.workload.rate_per_s and header.speed == 0.0
    assert isinstance(first, Msg) and first.msg == engine.meta
    assert isinstance(recs[-1], Note) and recs[-1].note == "end"
    assert recs[-1].count == rec.records - 1 == len(recs) - 1
    msgs = [r for r in recs[2:] if isinstance(r, Msg)]
    assert [m.msg for m in msgs] == sent  # everything, in order, unchanged
    for m in msgs:  # stamped with the simulated time the engine sent it at
        if isinstance(m.msg, telemetry.Summary | telemetry.Event):
            assert m.t == m.msg.sim_time_s
    assert rec.dropped == 0 and rec.error is None
    # plain gzip: zcat reads it
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    assert len(lines) == len(recs) and json.loads(lines[0])["rec"] == "header"


async def test_commands_are_recorded_once_with_their_replies(
    tmp_path: Path, fleet: Fleet, catalog: Catalog
) -> None:
    path = tmp_path / "cmds.jsonl.gz"
    engine = make_engine(fleet, catalog)
    rec = Recorder(path).attach(engine)
    await engine.run_for(1.0)
    oversized = b'{"cmd":"pause","id":"' + b"x" * telemetry.MAX_PAYLOAD_BYTES + b'"}'
    sent: list[tuple[Any, telemetry.Reply]] = []
    task = asyncio.create_task(engine.run_for(3.0))
    for payload in (
        telemetry.Fail(target="cerebras-decode/1", id="a"),
        b'{"cmd":"set_rate","rate_per_s":30,"id":"b"}',
        b'{"cmd":"set_rate","rate_per_s":-3,"id":"c"}',
        b"\xff\xfe not json",
        oversized,
        telemetry.DegradeLink(link="nope", factor=0.5, id="d"),
    ):
        if isinstance(payload, bytes):
            sent.append((payload, await engine.handle_payload(payload)))
        else:
            sent.append((payload, await engine.command(payload)))
    await task
    rec.close()
    cmds = [r for r in read_records(path) if isinstance(r, Cmd)]
    assert len(cmds) == len(sent) == rec.commands
    for (payload, reply), c in zip(sent, cmds, strict=True):
        assert c.reply == reply and c.t == reply.sim_time_s
        if isinstance(payload, bytes) and c.cmd is None:
            raw = base64.b64decode(c.payload)
            assert c.payload_bytes == len(payload) and payload.startswith(raw)
        elif isinstance(payload, bytes):
            assert c.cmd == telemetry.decode_command(payload) and c.payload == ""
        else:
            assert c.cmd == payload
    assert [c.reply.ok for c in cmds] == [True, True, False, False, False, False]
    assert cmds[2].cmd is None and cmds[3].cmd is None and cmds[4].cmd is None
    assert cmds[4].payload_bytes > telemetry.MAX_PAYLOAD_BYTES
    assert "over the" in cmds[4].reply.error
    # detached: the engine's own methods are back
    assert "command" not in vars(engine) and "handle_payload" not in vars(engine)


async def test_rotation_and_segments(tmp_path: Path, fleet: Fleet, catalog: Catalog) -> None:
    path = tmp_path / "rot.jsonl.gz"
    engine = make_engine(fleet, catalog)
    sub = engine.subscribe(maxsize=1 << 16)
    rec = Recorder(path, max_bytes=16_000, member_bytes=8_000).attach(engine)
    await engine.run_for(20.0)
    rec.close()
    segs = segment_paths(path)
    assert segs == rec.segments and len(segs) >= 3
    assert segs[1] == segment_path(path, 1) == tmp_path / "rot.jsonl.gz.1"
    for i, seg in enumerate(segs):  # every segment is a gzip file that starts with its header
        lines = gzip.decompress(seg.read_bytes()).splitlines()
        head = msgspec.json.decode(lines[0])
        assert head["rec"] == "header" and head["segment"] == i and head["first_segment"] == 0
        assert msgspec.json.decode(lines[1])["msg"]["kind"] == "meta"
        if i < len(segs) - 1:
            assert seg.stat().st_size < 16_000 * 1.5
    recs = list(read_records(path))
    assert sum(isinstance(r, Header) for r in recs) == len(segs)
    metas = [r for r in recs if isinstance(r, Msg) and isinstance(r.msg, telemetry.Meta)]
    assert len(metas) == len(segs)
    msgs = [r.msg for r in recs if isinstance(r, Msg) and not isinstance(r.msg, telemetry.Meta)]
    assert msgs == sub.drain()


async def test_a_second_recording_on_the_same_path_is_a_new_run(
    tmp_path: Path, fleet: Fleet, catalog: Catalog
) -> None:
    path = tmp_path / "two.jsonl.gz"
    for run_id in ("first", "second"):
        engine = make_engine(fleet, catalog, run_id=run_id)
        async with asyncio.timeout(30):
            rec = await record_engine(engine, path, max_bytes=20_000)
            await engine.run_for(6.0)
        rec.close()
    pb = Playback(path)
    assert [h.run_id for h in pb.runs] == ["first", "second"]
    assert pb.run_id == "first" and Playback(path, run=-1).run_id == "second"
    second = Playback(path, run="second")
    assert second.header.segment == second.header.first_segment > 0
    assert pb.meta is not None and pb.meta.run_id == "first"
    assert second.meta is not None and second.meta.run_id == "second"
    assert math.isclose(pb.end_s, 6.0, abs_tol=0.01) and math.isclose(
        second.end_s, 6.0, abs_tol=0.01
    )
    with pytest.raises(RecordingError, match="no run 'third'"):
        Playback(path, run="third")


def test_unwritable_path_fails_at_attach(tmp_path: Path, fleet: Fleet, catalog: Catalog) -> None:
    engine = make_engine(fleet, catalog)
    with pytest.raises(RecordingError, match="cannot create the recording"):
        Recorder(tmp_path / "no" / "such" / "dir.gz").attach(engine)
    assert "command" not in vars(engine)
    with pytest.raises(ConfigError, match=r"dir.gz: cannot create the recording \(No such file"):
        start_recording(engine, tmp_path / "no" / "such" / "dir.gz")
    rec = start_recording(engine, tmp_path / "ok.gz", flush_s=0.5)
    assert rec.flush_s == 0.5 and "command" in vars(engine)
    rec.close()
    assert "command" not in vars(engine)


async def test_a_stalled_writer_drops_and_says_so(
    tmp_path: Path, fleet: Fleet, catalog: Catalog
) -> None:
    path = tmp_path / "drop.jsonl.gz"
    engine = make_engine(fleet, catalog)
    rec = Recorder(path, queue_size=4).attach(engine)
    gate = threading.Event()
    original = rec._write

    def stalled(*args: Any) -> None:
        gate.wait(10)
        original(*args)

    rec._write = stalled  # type: ignore[method-assign,assignment]
    await engine.run_for(5.0)  # never waits for the writer
    gate.set()
    rec.close()
    assert rec.dropped > 0
    notes = [r for r in read_records(path) if isinstance(r, Note) and r.note == "dropped"]
    assert sum(n.count for n in notes) == rec.dropped


# ------------------------------------------------------------------------------------------------
# reading what a kill left


class Recording(tuple[Path, list[Record]]):
    def __repr__(self) -> str:  # hypothesis prints its failing examples' arguments
        return f"Recording({self[0]}, {len(self[1])} records)"


@pytest.fixture(scope="module")
def small_recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Record]]:
    catalog = load_catalog()
    fleet = load_fleet(resolve_fleet_path(FLEET), catalog)
    path = tmp_path_factory.mktemp("rec") / "small.jsonl.gz"
    asyncio.run(recorded_run(fleet, catalog, path, 4.0, member_bytes=4_000, flush_s=0.001))
    return Recording((path, list(read_records(path))))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.floats(0.0, 1.0))
def test_a_truncated_recording_reads_up_to_the_cut(
    small_recording: tuple[Path, list[Record]], tmp_path: Path, cut: float
) -> None:
    path, full = small_recording
    data = path.read_bytes()
    n = int(len(data) * cut)
    out = tmp_path / f"cut-{n}.gz"
    out.write_bytes(data[:n])
    stats = ReadStats()
    try:
        got = list(read_records(out, stats=stats))
    except RecordingError as e:  # cut inside the gzip magic bytes
        assert n < 2 and "not a fleet-twin recording" in str(e)
        return
    assert got == full[: len(got)]
    assert stats.truncated == (n < len(data))
    assert stats.bad_lines <= 1


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    where=st.floats(0.0, 1.0),
    junk=st.binary(min_size=1, max_size=64),
    mode=st.sampled_from(["overwrite", "insert"]),
)
def test_a_damaged_recording_never_raises_anything_else(
    small_recording: tuple[Path, list[Record]], tmp_path: Path, where: float, junk: bytes, mode: str
) -> None:
    path, _ = small_recording
    data = path.read_bytes()
    i = int(len(data) * where)
    bad = data[:i] + junk + data[i + (len(junk) if mode == "overwrite" else 0) :]
    out = tmp_path / "bad.gz"
    out.write_bytes(bad)
    try:
        got = list(read_records(out))
    except RecordingError as e:
        assert "\n" not in str(e)
        return
    assert all(isinstance(r, Header | Msg | Cmd | Note) for r in got)
    with open(os.devnull, "w") as devnull:  # the readable form copes with whatever decoded
        for r in got:
            devnull.write(format_record(r))
    try:
        pb = Playback(out)
    except RecordingError:
        return
    pb.seek(pb.start_s + pb.duration_s * where)
    list(pb.messages())


KILL_SCRIPT = """
import asyncio, sys
from twin.build import new_twin
from twin.catalog import load_catalog
from twin.engine import Engine
from twin.fleet import load_fleet, resolve_fleet_path
from twin import telemetry
from twin.recorder import Recorder

cat = load_catalog()
twin = new_twin(load_fleet(resolve_fleet_path("tenstorrent-galaxy"), cat), cat, seed=1)
engine = Engine(twin, speed=1.0, tick_s=0.05, catalog=cat, summary_hz=10)
sub = engine.subscribe(maxsize=4096)
Recorder(sys.argv[1], flush_s=float(sys.argv[2])).attach(engine)

async def main():
    task = asyncio.create_task(engine.run())
    async for msg in sub:
        if isinstance(msg, telemetry.Summary):
            print(msg.sim_time_s, flush=True)

asyncio.run(main())
"""


def test_a_kill_loses_at_most_the_last_flush(tmp_path: Path) -> None:
    path = tmp_path / "killed.jsonl.gz"
    flush_s = 0.25
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(path), str(flush_s)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    last = 0.0
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            last = float(line)
            if last >= 2.0 or time.monotonic() > deadline:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert last >= 2.0
    stats = ReadStats()
    recs = list(read_records(path, stats=stats))
    summaries = [r.t for r in recs if isinstance(r, Msg) and isinstance(r.msg, telemetry.Summary)]
    # the twin ran at 1x: what was sent more than a flush (plus scheduling slack) before the kill
    # is on disk
    assert summaries and summaries[-1] >= last - flush_s - 0.5
    assert not any(isinstance(r, Note) and r.note == "end" for r in recs)  # no clean close
    assert stats.truncated  # the open gzip member was never finished


# ------------------------------------------------------------------------------------------------
# playback


def all_frames(path: Path) -> list[Frame]:
    pb = Playback(path)
    return list(pb.messages())


async def test_playback_plays_seeks_and_paints(
    tmp_path: Path, fleet: Fleet, catalog: Catalog
) -> None:
    path = tmp_path / "pb.jsonl.gz"
    await recorded_run(fleet, catalog, path, 16.0, max_bytes=30_000, member_bytes=6_000)
    recs = list(read_records(path))
    expected = [
        Frame(r.t, r.msg)
        for r in recs
        if isinstance(r, Msg) and not isinstance(r.msg, telemetry.Meta)
    ]
    pb = Playback(path)
    assert len(pb._members) > 4 and len(segment_paths(path)) > 1
    assert pb.fleet == FLEET and pb.meta is not None and pb.meta.fleet == FLEET
    assert pb.start_s == 0.0 and math.isclose(pb.end_s, 16.0, abs_tol=0.01)
    assert pb.duration_s == pb.end_s - pb.start_s
    assert [c.cmd for c in pb.commands] == [telemetry.Fail(target="cerebras-decode/0", id="f1")]
    assert list(pb.messages()) == expected and pb.at_end
    for t in (0.0, 0.35, 3.0, 7.77, 8.0, 12.5, 15.99, 16.0, 99.0, -5.0):
        picture = pb.seek(t)
        clamped = min(max(t, pb.start_s), pb.end_s)
        k = next((i for i, f in enumerate(expected) if f.sim_time_s >= clamped), len(expected))
        rest = list(pb.messages())
        assert rest == expected[k:], t
        before = [f.message for f in expected[:k]]
        assert picture[0] == pb.meta
        summaries = [m for m in before if isinstance(m, telemetry.Summary)]
        if summaries:
            assert picture[1] == summaries[-1]
        tiers = {m.tier: m for m in before if isinstance(m, telemetry.Tier)}
        assert [m for m in picture if isinstance(m, telemetry.Tier)] == list(tiers.values())
    # paced playback
    pb.seek(5.0)
    got: list[Frame] = []
    clock = 5.0
    while not pb.at_end:
        clock += 0.7
        step = pb.advance_to(clock)
        assert all(f.sim_time_s <= clock for f in step)
        got += step
    k = next(i for i, f in enumerate(expected) if f.sim_time_s >= 5.0)
    assert got == expected[k:]
    replies = Playback(path, replies=True)
    frames = list(replies.messages())
    assert [f.message.id for f in frames if isinstance(f.message, telemetry.Reply)] == ["f1"]


def test_not_a_recording(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="no such recording"):
        list(read_records(tmp_path / "missing.gz"))
    plain = tmp_path / "plain.gz"
    plain.write_text("hello\n")
    with pytest.raises(RecordingError, match="not gzip"):
        list(read_records(plain))
    other = tmp_path / "other.gz"
    other.write_bytes(gzip.compress(b'{"kind":"summary"}\n'))
    with pytest.raises(RecordingError, match="no header line"):
        list(read_records(other))
    with pytest.raises(RecordingError, match="no header line"):
        Playback(other)
    deep = tmp_path / "deep.gz"  # a line nested past msgspec's recursion limit is skipped
    lines = [b"", b'{"rec":"note","t":1,"note":' + b"[" * 5000 + b"]" * 5000 + b"}", b""]
    with gzip.open(deep, "wb") as f:
        first = {"rec": "header", "format": "fleet-twin-recording", "fleet": "x", "run_id": "r"}
        f.write(msgspec.json.encode(first) + b"\n".join(lines))
    stats = ReadStats()
    assert [type(r) for r in read_records(deep, stats=stats)] == [Header]
    assert stats.bad_lines == 1
    assert Playback(deep).count == 0
    newer = tmp_path / "newer.gz"
    head = msgspec.json.encode(
        {
            "rec": "header",
            "format": "fleet-twin-recording",
            "version": 99,
            "fleet": "x",
            "run_id": "r",
        }
    )
    newer.write_bytes(gzip.compress(head + b"\n"))
    with pytest.raises(RecordingError, match="version 99 is newer"):
        list(read_records(newer))


# ------------------------------------------------------------------------------------------------
# fleet-twin replay


def test_replay_command(
    small_recording: tuple[Path, list[Record]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, full = small_recording
    assert main(["replay", str(path), "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [msgspec.json.decode(line.encode(), type=Record) for line in out] == full
    assert main(["replay", str(path)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert len(text) == len(full)
    assert text[0].startswith("# fleet-twin-recording v1: fleet aws-cerebras, run test, seed 11")
    assert any(" summary  arrived " in line for line in text)
    assert any(" cmd      fail target=cerebras-decode/0 -> ok: " in line for line in text)
    assert any(" event    error chip_failed cerebras-decode/0: " in line for line in text)
    assert text[-1].split()[1:3] == ["note", "end:"]
    assert main(["replay", str(path), "--kind", "event", "--kind", "cmd", "--json"]) == 0
    kinds = {
        json.loads(line).get("msg", {}).get("kind", "cmd")
        for line in capsys.readouterr().out.splitlines()
    }
    assert kinds == {"event", "cmd"}
    assert main(["replay", str(path), "--from", "1", "--to", "2", "--kind", "summary"]) == 0
    times = [float(line.split()[0]) for line in capsys.readouterr().out.splitlines()]
    assert times and all(1 <= t <= 2 for t in times)


def test_replay_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path / "nope.gz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such recording" in err
    (tmp_path / "x.gz").write_text("{}")
    assert main(["replay", str(tmp_path / "x.gz")]) == 2
    assert "not a fleet-twin recording" in capsys.readouterr().err


def test_replay_reads_a_killed_recording(
    small_recording: tuple[Path, list[Record]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, full = small_recording
    cut = tmp_path / "cut.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    assert main(["replay", str(cut), "--json"]) == 0
    captured = capsys.readouterr()
    n = len(captured.out.splitlines())
    assert 2 < n < len(full)
    assert "ends in the middle of a write" in captured.err


# ------------------------------------------------------------------------------------------------
# determinism: a recorded run, rerun from its recording


PLAN: list[tuple[float, telemetry.Command | bytes]] = [
    (1.5, telemetry.Fail(target="cerebras-decode/0", id="1")),
    (2.3, telemetry.DegradeLink(link="trn3-prefill->cerebras-decode", factor=0.25, id="2")),
    (3.0, telemetry.SetRouting(policy="latency_aware", id="3")),
    (3.0, b'{"cmd":"fail","target":"nope/9","id":"4"}'),
    (3.1, b"not json at all"),
    (4.0, telemetry.SetRate(rate_per_s=35.0, id="5")),
    (5.2, telemetry.Recover(target="cerebras-decode/0", id="6")),
    (5.5, telemetry.Drain(target="trn2-prefill/1", id="7")),
    (6.0, telemetry.Burst(factor=2.0, duration_s=1.5, id="8")),
    (6.5, b'{"cmd":"recover","target":"' + b"y" * telemetry.MAX_PAYLOAD_BYTES + b'"}'),
    (7.0, telemetry.RestoreLink(link="trn3-prefill->cerebras-decode", id="9")),
    (7.0, telemetry.SetRouting(policy="weighted", weights={"trn3-prefill": 3.0}, id="10")),
    (8.5, telemetry.Fail(target="trn3-prefill/1/2", id="11")),
]
DURATION_S = 10.0


async def original_run(engine: Engine) -> None:
    """The engine runs on its own; an operator sends the plan's commands as it goes."""

    async def operator() -> None:
        for t, cmd in PLAN:
            while engine.sim_time_s < t:
                await asyncio.sleep(0)
            if isinstance(cmd, bytes):
                await engine.handle_payload(cmd)
            else:
                await engine.command(cmd)

    await asyncio.gather(engine.run_for(DURATION_S), operator())


async def test_a_rerun_of_a_recording_reproduces_its_telemetry(
    tmp_path: Path, fleet: Fleet, catalog: Catalog
) -> None:
    first, second = tmp_path / "first.jsonl.gz", tmp_path / "second.jsonl.gz"
    a = make_engine(fleet, catalog, seed=5, run_id="a")
    rec = Recorder(first).attach(a)
    await original_run(a)
    rec.close()
    recorded = list(read_records(first))
    header = recorded[0]
    assert isinstance(header, Header) and header.seed == 5
    cmds = [r for r in recorded if isinstance(r, Cmd)]
    assert len(cmds) == len(PLAN)
    assert [c.reply.ok for c in cmds] == [True] * 3 + [False] * 2 + [True] * 4 + [False] + [
        True
    ] * 3
    # the rerun: the same fleet, seed and settings, the commands from the file
    twin = twin_for(header, catalog)
    clock = VirtualClock()
    b = Engine(twin, speed=0.0, clock=clock, catalog=catalog, run_id="b", wall_ms=lambda: 0)
    rec_b = Recorder(second).attach(b)
    replies = await rerun(b, recorded, until_s=DURATION_S)
    rec_b.close()
    assert [strip(r) for r in replies] == [strip(c.reply) for c in cmds]
    again = list(read_records(second))
    want, got = telemetry_of(recorded), telemetry_of(again)
    assert len(want) > 150
    assert sum(isinstance(m, telemetry.Event) for _, m in want) >= len(PLAN)
    assert got == want  # every summary, tier, chips and event message, bit for bit
    assert a.sim_time_s == b.sim_time_s
    core.check_conservation(b.twin.state)
    # and the comparison has teeth: another seed, or a command left out, differs
    c = make_engine(fleet, catalog, seed=6)
    sub = c.subscribe(maxsize=1 << 16)
    await rerun(c, recorded, until_s=DURATION_S)
    other = [strip(m) for m in sub.drain() if not isinstance(m, telemetry.Meta)]
    assert other != [m for _, m in want]
    d = make_engine(fleet, catalog, seed=5)
    sub = d.subscribe(maxsize=1 << 16)
    await rerun(
        d,
        [r for r in recorded if not (isinstance(r, Cmd) and r.reply.id == "6")],
        until_s=DURATION_S,
    )
    assert [strip(m) for m in sub.drain()] != [m for _, m in want]


async def test_rerun_skips_pacing_commands(fleet: Fleet, catalog: Catalog) -> None:
    e = make_engine(fleet, catalog)
    recs: list[Record] = [
        Cmd(t=1.0, cmd=telemetry.Pause(), reply=telemetry.Reply(ts_ms=0, id="", ok=True)),
        Cmd(
            t=2.0, cmd=telemetry.SetSpeed(speed=5.0), reply=telemetry.Reply(ts_ms=0, id="", ok=True)
        ),
        Cmd(
            t=2.5,
            cmd=telemetry.SetRate(rate_per_s=3.0),
            reply=telemetry.Reply(ts_ms=0, id="", ok=True),
        ),
    ]
    replies = await rerun(e, recs, until_s=3.0)
    assert [r.detail for r in replies] == ["arrival rate 20 -> 3 requests/s"]
    assert e.sim_time_s == 3.0 and not e.paused and e.speed == 0.0


INSTANCES = [
    f"{t}/{k}" for t in ("trn2-prefill", "trn3-prefill", "cerebras-decode") for k in (0, 1)
]
CHAOS_COMMANDS = st.one_of(
    st.builds(telemetry.Fail, target=st.sampled_from([*INSTANCES, "cerebras-decode/1/2", "x/0"])),
    st.builds(telemetry.Recover, target=st.sampled_from(INSTANCES)),
    st.builds(telemetry.Drain, target=st.sampled_from(INSTANCES)),
    st.builds(
        telemetry.DegradeLink,
        link=st.sampled_from(["trn2-prefill->cerebras-decode", "trn3-prefill->cerebras-decode"]),
        factor=st.floats(0.01, 1.0),
    ),
    st.builds(telemetry.RestoreLink, link=st.just("trn2-prefill->cerebras-decode")),
    st.builds(telemetry.SetRate, rate_per_s=st.floats(0.0, 60.0)),
    st.builds(telemetry.Burst, factor=st.floats(1.0, 3.0), duration_s=st.floats(0.1, 3.0)),
    st.builds(
        telemetry.SetRouting,
        policy=st.sampled_from(telemetry.POLICIES),
        weights=st.dictionaries(
            st.sampled_from(["trn2-prefill", "trn3-prefill", "nope"]),
            st.floats(0.0, 4.0),
            max_size=2,
        ),
    ),
)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    plan=st.lists(st.tuples(st.floats(0.0, 5.0), CHAOS_COMMANDS), max_size=8),
    seed=st.integers(0, 1000),
)
def test_random_chaos_reruns_identically(
    tmp_path: Path,
    fleet: Fleet,
    catalog: Catalog,
    plan: list[tuple[float, telemetry.Command]],
    seed: int,
) -> None:
    """A random operator, recorded; the rerun from the file gives the same telemetry."""
    plan = sorted(plan, key=lambda x: x[0])
    path = tmp_path / f"chaos-{seed}-{len(plan)}.jsonl.gz"
    for old in segment_paths(path):
        old.unlink()

    async def go() -> tuple[list[Record], list[Record]]:
        a = make_engine(fleet, catalog, seed=seed)
        rec = Recorder(path).attach(a)

        async def operator() -> None:
            for t, cmd in plan:
                while a.sim_time_s < t:
                    await asyncio.sleep(0)
                await a.command(cmd)

        await asyncio.gather(a.run_for(6.0), operator())
        rec.close()
        recorded = list(read_records(path))
        b = make_engine(fleet, catalog, seed=seed)
        sub = b.subscribe(maxsize=1 << 16)
        await rerun(b, recorded, until_s=6.0)
        again: list[Record] = [Msg(t=0.0, msg=m) for m in sub.drain()]
        return recorded, again

    recorded, again = asyncio.run(go())
    assert [m for _, m in telemetry_of(again)] == [m for _, m in telemetry_of(recorded)]
    assert sum(isinstance(r, Cmd) for r in recorded) == len(plan)


async def test_commands_over_mqtt_are_recorded(
    broker: Any, tmp_path: Path, catalog: Catalog
) -> None:
    """`serve --record`: what arrives through the MQTT bridge is recorded like the rest."""
    import aiomqtt

    from twin.mqtt import MqttBridge

    fleet = load_fleet(resolve_fleet_path("tenstorrent-galaxy"), catalog)
    engine = Engine(new_twin(fleet, catalog, seed=1), speed=10.0, catalog=catalog)
    path = tmp_path / "serve.jsonl.gz"
    rec = await record_engine(engine, path, flush_s=0.1)
    bridge = MqttBridge(engine, broker.url)
    tasks = [asyncio.create_task(engine.run()), asyncio.create_task(bridge.run())]
    try:
        await bridge.wait_connected(10)
        async with aiomqtt.Client("127.0.0.1", broker.port, timeout=10) as client:
            topic = telemetry.command_topic(fleet.name)
            await client.publish(
                topic, b'{"cmd":"drain","target":"galaxy-unified/1","id":"d"}', qos=1
            )
            await client.publish(topic, b"garbage", qos=1)
        async with asyncio.timeout(10):
            while rec.commands < 2:
                await asyncio.sleep(0.05)
    finally:
        engine.stop()
        bridge.stop()
        await asyncio.wait(tasks, timeout=20)
        rec.close()
    cmds = [r for r in read_records(path) if isinstance(r, Cmd)]
    assert [c.cmd for c in cmds] == [telemetry.Drain(target="galaxy-unified/1", id="d"), None]
    assert cmds[0].reply.ok and not cmds[1].reply.ok
    assert base64.b64decode(cmds[1].payload) == b"garbage"
