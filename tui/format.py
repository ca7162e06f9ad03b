"""Numbers, bars, sparklines and colours as the console prints them. "No data" (-1) is "–"."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from rich.style import Style

__all__ = [
    "NO_DATA_TEXT",
    "bar",
    "duration",
    "percent",
    "si",
    "sim_clock",
    "spark",
    "speed_text",
    "util_style",
    "watts",
]

NO_DATA_TEXT = "–"
_SPARK = "▁▂▃▄▅▆▇█"
_EIGHTHS = " ▏▎▍▌▋▊▉█"

#: Utilisation colour scale, 0-100 % in ten buckets: idle slate, then green to red.
UTIL_COLOURS = (
    "#5f6f8a",
    "#2e8b57",
    "#3cb371",
    "#7cc242",
    "#b5d334",
    "#e6d21e",
    "#f0b41a",
    "#f28c1c",
    "#ef5b24",
    "#e0282e",
)
_UTIL_STYLES = tuple(Style(color=c) for c in UTIL_COLOURS)


def _missing(v: float) -> bool:
    return v is None or not math.isfinite(v) or v < 0


def util_bucket(frac: float) -> int:
    if _missing(frac):
        return 0
    return min(len(UTIL_COLOURS) - 1, max(0, int(frac * len(UTIL_COLOURS))))


def util_style(frac: float) -> Style:
    """The colour of a utilisation (0-1)."""
    return _UTIL_STYLES[util_bucket(frac)]


def si(v: float, digits: int = 3) -> str:
    """38412 -> '38.4k', 0.071 -> '0.071', -1 -> '–'."""
    if _missing(v):
        return NO_DATA_TEXT
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            x = v / div
            return f"{x:.{max(0, digits - len(str(int(x))))}f}{suffix}"
    if v == 0:
        return "0"
    if v >= 1:
        return f"{v:.{max(0, digits - len(str(int(v))))}f}"
    return f"{v:.{digits}g}"


def watts(w: float) -> str:
    """850 -> '850 W', 3162 -> '3.16 kW'."""
    if _missing(w):
        return NO_DATA_TEXT
    for div, unit in ((1e6, "MW"), (1e3, "kW")):
        if w >= div:
            return f"{w / div:.3g} {unit}"
    return f"{w:.0f} W"


def duration(s: float, sep: str = " ") -> str:
    """0.0213 -> '21.3 ms', 2.0 -> '2 s', -1 -> '–' (`sep=""`: '21.3ms')."""
    if _missing(s):
        return NO_DATA_TEXT
    if s < 1e-3:
        return f"{s * 1e6:.0f}{sep}µs"
    if s < 1.0:
        return f"{s * 1e3:.3g}{sep}ms"
    if s < 100:
        return f"{s:.3g}{sep}s"
    return f"{s:.0f}{sep}s"


def percent(frac: float, digits: int = 0) -> str:
    if _missing(frac):
        return NO_DATA_TEXT
    return f"{frac * 100:.{digits}f}%"


def sim_clock(t_s: float) -> str:
    """Simulated time as h:mm:ss.d."""
    t = max(0.0, t_s)
    h, rem = divmod(t, 3600.0)
    m, s = divmod(rem, 60.0)
    return f"{int(h)}:{int(m):02d}:{s:04.1f}"


def speed_text(speed: float) -> str:
    if speed <= 0:
        return "max"
    return f"{speed:g}x"


def bar(frac: float, width: int) -> str:
    """A horizontal bar with eighth-cell resolution, exactly `width` cells."""
    if width <= 0:
        return ""
    if _missing(frac):
        return " " * width
    eighths = round(min(1.0, max(0.0, frac)) * width * 8)
    full, part = divmod(eighths, 8)
    out = "█" * full + (_EIGHTHS[part] if part and full < width else "")
    return out.ljust(width)


def spark(values: Iterable[float], width: int, top: float | None = None) -> str:
    """The last `width` values as block characters, scaled to `top` (default: their maximum).
    Missing values are blanks; the result is right-aligned to exactly `width` cells."""
    vals: Sequence[float] = list(values)[-width:] if width > 0 else []
    if not vals:
        return " " * max(0, width)
    known = [v for v in vals if not _missing(v)]
    hi = top if top is not None else (max(known) if known else 0.0)
    chars = []
    for v in vals:
        if _missing(v):
            chars.append(" ")
        elif hi <= 0:
            chars.append(_SPARK[0])
        else:
            i = int(min(1.0, v / hi) * (len(_SPARK) - 1) + 0.5)
            chars.append(_SPARK[i])
    return "".join(chars).rjust(width)


def spark_index(v: float, top: float) -> int:
    if _missing(v) or top <= 0:
        return 0
    return int(min(1.0, v / top) * (len(_SPARK) - 1) + 0.5)


def truncate(text: str, width: int) -> str:
    """`text` cut to `width` cells with an ellipsis."""
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"
