"""The header: fleet, simulated time, speed or paused, lag, the link, arrivals per second (line 1);
throughput, request counters, power and failures (line 2)."""

from __future__ import annotations

import time

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from tui.format import duration, si, sim_clock, speed_text, watts
from twin import telemetry

__all__ = ["FleetHeader"]

_DIM = Style(dim=True)
_SEP = (" │ ", _DIM)
_OK = Style(color="#5fd75f", bold=True)
_WARN = Style(color="#ffd75f", bold=True)
_BAD = Style(color="#ff5f5f", bold=True)
_STALE = Style(color="#000000", bgcolor="#ffd75f", bold=True)
_OFFLINE = Style(color="#ffffff", bgcolor="#d70000", bold=True)
_REPLAY = Style(color="#000000", bgcolor="#87d7ff", bold=True)


class FleetHeader(Widget):
    """Two dense lines about the whole fleet and the link to its twin."""

    DEFAULT_CSS = """
    FleetHeader {
        height: 2;
        width: 1fr;
        background: $panel;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._text = Text("fleet-twin: connecting…")

    def show(
        self,
        *,
        fleet: str,
        meta: telemetry.Meta | None,
        summary: telemetry.Summary | None,
        link_state: str,
        where: str,
        stale_since: float | None,
        link_detail: str,
        read_only: bool,
        failed_chips: int,
        draining_chips: int,
    ) -> None:
        one = Text(no_wrap=True, overflow="ellipsis")
        one.append(f" {meta.fleet if meta else fleet} ", Style(bold=True, reverse=True))
        if read_only:
            one.append(" READ-ONLY ", Style(bold=True, color="#000000", bgcolor="#d7afff"))
        one.append(" ")
        if summary is not None:
            one.append("sim ", _DIM)
            one.append(sim_clock(summary.sim_time_s), Style(bold=True))
            one.append(*_SEP)
            if summary.paused:
                one.append("❚❚ PAUSED", _WARN)
                one.append(f" ({speed_text(summary.speed)})", _DIM)
            else:
                one.append(f"▶ {speed_text(summary.speed)}", _OK)
            lag = summary.lag_s
            lag_style = _BAD if lag > 5 else _WARN if lag > 1 else None
            one.append("  lag ", _DIM)
            one.append(duration(lag) if lag > 0 else "0", lag_style)
            one.append(*_SEP)
        self._link(one, link_state, where, stale_since, link_detail)
        if summary is not None:
            one.append(*_SEP)
            one.append(f"{summary.arrivals_per_s:.1f}", Style(bold=True))
            one.append(f" req/s (rate {summary.rate_per_s:g})", _DIM)
            one.append(*_SEP)
            one.append(summary.policy)

        two = Text(no_wrap=True, overflow="ellipsis")
        if summary is None:
            two.append(" waiting for the twin's figures…", _DIM)
        else:
            two.append(" ")
            two.append(si(summary.tokens_per_s), Style(bold=True))
            two.append(" tok/s", _DIM)
            two.append(f" (prefill {si(summary.prefill_tokens_per_s)})", _DIM)
            two.append(*_SEP)
            two.append(f"in flight {summary.in_flight}  done {summary.done}  ")
            two.append(f"rejected {summary.rejected}", _BAD if summary.rejected else None)
            two.append(f"  retries {summary.retries}", _WARN if summary.retries else None)
            two.append(*_SEP)
            two.append(watts(summary.power_w), Style(bold=True))
            two.append(f"  {si(summary.tokens_per_joule)} tok/J", _DIM)
            two.append(*_SEP)
            if failed_chips:
                s = "s" if failed_chips != 1 else ""
                two.append(f"✗ {failed_chips} chip{s} failed", _BAD)
            else:
                two.append("all chips up", _DIM)
            if draining_chips:
                two.append(f"  ◌ {draining_chips} draining", _WARN)
            if meta is not None:
                two.append(*_SEP)
                two.append(meta.model, _DIM)
            if summary.dropped_snapshots:
                two.append(f"  ({summary.dropped_snapshots} snapshots dropped)", _WARN)
        text = Text("\n").join([one, two])
        if text.plain != self._text.plain or text.spans != self._text.spans:
            self._text = text
            self.refresh()

    @staticmethod
    def _link(out: Text, state: str, where: str, stale_since: float | None, detail: str) -> None:
        since = ""
        if stale_since is not None:
            since = f" since {max(0, int(time.monotonic() - stale_since))} s"
        if state == "embedded":
            out.append("● embedded", _OK)
        elif state == "replay":
            out.append(" ◆ REPLAY ", _REPLAY)
            out.append(f" {where.removeprefix('replay ')}")
        elif state == "connected":
            out.append("● ", _OK)
            out.append(where)
        elif state == "stale":
            out.append(f" ◌ STALE{since} ", _STALE)
            out.append(f" {where}", _DIM)
        else:
            out.append(f" ✗ OFFLINE{since} ", _OFFLINE)
            out.append(f" {where}", _DIM)
        if detail:
            out.append(f" ({detail})", _DIM)

    def render(self) -> Text:
        return self._text
