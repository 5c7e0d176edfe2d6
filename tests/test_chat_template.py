"""Chat templates: llama.cpp's built-in ones, named, format a conversation."""

from __future__ import annotations

import pytest

from lvr_local.errors import LvrError
from lvr_local.llama.chat_template import Message, builtin_templates, format_chat


def test_builtin_templates_format_a_conversation_and_refuse_what_they_cannot() -> None:
    messages = [Message("system", "Be brief."), Message("user", "Hi")]
    chatml = format_chat("chatml", messages, model="m")
    assert chatml.endswith("<|im_start|>assistant\n") and "Be brief." in chatml
    gemma = format_chat("gemma", messages, model="g")
    assert gemma.endswith("<start_of_turn>model\n")
    assert "gemma" in builtin_templates()
    with pytest.raises(LvrError, match="has no chat template"):
        format_chat(None, messages, model="base")
    with pytest.raises(LvrError, match="unknown chat role"):
        format_chat("chatml", [Message("robot", "x")], model="m")
