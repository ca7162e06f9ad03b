"""The operator console: a Textual app on a `TwinLink` (in-process or MQTT).

The telemetry worker feeds every message to the store; a timer (5 Hz) draws what changed. Actions
become commands sent through the link in workers, so the screen never waits for a reply; every
reply goes to the event log, and an error reply is also raised as a notification.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from textual.app import App
from textual.binding import Binding, BindingType

from tui.actions import ACTIONS, REPLAY_ACTIONS, REPLAY_CONTROLS
from tui.commands import FleetCommands
from tui.format import sim_clock
from tui.link import REPLAY_REFUSED, TwinLink
from tui.screens.help import HelpScreen
from tui.screens.main import MainScreen
from tui.store import FleetStore
from tui.widgets.chip_map import ChipMap
from twin import telemetry

__all__ = ["FleetApp", "run_console"]

#: Screen refreshes per second (the issue's ceiling is ~10).
REFRESH_HZ = 5.0


class FleetApp(App[None]):
    """fleet-twin's console."""

    CSS_PATH = "app.tcss"
    TITLE = "fleet-twin"
    COMMANDS = App.COMMANDS | {FleetCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self, link: TwinLink, *, read_only: bool = False, refresh_hz: float = REFRESH_HZ
    ) -> None:
        super().__init__()
        self.link = link
        self.read_only = read_only
        #: A recording played back (`tui --replay`): pause, speed and seek; nothing else.
        self.replay = link.can_seek
        self.refresh_hz = refresh_hz
        self.store = FleetStore()
        self.main = MainScreen(self.store, link, read_only=read_only)
        self._link_state = ""
        self._stopped = False

    def on_mount(self) -> None:
        self.push_screen(self.main)
        mode = " (read-only: actions disabled)" if self.read_only else ""
        if self.replay and not self.read_only:
            mode = " (pause, speed and seek; the recording cannot be changed)"
        where = "embedded twin" if self.link.where == "in-process" else self.link.where
        self.note("info", "console", self.link.fleet, f"console on {where}{mode}; ? for keys")
        self.run_worker(self._telemetry(), name="telemetry", group="telemetry")
        self.set_interval(1.0 / self.refresh_hz, self.refresh_view)

    async def _telemetry(self) -> None:
        """Read the link's messages into the store (no drawing here)."""
        await self.link.start()
        n = 0
        async for msg in self.link.messages():
            self.store.apply(msg)
            n += 1
            if n % 512 == 0:  # a long backlog must not starve the screen
                await asyncio.sleep(0)

    def refresh_view(self) -> None:
        """Draw the store (the timer calls this ~5 times a second)."""
        state = self.link.state
        if state != self._link_state:
            if self._link_state:
                self._note_link(state)
            self._link_state = state
        self.main.refresh_from_store()

    def _note_link(self, state: str) -> None:
        detail = self.link.detail
        text = {
            "connected": f"connected to {self.link.where}",
            "stale": "stale: no fresh data; values on screen are the last received",
            "offline": "offline",
            "embedded": "embedded twin running",
            "replay": f"playing {self.link.where}",
        }.get(state, state)
        severity = "info" if state in ("connected", "embedded", "replay") else "warning"
        self.note(severity, "link", self.link.where, text + (f" ({detail})" if detail else ""))

    # -- the log and commands ------------------------------------------------------------------
    def note(self, severity: str, kind: str, target: str, text: str) -> None:
        """A line in the event log from the console itself."""
        self.store.note(self.store.sim_time_s, severity, kind, target, text)
        self.main.refresh_from_store()

    def refuse(self, what: str) -> None:
        """An action attempted in read-only mode."""
        self.note("warning", "read-only", what, f"{what}: refused, the console is read-only")

    def refuse_replay(self, what: str) -> None:
        """An action that would change the twin, attempted on a replay."""
        self.note("error", "replay", what, f"{what}: refused, {REPLAY_REFUSED}")

    def seek(self, sim_time_s: float) -> None:
        """Replay: jump to `sim_time_s`; the link repaints from the picture at that time."""
        if not self.link.can_seek:
            self.note("warning", "console", "", "seek: only a replay can seek")
            return
        t = self.link.seek(sim_time_s)
        self.store.note(t, "info", "seek", "replay", f"seek to {sim_clock(t)}")
        self.run_worker(self._redraw_soon(), group="commands")

    async def _redraw_soon(self) -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        self.refresh_view()

    def send(self, cmd: telemetry.Command, what: str) -> None:
        """Send a command through the link, in a worker; the reply goes to the event log."""
        if self.read_only:
            self.refuse(what)
            return
        self.run_worker(self._send(cmd, what), group="commands")

    async def _send(self, cmd: telemetry.Command, what: str) -> None:
        reply = await self.link.command(cmd)
        t = reply.sim_time_s if reply.sim_time_s > 0 else self.store.sim_time_s
        if reply.ok:
            self.store.note(t, "ok", "reply", what, reply.detail or "ok")
        else:
            self.store.note(t, "error", "reply", what, f"ERROR {reply.error}")
            self.notify(f"{what}: {reply.error}", title="command refused", severity="error")
        # The link follows an accepted command with a fresh snapshot: let the telemetry worker
        # take it into the store before redrawing, so the effect shows now, not at the next tick.
        for _ in range(3):
            await asyncio.sleep(0)
        self.refresh_view()

    # -- app actions ---------------------------------------------------------------------------
    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(self.help_sections(), note=self._help_note()))

    def _help_note(self) -> str:
        if self.read_only:
            return "read-only: the actions that change the twin are disabled"
        if self.replay:
            return f"{self.link.where}: the actions that change the twin are disabled"
        return ""

    def help_sections(self) -> list[tuple[str, list[tuple[str, str]]]]:
        sections: list[tuple[str, list[tuple[str, str]]]] = []
        if self.replay and not self.read_only:
            controls = [s for s in ACTIONS if s.action in REPLAY_CONTROLS]
            sections.append(
                (
                    "Replay (pause, speed and seek act on the playback)",
                    [(s.key_display, s.help) for s in (*controls, *REPLAY_ACTIONS)],
                )
            )
        elif not self.read_only:
            sections.append(
                (
                    "Change the twin (each sends a command; the reply goes to the event log)",
                    [(s.key_display, s.help) for s in ACTIONS if s.changes_twin],
                )
            )
        chip_keys = [
            (b.key_display or b.key, b.description)
            for b in ChipMap.BINDINGS
            if isinstance(b, Binding)
        ]
        sections.append(("Chip map (when focused)", chip_keys))
        view = [(s.key_display, s.help) for s in ACTIONS if not s.changes_twin]
        view += [
            ("?", "This help"),
            ("ctrl+p", "Command palette: every action and the twin's chaos scenarios, searchable"),
            ("tab / shift+tab", "Focus the next / previous panel"),
            ("mouse", "Click a chip to select it; wheel scrolls a panel"),
            ("q", "Quit"),
        ]
        sections.append(("View", view))
        sections.append(
            (
                "In a dialog",
                [("y", "Confirm a failure"), ("n / Esc", "Cancel"), ("Enter", "Pick / apply")],
            )
        )
        return sections

    async def action_quit(self) -> None:
        await self.shutdown()
        self.exit()

    async def on_unmount(self) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop the link (and with it an embedded twin); safe to call twice."""
        if not self._stopped:
            self._stopped = True
            await self.link.stop()


def run_console(link: TwinLink, *, read_only: bool = False) -> int:
    """Run the console until the operator quits; returns the exit status."""
    app = FleetApp(link, read_only=read_only)
    app.run()
    return int(app.return_code or 0)
