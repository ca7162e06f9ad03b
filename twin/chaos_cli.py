"""`fleet-twin chaos SCENARIO [--fleet FILE] [--journal FILE] [--json] [--broker URL]`.

Exit status: 0 when every hypothesis, invariant, expectation (or comparison) holds; 1 when any
fails, the steady state does not hold before the method (`not-run`) or a live run is aborted;
2 when the scenario is invalid (one line on stderr: file, key path, what was expected).

Only argparse at import time: the simulation is imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from twin.catalog import ConfigError


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def add_chaos_parser(sub: Any) -> None:
    from twin.serve import add_broker_options

    p = sub.add_parser(
        "chaos",
        help="run a scripted chaos scenario; exit status = verdict, JSON journal",
        description="Run a chaos scenario (fleets/scenarios/*.toml, or a shipped scenario's "
        "name) in-process as fast as possible, or against a live twin with --broker. Exit 0 "
        "when every check holds, 1 when one fails, 2 when the scenario is invalid.",
    )
    p.add_argument("scenario", help="scenario file, or the name of a shipped scenario")
    p.add_argument("--fleet", help="run on this fleet (file or shipped name) instead")
    p.add_argument("--journal", metavar="FILE", help="write the JSON journal to FILE")
    p.add_argument("--json", action="store_true", help="print the JSON journal, not a summary")
    p.add_argument(
        "--timeout",
        type=_positive,
        default=30.0,
        metavar="S",
        help="--broker: give up when no twin answers within min(S, 10) s, or when its simulated "
        "time stands still for S seconds (default 30)",
    )
    add_broker_options(p, required=False)
    p.set_defaults(func=cmd_chaos)


def cmd_chaos(a: argparse.Namespace) -> int:
    from twin.chaos import ComparePlan, load_plan, resolve_scenario_path, run_compare, run_plan

    path = resolve_scenario_path(a.scenario)
    plan = load_plan(path, fleet=a.fleet)
    if isinstance(plan, ComparePlan):
        if a.broker:
            raise ConfigError(f"{path}: a comparison runs its fleets in-process; drop --broker")
        journal = run_compare(plan)
    elif a.broker:
        import asyncio
        import logging

        from twin.chaos import run_plan_async
        from twin.chaos_mqtt import MqttDriver
        from twin.serve import broker_kwargs

        logging.basicConfig(
            level=getattr(logging, a.log_level.upper()),
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        driver = MqttDriver(
            plan,
            a.broker,
            stall_timeout_s=a.timeout,
            connect_timeout_s=min(a.timeout, 10.0),
            **broker_kwargs(a),
        )
        journal = asyncio.run(run_plan_async(plan, driver))
    else:
        journal = run_plan(plan)
    text = json.dumps(journal, indent=2, allow_nan=False) + "\n"
    if a.journal:
        try:
            Path(a.journal).write_text(text, encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--journal {a.journal}: cannot write it ({e.strerror})") from None
    if a.json:
        sys.stdout.write(text)
    else:
        sys.stdout.write(format_journal(journal))
    sys.stdout.flush()
    return int(journal["exit_status"])


# ------------------------------------------------------------------------------------------------
# the human summary


def _n(v: Any) -> str:
    if v is None:
        return "no data"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _named(entry: dict[str, Any]) -> str:
    """A check's own name, when the file gave it one."""
    name = entry.get("name", "")
    if not name or name == entry.get("key") or name in ("conservation", "rejections-have-a-reason"):
        return ""
    return f"[{name}] "


def _mark(verdict: str) -> str:
    return "  ok " if verdict == "held" else "FAIL "


def format_journal(j: dict[str, Any]) -> str:
    if j["kind"] == "compare":
        return _format_compare(j)
    sc = j["scenario"]
    w = j["wall"]
    lines = [
        f"{sc['title']}  ({sc['file']})",
        f"  fleet {sc['fleet']}, seed {j['seed']}, {sc['warmup_s']:g} s warm-up + "
        f"{sc['duration_s']:g} s method, {j['mode']}: {w['simulated_s']:g} s simulated in "
        f"{w['wall_time_s']:g} s",
    ]
    t0 = j["method_start_sim_time_s"] or 0.0
    for when in ("before", "after"):
        h = j["steady_state"][when]
        if h is None:
            continue
        lines.append(f"  steady state {when} the method (t={h['sim_time_s']:g} s): {h['verdict']}")
        for p in h["probes"]:
            extra = f", off by {_n(p['margin'])}" if "margin" in p else ""
            value = _n(p["value"])
            lines.append(f"   {_mark(p['verdict'])} {_named(p)}{p['check']}: {value}{extra}")
    if j["actions"]:
        lines.append("  actions:")
        for a in j["actions"]:
            t = a["sim_time_s"]
            when = f"t={t:.1f} s" if t is not None else "t=?"
            if a["phase"] == "method" and t is not None:
                when += f" (+{t - t0:.1f})"
            first = a["commands"][0]["reply"] if a["commands"] else {"detail": "", "error": ""}
            what = first["detail"] if a["ok"] else first["error"] or "refused"
            more = f" (+{len(a['commands']) - 1} more)" if len(a["commands"]) > 1 else ""
            lines.append(
                f"   {' ok ' if a['ok'] else 'FAIL'}  {when:<20} {a['phase']:<8} "
                f"{a['name']}: {what}{more}"
            )
    if j["invariants"]:
        lines.append("  invariants:")
        for inv in j["invariants"]:
            extra = ""
            if inv["verdict"] != "held":
                worst = inv.get("worst", {})
                extra = (
                    f"; {inv['violations']} violations, worst {_n(worst.get('value'))} "
                    f"at t={_n(worst.get('sim_time_s'))} s"
                )
            lines.append(
                f"   {_mark(inv['verdict'])} {inv['check']} ({inv['checks']} checks{extra})"
            )
    if j["expectations"]:
        lines.append("  expectations:")
        for e in j["expectations"]:
            span = f"within {e['within_s']:g} s"
            if e.get("from_s"):
                span = f"from {e['from_s']:g} to {e['within_s']:g} s"
            head = f"{span} after {e['after']}, {e['check']}"
            if e["holds"] == "always":
                head += " throughout"
            if "held_after_s" in e:
                tail = f"held {e['held_after_s']:g} s after ({_n(e['value'])})"
            elif "violated_after_s" in e:
                tail = (
                    f"violated {e['violated_after_s']:g} s after ({_n(e['value'])}, off by "
                    f"{_n(e['margin'])})"
                )
            elif e["verdict"] == "held":
                tail = f"held at all {e['checks']} snapshots (worst {_n(e.get('value'))})"
            elif "margin" in e:
                tail = f"closest {_n(e['value'])}, off by {_n(e['margin'])}"
            else:
                tail = e["verdict"]
            lines.append(f"   {_mark(e['verdict'])} {_named(e)}{head}: {tail}")
    lines.append(f"  verdict: {j['verdict'].upper()}")
    for f in j["failures"]:
        lines.append(f"    - {f}")
    return "\n".join(lines) + "\n"


def _format_compare(j: dict[str, Any]) -> str:
    sc = j["scenario"]
    lines = [
        f"{sc['title']}  ({sc['file']})",
        f"  comparison, seed {j['seed']}, {sc['warmup_s']:g} s warm-up + {sc['duration_s']:g} s "
        f"measured per run, {j['wall']['wall_time_s']:g} s wall",
        f"  {'run':<18}{'fleet':<20}{'rate':>6}{'TPOT SLO':>9}{'goodput':>9}{'good/s':>8}"
        f"{'TTFT p99':>9}{'TPOT p99':>9}{'tok/s':>9}{'kW':>7}{'tok/J':>7}",
    ]
    for name, r in j["runs"].items():
        m = r["metrics"]

        def f(v: Any, fmt: str, scale: float = 1.0) -> str:
            return "-" if v is None else format(v * scale, fmt)

        lines.append(
            f"  {name:<18}{r['fleet']:<20}{r['rate_per_s']:>6g}"
            f"{f(r['slo_tpot_s'], '.0f', 1e3):>7}ms{f(m['goodput_fraction'], '.1%'):>9}"
            f"{f(m['goodput_per_s'], '.1f'):>8}{f(m['ttft_p99_s'], '.3f'):>8}s"
            f"{f(m['tpot_p99_s'], '.1f', 1e3):>7}ms{f(m['tokens_per_s'], '.0f'):>9}"
            f"{f(m['power_w'], '.1f', 1e-3):>7}{f(m['tokens_per_joule'], '.3f'):>7}"
        )
    lines.append("  relations:")
    for rel in j["relations"]:
        ratio = f", ratio {rel['ratio']:.3g}" if rel.get("ratio") is not None else ""
        lines.append(
            f"   {_mark(rel['verdict'])} {rel['name']}: {rel['check']}: {_n(rel['left'])} vs "
            f"{_n(rel['threshold'])}{ratio}"
        )
    lines.append(f"  verdict: {j['verdict'].upper()}")
    for fl in j["failures"]:
        lines.append(f"    - {fl}")
    return "\n".join(lines) + "\n"
