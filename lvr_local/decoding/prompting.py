"""A prompt as each model sees it: tokens for the backend, plus a tail of forced bytes.

A raw prompt may end in the middle of a token (`def fibo`, `https://exam`). Encoding it
whole would force the model's next token to start exactly there, an artefact no model
was trained on. So its end is held back: the backend evaluates the prompt up to a cut
that no likely token crosses, and the reduction engine is then fed the held-back bytes
one by one, summing over every tokenization that covers them (docs/algorithm.md §6).

The cut is the start of the last whitespace run: byte-level BPE pre-tokenizers never
let a token cross into the word after a space, and SentencePiece vocabularies hold
almost no token with a space inside (Gemma 3: one of 262,144). A prompt with no space
in its last HOLD_BACK_MAX_BYTES (a URL, an identifier, CJK text) is held back whole when
it is that short, so every tokenization of it counts; a longer one falls back to a cut
one token before the end (the residual approximation, docs/algorithm.md §6).

Chat prompts end with the template's assistant header, a natural token boundary, so
they hold nothing back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from lvr_local.core.vocabulary import Vocabulary
from lvr_local.errors import LvrError

# The longest tail held back; beyond it the cut falls HOLD_BACK_TOKENS tokens before the
# end. Each held-back byte costs about one forward pass per model (a tail is forced over
# bytes), against one per token for the head.
HOLD_BACK_MAX_BYTES = 256
HOLD_BACK_TOKENS = 1


class Tokenizer(Protocol):
    def tokenize(self, text: bytes, add_special: bool, parse_special: bool) -> list[int]: ...


@dataclass(frozen=True)
class PreparedPrompt:
    tokens: list[int]  # evaluated by the backend
    tail: bytes  # then forced byte by byte through the reduction engine


def prepare_raw(
    tokenizer: Tokenizer, vocab: Vocabulary, text: bytes, hold_back: bool = True
) -> PreparedPrompt:
    """Split a raw prompt into backend tokens and a forced tail (see module docstring).
    With `hold_back=False` the whole prompt is tokens, as the model's tokenizer splits
    it: the naive baseline has no byte-level phase to force a tail through."""
    tokens = tokenizer.tokenize(text, True, False)
    n_special = _leading_specials(tokens, vocab)
    expected = _rendered_text(vocab, text)
    start = tokens[:n_special] or _start_token(vocab)
    if not hold_back:
        return PreparedPrompt(start + tokens[n_special:], b"")
    cut = _whitespace_cut(expected)
    if cut is None:  # no space near the end: cut one token back, as close as possible
        return _cut_tokens(tokens, vocab, n_special, expected, start)
    head = expected[:cut]
    if not head.strip():  # nothing but the start (and maybe the space prefix) before it
        return PreparedPrompt(start, expected)
    head_text = text[: len(text) - (len(expected) - cut)]
    head_tokens = tokenizer.tokenize(head_text, True, False)
    spelled = b"".join(vocab.token_bytes(t) or b"" for t in head_tokens[n_special:])
    if spelled != head:  # the tokenizer normalised something: hold back everything
        return PreparedPrompt(start, expected)
    return PreparedPrompt(start + head_tokens[n_special:], expected[cut:])


def _whitespace_cut(rendered: bytes) -> int | None:
    """Where the last whitespace run begins (a trailing one included), if it lies within
    HOLD_BACK_MAX_BYTES of the end; 0 when the whole text is that short; else None."""
    window = rendered[-HOLD_BACK_MAX_BYTES:]
    offset = len(rendered) - len(window)
    i = len(window)
    while i > 0 and not window[i - 1 : i].isspace():
        i -= 1
    if i == 0:
        return 0 if offset == 0 else None
    while i > 0 and window[i - 1 : i].isspace():
        i -= 1
    return offset + i


def _cut_tokens(
    tokens: list[int], vocab: Vocabulary, n_special: int, expected: bytes, start: list[int]
) -> PreparedPrompt:
    """Hold back the last HOLD_BACK_TOKENS tokens (more where the tokenizer normalised
    the text and the tokens no longer spell a prefix of it)."""
    cut = max(n_special, len(tokens) - HOLD_BACK_TOKENS)
    while cut > n_special:
        rendered = b"".join(vocab.token_bytes(t) or b"" for t in tokens[n_special:cut])
        if expected.startswith(rendered):
            return PreparedPrompt(start + tokens[n_special:cut], expected[len(rendered) :])
        cut -= 1
    return PreparedPrompt(start, expected)


def _start_token(vocab: Vocabulary) -> list[int]:
    """A raw prompt starts a document. Models that add no BOS to raw text (SmolLM2) get
    their BOS, or failing that their EOS (the separator between training documents), as
    that start, so that every raw prompt, empty or not, is conditioned the same way."""
    start = vocab.bos_id if vocab.bos_id is not None else vocab.eos_id
    if start is None:
        raise LvrError(f"model '{vocab.name}' has neither BOS nor EOS to start a prompt from")
    return [start]


def prepare_chat(tokenizer: Tokenizer, parts: Sequence[tuple[str, bool]]) -> PreparedPrompt:
    """A chat prompt formatted with the model's template, as (text, is_content) parts:
    the template's text with its control-token strings read as tokens, every message's
    content as plain text, so that typed markers stay text. No tail."""
    tokens: list[int] = []
    for n, (text, is_content) in enumerate(parts):
        tokens += tokenizer.tokenize(text.encode("utf-8"), n == 0, not is_content)
    if not parts:
        tokens = tokenizer.tokenize(b"", True, True)
    return PreparedPrompt(tokens, b"")


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
