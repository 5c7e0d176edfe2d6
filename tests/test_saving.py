"""Nothing a user saved is lost: files are replaced whole or not at all (lvr_local/atomic.py),
`lvr chat`'s /save never replaces a file the conversation did not write, and `lvr eval`'s
folder survives a full disk and a damaged run.json.

The full-disk cases are real: a small tmpfs is mounted for the test, the real command runs
as its own process, and the disk fills while it works.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from disks import fill, small_disk

from lvr_local.atomic import write_atomic
from lvr_local.cli import cli
from lvr_local.errors import LvrError
from lvr_local.evaluation.results import ResultLog

EXAMPLES = Path(__file__).resolve().parents[1] / "lvr_local" / "evaluation" / "examples"


# ----------------------------------------------------------------- the helper


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", size="64k") as disk:
        target = disk / "saved.json"
        write_atomic(target, "[1, 2, 3]\n")
        assert target.read_text() == "[1, 2, 3]\n"
        with pytest.raises(OSError) as raised:
            write_atomic(target, "x" * 200_000)  # larger than the whole disk
        assert raised.value.errno == errno.ENOSPC
        assert target.read_text() == "[1, 2, 3]\n"
        assert sorted(p.name for p in disk.iterdir()) == ["saved.json"]
        write_atomic(target, "[4]\n")
        assert target.read_text() == "[4]\n"


# ----------------------------------------------------------------- lvr chat /save


class Chat:
    """`lvr chat` as its own process, fed line by line; its stderr read as it comes."""

    def __init__(self, *args: str) -> None:
        command = [sys.executable, "-m", "lvr_local", "chat", "-m", "smollm2-135m", *args]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)

    def say(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def wait_for(self, marker: str, timeout_s: float = 180) -> str:
        """The first stderr line from now on that holds `marker`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.process.poll() is None, "".join(self.seen)
                continue
            self.seen.append(line)
            if marker in line:
                return line
        raise AssertionError(f"no {marker!r} in: {''.join(self.seen)}")

    def quit(self) -> str:
        self.say("/quit")
        self.process.wait(timeout=60)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)


def test_a_save_onto_a_full_disk_keeps_the_conversation_saved_before(
    smollm2_path: Path, tmp_path: Path
) -> None:
    """The reported loss: a save that runs out of space left the earlier conversation as
    4,096 bytes of invalid JSON. Now the earlier file stays whole, and the user is told."""
    with small_disk(tmp_path / "disk", size="64k") as disk:
        saved = disk / "conversation.json"
        chat = Chat("--max-pieces", "2", "--greedy")
        try:
            chat.say("Hi!")
            chat.say(f"/save {saved}")
            chat.wait_for("[saved 2 messages")
            before = saved.read_text()
            fill(disk)
            chat.say("word " * 1000)  # the next save needs more than the space freed
            chat.say(f"/save {saved}")
            refused = chat.wait_for("cannot save")
        finally:
            output = chat.quit()
        assert "No space left on device" in refused and "is unchanged" in refused, output
        assert saved.read_text() == before
        assert [m["role"] for m in json.loads(before)] == ["user", "assistant"]
        assert not [p for p in disk.iterdir() if p.name.endswith(".tmp")]
        assert chat.process.returncode == 0 and "Traceback" not in output, output


def test_save_replaces_only_the_files_this_conversation_wrote(
    smollm2_path: Path, tmp_path: Path
) -> None:
    unrelated, saved = tmp_path / "notes.json", tmp_path / "chat.json"
    unrelated.write_text("my notes\n")
    turns = [
        f"/save {unrelated}",  # not this conversation's: refused
        "Hi!",
        f"/save {saved}",
        "/reset",  # a new conversation: the file is no longer its own
        f"/save {saved}",
        "/weights -1 0",  # refused when set, not at every turn after
        "Hello?",
        f"/save {saved} --force",
        "/quit",
    ]
    result = CliRunner().invoke(
        cli,
        ["chat", "-m", "smollm2-135m", "-m", "gemma3-270m", "--max-pieces", "2", "--greedy"],
        input="\n".join(turns) + "\n",
    )
    assert result.exit_code == 0, result.output
    assert unrelated.read_text() == "my notes\n"
    assert f"not saved: {unrelated} exists and this conversation did not write it" in (
        result.output
    )
    assert result.output.count("exists and this conversation did not write it") == 2
    assert "needs at least one positive weight; weights unchanged" in result.output
    messages = json.loads(saved.read_text())  # the forced save: the conversation after /reset
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hello?"]
    assert messages[1]["role"] == "assistant"


# ----------------------------------------------------------------- lvr eval's folder


def test_a_damaged_run_json_is_rebuilt_or_refused_in_one_line(tmp_path: Path) -> None:
    """A kill used to leave run.json empty, and the next run died on a JSONDecodeError."""
    (tmp_path / "run.json").write_text("")
    ResultLog(tmp_path, {"seed": 0}).close()  # no result depends on it: rebuilt
    assert json.loads((tmp_path / "run.json").read_text()) == {"seed": 0}
    log = ResultLog(tmp_path, {"seed": 0})
    log.append({"system": "mcv", "view": "task", "id": "1", "metrics": {}})
    log.close()
    (tmp_path / "run.json").write_text('{"seed": ')
    with pytest.raises(LvrError, match=r"run\.json is damaged"):
        ResultLog(tmp_path, {"seed": 0})
    result = CliRunner().invoke(
        cli, ["eval", str(EXAMPLES / "gsm8k.toml"), "--output", str(tmp_path)]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "run.json is damaged" in result.output


def test_a_refused_rerun_names_each_setting_and_both_values(tmp_path: Path) -> None:
    ResultLog(tmp_path, {"seed": 0, "settings": {"temperature": 0.0, "top_k": 0}}).close()
    with pytest.raises(LvrError) as refused:
        ResultLog(tmp_path, {"seed": 0, "settings": {"temperature": 0.7, "top_k": 0}})
    assert "settings.temperature: 0.0 there, 0.7 now" in str(refused.value)
    assert "top_k" not in str(refused.value)


def test_eval_into_a_read_only_folder_is_one_error_line(tmp_path: Path) -> None:
    with small_disk(tmp_path / "ro", read_only=True) as folder:
        result = CliRunner().invoke(
            cli, ["eval", str(EXAMPLES / "gsm8k.toml"), "--output", str(folder)]
        )
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.startswith("Error: cannot write ") and "Read-only" in result.output


def test_eval_on_a_disk_that_fills_keeps_its_items_and_resumes(
    smollm2_path: Path, tmp_path: Path
) -> None:
    """The disk fills while `lvr eval` runs (a real process): one Error: line, exit 1,
    the items written so far intact; once there is space, a rerun completes them."""
    with small_disk(tmp_path / "disk", size="256k") as disk:
        out = disk / "gsm"
        args = ["eval", str(EXAMPLES / "gsm8k.toml"), "--systems", "smollm2-135m"]
        args += ["-m", "smollm2-135m", "--max-pieces", "16", "--output", str(out)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "lvr_local", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        items = out / "items.jsonl"
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not (items.exists() and items.read_text()):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        fill(disk)
        _, err = proc.communicate(timeout=900)  # generous: a loaded machine is slow
        kept = whole_records(items)
        (disk / "filler").unlink()
        assert proc.returncode == 1 and "Traceback" not in err, err
        error_lines = [line for line in err.splitlines() if line.startswith("Error: ")]
        assert len(error_lines) == 1 and "No space left on device" in error_lines[0], err
        assert 1 <= len(kept) < 6
        done = subprocess.run(
            [sys.executable, "-m", "lvr_local", *args, "--json"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr
        after = whole_records(items)
        assert after[: len(kept)] == kept and len({r["id"] for r in after}) == 6


def whole_records(items: Path) -> list[dict]:
    """The log's records. At most one line is torn: the write the disk cut short (the
    rerun ends it and redoes that item)."""
    records, torn = [], 0
    for line in items.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    assert torn <= 1, items.read_text()
    return records


def test_the_summary_is_not_written_in_place(tmp_path: Path) -> None:
    """summary.json is replaced whole, each run: a hard link to the old file keeps the
    old content (an in-place write would change it under both names)."""
    log = ResultLog(tmp_path, {"seed": 0})
    log.write_summary({"items": 1})
    os.link(tmp_path / "summary.json", tmp_path / "old-summary.json")
    log.write_summary({"items": 2})
    log.close()
    assert json.loads((tmp_path / "old-summary.json").read_text()) == {"items": 1}
    assert json.loads((tmp_path / "summary.json").read_text()) == {"items": 2}
