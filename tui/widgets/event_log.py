"""The event log: the twin's events (failures, recoveries, routing and load changes, SLO breaches),
every command's reply, and the console's own notes (read-only refusals, link changes), each with
the simulated time."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.events import Resize
from textual.widgets import RichLog

from tui.format import sim_clock, truncate
from tui.store import LogEntry

__all__ = ["EventLog"]

_GLYPH = {
    "info": ("·", Style(color="#87afd7")),
    "ok": ("✓", Style(color="#5fd75f", bold=True)),
    "warning": ("!", Style(color="#ffd75f", bold=True)),
    "error": ("✗", Style(color="#ff5f5f", bold=True)),
}
_DIM = Style(dim=True)


class EventLog(RichLog):
    """The newest line at the bottom; scroll back with the mouse or the keys when focused.
    Long lines wrap: an error message is never cut off."""

    DEFAULT_CSS = """
    EventLog {
        scrollbar-size-vertical: 1;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(
            id=id, classes=classes, max_lines=1000, wrap=True, markup=False, highlight=False
        )
        #: Lines written so far (the newest entry's seq).
        self.last_seq = 0
        self._pending: list[LogEntry] = []

    def add(self, entry: LogEntry) -> None:
        """Write one entry (held back until the log knows its width, so that it wraps right)."""
        self.last_seq = entry.seq
        if self.scrollable_content_region.width <= 0:
            self._pending.append(entry)
            return
        self._write(entry)

    def on_resize(self, event: Resize) -> None:
        # (RichLog's own on_resize runs too: Textual calls the handlers of every class)
        pending, self._pending = self._pending, []
        for entry in pending:
            self._write(entry)

    def _write(self, entry: LogEntry) -> None:
        glyph, style = _GLYPH.get(entry.severity, ("·", _DIM))
        line = Text()
        line.append(f"{sim_clock(entry.sim_time_s):>11} ", _DIM)
        line.append(glyph + " ", style)
        line.append(f"{truncate(entry.kind, 16):<16} ", style)
        if entry.kind == "reply":  # the command in full, then what the twin said
            line.append(f"{entry.target}: ", Style(bold=True))
        else:
            line.append(f"{truncate(entry.target, 24):<24} ")
        line.append(entry.text, style if entry.severity == "error" else None)
        self.write(line, width=max(20, self.scrollable_content_region.width))
