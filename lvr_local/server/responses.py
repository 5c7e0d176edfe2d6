"""OpenAI's response objects, built from a reply: chat completions and their chunks, text
completions and theirs, logprobs in each API's shape, and lvr-local's piece details.

A piece's token text is its bytes decoded (a piece may split a character: its `bytes`
are exact); END, among the alternatives, is the empty token with no bytes.
"""

from __future__ import annotations

import codecs
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

from lvr_local import __version__
from lvr_local.decoding.ensemble import PieceEvent
from lvr_local.server.reply import Delta, Reply

FINISH_REASONS = {"end": "stop", "stop": "stop", "max_pieces": "length", "max_bytes": "length"}
FINGERPRINT = f"lvr-local-{__version__}"


def token(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def chat_logprobs(events: Sequence[PieceEvent]) -> list[dict[str, Any]]:
    """One entry per piece: {token, logprob, bytes, top_logprobs}."""
    return [
        {
            "token": token(e.text),
            "logprob": e.logprob,
            "bytes": list(e.text),
            "top_logprobs": [
                {"token": token(alt), "logprob": lp, "bytes": list(alt)}
                for alt, lp in e.alternatives
            ],
        }
        for e in events
    ]


def piece_details(events: Sequence[PieceEvent], reply: Reply) -> list[dict[str, Any]]:
    """Per piece: its probability under the ensemble and each member's, the member that
    carried it, and the share of each member's mass that step pruned."""
    names, taking_part = reply.names, reply.member_names
    return [
        {
            "text": token(e.text),
            "prob": e.prob,
            "member_probs": {
                n: p for n, p in zip(names, e.member_probs, strict=True) if n in taking_part
            },
            "dominant": names[e.dominant],
            "pruned": {  # the API's name for the step's pruned fraction
                n: f + 0.0
                for n, f in zip(names, e.pruned_fraction, strict=True)
                if n in taking_part
            },
            "byte_level": e.byte_level,
        }
        for e in events
    ]


def echo_entries(events: Sequence[PieceEvent]) -> list[tuple[str, float]]:
    """The prompt's byte events grouped into characters, each with its exact
    log-probability (the sum over its bytes)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    entries: list[tuple[str, float]] = []
    logprob = 0.0
    for i, e in enumerate(events):
        logprob += e.logprob
        text = decoder.decode(e.text, final=i == len(events) - 1)
        if text:
            entries.append((text, logprob))
            logprob = 0.0
    return entries


class ChatFormat:
    """chat.completion objects, whole or as chunks."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.reply.plan.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        }

    def _extras(self, choice: dict[str, Any], events: Sequence[PieceEvent]) -> dict[str, Any]:
        plan = self.reply.plan
        choice["logprobs"] = {"content": chat_logprobs(events)} if plan.logprobs else None
        if plan.piece_details:
            choice["piece_details"] = piece_details(events, self.reply)
        return choice

    def opening(self) -> list[dict[str, Any]]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return [self._object("chat.completion.chunk", [self._extras(choice, ())])]

    def chunk(self, delta: Delta) -> dict[str, Any]:
        choice = {"index": 0, "delta": {"content": delta.text}, "finish_reason": None}
        return self._object("chat.completion.chunk", [self._extras(choice, delta.events)])

    def closing(self, delta: Delta) -> list[dict[str, Any]]:
        """The rest of the text with the finish reason, then usage if asked for."""
        finished = self.reply.finished
        assert finished is not None
        content = {"content": delta.text} if delta.text else {}
        choice = {"index": 0, "delta": content, "finish_reason": finish_reason(self.reply)}
        last = self._object("chat.completion.chunk", [self._extras(choice, delta.events)])
        chunks = [with_summary(last, self.reply)]
        if self.reply.plan.include_usage:
            chunks.append(
                {**self._object("chat.completion.chunk", []), "usage": self.reply.usage()}
            )
        return chunks

    def response(self, text: str, events: Sequence[PieceEvent]) -> dict[str, Any]:
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "finish_reason": finish_reason(self.reply)}
        whole = self._object("chat.completion", [self._extras(choice, events)])
        whole["usage"] = self.reply.usage()
        return with_summary(whole, self.reply)


class CompletionFormat:
    """text_completion objects, whole or as chunks; echo puts the prompt first."""

    def __init__(self, reply: Reply, prompt: str, echo: bool) -> None:
        self.reply = reply
        self.prompt = prompt
        self.echo = echo
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.offset = len(prompt) if echo else 0  # text_offset of the next piece

    def _object(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.reply.plan.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        }

    def _choice(
        self, text: str, events: Sequence[PieceEvent], finish: str | None, echoed: bool = False
    ) -> dict[str, Any]:
        plan = self.reply.plan
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish}
        choice["logprobs"] = self._logprobs(events, echoed) if plan.logprobs else None
        if plan.piece_details:
            choice["piece_details"] = piece_details(events, self.reply)
        return choice

    def _logprobs(self, events: Sequence[PieceEvent], echoed: bool) -> dict[str, list[Any]]:
        """The legacy shape: tokens, token_logprobs, top_logprobs, text_offset; the
        echoed prompt first (characters, no alternatives) when `echoed`."""
        tokens: list[str] = []
        logprobs: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        position = 0
        if echoed:
            for text, lp in echo_entries(self.reply.echo):
                tokens.append(text)
                logprobs.append(lp if math.isfinite(lp) else None)
                tops.append(None)
                offsets.append(position)
                position += len(text)
            if not self.reply.echo:  # the prompt was not scored (empty)
                position = len(self.prompt)
        else:
            position = self.offset
        for e in events:
            tokens.append(token(e.text))
            logprobs.append(e.logprob)
            tops.append({token(alt): lp for alt, lp in e.alternatives})
            offsets.append(position)
            position += len(token(e.text))
        self.offset = position
        return {
            "tokens": tokens,
            "token_logprobs": logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def opening(self) -> list[dict[str, Any]]:
        if not self.echo:
            return []
        return [self._object([self._choice(self.prompt, (), None, echoed=True)])]

    def chunk(self, delta: Delta) -> dict[str, Any]:
        return self._object([self._choice(delta.text, delta.events, None)])

    def closing(self, delta: Delta) -> list[dict[str, Any]]:
        last = self._object([self._choice(delta.text, delta.events, finish_reason(self.reply))])
        chunks = [with_summary(last, self.reply)]
        if self.reply.plan.include_usage:
            chunks.append({**self._object([]), "usage": self.reply.usage()})
        return chunks

    def response(self, text: str, events: Sequence[PieceEvent]) -> dict[str, Any]:
        full = self.prompt + text if self.echo else text
        choice = self._choice(full, events, finish_reason(self.reply), echoed=self.echo)
        return with_summary({**self._object([choice]), "usage": self.reply.usage()}, self.reply)


def with_summary(obj: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """The last object of a reply gets the run's summary under "lvr" with piece details."""
    if reply.plan.piece_details:
        obj["lvr"] = reply.summary()
    return obj


def finish_reason(reply: Reply) -> str:
    stop_reason = reply.finished.stop_reason if reply.finished else "stop"
    return FINISH_REASONS.get(stop_reason, "stop")
