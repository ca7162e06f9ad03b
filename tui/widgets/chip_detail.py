"""The selected chip: its system, instance, state, load and power, and where its system's figures
come from (published, derived, fitted or estimate, with the source)."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from tui.format import percent, truncate, util_style, watts
from tui.widgets.chip_map import ChipRef
from twin import telemetry

__all__ = ["ChipDetail"]

_DIM = Style(dim=True)
_BAD = Style(color="#ff5f5f", bold=True)
_WARN = Style(color="#ffd75f", bold=True)
_OK = Style(color="#5fd75f", bold=True)
_PROVENANCE = {
    "published": Style(color="#5fd75f"),
    "derived": Style(color="#5fafd7"),
    "fitted": Style(color="#d787d7"),
    "estimate": Style(color="#ffaf5f", bold=True),
}
_ABBREV = {"published": "pub", "derived": "der", "fitted": "fit", "estimate": "est"}
_STATE_GLYPH = {
    "up": ("■ up", _OK),
    "failed": ("✗ failed", _BAD),
    "draining": ("◌ draining", _WARN),
}


class ChipDetail(Widget):
    """Everything known about the selected chip."""

    DEFAULT_CSS = """
    ChipDetail {
        height: auto;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._text = Text("select a chip in the chip map (arrows or mouse)", style=_DIM)

    def show(
        self,
        ref: ChipRef | None,
        meta: telemetry.Meta | None,
        tier: telemetry.Tier | None,
        chip: tuple[str, float, float] | None,
        instance_states: list[str],
        instance_power_w: float | None,
    ) -> None:
        self._text = self._build(ref, meta, tier, chip, instance_states, instance_power_w)
        self.refresh(layout=True)

    def _build(
        self,
        ref: ChipRef | None,
        meta: telemetry.Meta | None,
        tier: telemetry.Tier | None,
        chip: tuple[str, float, float] | None,
        states: list[str],
        inst_power: float | None,
    ) -> Text:
        if ref is None or meta is None:
            return Text("select a chip in the chip map (arrows or mouse)", style=_DIM)
        tm = next((t for t in meta.tiers if t.name == ref.tier), None)
        if tm is None:
            return Text(f"{ref.chip_id}: not in this fleet", style=_BAD)
        width = max(20, self.size.width)
        out = Text(no_wrap=True, overflow="ellipsis")
        host = ref.chip is not None and ref.chip >= tm.chips_per_instance and bool(tm.host_system)
        if ref.chip is None:
            out.append(f"instance {ref.instance_id}", Style(bold=True))
            out.append(f"  {len(states)} chips, collapsed", _DIM)
        else:
            out.append(ref.chip_id, Style(bold=True))
            if chip is not None:
                glyph, style = _STATE_GLYPH.get(chip[0], (chip[0], _DIM))
                out.append("  ")
                out.append(glyph, style)
            if host:
                out.append("  kv host", _DIM)
        system = tm.host_system if host else tm.system
        out.append("\n")
        out.append(system if host else f"{tm.vendor} {tm.system_name}", Style(bold=True))
        out.append(f"\n{system} · {tm.role} · {tm.precision}", _DIM)
        out.append("\ninst ", _DIM)
        if states:
            failed = states.count("failed")
            draining = states.count("draining")
            if failed:
                out.append(f"{ref.instance_id} DOWN ({failed}/{len(states)} failed)", _BAD)
            elif draining:
                out.append(f"{ref.instance_id} draining", _WARN)
            else:
                out.append(f"{ref.instance_id} up", _OK)
        else:
            out.append(f"{ref.instance_id} (no chip data yet)", _DIM)
        if tier is not None:
            out.append(f" · tier {tier.instances_up}/{tier.instances} up", _DIM)
        if ref.chip is not None and chip is not None:
            _state, util, power = chip
            out.append("\nload ", _DIM)
            out.append(percent(util, 1), util_style(util))
            out.append("  power ", _DIM)
            out.append(watts(power))
        elif inst_power is not None:
            out.append("\npower ", _DIM)
            out.append(f"{watts(inst_power)} (instance)")
        prefix = "kv_host." if host else ""
        figures = {
            k.removeprefix(prefix): f
            for k, f in tm.figures.items()
            if (k.startswith("kv_host.") if host else not k.startswith("kv_host."))
        }
        counts: dict[str, int] = {}
        for f in figures.values():
            counts[f.provenance] = counts.get(f.provenance, 0) + 1
        out.append("\nfigures ", _DIM)
        for i, (prov, n) in enumerate(sorted(counts.items())):
            out.append(" · " if i else "", _DIM)
            out.append(f"{n} {prov}", _PROVENANCE.get(prov))
        name_w = min(16, max((len(k) for k in figures), default=4))
        for k, f in sorted(figures.items()):
            out.append("\n")
            out.append(f"{truncate(k, name_w):<{name_w}}", _DIM)
            out.append(f"{f.value:>8.4g} ")
            out.append(_ABBREV.get(f.provenance, f.provenance[:3]), _PROVENANCE.get(f.provenance))
            rest = width - name_w - 13
            if rest > 4:
                source = f.source.removeprefix("https://").removeprefix("http://")
                out.append(" " + truncate(source, rest), _DIM)
        return out

    def render(self) -> Text:
        return self._text
