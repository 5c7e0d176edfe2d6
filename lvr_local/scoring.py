"""Exact log-probability of a text under each model and under the ensemble.

Over the byte sub-vocabulary a text has exactly one piece sequence, so the product of
q over its bytes is the probability that the model's generation (after the prompt)
starts with the text, summed over all its tokenizations: comparable across tokenizers.
"""

from __future__ import annotations

import math

import numpy as np

from lvr_local.ensemble import Ensemble
from lvr_local.errors import LvrError


def score_text(ensemble: Ensemble, text: bytes, prompt: bytes = b"") -> dict[str, object]:
    """{"n_bytes", "models": {name: {logprob, bits_per_byte, pruned_mass}}, "ensemble"}
    (log-probabilities in nats, conditioned on the prompt; no "ensemble" for one model)."""
    if ensemble.sub.kind != "bytes":
        raise LvrError("scoring needs the byte sub-vocabulary")
    ensemble.start_raw(prompt)
    member_logp = np.zeros(len(ensemble.members))
    ensemble_logp = 0.0
    for index, value in enumerate(text):
        piece = ensemble.piece_id(bytes([value]))
        assert piece is not None
        event = ensemble.force(piece, index)
        member_logp += np.array(event.member_logprobs)
        ensemble_logp += event.logprob
    pruned = ensemble.pruned_mass()
    per_byte = 1.0 / (len(text) * math.log(2))
    result: dict[str, object] = {
        "n_bytes": len(text),
        "models": {
            m.name: {
                "logprob": float(lp),
                "bits_per_byte": float(-lp * per_byte),
                "pruned_mass": pruned[i],
            }
            for i, (m, lp) in enumerate(zip(ensemble.members, member_logp, strict=True))
        },
    }
    if len(ensemble.members) > 1:
        result["ensemble"] = {
            "logprob": float(ensemble_logp),
            "bits_per_byte": float(-ensemble_logp * per_byte),
        }
    return result
