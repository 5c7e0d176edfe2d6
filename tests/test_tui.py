"""The chat TUI, driven headless through Textual's pilot on the real bundled models.

Replies are kept to a few pieces so the file runs in well under two minutes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from disks import small_disk
from lvr_tui.app import LvrApp
from lvr_tui.chat_screen import ChatScreen
from lvr_tui.conversations_screen import ConversationsScreen
from lvr_tui.settings_screen import SettingsScreen
from lvr_tui.transcript import ConversationLog, conversations_dir, read_conversation
from lvr_tui.widgets import AssistantMessage, AttributionView, ModelCard, PromptBox, UserMessage
from textual.pilot import Pilot
from textual.widgets import Button, Input, Markdown, OptionList, Select

SIZE = (80, 24)
pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def notifications(app: LvrApp) -> list[str]:
    """Record every notification the app shows (its public `notify`, wrapped)."""
    seen: list[str] = []
    shown = app.notify

    def notify(message: str, *args: object, **kwargs: object) -> None:
        seen.append(str(message))
        shown(message, *args, **kwargs)  # type: ignore[arg-type]

    app.notify = notify  # type: ignore[method-assign]
    return seen


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Textual runs on asyncio


@pytest.fixture
def config_file(tmp_path: Path, smollm2_path: Path, gemma_path: Path) -> Path:
    """models.toml naming the two bundled models by path, with a small context (Gemma,
    a base model, reads the conversation as a transcript)."""
    path = tmp_path / "models.toml"
    path.write_text(
        "[defaults]\nn_ctx = 1024\n\n"
        f'[[model]]\nname = "smollm2-135m"\nsource = "{smollm2_path}"\n\n'
        f'[[model]]\nname = "gemma3-270m"\nsource = "{gemma_path}"\n',
        encoding="utf-8",
    )
    return path


async def wait_until(pilot: Pilot, condition: Callable[[], bool], timeout: float = 60) -> None:
    waited = 0.0
    while not condition():
        assert waited < timeout, "timed out waiting for the app"
        await pilot.pause(0.05)
        waited += 0.05


def chat(app: LvrApp) -> ChatScreen:
    assert isinstance(app.screen, ChatScreen)
    return app.screen


async def wait_loaded(pilot: Pilot, app: LvrApp) -> None:
    await wait_until(
        pilot,
        lambda: (
            app.runner is not None
            and app.runner.loaded
            and not chat(app).busy
            and len(chat(app).query(ModelCard)) == 2
        ),
    )
    await pilot.pause(0.1)  # let the cards lay out


async def send(pilot: Pilot, app: LvrApp, text: str) -> AssistantMessage:
    """Type `text` into the prompt box, press Enter, and wait for the reply to finish."""
    chat(app).query_one(PromptBox).focus()
    await pilot.press(*text)
    await pilot.press("enter")
    await wait_until(pilot, lambda: chat(app).reply is None)
    await pilot.pause(0.1)
    return chat(app).query(AssistantMessage).last()


def transcript_records() -> list[dict]:
    files = sorted(conversations_dir().glob("*.jsonl"))
    assert len(files) == 1
    return [json.loads(line) for line in files[0].read_text(encoding="utf-8").splitlines()]


async def test_reply_streams_into_the_conversation_and_is_saved(config_file: Path) -> None:
    app = LvrApp(config_file, max_pieces=8)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot, app)
        reply = await send(pilot, app, "Say hello.")
        assert reply.text.strip()
        assert 1 <= len(reply.events) <= 8
        assert reply.query_one(Markdown).source == reply.text
        assert "Say hello." in str(chat(app).query_one(UserMessage).render())
        figures = str(chat(app).query_one("#figures").render())
        assert "pieces/s" in figures and "fwd" in figures
        assert len(re.findall(r" w [01]\.\d\d", figures)) == 2  # each model's weight now
    records = transcript_records()
    assert records[0]["type"] == "conversation"
    messages = [r for r in records if r["type"] == "message"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "Say hello."),
        ("assistant", reply.text),
    ]
    pieces = "".join(r["text"] for r in records if r["type"] == "piece")
    assert pieces == reply.text


async def test_a_new_weight_reaches_the_next_replys_piece_events(config_file: Path) -> None:
    app = LvrApp(config_file, max_pieces=6)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot, app)
        first = await send(pilot, app, "Hi")
        assert {e.weights for e in first.events} == {(1.0, 1.0)}
        weight = chat(app).query_one("#model-0 .weight", Input)
        weight.focus()
        weight.value = ""
        await pilot.press("0", ".", "2", "5")
        second = await send(pilot, app, "Again")
        assert second.events
        assert {e.weights for e in second.events} == {(0.25, 1.0)}
    assert transcript_records()[-1]["weights"] == [0.25, 1.0]


async def test_escape_stops_the_generation_and_keeps_the_partial_reply(
    config_file: Path,
) -> None:
    app = LvrApp(config_file, max_pieces=400)
    # One byte per piece: the reply is still being written when Esc comes.
    app.settings = replace(app.settings, sub_vocab="bytes", temperature=0.0)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot, app)
        chat(app).query_one(PromptBox).focus()
        await pilot.press(*"Write a long story about a lighthouse keeper.")  # a long reply
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(chat(app).query(AssistantMessage).last().events) >= 3)
        await pilot.press("escape")
        await wait_until(pilot, lambda: chat(app).reply is None, timeout=10)
        reply = chat(app).query(AssistantMessage).last()
        assert 3 <= len(reply.events) < 400
        assert "[stopped]" in str(reply.query_one(".status").render())
    saved = transcript_records()[-1]
    assert saved["role"] == "assistant" and saved["stop_reason"] == "stopped"
    assert saved["content"] == reply.text and reply.text


async def test_attribution_view_shows_each_models_probability(config_file: Path) -> None:
    app = LvrApp(config_file, max_pieces=6)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot, app)
        reply = await send(pilot, app, "Hello")
        view = reply.query_one(AttributionView)
        assert not view.display or not chat(app).has_class("-attribution")
        await pilot.press("ctrl+t")
        await pilot.pause(0.1)
        assert chat(app).has_class("-attribution")
        assert view.visible and view.pieces
        detail = str(chat(app).query_one("#detail").render())
        assert "smollm2-135m" in detail and "gemma3-270m" in detail and "%" in detail
        last = view.pieces[-1]
        assert f"{100 * last.member_probs[1]:.1f}%" in detail
        if len(view.pieces) > 1:
            await pilot.press("left")
            assert view.selected == len(view.pieces) - 2
        await pilot.press("ctrl+t")
        assert not chat(app).has_class("-attribution")


async def test_main_screen_layout_at_80x24(config_file: Path, tmp_path: Path) -> None:
    app = LvrApp(config_file, max_pieces=4)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot, app)
        screen = chat(app)
        assert "bytes (" in app.sub_title and "lossless product" in app.sub_title
        for selector in ("Header", "#conversation", "#prompt", "#panel", "Footer"):
            region = screen.query_one(selector).region
            assert region.width > 0 and region.height > 0, selector
            assert region.right <= 80 and region.bottom <= 24, selector
        cards = screen.query(ModelCard)
        assert [c.info.name for c in cards] == ["smollm2-135m", "gemma3-270m"]
        for card in cards:
            assert card.query_one(".weight").region.width >= 4
            assert card.query_one(".enabled").region.width >= 2
        svg = Path(app.save_screenshot(path=str(tmp_path), filename="main.svg")).read_text()
    text = svg.replace("&#160;", " ")
    for label in (
        "lvr-local",
        "lossless product",
        "smollm2-135m",
        "gemma3-270m",
        "gpt2",
        "262,144 tokens",
        "weight",
        "Stop",
        "New",
        "Attribution",
        "Settings",
    ):
        assert label in text, label


async def test_settings_modal_rebuilds_and_rejects_bad_values(config_file: Path) -> None:
    app = LvrApp(config_file, max_pieces=4)
    seen = notifications(app)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot, app)
        await pilot.press("ctrl+s")
        settings = app.screen
        assert isinstance(settings, SettingsScreen)
        await pilot.pause(0.1)
        for widget in [*settings.query(Input), *settings.query(Select), *settings.query(Button)]:
            region = widget.region  # every field of the form is on the 80x24 screen
            assert region.height > 0 and region.bottom <= 24 and region.right <= 80, widget.id
        assert settings.query_one("#temperature", Input).value == "0.8"  # the chat profile
        settings.query_one("#prune", Input).value = "2"
        settings.query_one("#apply", Button).press()
        await pilot.pause(0.1)
        assert app.screen is settings
        assert any("prune" in n for n in seen)
        settings.query_one("#prune", Input).value = "1e-4"
        settings.query_one("#sub_vocab", Input).value = "nonsense"
        settings.query_one("#apply", Button).press()
        await pilot.pause(0.1)
        assert app.screen is settings  # stays open, says why
        assert any("sub_vocab" in n for n in seen)
        settings.query_one("#sub_vocab", Input).value = "mcv"
        settings.query_one("#combine", Select).value = "mean"
        settings.query_one("#sample_on", Select).value = "pieces"
        settings.query_one("#max_pieces", Input).value = "3"
        settings.query_one("#min_p", Input).value = "0.05"
        settings.query_one("#prune", Input).value = "1e-3"
        settings.query_one("#dry_multiplier", Input).value = "0.8"
        settings.query_one("#calibrate", Select).value = "false"
        settings.query_one("#apply", Button).press()  # a toast may cover it: no click
        await wait_until(pilot, lambda: "lossless mean" in app.sub_title)
        assert app.sub_title.startswith("mcv") and app.settings.sample_on == "pieces"
        assert app.settings.max_pieces == 3 and app.settings.min_p == 0.05
        assert app.settings.dry_multiplier == 0.8 and app.settings.calibrate is False
        assert app.runner is not None and app.runner.ensemble.options.prune == 1e-3
        reply = await send(pilot, app, "Hi")
        assert 1 <= len(reply.events) <= 3


async def test_saved_conversation_reopens_from_the_list(config_file: Path) -> None:
    app = LvrApp(config_file, max_pieces=4)
    async with app.run_test(size=SIZE) as pilot:
        await wait_loaded(pilot, app)
        reply = await send(pilot, app, "Hello there")
        await pilot.press("ctrl+n")
        await pilot.pause(0.1)
        assert not chat(app).query(AssistantMessage)
        await pilot.press("ctrl+o")
        assert isinstance(app.screen, ConversationsScreen)
        assert app.screen.query_one(OptionList).option_count == 1
        await pilot.press("enter")
        await wait_until(pilot, lambda: bool(chat(app).query(AssistantMessage)))
        reopened = chat(app).query(AssistantMessage).last()
        assert reopened.text == reply.text
        assert [m.role for m in chat(app).history] == ["user", "assistant"]
        await send(pilot, app, "More")  # appended to the same file
    convo = read_conversation(next(conversations_dir().glob("*.jsonl")))
    assert [m.role for m in convo.messages] == ["user", "assistant", "user", "assistant"]


def test_a_torn_transcript_keeps_the_partial_reply(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    lines = [
        {"type": "conversation", "created": "2025-01-01T00:00:00", "settings": {}},
        {"type": "message", "role": "user", "content": "hi"},
        {"type": "piece", "text": "Hel", "dominant": 0, "member_probs": [0.5, 0.1], "prob": 0.3},
        {"type": "piece", "text": "lo", "dominant": 1, "member_probs": [0.2, 0.9], "prob": 0.6},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "pie', "utf-8")
    convo = read_conversation(path)
    assert [(m.role, m.content) for m in convo.messages] == [("user", "hi"), ("assistant", "Hello")]
    assert convo.messages[1].pieces[1].dominant == 1
    # Reopened and continued: the next record does not join the torn line.
    log = ConversationLog(path)
    log.message("user", "again")
    log.close()
    again = read_conversation(path)
    assert [m.content for m in again.messages if m.role == "user"] == ["hi", "again"]


async def test_a_bad_config_is_a_notification_not_a_crash(tmp_path: Path) -> None:
    app = LvrApp(tmp_path / "missing.toml")
    seen = notifications(app)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.1)
        assert any("config file not found" in n for n in seen)
        chat(app).query_one(PromptBox).focus()
        await pilot.press("h", "i", "enter")
        assert any("no models" in n for n in seen)


async def test_models_that_fail_to_load_are_named_at_every_message(tmp_path: Path) -> None:
    """The config reads, but a model cannot be loaded: a message sent after the error
    was shown says so, instead of 'the models are still loading' for ever."""
    config = tmp_path / "models.toml"
    config.write_text(f'[[model]]\nname = "gone"\nsource = "{tmp_path / "gone.gguf"}"\n')
    app = LvrApp(config)
    seen = notifications(app)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: any("not found" in n for n in seen))
        chat(app).query_one(PromptBox).focus()
        await pilot.press("h", "i", "enter")
        await pilot.pause(0.1)
        assert "could not be loaded" in seen[-1] and "not found" in seen[-1], seen
        assert not any("still loading" in n for n in seen), seen


async def test_a_conversation_that_cannot_be_saved_goes_on_and_says_so(
    config_file: Path, isolated_home: Path, tmp_path: Path
) -> None:
    """The conversations folder is on a read-only filesystem (a real tmpfs): the first
    message used to crash the app. Now the reply comes, and one warning says why the
    conversation is not saved."""
    with small_disk(isolated_home / "conversations", read_only=True):
        app = LvrApp(config_file, max_pieces=3)
        seen = notifications(app)
        async with app.run_test(size=SIZE) as pilot:
            await wait_loaded(pilot, app)
            first = await send(pilot, app, "Hi")
            second = await send(pilot, app, "Again")
            assert first.text and second.text
            warnings = [n for n in seen if "cannot save this conversation" in n]
            assert len(warnings) == 1 and "Read-only file system" in warnings[0], seen
