"""Pick one of a few options in a modal: arrows and Enter, or the mouse; Escape cancels."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

__all__ = ["PickScreen"]


class PickScreen(ModalScreen[str | None]):
    """Dismissed with the chosen option's value, or None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(
        self, title: str, options: list[tuple[str, str]], *, highlight: str | None = None
    ) -> None:
        super().__init__()
        self.title_text = title
        self.options = options
        self.highlight = highlight

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.title_text, classes="question")
            yield OptionList(*(Option(label, id=value) for value, label in self.options))
            yield Static("↑↓ choose · Enter pick · Esc cancel", classes="hint")

    def on_mount(self) -> None:
        ol = self.query_one(OptionList)
        ol.focus()
        values = [v for v, _ in self.options]
        ol.highlighted = values.index(self.highlight) if self.highlight in values else 0

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)
