"""`fleet-twin serve` (a headless twin on MQTT) and `fleet-twin watch` (its summaries on stdout).

    fleet-twin serve FLEET --broker mqtt://HOST:PORT [--speed X] [--seed N] [--rate R]
        [--username U --password-file F] [--tls-ca F --tls-cert F --tls-key F]
        [--client-id ID] [--read-only] [--journal-dir DIR]
    fleet-twin watch --broker URL --fleet NAME [--json] [--count N] [credentials, TLS as above]

The password comes from `--password-file` or the environment (FLEET_TWIN_MQTT_PASSWORD; the
username may come from FLEET_TWIN_MQTT_USERNAME), never from a command-line argument, which any
user of the host could read in the process list.

`serve` runs until SIGINT or SIGTERM, then publishes its status offline and exits 0. A broker that
cannot be reached is one log line and a retry, never a traceback. Logs go to stderr.

This module imports no aiomqtt itself (twin.mqtt does), and only the parsers at import time, so
that `fleet-twin predict` does not pay for the live twin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
from typing import Any

from twin.catalog import ConfigError

ENV_USERNAME = "FLEET_TWIN_MQTT_USERNAME"
ENV_PASSWORD = "FLEET_TWIN_MQTT_PASSWORD"

log = logging.getLogger("twin.serve")

#: How long a stopping engine and bridge get before they are cancelled.
_STOP_TIMEOUT_S = 10.0


# ------------------------------------------------------------------------------------------------
# argument types


def _speed(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(
            f"expected x real time > 0, or 0 for as fast as possible, got {text!r}"
        )
    return v


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


class _RefusePassword(argparse.Action):
    """`--password` (with or without a value) is a usage error that never echoes the value: a
    password on the command line is readable by every user of the host (ps, /proc). Declared,
    rather than left unknown, so that a parser allowing abbreviations cannot take it for
    `--password-file`."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(
            f"unrecognized arguments: {option_string or '--password'} (a password is never taken "
            "from the command line, where every user of the host can read it: use "
            f"--password-file F or ${ENV_PASSWORD})"
        )


def add_broker_options(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("broker")
    g.add_argument(
        "--broker",
        required=required,
        metavar="URL",
        help="mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS",
    )
    g.add_argument("--username", metavar="U", help=f"broker account (or ${ENV_USERNAME})")
    g.add_argument(
        "--password-file",
        metavar="F",
        help=f"file whose first line is the password (or ${ENV_PASSWORD})",
    )
    g.add_argument("--password", nargs="?", action=_RefusePassword, help=argparse.SUPPRESS)
    g.add_argument("--tls-ca", metavar="F", help="CA bundle to verify the broker (mqtts://)")
    g.add_argument("--tls-cert", metavar="F", help="client certificate (mqtts://)")
    g.add_argument("--tls-key", metavar="F", help="client private key (mqtts://)")
    g.add_argument("--client-id", metavar="ID", help="MQTT client id (default: generated)")
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="log level on stderr (default info)",
    )


def credentials(a: argparse.Namespace) -> tuple[str | None, str | None]:
    """(username, password) from the options and the environment; ConfigError when unusable."""
    username = a.username or os.environ.get(ENV_USERNAME) or None
    password: str | None
    if a.password_file:
        try:
            with open(a.password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"--password-file {a.password_file}: cannot read it ({e.strerror or e})"
                if isinstance(e, OSError)
                else f"--password-file {a.password_file}: not UTF-8 text"
            ) from None
        if not password:
            raise ConfigError(f"--password-file {a.password_file}: the first line is empty")
        where = "--password-file"
    else:
        password = os.environ.get(ENV_PASSWORD) or None
        where = ENV_PASSWORD
    if password is not None and username is None:
        raise ConfigError(f"a broker password ({where}) needs --username (or ${ENV_USERNAME})")
    return username, password


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def broker_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    username, password = credentials(a)
    return {
        "username": username,
        "password": password,
        "tls_ca": a.tls_ca,
        "tls_cert": a.tls_cert,
        "tls_key": a.tls_key,
        "client_id": a.client_id,
    }


# ------------------------------------------------------------------------------------------------
# serve


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        allow_abbrev=False,  # `--password` must not mean `--password-file`
        help="headless twin: telemetry out and commands in over MQTT",
        description="Run the twin headless: publish its telemetry to an MQTT broker and take "
        "commands from it, until SIGINT or SIGTERM.",
    )
    p.add_argument("fleet", help="fleet file or shipped fleet name")
    p.add_argument(
        "--speed",
        type=_speed,
        default=1.0,
        help="x real time (default 1); 0 runs as fast as possible",
    )
    p.add_argument("--seed", type=_nonneg_int, default=None, help="random seed (default: fleet's)")
    p.add_argument("--rate", type=_positive, default=None, help="arrivals per second")
    p.add_argument(
        "--read-only",
        action="store_true",
        help="publish telemetry only; every command gets an error reply",
    )
    p.add_argument(
        "--journal-dir",
        metavar="DIR",
        help="write the JSON journal of every scenario run with run_scenario into DIR",
    )
    p.add_argument(
        "--record",
        metavar="FILE",
        help="flight recorder: every message and command to FILE (docs/recorder.md)",
    )
    add_broker_options(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    _setup_logging(a.log_level)
    from twin.build import new_twin
    from twin.catalog import load_catalog
    from twin.fleet import load_fleet, resolve_fleet_path
    from twin.mqtt import BrokerConfig

    kwargs = broker_kwargs(a)
    BrokerConfig.make(a.broker, **kwargs)  # a bad URL or TLS file fails before the fleet loads
    catalog = load_catalog()
    fleet = load_fleet(resolve_fleet_path(a.fleet), catalog)
    twin = new_twin(fleet, catalog, seed=a.seed, rate_per_s=a.rate)
    return asyncio.run(_serve(twin, a, kwargs))


async def _serve(twin: Any, a: argparse.Namespace, kwargs: dict[str, Any]) -> int:
    from twin.chaos_live import install_scenarios
    from twin.engine import Engine
    from twin.mqtt import MqttBridge
    from twin.replay import start_recording

    engine = Engine(twin, speed=a.speed, read_only=a.read_only)
    install_scenarios(engine, journal_dir=a.journal_dir)
    if a.record:
        start_recording(engine, a.record)  # closed when the process exits
    bridge = MqttBridge(engine, a.broker, read_only=a.read_only, **kwargs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "serving fleet %s (run %s), %s, on %s%s",
        bridge.fleet,
        bridge.run_id,
        f"{a.speed:g}x real time" if a.speed > 0 else "as fast as possible",
        bridge.config.url,
        ", read-only" if a.read_only else "",
    )
    engine_task = asyncio.create_task(engine.run(), name="engine")
    bridge_task = asyncio.create_task(bridge.run(), name="mqtt-bridge")
    stopper = asyncio.create_task(stop.wait(), name="signals")
    await asyncio.wait({engine_task, bridge_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if engine_task.done() and not stopper.done():
        status = 1
        exc = None if engine_task.cancelled() else engine_task.exception()
        log.error("the engine stopped: %s", exc if exc is not None else "without being asked")
    elif bridge_task.done() and not stopper.done():
        status = 1
        exc = None if bridge_task.cancelled() else bridge_task.exception()
        log.error("the MQTT bridge stopped: %s", exc if exc is not None else "without being asked")
    else:
        log.info("stopping")
    stopper.cancel()
    engine.stop()
    await _finish(engine_task)
    await engine.close_scenario()  # a scenario still running rolls back (and ends its journal)
    bridge.stop()
    await _finish(bridge_task)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    return status


async def _finish(task: asyncio.Task[Any]) -> None:
    try:
        await asyncio.wait_for(task, _STOP_TIMEOUT_S)
    except TimeoutError:
        log.warning("%s did not stop within %g s; cancelled", task.get_name(), _STOP_TIMEOUT_S)
    except asyncio.CancelledError:
        pass
    except Exception as e:
        log.error("%s failed: %s", task.get_name(), e)


# ------------------------------------------------------------------------------------------------
# watch


def add_watch_parser(sub: Any) -> None:
    p = sub.add_parser(
        "watch",
        allow_abbrev=False,
        help="print a twin's summaries from MQTT, one line each",
        description="Subscribe to a twin's summary and status topics and print one line per "
        "summary (or the JSON messages with --json). Ctrl-C to stop.",
    )
    p.add_argument("--fleet", required=True, help="fleet name (the topic is fleet-twin/v1/NAME/)")
    p.add_argument("--json", action="store_true", help="print the messages as JSON lines")
    p.add_argument(
        "--count", type=_nonneg_int, default=0, help="exit after N summaries (default: never)"
    )
    add_broker_options(p)
    p.set_defaults(func=cmd_watch)


def _num(v: float, fmt: str, scale: float = 1.0) -> str:
    """-1 (no data) as '-', right-aligned like the number would be."""
    width = int(fmt.split(".")[0] or 0)
    return f"{'-':>{width}}" if v < 0 else f"{v * scale:{fmt}}"


def format_summary(s: Any) -> str:
    """One line of `watch`: sim time, arrivals/s, tokens/s, TTFT/TPOT p99, goodput, power,
    in flight."""
    return (
        f"t={s.sim_time_s:9.1f}s  arr {s.arrivals_per_s:7.2f}/s  "
        f"tok {s.tokens_per_s:9.0f}/s  "
        f"TTFT p99 {_num(s.ttft_p99_s, '7.3f')} s  "
        f"TPOT p99 {_num(s.tpot_p99_s, '6.1f', 1e3)} ms  "
        f"goodput {_num(s.goodput_fraction, '5.1f', 100)}%  "
        f"power {s.power_w / 1e3:8.1f} kW  "
        f"in flight {s.in_flight:6d}" + ("  [paused]" if s.paused else "")
    )


def format_status(s: Any) -> str:
    return f"# {s.fleet} {s.state} (run {s.run_id}, schema {s.schema})"


def cmd_watch(a: argparse.Namespace) -> int:
    _setup_logging(a.log_level)
    from twin.mqtt import BrokerConfig

    config = BrokerConfig.make(a.broker, **broker_kwargs(a))
    try:
        return asyncio.run(_watch(config, a))
    except BrokenPipeError:
        # The reader went away (`| head`): not an error. Keep Python's exit flush quiet.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0


async def _watch(config: Any, a: argparse.Namespace) -> int:
    import msgspec

    from twin import telemetry
    from twin.mqtt import watch_messages

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    out = sys.stdout
    summaries = 0
    try:
        async with contextlib.aclosing(watch_messages(config, a.fleet, stop=stop)) as stream:
            async for _topic, payload in stream:
                try:
                    msg = telemetry.decode_message(payload)
                except msgspec.DecodeError:
                    continue  # a kind this version does not know
                if a.json:
                    line = payload if b"\n" not in payload else telemetry.encode(msg)
                    out.write(line.decode("utf-8", "replace") + "\n")
                elif isinstance(msg, telemetry.Summary):
                    out.write(format_summary(msg) + "\n")
                elif isinstance(msg, telemetry.Status):
                    out.write(format_status(msg) + "\n")
                else:
                    continue
                out.flush()
                if isinstance(msg, telemetry.Summary):
                    summaries += 1
                    if a.count and summaries >= a.count:
                        break
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
