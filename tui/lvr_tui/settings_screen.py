"""The settings modal: the run settings and the system prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import (
    Button,
    Input,
    Label,
    Select,
    TextArea,
)

from lvr_local.core.combine import RULES
from lvr_local.decoding.ensemble import METHODS
from lvr_local.errors import LvrError
from lvr_local.runner.settings import SAMPLE_ON, RunSettings, with_overrides


class SettingsScreen(ModalScreen[tuple[RunSettings, str] | None]):
    """Edits the run settings and the system prompt; values are checked by the same
    rules as models.toml's (runner/settings.py). Fields are named as the settings are."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]
    # (setting, label, hint, how to read the text), two to a row; the selects come first.
    SELECTS: ClassVar[tuple[tuple[str, Sequence[str]], ...]] = (
        ("method", METHODS),
        ("combine", RULES),
        ("calibrate", ("true", "false")),
        ("sample_on", SAMPLE_ON),
    )
    FIELDS: ClassVar[tuple[tuple[str, str, str, type], ...]] = (
        ("switch_rate", "switch rate", "bayes: [0, 1)", float),
        ("defer", "defer", "base models, 0 = off", float),
        ("sub_vocab", "sub-vocab", "auto | mcv | bytes | maxlen:K", str),
        ("temperature", "temperature", "0 = greedy", float),
        ("top_k", "top-k", "0 = off", int),
        ("top_p", "top-p", "(0, 1]", float),
        ("min_p", "min-p", "[0, 1), 0 = off", float),
        ("repeat_penalty", "repeat pen.", "1 = off", float),
        ("repeat_last_n", "repeat last n", "-1 = all", int),
        ("presence_penalty", "presence pen.", "0 = off", float),
        ("frequency_penalty", "frequency pen.", "0 = off", float),
        ("dry_multiplier", "dry multiplier", "0 = off", float),
        ("prune", "prune", "branch share", float),
        ("max_pieces", "max length", "pieces", int),
    )

    def __init__(self, settings: RunSettings, system_prompt: str) -> None:
        super().__init__()
        self.settings = settings
        self.system_prompt = system_prompt

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(id="settings-dialog"):
            yield Label("Settings", classes="dialog-title")
            with Grid(id="settings-grid"):
                for key, options in self.SELECTS:
                    yield from _select(key, key, options, _shown(getattr(s, key)))
                for key, label, hint, _ in self.FIELDS:
                    yield from _field(label, key, _shown(getattr(s, key)), hint)
                seed = "" if s.seed is None else str(s.seed)
                yield from _field("seed", "seed", seed, "empty = random")
            yield Label("system prompt")
            yield TextArea(self.system_prompt, id="system_prompt", compact=True)
            with Horizontal(id="settings-buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    def _value(self, field_id: str) -> str:
        return self.query_one(f"#{field_id}", Input).value.strip()

    def read(self) -> tuple[RunSettings, str]:
        """The form's settings and system prompt; LvrError says which field is wrong."""
        values: dict[str, object] = {}
        for key, label, _, kind in self.FIELDS:
            try:
                values[key] = kind(self._value(key))
            except ValueError:
                raise LvrError(f"{label} must be a number") from None
        seed_text = self._value("seed")
        try:
            values["seed"] = int(seed_text) if seed_text else None
        except ValueError:
            raise LvrError("seed must be an integer or empty") from None
        for key, _ in self.SELECTS:
            values[key] = str(self.query_one(f"#{key}", Select).value)
        values["calibrate"] = values["calibrate"] == "true"
        settings = with_overrides(self.settings, "settings", **values)
        if values["seed"] is None:
            settings = replace(settings, seed=None)
        return settings, self.query_one("#system_prompt", TextArea).text.strip()

    @on(Button.Pressed, "#apply")
    @on(Input.Submitted)
    def apply(self) -> None:
        """Apply (or Enter in any field): close with the new settings, or say what is wrong."""
        try:
            chosen = self.read()
        except LvrError as e:
            self.notify(str(e), title="Bad setting", severity="error")
            return
        self.dismiss(chosen)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _select(label: str, field_id: str, options: Sequence[str], value: str) -> ComposeResult:
    yield Label(label)
    yield Select(
        [(o, o) for o in options], value=value, allow_blank=False, compact=True, id=field_id
    )


def _field(label: str, field_id: str, value: str, hint: str) -> ComposeResult:
    yield Label(label)
    yield Input(value, placeholder=hint, id=field_id, compact=True)
