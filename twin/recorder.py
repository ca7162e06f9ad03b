"""The flight recorder: every telemetry message and every command with its reply, on disk.

    rec = Recorder("run.jsonl.gz").attach(engine)     # or: await record_engine(engine, path)
    ...
    rec.close()

    for record in read_records("run.jsonl.gz"): ...   # Header | Msg | Cmd | Note
    pb = Playback("run.jsonl.gz"); pb.seek(30.0); frames = pb.advance_to(31.0)

File format (docs/recorder.md has the whole of it):

- Segments `FILE`, `FILE.1`, `FILE.2`, ... in the order written (nothing is ever renamed). A new
  segment starts when the current one reaches about `max_bytes` of compressed data; a new
  recording on a path that exists continues at the next free segment number.
- Each segment is gzip (RFC 1952), as several concatenated members (`zcat` reads it), holding one
  msgspec JSON object per line, tagged by `rec`: a `header` (format, fleet, seed, run id, ...)
  first, then the fleet's `meta` as a `msg`, then `msg` (a telemetry message with `t`, the
  simulated time the engine was at when it sent it), `cmd` (a command, its reply and `t`, the
  simulated time it was applied at) and `note` (the recorder's own: messages it dropped, the end).
- At most every `flush_s` the compressor is sync-flushed (Z_SYNC_FLUSH) and the file flushed to the
  operating system, so a killed process loses at most the last `flush_s` of records: a truncated
  segment reads up to its last flush. Every `member_bytes` of JSON a gzip member ends and a new one
  begins: these are the points `Playback.seek` starts decompressing from.

The writer is a thread, so compression and disk writes never hold up the engine's event loop; the
engine only appends to a bounded queue (a full queue drops the message and a `note` says so).

This module imports only `twin.telemetry` of the twin (the console may import it to play a
recording back): the engine it records is duck-typed (`RecordedEngine`).
"""

from __future__ import annotations

import atexit
import base64
import bisect
import contextlib
import contextvars
import logging
import math
import os
import queue
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import msgspec

from twin import telemetry

__all__ = [
    "DEFAULT_FLUSH_S",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MEMBER_BYTES",
    "FORMAT",
    "VERSION",
    "Cmd",
    "Frame",
    "Header",
    "Msg",
    "Note",
    "Playback",
    "ReadStats",
    "Record",
    "RecordedEngine",
    "Recorder",
    "RecordingError",
    "decode_record",
    "encode_record",
    "read_records",
    "record_engine",
    "segment_path",
    "segment_paths",
]

log = logging.getLogger("twin.recorder")

FORMAT = "fleet-twin-recording"
VERSION = 1
DEFAULT_MAX_BYTES = 64 << 20  # compressed bytes per segment
DEFAULT_FLUSH_S = 1.0
DEFAULT_MEMBER_BYTES = 1 << 20  # JSON bytes per gzip member (a seek point)
DEFAULT_QUEUE = 8192  # messages waiting for the writer thread
#: A longer line is not a record (a hostile or broken file): it is skipped, unread.
MAX_LINE_BYTES = 64 << 20
#: A refused payload is kept up to this many bytes (base64) in its `cmd` record.
MAX_KEPT_PAYLOAD = telemetry.MAX_PAYLOAD_BYTES

_READ_CHUNK = 1 << 16
_OUT_CHUNK = 1 << 20


class RecordingError(Exception):
    """A recording that cannot be written or read; the message is one line."""


# ------------------------------------------------------------------------------------------------
# records (tag field "rec")


class _Record(msgspec.Struct, frozen=True, kw_only=True, tag_field="rec"):
    pass


class Header(_Record, tag="header", frozen=True, kw_only=True):
    """The first line of every segment."""

    format: str = FORMAT
    version: int = VERSION
    schema: int = telemetry.SCHEMA
    fleet: str
    run_id: str
    seed: int | None = None  # the twin's random seed, when known
    rate_per_s: float | None = None  # the arrival rate the twin was built with
    speed: float = 1.0  # x real time when recording began (0 = as fast as possible)
    read_only: bool = False  # the twin refused every command
    segment: int = 0  # its number: FILE is 0, FILE.1 is 1, ...
    first_segment: int = 0  # the number of the run's first segment (a new run: == segment)
    started_ms: int = 0  # wall clock when the segment was opened
    sim_time_s: float = 0.0  # simulated time when the segment was opened


class Msg(_Record, tag="msg", frozen=True, kw_only=True):
    """A telemetry message, as subscribers got it."""

    t: float  # simulated time when the engine sent it
    msg: telemetry.Message


class Cmd(_Record, tag="cmd", frozen=True, kw_only=True):
    """A command and its reply (errors included)."""

    t: float  # simulated time it was applied (or refused) at: the reply's sim_time_s
    cmd: telemetry.Command | None = None  # None: the payload could not be decoded
    reply: telemetry.Reply
    payload: str = ""  # undecodable payloads only: base64 of the bytes (the first MAX_KEPT_PAYLOAD)
    payload_bytes: int = 0  # undecodable payloads only: the payload's full size


class Note(_Record, tag="note", frozen=True, kw_only=True):
    """The recorder's own: `dropped` (count messages lost because the writer fell behind),
    `end` (the recording was closed cleanly; count = records written)."""

    t: float
    note: str
    detail: str = ""
    count: int = 0


Record = Header | Msg | Cmd | Note

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Record)


def encode_record(rec: Record) -> bytes:
    """One JSON line of a record, without the newline."""
    return _ENCODER.encode(rec)


def decode_record(line: bytes | str) -> Record:
    """A record from one JSON line; raises msgspec.DecodeError (also for a line nested too
    deeply to decode)."""
    try:
        return _DECODER.decode(line)
    except RecursionError:
        raise msgspec.DecodeError("nested too deeply") from None


#: What a line that is not a record raises (msgspec gives up on deep nesting with RecursionError).
_NOT_A_RECORD = (msgspec.DecodeError, RecursionError)


# ------------------------------------------------------------------------------------------------
# segments


def segment_path(path: str | Path, n: int) -> Path:
    """Segment n of a recording: FILE for 0, FILE.n after."""
    path = Path(path)
    return path if n == 0 else path.with_name(f"{path.name}.{n}")


def segment_paths(path: str | Path) -> list[Path]:
    """The segments of a recording that exist, in order (FILE, FILE.1, ... up to the first gap)."""
    out: list[Path] = []
    while (p := segment_path(path, len(out))).is_file():
        out.append(p)
    return out


class _SegmentWriter:
    """One segment file: gzip members of JSON lines, sync-flushed on demand."""

    def __init__(self, path: Path, *, level: int, fsync: bool) -> None:
        self.path = path
        self._f = open(path, "xb")  # noqa: SIM115 - closed by close(); never overwrites
        self._level = level
        self._fsync = fsync
        self._z: Any = None  # zlib compress object of the open member
        self.bytes_out = 0  # compressed bytes handed to the file
        self.member_in = 0  # JSON bytes in the open member
        self.dirty = False  # written since the last flush

    def write(self, data: bytes) -> None:
        if self._z is None:
            self._z = zlib.compressobj(self._level, zlib.DEFLATED, 31)  # 31: a gzip member
        self._out(self._z.compress(data))
        self.member_in += len(data)
        self.dirty = True

    def _out(self, data: bytes) -> None:
        if data:
            self._f.write(data)
            self.bytes_out += len(data)

    def flush(self) -> None:
        """Everything written so far becomes readable from the file (Z_SYNC_FLUSH)."""
        if not self.dirty:
            return
        if self._z is not None:
            self._out(self._z.flush(zlib.Z_SYNC_FLUSH))
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())
        self.dirty = False

    def end_member(self) -> None:
        if self._z is not None:
            self._out(self._z.flush(zlib.Z_FINISH))
            self._z = None
            self.member_in = 0
            self.dirty = True

    def close(self) -> None:
        try:
            self.end_member()
            self.flush()
        finally:
            self._f.close()


def _open_segment(path: Path, *, level: int, fsync: bool) -> _SegmentWriter:
    try:
        return _SegmentWriter(path, level=level, fsync=fsync)
    except FileExistsError:
        raise
    except OSError as e:
        raise RecordingError(f"{path}: cannot create the recording ({e.strerror or e})") from None


# ------------------------------------------------------------------------------------------------
# the recorder


class RecordedEngine(Protocol):
    """What the recorder needs of an engine (`twin.engine.Engine` has it all)."""

    @property
    def fleet(self) -> str: ...

    @property
    def meta(self) -> telemetry.Meta: ...

    @property
    def sim_time_s(self) -> float: ...

    @property
    def speed(self) -> float: ...

    run_id: str

    def subscribe(self, maxsize: int = 256) -> Any: ...

    async def command(self, cmd: telemetry.Command) -> telemetry.Reply: ...

    async def handle_payload(self, payload: bytes) -> telemetry.Reply: ...


#: Set while a recorder's `handle_payload` wrapper runs: a list that `command` marks when the
#: payload decoded (so the command is recorded once, by `command`).
_IN_PAYLOAD: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "fleet_twin_recorder_payload", default=None
)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _engine_seed(engine: Any) -> int | None:
    """The seed of the engine's twin (numpy's SeedSequence keeps it), or None."""
    try:
        entropy = engine.twin.state.rng.bit_generator.seed_seq.entropy
    except AttributeError:
        return None
    return entropy if isinstance(entropy, int) else None


def _engine_rate(engine: Any) -> float | None:
    try:
        rate = float(engine.twin.state.workload.spec.rate_per_s)
    except (AttributeError, TypeError, ValueError):
        return None
    return rate if math.isfinite(rate) else None


class Recorder:
    """Writes an engine's telemetry and commands to a recording (see the module docstring).

    `attach(engine)` starts it; `close()` (or leaving a `with` block, or the interpreter exiting)
    writes what is queued, a final `note` and closes the file. Counters: `records` written,
    `dropped` (messages lost because the writer fell behind), `segments` (paths written)."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        flush_s: float = DEFAULT_FLUSH_S,
        member_bytes: int = DEFAULT_MEMBER_BYTES,
        queue_size: int = DEFAULT_QUEUE,
        level: int = 6,
        fsync: bool = False,
        seed: int | None = None,
    ) -> None:
        if not max_bytes > 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        if not (math.isfinite(flush_s) and flush_s > 0):
            raise ValueError(f"flush_s must be > 0, got {flush_s}")
        if not member_bytes > 0:
            raise ValueError(f"member_bytes must be > 0, got {member_bytes}")
        if not queue_size > 0:
            raise ValueError(f"queue_size must be > 0, got {queue_size}")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.flush_s = float(flush_s)
        self.member_bytes = int(member_bytes)
        self.level = level
        self.fsync = fsync
        self.seed = seed
        self.records = 0
        self.dropped = 0
        self.commands = 0
        self.segments: list[Path] = []
        self.error: BaseException | None = None
        self._q: queue.Queue[Record | None] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self._engine: RecordedEngine | None = None
        self._sub: Any = None
        self._header: Header | None = None
        self._meta: telemetry.Meta | None = None
        self._segment_no = 0
        self._seg: _SegmentWriter | None = None
        self._last_t = 0.0
        self._closed = False
        self._writing = False  # the writer thread takes records
        self._lock = threading.Lock()

    # -- attaching ----------------------------------------------------------------------------
    def attach(self, engine: RecordedEngine) -> Recorder:
        """Start recording `engine`: its messages from now on, and every command sent through
        `engine.command` or `engine.handle_payload`. Returns self. Raises RecordingError when
        the file cannot be created."""
        if self._engine is not None or self._closed:
            raise RuntimeError("a Recorder records one engine, once")
        n = len(segment_paths(self.path))
        seg = None
        while seg is None:  # the next free segment number: a recording is never overwritten
            try:
                seg = _open_segment(segment_path(self.path, n), level=self.level, fsync=self.fsync)
            except FileExistsError:
                n += 1
        self._seg, self._segment_no = seg, n
        self.segments.append(seg.path)
        self._header = Header(
            fleet=engine.fleet,
            run_id=engine.run_id,
            seed=self.seed if self.seed is not None else _engine_seed(engine),
            rate_per_s=_engine_rate(engine),
            speed=engine.speed,
            read_only=bool(getattr(engine, "read_only", False)),
            segment=n,
            first_segment=n,
            started_ms=_wall_ms(),
            sim_time_s=engine.sim_time_s,
        )
        self._meta = engine.meta
        self._last_t = engine.sim_time_s
        self._engine = engine
        self._writing = True
        self._thread = threading.Thread(
            target=self._writer, name="fleet-twin-recorder", daemon=True
        )
        self._thread.start()
        # A subscriber whose put() stamps each message with the simulated time it was sent at
        # and hands it to the writer thread; the subscription's own queue stays unused.
        self._sub = engine.subscribe(maxsize=1)
        self._sub.put = self._on_message
        self._wrap_commands(engine)
        atexit.register(self.close)
        return self

    def _wrap_commands(self, engine: RecordedEngine) -> None:
        command: Callable[[telemetry.Command], Awaitable[telemetry.Reply]] = engine.command
        handle: Callable[[bytes], Awaitable[telemetry.Reply]] = engine.handle_payload

        async def recorded_command(cmd: telemetry.Command) -> telemetry.Reply:
            mark = _IN_PAYLOAD.get()
            if mark is not None:
                mark.append(True)
                _IN_PAYLOAD.set(None)  # a nested call is its own command
            reply = await command(cmd)
            self._on_command(cmd, reply, None)
            return reply

        async def recorded_payload(payload: bytes) -> telemetry.Reply:
            mark: list[bool] = []
            token = _IN_PAYLOAD.set(mark)
            try:
                reply = await handle(payload)
            finally:
                _IN_PAYLOAD.reset(token)
            if not mark:  # refused before it became a command
                self._on_command(None, reply, payload)
            return reply

        engine_vars = vars(engine)
        engine_vars["command"] = recorded_command
        engine_vars["handle_payload"] = recorded_payload
        self._wrappers = (recorded_command, recorded_payload)

    def _detach(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        engine_vars = vars(engine)
        for name, fn in zip(("command", "handle_payload"), self._wrappers, strict=True):
            if engine_vars.get(name) is fn:
                del engine_vars[name]
        if self._sub is not None:
            self._sub.close()
            self._sub = None

    # -- the engine's side (event-loop thread; never blocks) -----------------------------------
    def _enqueue(self, rec: Record) -> None:
        if not self._writing:
            self.dropped += 1
            return
        try:
            self._q.put_nowait(rec)
        except queue.Full:
            self.dropped += 1

    def _on_message(self, msg: telemetry.Message) -> None:
        engine = self._engine
        if engine is None:
            return
        self._enqueue(Msg(t=engine.sim_time_s, msg=msg))

    def _on_command(
        self, cmd: telemetry.Command | None, reply: telemetry.Reply, payload: bytes | None
    ) -> None:
        self.commands += 1
        if payload is None:
            self._enqueue(Cmd(t=reply.sim_time_s, cmd=cmd, reply=reply))
            return
        raw = payload.encode() if isinstance(payload, str) else bytes(payload)
        kept = base64.b64encode(raw[:MAX_KEPT_PAYLOAD]).decode("ascii")
        self._enqueue(
            Cmd(t=reply.sim_time_s, cmd=None, reply=reply, payload=kept, payload_bytes=len(raw))
        )

    # -- the writer thread --------------------------------------------------------------------
    def _writer(self) -> None:
        enc = msgspec.json.Encoder()
        buf = bytearray()
        noted = 0
        try:
            self._begin_segment(enc, buf)
            next_flush = time.monotonic() + self.flush_s
            stop = False
            while not stop:
                try:
                    item = self._q.get(timeout=max(0.0, next_flush - time.monotonic()))
                except queue.Empty:
                    item = None
                    pending = False
                else:
                    pending = True
                while pending:  # take what is queued, without waiting
                    if item is None:
                        stop = True
                        break
                    self._add(item, enc, buf)
                    if len(buf) >= 1 << 16:
                        self._write(buf, enc)
                    try:
                        item = self._q.get_nowait()
                    except queue.Empty:
                        pending = False
                if self.dropped > noted:
                    self._add(
                        Note(t=self._last_t, note="dropped", count=self.dropped - noted), enc, buf
                    )
                    noted = self.dropped
                self._write(buf, enc)
                if stop or time.monotonic() >= next_flush:
                    if self._seg is not None:
                        self._seg.flush()
                    next_flush = time.monotonic() + self.flush_s
            detail = f"{self.records} records, {self.dropped} messages dropped"
            self._add(Note(t=self._last_t, note="end", detail=detail, count=self.records), enc, buf)
            self._write(buf, enc)
        except BaseException as e:  # a full disk, a vanished directory: log once, stop recording
            self.error = e
            log.error("the recorder stopped: %s", e)
        finally:
            self._writing = False
            seg, self._seg = self._seg, None
            if seg is not None:
                with contextlib.suppress(OSError):
                    seg.close()

    def _add(self, rec: Record, enc: msgspec.json.Encoder, buf: bytearray) -> None:
        enc.encode_into(rec, buf, -1)
        buf.extend(b"\n")
        self.records += 1
        if isinstance(rec, Msg | Cmd):
            self._last_t = max(self._last_t, rec.t)

    def _write(self, buf: bytearray, enc: msgspec.json.Encoder) -> None:
        """Write whole lines; end the gzip member or rotate the segment when it is time."""
        seg = self._seg
        if not buf or seg is None:
            return
        seg.write(bytes(buf))
        buf.clear()
        if seg.bytes_out >= self.max_bytes:
            seg.close()
            self._segment_no += 1
            nxt = None
            while nxt is None:
                try:
                    nxt = _open_segment(
                        segment_path(self.path, self._segment_no),
                        level=self.level,
                        fsync=self.fsync,
                    )
                except FileExistsError:
                    self._segment_no += 1
            self._seg = nxt
            self.segments.append(nxt.path)
            self._begin_segment(enc, buf)
        elif seg.member_in >= self.member_bytes:
            seg.end_member()

    def _begin_segment(self, enc: msgspec.json.Encoder, buf: bytearray) -> None:
        """Header and meta: every segment can be read on its own."""
        assert self._header is not None
        header = msgspec.structs.replace(
            self._header, segment=self._segment_no, started_ms=_wall_ms(), sim_time_s=self._last_t
        )
        self._add(header, enc, buf)
        if self._meta is not None:
            self._add(Msg(t=self._last_t, msg=self._meta), enc, buf)
        seg = self._seg
        assert seg is not None
        seg.write(bytes(buf))
        buf.clear()
        seg.flush()

    # -- closing ------------------------------------------------------------------------------
    def close(self, timeout: float = 30.0) -> None:
        """Stop recording: detach from the engine, write what is queued and close the file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._detach()
        thread = self._thread
        if thread is not None and thread.is_alive():
            deadline = time.monotonic() + timeout
            while thread.is_alive():
                try:
                    self._q.put(None, timeout=0.1)
                    break
                except queue.Full:
                    if time.monotonic() > deadline:
                        break
            thread.join(max(0.0, deadline - time.monotonic()))
        atexit.unregister(self.close)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def record_engine(engine: RecordedEngine, path: str | Path, **kwargs: Any) -> Recorder:
    """Record `engine` to `path` (keyword arguments as for `Recorder`); close the returned
    recorder when done (it also closes itself when the interpreter exits)."""
    return Recorder(path, **kwargs).attach(engine)


# ------------------------------------------------------------------------------------------------
# reading


@dataclass
class ReadStats:
    """What a reader met on its way: filled in as records are read."""

    segments: int = 0
    records: int = 0
    bad_lines: int = 0  # lines that are not records (skipped)
    truncated: bool = False  # a segment ends in the middle of a write (a killed writer)
    problems: list[str] = field(default_factory=list)  # one line each


def _segment_lines(
    path: Path, offset: int = 0, stats: ReadStats | None = None
) -> Generator[tuple[int, bytes], None, None]:
    """(offset of the gzip member it is in, line) for every complete line of a segment, from the
    member at `offset`. A truncated or corrupt tail ends the iteration quietly (noted in stats)."""
    stats = stats if stats is not None else ReadStats()
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below (a generator)
    except OSError as e:
        stats.problems.append(f"{path}: cannot read ({e.strerror or e})")
        return
    with f:
        f.seek(offset)
        member = offset
        fed = 0  # compressed bytes of this member consumed
        d = zlib.decompressobj(31)
        buf = bytearray()
        skipping = False  # inside an over-long line
        data = b""
        while True:
            if not data:
                data = f.read(_READ_CHUNK)
                if not data:
                    if fed or buf:
                        stats.truncated = True
                        if buf:
                            stats.bad_lines += 1
                    return
            try:
                out = d.decompress(data, _OUT_CHUNK)
            except zlib.error as e:
                stats.truncated = True
                stats.problems.append(f"{path}: corrupt at byte {member + fed}: {e}")
                return
            rest = d.unused_data if d.eof else d.unconsumed_tail
            fed += len(data) - len(rest)
            data = rest
            if out:
                buf += out
                end = buf.rfind(b"\n")
                if end >= 0:
                    lines = bytes(buf[:end]).split(b"\n")
                    del buf[: end + 1]
                    for i, line in enumerate(lines):
                        if skipping and i == 0:
                            skipping = False
                            continue
                        if line:
                            yield member, line
                if len(buf) > MAX_LINE_BYTES:
                    if not skipping:
                        stats.bad_lines += 1
                        stats.problems.append(f"{path}: a line longer than {MAX_LINE_BYTES} bytes")
                    buf.clear()
                    skipping = True
            if d.eof:
                if buf:  # a member ends in the middle of a line: not written by a recorder
                    stats.bad_lines += 1
                    buf.clear()
                skipping = False
                member += fed
                fed = 0
                d = zlib.decompressobj(31)


def _check_first(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        raise RecordingError(f"{path}: cannot read ({e.strerror or e})") from None
    if magic != b"\x1f\x8b":
        raise RecordingError(f"{path}: not a fleet-twin recording (not gzip)")


def _check_header(path: Path, rec: Record | None) -> Header:
    if not isinstance(rec, Header) or rec.format != FORMAT:
        raise RecordingError(f"{path}: not a fleet-twin recording (no header line)")
    if rec.version > VERSION:
        raise RecordingError(
            f"{path}: recording format version {rec.version} is newer than this fleet-twin "
            f"reads ({VERSION})"
        )
    return rec


def read_records(path: str | Path, *, stats: ReadStats | None = None) -> Iterator[Record]:
    """Every record of a recording, in the order written, across its segments.

    Tolerant: a truncated last segment (a killed writer) ends the iteration after its last
    complete line; lines that are not records are skipped (counted in `stats`). Raises
    RecordingError when `path` does not exist or is not a recording."""
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    paths = segment_paths(path)
    if not paths:
        raise RecordingError(f"{path}: no such recording")
    _check_first(path)
    first = True
    for seg in paths:
        stats.segments += 1
        for _, line in _segment_lines(seg, 0, stats):
            try:
                rec = _DECODER.decode(line)
            except _NOT_A_RECORD:
                if first:
                    _check_header(path, None)
                stats.bad_lines += 1
                continue
            if first:
                _check_header(path, rec)
                first = False
            stats.records += 1
            yield rec
    if first:
        if stats.truncated:
            return  # killed before the header reached the disk: an empty recording
        raise RecordingError(f"{path}: not a fleet-twin recording (empty)")


# ------------------------------------------------------------------------------------------------
# playback (what `fleet-twin tui --replay` drives)


class Frame(NamedTuple):
    """A message of a recording and the simulated time it was sent at."""

    sim_time_s: float
    message: telemetry.Message


class _PeekMsg(msgspec.Struct):
    kind: str = ""


class _Peek(msgspec.Struct):
    """Just enough of a record to index it."""

    rec: str
    t: float = math.nan
    msg: _PeekMsg | None = None


_PEEK = msgspec.json.Decoder(_Peek)
_Picture = tuple[telemetry.Summary | None, dict[str, telemetry.Tier], dict[str, telemetry.Chips]]


@dataclass(frozen=True)
class _Member:
    segment: int  # index into Playback._paths
    offset: int  # compressed offset in the segment
    key: float  # the largest t of the run's records before this member (-inf for the first)


class Playback:
    """A recording opened for playback, one run of it (by default the first; `runs` lists them).

    Opening reads the file once to index it (gzip members and their simulated times); the
    messages are decoded as they are played. The cursor starts at the beginning:

        pb = Playback(path)
        pb.meta, pb.fleet, pb.start_s, pb.end_s, pb.duration_s
        picture = pb.seek(120.0)          # meta + the latest summary, tiers and chips before 120 s
        for frame in pb.messages(): ...   # Frame(sim_time_s, message) from the cursor, in order
        frames = pb.advance_to(121.5)     # the frames up to 121.5 s (for paced playback)

    `replies=True` also plays each recorded command's Reply (at the time it was applied)."""

    def __init__(self, path: str | Path, *, run: int | str = 0, replies: bool = False) -> None:
        self.path = Path(path)
        self.replies = replies
        self.stats = ReadStats()
        self._paths = segment_paths(self.path)
        if not self._paths:
            raise RecordingError(f"{self.path}: no such recording")
        _check_first(self.path)
        self.runs: list[Header] = []
        self._index(run)
        self._it: Iterator[Record] = iter(())
        self._peek: Frame | None = None
        self._pos = self.start_s
        self.seek(self.start_s)

    def _index(self, run: int | str) -> None:
        runs: list[tuple[Header, list[int]]] = []  # header, segment indices
        for i, seg in enumerate(self._paths):
            header: Header | None = None
            with contextlib.closing(_segment_lines(seg, 0, self.stats)) as lines:
                for _, line in lines:
                    with contextlib.suppress(*_NOT_A_RECORD):
                        rec = _DECODER.decode(line)
                        header = rec if isinstance(rec, Header) else None
                    break
            if header is None or header.format != FORMAT:
                if i == 0:
                    _check_header(self.path, header)
                self.stats.problems.append(f"{seg}: no header line; skipped")
                continue
            if not runs or header.first_segment == header.segment or header.segment != i:
                runs.append((header, [i]))
            else:
                runs[-1][1].append(i)
        self.runs = [h for h, _ in runs]
        if isinstance(run, str):
            chosen = [k for k, h in enumerate(self.runs) if h.run_id == run]
            if not chosen:
                ids = ", ".join(h.run_id for h in self.runs)
                raise RecordingError(f"{self.path}: no run {run!r} (runs: {ids})")
            k = chosen[0]
        else:
            if not -len(runs) <= run < len(runs):
                raise RecordingError(f"{self.path}: no run {run} ({len(runs)} runs)")
            k = run
        self.header, segs = runs[k]
        self.run_id = self.header.run_id
        self.fleet = self.header.fleet
        self._members: list[_Member] = []
        self._keys: list[float] = []
        self.meta: telemetry.Meta | None = None
        self.commands: list[Cmd] = []
        self.count = 0
        top = -math.inf
        start = math.inf
        for i in segs:
            last_member = -1
            for member, line in _segment_lines(self._paths[i], 0, self.stats):
                if member != last_member:
                    self._members.append(_Member(i, member, top))
                    self._keys.append(top)
                    last_member = member
                try:
                    peek = _PEEK.decode(line)
                except _NOT_A_RECORD:
                    self.stats.bad_lines += 1
                    continue
                if peek.rec == "msg" and peek.msg is not None and peek.msg.kind == "meta":
                    if self.meta is None:
                        rec = self._decode(line)
                        if isinstance(rec, Msg) and isinstance(rec.msg, telemetry.Meta):
                            self.meta = rec.msg
                    continue  # the meta at the head of every segment is not a frame
                if peek.rec == "cmd":
                    rec = self._decode(line)
                    if isinstance(rec, Cmd):
                        self.commands.append(rec)
                if peek.rec in ("msg", "cmd") and math.isfinite(peek.t):
                    self.count += 1
                    start = min(start, peek.t)
                    top = max(top, peek.t)
        self.start_s = start if math.isfinite(start) else self.header.sim_time_s
        self.end_s = top if math.isfinite(top) else self.start_s

    def _decode(self, line: bytes) -> Record | None:
        try:
            return _DECODER.decode(line)
        except _NOT_A_RECORD:
            self.stats.bad_lines += 1
            return None

    @property
    def duration_s(self) -> float:
        """Simulated seconds from the first message to the last."""
        return self.end_s - self.start_s

    @property
    def position_s(self) -> float:
        """Simulated time of the next frame (end_s at the end)."""
        return self._peek.sim_time_s if self._peek is not None else self._pos

    @property
    def at_end(self) -> bool:
        if self._peek is None:
            self._peek = self._next()
        return self._peek is None

    def _records_from(self, k: int) -> Iterator[Record]:
        """The run's records from member k on."""
        if not self._members:
            return
        first = self._members[k]
        segs = sorted({m.segment for m in self._members[k:]})
        for i in segs:
            offset = first.offset if i == first.segment else 0
            for _, line in _segment_lines(self._paths[i], offset, ReadStats()):
                with contextlib.suppress(*_NOT_A_RECORD):
                    yield _DECODER.decode(line)

    def _frame(self, rec: Record) -> Frame | None:
        if isinstance(rec, Msg):
            return None if isinstance(rec.msg, telemetry.Meta) else Frame(rec.t, rec.msg)
        if isinstance(rec, Cmd) and self.replies:
            return Frame(rec.t, rec.reply)
        return None

    def _next(self) -> Frame | None:
        if self._peek is not None:
            peeked, self._peek = self._peek, None
            return peeked
        for rec in self._it:
            frame = self._frame(rec)
            if frame is not None:
                return frame
        return None

    def seek(self, sim_time_s: float) -> list[telemetry.Message]:
        """Put the cursor on the first message sent at or after `sim_time_s` (clamped to the
        recording) and return the picture at that time: meta, then the latest summary, tier
        (per tier) and chips (per tier) sent before it, for a console to repaint from."""
        t = min(max(float(sim_time_s), self.start_s), self.end_s)
        if math.isnan(t):
            t = self.start_s
        k = max(0, bisect.bisect_left(self._keys, t) - 1)
        back = 1
        while True:  # read from far enough back to find every part of the picture
            start = max(0, k - back)
            picture = self._scan(start, t)
            if start == 0 or self._complete(picture):
                break
            back *= 2
        summary, tiers, chips = picture
        out: list[telemetry.Message] = [] if self.meta is None else [self.meta]
        if summary is not None:
            out.append(summary)
        out.extend(tiers.values())
        out.extend(chips.values())
        return out

    def _scan(self, start: int, t: float) -> _Picture:
        """Read from member `start` to the first message at or after t (the cursor), noting the
        latest summary, tiers and chips on the way."""
        it = self._records_from(start)
        summary: telemetry.Summary | None = None
        tiers: dict[str, telemetry.Tier] = {}
        chips: dict[str, telemetry.Chips] = {}
        self._peek = None
        for rec in it:
            frame = self._frame(rec)
            if frame is None:
                continue
            if frame.sim_time_s >= t and isinstance(rec, Msg):
                self._peek = frame
                break
            msg = frame.message
            if isinstance(msg, telemetry.Summary):
                summary = msg
            elif isinstance(msg, telemetry.Tier):
                tiers[msg.tier] = msg
            elif isinstance(msg, telemetry.Chips):
                chips[msg.tier] = msg
        self._it = it
        self._pos = t if self._peek is not None else self.end_s
        return summary, tiers, chips

    def _complete(self, picture: _Picture) -> bool:
        summary, tiers, chips = picture
        names = {tier.name for tier in self.meta.tiers} if self.meta is not None else set()
        return summary is not None and names <= tiers.keys() and names <= chips.keys()

    def messages(self) -> Iterator[Frame]:
        """Frames from the cursor to the end, in the order recorded; the cursor follows."""
        while (frame := self._next()) is not None:
            self._pos = frame.sim_time_s
            yield frame
        self._pos = self.end_s

    def advance_to(self, sim_time_s: float) -> list[Frame]:
        """The frames from the cursor up to and including `sim_time_s`; the cursor moves past
        them (a paced player calls this with its clock's simulated time)."""
        out: list[Frame] = []
        while (frame := self._next()) is not None:
            if frame.sim_time_s > sim_time_s:
                self._peek = frame
                return out
            out.append(frame)
            self._pos = frame.sim_time_s
        self._pos = self.end_s
        return out
