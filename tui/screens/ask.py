"""Ask for one value in a modal: Enter submits (when the check passes), Escape cancels."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

__all__ = ["AskScreen"]


class AskScreen(ModalScreen[str | None]):
    """Dismissed with the text typed, or None. `check(text)` returns why it is wrong, or None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(
        self, title: str, value: str = "", *, check: Callable[[str], str | None] | None = None
    ) -> None:
        super().__init__()
        self.title_text = title
        self.value = value
        self.check = check

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.title_text, classes="question")
            yield Input(self.value, select_on_focus=True)
            yield Static("Enter apply · Esc cancel", classes="hint", id="why")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        why = self.check(text) if self.check is not None else None
        if why:
            self.query_one("#why", Static).update(f"✗ {why}")
            return
        self.dismiss(text)

    def action_cancel(self) -> None:
        self.dismiss(None)
