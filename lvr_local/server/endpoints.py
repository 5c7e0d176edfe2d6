"""The HTTP endpoints: /health, /v1/models, /v1/chat/completions, /v1/completions.

A completion request becomes a plan (plan.py) and a job (jobs.py) in the worker's
queue. The response starts once the first piece is there, so that a request that fails
before any text (a bad weight for the rule, a prompt too long) still gets its 4xx; after
that, a stream carries pieces as server-sent events and ends with `data: [DONE]`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from lvr_local import strict_json
from lvr_local.core.chat import Message
from lvr_local.runner.run import Runner
from lvr_local.server.errors import ApiError
from lvr_local.server.jobs import Finished, Piece, Started, chat_work, completion_work
from lvr_local.server.plan import ENSEMBLE_ID, plan_request
from lvr_local.server.reply import Reply
from lvr_local.server.responses import ChatFormat, CompletionFormat
from lvr_local.server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from lvr_local.server.worker import ClientGone, Done, Failed, GenerationWorker, Job

router = APIRouter()
Format = ChatFormat | CompletionFormat


@dataclass(frozen=True)
class ServerState:
    """What the endpoints share: the runner (read only here), its worker, the models."""

    runner: Runner
    worker: GenerationWorker
    names: list[str]
    models: list[dict[str, Any]]


def server_of(request: Request) -> ServerState:
    return request.app.state.lvr


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    worker = server_of(request).worker
    return {"status": "ok", "generating": worker.busy, "waiting": worker.waiting}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": server_of(request).models}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    for model in server_of(request).models:
        if model["id"] == model_id:
            return model
    raise ApiError(404, f"model '{model_id}' does not exist", param="model", code="model_not_found")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    server = server_of(request)
    plan = plan_request(body, server.runner.settings, server.names)
    messages = [to_message(m) for m in body.messages]
    reply = Reply(plan, server.names)
    job = server.worker.submit(chat_work(plan, messages))
    return await respond(request, job, reply, ChatFormat(reply))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    server = server_of(request)
    plan = plan_request(body, server.runner.settings, server.names)
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    reply = Reply(plan, server.names)
    work = completion_work(plan, prompt.encode("utf-8"), score_prompt=body.echo and plan.logprobs)
    job = server.worker.submit(work)
    return await respond(request, job, reply, CompletionFormat(reply, prompt, body.echo))


def to_message(message: ChatMessage) -> Message:
    """OpenAI's `developer` is a system message; text parts are joined."""
    content = message.content
    text = content if isinstance(content, str) else "".join(p.text for p in content)
    return Message("system" if message.role == "developer" else message.role, text)


def model_entries(runner: Runner, created: int) -> list[dict[str, Any]]:
    """/v1/models: the ensemble first, then each member (a member's id runs it alone)."""
    infos, s = runner.model_infos(), runner.settings
    common = {"object": "model", "created": created, "owned_by": "lvr-local"}
    ensemble = {
        "id": ENSEMBLE_ID,
        **common,
        "members": [i.name for i in infos],
        "combine": s.combine,
        "sub_vocab": s.sub_vocab,
        "method": s.method,
    }
    members = [
        {"id": i.name, **common, "tokenizer": i.tokenizer, "n_vocab": i.n_vocab, "weight": i.weight}
        for i in infos
    ]
    return [ensemble, *members]


# ----------------------------------------------------------------- answering a job


async def respond(request: Request, job: Job, reply: Reply, fmt: Format) -> Response:
    """Wait for the first piece, then stream, or collect the whole reply."""
    request.state.reply = reply
    try:
        first = await items_until_text(job, request)
    except ClientGone:
        job.cancel()
        return Response(status_code=499)
    except BaseException:
        job.cancel()
        raise
    if reply.plan.stream:
        return JobStream(job, sse(job, first, reply, fmt))
    try:
        return JSONResponse(await whole(job, first, reply, fmt, request))
    except ClientGone:
        return Response(status_code=499)
    finally:
        job.cancel()


async def items_until_text(job: Job, request: Request) -> list[Any]:
    """The job's items up to its first piece or its end; a failure is raised."""
    items: list[Any] = []
    while True:
        item = await job.next(request.is_disconnected)
        if isinstance(item, Failed):
            raise item.error()
        items.append(item)
        if isinstance(item, Piece | Finished | Done):
            return items


async def whole(
    job: Job, first: list[Any], reply: Reply, fmt: Format, request: Request
) -> dict[str, Any]:
    texts, events = [], []
    pending = list(first)
    while True:
        item = pending.pop(0) if pending else await job.next(request.is_disconnected)
        if isinstance(item, Failed):
            raise item.error()
        if isinstance(item, Done):
            return fmt.response("".join(texts), events)
        delta = reply.take(item)
        if delta is not None:
            texts.append(delta.text)
            events.extend(delta.events)


async def sse(job: Job, first: list[Any], reply: Reply, fmt: Format) -> AsyncIterator[str]:
    """Server-sent events: OpenAI's chunks, then `data: [DONE]` (or an error event)."""
    pending = list(first)
    while True:
        item = pending.pop(0) if pending else await job.next()
        if isinstance(item, Failed):
            yield event(item.error().body())
            return
        if isinstance(item, Done):
            yield "data: [DONE]\n\n"
            return
        for chunk in chunks_of(item, reply, fmt):
            yield event(chunk)


def chunks_of(item: Any, reply: Reply, fmt: Format) -> Sequence[dict[str, Any]]:
    delta = reply.take(item)
    if isinstance(item, Finished):
        assert delta is not None
        return fmt.closing(delta)
    if isinstance(item, Piece):
        return [fmt.chunk(delta)] if delta is not None else []
    return fmt.opening() if isinstance(item, Started) else []


def event(data: dict[str, Any]) -> str:
    return f"data: {strict_json.dumps(data)}\n\n"


class JobStream(StreamingResponse):
    """A stream that cancels its job however it ends: finished, or the client gone
    (Starlette then cancels the stream), so the run stops within one piece."""

    def __init__(self, job: Job, content: AsyncIterator[str]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()
