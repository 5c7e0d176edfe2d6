"""The TUI's thin bridge to the library: load models, build the ensemble, generate.

Nothing here decodes: it calls lvr_local and turns its results into plain records the
widgets can show. Every method that touches llama.cpp runs in the single worker thread
that holds `EnsembleSession.lock` (one llama.cpp context is not thread-safe).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

from lvr_local.chat import Message
from lvr_local.config import Config, Defaults, with_overrides
from lvr_local.ensemble import Ensemble, Member, PieceEvent, RunStats, load_member
from lvr_local.errors import LvrError
from lvr_local.reduction import DEFAULT_PRUNE, EngineOptions
from lvr_local.sampling import Sampler, SamplingParams

ProgressCallback = Callable[[str, int, int], None]


# The settings that are also models.toml defaults, with their names there.
_DEFAULTS_NAMES = {
    "rule": "combine",
    "sub_vocab": "sub_vocab",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "prune": "prune",
    "seed": "seed",
}


@dataclass(frozen=True)
class ChatSettings:
    """What the settings modal edits; validated by the config module's own rules."""

    rule: str = "mean"
    sub_vocab: str = "mcv"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    prune: float = DEFAULT_PRUNE
    max_pieces: int = 256
    seed: int | None = None
    system_prompt: str = ""

    @classmethod
    def from_defaults(cls, d: Defaults, max_pieces: int | None = None) -> ChatSettings:
        values = {mine: getattr(d, theirs) for mine, theirs in _DEFAULTS_NAMES.items()}
        return cls(**values, max_pieces=max_pieces or d.max_pieces)

    def checked(self, defaults: Defaults) -> Defaults:
        """The run settings these make, or a ConfigError naming the bad value."""
        overrides = {theirs: getattr(self, mine) for mine, theirs in _DEFAULTS_NAMES.items()}
        return with_overrides(defaults, **overrides, max_pieces=self.max_pieces)

    def as_record(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """What the side panel shows about one loaded model."""

    name: str
    tokenizer: str
    n_vocab: int
    weight: float
    enabled: bool


@dataclass(frozen=True)
class MemberFigures:
    name: str
    forward_passes: int
    cache_hits: int
    alive: int
    pruned: float


@dataclass(frozen=True)
class LiveFigures:
    """A snapshot of a running generation, taken in the worker, shown by the UI."""

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


class EnsembleSession:
    """Owns the loaded members and the ensemble built over them.

    Changing the rule or sub-vocabulary builds a new Ensemble over the same members, so
    models are loaded once per app run."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.members: list[Member] = []
        self.ensemble: Ensemble | None = None
        self.lock = threading.Lock()
        self._built_with: tuple[str, str, float] | None = None
        self._t0 = time.perf_counter()
        self._baseline: list[tuple[int, int]] = []  # counters when the generation began

    @property
    def loaded(self) -> bool:
        return self.ensemble is not None

    def load(self, settings: ChatSettings, progress: ProgressCallback) -> None:
        specs = self.config.enabled_models
        if not specs:
            raise LvrError(f"no model to run: {self.config.path} enables none")
        total = len(specs) + 1
        for done, spec in enumerate(specs):
            progress(f"loading {spec.name}", done, total)
            self.members.append(load_member(spec, self.config.defaults))
        progress("building the sub-vocabulary", len(specs), total)
        self.build(settings)
        progress("ready", total, total)

    def needs_build(self, settings: ChatSettings) -> bool:
        return self._built_with != (settings.rule, settings.sub_vocab, settings.prune)

    def build(self, settings: ChatSettings) -> None:
        new = Ensemble(
            self.members,
            sub_vocab=settings.sub_vocab,
            rule=settings.rule,
            options=EngineOptions(prune=settings.prune),
        )
        old, self.ensemble = self.ensemble, new
        self._built_with = (settings.rule, settings.sub_vocab, settings.prune)
        if old is not None:
            old.close()

    def describe(self) -> str:
        ens = self._require()
        return f"{ens.sub.describe()} · rule {ens.rule}"

    def model_infos(self) -> list[ModelInfo]:
        return [
            ModelInfo(m.name, m.vocab.tokenizer_model, m.vocab.n_tokens, m.weight, m.enabled)
            for m in self.members
        ]

    def generate(
        self,
        messages: Sequence[Message],
        settings: ChatSettings,
        models: Sequence[tuple[float, bool]],
        stop: threading.Event,
        stats: RunStats,
    ) -> Iterator[PieceEvent]:
        """Condition on `messages` and yield pieces until done or `stop` is set (then
        stats.stop_reason is "stopped"). `models` is each member's (weight, enabled)."""
        ens = self._require()
        ens.set_weights([w for w, _ in models])
        for member, (_, on) in zip(ens.members, models, strict=True):
            member.enabled = on
        ens.start_chat(messages)
        self._t0 = time.perf_counter()  # figures count pieces, not prompt processing
        self._baseline = [
            (m.backend.counters.forward_passes, m.backend.counters.cache_hits) for m in ens.members
        ]
        if stop.is_set():
            stats.stop_reason = "stopped"
            return
        sampler = Sampler(
            SamplingParams(
                settings.temperature,
                settings.top_k,
                settings.top_p,
                settings.min_p,
                settings.seed,
            )
        )
        events = ens.generate(sampler, max_pieces=settings.max_pieces, stats=stats)
        try:
            for event in events:
                yield event
                if stop.is_set():
                    stats.stop_reason = "stopped"
                    return
        finally:
            events.close()

    def figures(self, pieces: int, n_bytes: int) -> LiveFigures:
        """The current generation's figures (counters since it began)."""
        ens = self._require()
        pruned = ens.pruned_mass()
        base = self._baseline or [(0, 0)] * len(ens.members)
        members = tuple(
            MemberFigures(
                name=m.name,
                forward_passes=m.backend.counters.forward_passes - base[i][0],
                cache_hits=m.backend.counters.cache_hits - base[i][1],
                alive=m.backend.counters.alive_sequences,
                pruned=pruned[i] if i < len(pruned) else 0.0,
            )
            for i, m in enumerate(ens.members)
        )
        return LiveFigures(pieces, n_bytes, time.perf_counter() - self._t0, members)

    def close(self) -> None:
        """Free llama.cpp; waits for a running generation step to finish first."""
        with self.lock:
            if self.ensemble is not None:
                self.ensemble.close()
                self.ensemble = None
            for m in self.members:
                m.close()
            self.members = []

    def _require(self) -> Ensemble:
        if self.ensemble is None:
            raise LvrError("the models are not loaded yet")
        return self.ensemble
