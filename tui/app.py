"""The lvr-local terminal chat app: owns the config, the loaded models and the settings."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar

from textual.app import App
from textual.binding import Binding, BindingType

from lvr_local.config import Config, Defaults, load_config
from lvr_local.errors import LvrError
from tui.screens import ChatScreen
from tui.session import ChatSettings, EnsembleSession, ModelInfo


class LvrApp(App[None]):
    """One ensemble per app run; the chat screen drives it through `session`.

    `config_path` and `max_pieces` exist so tests (and `lvr tui`) can choose the models
    and keep replies short."""

    CSS_PATH = "app.tcss"
    TITLE = "lvr-local"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(
        self, config_path: Path | str | None = None, *, max_pieces: int | None = None
    ) -> None:
        super().__init__()
        self.config_path = config_path
        self.max_pieces = max_pieces
        self.config: Config | None = None
        self.session: EnsembleSession | None = None
        self.settings = ChatSettings(max_pieces=max_pieces or 256)
        self.stop_event: threading.Event | None = None
        self._config_error: str | None = None
        try:
            self.config = load_config(config_path)
        except LvrError as e:
            self._config_error = str(e)
        else:
            self.session = EnsembleSession(self.config)
            self.settings = ChatSettings.from_defaults(self.config.defaults, max_pieces)

    @property
    def defaults(self) -> Defaults:
        return self.config.defaults if self.config is not None else Defaults()

    def model_infos(self) -> list[ModelInfo]:
        return self.session.model_infos() if self.session is not None else []

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
        if self.session is not None:
            self.session.close()

    def on_unmount(self) -> None:
        self.shutdown_models()
