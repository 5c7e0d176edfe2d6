"""An lm-evaluation-harness model backed by one system of a loaded Runner.

lm-eval (PyPI `lm-eval`, the optional extra `lvr-local[lm-eval]`) asks a model three
kinds of question; each maps onto a call of `systems.py`, so a number here is the same
number `lvr eval` computes:

- `loglikelihood(context, continuation)`: the exact log-probability of the
  continuation, over bytes (the same for every tokenizer), and `is_greedy`: whether
  greedy decoding by the system, over its own pieces, begins with the continuation
  (`greedy_continues`: a real greedy run, cut at the first piece that leaves it);
- `loglikelihood_rolling(text)`: the text's total log-probability after the start of
  a document (BOS, or EOS for a model with none: lm-eval's prefix token), in one pass
  with no window, so lm-eval's word_perplexity, byte_perplexity and bits_per_byte
  come out;
- `generate_until(context, gen_kwargs)`: a continuation until one of `until`, greedy
  unless `do_sample`/`temperature` say otherwise. `max_gen_toks` is a budget in
  tokens; over a token vocabulary (a member alone, naive, mcv) a piece is a token or
  longer, so it is the piece budget as given, and over bytes (the `bytes` systems)
  a piece is a byte, so the budget is BYTES_PER_TOKEN pieces per token, the ratio
  RunSettings' own default budget assumes.

Chat templates: lm-eval renders a conversation to one string through
`apply_chat_template`, but the members of an ensemble each read a conversation in
their own format (a chat template, or a transcript for a base model). So the string
returned is the conversation itself, marked (CHAT_MARK + JSON), and every call that
receives it hands the messages to the runner, which formats them per member as `lvr
chat` does. A conversation that ends in an open assistant message (a task's
`gen_prefix`) is refused: lvr has no way to continue an assistant turn.

Each answer is also given to lm-eval's cache hook as soon as it is computed, so with
`use_cache` an interrupted run keeps what it did and a rerun continues from there.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

from lvr_local.core.chat import Message
from lvr_local.errors import LvrError
from lvr_local.evaluation.systems import (
    System,
    generate,
    greedy_continues,
    loglikelihood,
)
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings

CHAT_MARK = "\x1elvr-chat:"  # an ASCII record separator no task text begins with
BYTES_PER_TOKEN = 4
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for its local models

# request type, requests done, requests in all
Progress = Callable[[str, int, int], None]


def _no_progress(label: str, done: int, total: int) -> None:
    pass


class LvrLM(LM):
    """One system (a member alone, naive, mcv, bytes) of a loaded runner, as an lm-eval
    model. `settings`: the decoding settings every request starts from (greedy, the
    run's rule and pruning); `greedy_check` False reports is_greedy as False without
    computing it (half the cost of a multiple-choice task, whose metrics never read it)."""

    def __init__(
        self,
        runner: Runner,
        system: System,
        settings: RunSettings,
        *,
        greedy_check: bool = True,
        progress: Progress = _no_progress,
    ) -> None:
        super().__init__()
        self.runner = runner
        self.system = system
        self.settings = settings
        self.greedy_check = greedy_check
        self.progress = progress
        self.seconds: dict[str, list[float]] = {}  # request type -> each request's seconds

    # ----------------------------------------------------------------- the three calls

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        def one(context: str, continuation: str) -> tuple[float, bool]:
            messages = parse_chat(context)
            logp = loglikelihood(
                self.runner, self.system, context, continuation, self.settings, messages
            )
            greedy = (
                self.greedy_check
                and logp > -math.inf
                and greedy_continues(
                    self.runner, self.system, context, continuation, self.settings, messages
                )
            )
            return logp, bool(greedy)

        return self._each("loglikelihood", requests, one)

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        def one(text: str) -> float:
            return loglikelihood(self.runner, self.system, "", text, self.settings)

        return self._each("loglikelihood_rolling", requests, one)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        def one(context: str, gen_kwargs: dict[str, Any]) -> str:
            settings = self.generation_settings(gen_kwargs)
            messages = parse_chat(context)
            return generate(self.runner, self.system, context, settings, messages).text

        return self._each("generate_until", requests, one)

    def _each(self, kind: str, requests: list[Instance], one: Callable[..., Any]) -> list[Any]:
        """Answer the requests in order, reporting progress and caching each answer."""
        answers: list[Any] = []
        self.progress(f"{self.system.name} {kind}", 0, len(requests))
        for n, request in enumerate(requests, 1):
            t0 = time.perf_counter()
            answer = one(*request.args)
            self.seconds.setdefault(kind, []).append(time.perf_counter() - t0)
            self.cache_hook.add_partial(kind, request.args, answer)
            answers.append(answer)
            self.progress(f"{self.system.name} {kind}", n, len(requests))
        return answers

    def generation_settings(self, gen_kwargs: dict[str, Any]) -> RunSettings:
        """lm-eval's generation arguments as run settings (see the module docstring)."""
        until = gen_kwargs.get("until") or ()
        stops = (until,) if isinstance(until, str) else tuple(until)
        tokens = int(gen_kwargs.get("max_gen_toks") or DEFAULT_MAX_GEN_TOKS)
        over_bytes = self.system.settings(self.settings).sub_vocab == "bytes"
        pieces = tokens * BYTES_PER_TOKEN if over_bytes else tokens
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if not gen_kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        changed: dict[str, Any] = {
            "stop": tuple(dict.fromkeys((*stops, *self.settings.stop))),
            "max_pieces": pieces,
            "temperature": temperature,
        }
        for key in ("top_k", "top_p", "min_p", "seed"):
            if gen_kwargs.get(key) is not None:
                changed[key] = gen_kwargs[key]
        return replace(self.settings, **changed)

    # ----------------------------------------------------------------- chat templates

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation itself, marked, for the calls to format per member."""
        if not add_generation_prompt:
            raise LvrError(
                "this task continues an open assistant message (its gen_prefix), which lvr "
                "cannot do with chat templates: run it without --apply_chat_template"
            )
        messages = [{"role": m["role"], "content": m["content"]} for m in chat_history]
        return CHAT_MARK + json.dumps(messages, ensure_ascii=False)

    @property
    def tokenizer_name(self) -> str:
        """What lm-eval's request cache keys chat prompts by: the members and system."""
        members = zip(self.runner.members, self.system.enabled, strict=True)
        return f"lvr-{self.system.name}-" + "+".join(m.name for m, on in members if on)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "each member's own format (a chat template, or a transcript for a base model)"

    def get_model_info(self) -> dict[str, Any]:
        return {
            "lvr_system": self.system.name,
            "lvr_models": [m.name for m in self.runner.members],
        }


def parse_chat(context: str) -> Sequence[Message] | None:
    """The conversation `apply_chat_template` marked in a context, or None for raw text."""
    if not context.startswith(CHAT_MARK):
        return None
    return [Message(m["role"], m["content"]) for m in json.loads(context[len(CHAT_MARK) :])]
