"""The request bodies the server accepts, as pydantic models that validate them.

Only what the server implements is declared, and every model refuses unknown fields
(`extra="forbid"`): an option a client relies on is refused with a 400 naming it rather
than silently ignored. Values are strict (no "0.5" for 0.5, no true for 1); what a
setting accepts beyond its type (ranges, names) is checked by the run settings' own
checks, so that the server, the CLI and models.toml agree.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    """A message; `developer` is OpenAI's newer name for `system`."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    type: Literal["text"]


Penalty = Annotated[float | None, Field(ge=-2.0, le=2.0)]


class EnsembleFields(Strict):
    """lvr-local's extensions (the `extra_body` of the openai client), named as the run
    settings are (docs/algorithm.md §4-7): they apply to this request only."""

    weights: list[float] | dict[str, float] | None = Field(
        None, description="Member weights, in /v1/models order or by member name."
    )
    combine: str | None = Field(None, description="mean | product | max")
    defer: float | None = Field(
        None,
        description="How strongly base models give way to a sure chat model: each base "
        "model's weight times (1 - the chat model's top probability) ** defer (0 = off)",
    )
    sub_vocab: str | None = Field(None, description="auto | mcv | bytes | maxlen:K")
    method: str | None = Field(None, description="lossless | naive")
    prune: float | None = None
    max_branches: int | None = None
    token_top_k: int | None = None
    sample_on: str | None = Field(
        None,
        description="tokens | pieces: where temperature, top-k, top-p, min-p and the "
        "penalties act: each model's own tokens (default) or the combined pieces",
    )
    top_k: int | None = None
    min_p: float | None = None
    max_bytes: int | None = None
    piece_details: bool = Field(
        False,
        description="Add each piece's per-member probabilities, dominant member and "
        "pruned share to the response.",
    )


class CommonFields(EnsembleFields):
    """What chat and text completions share. `max_tokens` counts pieces."""

    model: str | None = Field(None, description="A model id of /v1/models (default: the ensemble).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    n: int | None = Field(None, description="Only 1.")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty: no token ids.")
    user: str | None = None


class ChatCompletionRequest(CommonFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None


class CompletionRequest(CommonFields):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, description="Only 1.")
    suffix: str | None = Field(None, description="Not supported (no infilling).")
