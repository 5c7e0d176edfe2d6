"""The chat screen: the conversation, the prompt box and the model panel."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from lvr_local.core.chat import Message as ChatMessage
from lvr_local.errors import LvrError
from lvr_local.runner.run import Run
from lvr_local.runner.settings import RunSettings
from lvr_tui.conversations_screen import ConversationsScreen
from lvr_tui.messages import (
    EnsembleReady,
    GenerationEnded,
    LoadProgress,
    PieceGenerated,
    WorkerFailed,
)
from lvr_tui.settings_screen import SettingsScreen
from lvr_tui.transcript import (
    ConversationLog,
    PieceRecord,
    SavedConversation,
    new_header,
    read_conversation,
)
from lvr_tui.widgets import (
    AssistantMessage,
    Conversation,
    ModelPanel,
    PromptBox,
    UserMessage,
    piece_detail,
)

if TYPE_CHECKING:
    from lvr_tui.app import LvrApp

STOP_REASONS = {
    "end": "done",
    "max_pieces": "max length reached",
    "stopped": "stopped",
    "error": "failed",
}


class ChatScreen(Screen[None]):
    """The conversation, the prompt box and the model panel. It presents; the runner
    decodes in one worker thread at a time and posts its results back as messages."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("ctrl+o", "open_list", "Open"),
        Binding("ctrl+t", "toggle_attribution", "Attribution"),
        Binding("ctrl+s", "settings", "Settings"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.history: list[ChatMessage] = []
        self.log_file: ConversationLog | None = None
        self.reply: AssistantMessage | None = None  # the reply being generated
        self.busy = False  # a worker holds the ensemble (loading, rebuilding, generating)
        self.load_error: str | None = None  # why the models could not be loaded
        self.sub_vocab = ""  # the built ensemble's sub-vocabulary, for the header

    @property
    def lvr(self) -> LvrApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="chat-column"):
                yield Conversation(id="conversation")
                yield Static("", id="detail")
                yield PromptBox(id="prompt", placeholder="Message (Enter send, Ctrl+J newline)")
            yield ModelPanel(id="panel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(PromptBox).focus()
        if self.lvr.runner is not None:
            self.busy = True
            self.load_models()

    # ------------------------------------------------------------- loading

    @work(thread=True, group="ensemble")
    def load_models(self) -> None:
        runner = self.lvr.runner
        assert runner is not None
        try:
            with self.lvr.lock:
                runner.load(
                    lambda label, done, total: self.post_message(LoadProgress(label, done, total))
                )
                sub_vocab = runner.ensemble.sub.describe()  # load built it
                ready = EnsembleReady(
                    runner.model_infos(), sub_vocab, describe(sub_vocab, runner.settings)
                )
            self.post_message(ready)
        except Exception as e:
            self.post_message(WorkerFailed(_error_text(e)))

    @work(thread=True, group="ensemble")
    def rebuild(self, settings: RunSettings) -> None:
        """Build the ensemble for settings that change its shape (ensemble_key), here in
        a worker: building the tables of a new sub-vocabulary takes a while."""
        runner = self.lvr.runner
        assert runner is not None
        try:
            with self.lvr.lock:
                runner.settings = settings
                sub_vocab = runner.ensemble_for(settings).sub.describe()
                ready = EnsembleReady(
                    runner.model_infos(), sub_vocab, describe(sub_vocab, settings)
                )
            self.post_message(ready)
        except Exception as e:
            self.post_message(WorkerFailed(_error_text(e)))

    def on_load_progress(self, message: LoadProgress) -> None:
        self.query_one(ModelPanel).show_progress(message.label, message.done, message.total)

    async def on_ensemble_ready(self, message: EnsembleReady) -> None:
        self.busy = False
        self.sub_vocab = message.sub_vocab
        self.app.sub_title = message.description
        panel = self.query_one(ModelPanel)
        if not panel.cards:
            await panel.show_models(message.infos)
        self.notify(f"ready: {message.description}", timeout=3)

    def on_worker_failed(self, message: WorkerFailed) -> None:
        self.busy = False
        if self.lvr.runner is not None and not self.lvr.runner.loaded:
            self.load_error = message.error
        self.query_one(ModelPanel).show_progress(message.error, 0, 1)
        self.notify(message.error, title="Error", severity="error", timeout=10)

    # ------------------------------------------------------------- sending

    @on(PromptBox.Submitted)
    async def send(self, message: PromptBox.Submitted) -> None:
        problem = self._cannot_send()
        models = self._model_choices() if problem is None else None
        if problem is not None or models is None:
            if problem is not None:
                self.notify(problem, severity="warning")
            self.query_one(PromptBox).text = message.text
            return
        text = message.text.rstrip("\n")
        self.history.append(ChatMessage("user", text))
        self._log().message("user", text)
        self._report_log_error()
        conversation = self.query_one(Conversation)
        await conversation.mount(UserMessage(text))
        reply = AssistantMessage([m.name for m in self.lvr.model_infos()])
        await conversation.mount(reply)
        conversation.anchor()
        self.reply = reply
        self.busy = True
        self.lvr.stop_event = threading.Event()
        system_prompt = self.lvr.system_prompt
        system = [ChatMessage("system", system_prompt)] if system_prompt else []
        self.generate(
            reply,
            [*system, *self.history],
            self.lvr.settings,
            models,
            self._log(),
            self.lvr.stop_event,
        )

    def _cannot_send(self) -> str | None:
        if self.lvr.runner is None:
            return "no models: fix the configuration and restart"
        if self.load_error is not None:
            return f"the models could not be loaded ({self.load_error}): fix it and restart"
        if self.reply is not None:
            return "a reply is being generated: wait, or press Esc to stop it"
        if self.busy or not self.lvr.runner.loaded:
            return "the models are still loading"
        return None

    def _model_choices(self) -> list[tuple[float, bool]] | None:
        """Each model's (weight, enabled) from the panel, or None after telling why not."""
        choices = []
        for card in self.query_one(ModelPanel).cards:
            try:
                weight = float(card.weight_text)
            except ValueError:
                self.notify(
                    f"weight of {card.info.name} must be a number, got '{card.weight_text}'",
                    severity="error",
                )
                return None
            choices.append((weight, card.enabled))
        return choices

    def _log(self) -> ConversationLog:
        if self.log_file is None:
            names = [m.name for m in self.lvr.model_infos()]
            self.log_file = ConversationLog(header=new_header(names, self.lvr.settings_record()))
        return self.log_file

    @work(thread=True, group="ensemble")
    def generate(
        self,
        reply: AssistantMessage,
        messages: Sequence[ChatMessage],
        settings: RunSettings,
        models: list[tuple[float, bool]],
        log: ConversationLog,
        stop: threading.Event,
    ) -> None:
        """Pull pieces in this thread; post each to the UI and append it to the log."""
        runner = self.lvr.runner
        assert runner is not None
        run: Run | None = None
        error = None
        with self.lvr.lock:
            try:
                runner.set_weights([w for w, _ in models])
                runner.set_enabled([on for _, on in models])
                run = runner.chat(messages, settings, stop)
                for chunk in run:
                    e = chunk.event
                    piece = PieceRecord(chunk.text, e.dominant, e.member_probs, e.prob)
                    if piece.text:
                        log.piece(piece)
                    self.post_message(PieceGenerated(reply, piece, e, run.figures()))
            except Exception as e:
                error = _error_text(e)
            figures = run.figures() if run is not None and runner.loaded else None
        text = run.text if run is not None else ""
        reason = "error" if error else run.stats.stop_reason if run is not None else "error"
        if text or not error:
            weights = [w for w, _ in models]
            pieces = run.stats.pieces if run is not None else 0
            log.message("assistant", text, stop_reason=reason, pieces=pieces, weights=weights)
        self.post_message(GenerationEnded(reply, text, reason, figures, error))

    async def on_piece_generated(self, message: PieceGenerated) -> None:
        self.query_one("#figures").show(message.figures)  # type: ignore[attr-defined]
        if message.reply.is_attached:
            message.reply.events.append(message.event)
            if message.piece.text:
                await message.reply.add_piece(message.piece)

    async def on_generation_ended(self, message: GenerationEnded) -> None:
        if message.figures is not None:
            self.query_one("#figures").show(message.figures)  # type: ignore[attr-defined]
        if message.reply.is_attached:
            status = STOP_REASONS.get(message.stop_reason, message.stop_reason)
            await message.reply.finish(f"[{status}]" if status != "done" else "")
            if self.has_class("-attribution"):
                self.query_one(Conversation).select_last()
        if message.reply is self.reply:
            self.reply = None
            self.busy = False
            if message.text or not message.error:
                self.history.append(ChatMessage("assistant", message.text))
        if message.error:
            self.notify(message.error, title="Generation failed", severity="error", timeout=10)
        self._report_log_error()

    def _report_log_error(self) -> None:
        """A conversation that cannot be saved goes on; the user is told once."""
        error = self.log_file.new_error() if self.log_file is not None else None
        if error is not None:
            message = f"{error}; the conversation goes on unsaved"
            self.notify(message, severity="warning", timeout=10)

    # ------------------------------------------------------------- actions

    def action_stop(self) -> None:
        if self.reply is not None and self.lvr.stop_event is not None:
            self.lvr.stop_event.set()

    async def action_new_chat(self) -> None:
        self.action_stop()
        await self._clear()
        self.notify("new conversation", timeout=2)

    async def _clear(self) -> None:
        self.reply = None
        self.busy = self.lvr.runner is not None and not self.lvr.runner.loaded
        self.history = []
        if self.log_file is not None:
            self.log_file.close()
        self.log_file = None
        await self.query_one(Conversation).remove_children()
        self.query_one("#detail", Static).update("")

    def action_toggle_attribution(self) -> None:
        self.toggle_class("-attribution")
        conversation = self.query_one(Conversation)
        if self.has_class("-attribution"):
            conversation.focus()
            conversation.select_last()
        else:
            self.query_one(PromptBox).focus()

    def on_conversation_piece_selected(self, message: Conversation.PieceSelected) -> None:
        piece = message.reply.pieces[message.index]
        names = [m.name for m in self.lvr.model_infos()]
        self.query_one("#detail", Static).update(piece_detail(piece, message.index, names))

    def action_settings(self) -> None:
        form = SettingsScreen(self.lvr.settings, self.lvr.system_prompt)
        self.app.push_screen(form, self._apply_settings)

    def _apply_settings(self, chosen: tuple[RunSettings, str] | None) -> None:
        if chosen is None or chosen == (self.lvr.settings, self.lvr.system_prompt):
            return
        old = self.lvr.settings
        self.lvr.settings, system_prompt = chosen
        if self.log_file is not None and system_prompt != self.lvr.system_prompt:
            self.log_file.append({"type": "settings", "system_prompt": system_prompt})
        self.lvr.system_prompt = system_prompt
        runner = self.lvr.runner
        if runner is None or not runner.loaded:
            return
        if self.lvr.settings.ensemble_key() != old.ensemble_key():
            self.busy = True
            self.notify("rebuilding the ensemble …", timeout=2)
            self.rebuild(self.lvr.settings)
        else:  # the rule and sampling apply from the next reply on
            self.app.sub_title = describe(self.sub_vocab, self.lvr.settings)

    def action_open_list(self) -> None:
        self.app.push_screen(ConversationsScreen(), self._open)

    async def _open(self, path: Path | None) -> None:
        if path is None:
            return
        self.action_stop()
        try:
            saved = read_conversation(path)
        except OSError as e:
            self.notify(f"cannot read {path}: {e}", severity="error")
            return
        await self._clear()
        await self._show_saved(saved)

    async def _show_saved(self, saved: SavedConversation) -> None:
        conversation = self.query_one(Conversation)
        names = [m.name for m in self.lvr.model_infos()]
        for m in saved.messages:
            if m.role == "user":
                await conversation.mount(UserMessage(m.content))
            elif m.role == "assistant":
                reply = AssistantMessage(names)
                await conversation.mount(reply)
                status = STOP_REASONS.get(m.stop_reason, m.stop_reason)
                await reply.show_saved(
                    m.content, m.pieces, f"[{status}]" if status not in ("done", "") else ""
                )
            self.history.append(ChatMessage(m.role, m.content))
        self.log_file = ConversationLog(saved.path)
        self.lvr.system_prompt = saved.system_prompt
        conversation.scroll_end(animate=False)
        self.notify(f"opened {saved.path.name}", timeout=2)
        if saved.skipped:  # never silent: some lines could not be read back
            lines = "line" if saved.skipped == 1 else "lines"
            self.notify(
                f"{saved.skipped} unreadable {lines} of {saved.path.name} skipped",
                severity="warning",
                timeout=6,
            )


def describe(sub_vocab: str, settings: RunSettings) -> str:
    """The header's line: the ensemble's sub-vocabulary (as it describes itself), method
    and combination rule."""
    return f"{sub_vocab} · {settings.method} {settings.combine}"


def _error_text(error: Exception) -> str:
    if isinstance(error, LvrError):
        return str(error)
    return f"unexpected error: {type(error).__name__}: {error}"
