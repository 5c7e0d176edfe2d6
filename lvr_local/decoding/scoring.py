"""Exact log-probability of a text under each model and under the ensemble.

Over the byte sub-vocabulary a text has exactly one piece sequence, so the product of
q over its bytes is the probability that the model's generation (after the prompt)
starts with the text, summed over all its tokenizations (docs/algorithm.md §2): a
number comparable across tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from lvr_local.core.chat import Message
from lvr_local.decoding.byte_phase import byte_pieces
from lvr_local.decoding.ensemble import Ensemble, PieceEvent
from lvr_local.errors import LvrError


class Scoring:
    """Scores `text` after `prompt` byte by byte: iterate for one event per byte (or call
    `run()`), then `record()` gives the totals."""

    def __init__(
        self,
        ensemble: Ensemble,
        text: bytes,
        prompt: bytes = b"",
        messages: Sequence[Message] | None = None,
    ) -> None:
        if ensemble.sub.kind != "bytes":
            raise LvrError("scoring needs the byte sub-vocabulary")
        if not text:
            raise LvrError("the text to score is empty")
        self.ensemble = ensemble
        self.text = text
        self.prompt = prompt
        self.messages = messages  # given: the text is the reply to this conversation
        self.member_logp = np.zeros(len(ensemble.members))
        self.ensemble_logp = 0.0
        self.n_scored = 0
        self.left: dict[int, int] = {}  # member -> the byte it could not spell

    def __iter__(self) -> Iterator[PieceEvent]:
        if self.messages is not None:  # each member reads it in its own format
            self.ensemble.start_chat(self.messages)
        else:
            self.ensemble.start_raw(self.prompt, known=self.text)
        pieces = byte_pieces(self.ensemble.sub, self.text)
        for index, piece in enumerate(pieces.tolist()):
            # The rest of the text is known: pruning keeps what can spell it.
            event = self.ensemble.force(piece, index, ahead=pieces[index + 1 :])
            for i in event.left:
                self.left[i] = index
            self.member_logp += np.array(event.member_logprobs)
            self.ensemble_logp += event.logprob
            self.n_scored += 1
            yield event

    def run(self) -> dict[str, object]:
        for _ in self:
            pass
        return self.record()

    def record(self) -> dict[str, object]:
        """{"n_bytes", "models": {name: {logprob, bits_per_byte, pruned_mass,
        mix_weight}}, "ensemble"} (log-probabilities in nats, conditioned on the prompt;
        mix_weight: the weight the rule gives the model after the text, its posterior
        under bayes; no "ensemble" for one model). Over the bytes scored so far when the
        scoring was cut short."""
        n = max(self.n_scored, 1)
        per_byte = 1.0 / (n * math.log(2))
        pruned = self.ensemble.pruned_mass()
        mix = self.ensemble.mix_weights()
        members = self.ensemble.members
        result: dict[str, object] = {
            "n_bytes": self.n_scored,
            "models": {
                m.name: {
                    "logprob": float(lp),
                    "bits_per_byte": float(-lp * per_byte),
                    "pruned_mass": pruned[i] if i < len(pruned) else 0.0,
                    "mix_weight": float(mix[i]),
                    **({"cannot_spell_byte": self.left[i]} if i in self.left else {}),
                }
                for i, (m, lp) in enumerate(zip(members, self.member_logp, strict=True))
            },
        }
        if len(members) > 1:
            result["ensemble"] = {
                "combine": self.ensemble.rule,
                "logprob": float(self.ensemble_logp),
                "bits_per_byte": float(-self.ensemble_logp * per_byte),
            }
        return result
