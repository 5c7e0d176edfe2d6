"""`lvr serve` for real: the server runs as its own process on the bundled models (one per
module, on a free port, with a small piece budget), and real clients talk to it: the
official `openai` client, raw HTTP with httpx, concurrent streams, a client that hangs
up, and schemathesis fuzzing the server's own OpenAPI schema.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

KEY = "test-key-for-lvr-serve"
AUTH = {"Authorization": f"Bearer {KEY}"}
MEMBERS = ["smollm2-135m", "gemma3-270m"]
MAX_BODY = 20_000
LOG_LINE = re.compile(r"(GET|POST) (\S+) (\d+) pieces=(\d+) ([\d.]+)s")


@dataclass
class LiveServer:
    url: str
    log: Path
    process: subprocess.Popen[bytes]

    def log_lines(self) -> list[tuple[str, str, int, int]]:
        """(method, path, status, pieces) of each request line logged so far."""
        found = LOG_LINE.findall(self.log.read_text(encoding="utf-8", errors="replace"))
        return [(m, p, int(s), int(n)) for m, p, s, n, _ in found]

    def openai(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_home(shared_home: Path, home: Path) -> dict[str, str]:
    """The environment of a server process: its own user directory, the shared caches."""
    for shared in ("models", "cache"):
        (home / shared).symlink_to(shared_home / shared, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LVR_CONFIG", "LVR_API_KEY")}
    env["LVR_HOME"] = str(home)
    return env


def start_server(env: dict[str, str], log: Path, *options: str) -> LiveServer:
    port = free_port()
    command = [sys.executable, "-m", "lvr_local.cli", "serve", "--port", str(port), *options]
    with log.open("wb") as out:
        process = subprocess.Popen([*command, "--api-key", KEY], stdout=out, stderr=out, env=env)
    return LiveServer(f"http://127.0.0.1:{port}", log, process)


@pytest.fixture(scope="module")
def server(
    bundled_paths: dict[str, Path], shared_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """`python -m lvr_local.cli serve` on the models of the shipped models.toml; stopped
    with SIGTERM at the end, which must shut it down cleanly (exit status 143)."""
    home = tmp_path_factory.mktemp("serve-home")
    env = serve_home(shared_home, home)
    options = ["--max-pieces", "8", "--max-queue", "2", "--max-body", str(MAX_BODY)]
    options += ["--greedy", "--combine", "mean"]  # replies the tests can compare
    live = start_server(env, home / "server.log", *options)
    try:
        wait_until_ready(live)
        yield live
    finally:
        live.process.send_signal(signal.SIGTERM)
        status = live.process.wait(timeout=60)
    text = live.log.read_text(encoding="utf-8", errors="replace")
    assert status == 128 + signal.SIGTERM, text[-2000:]
    assert "Application shutdown complete" in text and "stopped by SIGTERM" in text
    assert "Traceback" not in text, text[-4000:]


def wait_until_ready(live: LiveServer, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if live.process.poll() is not None:
            pytest.fail(f"lvr serve exited: {live.log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{live.url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail("lvr serve did not answer /health in time")


def post(server: LiveServer, path: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=120, **kw)


HELLO = [{"role": "user", "content": "Name three colours."}]


# ----------------------------------------------------------------- the openai client


def test_models_are_the_ensemble_and_each_member(server: LiveServer) -> None:
    models = server.openai().models.list()
    assert [m.id for m in models.data] == ["lvr-ensemble", *MEMBERS]
    assert models.data[0].model_extra["members"] == MEMBERS
    assert server.openai().models.retrieve("gemma3-270m").model_extra["tokenizer"] == "llama"


def test_chat_with_logprobs_and_piece_details(server: LiveServer) -> None:
    response = server.openai().chat.completions.create(
        model="lvr-ensemble",
        messages=HELLO,
        logprobs=True,
        top_logprobs=3,
        extra_body={"piece_details": True},
    )
    choice = response.choices[0]
    text = choice.message.content
    assert text and choice.finish_reason in ("stop", "length")
    entries = choice.logprobs.content
    assert b"".join(bytes(e.bytes) for e in entries) == text.encode()
    assert response.usage.completion_tokens == len(entries) <= 8
    for entry in entries:  # greedy: the chosen piece is the most likely one
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == tops[0] <= 0
    details = choice.model_extra["piece_details"]
    assert len(details) == len(entries)
    for detail, entry in zip(details, entries, strict=True):
        assert set(detail["member_probs"]) == set(MEMBERS) and detail["dominant"] in MEMBERS
        mean = sum(detail["member_probs"].values()) / 2  # the mean rule, weights 1 and 1
        # Near, not equal: END comes from the member that can end a turn (the chat model),
        # and the other pieces share the rest (docs/algorithm.md §7.1).
        assert detail["prob"] == pytest.approx(mean, rel=1e-2)
        assert detail["prob"] == pytest.approx(math.exp(entry.logprob), rel=1e-9)


def test_a_stream_spells_the_same_reply(server: LiveServer) -> None:
    client = server.openai()
    whole = client.chat.completions.create(model="lvr-ensemble", messages=HELLO)
    stream = client.chat.completions.create(
        model="lvr-ensemble", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_a_streamed_reply_stops_before_a_stop_string_and_never_shows_it(
    server: LiveServer,
) -> None:
    """The stop string is taken from the middle of the greedy reply itself, so it is met
    whatever the reply is; the stream sends the text before it and nothing of it."""
    client = server.openai()
    whole = client.chat.completions.create(model="lvr-ensemble", messages=HELLO)
    text = whole.choices[0].message.content
    assert text and len(text) >= 4, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stream = client.chat.completions.create(
        model="lvr-ensemble", messages=HELLO, stream=True, stop=[stop]
    )
    chunks = [c for c in stream if c.choices]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_mid_token_with_echo_and_logprobs(server: LiveServer) -> None:
    prompt = "def fibo"
    response = server.openai().completions.create(
        model="lvr-ensemble", prompt=prompt, echo=True, logprobs=2, max_tokens=6
    )
    choice = response.choices[0]
    assert choice.text.startswith(prompt + "nacci"), choice.text  # the word goes on
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    echoed = len(prompt)  # the prompt, one entry per character, scored exactly over bytes
    assert lp.tokens[:echoed] == list(prompt) and lp.top_logprobs[:echoed] == [None] * echoed
    assert all(x is not None and x <= 0 for x in lp.token_logprobs)
    for tops, chosen in zip(lp.top_logprobs[echoed:], lp.token_logprobs[echoed:], strict=True):
        assert 1 <= len(tops) <= 2 and max(tops.values()) == chosen
    assert response.usage.completion_tokens == len(lp.tokens) - echoed


def test_a_request_s_weights_and_rule_do_not_leak(server: LiveServer) -> None:
    tilted = post(
        server,
        "/v1/chat/completions",
        {
            "messages": HELLO,
            "weights": {"smollm2-135m": 0.0},
            "combine": "max",
            "piece_details": True,
        },
    ).json()
    assert tilted["lvr"]["combine"] == "max"
    assert [m["weight"] for m in tilted["lvr"]["models"]] == [0.0, 1.0]
    assert {d["dominant"] for d in tilted["choices"][0]["piece_details"]} == {"gemma3-270m"}
    plain = post(server, "/v1/chat/completions", {"messages": HELLO, "piece_details": True})
    assert plain.json()["lvr"]["combine"] == "mean"
    assert [m["weight"] for m in plain.json()["lvr"]["models"]] == [1.0, 1.0]


def test_a_member_s_id_runs_it_alone(server: LiveServer) -> None:
    body = {"model": "smollm2-135m", "messages": HELLO, "piece_details": True}
    reply = post(server, "/v1/chat/completions", body).json()
    assert reply["model"] == "smollm2-135m"
    details = reply["choices"][0]["piece_details"]
    assert details and all(list(d["member_probs"]) == ["smollm2-135m"] for d in details)
    assert all(d["prob"] == pytest.approx(d["member_probs"]["smollm2-135m"]) for d in details)


def test_one_log_line_per_request(server: LiveServer) -> None:
    before = server.log_lines()
    reply = post(server, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 3}).json()
    time.sleep(0.2)  # the line is written once the response is over
    new = server.log_lines()[len(before) :]
    pieces = reply["usage"]["completion_tokens"]
    assert new == [("POST", "/v1/chat/completions", 200, pieces)]


# ----------------------------------------------------------------- errors


def chunked(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), 4096):
        yield data[i : i + 4096]


ERROR_CASES: dict[str, tuple[dict[str, Any], int, str | None, str]] = {
    # name: (httpx arguments, status, param, words in the message)
    "bad JSON": ({"content": b'{"messages": [', "headers": AUTH}, 400, None, "not valid JSON"),
    "wrong type": (
        {"json": {"messages": HELLO, "temperature": "hot"}, "headers": AUTH},
        400,
        "temperature",
        "valid number",
    ),
    "out of range": (
        {"json": {"messages": HELLO, "temperature": 500}, "headers": AUTH},
        400,
        "temperature",
        "from 0 to 100",
    ),
    "unknown model": (
        {"json": {"model": "gpt-4o", "messages": HELLO}, "headers": AUTH},
        404,
        "model",
        "does not exist",
    ),
    "unsupported field": (
        {"json": {"messages": HELLO, "tools": [{"type": "function"}]}, "headers": AUTH},
        400,
        "tools",
        "unsupported field",
    ),
    "penalty": (
        {"json": {"messages": HELLO, "presence_penalty": 3.0}, "headers": AUTH},
        400,
        "presence_penalty",
        "2",
    ),
    "no messages": ({"json": {"messages": []}, "headers": AUTH}, 400, "messages", "at least 1"),
    "form body": (
        {"data": {"messages": "hi"}, "headers": AUTH},
        400,
        None,
        "Content-Type: application/json",
    ),
    "no body": ({"headers": AUTH}, 400, None, "the request has no body"),
    "empty JSON body": (
        {"content": b"", "headers": {**AUTH, "Content-Type": "application/json"}},
        400,
        None,
        "the request has no body",
    ),
    "missing key": ({"json": {"messages": HELLO}}, 401, None, "missing API key"),
    "wrong key": (
        {"json": {"messages": HELLO}, "headers": {"Authorization": "Bearer nope"}},
        401,
        None,
        "API key is wrong",
    ),
    "oversized body": (
        {"json": {"messages": [{"role": "user", "content": "x" * MAX_BODY}]}, "headers": AUTH},
        413,
        None,
        f"larger than {MAX_BODY} bytes",
    ),
    "oversized chunked body": (
        {"content": chunked(b" " * (MAX_BODY + 10)), "headers": AUTH},
        413,
        None,
        f"larger than {MAX_BODY} bytes",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_requests_get_a_4xx_in_openai_s_error_shape(server: LiveServer, case: str) -> None:
    arguments, status, param, words = ERROR_CASES[case]
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, **arguments)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error


def test_unknown_paths_and_methods_get_the_error_shape(server: LiveServer) -> None:
    missing = httpx.get(f"{server.url}/v1/engines", headers=AUTH)
    wrong = httpx.get(f"{server.url}/v1/chat/completions", headers=AUTH)
    assert (missing.status_code, wrong.status_code) == (404, 405)
    assert "no such endpoint" in missing.json()["error"]["message"]
    assert wrong.json()["error"]["code"] == "method_not_allowed"


# ----------------------------------------------------------------- load and hang-ups


@dataclass
class Outcome:
    status: int
    retry_after: str | None = None
    ids: frozenset[str] = frozenset()
    times: tuple[float, float] = (0.0, 0.0)  # first and last piece received
    done: bool = False


def stream_chat(server: LiveServer, content: str, max_tokens: int) -> Outcome:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={**body, "stream": True},
        headers=AUTH,
        timeout=120,
    ) as response:
        if response.status_code != 200:
            return Outcome(response.status_code, response.headers.get("retry-after"))
        ids, stamps, done = set(), [], False
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                ids.add(json.loads(line[6:])["id"])
                stamps.append(time.perf_counter())
        return Outcome(200, None, frozenset(ids), (stamps[0], stamps[-1]), done)


def test_four_concurrent_clients_are_served_in_turn_or_refused(server: LiveServer) -> None:
    """One long stream runs; four more arrive at once. The queue holds two: each of the
    four completes or gets a 503 with Retry-After, and no two streams overlap."""
    outcomes: dict[str, Outcome] = {}

    def client(name: str, content: str, max_tokens: int) -> None:
        outcomes[name] = stream_chat(server, content, max_tokens)

    long = threading.Thread(target=client, args=("long", "Count from 1 to 100.", 40))
    long.start()
    while not httpx.get(f"{server.url}/health").json()["generating"]:
        time.sleep(0.02)
    others = [
        threading.Thread(target=client, args=(f"c{i}", f"Count to {i + 2}.", 4)) for i in range(4)
    ]
    for t in others:
        t.start()
    for t in [long, *others]:
        t.join(timeout=180)
    assert len(outcomes) == 5 and outcomes["long"].status == 200
    served = [o for o in outcomes.values() if o.status == 200]
    refused = [o for o in outcomes.values() if o.status == 503]
    assert len(served) + len(refused) == 5 and len(refused) >= 1 and len(served) >= 2
    assert all(o.retry_after is not None and int(o.retry_after) >= 1 for o in refused)
    assert all(o.done and len(o.ids) == 1 for o in served)  # each stream is its own
    assert len({next(iter(o.ids)) for o in served}) == len(served)
    spans = sorted(o.times for o in served)
    assert all(a[1] <= b[0] + 0.05 for a, b in itertools.pairwise(spans)), spans


def test_a_client_that_hangs_up_frees_the_ensemble_within_a_piece(server: LiveServer) -> None:
    before = len(server.log_lines())
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 300}
    with (
        httpx.Client(headers=AUTH, timeout=60) as client,
        client.stream(
            "POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}
        ) as r,
    ):
        received = 0
        for line in r.iter_lines():
            received += line.startswith("data: ")
            if received == 3:  # the role chunk and two pieces
                break
    hung_up = time.perf_counter()
    while httpx.get(f"{server.url}/health").json()["generating"]:
        time.sleep(0.01)
    freed_s = time.perf_counter() - hung_up
    started = time.perf_counter()
    reply = post(server, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
    assert reply.status_code == 200 and time.perf_counter() - started < 30
    assert freed_s < 2.0, freed_s
    lines = server.log_lines()[before:]
    hang_up = next(line for line in lines if line[1] == "/v1/chat/completions")
    assert hang_up[3] < 20, hang_up  # it stopped long before its 300 pieces


# ----------------------------------------------------------------- shutting down


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_streams_in_flight_with_done_and_the_exit_status(
    bundled_paths: dict[str, Path], shared_home: Path, tmp_path: Path, signum: int
) -> None:
    """A client streams a long reply; the server gets a real signal. The stream ends
    with a finish reason and [DONE] long before its budget (not cancelled after the
    grace period), and the server exits 143 (SIGTERM) or 130 (SIGINT), no traceback."""
    env = serve_home(shared_home, tmp_path)
    live = start_server(env, tmp_path / "server.log", "-m", "smollm2-135m", "--greedy")
    body = {"messages": [{"role": "user", "content": "Tell me a very long story."}]}
    body |= {"max_tokens": 5000, "stream": True}
    lines: list[str] = []
    try:
        wait_until_ready(live)
        url = f"{live.url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, headers=AUTH, timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) == 6:  # the role chunk and a few pieces: it is streaming
                    live.process.send_signal(signum)
        status = live.process.wait(timeout=60)
    finally:
        if live.process.poll() is None:
            live.process.kill()
    log = live.log.read_text(encoding="utf-8", errors="replace")
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert [line for line in lines if line][-1] == "data: [DONE]", lines[-4:]
    assert finish == ["stop"], finish
    assert len(events) < 100, len(events)  # ended by the signal, not by its 5000 pieces
    assert status == 128 + signum, log[-2000:]
    assert "Traceback" not in log and "CancelledError" not in log, log[-4000:]


# ----------------------------------------------------------------- fuzzing


def test_schemathesis_finds_no_server_error(server: LiveServer) -> None:
    """Cases generated from /openapi.json, valid and invalid, bounded in number and in
    pieces per reply: every answer is below 500."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    cases = st.one_of(*(schema.as_strategy(mode) for mode in modes))

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def no_server_error(case: Any) -> None:
        if isinstance(case.body, dict):  # keep replies short: the test is about answers
            for key in ("max_tokens", "max_completion_tokens", "max_bytes"):
                if isinstance(case.body.get(key), int) and case.body[key] > 4:
                    case.body[key] = 4
        response = case.call(base_url=server.url, headers=AUTH, timeout=120)
        assert response.status_code < 500, (case.as_curl_command(), response.text[:500])

    no_server_error()
