"""B4, the console benchmark: the TUI attached in-process to a ~2,000-chip fleet at 1x in a headless
Textual run: CPU seconds per wall second, and the time from a fail-chip keypress to the chip showing
failed on the map (docs/performance.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from twin.build import new_twin
from twin.catalog import Catalog
from twin.engine import Engine


def _cpu_s() -> float:
    return time.process_time()


async def _run(catalog: Catalog, duration_s: float) -> dict[str, float]:
    from tui.app import FleetApp
    from tui.link_local import LocalLink
    from tui.widgets.chip_map import ChipMap
    from twin.bench import scaled_fleet

    fleet = scaled_fleet(catalog, chips=2_000)
    twin = new_twin(fleet, catalog)
    link = LocalLink(Engine(twin, speed=1.0, catalog=catalog))
    app = FleetApp(link)
    out: dict[str, float] = {"b4_chips": float(twin.params.n_chips)}
    try:
        async with app.run_test(size=(160, 48)) as pilot:
            deadline = time.monotonic() + 30.0
            while app.store.summary is None or len(app.store.chips) < len(twin.layout.tier_names):
                if time.monotonic() > deadline:
                    raise RuntimeError("the console never received its first figures")
                await pilot.pause(0.05)
            cpu0, wall0 = _cpu_s(), time.monotonic()
            await pilot.pause(duration_s)
            out["b4_cpu_s_per_s"] = (_cpu_s() - cpu0) / (time.monotonic() - wall0)
            chip_map = app.main.query_one(ChipMap)
            chip_map.focus()
            await pilot.press("right")
            ref = chip_map.selected
            if ref is None:
                raise RuntimeError("no chip selected")
            await pilot.press("f")  # opens the confirmation; "y" is the keypress that fails it
            t0 = time.monotonic()
            await pilot.press("y")
            while True:
                state = chip_map.chip_state(ref)
                if state is not None and state[0] == "failed":
                    break
                if time.monotonic() - t0 > 10.0:
                    raise RuntimeError("the failed chip never showed")
                await asyncio.sleep(0.005)
            out["b4_fail_to_shown_ms"] = (time.monotonic() - t0) * 1e3
    finally:
        await link.stop()
    return out


def run_b4(catalog: Catalog, duration_s: float = 60.0) -> dict[str, Any]:
    return asyncio.run(_run(catalog, duration_s))
