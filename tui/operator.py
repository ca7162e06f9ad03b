"""The operator's actions on the main screen. Every action that changes the twin becomes one
telemetry command sent through the link; the reply (an error included) goes to the event log. In
read-only mode the app refuses them (and the screen hides their keys)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tui.actions import BURSTS, DEGRADE_FACTORS, RATE_STEP, SEEK_STEP_S, SPEEDS
from tui.format import sim_clock, speed_text
from tui.screens.ask import AskScreen
from tui.screens.confirm import ConfirmScreen
from tui.screens.picker import PickScreen
from tui.screens.weights import WeightsScreen
from twin import telemetry

if TYPE_CHECKING:
    from tui.app import FleetApp
    from tui.widgets.chip_map import ChipRef

__all__ = ["OperatorActions"]


def _next_speed(speed: float, up: bool) -> float | None:
    if speed <= 0:  # as fast as possible
        return None if up else SPEEDS[-1]
    if up:
        return next((s for s in SPEEDS if s > speed * 1.0001), None)
    return next((s for s in reversed(SPEEDS) if s < speed * 0.9999), None)


def _number(text: str, *, positive: bool = False) -> str | None:
    """None if `text` is a usable number, else why not."""
    try:
        v = float(text)
    except ValueError:
        return f"{text!r} is not a number"
    if v != v or v in (float("inf"), float("-inf")):
        return "expected a finite number"
    if v < 0 or (positive and v == 0):
        return "expected a number > 0" if positive else "expected a number >= 0"
    return None


def parse_sim_time(text: str) -> float | None:
    """Simulated seconds from "90", "1:30" or "0:01:30.5"; None when it is none of these."""
    parts = text.strip().split(":")
    if not 1 <= len(parts) <= 3:
        return None
    try:
        values = [float(p) for p in parts]
    except ValueError:
        return None
    t = 0.0
    for v in values:
        if not (v == v and abs(v) != float("inf")) or v < 0:
            return None
        t = t * 60.0 + v
    return t


def _sim_time_problem(text: str) -> str | None:
    if parse_sim_time(text) is None:
        return f"{text!r} is not a time: seconds (90) or h:mm:ss (0:01:30)"
    return None


class OperatorActions:
    """The main screen's actions. Needs `self.app` (a FleetApp) and `self.selected_ref()`."""

    app: Any

    @property
    def fleet_app(self) -> FleetApp:
        return self.app

    def selected_ref(self) -> ChipRef | None:  # the main screen provides it
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------
    def send_cmd(self, cmd: telemetry.Command, what: str) -> None:
        """Send one command; its reply goes to the event log."""
        self.fleet_app.send(cmd, what)

    _send = send_cmd

    def _note(self, text: str, severity: str = "warning") -> None:
        self.fleet_app.note(severity, "console", "", text)

    def _target(self, instance: bool) -> str | None:
        ref = self.selected_ref()
        if ref is None:
            self._note("no chip selected (the chip map has no data yet)")
            return None
        return ref.instance_id if instance else ref.chip_id

    def ask_fail(self, target: str) -> None:
        """Fail a chip or an instance, after a confirmation."""
        meta = self.fleet_app.store.meta
        parts = target.split("/")
        inst = "/".join(parts[:2])
        chips = ""
        if meta is not None:
            tm = next((t for t in meta.tiers if t.name == parts[0]), None)
            if tm is not None:
                chips = f" ({tm.chips // max(1, tm.instances)} chips)"
        what = f"chip {target}" if len(parts) == 3 else f"instance {target}"
        question = (
            f"Fail {what}?\n\nInstance {inst}{chips} goes down: its prefill work is re-queued, "
            "its decode requests lose their KV cache and go back to prefill."
        )

        def done(ok: bool | None) -> None:
            if ok:
                self._send(telemetry.Fail(target=target), f"fail {target}")
            else:
                self._note(f"fail {target}: cancelled", "info")

        self.fleet_app.push_screen(ConfirmScreen(question, confirm="Fail"), done)

    # -- chips -------------------------------------------------------------------------------
    def action_fail_chip(self) -> None:
        if (target := self._target(instance=False)) is not None:
            self.ask_fail(target)

    def action_fail_instance(self) -> None:
        if (target := self._target(instance=True)) is not None:
            self.ask_fail(target)

    def action_recover_chip(self) -> None:
        if (target := self._target(instance=False)) is not None:
            self._send(telemetry.Recover(target=target), f"recover {target}")

    def action_recover_instance(self) -> None:
        if (target := self._target(instance=True)) is not None:
            self._send(telemetry.Recover(target=target), f"recover {target}")

    def action_drain_chip(self) -> None:
        if (target := self._target(instance=False)) is not None:
            self._send(telemetry.Drain(target=target), f"drain {target}")

    def action_drain_instance(self) -> None:
        if (target := self._target(instance=True)) is not None:
            self._send(telemetry.Drain(target=target), f"drain {target}")

    # -- links -------------------------------------------------------------------------------
    def _link_factors(self) -> dict[str, float]:
        store = self.fleet_app.store
        factors = {lm.name: 1.0 for lm in (store.meta.links if store.meta else [])}
        if store.summary is not None:
            factors.update({ls.name: ls.factor for ls in store.summary.links})
        return factors

    def action_degrade_link(self) -> None:
        factors = self._link_factors()
        if not factors:
            self._note("this fleet has no KV links (its tiers are unified)")
            return
        options = [(n, f"{n}  (x{f:g})" if f < 1 else n) for n, f in factors.items()]
        self.fleet_app.push_screen(
            PickScreen("Degrade which KV link?", options),
            lambda link: self.degrade_link(link) if link else None,
        )

    def degrade_link(self, link: str) -> None:
        """Ask for the bandwidth factor of `link`, then degrade it."""
        options = [(f"{f:g}", f"x{f:g}  ({f * 100:g} % of its bandwidth)") for f in DEGRADE_FACTORS]

        def done(factor: str | None) -> None:
            if factor:
                self._send(
                    telemetry.DegradeLink(link=link, factor=float(factor)),
                    f"degrade {link} x{factor}",
                )

        self.fleet_app.push_screen(PickScreen(f"Bandwidth of {link}", options), done)

    def action_restore_link(self) -> None:
        degraded = [n for n, f in self._link_factors().items() if f < 1]
        if not degraded:
            self._note("no KV link is degraded", "info")
            return
        self.fleet_app.push_screen(
            PickScreen("Restore which KV link?", [(n, n) for n in degraded]),
            lambda link: self.restore_link(link) if link else None,
        )

    def restore_link(self, link: str) -> None:
        self._send(telemetry.RestoreLink(link=link), f"restore {link}")

    # -- load --------------------------------------------------------------------------------
    def _rate(self) -> float | None:
        """The arrival rate set on the twin, before any burst (a burst ends by itself: + and -
        step the rate it returns to). A twin older than `base_rate_per_s` sends -1 for it."""
        s = self.fleet_app.store.summary
        if s is None:
            self._note("no figures from the twin yet: its arrival rate is unknown")
            return None
        return s.base_rate_per_s if s.base_rate_per_s >= 0 else s.rate_per_s

    def set_rate(self, rate: float) -> None:
        self._send(telemetry.SetRate(rate_per_s=rate), f"rate {rate:g}/s")

    def action_rate_up(self) -> None:
        if (rate := self._rate()) is not None:
            self.set_rate(round(rate * RATE_STEP, 2) if rate > 0 else 1.0)

    def action_rate_down(self) -> None:
        if (rate := self._rate()) is not None:
            new = round(rate / RATE_STEP, 2)
            self.set_rate(new if new >= 0.05 else 0.0)

    def action_set_rate(self) -> None:
        rate = self._rate()

        def done(text: str | None) -> None:
            if text is not None:
                self.set_rate(float(text))

        self.fleet_app.push_screen(
            AskScreen(
                "Arrival rate (requests/s)",
                "" if rate is None else f"{rate:g}",
                check=_number,
            ),
            done,
        )

    def action_burst(self) -> None:
        options = [(f"{f:g}:{d:g}", f"x{f:g} for {d:g} s") for f, d in BURSTS]

        def done(choice: str | None) -> None:
            if choice:
                f, d = (float(x) for x in choice.split(":"))
                self._send(telemetry.Burst(factor=f, duration_s=d), f"burst x{f:g} {d:g} s")

        self.fleet_app.push_screen(PickScreen("Burst of arrivals", options), done)

    # -- routing -----------------------------------------------------------------------------
    def action_routing(self) -> None:
        s = self.fleet_app.store.summary
        current = s.policy if s is not None else ""
        options = [(p, f"{p}  (now)" if p == current else p) for p in telemetry.POLICIES]
        self.fleet_app.push_screen(
            PickScreen("Routing policy", options, highlight=current),
            lambda policy: self.set_policy(policy) if policy else None,
        )

    def set_policy(self, policy: str) -> None:
        if policy == "weighted":
            self.action_weights()
        else:
            self._send(telemetry.SetRouting(policy=policy), f"routing {policy}")

    def action_weights(self) -> None:
        meta = self.fleet_app.store.meta
        if meta is None:
            self._note("no topology from the twin yet")
            return

        def done(weights: dict[str, float] | None) -> None:
            if weights is not None:
                shown = ", ".join(f"{k}={v:g}" for k, v in weights.items()) or "unchanged"
                self._send(
                    telemetry.SetRouting(policy="weighted", weights=weights),
                    f"routing weighted ({shown})",
                )

        s = self.fleet_app.store.summary
        current = dict(s.weights) if s is not None else {}
        self.fleet_app.push_screen(WeightsScreen([t.name for t in meta.tiers], current), done)

    # -- scenarios ---------------------------------------------------------------------------
    def run_scenario(self, name: str) -> None:
        """Run one of the twin's scenarios (`meta.scenarios`); its events go to the log."""
        self._send(telemetry.RunScenario(name=name), f"scenario {name}")

    def stop_scenario(self) -> None:
        """Stop the running scenario; the twin runs its rollbacks."""
        self._send(telemetry.StopScenario(), "stop scenario")

    # -- clock -------------------------------------------------------------------------------
    def action_toggle_pause(self) -> None:
        s = self.fleet_app.store.summary
        if s is not None and s.paused:
            self._send(telemetry.Resume(), "resume")
        else:
            self._send(telemetry.Pause(), "pause")

    def set_speed(self, speed: float) -> None:
        self._send(telemetry.SetSpeed(speed=speed), f"speed {speed_text(speed)}")

    def _step_speed(self, up: bool) -> None:
        s = self.fleet_app.store.summary
        if s is None:
            self._note("no figures from the twin yet: its speed is unknown")
            return
        new = _next_speed(s.speed, up)
        if new is None:
            self._note(f"already at {speed_text(s.speed)}", "info")
            return
        self.set_speed(new)

    def action_speed_up(self) -> None:
        self._step_speed(up=True)

    def action_speed_down(self) -> None:
        self._step_speed(up=False)

    # -- replay --------------------------------------------------------------------------------
    def seek_to(self, sim_time_s: float) -> None:
        """Replay: jump to `sim_time_s` (clamped to the recording)."""
        self.fleet_app.seek(sim_time_s)

    def _seek_by(self, delta_s: float) -> None:
        link = self.fleet_app.link
        if link.can_seek:
            self.seek_to(link.timeline[1] + delta_s)

    def action_seek_back(self) -> None:
        self._seek_by(-SEEK_STEP_S)

    def action_seek_forward(self) -> None:
        self._seek_by(SEEK_STEP_S)

    def action_seek_to(self) -> None:
        link = self.fleet_app.link
        if not link.can_seek:
            return
        start, now, end = link.timeline

        def done(text: str | None) -> None:
            if text is not None and (t := parse_sim_time(text)) is not None:
                self.seek_to(t)

        self.fleet_app.push_screen(
            AskScreen(
                f"Seek to simulated time (seconds or h:mm:ss; {sim_clock(start)} to "
                f"{sim_clock(end)})",
                sim_clock(now),
                check=_sim_time_problem,
            ),
            done,
        )
