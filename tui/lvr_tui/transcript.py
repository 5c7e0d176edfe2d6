"""Conversations on disk: one append-only JSONL file per conversation.

Each line is one record, written and flushed as soon as it is known: the conversation
header, each message when it completes, and each generated piece as it arrives. A crash
therefore loses at most the line being written; pieces after the last assistant message
are read back as a partial reply. A line that cannot be read back (torn by a crash,
edited by hand, a field of the wrong type) is skipped and counted, never fatal.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from lvr_local import strict_json
from lvr_local.paths import user_dir


def conversations_dir() -> Path:
    """The folder of saved conversations; made when missing, if it can be (a read-only
    user directory is still read)."""
    path = user_dir() / "conversations"
    with contextlib.suppress(OSError):
        path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class PieceRecord:
    """One shown piece with its attribution: which model dominated, each model's p."""

    text: str
    dominant: int
    member_probs: tuple[float, ...]
    prob: float


@dataclass
class SavedMessage:
    role: str
    content: str
    pieces: list[PieceRecord] = field(default_factory=list)
    stop_reason: str = ""


@dataclass
class SavedConversation:
    path: Path
    created: str
    messages: list[SavedMessage]
    system_prompt: str = ""
    skipped: int = 0  # lines that could not be read back

    @property
    def title(self) -> str:
        first = next((m.content for m in self.messages if m.role == "user"), "(empty)")
        return " ".join(first.split())[:34]


class ConversationLog:
    """Appends records to one conversation file; the file is created at the first write.
    A write that fails (a full disk, a read-only folder) never ends the conversation:
    the first failure is kept for the screen to show (`new_error`), and later records
    are still tried."""

    def __init__(self, path: Path | None = None, header: dict[str, Any] | None = None) -> None:
        self.path = path or _new_path()
        self._header = header
        self._file: IO[str] | None = None
        self._error: str | None = None
        self._error_shown = False

    def append(self, record: dict[str, Any]) -> None:
        try:
            if self._file is None:
                self._open()
            self._write(record)
        except OSError as e:
            if self._error is None:
                self._error = f"cannot save this conversation to {self.path}: {e.strerror or e}"

    def _open(self) -> None:
        fresh = not self.path.exists()
        self._file = self.path.open("a+", encoding="utf-8")  # readable: see end_torn_line
        if fresh and self._header is not None:
            self._write(self._header)
        strict_json.end_torn_line(self._file)  # a reopened file torn by a crash

    def new_error(self) -> str | None:
        """The first failed write, once (then None): for the screen to say so."""
        if self._error is None or self._error_shown:
            return None
        self._error_shown = True
        return self._error

    def message(self, role: str, content: str, **extra: Any) -> None:
        self.append({"type": "message", "role": role, "content": content, "time": _now(), **extra})

    def piece(self, piece: PieceRecord) -> None:
        self.append(
            {
                "type": "piece",
                "text": piece.text,
                "dominant": piece.dominant,
                "member_probs": list(piece.member_probs),
                "prob": piece.prob,
            }
        )

    def _write(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(strict_json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # what a full disk refused stays unwritten
                self._file.close()
            self._file = None


def new_header(models: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "conversation",
        "version": 1,
        "created": _now(),
        "models": models,
        "settings": settings,
    }


def list_conversations() -> list[SavedConversation]:
    """Saved conversations, newest first; unreadable files are left out."""
    found = []
    for path in sorted(conversations_dir().glob("*.jsonl"), reverse=True):
        try:
            found.append(read_conversation(path))
        except (OSError, ValueError):
            continue
    return found


def read_conversation(path: Path) -> SavedConversation:
    """A saved conversation; unreadable lines are skipped and counted in `skipped`."""
    convo = SavedConversation(path=path, created="", messages=[])
    pending: list[PieceRecord] = []
    records, convo.skipped = _records(path)
    for record in records:
        try:
            pending = _apply(convo, record, pending)
        except (TypeError, ValueError, AttributeError):
            convo.skipped += 1
    if pending:  # the app stopped mid-reply: keep what was written
        text = "".join(p.text for p in pending)
        convo.messages.append(SavedMessage("assistant", text, pending, "interrupted"))
    return convo


def _apply(
    convo: SavedConversation, record: dict[str, Any], pending: list[PieceRecord]
) -> list[PieceRecord]:
    """Add one record to the conversation; returns the pieces still waiting for their
    message. Raises TypeError, ValueError or AttributeError on a malformed record."""
    kind = record.get("type")
    if kind == "conversation":
        convo.created = _text(record.get("created", ""))
        settings = record.get("settings", {})
        convo.system_prompt = _text(settings.get("system_prompt", ""))
    elif kind == "settings":
        convo.system_prompt = _text(record.get("system_prompt", convo.system_prompt))
    elif kind == "piece":
        return [*pending, _piece(record)]
    elif kind == "message":
        role = _text(record.get("role", ""))
        message = SavedMessage(
            role, _text(record.get("content", "")), [], _text(record.get("stop_reason", ""))
        )
        if role == "assistant":
            message.pieces, pending = pending, []
        convo.messages.append(message)
    return pending


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The file's records, and how many lines were not JSON objects."""
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # a line torn by a crash
            continue
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            bad += 1
    return records, bad


def _piece(record: dict[str, Any]) -> PieceRecord:
    probs = record.get("member_probs", [])
    if not isinstance(probs, list):
        raise TypeError("member_probs is not a list")
    return PieceRecord(
        text=_text(record.get("text", "")),
        dominant=_integer(record.get("dominant", 0)),
        member_probs=tuple(_number(p) for p in probs),
        prob=_number(record.get("prob", 0.0)),
    )


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _number(value: object) -> float:
    """A probability as saved: a number, or null for one that was not finite."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def _new_path() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return conversations_dir() / f"{stamp}-{secrets.token_hex(3)}.jsonl"
