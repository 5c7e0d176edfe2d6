"""The lvr-local terminal chat app: owns the config, the runner and the settings."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

from textual.app import App
from textual.binding import Binding, BindingType

from lvr_local.errors import LvrError
from lvr_local.runner.config import Config, load_config
from lvr_local.runner.run import ModelInfo, Runner
from lvr_local.runner.settings import RunSettings
from lvr_tui.chat_screen import ChatScreen


class LvrApp(App[None]):
    """One runner per app run; the chat screen drives it from worker threads that hold
    `lock` (one llama.cpp context is not thread-safe).

    `config_path` and `max_pieces` exist so tests (and `lvr tui`) can choose the models
    and keep replies short."""

    CSS_PATH = "app.tcss"
    TITLE = "lvr-local"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(
        self, config_path: Path | str | None = None, *, max_pieces: int | None = None
    ) -> None:
        super().__init__()
        self.config: Config | None = None
        self.runner: Runner | None = None
        self.settings = RunSettings().for_mode("chat")
        self.system_prompt = ""
        self.lock = threading.Lock()
        self.stop_event: threading.Event | None = None
        self._config_error: str | None = None
        try:
            self.config = load_config(config_path)
            self.settings = self.config.defaults.for_mode("chat")  # the TUI only chats
            if max_pieces is not None:
                self.settings = replace(self.settings, max_pieces=max_pieces)
            self.runner = Runner(self.config.enabled_models, self.settings)
        except LvrError as e:
            self._config_error = str(e)

    @property
    def defaults(self) -> RunSettings:
        """What the settings form checks new values against."""
        return self.config.defaults if self.config is not None else RunSettings()

    def model_infos(self) -> list[ModelInfo]:
        return self.runner.model_infos() if self.runner is not None else []

    def settings_record(self) -> dict[str, object]:
        """The settings as saved in a conversation's transcript."""
        return {**self.settings.as_record(), "system_prompt": self.system_prompt}

    def on_mount(self) -> None:
        self.push_screen(ChatScreen())
        if self._config_error is not None:
            self.notify(
                self._config_error, title="Configuration error", severity="error", timeout=30
            )

    async def action_quit(self) -> None:
        self.shutdown_models()
        self.exit()

    def shutdown_models(self) -> None:
        """Stop any generation and free llama.cpp (waits for the current step)."""
        if self.stop_event is not None:
            self.stop_event.set()
        if self.runner is not None:
            with self.lock:
                self.runner.close()

    def on_unmount(self) -> None:
        self.shutdown_models()
