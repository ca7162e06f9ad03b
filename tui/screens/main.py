"""The console's one screen: header, tiers, latency, KV links, chip map, chip detail, event log,
footer. It draws from the store on the app's timer, never per message."""

from __future__ import annotations

import contextlib
from typing import ClassVar

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer

from tui.actions import ACTIONS, OPERATOR_ACTIONS, REPLAY_ACTIONS, REPLAY_CONTROLS
from tui.link import TwinLink
from tui.operator import OperatorActions
from tui.store import FleetStore
from tui.widgets.chip_detail import ChipDetail
from tui.widgets.chip_map import ChipMap, ChipRef
from tui.widgets.event_log import EventLog
from tui.widgets.header import FleetHeader
from tui.widgets.kv_links import KvLinks
from tui.widgets.latency import LatencyPanel
from tui.widgets.tier_table import ESTIMATE_MARK, TierTable
from twin import telemetry

__all__ = ["MainScreen"]

#: Keys of the actions that change the twin (refused, with a note, in read-only mode).
_OPERATOR_KEYS = {
    key: spec for spec in ACTIONS if spec.changes_twin for key in spec.keys.split(",")
}
#: The actions a replay offers that no other link has.
_SEEK_ACTIONS = frozenset(s.action for s in REPLAY_ACTIONS)
_CHIP_LEGEND = "■ up  ▣ instance  [b red]✗[/] failed  [b yellow]◌[/] draining  · no data"


class MainScreen(OperatorActions, Screen[None]):
    """Everything on one screen, dense; panels shrink and scroll on small terminals."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding(s.keys, s.action, s.title, show=s.footer, key_display=s.key_display)
        for s in (*ACTIONS, *REPLAY_ACTIONS)
    ]

    def __init__(self, store: FleetStore, link: TwinLink, *, read_only: bool = False) -> None:
        super().__init__()
        self.store = store
        self.link = link
        self.read_only = read_only
        #: A recording played back: seek is offered, the actions that change the twin are not.
        self.replay = link.can_seek
        self._seen: dict[str, int] = {}
        self._fit_key: tuple[int, int, int, int] = (0, 0, 0, 0)
        #: True once the panels are mounted (the app may draw before that).
        self.ready = False

    def compose(self) -> ComposeResult:
        yield FleetHeader(id="header")
        with Horizontal(id="top"):
            with VerticalScroll(id="tiers-panel", classes="panel"):
                yield TierTable(id="tiers")
            with Vertical(id="side"):
                with Vertical(id="latency-panel", classes="panel"):
                    yield LatencyPanel(id="latency")
                with VerticalScroll(id="links-panel", classes="panel"):
                    yield KvLinks(id="links")
        with Horizontal(id="middle"):
            yield ChipMap(id="chips", classes="panel")
            with VerticalScroll(id="detail-panel", classes="panel"):
                yield ChipDetail(id="detail")
        yield EventLog(id="events", classes="panel")
        yield Footer()

    @property
    def chip_map(self) -> ChipMap:
        return self.query_one(ChipMap)

    def on_mount(self) -> None:
        titles = {
            "#tiers-panel": ("Tiers", f"{ESTIMATE_MARK} hardware figures include estimates"),
            "#latency-panel": ("Latency", "window of the twin"),
            "#links-panel": ("KV links", ""),
            "#chips": ("Chips", _CHIP_LEGEND),
            "#detail-panel": ("Chip", ""),
            "#events": ("Events", "sim time"),
        }
        for sel, (title, sub) in titles.items():
            w = self.query_one(sel)
            w.border_title = title
            w.border_subtitle = sub
        self.chip_map.focus()
        self.ready = True
        self.call_after_refresh(self.refresh_from_store)

    def on_unmount(self) -> None:
        self.ready = False

    def selected_ref(self) -> ChipRef | None:
        return self.chip_map.selected

    # -- read-only and replay ------------------------------------------------------------------
    def locked(self, action: str) -> bool:
        """An action that changes the twin, which this console may not do (read-only, or a
        replay: there only pause and speed work, on the playback)."""
        if action not in OPERATOR_ACTIONS:
            return False
        return self.read_only or (self.replay and action not in REPLAY_CONTROLS)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Hidden from the footer, the help and the palette (on_key refuses the keys).
        if action in _SEEK_ACTIONS:
            return self.replay
        return not self.locked(action)

    def on_key(self, event: events.Key) -> None:
        spec = _OPERATOR_KEYS.get(event.key)
        if spec is not None and self.locked(spec.action):
            if self.read_only:
                self.fleet_app.refuse(spec.title.lower())
            else:
                self.fleet_app.refuse_replay(spec.title.lower())
            event.stop()
            event.prevent_default()

    # -- view actions --------------------------------------------------------------------------
    def action_zoom(self) -> None:
        """Maximize the focused panel, or restore the layout."""
        if self.maximized is not None:
            self.minimize()
            return
        focused = self.focused
        for node in focused.ancestors_with_self if focused is not None else []:
            if isinstance(node, Widget) and node.has_class("panel"):
                self.maximized = node
                return

    # -- drawing -------------------------------------------------------------------------------
    def _changed(self, key: str, version: int) -> bool:
        if self._seen.get(key) == version:
            return False
        self._seen[key] = version
        return True

    def refresh_from_store(self) -> None:
        """Draw what changed in the store since the last call (the app's timer calls this)."""
        if not self.ready or not self.app.is_running:
            return
        with contextlib.suppress(NoMatches):  # the app is closing: the panels are gone
            self._draw()

    def _draw(self) -> None:
        store, link = self.store, self.link
        chip_map = self.chip_map
        meta = store.meta
        stale = link.state in ("stale", "offline") and store.received > 0
        self.set_class(stale, "-stale")
        if meta is not None and self._changed("meta", store.meta_version):
            chip_map.set_meta(meta)
            self._fit()
        if meta is not None and self._changed("tiers", store.tiers_version):
            self.query_one(TierTable).show(meta, store.tiers, store.tier_history)
        if meta is not None and self._changed("summary", store.summary_version):
            if store.summary is not None:
                self.query_one(LatencyPanel).show(
                    meta,
                    store.summary,
                    store.ttft_history,
                    store.tpot_history,
                    store.goodput_history,
                )
            self.query_one(KvLinks).show(meta, store.summary)
            self._links_title(meta, store.summary)
        if meta is not None and self._changed("chips", store.chips_version):
            chip_map.set_chips(store.chips)
            self._show_detail(chip_map.selected)
        failed = f" · {chip_map.failed} failed" if chip_map.failed else ""
        draining = f" · {chip_map.draining} draining" if chip_map.draining else ""
        n = chip_map.collapsed_instances
        collapsed = f" · {n} instance{'s' if n != 1 else ''} collapsed" if n else ""
        title = f"Chips {chip_map.chip_count}{failed}{draining}{collapsed}"
        if chip_map.border_title != title:
            chip_map.border_title = title
        self.query_one(FleetHeader).show(
            fleet=link.fleet,
            meta=meta,
            summary=store.summary,
            link_state=link.state,
            where=link.where,
            stale_since=link.stale_since,
            link_detail=link.detail,
            read_only=self.read_only,
            failed_chips=chip_map.failed,
            draining_chips=chip_map.draining,
        )
        log = self.query_one(EventLog)
        for entry in store.log_since(log.last_seq):
            log.add(entry)

    def _links_title(self, meta: telemetry.Meta, s: telemetry.Summary | None) -> None:
        title = f"KV links ({len(meta.links)})"
        if s is not None and s.links:
            gbps = sum(x.gbps for x in s.links)
            moving = sum(x.moving for x in s.links)
            waiting = sum(x.waiting for x in s.links)
            degraded = sum(1 for x in s.links if x.factor < 1)
            title += f" {gbps:.1f} GB/s · {moving} moving · {waiting} waiting"
            title += f" · {degraded} degraded" if degraded else ""
        self.query_one("#links-panel").border_title = title

    @on(ChipMap.Selected)
    def _selected(self, event: ChipMap.Selected) -> None:
        self._show_detail(event.ref)

    def _show_detail(self, ref: ChipRef | None) -> None:
        chip_map = self.chip_map
        chip = chip_map.chip_state(ref) if ref is not None else None
        states = chip_map.instance_states(ref.tier, ref.instance) if ref is not None else []
        power = None
        if ref is not None and ref.chip is None:
            chips = self.store.chips.get(ref.tier)
            if chips is not None and states:
                n = len(states)
                power = sum(chips.power_w[ref.instance * n : (ref.instance + 1) * n])
        tier = self.store.tiers.get(ref.tier) if ref is not None else None
        self.query_one(ChipDetail).show(ref, self.store.meta, tier, chip, states, power)
        panel = self.query_one("#detail-panel")
        panel.border_title = (
            f"Chip {ref.chip_id}"
            if ref and ref.chip is not None
            else (f"Instance {ref.instance_id}" if ref else "Chip")
        )

    # -- layout --------------------------------------------------------------------------------
    def on_resize(self, event: events.Resize) -> None:
        self._fit()

    def _fit(self) -> None:
        """Split the height between the panels: tiers get their rows when they fit."""
        meta = self.store.meta
        width, height = self.size.width, self.size.height
        n_tiers = len(meta.tiers) if meta else 3
        n_groups = len({t.role for t in meta.tiers}) if meta else 1
        key = (width, height, n_tiers, n_groups)
        if key == self._fit_key:
            return
        self._fit_key = key
        avail = max(10, height - 3)  # header 2, footer 1
        compact = avail < 29
        events_h = 4 if compact else 5 if avail < 34 else 6 if avail < 40 else 7
        latency_h = 6 if compact else 8
        side_h = latency_h + (4 if compact else 6)  # latency, then at least a few links
        tiers_h = n_tiers + n_groups + 1 + 2
        top = max(min(tiers_h, int((avail - events_h) * 0.62)), side_h, 6)
        top = min(top, max(6, avail - events_h - 5))  # the chip map keeps a few lines
        self.query_one("#top").styles.height = top
        self.query_one("#events").styles.height = events_h
        self.query_one("#latency-panel").styles.height = latency_h
        side_w = 40 if width >= 150 else 34 if width >= 110 else 30
        self.query_one("#side").styles.width = side_w
        self.query_one("#detail-panel").styles.width = side_w
