"""chat: what a user gets under the chat defaults, and bits/byte per rule."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from lvr_local.benchmarks.common import BUNDLED, ENGLISH, system_configs
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import PROFILES, RunSettings

CHAT_PROMPTS = (
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a black hole is in two sentences.",
    "Write a short poem about autumn leaves.",
    "How do I boil an egg?",
    "Name three primary colours.",
    "What is photosynthesis?",
    "Suggest a name for a pet cat.",
    "Why is the sky blue?",
)


def repeated_ngrams(text: str, n: int = 4) -> tuple[int, int]:
    """(word n-grams that already occurred earlier in the text, all word n-grams)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def repeated_lines(text: str) -> int:
    """Non-empty lines that are copies of an earlier line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) - len(set(lines))


@dataclass(frozen=True)
class Replies:
    """What one configuration's replies to CHAT_PROMPTS came to."""

    ended: int  # replies that ended by END, not by the budget
    replies: int
    mean_pieces: float
    repeated_4grams: float  # the share of word 4-grams that occurred earlier in the reply
    replies_with_a_repeated_line: int
    texts: list[str]
    # per round of seeds (one reply per prompt each): (ended by END, with a repeated line)
    by_round: tuple[tuple[int, int], ...] = ()

    def round_counts(self) -> str:
        """Each round's replies ended by END and with a repeated line, e.g. "7/1 8/0":
        the spread that the totals over the rounds hide."""
        return " ".join(f"{ended}/{repeated}" for ended, repeated in self.by_round)


def chat_replies(
    runner: Runner, settings: RunSettings, enabled: list[bool], seeds: int = 1
) -> Replies:
    """`seeds` replies per prompt (seeds k * len(CHAT_PROMPTS) + the prompt's number):
    how many ended by END, their length, repeated 4-grams and repeated lines."""
    from lvr_local.core.chat import Message

    runner.set_enabled(enabled)
    pieces = rep = grams = 0
    texts = []
    n = len(CHAT_PROMPTS)
    by_round = [[0, 0] for _ in range(seeds)]  # per round: [ended by END, repeated a line]
    for seed, prompt in ((k * n + i, p) for k in range(seeds) for i, p in enumerate(CHAT_PROMPTS)):
        run = runner.chat([Message("user", prompt)], replace(settings, seed=seed))
        for _ in run:
            pass
        by_round[seed // n][0] += run.stats.stop_reason == "end"
        by_round[seed // n][1] += repeated_lines(run.text) > 0
        pieces += run.stats.pieces
        r, g = repeated_ngrams(run.text)
        rep, grams = rep + r, grams + g
        texts.append(run.text)
    return Replies(
        ended=sum(ended for ended, _ in by_round),
        replies=len(texts),
        mean_pieces=pieces / len(texts),
        repeated_4grams=rep / max(grams, 1),
        replies_with_a_repeated_line=sum(repeated for _, repeated in by_round),
        texts=texts,
        by_round=tuple((ended, repeated) for ended, repeated in by_round),
    )


def score_rules(runner: Runner, text: bytes) -> dict[str, float]:
    """Bits/byte of `text` over bytes for each member and each rule with default (equal)
    weights (and the uncalibrated product, and the product with base members deferring,
    docs/algorithm.md §7.6), all from one pass: the rules combine the same rows."""
    from lvr_local.core.combine import Mixing, combine, deferred, mixing_weights
    from lvr_local.core.posterior import Posterior
    from lvr_local.decoding.byte_phase import byte_pieces

    runner.set_enabled([True] * len(runner.members))
    ensemble = runner.scoring_ensemble()
    ensemble.start_raw(b"", known=text)  # as scoring: pruning keeps what can spell the text
    prior = [m.weight for m in runner.members]
    posterior = Posterior(prior)
    rules = {
        "mean": Mixing("mean"),
        "product": Mixing("product"),
        "product (1, 1)": Mixing("product", calibrate=False),
        "product, defer 1": Mixing("product", defer=1.0),
        "max": Mixing("max"),
    }
    leads = [m.leads for m in runner.members]
    totals = dict.fromkeys([m.name for m in runner.members] + [*rules, "bayes"], 0.0)
    pieces = byte_pieces(ensemble.sub, text)
    for index, piece in enumerate(pieces.tolist()):
        logq = ensemble.distributions()
        for i, m in enumerate(runner.members):
            totals[m.name] += logq[i, piece]
        for name, mixing in rules.items():
            w = mixing_weights(deferred(prior, logq, leads, mixing.defer), mixing)
            totals[name] += combine(logq, w, mixing.rule)[piece]
        totals["bayes"] += combine(logq, posterior.weights, "bayes")[piece]
        posterior.update(logq[:, piece])
        ensemble.force(piece, index, ahead=pieces[index + 1 :])
    return {k: -v / (len(text) * math.log(2)) for k, v in totals.items()}


FIRST_COMMAND = "Write a haiku about the sea."  # the README's first command


def echoes(prompt: str, reply: str, n: int = 4) -> bool:
    """Whether the reply repeats the prompt: any run of `n` of its words, case and
    punctuation aside ("Tell me a haiku about the sea." echoes the README's prompt)."""
    asked, said = _words(prompt), " ".join(_words(reply))
    return any(" ".join(asked[i : i + n]) in f" {said} " for i in range(len(asked) - n + 1))


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


@dataclass(frozen=True)
class FirstCommand:
    """The README's first command under seeds 1..N: replies that neither echo the prompt
    nor run to the budget (the ones a new user can use), and how the others failed."""

    good: int
    echoed: int
    to_budget: int
    seeds: int
    texts: list[str]


def first_command(runner: Runner, settings: RunSettings, seeds: int = 10) -> FirstCommand:
    from lvr_local.core.chat import Message

    good = echoed = to_budget = 0
    texts = []
    for seed in range(1, seeds + 1):
        run = runner.chat([Message("user", FIRST_COMMAND)], replace(settings, seed=seed))
        for _ in run:
            pass
        echo, budget = echoes(FIRST_COMMAND, run.text), run.stats.stop_reason.startswith("max")
        good += not echo and not budget
        echoed, to_budget = echoed + echo, to_budget + budget
        texts.append(run.text)
    return FirstCommand(good, echoed, to_budget, seeds, texts)


def chat(argv: Sequence[str] = ()) -> None:
    """Each bundled model alone and the ensemble under each rule: the README's first
    command with seeds 1-10, then CHAT_PROMPTS, with the chat defaults; then bits/byte on
    the shipped English text. Options: --rules product,mcv:bayes (RULE over the default
    sub-vocabulary, or SUB:RULE); --set KEY=VALUE (a run setting, TOML value);
    --seeds K (replies per prompt; 0 skips the chat prompts); --first-seeds N (the
    first command's seeds, 10; 0 skips it); --no-alone (skip each model alone);
    --no-score; --no-preamble (base members read the transcript without
    roles.PREAMBLE and EXAMPLE); --alone-over SUB (each model alone over SUB, not its
    own vocabulary); --weights W1,W2 (the members' weights)."""
    parser = argparse.ArgumentParser(prog="python -m lvr_local.benchmarks chat")
    parser.add_argument("--rules", default="product,mean,mcv:bayes,mcv:mean")
    parser.add_argument("--seeds", type=_count, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-alone", action="store_true")
    parser.add_argument("--no-score", action="store_true")
    parser.add_argument("--first-seeds", type=_count, default=10)
    parser.add_argument("--no-preamble", action="store_true")
    parser.add_argument("--alone-over", default="mcv", metavar="SUB")
    parser.add_argument("--weights", default=None, metavar="W1,W2")
    args = parser.parse_args(argv)
    if args.no_preamble:  # base members read the bare transcript (the A/B of roles.PREAMBLE)
        from lvr_local.decoding import roles

        roles.PREAMBLE = roles.EXAMPLE = ""
    settings = _settings_from(args.set).for_mode("chat")
    shown = {k: getattr(settings, k) for k in PROFILES["chat"]} | _parse_sets(args.set)
    budget = settings.max_pieces
    print(f"{len(CHAT_PROMPTS)} chat prompts x {args.seeds} seeds, {budget} pieces, {shown}")
    runner = Runner(BUNDLED, settings).load()
    configs = _configs(runner, args)
    if args.first_seeds:
        _print_first_command(runner, settings, configs, args.first_seeds)
    if args.seeds:
        _print_chat(runner, settings, configs, args.seeds)
    if not args.no_score:
        print_rule_scores(runner)
    runner.close()


Config = tuple[str, list[bool], dict]


def _count(text: str) -> int:
    """A number of seeds: 0 skips that part of the benchmark."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number >= 0")
    return value


def _print_first_command(
    runner: Runner, settings: RunSettings, configs: list[Config], seeds: int
) -> None:
    print(f"the README's first command ({FIRST_COMMAND!r}), seeds 1-{seeds}:")
    for label, enabled, changed in configs:
        runner.set_enabled(enabled)
        f = first_command(runner, replace(settings, **changed), seeds)
        print(
            f"  {label:<22} neither echoed nor ran to the budget {f.good:>2}/{f.seeds} "
            f"(echoed {f.echoed}, ran to the budget {f.to_budget})",
            flush=True,
        )


def _print_chat(runner: Runner, settings: RunSettings, configs: list[Config], seeds: int) -> None:
    print("chat prompts:")
    for label, enabled, changed in configs:
        r = chat_replies(runner, replace(settings, **changed), enabled, seeds)
        print(
            f"  {label:<22} ended by END {r.ended:>2}/{r.replies}, "
            f"{r.mean_pieces:5.1f} pieces on average, repeated 4-grams "
            f"{100 * r.repeated_4grams:4.1f}%, replies with a repeated line "
            f"{r.replies_with_a_repeated_line}",
            flush=True,
        )
        if seeds > 1:
            print(f"    per round of seeds (ended/with a repeated line): {r.round_counts()}")
        print(f"    first reply: {r.texts[0]!r}", flush=True)


def _configs(runner: Runner, args: argparse.Namespace) -> list[Config]:
    """The configurations to compare (benchmarks/common.py), each model alone over
    `--alone-over`; `--weights` set on the members for every ensemble."""
    configs = [
        (f"{label} over {args.alone_over}", enabled, {"sub_vocab": args.alone_over})
        if label.endswith(" alone") and args.alone_over != "mcv"
        else (label, enabled, changed)
        for label, enabled, changed in system_configs(runner, args.rules, not args.no_alone)
    ]
    if args.weights:  # models.toml's `weight`, in member order
        runner.set_weights([float(w) for w in args.weights.split(",")])
    return configs


def _parse_sets(pairs: Sequence[str]) -> dict[str, object]:
    """--set KEY=VALUE pairs, each value read as TOML (a bare word as a string)."""
    import tomllib

    values: dict[str, object] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw
    return values


def _settings_from(pairs: Sequence[str]) -> RunSettings:
    from lvr_local.runner.settings import with_overrides

    return with_overrides(RunSettings(), "--set", **_parse_sets(pairs))


def print_rule_scores(runner: Runner) -> None:
    n = len(runner.members)
    text = ENGLISH.read_bytes()
    bpb = score_rules(runner, text)
    best = min(bpb[m.name] for m in runner.members)
    print(f"bits/byte on {ENGLISH.name} ({len(text)} bytes, over bytes, equal weights):")
    for name, value in bpb.items():
        print(f"  {name:<16} {value:.4f}  ({value - best:+.4f} against the better model)")
    print(f"  bayes bound: best + log2({n})/n_bytes = {best + math.log2(n) / len(text):.4f}")
