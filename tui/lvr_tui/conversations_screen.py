"""The list of saved conversations, newest first."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import (
    Label,
    OptionList,
)
from textual.widgets.option_list import Option

from lvr_tui.transcript import (
    SavedConversation,
    list_conversations,
)


class ConversationsScreen(ModalScreen[Path | None]):
    """Saved conversations, newest first; Enter reopens one."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Close")]

    def compose(self) -> ComposeResult:
        saved = list_conversations()
        with Vertical(id="conversations-dialog"):
            yield Label(f"Saved conversations ({len(saved)})", classes="dialog-title")
            if saved:
                yield OptionList(*(_option(c) for c in saved), id="conversation-list")
            else:
                yield Label("none yet: a conversation is saved as soon as you send a message")

    @on(OptionList.OptionSelected)
    def chosen(self, message: OptionList.OptionSelected) -> None:
        self.dismiss(Path(message.option.id or ""))

    def action_cancel(self) -> None:
        self.dismiss(None)


def _option(convo: SavedConversation) -> Option:
    created = convo.created.replace("T", " ")[:16]
    return Option(f"{created}  {len(convo.messages):>3} msgs  {convo.title}", id=str(convo.path))
