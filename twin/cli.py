"""The `fleet-twin` command line.

`fleet-twin [FLEET]` is the main job; the rest are subcommands. A user's mistake (a bad argument,
a bad fleet file, an unknown id) is reported on one line naming what was wrong, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from twin.bench import add_bench_parser
from twin.catalog import ConfigError
from twin.chaos_cli import add_chaos_parser
from twin.replay import add_replay_parser
from twin.serve import add_serve_parser, add_watch_parser

DEFAULT_FLEET = "all-vendors"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _nonneg_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, allow_nan=False) + "\n")


# ------------------------------------------------------------------------------------------------
# predict


def _add_predict(sub: Any) -> None:
    p = sub.add_parser(
        "predict", help="one system, one model, one load: TTFT, TPOT, tokens/s, power"
    )
    p.add_argument("--system", required=True, help="system id from fleets/hardware.toml")
    p.add_argument("--chips", required=True, type=_int, help="chips in the instance")
    p.add_argument("--model", required=True, help="model id from fleets/models.toml")
    p.add_argument("--precision", required=True, help="bf16 or fp8")
    p.add_argument("--concurrency", required=True, type=_int, help="users in the closed loop")
    p.add_argument("--input-tokens", required=True, type=_int)
    p.add_argument("--output-tokens", required=True, type=_int)
    p.add_argument("--spec-decode", type=float, default=None, help="tokens per decode iteration")
    p.add_argument("--json", action="store_true", help="print JSON with exactly the result keys")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(a: argparse.Namespace) -> int:
    from twin.catalog import load_catalog
    from twin.predict import KEYS, PredictArgs, predict

    args = PredictArgs(
        system=a.system,
        chips=a.chips,
        model=a.model,
        precision=a.precision,
        concurrency=a.concurrency,
        input_tokens=a.input_tokens,
        output_tokens=a.output_tokens,
        spec_decode=a.spec_decode,
    )
    result = predict(args, load_catalog()).as_dict()
    if a.json:
        _print_json({k: round(result[k], 6) for k in KEYS})
    else:
        print(
            f"{a.system} x{a.chips}  {a.model} {a.precision}  concurrency {a.concurrency}  "
            f"in {a.input_tokens} / out {a.output_tokens}"
        )
        units = {"ttft_s": "s", "tpot_s": "s", "power_w": "W", "tokens_per_joule": "tok/J"}
        for k in KEYS:
            print(f"  {k:<24} {result[k]:>14.4f} {units.get(k, 'tok/s')}")
    return 0


# ------------------------------------------------------------------------------------------------
# simulate


def _add_simulate(sub: Any) -> None:
    p = sub.add_parser("simulate", help="run a fleet open-loop as fast as possible and summarise")
    p.add_argument("fleet", help="fleet file or shipped fleet name")
    p.add_argument("--duration", type=_positive_float, default=300.0, help="simulated seconds")
    p.add_argument("--rate", type=_positive_float, default=None, help="arrivals per second")
    p.add_argument("--seed", type=_nonneg_int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_simulate)


def _load_twin(fleet_arg: str, *, seed: int | None = None, rate: float | None = None) -> Any:
    from twin.build import new_twin
    from twin.catalog import load_catalog
    from twin.fleet import load_fleet, resolve_fleet_path

    catalog = load_catalog()
    fleet = load_fleet(resolve_fleet_path(fleet_arg), catalog)
    return new_twin(fleet, catalog, seed=seed, rate_per_s=rate, ring_size=1 << 20)


def _cmd_simulate(a: argparse.Namespace) -> int:
    from twin import simulate

    twin = _load_twin(a.fleet, seed=a.seed, rate=a.rate)
    wall = simulate.run(twin, a.duration)
    result = simulate.report(twin, wall)
    if a.json:
        _print_json(result)
    else:
        _print_summary(result)
    return 0


def _fmt(v: Any, scale: float = 1.0, nd: int = 3) -> str:
    return "-" if v is None else f"{v * scale:.{nd}f}"


def _print_summary(r: dict[str, Any]) -> None:
    print(
        f"{r['fleet']}: {r['sim_time_s']:.0f} s simulated in {r['wall_time_s']:.2f} s wall  "
        f"arrived {r['arrived']}  done {r['done']}  rejected {r['rejected']}  "
        f"in flight {r['in_flight']}"
    )
    print(
        f"  TTFT p50/p99 {_fmt(r['ttft_p50_s'])}/{_fmt(r['ttft_p99_s'])} s   "
        f"TPOT p50/p99 {_fmt(r['tpot_p50_s'], 1e3, 1)}/{_fmt(r['tpot_p99_s'], 1e3, 1)} ms   "
        f"goodput {_fmt(r['goodput_fraction'], 100, 1)}%"
    )
    print(
        f"  {_fmt(r['tokens_per_s'], 1, 0)} tok/s  {_fmt(r['power_w'], 1e-3, 1)} kW  "
        f"{_fmt(r['tokens_per_joule'], 1, 3)} tok/J"
    )
    print(f"  {'tier':<22}{'role':<9}{'system':<17}{'up':>7}{'tok/s':>10}{'kW':>8}{'tok/J':>8}")
    for name, t in r["tiers"].items():
        rate = t["prefill_tokens_per_s"] if t["role"] == "prefill" else t["tokens_per_s"]
        print(
            f"  {name:<22}{t['role']:<9}{t['system']:<17}"
            f"{t['instances_up']:>3}/{t['instances']:<3}{_fmt(rate, 1, 0):>10}"
            f"{_fmt(t['power_w'], 1e-3, 1):>8}{_fmt(t['tokens_per_joule'], 1, 2):>8}"
        )


# ------------------------------------------------------------------------------------------------
# main job


def _cmd_main(argv: Sequence[str]) -> int:
    p = _Parser(prog="fleet-twin", description="the operator console on a fleet (in-process twin)")
    p.add_argument("fleet", nargs="?", default=DEFAULT_FLEET, help="fleet file or shipped name")
    p.add_argument("--speed", type=_positive_float, default=1.0, help="x real time (default 1)")
    p.add_argument("--seed", type=_nonneg_int, default=None, help="random seed (default: fleet's)")
    p.add_argument("--rate", type=_positive_float, default=None, help="arrivals per second")
    p.add_argument(
        "--read-only", action="store_true", help="watch only: every action is hidden and refused"
    )
    p.add_argument("--record", metavar="FILE", help="flight recorder file (docs/recorder.md)")
    a = p.parse_args(argv)
    from twin.build import new_twin
    from twin.catalog import load_catalog
    from twin.engine import Engine
    from twin.fleet import load_fleet, resolve_fleet_path

    catalog = load_catalog()
    fleet = load_fleet(resolve_fleet_path(a.fleet), catalog)
    twin = new_twin(fleet, catalog, seed=a.seed, rate_per_s=a.rate)
    engine = Engine(twin, speed=a.speed, read_only=a.read_only, catalog=catalog)
    from twin.chaos_live import install_scenarios

    install_scenarios(engine, catalog=catalog)  # "Run scenario: ..." in the palette
    if a.record:
        from twin.replay import start_recording

        start_recording(engine, a.record)  # closed when the process exits

    from tui.app import run_console
    from tui.link_local import LocalLink

    _quiet_logging()
    return run_console(LocalLink(engine), read_only=a.read_only)


def _quiet_logging() -> None:
    """Nothing may write to the terminal under the console (a stray warning would tear it)."""
    import logging

    logging.getLogger().addHandler(logging.NullHandler())
    logging.getLogger().setLevel(logging.CRITICAL)


def _add_tui(sub: Any) -> None:
    from twin.serve import add_broker_options

    p = sub.add_parser(
        "tui",
        help="the operator console attached to a remote twin over MQTT, or on a recording",
        description="Open the operator console on a twin that runs elsewhere "
        "(`fleet-twin serve`), through an MQTT 5 broker (--broker and --fleet), or play a "
        "flight recording back (--replay FILE) with pause, speed and seek.",
    )
    p.add_argument("--fleet", help="fleet name (the topic is fleet-twin/v1/NAME/)")
    p.add_argument(
        "--replay",
        metavar="FILE",
        help="play a flight recording back (docs/recorder.md) instead of attaching to a broker",
    )
    p.add_argument(
        "--speed",
        type=float,
        default=None,
        help="--replay only: x real time (default 1; 0 = as fast as possible)",
    )
    p.add_argument(
        "--read-only", action="store_true", help="watch only: every action is hidden and refused"
    )
    add_broker_options(p, required=False)
    p.set_defaults(func=_cmd_tui, parser=p)


def _cmd_tui(a: argparse.Namespace) -> int:
    if a.replay is not None:
        return _cmd_tui_replay(a)
    if a.speed is not None:
        a.parser.error("--speed is for --replay only (a remote twin's speed is its own)")
    if not a.broker or not a.fleet:
        a.parser.error("--broker URL and --fleet NAME are required (or --replay FILE)")
    from twin.mqtt import BrokerConfig
    from twin.serve import broker_kwargs

    config = BrokerConfig.make(a.broker, **broker_kwargs(a))
    from tui.app import run_console
    from tui.link_mqtt import MqttLink

    link = MqttLink(
        config.url.host,
        config.url.port,
        a.fleet,
        username=config.username,
        password=config.password,
        tls_context=config.tls_context,
        client_id=config.client_id,
    )
    _quiet_logging()
    return run_console(link, read_only=a.read_only)


def _cmd_tui_replay(a: argparse.Namespace) -> int:
    if a.broker or a.fleet:
        a.parser.error("--replay FILE plays a recording: it takes no --broker or --fleet")
    speed = 1.0 if a.speed is None else a.speed
    if not (speed >= 0 and speed != float("inf")):
        a.parser.error(f"--speed: expected a number >= 0, got {a.speed}")
    from tui.app import run_console
    from tui.link_replay import ReplayLink
    from twin.recorder import RecordingError

    try:
        link = ReplayLink(a.replay, speed=speed)
    except RecordingError as e:
        raise ConfigError(str(e)) from None
    _quiet_logging()
    return run_console(link, read_only=a.read_only)


SUBCOMMANDS: dict[str, Callable[[Any], None]] = {
    "predict": _add_predict,
    "simulate": _add_simulate,
    "serve": add_serve_parser,
    "watch": add_watch_parser,
    "chaos": add_chaos_parser,
    "replay": add_replay_parser,
    "tui": _add_tui,
    "bench": add_bench_parser,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            p = _Parser(prog="fleet-twin")
            sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
            for add in SUBCOMMANDS.values():
                add(sub)
            a = p.parse_args(argv)
            return int(a.func(a))
        if argv and argv[0] in ("-h", "--help"):
            print("usage: fleet-twin [FLEET] | fleet-twin {" + ",".join(SUBCOMMANDS) + "} ...")
            return 0
        return _cmd_main(argv)
    except ConfigError as e:
        sys.stderr.write(f"fleet-twin: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130
