"""The command line: predict and simulate output, and one-line errors for every kind of mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from twin.cli import main
from twin.fleet import shipped_fleets
from twin.predict import KEYS

PREDICT = [
    "predict",
    "--system",
    "h100-sxm",
    "--chips",
    "8",
    "--model",
    "llama-3.1-70b",
    "--precision",
    "fp8",
    "--concurrency",
    "16",
    "--input-tokens",
    "512",
    "--output-tokens",
    "128",
]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_json_has_exactly_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([*PREDICT, "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert tuple(data) == KEYS
    assert 0 < data["tpot_s"] < data["ttft_s"] + 1
    assert data["aggregate_tokens_per_s"] > data["per_user_tokens_per_s"] > 0
    assert data["power_w"] > 0 and data["tokens_per_joule"] > 0


def test_predict_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(PREDICT, capsys)
    assert code == 0 and "per_user_tokens_per_s" in out and "tok/s" in out


def test_spec_decode_raises_per_user_speed(capsys: pytest.CaptureFixture[str]) -> None:
    base = json.loads(run([*PREDICT, "--json"], capsys)[1])
    spec = json.loads(run([*PREDICT, "--json", "--spec-decode", "3"], capsys)[1])
    assert spec["per_user_tokens_per_s"] > 1.5 * base["per_user_tokens_per_s"]


def _with(flag: str, value: str) -> list[str]:
    args = list(PREDICT)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (_with("--system", "tpu-v9"), "--system: unknown system 'tpu-v9'"),
        (_with("--model", "gpt-9"), "--model: unknown model 'gpt-9'"),
        (_with("--precision", "int3"), "--precision"),
        (_with("--chips", "0"), "--chips: expected a positive integer"),
        (_with("--concurrency", "-4"), "--concurrency: expected a positive integer"),
        (_with("--input-tokens", "many"), "--input-tokens"),
        ([*_with("--chips", "1")[:6], "llama-3.1-405b", *PREDICT[7:]], "--chips: llama-3.1-405b"),
        (_with("--input-tokens", "10000000"), "KV cache"),
        ([*PREDICT, "--spec-decode", "0.5"], "--spec-decode"),
        (PREDICT[:3], "required"),
        (["simulate", "no-such-fleet"], "no-such-fleet"),
        (["simulate", "nvidia-groq", "--duration", "-5"], "--duration"),
        (["simulate", "nvidia-groq", "--seed", "x"], "--seed"),
        (["no-such-fleet"], "no-such-fleet"),
    ],
)
def test_mistakes_get_one_line_and_exit_2(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:  # argparse exits; our own checks return 2
        raise SystemExit(main(args))
    out, err = capsys.readouterr()
    assert exc.value.code == 2
    assert needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert out == ""


def test_bad_fleet_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[slo]\nttft_s = "fast"\n')
    code, _, err = run(["simulate", str(bad)], capsys)
    assert code == 2 and "bad.toml" in err and err.count("\n") == 1


@pytest.mark.parametrize("fleet", shipped_fleets())
def test_simulate_every_shipped_fleet(fleet: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["simulate", fleet, "--duration", "30", "--json"], capsys)
    assert code == 0
    r = json.loads(out)
    for key in (
        "sim_time_s",
        "wall_time_s",
        "arrived",
        "done",
        "rejected",
        "in_flight",
        "ttft_p50_s",
        "ttft_p99_s",
        "tpot_p50_s",
        "tpot_p99_s",
        "goodput_fraction",
        "tokens_per_s",
        "power_w",
        "tokens_per_joule",
        "tiers",
    ):
        assert key in r
    assert r["arrived"] == r["done"] + r["rejected"] + r["in_flight"] > 0
    assert r["done"] > 0 and r["tokens_per_s"] > 0 and r["power_w"] > 0
    assert r["ttft_p50_s"] <= r["ttft_p99_s"]
    for tier in r["tiers"].values():
        assert {"role", "system", "tokens_per_s", "power_w", "tokens_per_joule"} <= set(tier)
        assert tier["power_w"] > 0


def test_simulate_same_seed_same_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    runs = []
    for _ in range(2):
        code, out, _ = run(
            ["simulate", "nvidia-groq", "--duration", "20", "--seed", "7", "--json"], capsys
        )
        assert code == 0
        r = json.loads(out)
        r.pop("wall_time_s")
        runs.append(r)
    assert runs[0] == runs[1]


def test_python_dash_m_and_console_script_work() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "twin", "simulate", "gpu-colocated", "--duration", "5", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(out.stdout)["fleet"] == "gpu-colocated"
