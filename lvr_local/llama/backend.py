"""The llama.cpp backend: next-token logits for many prefixes, sharing one KV cache.

`LlamaBackend` implements `NextTokenModel` with llama.cpp's low-level API. The prompt
lives in one sequence of a context with a unified KV cache; every prefix the engine
asks about is a branch off it (see prefix_cache.py): a branch reuses the cells of its
deepest evaluated ancestor, and all missing tokens of all branches go into one batched
`llama_decode`, logits requested only for the last token of each branch. In the common
case (one alive prefix, extended by one token) a call costs one decode of one token.

A llama.cpp context is not thread-safe: use one backend from one thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as L
import numpy as np

from lvr_local.core.lm import ModelMemoryFull, TokenPrefix
from lvr_local.errors import InternalError, LvrError
from lvr_local.llama.extra_buffers import decide
from lvr_local.llama.gguf_check import check_gguf
from lvr_local.llama.native import (
    LlamaBatch,
    LlamaContext,
    LlamaModel,
    ensure_backend,
    recent_errors,
)
from lvr_local.llama.prefix_cache import PrefixCache, Step
from lvr_local.machine import physical_cores

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ

GPU_REBUILD_HINT = (
    'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
    'llama-cpp-python   (on Apple silicon: CMAKE_ARGS="-DGGML_METAL=on")'
)


@dataclass
class BackendCounters:
    """What the backend did, for tests and benchmarks.

    forward_passes: llama_decode calls. tokens_evaluated: tokens sent through them.
    cache_hits: tokens not evaluated thanks to reuse: prompt tokens kept from the
    previous prompt, plus prefixes answered from the logits cache.
    sequence_copies / evictions: branches made by copying a sequence / sequences
    reclaimed for lack of sequence ids or KV cells. restarts: times the exact path ran
    out of cells and started again from the prompt. alive_sequences: the sequences
    that hold a prefix now. kv_cells_used / peak_kv_cells: the KV cache's cells in use
    now / at most so far (the prompt's included).
    """

    forward_passes: int = 0
    tokens_evaluated: int = 0
    cache_hits: int = 0
    sequence_copies: int = 0
    evictions: int = 0
    restarts: int = 0
    alive_sequences: int = 0
    kv_cells_used: int = 0
    peak_kv_cells: int = 0


def check_gpu_request(n_gpu_layers: int) -> None:
    """Refuse GPU layers on a CPU-only build, saying how to get a GPU build."""
    ensure_backend()
    if n_gpu_layers != 0 and not L.llama_supports_gpu_offload():
        raise LvrError(
            f"n_gpu_layers={n_gpu_layers} was requested, but this llama-cpp-python build "
            f"has no GPU support. Rebuild it with: {GPU_REBUILD_HINT}; "
            "or set n_gpu_layers = 0 to run on the CPU."
        )


class LlamaBackend:
    """A GGUF model answering `next_logits` for many prefixes of one prompt.

    Call `set_prompt` first; prefixes are token tuples after the prompt. Rows returned by
    `next_logits` are the cache's own read-only arrays. One thread per backend. Use as a
    context manager, or call `close()`.

    Sizes: n_ctx KV cells shared by all sequences (llama.cpp pads it to a multiple of 256);
    n_batch tokens per llama_decode (at least n_seq_max); n_seq_max sequence ids, i.e.
    branches kept in the cache at once (more alive prefixes still work, by eviction and
    re-evaluation); n_threads defaults to the physical cores; n_ubatch (default n_batch)
    is how many tokens llama.cpp computes at once. devices: where the n_gpu_layers go
    (llama.cpp devices, e.g. RPC servers', rpc.py), instead of this build's GPUs.
    extra_buffers: "auto" (as a probe decode on this machine found safe, extra_buffers.py),
    "on" or "off"; `use_extra_buffers` and `extra_buffers_reason` say what was done, why.

    Numerics: llama.cpp's results are deterministic but depend on how a token was computed:
    with which other tokens (GEMM vs GEMV kernels, by ubatch size) and, with flash
    attention, in which order its cells lie (freed cells get reused out of position
    order). The bundled Q4 models amplify these roundings to ~0.2 nats on top tokens
    (total variation ~0.05), as much as switching the KV cache from F16 to F32. With
    n_ubatch <= 3 and no freed cell reused (one sequence, or nothing released) the rows
    equal a fresh evaluation bit for bit (measured on this CPU build).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        n_ctx: int,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_seq_max: int = 16,
        n_ubatch: int | None = None,
        devices: Sequence[int] = (),
        extra_buffers: str = "auto",
    ) -> None:
        path = Path(path)
        check_gguf(path)
        if not devices:  # explicit devices (RPC servers) need no GPU in this build
            check_gpu_request(n_gpu_layers)
        _check_sizes(n_ctx, n_batch, n_seq_max)
        if n_ctx:  # llama.cpp aborts when sequences (and the pin) outnumber the cells
            n_seq_max = max(1, min(n_seq_max, n_ctx - 1))
        self._model: LlamaModel | None = None
        self._ctx: LlamaContext | None = None
        self._batch: LlamaBatch | None = None
        self.n_threads = n_threads or physical_cores()
        self.use_extra_buffers, self.extra_buffers_reason = decide(extra_buffers, path)
        self._model = LlamaModel(
            path, n_gpu_layers=n_gpu_layers, devices=devices, extra_buffers=self.use_extra_buffers
        )
        try:
            self._ctx = LlamaContext(
                self._model,
                n_ctx=n_ctx,
                n_batch=max(n_batch, n_seq_max + 1),  # llama.cpp wants n_batch >= n_seq_max
                n_seq_max=n_seq_max + 1,  # one more: the pin of the exact path
                n_threads=self.n_threads,
                n_ubatch=n_ubatch,
                n_gpu_layers=n_gpu_layers,
            )
            # llama.cpp may lower n_batch (to n_ctx) and aborts on a larger batch: the
            # batch holds no more than the context takes.
            self._batch = LlamaBatch(min(n_batch, self._ctx.n_batch))
        except BaseException:
            self.close()
            raise
        self.path = path
        self._n_vocab = L.llama_vocab_n_tokens(self._model.vocab)
        self._cache = PrefixCache(self._ctx, n_seq_max, pin=n_seq_max)
        self._prompt: list[int] = []
        self._prompt_exact = False  # how the cached prompt's cells were computed
        self.exact = False
        self._restarted = False  # the exact path just started again from the prompt
        self.counters = BackendCounters()

    def set_exact(self, exact: bool) -> None:
        """The exact numeric path (docs/algorithm.md §8): every row equals what a fresh
        context gives when it evaluates the same tokens one at a time, whatever was
        batched, branched, released or cached before. Three things make it so:
        - every token is decoded alone (llama.cpp picks other kernels for other batch
          shapes, and the KV values they write differ too);
        - one thread (flash attention splits a long cache among the threads, and the
          split changes the rounding);
        - each sequence's cells stay in position order (append-only cache, see
          prefix_cache.py).
        On a CPU it costs little for branches (a batch of B rows costs about B forward
        passes anyway) and more for long prompts, evaluated one token at a time."""
        self.exact = bool(exact)
        self._cache.append_only = self.exact
        self._apply_threads()

    def set_threads(self, n_threads: int) -> None:
        """Change the CPU threads of later decodes (an ensemble shares the cores out).
        The exact path keeps using one."""
        if n_threads < 1:
            raise LvrError(f"n_threads must be >= 1, got {n_threads}")
        self.n_threads = n_threads
        self._apply_threads()

    def _apply_threads(self) -> None:
        assert self._ctx is not None
        self._ctx.set_threads(1 if self.exact else self.n_threads)

    # ----- NextTokenModel ---------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    def next_logits(self, prefixes: Sequence[TokenPrefix]) -> list[np.ndarray]:
        """Logits after each prefix (one read-only float32 row of n_vocab each), evaluating
        the missing ones together, each on top of its deepest evaluated ancestor."""
        self._check_ready()
        keys = [self._checked_prefix(p) for p in prefixes]
        nodes = [self._cache.request(k) for k in keys]
        missing = list(dict.fromkeys(n for n in nodes if n.row is None))
        self.counters.cache_hits += sum(1 for n in nodes if n.row is not None)
        while missing:
            steps, missing = self._cache.plan(missing)
            try:
                self._decode_steps(steps)
            except _CellsExhausted:
                self._restart_from_prompt()
                missing = list(dict.fromkeys(n for n in nodes if n.row is None))
        self._update_gauges()
        return [n.row for n in nodes]  # every node has its row now

    def release(self, prefixes: Sequence[TokenPrefix]) -> None:
        """These prefixes will not be asked for nor extended: free what only they need."""
        self._cache.release(tuple(p) for p in prefixes)
        self._update_gauges()

    # ----- the prompt -------------------------------------------------------------

    def set_prompt(self, tokens: Sequence[int]) -> None:
        """Make `tokens` the prompt. Whatever the cache already holds of it (the previous
        prompt, a chat turn's conversation so far) is kept; only the rest is evaluated.
        A new prompt forgets all prefixes of the previous one."""
        self._check_open()
        tokens = [int(t) for t in tokens]
        self._check_prompt(tokens)
        if tokens == self._prompt and self._prompt_exact == self.exact:
            self.counters.cache_hits += len(tokens)
            return
        seq, shared = self._cache.best_sequence(self._prompt, tokens)
        keep = min(shared, len(tokens) - 1)  # the last token is re-run for its logits
        if self._prompt_exact != self.exact:
            keep = 0  # cells computed on the other numeric path: recompute them all
        self._prompt, self._prompt_exact = [], self.exact
        keep = self._cache.begin_prompt(seq, keep)
        if self.exact and keep == 0:
            self._evaluate_from_empty(tokens)  # cells from 0, in position order
        else:
            try:
                self._decode_prompt_tail(seq, tokens, keep)
            except _CellsExhausted:
                self.counters.restarts += 1
                self._evaluate_from_empty(tokens)
        self._prompt = tokens
        self.counters.cache_hits += keep
        self._update_gauges()

    @property
    def prompt(self) -> list[int]:
        return list(self._prompt)

    def _decode_prompt_tail(self, seq: int, tokens: list[int], start: int) -> None:
        """Evaluate tokens[start:] on `seq`, n_batch at a time (one at a time when exact);
        keep the last row."""
        assert self._ctx is not None and self._batch is not None
        n_batch = 1 if self.exact else self._batch.capacity
        for lo in range(start, len(tokens), n_batch):
            chunk = tokens[lo : lo + n_batch]
            want = [False] * len(chunk)
            want[-1] = lo + len(chunk) == len(tokens)
            self._batch.fill(chunk, list(range(lo, lo + len(chunk))), [seq] * len(chunk), want)
            self._decode(busy={seq})
            self.counters.tokens_evaluated += len(chunk)
        self._cache.finish_prompt(len(tokens), self._read_row(len(chunk) - 1))

    # ----- tokens -----------------------------------------------------------------

    def tokenize(self, text: bytes, add_special: bool, parse_special: bool) -> list[int]:
        """llama.cpp's tokenization of `text` (add_special: BOS etc. as the model wants;
        parse_special: read control-token texts such as <|im_start|> as those tokens)."""
        self._check_open()
        assert self._model is not None
        size = len(text) // 3 + 16  # a guess (most tokens are longer); grown when short
        while True:
            buf = (L.llama_token * size)()
            n = L.llama_tokenize(
                self._model.vocab, text, len(text), buf, size, add_special, parse_special
            )
            if n >= 0:
                return list(buf[:n])
            if n == -(2**31):
                raise LvrError(f"text of {len(text)} bytes is too long to tokenize")
            size = -n

    @property
    def n_ctx(self) -> int:
        assert self._ctx is not None
        return self._ctx.n_ctx

    @property
    def n_seq_max(self) -> int:
        """Sequence ids for branches (llama.cpp has one more: the exact path's pin)."""
        return self._cache.n_seq_max

    def verify_cache(self) -> None:
        """Check that llama.cpp's sequences hold exactly what the prefix cache believes
        (a debugging aid, used by the tests); raises LvrError on a difference."""
        self._check_open()
        assert self._ctx is not None
        expected = self._cache.sequence_lengths()
        for seq in range(self._cache.n_seq_max):
            length = expected.get(seq, 0)
            want = (0, length - 1) if length else (-1, -1)
            got = self._ctx.seq_pos_range(seq)
            if got != want:
                raise LvrError(f"sequence {seq} holds positions {got} in llama.cpp, not {want}")

    # ----- decoding ---------------------------------------------------------------

    def _decode_steps(self, steps: list[Step]) -> None:
        """Decode planned steps, n_batch at a time, and store the wanted rows."""
        assert self._batch is not None
        busy = {s.seq for s in steps}
        n_prompt = self._cache.n_prompt
        size = 1 if self.exact else self._batch.capacity
        for lo in range(0, len(steps), size):
            chunk = steps[lo : lo + size]
            self._batch.fill(
                [s.node.token for s in chunk],
                [n_prompt + s.node.depth - 1 for s in chunk],
                [s.seq for s in chunk],
                [s.want_row for s in chunk],
            )
            self._decode(busy)
            self.counters.tokens_evaluated += len(chunk)
            for i, step in enumerate(chunk):
                if step.want_row:
                    step.node.row = self._read_row(i)
            self._cache.commit(chunk)

    def _decode(self, busy: set[int]) -> None:
        """One llama_decode of the filled batch; on a full KV cache, free cells outside
        `busy` (the sequences of this round) and retry. The exact path frees nothing in
        place: it starts again from the prompt (`_restart_from_prompt`)."""
        assert self._ctx is not None and self._batch is not None
        while True:
            status = self._ctx.decode(self._batch)
            self.counters.forward_passes += 1
            if status == 0:
                self._restarted = False
                return
            if status == 1 and self.exact and not self._restarted:
                raise _CellsExhausted
            if status == 1 and not self.exact and self._cache.reclaim(busy):
                continue
            if status == 1:
                raise ModelMemoryFull(
                    f"the KV cache is full (n_ctx={self.n_ctx} cells, "
                    f"{self._cache.cells_used()} in use by {self._cache.n_sequences} "
                    "sequences): raise n_ctx, or keep fewer branches alive"
                )
            raise LvrError(f"llama_decode failed with status {status}: {recent_errors()}")

    def _restart_from_prompt(self) -> None:
        """The exact path's answer to a full cache: evaluate the prompt again from an
        empty memory. Rows already computed stay valid (they are the same numbers);
        branches are re-evaluated as they are asked for."""
        self.counters.restarts += 1
        self._evaluate_from_empty(self._prompt)

    def _evaluate_from_empty(self, tokens: list[int]) -> None:
        """Clear llama.cpp's memory and evaluate `tokens` as the prompt from cell 0, so
        that its cells lie in position order (the exact path)."""
        assert self._ctx is not None
        self._ctx.clear()
        self._restarted = True  # no cell for the prompt itself now: a full-cache error
        home = self._cache.home
        self._cache.forget_cells(home)
        self._decode_prompt_tail(home, tokens, 0)

    def _read_row(self, i: int) -> np.ndarray:
        assert self._ctx is not None
        row = self._ctx.logits_row(i, self._n_vocab)
        row.flags.writeable = False
        return row

    def _update_gauges(self) -> None:
        c = self.counters
        c.sequence_copies = self._cache.copies
        c.evictions = self._cache.evictions
        c.alive_sequences = self._cache.n_sequences
        c.kv_cells_used = self._cache.cells_used()
        c.peak_kv_cells = max(c.peak_kv_cells, c.kv_cells_used)

    # ----- checks -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._ctx is None:
            raise LvrError("this model backend is closed")

    def _check_ready(self) -> None:
        self._check_open()
        if not self._prompt:
            raise InternalError("set_prompt must be called before next_logits")

    def _check_prompt(self, tokens: list[int]) -> None:
        if not tokens:
            raise LvrError("the prompt is empty: it needs at least one token")
        if len(tokens) > self.n_ctx:
            raise LvrError(
                f"the prompt has {len(tokens)} tokens but the context holds only "
                f"{self.n_ctx} (raise n_ctx, or shorten the prompt)"
            )
        self._check_tokens(tokens)

    def _checked_prefix(self, prefix: Sequence[int]) -> TokenPrefix:
        key = prefix if type(prefix) is tuple else tuple(int(t) for t in prefix)
        if len(self._prompt) + len(key) > self.n_ctx:
            raise LvrError(
                f"prompt ({len(self._prompt)} tokens) plus prefix ({len(key)} tokens) "
                f"exceed the context of {self.n_ctx} tokens (raise n_ctx)"
            )
        # Only the newest token: the others were checked when their prefix was asked
        # for, and llama_decode rejects any id that slipped through (-> LvrError).
        if key and not 0 <= key[-1] < self._n_vocab:
            self._check_tokens(key)
        return key

    def _check_tokens(self, tokens: Sequence[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self._n_vocab]
        if bad:
            raise LvrError(f"token id {bad[0]} is outside the vocabulary (0..{self._n_vocab - 1})")

    # ----- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        """Free the batch, the context and the model (in that order)."""
        for name in ("_batch", "_ctx", "_model"):
            handle = getattr(self, name, None)
            if handle is not None:
                handle.close()
                setattr(self, name, None)

    def __enter__(self) -> LlamaBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class _CellsExhausted(Exception):
    """The exact path found no KV cell after all those in use (see set_exact)."""


def _check_sizes(n_ctx: int, n_batch: int, n_seq_max: int) -> None:
    if n_ctx < 0:
        raise LvrError(f"n_ctx must be positive (or 0 for the model's own), not {n_ctx}")
    if n_batch < 1:
        raise LvrError(f"n_batch must be at least 1, not {n_batch}")
    if not 1 <= n_seq_max < MAX_SEQUENCES:  # one more id is the exact path's pin
        raise LvrError(f"n_seq_max must be between 1 and {MAX_SEQUENCES - 1}, not {n_seq_max}")
    if n_seq_max > n_batch:  # llama.cpp aborts the process on this one
        raise LvrError(f"n_batch ({n_batch}) must be at least n_seq_max ({n_seq_max})")
