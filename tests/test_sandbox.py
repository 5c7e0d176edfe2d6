"""The sandbox that runs model-written code: limits, isolation, verdicts (fast tier)."""

from __future__ import annotations

import time
from pathlib import Path

from lvr_local.evaluation.sandbox import network_isolation, run_program

SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n\ncheck(add)\n"


def test_a_correct_solution_passes_and_a_wrong_one_fails() -> None:
    assert run_program(SOLUTION + TESTS).passed
    wrong = run_program(SOLUTION.replace("a + b", "a - b") + TESTS)
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.detail


def test_an_infinite_loop_is_stopped_within_the_time_limit() -> None:
    t0 = time.perf_counter()
    outcome = run_program("while True:\n    pass\n", timeout=1.5)
    assert not outcome.passed and outcome.status == "timeout"
    assert time.perf_counter() - t0 < 5


def test_a_sleeping_program_is_stopped_by_the_wall_clock() -> None:
    t0 = time.perf_counter()
    outcome = run_program("import time\ntime.sleep(60)\n", timeout=1)
    assert outcome.status == "timeout" and time.perf_counter() - t0 < 5


def test_unbounded_allocation_is_stopped() -> None:
    program = "blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))\n"
    t0 = time.perf_counter()
    outcome = run_program(program, timeout=10, memory=256 << 20)
    assert not outcome.passed and outcome.status == "memory"
    assert time.perf_counter() - t0 < 10


def test_writing_outside_its_directory_fails_and_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    for program in (
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)\n",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
        f"open('../{target.name}', 'w').write('x')\n",
    ):
        outcome = run_program(program + TESTS.replace("check(add)", ""))
        assert not outcome.passed and outcome.status == "blocked", (program, outcome)
    assert not target.exists()


def test_writing_inside_its_directory_is_allowed() -> None:
    program = "open('notes.txt', 'w').write('hi')\nassert open('notes.txt').read() == 'hi'\n"
    assert run_program(program).passed


def test_no_network_and_no_processes(tmp_path: Path) -> None:
    assert network_isolation() in ("namespace", "audit hook")
    net = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    assert not net.passed and net.status == "blocked"
    marker = tmp_path / "spawned"
    proc = run_program(f"import os\nos.system('touch {marker}')\n")
    sub = run_program(f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}])\n")
    assert proc.status == sub.status == "blocked" and not marker.exists()


def test_the_environment_is_empty() -> None:
    assert run_program("import os\nassert 'LVR_HOME' not in os.environ\n").passed
