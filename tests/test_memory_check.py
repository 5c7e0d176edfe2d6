"""The memory estimate against what llama.cpp allocates, the refusal before loading, and
`lvr pair`, on the bundled models."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from lvr_local.cli import cli
from lvr_local.llama import extra_buffers, native
from lvr_local.llama.backend import LlamaBackend
from lvr_local.llama.gguf_summary import summarize_gguf
from lvr_local.llama.memory_estimate import estimate_memory
from lvr_local.machine import available_memory
from lvr_local.runner.loading import N_SEQ_MAX
from lvr_local.runner.settings import MAX_CTX

MIB = 2**20


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def llama_log() -> Path:
    """The llama.cpp log this process writes (opened once, in the first test's home)."""
    native.ensure_backend()
    assert native._log is not None
    return Path(native._log.name)


def logged_after(start: int) -> str:
    with llama_log().open("rb") as f:
        f.seek(start)
        return f.read().decode("utf-8", errors="replace")


def logged_mib(text: str, what: str) -> float:
    """The sum of llama.log's "<what> buffer size = X MiB" lines."""
    return sum(float(x) for x in re.findall(rf"{what} buffer size =\s+([\d.]+) MiB", text))


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_the_estimate_matches_what_llama_cpp_allocates(
    model: str, bundled_paths: dict[str, Path]
) -> None:
    path = bundled_paths[model]
    n_ctx = 1000  # padded to 1024 cells, as llama.cpp pads it
    extra_buffers.verdict(path)  # the first load on a machine probes in a child: not here
    start = llama_log().stat().st_size
    with LlamaBackend(path, n_ctx=n_ctx, n_seq_max=N_SEQ_MAX, n_threads=1):
        logged = logged_after(start)
    need = estimate_memory(summarize_gguf(path), n_ctx=n_ctx, n_seq_max=N_SEQ_MAX + 1)
    assert need.weights / MIB == pytest.approx(logged_mib(logged, "CPU_Mapped model"), abs=0.01)
    assert need.kv_cache / MIB == pytest.approx(logged_mib(logged, "KV"), abs=0.01)
    buffers = logged_mib(logged, "output") + logged_mib(logged, "CPU compute")
    assert 0 <= need.buffers / MIB - buffers < 4  # compute: an upper estimate, within 4 MiB


def test_models_that_cannot_fit_are_refused_before_loading(
    tmp_path: Path, smollm2_path: Path
) -> None:
    """Copies of SmolLM2 at the largest n_ctx, enough of them to exceed free memory."""
    available = available_memory()
    if available is None:
        pytest.skip("no /proc/meminfo: available memory unknown")
    per_model = estimate_memory(summarize_gguf(smollm2_path), n_ctx=MAX_CTX, n_seq_max=65).host
    copies = math.ceil(available / per_model) + 1
    tables = "".join(
        f'[[model]]\nname = "smol{i}"\nsource = "{smollm2_path}"\n' for i in range(copies)
    )
    config = tmp_path / "models.toml"
    config.write_text(f"[defaults]\nn_ctx = {MAX_CTX}\n{tables}")
    start = llama_log().stat().st_size
    code, out = run("--config", str(config), "generate", "--raw", "--max-pieces", "2", "Hi")
    assert code == 1
    assert out.startswith("Error: the models need ") and out.count("\n") == 1
    assert f"smol0 at n_ctx {MAX_CTX}" in out and "lower n_ctx" in out and "available" in out
    assert "load_tensors" not in logged_after(start)  # no model was loaded


def test_pair_reports_vocabulary_tokenizers_and_memory(smollm2_path: Path) -> None:
    code, out = run("pair", "smollm2-135m", "gemma3-270m", "--json")
    assert code == 0, out
    report = json.loads(out)
    code, out = run("common", "smollm2-135m", "gemma3-270m", "--json")
    common = json.loads(out)
    assert report["n_pieces"] == common["n_pieces"] > 0
    assert [m["coverage"] for m in report["models"]] == [m["coverage"] for m in common["models"]]
    assert report["tokenizers"] == {"smollm2-135m": "gpt2/smollm", "gemma3-270m": "llama/default"}
    assert "cut text into tokens differently" in report["warning"]
    memory = report["memory"]
    smol = memory["members"][0]
    assert smol["n_ctx"] == 4096
    assert smol["kv_cache"] == 4096 * 30 * 3 * (64 + 64) * 2  # cells x layers x heads x dims
    assert memory["host"] == sum(m["host"] for m in memory["members"])
    assert memory["fits"] is (memory["host"] <= memory["available"])

    code, out = run("pair", "smollm2-135m", "smollm2-135m")  # one tokenizer: no warning
    assert code == 0 and "common vocabulary: 49," in out and "warning" not in out
    code, out = run("pair", "smollm2-135m")
    assert code == 2 and "at least two" in out


def test_pair_says_when_they_cannot_fit(smollm2_path: Path) -> None:
    code, out = run("pair", "smollm2-135m", "gemma3-270m", "--n-ctx", str(MAX_CTX))
    available = available_memory()
    if available is None or available > 42 * 2**30:
        pytest.skip("this machine has room for both at the largest n_ctx")
    assert code == 1
    assert "does NOT fit" in out and "Error: the models need" in out
