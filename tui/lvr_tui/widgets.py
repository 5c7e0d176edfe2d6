"""The chat screen's widgets. They only show what they are given; the screen feeds them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Label, Markdown, ProgressBar, Static, Switch, TextArea
from textual.widgets.markdown import MarkdownStream

from lvr_local.runner.run import LiveFigures, ModelInfo
from lvr_tui.transcript import PieceRecord

MODEL_COLOURS = ("#5fafff", "#ffaf5f", "#87d787", "#d787d7", "#ff8787", "#d7d75f")


def model_colour(index: int) -> str:
    return MODEL_COLOURS[index % len(MODEL_COLOURS)]


class PromptBox(TextArea):
    """The input box: Enter sends, Ctrl+J (or Shift+Enter where the terminal tells it
    apart) starts a new line, so long prompts can be written over several lines."""

    NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self.text))
                self.clear()
        elif event.key in self.NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")


class UserMessage(Static):
    """A user turn, shown as typed (no markup)."""

    def __init__(self, text: str) -> None:
        super().__init__(Text(text), classes="message")


class AttributionView(Static):
    """The reply with every piece coloured by the model that contributed most to it."""

    def __init__(self) -> None:
        super().__init__("", classes="attribution")
        self.pieces: list[PieceRecord] = []
        self.selected: int | None = None

    def add(self, piece: PieceRecord) -> None:
        self.pieces.append(piece)
        self.refresh_text()

    def refresh_text(self) -> None:
        text = Text()
        for i, piece in enumerate(self.pieces):
            style = Style(color=model_colour(piece.dominant), reverse=i == self.selected)
            text.append(piece.text, style=style)
        self.update(text)


class AssistantMessage(Vertical):
    """A reply: Markdown while reading, the attribution view when that mode is on."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(classes="message assistant")
        self.names = list(names)
        self.text = ""
        self.pieces: list[PieceRecord] = []
        self.events: list[object] = []  # the live PieceEvents, for inspection and tests
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Markdown("")
        yield AttributionView()
        yield Label("", classes="status")

    @property
    def attribution(self) -> AttributionView:
        return self.query_one(AttributionView)

    async def add_piece(self, piece: PieceRecord, event: object | None = None) -> None:
        self.text += piece.text
        self.pieces.append(piece)
        if event is not None:
            self.events.append(event)
        self.attribution.add(piece)
        if self._stream is None:
            self._stream = Markdown.get_stream(self.query_one(Markdown))
        await self._stream.write(piece.text)

    async def finish(self, status: str) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self._show_status(status)

    def _show_status(self, status: str) -> None:
        label = self.query_one(".status", Label)
        label.update(Text(status))
        label.display = bool(status)

    async def show_saved(self, text: str, pieces: Sequence[PieceRecord], status: str) -> None:
        """A reply read back from a transcript."""
        self.text = text
        self.pieces = list(pieces)
        for piece in pieces:
            self.attribution.pieces.append(piece)
        self.attribution.refresh_text()
        await self.query_one(Markdown).update(text)
        self._show_status(status)


def piece_detail(piece: PieceRecord, index: int, names: Sequence[str]) -> Text:
    """The detail line: each model's probability of one piece, in its colour."""
    line = Text(f"piece {index + 1} {piece.text!r}: ")
    for i, p in enumerate(piece.member_probs):
        name = names[i] if i < len(names) else f"model {i + 1}"
        line.append(f"{name} {100 * p:.1f}%", style=model_colour(i))
        line.append("  ")
    line.append(f"ensemble {100 * piece.prob:.1f}%", style="bold")
    return line


class Conversation(VerticalScroll):
    """The messages. In attribution mode, Left/Right pick a piece of the selected reply."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("left", "move_piece(-1)", "Prev piece", show=False),
        Binding("right", "move_piece(1)", "Next piece", show=False),
    ]

    class PieceSelected(Message):
        def __init__(self, reply: AttributionView, index: int) -> None:
            super().__init__()
            self.reply = reply
            self.index = index

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.current: AttributionView | None = None

    def select(self, view: AttributionView, index: int) -> None:
        if self.current is not None and self.current is not view:
            self.current.selected = None
            self.current.refresh_text()
        self.current = view
        view.selected = index
        view.refresh_text()
        self.post_message(self.PieceSelected(view, index))

    def select_last(self) -> None:
        views = [v for v in self.query(AttributionView) if v.pieces]
        if views:
            self.select(views[-1], len(views[-1].pieces) - 1)

    def action_move_piece(self, step: int) -> None:
        view = self.current
        if view is None or view.selected is None or not view.pieces:
            self.select_last()
            return
        index = min(max(view.selected + step, 0), len(view.pieces) - 1)
        self.select(view, index)


class ModelCard(Vertical):
    """One model: name, tokenizer, vocabulary size, editable weight, on/off switch."""

    def __init__(self, index: int, info: ModelInfo) -> None:
        super().__init__(classes="model-card", id=f"model-{index}")
        self.index = index
        self.info = info

    def compose(self) -> ComposeResult:
        name = Text(f"■ {self.info.name}", style=f"bold {model_colour(self.index)}")
        name.append(f" {self.info.role}", style="dim")
        yield Label(name, classes="model-name")
        yield Label(f"{self.info.tokenizer} · {self.info.n_vocab:,} tokens", classes="model-vocab")
        with Horizontal(classes="model-controls"):
            yield Label("weight", classes="weight-label")
            yield Input(f"{self.info.weight:g}", type="number", compact=True, classes="weight")
            yield Switch(self.info.enabled, classes="enabled")
            yield Label(self._state_text(self.info.enabled), classes="enabled-label")

    @staticmethod
    def _state_text(on: bool) -> str:
        return "on" if on else "off"

    def on_switch_changed(self, event: Switch.Changed) -> None:
        """Say it in words too: a one-row switch is only a coloured block."""
        self.query_one(".enabled-label", Label).update(self._state_text(event.value))

    @property
    def weight_text(self) -> str:
        return self.query_one(".weight", Input).value

    @property
    def enabled(self) -> bool:
        return self.query_one(".enabled", Switch).value


class FiguresView(Static):
    """Live figures of the running (or last) generation, with the weight the rule gives
    each model now ("w": under bayes its posterior, which moves with every piece)."""

    def show(self, figures: LiveFigures) -> None:
        text = Text()
        text.append(f"{figures.pieces_per_s:6.1f} pieces/s  {figures.bytes_per_s:6.1f} B/s\n")
        text.append(f"{figures.pieces} pieces, {figures.bytes} bytes, {figures.seconds:.1f} s")
        for i, m in enumerate(figures.members):
            text.append(f"\n{m.name[:18]}", style=model_colour(i))
            text.append(f" w {m.mix_weight:.2f}")
            text.append(
                f"\n fwd {m.forward_passes} hits {m.cache_hits} alive {m.alive}"
                f" pruned {m.pruned:.1e}"
            )
        self.update(text)


class ModelPanel(VerticalScroll):
    """The side panel: loading progress, then one card per model and the live figures."""

    def compose(self) -> ComposeResult:
        with Vertical(id="loading"):
            yield Label("starting …", id="loading-label")
            yield ProgressBar(total=1, show_eta=False, id="loading-bar")
        yield Vertical(id="cards")
        yield FiguresView("", id="figures")

    def show_progress(self, label: str, done: int, total: int) -> None:
        self.query_one("#loading-label", Label).update(label)
        self.query_one("#loading-bar", ProgressBar).update(total=total, progress=done)

    async def show_models(self, infos: Sequence[ModelInfo]) -> None:
        self.query_one("#loading").display = False
        cards = self.query_one("#cards", Vertical)
        await cards.remove_children()
        await cards.mount_all(ModelCard(i, info) for i, info in enumerate(infos))

    @property
    def cards(self) -> list[ModelCard]:
        return list(self.query(ModelCard))
