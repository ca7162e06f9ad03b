"""The tiers: one row per tier, grouped prefill / decode / unified, each group headed by its totals.

Columns (dropped from the least important when the panel is narrow): tier (≈ when its hardware
figures include estimates), vendor and system, instances up of total (◌n draining), queue depth,
utilisation bar, tokens/s (prefill tokens/s for prefill tiers) with its history, KV occupancy,
power and tokens per joule.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from tui.format import NO_DATA_TEXT, bar, percent, si, spark, truncate, util_style, watts
from twin import telemetry

__all__ = ["ESTIMATE_MARK", "TierTable"]

ESTIMATE_MARK = "≈"
ROLE_ORDER = ("prefill", "decode", "unified")
ROLE_STYLE = {
    "prefill": Style(color="#5fafd7", bold=True),
    "decode": Style(color="#d787d7", bold=True),
    "unified": Style(color="#87d787", bold=True),
}
_DIM = Style(dim=True)
_BAD = Style(color="#ff5f5f", bold=True)
_WARN = Style(color="#ffd75f")


@dataclass(slots=True)
class _Col:
    key: str
    header: str
    width: int
    priority: int  # 0 = never dropped; higher numbers go first
    right: bool = True
    max_width: int = 0  # > width: takes spare room up to this


def _label(t: telemetry.TierMeta) -> str:
    """The tier's name without its role suffix: the table is grouped by role already."""
    suffix = f"-{t.role}"
    return t.name[: -len(suffix)] if t.name.endswith(suffix) and t.name != suffix else t.name


def _rate(t: telemetry.Tier) -> float:
    return t.prefill_tokens_per_s if t.role == "prefill" else t.tokens_per_s


class TierTable(Widget):
    """Every tier of the fleet as one dense row."""

    DEFAULT_CSS = """
    TierTable {
        height: auto;
        width: 1fr;
        text-wrap: nowrap;
        text-overflow: clip;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._meta: telemetry.Meta | None = None
        self._tiers: Mapping[str, telemetry.Tier] = {}
        self._history: Mapping[str, deque[float]] = {}

    def show(
        self,
        meta: telemetry.Meta,
        tiers: Mapping[str, telemetry.Tier],
        history: Mapping[str, deque[float]],
    ) -> None:
        """New figures (the latest tier message of each tier, and their histories)."""
        relayout = self._meta is None or len(meta.tiers) != len(self._meta.tiers)
        self._meta, self._tiers, self._history = meta, tiers, history
        self.refresh(layout=relayout)

    def _columns(self, width: int) -> list[_Col]:
        meta = self._meta
        assert meta is not None
        name_w = min(22, max(len(_label(t)) for t in meta.tiers) + 1) if meta.tiers else 5
        up_w = max(5, max((len(f"{t.instances}/{t.instances}◌") for t in meta.tiers), default=5))
        cols = [
            _Col("name", "tier", name_w, 0, right=False),
            _Col("system", "system", 10, 6, right=False, max_width=30),
            _Col("up", "up", up_w, 0),
            _Col("queue", "queue", 5, 2),
            _Col("util", "util", 8, 1, right=False, max_width=12),
            _Col("rate", "tok/s", 6, 0),
            _Col("hist", "history", 6, 5, right=False, max_width=24),
            _Col("kv", "KV", 4, 4),
            _Col("power", "power", 6, 3),
            _Col("tpj", "tok/J", 5, 4),
        ]

        def need(cs: list[_Col]) -> int:
            return sum(c.width for c in cs) + len(cs) - 1

        while need(cols) > width and any(c.priority > 0 for c in cols):
            worst = max(cols, key=lambda c: c.priority)
            cols.remove(worst)
        spare = width - need(cols)
        by_key = {c.key: c for c in cols}
        # spare room: a readable bar and history first, then the system's name, then more history
        steps = (
            ("util", 10),
            ("hist", 8),
            ("system", 16),
            ("hist", 16),
            ("system", 30),
            ("util", 12),
            ("hist", 24),
        )
        for key, upto in steps:
            c = by_key.get(key)
            if c is not None and spare > 0 and upto > c.width:
                grow = min(spare, upto - c.width, c.max_width - c.width)
                c.width += grow
                spare -= grow
        return cols

    def render(self) -> Text:
        meta = self._meta
        if meta is None:
            return Text("waiting for the twin's topology…", style=_DIM)
        width = max(20, self.size.width - 1)  # room for the panel's scrollbar
        cols = self._columns(width)
        out = Text(no_wrap=True, overflow="crop")
        head = Text(no_wrap=True)
        for i, c in enumerate(cols):
            if i:
                head.append(" ")
            head.append(c.header.rjust(c.width) if c.right else c.header.ljust(c.width))
        out.append_text(Text(head.plain, style=_DIM))
        for role in (*ROLE_ORDER, *sorted({t.role for t in meta.tiers} - set(ROLE_ORDER))):
            group = [t for t in meta.tiers if t.role == role]
            if not group:
                continue
            out.append("\n")
            out.append_text(self._group_line(role, group, width))
            for tm in group:
                out.append("\n")
                out.append_text(self._row(tm, cols))
        return out

    def _group_line(self, role: str, group: list[telemetry.TierMeta], width: int) -> Text:
        msgs = [self._tiers[t.name] for t in group if t.name in self._tiers]
        up = sum(m.instances_up for m in msgs)
        total = sum(t.instances for t in group)
        rate = sum(_rate(m) for m in msgs)
        power = sum(m.power_w for m in msgs)
        what = "prefill tok/s" if role == "prefill" else "tok/s"
        line = Text(no_wrap=True)
        line.append(f"▾ {role.upper()}", ROLE_STYLE.get(role, Style(bold=True)))
        line.append(f"  {len(group)} tier{'s' if len(group) != 1 else ''}", _DIM)
        if msgs:
            line.append("  ·  ", _DIM)
            line.append(f"{up}/{total} up", _BAD if up < total else None)
            line.append(f"  ·  {si(rate)} {what}  ·  {watts(power)}", _DIM)
        line.truncate(width)
        return line

    def _row(self, tm: telemetry.TierMeta, cols: list[_Col]) -> Text:
        t = self._tiers.get(tm.name)
        row = Text(no_wrap=True)
        for i, c in enumerate(cols):
            if i:
                row.append(" ")
            text, style = self._cell(c, tm, t)
            text = truncate(text, c.width)
            pad = c.width - len(text)
            if c.right:
                row.append(" " * pad)
            if isinstance(style, list):  # pre-styled pieces
                for piece, st in style:
                    row.append(piece, st)
            else:
                row.append(text, style)
            if not c.right:
                row.append(" " * pad)
        return row

    def _cell(
        self, c: _Col, tm: telemetry.TierMeta, t: telemetry.Tier | None
    ) -> tuple[str, Style | list[tuple[str, Style | None]] | None]:
        key = c.key
        if key == "name":
            name = truncate(_label(tm), c.width - 1)
            mark = ESTIMATE_MARK if tm.estimated else ""
            return name + mark, [
                (name, ROLE_STYLE.get(tm.role)),
                (mark, Style(color="#ffaf5f", bold=True)),
            ]
        if key == "system":
            host = f"+{tm.host_system}" if tm.host_system else ""
            for text in (f"{tm.vendor} {tm.system_name}{host}", f"{tm.vendor} {tm.system}{host}"):
                if len(text) <= c.width:
                    return text, None
            return f"{tm.vendor} {tm.system}{host}", None
        if t is None:
            return NO_DATA_TEXT, _DIM
        if key == "up":
            text = f"{t.instances_up}/{t.instances}"
            drain = f"◌{t.instances_draining}" if t.instances_draining else ""
            style = _BAD if t.instances_up < t.instances else None
            return text + drain, [(text, style), (drain, _WARN)]
        if key == "queue":
            return str(t.queue), (_WARN if t.queue > 0 else _DIM)
        if key == "util":
            u = t.utilisation
            pct = percent(u).rjust(4)
            b = bar(u, c.width - 5)
            return b + " " + pct, [(b, util_style(u)), (" " + pct, None)]
        if key == "rate":
            return si(_rate(t)), Style(bold=True)
        if key == "hist":
            h = spark(self._history.get(tm.name, ()), c.width)
            return h, Style(color="#5fafd7" if tm.role == "prefill" else "#d787d7")
        if key == "kv":
            if tm.role == "prefill":
                return NO_DATA_TEXT, _DIM
            kv = t.kv_used_fraction
            return percent(kv), (_BAD if kv > 0.9 else _WARN if kv > 0.75 else None)
        if key == "power":
            return watts(t.power_w).replace(" ", ""), None
        if key == "tpj":
            return si(t.tokens_per_joule), None
        return "", None
