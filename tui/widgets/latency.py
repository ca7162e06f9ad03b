"""Latency: TTFT and TPOT p50 / p99 against the SLO lines, goodput, and their histories."""

from __future__ import annotations

from collections.abc import Iterable

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from tui.format import duration, percent, spark
from twin import telemetry

__all__ = ["LatencyPanel"]

_DIM = Style(dim=True)
_OK = Style(color="#5fd75f")
_WARN = Style(color="#ffd75f", bold=True)
_BAD = Style(color="#ff5f5f", bold=True)
_SPARK = Style(color="#5fafd7")


def _vs_slo(v: float, slo: float) -> Style:
    if v < 0:
        return _DIM
    return _BAD if v > slo else _WARN if v > 0.8 * slo else _OK


class LatencyPanel(Widget):
    """Fleet latency percentiles over the twin's window, with the SLOs, goodput and history."""

    DEFAULT_CSS = """
    LatencyPanel {
        height: 1fr;
        text-wrap: nowrap;
        text-overflow: clip;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._text = Text("waiting for the twin…", style=_DIM)
        self._args: tuple[object, ...] | None = None

    def show(
        self,
        meta: telemetry.Meta,
        s: telemetry.Summary,
        ttft: Iterable[float],
        tpot: Iterable[float],
        goodput: Iterable[float],
    ) -> None:
        self._args = (meta, s, list(ttft), list(tpot), list(goodput))
        self.refresh()

    def render(self) -> Text:
        if self._args is None:
            return self._text
        meta, s, ttft, tpot, goodput = self._args
        assert isinstance(meta, telemetry.Meta) and isinstance(s, telemetry.Summary)
        width = max(24, self.size.width)
        out = Text(no_wrap=True, overflow="crop")
        w = max(7, min(10, (width - 5) // 3))
        out.append(f"{'':5}{'p50':>{w}}{'p99':>{w}}{'SLO':>{w}}\n", _DIM)
        for name, p50, p99, slo in (
            ("TTFT", s.ttft_p50_s, s.ttft_p99_s, meta.slo_ttft_s),
            ("TPOT", s.tpot_p50_s, s.tpot_p99_s, meta.slo_tpot_s),
        ):
            out.append(f"{name:<5}", Style(bold=True))
            out.append(f"{duration(p50, ''):>{w}}", _vs_slo(p50, slo))
            over = "✗" if p99 > slo else ""  # over the SLO: a glyph, not colour alone
            out.append(f"{over + duration(p99, ''):>{w}}", _vs_slo(p99, slo))
            out.append(f"{'≤' + duration(slo, ''):>{w}}\n", _DIM)
        g = s.goodput_fraction
        out.append("goodput ", Style(bold=True))
        g_style = _DIM if g < 0 else _BAD if g < 0.9 else _WARN if g < 0.99 else _OK
        out.append(f"{percent(g, 1):>6} ", g_style)
        assert isinstance(goodput, list)
        out.append(spark(goodput, max(4, width - 15), top=1.0), _SPARK)
        label_w = 9
        spark_w = max(4, width - label_w)
        for name, hist, slo in (
            ("p99 TTFT", ttft, meta.slo_ttft_s),
            ("p99 TPOT", tpot, meta.slo_tpot_s),
        ):
            out.append(f"\n{name:<{label_w}}", _DIM)
            assert isinstance(hist, list)
            self._spark_vs(out, hist, slo, spark_w)
        return out

    @staticmethod
    def _spark_vs(out: Text, hist: list[float], slo: float, width: int) -> None:
        """History scaled so that the top of the cell is the SLO line; over it is red."""
        vals = hist[-width:]
        out.append(" " * (width - len(vals)))
        for v in vals:
            ch = spark([v], 1, top=slo)
            out.append(ch, _BAD if v > slo else _SPARK)
