"""The benchmark code runs and measures what it says (small sizes; the figures are not tested)."""

from __future__ import annotations

import json

import pytest

from twin import bench
from twin.catalog import load_catalog


def test_b1_runs_the_peers_workload_to_the_last_request() -> None:
    r = bench.run_b1(load_catalog(), requests=300)
    assert r["steps"] > 300 and r["sim_s"] > 300 / bench.B1_RATE * 0.7
    assert r["b1_realtime_factor"] == pytest.approx(r["sim_s"] / r["wall_s"])
    assert 0 < r["tpot_p50_s"] < r["ttft_p50_s"] + 1.0
    again = bench.run_b1(load_catalog(), requests=300)
    assert (again["ttft_p50_s"], again["sim_s"]) == (r["ttft_p50_s"], r["sim_s"])  # seeded


def test_b2_reaches_the_in_flight_target_on_a_10k_chip_fleet() -> None:
    r = bench.run_b2(load_catalog(), targets=(5_000,), steps=3)
    assert 9_000 < r["chips"] < 11_000
    assert r["b2_5k_in_flight"] >= 0.8 * 5_000  # held near the target while measured
    assert r["b2_5k_step_mean_ms"] > 0 and r["b2_peak_rss_mb"] > 0


def test_median_min_max_and_printed_table(capsys: pytest.CaptureFixture[str]) -> None:
    calls = iter([{"x": 3.0}, {"x": 1.0}, {"x": 2.0}])
    stats = bench.repeat(lambda: next(calls), 3)
    assert stats == {"x": {"median": 2.0, "min": 1.0, "max": 3.0}}
    bench.print_table({"date": "d", "machine": {}, "runs": 3, "b1": stats})
    out = capsys.readouterr().out
    assert "x" in out and "min 1.000, max 3.000" in out
    json.dumps(stats)  # --json prints the same object
