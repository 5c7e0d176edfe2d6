"""A bug is not the user's mistake: an InternalError (a broken contract inside lvr-local)
gets a 500 with a request id from the server and one line naming the error log from the
CLI, the traceback kept where that answer points."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from lvr_local.benchmarks.common import free_port
from lvr_local.cli import cli, run_cli
from lvr_local.errors import InternalError, LvrError
from lvr_local.runner.config import ModelSpec
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings
from lvr_local.server.errors import install_error_handlers
from lvr_local.server.worker import Failed, GenerationWorker

REQUEST_ID = re.compile(r"request id ([0-9a-f]{12})")


def broken_contract() -> None:
    raise InternalError("a state can only be handed over when synchronised")


def test_an_internal_error_is_not_a_user_error() -> None:
    """Every front end answers LvrError as the user's mistake: a bug must not be one."""
    assert not issubclass(InternalError, LvrError)


@pytest.fixture
def failing_command() -> Iterator[str]:
    """A command that breaks a contract, added to `lvr` for the test."""

    @click.command("break-a-contract")
    def command() -> None:
        broken_contract()

    cli.add_command(command)
    try:
        yield "break-a-contract"
    finally:
        cli.commands.pop("break-a-contract")


def test_the_cli_prints_one_line_naming_the_log_with_the_traceback(
    failing_command: str, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli([failing_command]) == 1
    out, err = capsys.readouterr()
    log = isolated_home / "errors.log"
    assert err.count("\n") == 1 and "Traceback" not in err and out == ""
    assert err.startswith("Error: internal error (InternalError: a state can only be handed")
    assert str(log) in err
    text = log.read_text()
    assert "Traceback" in text and "in broken_contract" in text
    assert f"lvr {failing_command}" in text


def test_a_user_error_is_still_one_line_without_a_log(
    isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["generate", "x", "-m", str(isolated_home / "missing.gguf")]) == 1
    err = capsys.readouterr().err
    assert "Error: model file not found" in err and "internal error" not in err
    assert not (isolated_home / "errors.log").exists()


def test_the_server_answers_500_with_a_request_id_that_the_log_holds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server's error handlers on a real uvicorn server, asked with a real client."""
    app = FastAPI()
    install_error_handlers(app)
    app.add_api_route("/v1/break", broken_contract)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        with caplog.at_level(logging.ERROR, logger="lvr_local.server"):
            answer = httpx.get(f"http://127.0.0.1:{port}/v1/break", timeout=30)
    finally:
        server.should_exit = True
        thread.join()
    assert answer.status_code == 500
    error = answer.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    found = REQUEST_ID.search(error["message"])
    assert found and answer.headers["x-request-id"] == found[1]
    (record,) = [r for r in caplog.records if found[1] in r.getMessage()]
    assert record.exc_info and record.exc_info[0] is InternalError


def test_a_generation_that_breaks_a_contract_fails_with_500_and_a_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker thread's answer to a bug in a generation (the runner is not used)."""

    def work(runner: Runner, cancelled: threading.Event) -> Iterator[str]:
        yield "a piece"
        broken_contract()

    async def items() -> list[object]:
        worker = GenerationWorker(Runner([ModelSpec("unused", "unused.gguf")], RunSettings()), 0)
        worker.start()
        try:
            job = worker.submit(work)
            return [await job.next(), await job.next()]
        finally:
            worker.close()

    with caplog.at_level(logging.ERROR, logger="lvr_local.server"):
        first, failed = asyncio.run(items())
    assert first == "a piece" and isinstance(failed, Failed) and failed.status == 500
    found = REQUEST_ID.search(failed.message)
    assert found and "InternalError" in failed.message
    (record,) = [r for r in caplog.records if found[1] in r.getMessage()]
    assert record.exc_info and record.exc_info[0] is InternalError
