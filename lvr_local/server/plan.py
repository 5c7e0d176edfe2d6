"""A request's options, checked and turned into what the runner takes: run settings,
the members that take part, their weights, and what the response reports.

OpenAI's names map onto the run settings (max_tokens -> max_pieces, and so on); the
ensemble extensions carry the settings' own names. Every value passes the run
settings' checks (`with_overrides`), so a request is held to the same rules as a flag or
models.toml, and a bad value is a 400 naming the request field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lvr_local.errors import ConfigError, LvrError
from lvr_local.runner.config import check_weights
from lvr_local.runner.settings import RunSettings, with_overrides
from lvr_local.server.errors import ApiError
from lvr_local.server.schemas import ChatCompletionRequest, CommonFields, CompletionRequest

ENSEMBLE_ID = "lvr-ensemble"
# Extension fields that are run settings under the same name.
SETTING_FIELDS = (
    "combine", "defer", "sub_vocab", "method", "prune", "max_branches", "token_top_k", "top_k",
    "min_p", "max_bytes", "temperature", "top_p", "seed", "sample_on",
)  # fmt: skip


@dataclass(frozen=True)
class RequestPlan:
    """What one request asks of the runner and of its response."""

    model: str
    settings: RunSettings
    enabled: tuple[bool, ...]  # which members take part (a member's id runs it alone)
    weights: tuple[float | None, ...] | None  # None: a member's own weight
    top_n: int  # alternatives per piece (top logprobs)
    logprobs: bool
    piece_details: bool
    stream: bool
    include_usage: bool


def plan_request(
    req: ChatCompletionRequest | CompletionRequest, base: RunSettings, members: Sequence[str]
) -> RequestPlan:
    """The plan of a validated request, or an ApiError naming the field at fault."""
    refuse_unsupported(req)
    model = req.model or ENSEMBLE_ID
    if model == ENSEMBLE_ID:
        enabled = tuple(True for _ in members)
    elif model in members:
        enabled = tuple(name == model for name in members)
    else:
        raise ApiError(
            404,
            f"model '{model}' does not exist: use {ENSEMBLE_ID} or one of {', '.join(members)}",
            param="model",
            code="model_not_found",
        )
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        logprobs, top_n = req.logprobs, req.top_logprobs or 0
    else:
        logprobs, top_n = req.logprobs is not None, req.logprobs or 0
    return RequestPlan(
        model=model,
        settings=request_settings(req, base),
        enabled=enabled,
        weights=member_weights(req.weights, members),
        top_n=top_n,
        logprobs=logprobs,
        piece_details=req.piece_details,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


def refuse_unsupported(req: CommonFields) -> None:
    """Options that are declared (a client may send their neutral value) but whose other
    values the server does not implement."""
    if req.n not in (None, 1):
        raise ApiError(400, "'n' must be 1: lvr serve returns one choice", param="n")
    if req.logit_bias:
        raise ApiError(
            400, "'logit_bias' is not supported: the members have no common token ids",
            param="logit_bias",
        )  # fmt: skip
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "'stream_options' needs 'stream': true", param="stream_options")
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, 1):
            raise ApiError(
                400, "'best_of' must be 1: lvr serve returns one choice", param="best_of"
            )
        if req.suffix:
            raise ApiError(400, "'suffix' is not supported (no infilling)", param="suffix")
        if isinstance(req.prompt, list) and len(req.prompt) != 1:
            raise ApiError(
                400, "'prompt' must be one string: one prompt per request", param="prompt"
            )


def request_settings(
    req: ChatCompletionRequest | CompletionRequest, base: RunSettings
) -> RunSettings:
    """`base` with the request's values applied, each checked as a run setting."""
    values: dict[str, tuple[str, Any]] = {
        name: (name, getattr(req, name)) for name in SETTING_FIELDS
    }
    values["max_pieces"] = max_pieces(req)
    if req.stop is not None:
        values["stop"] = ("stop", [req.stop] if isinstance(req.stop, str) else req.stop)
    values.update(penalty_settings(req.presence_penalty, req.frequency_penalty))
    settings = base
    for setting, (field, value) in values.items():
        try:
            settings = with_overrides(settings, f"request field '{field}'", **{setting: value})
        except ConfigError as e:
            raise ApiError(400, str(e), param=field) from None
    return settings


def max_pieces(req: ChatCompletionRequest | CompletionRequest) -> tuple[str, int | None]:
    """max_tokens or max_completion_tokens (OpenAI's newer name), counted in pieces."""
    newer = getattr(req, "max_completion_tokens", None)
    if newer is not None and req.max_tokens is not None and newer != req.max_tokens:
        raise ApiError(
            400,
            "'max_tokens' and 'max_completion_tokens' differ: give one",
            param="max_completion_tokens",
        )
    if newer is not None:
        return "max_completion_tokens", newer
    return "max_tokens", req.max_tokens


def penalty_settings(presence: float | None, frequency: float | None) -> dict[str, tuple[str, Any]]:
    """OpenAI's penalties are the run settings of the same names (over pieces; range
    [-2, 2] checked by the request schema, the settings' checks after it)."""
    values: dict[str, tuple[str, Any]] = {}
    for field, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if value is not None:
            values[field] = (field, float(value))
    return values


def member_weights(
    weights: list[float] | dict[str, float] | None, members: Sequence[str]
) -> tuple[float | None, ...] | None:
    """Weights in member order: a list in /v1/models order, or a map by member name
    (a member it leaves out keeps its own weight: None)."""
    if weights is None:
        return None
    if isinstance(weights, dict):
        unknown = sorted(set(weights) - set(members))
        if unknown:
            raise ApiError(
                400,
                f"'weights' names '{unknown[0]}', not a member (members: {', '.join(members)})",
                param="weights",
            )
        values = [weights.get(name) for name in members]
    else:
        values = list(weights)
    try:
        check_weights(values, len(members), "'weights'")
    except LvrError as e:
        raise ApiError(400, str(e), param="weights") from e
    return tuple(values)
