"""The command palette (Ctrl+P): every action of the console, the twin's chaos scenarios ("Run
scenario: <name>" for each of `meta.scenarios`, and "Stop scenario"), and, when searching, the
same actions with their argument already chosen (a link, a policy, a speed, an instance). In
read-only mode only the actions that change nothing are offered; on a replay, those and pause,
speed and seek ("Seek to...")."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from textual.command import DiscoveryHit, Hit, Hits, Provider

from tui.actions import ACTIONS, BURSTS, DEGRADE_FACTORS, REPLAY_ACTIONS, SPEEDS
from tui.format import speed_text
from twin import telemetry

if TYPE_CHECKING:
    from tui.app import FleetApp

__all__ = ["FleetCommands"]

Entry = tuple[str, str, Callable[[], Any]]


class FleetCommands(Provider):
    """fleet-twin's actions for the command palette."""

    @property
    def fleet_app(self) -> FleetApp:
        return self.app  # type: ignore[return-value]

    def entries(self, *, everything: bool) -> list[Entry]:
        app = self.fleet_app
        main = app.main
        out: list[Entry] = []
        replay = app.replay and not app.read_only
        for spec in (*ACTIONS, *(REPLAY_ACTIONS if replay else ())):
            if spec.changes_twin and main.locked(spec.action):
                continue
            out.append(
                (
                    spec.title,
                    f"{spec.help}  [{spec.key_display}]",
                    partial(app.run_action, spec.action, main),
                )
            )
        meta = app.store.meta
        if not app.read_only and not app.replay and meta is not None:
            for name in meta.scenarios:
                out.append(
                    (
                        f"Run scenario: {name}",
                        "a shipped chaos scenario on this twin, at its pace; its steps and "
                        "verdict go to the event log",
                        partial(main.run_scenario, name),
                    )
                )
            out.append(
                (
                    "Stop scenario",
                    "stop the running chaos scenario; its rollbacks run",
                    main.stop_scenario,
                )
            )
        out.append(("Help: keys", "Every key of the console  [?]", app.action_help))
        out.append(
            (
                "Chip map: collapse mode",
                "auto / every chip / one cell per instance  [c]",
                main.chip_map.action_cycle_collapse,
            )
        )
        if app.read_only or not everything:
            return out
        if not app.replay:
            self._fleet_entries(out)
        for s in SPEEDS:
            out.append((f"Speed {speed_text(s)}", "x real time", partial(main.set_speed, s)))
        out.append(("Speed max", "as fast as possible", partial(main.set_speed, 0.0)))
        if not app.replay:
            self._load_entries(out)
        return out

    def _fleet_entries(self, out: list[Entry]) -> None:
        """Links, instances and routing, with their argument chosen (not on a replay)."""
        main = self.fleet_app.main
        meta = self.fleet_app.store.meta
        if meta is not None:
            for lm in meta.links:
                for f in DEGRADE_FACTORS:
                    out.append(
                        (
                            f"Degrade link {lm.name} x{f:g}",
                            f"cut the link's bandwidth to {f * 100:g} %",
                            partial(
                                main.send_cmd,
                                telemetry.DegradeLink(link=lm.name, factor=f),
                                f"degrade {lm.name} x{f:g}",
                            ),
                        )
                    )
                out.append(
                    (
                        f"Restore link {lm.name}",
                        "full bandwidth",
                        partial(main.restore_link, lm.name),
                    )
                )
            for tm in meta.tiers:
                for k in range(tm.instances):
                    inst = f"{tm.name}/{k}"
                    out.append(
                        (f"Fail instance {inst}", "asks first", partial(main.ask_fail, inst))
                    )
                    for verb, cls in (("Recover", telemetry.Recover), ("Drain", telemetry.Drain)):
                        out.append(
                            (
                                f"{verb} instance {inst}",
                                f"{tm.vendor} {tm.system_name}",
                                partial(main.send_cmd, cls(target=inst), f"{verb.lower()} {inst}"),
                            )
                        )
        for policy in telemetry.POLICIES:
            out.append(
                (f"Routing: {policy}", "set the routing policy", partial(main.set_policy, policy))
            )

    def _load_entries(self, out: list[Entry]) -> None:
        """Bursts and arrival rates, with their argument chosen (not on a replay)."""
        main = self.fleet_app.main
        for f, d in BURSTS:
            out.append(
                (
                    f"Burst x{f:g} for {d:g} s",
                    "a burst of arrivals",
                    partial(
                        main.send_cmd,
                        telemetry.Burst(factor=f, duration_s=d),
                        f"burst x{f:g} {d:g} s",
                    ),
                )
            )
        for r in (0.0, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0):
            out.append((f"Rate {r:g}/s", "set the arrival rate", partial(main.set_rate, r)))

    async def discover(self) -> Hits:
        for name, help_text, callback in self.entries(everything=False):
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, callback in self.entries(everything=True):
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
