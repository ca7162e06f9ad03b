"""What the console knows about the twin: the latest message of each kind (per tier), short
histories for the sparklines, and the event log's entries.

The telemetry worker feeds every message to `FleetStore.apply` (cheap: no drawing); the screen
reads the store on its own timer. Versions tell the widgets whether anything changed since they
last drew. Histories advance with simulated time, so they freeze while the twin is paused.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from twin import telemetry

__all__ = ["HISTORY", "FleetStore", "LogEntry"]

#: Points kept per history (the widest sparkline shows this many).
HISTORY = 120
#: A tier's history gets a point when simulated time advanced at least this much since its last.
TIER_STEP_S = 0.5
#: The fleet's latency / goodput history: one point per this much simulated time.
SUMMARY_STEP_S = 1.0
#: Event log entries kept.
LOG_SIZE = 1000


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One line of the event log: a twin event, a command's reply, or a console note."""

    seq: int
    sim_time_s: float
    severity: str  # info | warning | error | ok
    kind: str  # chip_failed, reply, read-only, link, ...
    target: str
    text: str


class FleetStore:
    """Latest telemetry by kind and tier, histories, and the log."""

    def __init__(self) -> None:
        self.meta: telemetry.Meta | None = None
        self.status: telemetry.Status | None = None
        self.summary: telemetry.Summary | None = None
        self.tiers: dict[str, telemetry.Tier] = {}
        self.chips: dict[str, telemetry.Chips] = {}
        #: Per tier: the tier's headline rate (prefill tokens/s for prefill tiers, else tokens/s).
        self.tier_history: dict[str, deque[float]] = {}
        self.ttft_history: deque[float] = deque(maxlen=HISTORY)
        self.tpot_history: deque[float] = deque(maxlen=HISTORY)
        self.goodput_history: deque[float] = deque(maxlen=HISTORY)
        self.tokens_history: deque[float] = deque(maxlen=HISTORY)
        self.log: deque[LogEntry] = deque(maxlen=LOG_SIZE)
        self.log_seq = 0
        self.meta_version = 0
        self.summary_version = 0
        self.tiers_version = 0
        self.chips_version = 0
        self.received = 0
        self._tier_last_t: dict[str, float] = {}
        self._summary_last_t: float | None = None

    @property
    def sim_time_s(self) -> float:
        return self.summary.sim_time_s if self.summary is not None else 0.0

    # -- messages ----------------------------------------------------------------------------
    def apply(self, msg: telemetry.Message) -> None:
        self.received += 1
        if isinstance(msg, telemetry.Summary):
            self._summary(msg)
        elif isinstance(msg, telemetry.Tier):
            self._tier(msg)
        elif isinstance(msg, telemetry.Chips):
            self.chips[msg.tier] = msg
            self.chips_version += 1
        elif isinstance(msg, telemetry.Event):
            sev = msg.severity
            self.note(msg.sim_time_s, sev, msg.event, msg.target, msg.detail)
        elif isinstance(msg, telemetry.Meta):
            self._meta(msg)
        elif isinstance(msg, telemetry.Status):
            self.status = msg

    def _meta(self, meta: telemetry.Meta) -> None:
        old = self.meta
        self.meta = meta
        if old is not None and old.run_id == meta.run_id and old.tiers == meta.tiers:
            return
        if old is not None:  # another run of the twin: what we had belongs to the old one
            self.summary = None
            self.tiers.clear()
            self.chips.clear()
            self.tier_history.clear()
            self._tier_last_t.clear()
            for h in (self.ttft_history, self.tpot_history, self.goodput_history):
                h.clear()
            self.tokens_history.clear()
            self._summary_last_t = None
            self.note(0.0, "info", "meta", meta.fleet, f"new run {meta.run_id} of the twin")
        self.meta_version += 1
        self.summary_version += 1
        self.tiers_version += 1
        self.chips_version += 1

    def _summary(self, s: telemetry.Summary) -> None:
        self.summary = s
        self.summary_version += 1
        last = self._summary_last_t
        if last is None or s.sim_time_s >= last + SUMMARY_STEP_S or s.sim_time_s < last:
            self._summary_last_t = s.sim_time_s
            self.ttft_history.append(s.ttft_p99_s)
            self.tpot_history.append(s.tpot_p99_s)
            self.goodput_history.append(s.goodput_fraction)
            self.tokens_history.append(s.tokens_per_s)

    def _tier(self, t: telemetry.Tier) -> None:
        self.tiers[t.tier] = t
        self.tiers_version += 1
        now = self.sim_time_s
        last = self._tier_last_t.get(t.tier)
        if last is None or now >= last + TIER_STEP_S or now < last:
            self._tier_last_t[t.tier] = now
            hist = self.tier_history.setdefault(t.tier, deque(maxlen=HISTORY))
            hist.append(t.prefill_tokens_per_s if t.role == "prefill" else t.tokens_per_s)

    # -- the log -----------------------------------------------------------------------------
    def note(self, sim_time_s: float, severity: str, kind: str, target: str, text: str) -> LogEntry:
        """Add a line to the event log."""
        self.log_seq += 1
        entry = LogEntry(self.log_seq, sim_time_s, severity, kind, target, text)
        self.log.append(entry)
        return entry

    def log_since(self, seq: int) -> list[LogEntry]:
        """Entries newer than `seq`, oldest first."""
        if not self.log or self.log[-1].seq <= seq:
            return []
        return [e for e in self.log if e.seq > seq]
