"""What the chat screen's worker threads post back to the UI thread (Textual messages,
as dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from lvr_local.decoding.ensemble import PieceEvent
from lvr_local.runner.run import LiveFigures, ModelInfo
from lvr_tui.transcript import PieceRecord
from lvr_tui.widgets import AssistantMessage


@dataclass
class LoadProgress(Message):
    """A step of loading the models: `done` of `total`, now at `label`."""

    label: str
    done: int
    total: int


@dataclass
class EnsembleReady(Message):
    """Models loaded (or the ensemble rebuilt after a settings change): `sub_vocab` is the
    ensemble's sub-vocabulary as it describes itself, `description` the header's line."""

    infos: list[ModelInfo]
    sub_vocab: str
    description: str


@dataclass
class WorkerFailed(Message):
    error: str


@dataclass
class PieceGenerated(Message):
    reply: AssistantMessage
    piece: PieceRecord
    event: PieceEvent
    figures: LiveFigures


@dataclass
class GenerationEnded(Message):
    reply: AssistantMessage
    text: str
    stop_reason: str
    figures: LiveFigures | None
    error: str | None
