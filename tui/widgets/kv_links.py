"""KV handoff links: GB/s moving, transfers in flight and waiting, bandwidth factor; degraded and
busy links first."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from tui.format import truncate
from twin import telemetry

__all__ = ["KvLinks"]

_DIM = Style(dim=True)
_WARN = Style(color="#ffd75f", bold=True)
_BAD = Style(color="#ff5f5f", bold=True)


def _short(tier: str) -> str:
    """A tier's name without its role suffix ("h100-prefill" -> "h100")."""
    for suffix in ("-prefill", "-decode", "-unified"):
        if tier.endswith(suffix) and len(tier) > len(suffix):
            return tier[: -len(suffix)]
    return tier


class KvLinks(Widget):
    """One row per KV link, with the totals on top."""

    DEFAULT_CSS = """
    KvLinks {
        height: auto;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._meta: telemetry.Meta | None = None
        self._summary: telemetry.Summary | None = None

    def show(self, meta: telemetry.Meta, summary: telemetry.Summary | None) -> None:
        relayout = self._meta is None or len(meta.links) != len(self._meta.links)
        self._meta, self._summary = meta, summary
        self.refresh(layout=relayout)

    def render(self) -> Text:
        meta, s = self._meta, self._summary
        if meta is None:
            return Text("waiting for the twin…", style=_DIM)
        if not meta.links:
            return Text("no KV handoff: this fleet's tiers are unified", style=_DIM)
        stats = {ls.name: ls for ls in s.links} if s is not None else {}
        width = max(24, self.size.width)
        wide = width >= 34  # narrow: no bandwidth column; a degraded link is marked ▼
        cols = (6, 4, 5, 4) if wide else (6, 4, 5, 0)
        name_w = max(8, width - sum(cols) - 1)
        out = Text(no_wrap=True, overflow="crop")
        g, m, w, b = cols
        head = f"{'link':<{name_w}}{'GB/s':>{g}}{'mov':>{m}}{'wait':>{w}}"
        out.append(head + (f"{'bw':>{b}}" if wide else ""), _DIM)

        def order(lm: telemetry.LinkMeta) -> tuple[int, int, float, str]:
            x = stats.get(lm.name)
            if x is None:
                return (1, 1, 0.0, lm.name)
            return (0 if x.factor < 1 else 1, 0 if x.waiting else 1, -x.gbps, lm.name)

        for lm in sorted(meta.links, key=order):
            x = stats.get(lm.name)
            degraded = x is not None and x.factor < 1
            src, dst = _short(lm.src), _short(lm.dst)
            room = name_w - 1 - (1 if degraded and not wide else 0)
            if len(src) + len(dst) + 1 > room:
                side = max(3, (room - 1) // 2)
                src, dst = truncate(src, side), truncate(dst, side)
            name = f"{src}→{dst}"
            out.append("\n")
            if degraded and not wide:
                out.append("▼", _BAD)
                name_pad = name_w - 1
            else:
                name_pad = name_w
            out.append(f"{name:<{name_pad}}", _BAD if degraded else None)
            if x is None:
                out.append(
                    f"{'–':>{g}}{'–':>{m}}{'–':>{w}}" + (f"{'–':>{b}}" if wide else ""), _DIM
                )
                continue
            out.append(f"{x.gbps:>{g}.1f}", None if x.gbps > 0 else _DIM)
            out.append(f"{x.moving:>{m}}", None if x.moving else _DIM)
            out.append(f"{x.waiting:>{w}}", _WARN if x.waiting else _DIM)
            if wide:
                factor = f"x{x.factor:g}"
                out.append(
                    f"{factor:>{b}}" if not degraded else f" {factor}", _BAD if degraded else _DIM
                )
        return out
