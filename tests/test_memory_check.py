"""The memory estimate against what llama.cpp allocates, the refusal before loading, and
`lvr pair`, on the bundled models."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from lvr_local.cli import cli
from lvr_local.errors import LvrError
from lvr_local.llama import extra_buffers, native
from lvr_local.llama.backend import LlamaBackend
from lvr_local.llama.devices import Device, devices, gpu_devices
from lvr_local.llama.gguf_summary import summarize_gguf
from lvr_local.llama.memory_estimate import MemoryNeed, estimate_memory
from lvr_local.machine import available_memory
from lvr_local.runner.loading import N_SEQ_MAX
from lvr_local.runner.memory_check import (
    GPU,
    NO_GPU,
    NO_OFFLOAD,
    RPC,
    MemoryPlan,
    check_memory,
    place,
)
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


# ----------------------------------------------------------------- offloaded layers

GIB = 2**30


def made_up_need(share: float) -> MemoryNeed:
    """A 3 GiB model with 1 GiB of KV cache and a 300 MiB compute buffer."""
    return MemoryNeed(
        weights=3 * GIB, kv_cache=GIB, output=MIB, compute=300 * MIB, offload_share=share
    )


def test_the_offloaded_part_is_checked_against_the_gpus_free_memory() -> None:
    """Made-up figures: a 2 GiB GPU, since no GPU is at hand."""
    gpu = Device(name="CUDA0", description="Made-up GPU", kind="GPU", free=2 * GIB, total=4 * GIB)
    whole = place("big", 8192, made_up_need(1.0), rpc=False, has_gpu=True)
    assert whole.offload_to == GPU
    assert whole.gpu == 4 * GIB + 300 * MIB  # every layer and the compute buffer
    assert whole.host == MIB  # only the output buffer stays
    plan = MemoryPlan((whole,), available=16 * GIB, devices=(gpu,))
    assert plan.fits_host and not plan.fits_gpu and not plan.fits
    with pytest.raises(LvrError) as refused:
        check_memory(plan)
    message = str(refused.value)
    assert message.startswith("the offloaded layers need 4.3 GiB of GPU memory")
    assert "big at n_ctx 8192: 100% of its layers (4.0 GiB" in message
    assert "2.0 GiB free (CUDA0 (Made-up GPU) 2.0 GiB free)" in message
    assert "n_gpu_layers" in message and "lower n_ctx" in message and "RPC" in message

    quarter = place("big", 8192, made_up_need(0.25), rpc=False, has_gpu=True)
    assert quarter.gpu == GIB + 300 * MIB
    assert quarter.host == 3 * GIB + MIB + 300 * MIB  # the host keeps a compute buffer too
    check_memory(MemoryPlan((quarter,), available=16 * GIB, devices=(gpu,)))  # fits
    with pytest.raises(
        LvrError,
        match=r"need 3\.3 GiB of memory here .* 1\.3 GiB of it offloaded.*more layers to the GPU",
    ):
        check_memory(MemoryPlan((quarter,), available=3 * GIB, devices=(gpu,)))

    two = MemoryPlan((quarter, quarter), available=16 * GIB, devices=(gpu,))
    assert two.gpu == 2 * quarter.gpu and not two.fits_gpu  # together they do not fit
    roomier = replace(gpu, free=3 * GIB)
    assert MemoryPlan((quarter, quarter), 16 * GIB, (gpu, roomier)).fits  # two GPUs


def test_offloading_without_a_gpu_or_to_rpc_servers() -> None:
    here = place("big", 8192, made_up_need(1.0), rpc=False, has_gpu=False)
    assert here.offload_to == NO_GPU and here.host == here.need.total and here.gpu == 0
    plan = MemoryPlan((here,), available=4 * GIB)
    assert plan.fits_gpu and not plan.fits_host
    with pytest.raises(LvrError, match=r"rpc\): this llama\.cpp build has no GPU device"):
        check_memory(plan)

    remote = place("big", 8192, made_up_need(1.0), rpc=True, has_gpu=True)
    assert remote.offload_to == RPC and remote.rpc == remote.need.offloaded
    assert remote.gpu == 0 and remote.host == MIB
    check_memory(MemoryPlan((remote,), available=GIB))  # the servers check their own

    none = place("small", 512, made_up_need(0.0), rpc=False, has_gpu=True)
    assert none.offload_to == NO_OFFLOAD and none.host == none.need.total and none.gpu == 0


def test_llama_cpp_lists_its_devices() -> None:
    """The device registry through ctypes: the CPU device is always there."""
    found = devices()
    cpu = [d for d in found if d.kind == "CPU"]
    assert len(cpu) == 1 and cpu[0].total > 0 and 0 <= cpu[0].free <= cpu[0].total
    assert all(d.kind == "GPU" and d.total >= d.free for d in gpu_devices())


def test_pair_on_a_build_without_gpu_counts_offloaded_layers_here(
    tmp_path: Path, smollm2_path: Path, gemma_path: Path
) -> None:
    if gpu_devices():
        pytest.skip("this llama.cpp build has a GPU device")
    config = tmp_path / "models.toml"
    config.write_text(
        "[defaults]\nn_gpu_layers = -1\n"
        f'[[model]]\nname = "smol"\nsource = "{smollm2_path}"\n'
        f'[[model]]\nname = "gemma"\nsource = "{gemma_path}"\nn_gpu_layers = 0\n'
    )
    code, out = run("--config", str(config), "pair", "smol", "gemma", "--json")
    assert code == 0, out
    memory = json.loads(out)["memory"]
    smol, gemma = memory["members"]
    assert smol["offload_to"] == NO_GPU and gemma["offload_to"] == NO_OFFLOAD
    assert smol["host"] == smol["weights"] + smol["kv_cache"] + smol["buffers"]
    assert memory["gpu"] == 0 and memory["gpu_devices"] == []
    code, out = run("--config", str(config), "pair", "smol", "gemma")
    assert code == 0 and "found no GPU device: those layers are counted here, on the CPU" in out
    assert "none: no GPU" in out
