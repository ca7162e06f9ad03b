"""B3, the live benchmark: the headless twin at 1x on a 10,000-chip fleet, publishing every topic
through a real broker, with a subscriber measuring end-to-end latency (docs/performance.md)."""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

import msgspec
import numpy as np

from twin import telemetry
from twin.build import new_twin
from twin.catalog import Catalog
from twin.engine import Engine
from twin.mqtt import BrokerConfig, MqttBridge, watch_messages


def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 1e6
    except OSError:
        return float("nan")


def _listen(broker: str, fleet: str, duration_s: float, out: Any) -> None:
    """Subscriber in its own process (so its receive times are not held up by the engine's
    ticks): end-to-end latency from each message's `ts_ms`, lag and drops from summaries."""

    async def main() -> dict[str, list[float]]:
        config = BrokerConfig.make(broker)
        decoder = msgspec.json.Decoder(telemetry.Message)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(duration_s, stop.set)
        got: dict[str, list[float]] = {"latency_ms": [], "lag_s": [], "dropped": [0.0]}
        suffixes = ("summary", "tier/+", "chips/+", "event", "status", "meta")
        async for _topic, payload in watch_messages(config, fleet, suffixes, stop=stop):
            now_ms = time.time() * 1e3
            msg = decoder.decode(payload)
            if isinstance(msg, (telemetry.Summary, telemetry.Tier, telemetry.Chips)):
                got["latency_ms"].append(now_ms - msg.ts_ms)
            if isinstance(msg, telemetry.Summary):
                got["lag_s"].append(msg.lag_s)
                got["dropped"].append(float(msg.dropped_snapshots))
        return got

    out.put(asyncio.run(main()))


async def _run(catalog: Catalog, broker: str, duration_s: float) -> dict[str, Any]:
    import multiprocessing as mp

    from twin.bench import scaled_fleet

    twin = new_twin(scaled_fleet(catalog), catalog)
    engine = Engine(twin, speed=1.0, catalog=catalog)
    bridge = MqttBridge(engine, broker)
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    listener = ctx.Process(target=_listen, args=(broker, engine.fleet, duration_s + 2.0, results))
    listener.start()
    rss_start = _rss_mb()
    engine_task = asyncio.create_task(engine.run())
    bridge_task = asyncio.create_task(bridge.run())
    await bridge.wait_connected(10.0)
    cpu0 = time.process_time()
    await asyncio.sleep(duration_s)
    cpu = time.process_time() - cpu0
    rss_end = _rss_mb()
    got = await asyncio.to_thread(results.get, True, 60.0)
    bridge.stop()
    engine.stop()
    for result in await asyncio.gather(engine_task, bridge_task, return_exceptions=True):
        if isinstance(result, Exception):
            raise result
    listener.join(10.0)
    lat = np.array(got["latency_ms"] or [np.nan])
    lag = np.array(got["lag_s"] or [np.nan])
    return {
        "b3_chips": float(twin.params.n_chips),
        "b3_duration_s": duration_s,
        "b3_lag_p99_s": float(np.percentile(lag, 99)),
        "b3_tick_s": 0.1,
        "b3_e2e_p50_ms": float(np.percentile(lat, 50)),
        "b3_e2e_p99_ms": float(np.percentile(lat, 99)),
        "b3_messages": float(len(got["latency_ms"])),
        "b3_dropped_snapshots": float(max(got["dropped"]) + bridge.dropped_offline),
        "b3_rss_start_mb": rss_start,
        "b3_rss_end_mb": rss_end,
        "b3_cpu_s_per_s": cpu / duration_s,
    }


def run_b3(catalog: Catalog, broker: str, duration_s: float = 120.0) -> dict[str, Any]:
    return asyncio.run(_run(catalog, broker, duration_s))
