"""Weighted routing: one share per tier (blank keeps the tier's current share, which the field
shows when the twin sends it)."""

from __future__ import annotations

import math
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static

__all__ = ["WeightsScreen"]


class WeightsScreen(ModalScreen[dict[str, float] | None]):
    """Dismissed with {tier: share} for the tiers given a share, or None when cancelled."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, tiers: list[str], current: dict[str, float] | None = None) -> None:
        super().__init__()
        self.tiers = tiers
        #: The router's weights now (`Summary.weights`; empty from an older twin).
        self.current = current or {}

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static("Weighted routing: share of each tier (blank: keep)", classes="question")
            with VerticalScroll(classes="weights"):
                for i, name in enumerate(self.tiers):
                    with Horizontal(classes="weight"):
                        yield Label(name)
                        now = self.current.get(name)
                        hint = "keep" if now is None else f"keep ({now:g})"
                        yield Input(placeholder=hint, id=f"w{i}", type="number")
            yield Static("Tab next · Enter apply · Esc cancel", classes="hint", id="why")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted)
    def _submitted(self) -> None:
        weights: dict[str, float] = {}
        for i, name in enumerate(self.tiers):
            text = self.query_one(f"#w{i}", Input).value.strip()
            if not text:
                continue
            try:
                w = float(text)
            except ValueError:
                w = -1.0
            if not (math.isfinite(w) and w >= 0):
                self.query_one("#why", Static).update(f"✗ {name}: expected a share >= 0")
                return
            weights[name] = w
        self.dismiss(weights)

    def action_cancel(self) -> None:
        self.dismiss(None)
