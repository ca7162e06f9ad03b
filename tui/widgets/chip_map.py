"""The chip map: every chip of the fleet as one cell, drawn with the line API (no widget per chip).

Tiers flow across the width as blocks (`label ■■■■ ■■■■`), grouped by role (prefill, decode,
unified: each group starts a line); inside a block the chips are grouped by instance, one space
between instances. A cell's colour is its utilisation; its glyph is its state, so a failed or
draining chip is told apart without colour:

    ■ chip up   ▣ instance (collapsed)   ✗ failed   ◌ draining   · no data yet

When the map does not fit its height, instances collapse to one cell, the largest first (mode
"auto"); `c` cycles auto / every chip / every instance collapsed. Arrow keys, Home/End, PgUp/PgDn
and the mouse move the selection; the screen shows the selected chip in the detail panel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from tui.format import util_style
from twin import telemetry

__all__ = ["ChipMap", "ChipRef"]

CollapseMode = Literal["auto", "chips", "instances"]
_MODES: tuple[CollapseMode, ...] = ("auto", "chips", "instances")
ROLE_ORDER = ("prefill", "decode", "unified")
_ROLE_STYLE = {
    "prefill": Style(color="#5fafd7", bold=True),
    "decode": Style(color="#d787d7", bold=True),
    "unified": Style(color="#87d787", bold=True),
}
_FAILED = Style(color="#ff5f5f", bold=True)
_DRAINING = Style(color="#ffd75f", bold=True)
_UNKNOWN = Style(color="#6c6c6c")
_SELECTED = Style(bgcolor="#d0d0d0", bold=True)


@dataclass(frozen=True, slots=True)
class ChipRef:
    """A selected cell: one chip, or (chip None) an instance shown collapsed."""

    tier: str
    instance: int
    chip: int | None

    @property
    def instance_id(self) -> str:
        return f"{self.tier}/{self.instance}"

    @property
    def chip_id(self) -> str:
        """The chip's id; for a collapsed instance, its first chip."""
        return f"{self.tier}/{self.instance}/{self.chip or 0}"


@dataclass(slots=True)
class _Tier:
    name: str
    role: str
    instances: int
    per_instance: int  # chips per instance, kv-host chips included


@dataclass(slots=True)
class _Cell:
    tier: int
    inst: int
    lo: int  # first chip (index into the tier's chip arrays)
    hi: int  # one past the last
    row: int = 0
    x: int = 0


class ChipMap(ScrollView, can_focus=True):
    """Every chip as a cell, grouped by tier and instance, coloured by utilisation."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("left", "move(-1)", "Previous chip", show=False),
        Binding("right", "move(1)", "Next chip", show=False),
        Binding("up", "move_line(-1)", "Chip above", show=False),
        Binding("down", "move_line(1)", "Chip below", show=False),
        Binding("home", "first", "First chip", show=False),
        Binding("end", "last", "Last chip", show=False),
        Binding("pageup", "move_line(-5)", "Five lines up", show=False),
        Binding("pagedown", "move_line(5)", "Five lines down", show=False),
        Binding("c", "cycle_collapse", "Collapse mode", show=False),
    ]

    cursor: reactive[int] = reactive(0, always_update=True, repaint=False)
    """Index of the selected cell (in reading order)."""

    mode: reactive[CollapseMode] = reactive("auto", repaint=False)
    """auto: collapse the largest instances until the map fits; chips: never; instances: all."""

    class Selected(Message):
        """The selection moved to another cell."""

        def __init__(self, ref: ChipRef | None) -> None:
            super().__init__()
            self.ref = ref

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._tiers: list[_Tier] = []
        self._tier_index: dict[str, int] = {}
        self._chips: dict[str, telemetry.Chips] = {}
        self._cells: list[_Cell] = []
        self._rows: list[list[int]] = []  # cell indices on each row, left to right
        self._labels: list[list[tuple[int, str, Style]]] = []  # (x, text, style) per row
        self._strips: list[Strip | None] = []
        self._layout_key: tuple[int, int, str] = (-1, -1, "")
        self._selected: ChipRef | None = None
        self.collapsed_instances = 0
        self.failed = 0
        self.draining = 0

    # -- data ----------------------------------------------------------------------------------
    def set_meta(self, meta: telemetry.Meta) -> None:
        """The fleet's tiers (order: prefill, decode, unified; then as in the fleet file)."""
        tiers = sorted(
            meta.tiers,
            key=lambda t: ROLE_ORDER.index(t.role) if t.role in ROLE_ORDER else len(ROLE_ORDER),
        )
        self._tiers = [
            _Tier(t.name, t.role, t.instances, max(1, t.chips // max(1, t.instances)))
            for t in tiers
        ]
        self._tier_index = {t.name: i for i, t in enumerate(self._tiers)}
        self._chips = {}
        self._layout_key = (-1, -1, "")
        self._relayout()

    def set_chips(self, chips: dict[str, telemetry.Chips]) -> None:
        """The latest per-chip arrays of each tier."""
        self._chips = dict(chips)
        failed = draining = 0
        for c in self._chips.values():
            for s in c.state:
                if s == "failed":
                    failed += 1
                elif s == "draining":
                    draining += 1
        self.failed, self.draining = failed, draining
        self._strips = [None] * len(self._rows)
        self.refresh()

    @property
    def chip_count(self) -> int:
        return sum(t.instances * t.per_instance for t in self._tiers)

    @property
    def selected(self) -> ChipRef | None:
        return self._selected

    def chip_state(self, ref: ChipRef) -> tuple[str, float, float] | None:
        """(state, utilisation, power W) of a chip, None before its tier's first chip message."""
        i = self._tier_index.get(ref.tier)
        chips = self._chips.get(ref.tier)
        if i is None or chips is None:
            return None
        j = ref.instance * self._tiers[i].per_instance + (ref.chip or 0)
        if j >= len(chips.state):
            return None
        return chips.state[j], chips.utilisation[j], chips.power_w[j]

    def instance_states(self, tier: str, instance: int) -> list[str]:
        i = self._tier_index.get(tier)
        chips = self._chips.get(tier)
        if i is None or chips is None:
            return []
        n = self._tiers[i].per_instance
        return list(chips.state[instance * n : (instance + 1) * n])

    def select(self, tier: str, instance: int, chip: int | None = 0) -> bool:
        """Move the selection to a chip (or the cell that shows it); False if there is none."""
        for idx, cell in enumerate(self._cells):
            t = self._tiers[cell.tier]
            if t.name != tier or cell.inst != instance:
                continue
            j = (chip or 0) + instance * t.per_instance
            if cell.lo <= j < cell.hi:
                self.cursor = idx
                return True
        return False

    # -- layout --------------------------------------------------------------------------------
    def _width(self) -> int:
        return max(8, self.size.width - 1)  # one column kept for the vertical scrollbar

    def _relayout(self) -> None:
        width, height = self._width(), max(1, self.size.height)
        key = (width, height, self.mode)
        self._layout_key = key
        sizes = sorted({t.per_instance for t in self._tiers if t.per_instance > 1}, reverse=True)
        if self.mode == "chips" or not sizes:
            self._flow(width, None)
        elif self.mode == "instances":
            self._flow(width, sizes[-1])
        else:
            self._flow(width, None)
            for s in sizes:
                if len(self._rows) <= height:
                    break
                self._flow(width, s)
        self.collapsed_instances = sum(1 for c in self._cells if c.hi - c.lo > 1)
        self._strips = [None] * len(self._rows)
        self.virtual_size = Size(width, len(self._rows))
        self._restore_selection()
        self.refresh()

    def _flow(self, width: int, threshold: int | None) -> None:
        """Place every tier block, instance and cell; instances of `threshold` chips or more
        become one cell."""
        cells: list[_Cell] = []
        rows: list[list[int]] = [[]]
        labels: list[list[tuple[int, str, Style]]] = [[]]
        x = 0

        def newline() -> None:
            nonlocal x
            rows.append([])
            labels.append([])
            x = 0

        last_role = None
        for ti, t in enumerate(self._tiers):
            if last_role is not None and t.role != last_role and x > 0:
                newline()
            last_role = t.role
            collapse = threshold is not None and t.per_instance >= threshold
            inst_w = 1 if collapse else t.per_instance
            label = t.name if len(t.name) <= width // 2 else t.name[: max(1, width // 2 - 1)] + "…"
            block_w = len(label) + 1 + t.instances * (inst_w + 1) - 1
            if x > 0 and x + 2 + block_w > width:
                newline()
            elif x > 0:
                x += 2
            labels[-1].append((x, label, _ROLE_STYLE.get(t.role, Style(bold=True))))
            x += len(label) + 1
            indent = min(x, 2 + len(label) + 1, width // 3)
            for k in range(t.instances):
                if k > 0:
                    x += 1
                if x + inst_w > width and x > indent and inst_w <= width - indent:
                    newline()
                    x = indent
                lo = k * t.per_instance
                if collapse:
                    spans = [(lo, lo + t.per_instance)]
                else:
                    spans = [(j, j + 1) for j in range(lo, lo + t.per_instance)]
                for a, b in spans:
                    if x >= width:
                        newline()
                        x = indent
                    cells.append(_Cell(ti, k, a, b, len(rows) - 1, x))
                    rows[-1].append(len(cells) - 1)
                    x += 1
        if not rows[-1] and not labels[-1] and len(rows) > 1:
            rows.pop()
            labels.pop()
        self._cells, self._rows, self._labels = cells, rows, labels

    def _restore_selection(self) -> None:
        ref = self._selected
        if not self._cells:
            self._selected = None
            return
        if ref is not None and self.select(ref.tier, ref.instance, ref.chip):
            return
        self.cursor = min(self.cursor, len(self._cells) - 1)

    def on_resize(self, event: events.Resize) -> None:
        if (self._width(), max(1, self.size.height), self.mode) != self._layout_key:
            self._relayout()

    def watch_mode(self) -> None:
        if self._tiers:
            self._relayout()

    def watch_cursor(self, old: int, new: int) -> None:
        if not self._cells:
            return
        new = max(0, min(new, len(self._cells) - 1))
        if new != self.cursor:
            self.cursor = new
            return
        cell = self._cells[new]
        t = self._tiers[cell.tier]
        chip = None if cell.hi - cell.lo > 1 else cell.lo - cell.inst * t.per_instance
        ref = ChipRef(t.name, cell.inst, chip)
        for idx in (old, new):
            if 0 <= idx < len(self._cells) and self._cells[idx].row < len(self._strips):
                self._strips[self._cells[idx].row] = None
        self.scroll_to_region(Region(cell.x, cell.row, 1, 1), animate=False, immediate=True)
        self.refresh()
        if ref != self._selected:
            self._selected = ref
            self.post_message(self.Selected(ref))

    # -- actions -------------------------------------------------------------------------------
    def action_move(self, delta: int) -> None:
        self.cursor = self.cursor + delta

    def action_first(self) -> None:
        self.cursor = 0

    def action_last(self) -> None:
        self.cursor = len(self._cells) - 1

    def action_move_line(self, delta: int) -> None:
        if not self._cells:
            return
        cell = self._cells[self.cursor]
        row = cell.row + delta
        step = 1 if delta > 0 else -1
        while 0 <= row < len(self._rows) and not self._rows[row]:
            row += step
        if not 0 <= row < len(self._rows):
            return
        self.cursor = min(self._rows[row], key=lambda i: abs(self._cells[i].x - cell.x))

    def action_cycle_collapse(self) -> None:
        self.mode = _MODES[(_MODES.index(self.mode) + 1) % len(_MODES)]
        self.notify(f"chip map: {self.mode_text}", timeout=2)

    @property
    def mode_text(self) -> str:
        return {
            "auto": "instances collapse when space runs out",
            "chips": "every chip",
            "instances": "one cell per instance",
        }[self.mode]

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        x = offset.x + self.scroll_offset.x
        row = offset.y + self.scroll_offset.y
        if 0 <= row < len(self._rows):
            for idx in self._rows[row]:
                if self._cells[idx].x == x:
                    self.cursor = idx
                    break
        self.focus()

    # -- drawing -------------------------------------------------------------------------------
    def _look(self, cell: _Cell) -> tuple[str, Style]:
        chips = self._chips.get(self._tiers[cell.tier].name)
        collapsed = cell.hi - cell.lo > 1
        if chips is None or cell.hi > len(chips.state):
            return "·", _UNKNOWN
        states = chips.state[cell.lo : cell.hi]
        if "failed" in states:
            return "✗", _FAILED
        if "draining" in states:
            return "◌", _DRAINING
        util = chips.utilisation[cell.lo : cell.hi]
        mean = sum(util) / len(util) if util else 0.0
        return ("▣" if collapsed else "■"), util_style(mean)

    def _build_strip(self, row: int) -> Strip:
        base = self.rich_style
        items: list[tuple[int, str, Style]] = list(self._labels[row])
        cursor = self.cursor
        for idx in self._rows[row]:
            cell = self._cells[idx]
            glyph, style = self._look(cell)
            if idx == cursor and self.has_focus:
                style = style + _SELECTED
            elif idx == cursor:
                style = style + Style(underline=True, bold=True)
            items.append((cell.x, glyph, style))
        items.sort(key=lambda it: it[0])
        segments: list[Segment] = []
        x = 0
        run_text, run_style = "", None
        for ix, text, style in items:
            full = base + style
            if ix > x:
                if run_text:
                    segments.append(Segment(run_text, run_style))
                    run_text, run_style = "", None
                segments.append(Segment(" " * (ix - x), base))
                x = ix
            if full == run_style:
                run_text += text
            else:
                if run_text:
                    segments.append(Segment(run_text, run_style))
                run_text, run_style = text, full
            x += len(text)
        if run_text:
            segments.append(Segment(run_text, run_style))
        return Strip(segments, x)

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        row = y + scroll_y
        width = self.scrollable_content_region.width
        if not 0 <= row < len(self._rows):
            return Strip.blank(width, self.rich_style)
        strip = self._strips[row] if row < len(self._strips) else None
        if strip is None:
            strip = self._build_strip(row)
            if row < len(self._strips):
                self._strips[row] = strip
        return strip.crop_extend(scroll_x, scroll_x + width, self.rich_style)

    def on_focus(self) -> None:
        self._strips = [None] * len(self._rows)
        self.refresh()

    def on_blur(self) -> None:
        self._strips = [None] * len(self._rows)
        self.refresh()
