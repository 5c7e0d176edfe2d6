"""The runner every front end uses: loaded models, settings, and runs as event streams.

A `Runner` owns the members of one ensemble (loaded once) and builds the ensemble for
the settings in force, rebuilding it when a setting that shapes it changes. A
generation or a scoring is a stream: iterate a `Run` for its pieces (each with the text
it adds, UTF-8 characters split across pieces held back until complete), then ask it
for its `record()`. The CLI, the TUI, a server and an evaluation harness only present
these streams.

One runner is used by one thread at a time (llama.cpp contexts are not thread-safe);
`Run.stop()` is the one call another thread may make.
"""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lvr_local.core.chat import Message
from lvr_local.core.repetition import RepetitionControl
from lvr_local.core.sampling import Sampler
from lvr_local.decoding.ensemble import Ensemble, PieceEvent
from lvr_local.decoding.generation import RunStats, generate
from lvr_local.decoding.members import Member
from lvr_local.decoding.scheduling import CoreScheduler
from lvr_local.decoding.scoring import Scoring
from lvr_local.errors import LvrError
from lvr_local.llama.isolated import ModelBackend
from lvr_local.runner.config import ModelSpec, check_weights
from lvr_local.runner.loading import ProgressCallback, load_members
from lvr_local.runner.settings import RunSettings
from lvr_local.text import utf8_bytes


@dataclass(frozen=True)
class ModelInfo:
    """What a front end shows about one loaded model."""

    name: str
    tokenizer: str
    n_vocab: int
    weight: float
    enabled: bool
    role: str


@dataclass(frozen=True)
class MemberFigures:
    name: str
    forward_passes: int
    cache_hits: int
    alive: int
    pruned: float
    mix_weight: float  # the weight the rule gives it now (bayes: its posterior)


@dataclass(frozen=True)
class LiveFigures:
    """A snapshot of a running generation (counters since it began)."""

    pieces: int
    bytes: int
    seconds: float
    members: tuple[MemberFigures, ...]

    @property
    def pieces_per_s(self) -> float:
        return self.pieces / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Chunk:
    """One piece of a run and the text it completes (may be empty mid-character)."""

    event: PieceEvent
    text: str


def _no_progress(label: str, done: int, total: int) -> None:
    pass


class Runner:
    """The models of a run, loaded once, and the ensemble over them for the settings in
    force. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        settings: RunSettings,
        *,
        concurrent: bool | None = None,
    ) -> None:
        if not specs:
            raise LvrError("no model to run")
        self.specs = list(specs)
        self.settings = settings
        self.members: list[Member] = []
        self.backends: list[ModelBackend] = []
        self._concurrent = concurrent
        self._ensemble: Ensemble | None = None
        self._built_with: tuple[object, ...] | None = None

    # ----------------------------------------------------------------- models

    def load(self, progress: ProgressCallback = _no_progress) -> Runner:
        """Load every model and build the ensemble, reporting progress before each step."""
        total = len(self.specs) + 1
        self.members, self.backends = load_members(self.specs, self.settings, progress, total)
        progress("building the sub-vocabulary", len(self.specs), total)
        self.ensemble_for(self.settings)
        progress("ready", total, total)
        return self

    @property
    def loaded(self) -> bool:
        return bool(self.members)

    def model_infos(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                m.name, m.vocab.tokenizer_model, m.vocab.n_tokens, m.weight, m.enabled, m.role
            )
            for m in self.members
        ]

    def set_weights(self, weights: Sequence[float]) -> None:
        """Each member's weight, in member order (checked: config.check_weights)."""
        check_weights(weights, len(self.members), "weights")
        self.ensemble_for(self.settings).set_weights(weights)

    def set_enabled(self, enabled: Sequence[bool]) -> None:
        """Switch members on or off; it takes effect at the next prompt."""
        if len(enabled) != len(self.members):
            raise LvrError(f"expected {len(self.members)} on/off values, got {len(enabled)}")
        for member, on in zip(self.members, enabled, strict=True):
            member.enabled = bool(on)

    def ensemble_for(self, settings: RunSettings) -> Ensemble:
        """The ensemble for these settings: the current one, or a new one over the same
        members when a setting that shapes it changed (the combination rule does not:
        each run sets it)."""
        if not self.members:
            raise LvrError("the models are not loaded yet")
        key = settings.ensemble_key()
        if self._ensemble is None or key != self._built_with:
            new = Ensemble(
                self.members,
                sub_vocab=settings.sub_vocab,
                method=settings.method,
                options=settings.engine_options(),
                scheduler=CoreScheduler(self._concurrent),
            )
            old, self._ensemble, self._built_with = self._ensemble, new, key
            if old is not None:
                old.close()
        return self._ensemble

    @property
    def ensemble(self) -> Ensemble:
        return self.ensemble_for(self.settings)

    # ----------------------------------------------------------------- runs

    def chat(
        self,
        messages: Sequence[Message],
        settings: RunSettings | None = None,
        stop: threading.Event | None = None,
        top_n: int = 0,
    ) -> Run:
        """A reply to a conversation, each member in its own format (a chat template,
        or a transcript for a base model), sampled with the chat profile's defaults.
        Setting `stop` (from any thread) ends the run after the current piece; top_n > 0
        lists each piece's top_n most likely alternatives in its event."""
        for m in messages:
            utf8_bytes(m.content, f"the {m.role} message")
        resolved, ensemble = self._for_run(settings, "chat")
        ensemble.start_chat(messages)
        return Run(self, ensemble, resolved, stop, top_n)

    def complete(
        self,
        prompt: bytes,
        settings: RunSettings | None = None,
        stop: threading.Event | None = None,
        top_n: int = 0,
    ) -> Run:
        """A continuation of a raw prompt (exact when it ends mid-token), greedy and
        unpenalised unless the settings say otherwise."""
        resolved, ensemble = self._for_run(settings, "raw")
        ensemble.start_raw(prompt)
        return Run(self, ensemble, resolved, stop, top_n)

    def score(
        self,
        text: bytes,
        prompt: bytes = b"",
        settings: RunSettings | None = None,
        messages: Sequence[Message] | None = None,
    ) -> Scoring:
        """The exact log-probability of `text` after `prompt`, over bytes: iterate the
        returned Scoring for one event per byte, then take its `record()`. `settings`
        (default: the runner's) choose the method, rule, pruning and numerics. With
        `messages`, `text` is scored as the reply to that conversation instead, each
        member reading it in its own format (as `chat` does), and the settings the
        conversation profile leaves unset (the rule among them) are that profile's."""
        base = replace(settings or self.settings, sub_vocab="bytes")
        _, ensemble = self._for_run(base, "raw" if messages is None else "chat", scoring=True)
        return Scoring(ensemble, text, prompt, messages)

    def scoring_ensemble(self, settings: RunSettings | None = None) -> Ensemble:
        """The ensemble as `score` sets it up for a raw prompt (llama.cpp's exact path, no
        sampler, `defer` 0 unless set), for callers that read every step's rows: the
        rule benchmark combines them by several rules at once."""
        base = replace(settings or self.settings, sub_vocab="bytes")
        return self._for_run(base, "raw", scoring=True)[1]

    def _for_run(
        self, settings: RunSettings | None, mode: str, *, scoring: bool = False
    ) -> tuple[RunSettings, Ensemble]:
        """The settings of a run in `mode` (its profile fills what is not set), the
        members on the numeric path it needs, and the ensemble, combining by those
        settings' rule (set per run: no rebuild). Scoring leaves `defer` at 0 unless it
        was set: deferring decides who writes a reply, and it predicts a given text
        worse (docs/algorithm.md §7.6)."""
        settings = settings or self.settings
        if scoring and settings.defer is None:
            settings = replace(settings, defer=0.0)
        resolved = settings.for_mode(mode)
        exact = resolved.exact_numerics(scoring)
        for backend in self.backends:
            backend.set_exact(exact)
        ensemble = self.ensemble_for(resolved)
        ensemble.mixing = resolved.mixing()
        ensemble.token_sampling = resolved.member_sampling(scoring)
        ensemble.token_repetition = resolved.member_repetition(scoring)
        return resolved, ensemble

    def counters(self) -> list[dict[str, int]]:
        return [vars(b.counters).copy() for b in self.backends]

    # ----------------------------------------------------------------- teardown

    def close(self) -> None:
        if self._ensemble is not None:
            self._ensemble.close()
            self._ensemble = None
        for backend in self.backends:
            backend.close()
        self.members, self.backends = [], []

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Run:
    """One generation as a stream of `Chunk`s, then a record. `stop()` (from any thread)
    ends it after the current piece; `interrupt()` is for a caller that caught Ctrl-C."""

    def __init__(
        self,
        runner: Runner,
        ensemble: Ensemble,
        settings: RunSettings,
        stop: threading.Event | None = None,
        top_n: int = 0,
    ) -> None:
        """A run over an ensemble whose prompt is already evaluated: the clock and the
        counters start here, so figures count pieces, not prompt processing. top_n > 0:
        each event lists its step's top_n most likely pieces."""
        self.runner = runner
        self.ensemble = ensemble
        self.settings = settings
        self.stats = RunStats()
        self.data = b""
        self.text = ""
        self.error: str | None = None
        self.left: dict[str, int] = {}  # member name -> index of the piece it could not spell
        # member name -> pieces it followed only through branches pruned earlier and revived
        self.revived: dict[str, int] = {}
        self._stop = stop or threading.Event()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._baseline = runner.counters()
        self._t0 = time.perf_counter()
        self._events = generate(
            ensemble,
            Sampler(settings.piece_sampling()).choose,
            settings.budget(),
            self.stats,
            self._stop.is_set,
            RepetitionControl(settings.piece_repetition()),
            top_n,
        )

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for event in self._events:
                names = [m.name for m in self.ensemble.members]
                for i in event.left:
                    self.left[names[i]] = event.index
                for i in event.revived:
                    self.revived[names[i]] = self.revived.get(names[i], 0) + 1
                self.data += event.text
                text = self._decoder.decode(event.text)
                self.text += text
                yield Chunk(event, text)
        except LvrError as e:
            self.error, self.stats.stop_reason = str(e), "error"
            raise
        tail = self._decoder.decode(b"", final=True)
        self.text += tail

    def stop(self) -> None:
        """Ask the run to end after the current piece (stop reason 'stopped')."""
        self._stop.set()

    def interrupt(self) -> None:
        """The caller caught Ctrl-C: end here, keeping the text (stop reason 'interrupted')."""
        self._events.close()
        self.stats.stop_reason = "interrupted"

    def figures(self) -> LiveFigures:
        """Counters since the run began, for live panels."""
        now = self.runner.counters()
        pruned = self.ensemble.pruned_mass()
        mix = self.ensemble.step_weights()
        members = tuple(
            MemberFigures(
                name=m.name,
                forward_passes=now[i]["forward_passes"] - self._baseline[i]["forward_passes"],
                cache_hits=now[i]["cache_hits"] - self._baseline[i]["cache_hits"],
                alive=now[i]["alive_sequences"],
                pruned=pruned[i] if i < len(pruned) else 0.0,
                mix_weight=float(mix[i]),
            )
            for i, m in enumerate(self.ensemble.members)
        )
        seconds = time.perf_counter() - self._t0
        return LiveFigures(self.stats.pieces, len(self.data), seconds, members)

    def record(self) -> dict[str, Any]:
        """The run's JSON record: text, counts, stop reason, settings and each model
        (its role, configured weight, and the weight the rule gave it last)."""
        ens, settings = self.ensemble, self.settings
        mix = ens.step_weights()
        record: dict[str, Any] = {
            "text": self.text,
            "pieces": self.stats.pieces,
            "bytes": len(self.data),
            "seconds": round(self.stats.seconds, 3),
            "stop_reason": self.stats.stop_reason,
            "sub_vocab": ens.sub.describe(),
            "method": settings.method,
            "combine": settings.combine,
            "models_at_once": ens.concurrent,
            "models": [
                {
                    "name": m.name,
                    "role": m.role,
                    "weight": m.weight,
                    "mix_weight": float(w),
                    "n_threads": b.n_threads,
                    **vars(b.counters),
                }
                for m, w, b in zip(ens.members, mix, self.runner.backends, strict=True)
            ],
            "settings": settings.as_record(),
        }
        if self.left:  # never silent: a member that could not spell the text said so
            record["left"] = [{"name": n, "at_piece": i} for n, i in self.left.items()]
        if self.revived:
            record["revived"] = [{"name": n, "pieces": c} for n, c in self.revived.items()]
        if self.error is not None:
            record["error"] = self.error
        return record
