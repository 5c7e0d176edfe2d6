"""A prompt as each model sees it: tokens for the backend, plus a tail of forced bytes.

A raw prompt may end in the middle of a token (`def fibo`, `https://exam`). Encoding it
whole would force the model's next token to start exactly there, an artefact no model
was trained on. So the last tokens are held back: the backend evaluates the prompt
minus its last few bytes (ending on a token boundary of the model's own tokenization),
and the reduction engine is then fed the held-back bytes one by one, summing over every
tokenization that covers them. The continuation is distributed as if the model had
produced the whole prompt itself.

Chat prompts end with the template's assistant header, a natural token boundary, so
they hold nothing back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from lvr_local.core.vocabulary import Vocabulary
from lvr_local.errors import LvrError

# Held-back tail: at least this many tokens, extended back to a whitespace boundary when
# one is near, so that no likely token straddles the cut.
HOLD_BACK_TOKENS = 1
HOLD_BACK_MAX_BYTES = 16


class Tokenizer(Protocol):
    def tokenize(self, text: bytes, add_special: bool, parse_special: bool) -> list[int]: ...


@dataclass(frozen=True)
class PreparedPrompt:
    tokens: list[int]  # evaluated by the backend
    tail: bytes  # then forced byte by byte through the reduction engine


def prepare_raw(tokenizer: Tokenizer, vocab: Vocabulary, text: bytes) -> PreparedPrompt:
    """Split a raw prompt into backend tokens and a forced tail (see module docstring)."""
    tokens = tokenizer.tokenize(text, True, False)
    n_special = _leading_specials(tokens, vocab)
    expected = _rendered_text(vocab, text)
    cut = _cut_index(tokens, vocab, n_special)
    while cut > n_special:
        rendered = b"".join(vocab.token_bytes(t) or b"" for t in tokens[n_special:cut])
        if expected.startswith(rendered):
            return PreparedPrompt(tokens[:cut], expected[len(rendered) :])
        cut -= 1  # the tokenizer normalised something: hold back more
    return PreparedPrompt(tokens[:n_special] or _start_token(vocab), expected)


def _start_token(vocab: Vocabulary) -> list[int]:
    """A model needs one token to condition on. Models that add no BOS to raw text
    (SmolLM2) get their BOS, or failing that their EOS, as a start-of-document mark."""
    start = vocab.bos_id if vocab.bos_id is not None else vocab.eos_id
    if start is None:
        raise LvrError(f"model '{vocab.name}' has neither BOS nor EOS to start a prompt from")
    return [start]


def prepare_chat(tokenizer: Tokenizer, formatted: str) -> PreparedPrompt:
    """A chat prompt already formatted with the model's template: no tail."""
    return PreparedPrompt(tokenizer.tokenize(formatted.encode("utf-8"), True, True), b"")


def _leading_specials(tokens: list[int], vocab: Vocabulary) -> int:
    """BOS and other byte-less tokens the tokenizer put in front."""
    n = 0
    while n < len(tokens) and vocab.token_bytes(tokens[n]) is None:
        n += 1
    return n


def _rendered_text(vocab: Vocabulary, text: bytes) -> bytes:
    """What the model's tokens spell for `text`: SentencePiece models that add a space
    prefix spell ' ' + text."""
    if vocab.add_space_prefix and vocab.tokenizer_model == "llama" and text:
        return b" " + text
    return text


def _cut_index(tokens: list[int], vocab: Vocabulary, n_special: int) -> int:
    """Hold back HOLD_BACK_TOKENS tokens, and further back to a word boundary (a token
    starting with whitespace, or following one that ends with it) within
    HOLD_BACK_MAX_BYTES."""

    def spelled(i: int) -> bytes:
        return vocab.token_bytes(tokens[i]) or b""

    cut = max(n_special, len(tokens) - HOLD_BACK_TOKENS)
    probe, held = cut, sum(len(spelled(i)) for i in range(cut, len(tokens)))
    while n_special < probe < len(tokens):
        if spelled(probe)[:1].isspace() or spelled(probe - 1)[-1:].isspace():
            return probe
        held += len(spelled(probe - 1))
        if held > HOLD_BACK_MAX_BYTES:
            break
        probe -= 1
    return cut
