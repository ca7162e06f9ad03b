"""The help overlay (`?`): every binding of the console, by section. Any of ? q Esc closes it."""

from __future__ import annotations

from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

__all__ = ["HelpScreen"]

Section = tuple[str, list[tuple[str, str]]]


class HelpScreen(ModalScreen[None]):
    """Sections of (keys, what they do)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "close", "Close"),
    ]

    def __init__(self, sections: list[Section], *, note: str = "") -> None:
        super().__init__()
        self.sections = sections
        self.note = note

    def compose(self) -> ComposeResult:
        text = Text()
        text.append("fleet-twin console: keys\n", Style(bold=True))
        if self.note:
            text.append(self.note + "\n", Style(color="#ffd75f", bold=True))
        for title, rows in self.sections:
            text.append(f"\n{title}\n", Style(bold=True, underline=True))
            key_w = max((len(k) for k, _ in rows), default=4)
            for keys, what in rows:
                text.append(f"  {keys:<{key_w}}  ", Style(color="#5fafd7", bold=True))
                text.append(what + "\n")
        text.append("\n? q Esc close", Style(dim=True))
        with VerticalScroll(classes="dialog help"):
            yield Static(text, id="help-text")

    def action_close(self) -> None:
        self.dismiss(None)
