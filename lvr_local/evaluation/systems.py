"""The systems an evaluation compares, all built from one loaded Runner.

The paper's table has three kinds of row: each model alone, the naive restriction to
the shared vocabulary, and the lossless ensemble. Here a system is a way to use the
runner's loaded members, never a second copy of a model:

- `NAME` (a member's name): that member alone (the others switched off), through the
  lossless reduction, which is that model's own distribution, spelled in pieces;
- `naive`, `naive:RULE`: every member, each restricted naively to the common pieces;
- `mcv`, `mcv:RULE`: the lossless ensemble over the maximal common vocabulary;
- `bytes`, `bytes:RULE`: the lossless ensemble over bytes.

Without `:RULE` a system combines by the run's rule (`--combine`, default mean for
tasks). The two public calls, `generate` (a continuation until a stop string) and
`loglikelihood` (exact log P(continuation | context), the same for every tokenizer),
are what an lm-evaluation-harness adapter would wrap: its `generate_until` and
`loglikelihood`, and `loglikelihood_rolling` as `loglikelihood` with an empty context.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from lvr_local.core.chat import Message
from lvr_local.core.combine import RULES
from lvr_local.errors import LvrError
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings

ENSEMBLES = {"naive": ("naive", "mcv"), "mcv": ("lossless", "mcv"), "bytes": ("lossless", "bytes")}


@dataclass(frozen=True)
class System:
    """One row of the table. `enabled`: which members take part, in runner order;
    `combine` None: the run's rule."""

    name: str
    enabled: tuple[bool, ...]
    method: str = "lossless"
    sub_vocab: str | None = None  # None: the run's (a member alone)
    combine: str | None = None

    @property
    def is_member(self) -> bool:
        return sum(self.enabled) == 1

    def settings(self, base: RunSettings) -> RunSettings:
        """The run's settings for this system: same decoding, its method, vocabulary
        and rule."""
        changed = {"method": self.method}
        if self.sub_vocab is not None:
            changed["sub_vocab"] = self.sub_vocab
        elif self.is_member and base.sub_vocab == "auto":
            # A member alone in a runner of several: its distribution spelled over the
            # members' common vocabulary, as `auto` gives a model that runs alone its
            # own (bytes would also be exact, but one piece per byte is slower).
            changed["sub_vocab"] = "mcv"
        if self.combine is not None:
            changed["combine"] = self.combine
        return replace(base, **changed)


def default_system_names(members: Sequence[str]) -> list[str]:
    """Each member alone, the naive restriction and the MCV ensemble (the paper's rows),
    and the default ensemble over bytes (docs/algorithm.md §7.4); with one member, that
    member alone."""
    return list(members) + (["naive", "mcv", "bytes"] if len(members) > 1 else [])


def parse_systems(names: Sequence[str], members: Sequence[str]) -> list[System]:
    """Systems by name (see the module docstring), in the order given, each once."""
    systems: list[System] = []
    for name in dict.fromkeys(names):
        systems.append(parse_system(name, members))
    if not systems:
        raise LvrError("no system to evaluate")
    return systems


def parse_system(name: str, members: Sequence[str]) -> System:
    """One system: a member's name (that model alone), or naive, mcv or bytes with an
    optional :RULE (every member, by that method, sub-vocabulary and rule)."""
    if name in members:
        return System(name, tuple(m == name for m in members))
    kind, _, rule = name.partition(":")
    if kind not in ENSEMBLES or (rule and rule not in RULES):
        raise LvrError(
            f"unknown system '{name}': expected a model ({', '.join(members)}), or naive, mcv "
            f"or bytes, optionally with :RULE ({', '.join(RULES)})"
        )
    if len(members) < 2:
        raise LvrError(f"system '{name}' needs at least two models (-m ... -m ...)")
    method, sub_vocab = ENSEMBLES[kind]
    return System(name, (True,) * len(members), method, sub_vocab, rule or None)


# ----------------------------------------------------------------- the two calls


@dataclass(frozen=True)
class Generation:
    """A continuation and what it cost: prompt_tokens is what the members' backends
    evaluated to read the prompt (tokens, summed over members; the prefix cache makes
    it small when prompts share a beginning), cached_tokens what they reused."""

    text: str
    pieces: int
    stop_reason: str
    seconds: float
    prompt_tokens: int
    cached_tokens: int
    forward_passes: int  # llama_decode calls for the continuation, summed over members


def generate(
    runner: Runner,
    system: System,
    prompt: str,
    settings: RunSettings,
    messages: Sequence[Message] | None = None,
) -> Generation:
    """Continue a raw `prompt` with `system` under `settings` (stop strings, budget,
    sampling) until END, a stop string or the budget: lm-eval's `generate_until`. With
    `messages` (a conversation) the reply to it instead, each member reading it in its
    own format, as `lvr chat` does; `prompt` is then unused."""
    runner.set_enabled(system.enabled)
    before = runner.counters()
    t0 = time.perf_counter()
    if messages is not None:
        run = runner.chat(messages, system.settings(settings))
    else:
        run = runner.complete(prompt.encode("utf-8"), system.settings(settings))
    after = runner.counters()
    for _ in run:
        pass
    end = runner.counters()
    return Generation(
        text=run.text,
        pieces=run.stats.pieces,
        stop_reason=run.stats.stop_reason,
        seconds=time.perf_counter() - t0,
        prompt_tokens=_delta(before, after, "tokens_evaluated"),
        cached_tokens=_delta(before, after, "cache_hits"),
        forward_passes=_delta(after, end, "forward_passes"),
    )


def _delta(before: list[dict[str, int]], after: list[dict[str, int]], key: str) -> int:
    return sum(a[key] - b[key] for a, b in zip(after, before, strict=True))


def loglikelihood(
    runner: Runner,
    system: System,
    context: str,
    continuation: str,
    settings: RunSettings,
    messages: Sequence[Message] | None = None,
) -> float:
    """Exact log P(continuation | context) in nats under `system`, over bytes, so the
    same number whatever the tokenizers: lm-eval's `loglikelihood` (and
    `loglikelihood_rolling` with context ""). -inf when the system cannot spell it; 0
    for an empty continuation. With `messages`, the continuation is the reply to that
    conversation (`context` unused)."""
    runner.set_enabled(system.enabled)
    data = continuation.encode("utf-8")
    if not data:
        return 0.0
    try:
        scoring = runner.score(data, context.encode("utf-8"), system.settings(settings), messages)
        record = scoring.run()
    except LvrError as e:
        if "impossible" in str(e):
            return -math.inf
        raise
    if system.is_member:
        name = runner.members[system.enabled.index(True)].name
        return float(record["models"][name]["logprob"])  # type: ignore[index]
    return float(record["ensemble"]["logprob"])  # type: ignore[index]


def greedy_continues(
    runner: Runner,
    system: System,
    context: str,
    continuation: str,
    settings: RunSettings,
    messages: Sequence[Message] | None = None,
) -> bool:
    """Whether greedy decoding by `system` (over its own pieces: a member's tokens, the
    MCV or bytes) after `context` begins with `continuation`: lm-eval's `is_greedy`.
    Unpenalised, as the distribution `loglikelihood` scores. The generation stops at
    the first piece that leaves the continuation, so a wrong guess costs a forward pass
    or two; a right one, one per piece of the continuation."""
    target = continuation.encode("utf-8")
    if not target:
        return True
    runner.set_enabled(system.enabled)
    greedy = replace(
        system.settings(settings),
        temperature=0.0,
        repeat_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        dry_multiplier=0.0,
        stop=(),
        max_bytes=len(target),
        max_pieces=len(target),
    )
    if messages is not None:
        run = runner.chat(messages, greedy)
    else:
        run = runner.complete(context.encode("utf-8"), greedy)
    for _ in run:
        if not target.startswith(run.data):
            run.stop()
    return run.data[: len(target)] == target
