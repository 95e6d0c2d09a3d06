"""The continuous-batching scheduler: one background thread owns the model and decodes every active
sequence together, one token per step, admitting waiting requests as soon as a slot frees up.

KV cache layout ("shared timeline, right-aligned rows")
-------------------------------------------------------
Every layer gets a `SlotCache` of shape (max_batch, kv_heads, capacity, head_dim). Active sequences
occupy rows 0..n-1 (kept contiguous, so a decode step reads plain views, never gathered copies). All
rows share one column counter `end`: each decode step writes every row's newest token at column
`end`, so a row's tokens sit in columns [row.start, end) and rows of different lengths are simply
left-padded. `model.forward` gets `start_pos=end`, a `key_mask` hiding each row's columns before its
start (stale keys of earlier occupants), and `positions = end - row.start` so rotary angles are those
of the row's own sequence. This keeps model.py's single `start_pos` contract while rows come and go.

- Admission (prefill) runs the new prompt alone (batch 1) into row n at columns [end-P, end); if the
  timeline is shorter than the prompt the active rows are shifted right first.
- A finished row is replaced by the last active row (a copy of one row), keeping rows contiguous.
- When `end` reaches the capacity, the timeline is compacted left by the smallest row start; the
  capacity grows (doubling, up to the context limit) only when the oldest row really needs it.

Cache memory follows the live rows: the buffer holds a power of two of rows (1, 2, 4 … max_batch), grown
when a row is admitted into a full buffer, and both its rows and its columns shrink (halving, with
hysteresis) when rows finish; an idle engine holds one row of `initial_capacity` columns. So one long
prompt costs one row of its length while it runs, and that memory is freed (and trimmed back to the OS)
when it finishes. What remains of the shared timeline: while rows run *together*, each of them spans the
columns of the oldest one (a long and a short row cost two long rows); a paged cache (per-row block
tables) would remove that, at the price of a gathered attention in the decode kernels.
Prefill is not chunked: a long prompt delays the next decode step of the other rows by its prefill time.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

log = logging.getLogger("llamaworks.serve")


class QueueFullError(RuntimeError):
    """The waiting queue is full: answer 503 with Retry-After."""


class PromptTooLongError(ValueError):
    """The prompt leaves no room in the context: answer 400 context_length_exceeded."""


# -- events the engine sends to a request's consumer (called from the engine thread) -----------------
@dataclass
class TokenInfo:
    id: int
    text: str
    logprob: float | None = None
    top: list[tuple[int, str, float]] | None = None  # (token id, token text, logprob), best first


@dataclass
class TokenEvent:
    index: int                  # choice index within the request
    text: str                   # newly released text (may be "" while a possible stop string is held back)
    tokens: list[TokenInfo]     # the token(s) generated this step (logprobs filled when asked for)


@dataclass
class FinishEvent:
    index: int
    reason: str                 # "stop" | "length" | "cancelled" | "error"
    text: str                   # the whole completion text (stop string excluded)
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = TokenEvent | FinishEvent


@dataclass
class EngineStats:
    decode_steps: int = 0
    decode_rows: int = 0          # sum over decode steps of the number of sequences decoded together
    max_rows_in_step: int = 0
    multi_row_steps: int = 0      # decode steps that held more than one sequence
    prefills: int = 0
    generated_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0
    errors: int = 0
    active: int = 0
    waiting: int = 0
    kv_cache_bytes: int = 0       # keys + values the engine holds right now (all layers)
    kv_cache_rows: int = 0        # rows of the cache buffer (a power of two up to max_batch)
    kv_cache_columns: int = 0     # positions per row

    @property
    def mean_batch(self) -> float:
        return self.decode_rows / self.decode_steps if self.decode_steps else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mean_batch": round(self.mean_batch, 3)}


# -- the KV cache the engine installs into each attention layer -------------------------------------
class _Rows:
    """Which cache rows the next forward reads/writes (shared by all layers)."""

    def __init__(self) -> None:
        self.rows = slice(0, 0)


class SlotCache(torch.nn.Module):
    """Stands in for model.KVCache: `update(start_pos, k, v)` writes only the selected rows.

    A Module (so it can replace a KVCache child) whose tensors are plain attributes, not buffers: they are
    never part of the model's state dict.
    """

    def __init__(self, rows: _Rows, k: Tensor, v: Tensor) -> None:
        super().__init__()
        self._rows, self.k, self.v = rows, k, v

    @property
    def rows(self) -> slice:
        """The rows of the shared buffer this forward call works on (the runtime's native step reads it)."""
        return self._rows.rows

    def update(self, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        rows, end = self._rows.rows, start_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"serving KV cache holds {self.k.shape[2]} positions, {end} requested")
        self.k[rows, :, start_pos:end] = k
        self.v[rows, :, start_pos:end] = v
        return self.k[rows, :, :end], self.v[rows, :, :end]


# -- one sequence (one choice of one request) ---------------------------------------------------------
@dataclass
class _Sequence:
    request: Request
    index: int
    params: object                      # llamaworks.generate.SamplingParams
    generator: torch.Generator | None
    text: object                        # llamaworks.generate.StopStringFilter (UTF-8 safe, stop strings)
    max_new: int
    stop_ids: set[int]
    history: list[int]                  # prompt + generated: what the sampler's penalties look at
    json_state: object | None = None
    row: int = -1
    start: int = 0
    generated: list[int] = field(default_factory=list)
    finished: bool = False


class Request:
    """Handle returned by `Engine.submit`; `cancel()` stops generation at the next step."""

    def __init__(self, prompt_ids: list[int], emit: Callable[[Event], None], logprobs: int | None,
                 json_mode: bool) -> None:
        self.prompt_ids = prompt_ids
        self.emit = emit
        self.logprobs = logprobs
        self.json_mode = json_mode
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Owns `model` in a background thread; `submit()` is thread-safe and never blocks on the model."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_batch: int = 8, queue_size: int = 64,
                 max_context: int | None = None, initial_capacity: int = 256) -> None:
        if max_batch < 1 or queue_size < 1:
            raise ValueError("max_batch and queue_size must be at least 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.max_context = min(max_context or model.config.max_seq_len, model.config.max_seq_len)
        self.stats = EngineStats()
        self.stop_ids: set[int] = set(getattr(tokenizer, "stop_ids", None) or {tokenizer.eos_id})
        self._initial_capacity = max(16, min(initial_capacity, self.max_context))
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._rows = _Rows()
        self._caches: list[SlotCache] = []
        self._end = 0
        self._json_grammar = None
        self._token_texts: list[str] | None = None
        self._last_prefill: tuple[Request, _Sequence, Tensor] | None = None  # (request, seq, last logits)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._running:
            return self
        self._allocate(self._initial_capacity, 1)
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="llamaworks-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for seq in list(self._waiting) + self._active:
            self._finish(seq, "cancelled")
        self._waiting.clear()
        self._active.clear()
        self.model.clear_cache()

    @property
    def running(self) -> bool:
        return self._running

    # -- requests -----------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params, emit: Callable[[Event], None], *, n: int = 1,
               logprobs: int | None = None, json_mode: bool = False) -> Request:
        """Queue `n` sequences sharing `prompt_ids`. Raises QueueFullError, or ValueError for a prompt
        that leaves no room in the context."""
        from ..generate import StopStringFilter
        from ..tokenizer import StreamDecoder

        if not prompt_ids:
            raise ValueError("prompt: at least one token expected")
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise PromptTooLongError(f"prompt: {len(prompt_ids)} tokens leave no room in the {self.max_context}-token "
                                     "context")
        request = Request(list(prompt_ids), emit, logprobs, json_mode)
        seqs = []
        stop_ids = self.stop_ids | {int(t) for t in params.stop_token_ids}
        for i in range(n):
            # Choice i of a seeded request draws from seed + i: reproducible, yet the n choices differ.
            seed = params.seed + i if params.seed is not None else random.getrandbits(63)
            if seed >= 1 << 64:  # seed + i past 64 bits wraps around (the API accepts any 64-bit seed)
                seed -= 1 << 64
            generator = torch.Generator(device=self._device).manual_seed(seed)
            max_new = min(params.max_new_tokens, room)
            text = StopStringFilter(self.tokenizer, params.stop)
            # Decode the reply as a continuation of the prompt (SentencePiece keeps a leading space).
            text.decoder = StreamDecoder(self.tokenizer, prompt_ids=prompt_ids)
            seq = _Sequence(request, i, params, generator, text, max_new, stop_ids, list(prompt_ids))
            if json_mode:  # the grammar's token table is built lazily in the engine thread, not here
                from .constrained import JsonState

                seq.json_state = JsonState()
            seqs.append(seq)
        with self._cond:
            if not self._running:
                raise QueueFullError("the engine is not running")
            if len(self._waiting) + n > self.queue_size:
                self.stats.rejected += 1
                raise QueueFullError(f"the request queue is full ({self.queue_size} waiting)")
            self._waiting.extend(seqs)
            self.stats.waiting = len(self._waiting)
            self._cond.notify_all()
        return request

    @property
    def json_grammar(self):
        if self._json_grammar is None:
            from .constrained import JsonGrammar

            self._json_grammar = JsonGrammar.for_tokenizer(self.tokenizer)
        return self._json_grammar

    def token_text(self, token_id: int) -> str:
        """The text of one token, as shown in logprobs."""
        if self._token_texts is None:
            from .constrained import token_strings

            self._token_texts = token_strings(self.tokenizer)
        if 0 <= token_id < len(self._token_texts):
            return self._token_texts[token_id]
        return ""

    # -- the loop -----------------------------------------------------------------------------------
    @property
    def _device(self) -> torch.device:
        return self.model.norm.weight.device

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._waiting and not self._active:
                    self._cond.wait()
                if not self._running:
                    return
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    self._admit()
                    if self._active:
                        self._decode_step()
            except Exception as exc:  # keep serving: fail the sequences in flight, rebuild the cache
                log.exception("engine step failed")
                self.stats.errors += 1
                for seq in list(self._active):
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
                self._active.clear()
                self.stats.active = 0
                self._end = 0
                self._last_prefill = None
                self._allocate(self._initial_capacity, 1)

    def _drop_cancelled(self) -> None:
        with self._cond:
            for seq in [s for s in self._waiting if s.request.cancelled.is_set()]:
                self._waiting.remove(seq)
                self._finish(seq, "cancelled")
            self.stats.waiting = len(self._waiting)
        for seq in [s for s in self._active if s.request.cancelled.is_set()]:
            self._release(seq, "cancelled")

    def _admit(self) -> None:
        while len(self._active) < self.max_batch:
            with self._cond:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
                self.stats.waiting = len(self._waiting)
            try:
                self._prefill(seq)
            except Exception as exc:
                if seq not in self._active:  # never leave a popped request without an answer
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
                raise

    # -- cache management ---------------------------------------------------------------------------
    def _allocate(self, capacity: int, rows: int | None = None) -> None:
        """(Re)allocate the cache as `rows` x `capacity` columns, keeping the active rows' columns [0, end)."""
        cfg = self.model.config
        dtype = self.model.kv_cache_dtype()
        rows = rows or self.rows_capacity
        shape = (rows, cfg.kv_heads, capacity, cfg.head_size)
        old = self._caches
        n, end = len(self._active), min(self._end, capacity)
        self._caches = []
        for i, layer in enumerate(self.model.layers):
            k = torch.zeros(shape, dtype=dtype, device=self._device)
            v = torch.zeros(shape, dtype=dtype, device=self._device)
            if old and n and end:
                k[:n, :, :end] = old[i].k[:n, :, :end]
                v[:n, :, :end] = old[i].v[:n, :, :end]
                old[i].k = old[i].v = None  # free layer by layer: the peak is one layer's copy, not two caches
            cache = SlotCache(self._rows, k, v)
            self._caches.append(cache)
            layer.attention.cache = cache
        shrunk = bool(old) and self.stats.kv_cache_bytes > 0 and \
            2 * len(self.model.layers) * k.numel() * k.element_size() < self.stats.kv_cache_bytes
        self.stats.kv_cache_rows, self.stats.kv_cache_columns = rows, capacity
        self.stats.kv_cache_bytes = 2 * len(self.model.layers) * k.numel() * k.element_size()
        del old
        if shrunk:
            _release_free_memory()

    @property
    def capacity(self) -> int:
        return self._caches[0].k.shape[2]

    @property
    def rows_capacity(self) -> int:
        return self._caches[0].k.shape[0] if self._caches else 1

    def _fit(self) -> None:
        """Shrink the cache to what the active rows need (called when rows finish): halve the rows while at most
        a quarter are used, and the columns while the live span uses at most a quarter (never below the initial
        size); an idle engine goes back to one row of `initial_capacity`."""
        n = len(self._active)
        rows, capacity = self.rows_capacity, self.capacity
        if not n:
            self._end = 0
            if rows > 1 or capacity > self._initial_capacity:
                self._allocate(self._initial_capacity, 1)
            return
        while rows > 1 and n <= rows // 4:
            rows //= 2
        lo = min(s.start for s in self._active)
        span = self._end - lo
        while capacity > self._initial_capacity and span + 1 <= capacity // 4:
            capacity //= 2
        if rows == self.rows_capacity and capacity == self.capacity:
            return
        if lo:
            self._shift(-lo)
        self._allocate(max(capacity, self._initial_capacity), rows)

    def _ensure_row(self, row: int) -> None:
        """Make row index `row` exist (doubling the rows, up to max_batch)."""
        rows = self.rows_capacity
        if row < rows:
            return
        while rows <= row:
            rows *= 2
        self._allocate(self.capacity, min(rows, self.max_batch))

    def _shift(self, delta: int) -> None:
        """Move the active rows' columns by `delta` (right if positive) and the timeline with them."""
        n, end = len(self._active), self._end
        lo = min(s.start for s in self._active)
        for c in self._caches:
            for t in (c.k, c.v):
                t[:n, :, lo + delta:end + delta] = t[:n, :, lo:end].clone()
        for s in self._active:
            s.start += delta
        self._end += delta

    def _ensure_room(self, needed_end: int) -> None:
        """Make `needed_end` columns available (compacting first, then growing)."""
        if needed_end <= self.capacity:
            return
        if self._active:
            lo = min(s.start for s in self._active)
            if lo:
                self._shift(-lo)
                needed_end -= lo
        if needed_end > self.capacity:
            capacity = self.capacity
            while capacity < needed_end:
                capacity *= 2
            capacity = min(capacity, self.max_context)
            if capacity < needed_end:
                raise RuntimeError(f"sequence needs {needed_end} positions, context is {self.max_context}")
            self._allocate(capacity)

    def _move_row(self, src: int, dst: int) -> None:
        for c in self._caches:
            c.k[dst, :, :self._end] = c.k[src, :, :self._end]
            c.v[dst, :, :self._end] = c.v[src, :, :self._end]

    # -- model steps --------------------------------------------------------------------------------
    def _prefill(self, seq: _Sequence) -> None:
        prompt = seq.request.prompt_ids
        P = len(prompt)
        if not self._active:
            self._end = 0
        if self._end < P:
            self._ensure_room(P + 1)
            if self._active:
                self._shift(P - self._end)
            self._end = P
        row = len(self._active)
        self._ensure_row(row)
        start = self._end - P
        sibling = self._last_prefill
        if (sibling is not None and sibling[0] is seq.request and sibling[1] in self._active
                and sibling[1].start == start):
            # Another choice of the same request, admitted before any decode step: copy its prompt's keys
            # and values and reuse its logits instead of running the prompt again.
            src = sibling[1].row
            for c in self._caches:
                c.k[row, :, start:self._end] = c.k[src, :, start:self._end]
                c.v[row, :, start:self._end] = c.v[src, :, start:self._end]
            logits = sibling[2]
        else:
            tokens = torch.tensor([prompt], dtype=torch.long, device=self._device)
            key_mask = None
            if start:
                key_mask = torch.arange(self._end, device=self._device).unsqueeze(0) >= start
            self._rows.rows = slice(row, row + 1)
            logits = self.model(tokens, start, key_mask=key_mask,
                                positions=torch.arange(P, device=self._device).unsqueeze(0), last_only=True)[:, -1]
            self.stats.prefills += 1
        seq.row, seq.start = row, start
        self._active.append(seq)
        self._last_prefill = (seq.request, seq, logits)
        self.stats.active = len(self._active)
        self._sample_and_emit([seq], logits)

    def _decode_step(self) -> None:
        self._last_prefill = None
        n = len(self._active)
        self._ensure_room(self._end + 1)
        end = self._end
        dev = self._device
        tokens = torch.tensor([[s.generated[-1]] for s in self._active], dtype=torch.long, device=dev)
        starts = torch.tensor([s.start for s in self._active], dtype=torch.long, device=dev)
        positions = (end - starts).unsqueeze(1)
        key_mask = None
        if bool((starts > 0).any()):
            key_mask = torch.arange(end + 1, device=dev).unsqueeze(0) >= starts.unsqueeze(1)
        self._rows.rows = slice(0, n)
        logits = self.model(tokens, end, key_mask=key_mask, positions=positions)
        self._end = end + 1
        self.stats.decode_steps += 1
        self.stats.decode_rows += n
        self.stats.max_rows_in_step = max(self.stats.max_rows_in_step, n)
        if n > 1:
            self.stats.multi_row_steps += 1
        self._sample_and_emit(list(self._active), logits[:, -1])

    def _sample_and_emit(self, seqs: list[_Sequence], logits: Tensor) -> None:
        from ..generate import sample_next, token_logprobs

        if any(s.json_state is not None for s in seqs):
            logits = logits.float().clone()
            for i, s in enumerate(seqs):
                if s.json_state is not None:
                    allowed = self.json_grammar.allowed(s.json_state, s.stop_ids, logits.shape[-1])
                    logits[i].masked_fill_(~allowed.to(logits.device), float("-inf"))
        params = [s.params for s in seqs]
        histories = [s.history for s in seqs]
        want_lp = [s.request.logprobs is not None for s in seqs]
        # Logprobs are taken before sampling: they must see the histories without the new token.
        logp = token_logprobs(logits, params, histories) if any(want_lp) else None
        next_ids = sample_next(logits, params, histories, [s.generator for s in seqs]).tolist()
        for i, (seq, tok) in enumerate(zip(seqs, next_ids)):
            info = TokenInfo(tok, self.token_text(tok) if want_lp[i] else "")
            if want_lp[i]:
                info.logprob = float(logp[i, tok])
                k = seq.request.logprobs or 0
                if k > 0:
                    vals, ids = torch.topk(logp[i], k)
                    info.top = [(int(t), self.token_text(int(t)), float(v)) for v, t in zip(vals, ids)]
            self._advance(seq, tok, info)

    def _advance(self, seq: _Sequence, tok: int, info: TokenInfo) -> None:
        """Account for one sampled token: stop tokens, stop strings, JSON completion, length limit."""
        self.stats.generated_tokens += 1
        seq.generated.append(tok)
        seq.history.append(tok)
        text = seq.text
        if tok in seq.stop_ids:
            self._emit(seq, text.finish(), [info])
            self._release(seq, "stop")
            return
        chunk = text.push(tok)
        tokens_out = [info]
        if seq.json_state is not None:
            seq.json_state = self.json_grammar.advance(seq.json_state, tok)
            remaining = seq.max_new - len(seq.generated)
            if not self.json_grammar.is_complete(seq.json_state):
                # Keep the output parseable within max_tokens: append the closing tokens while they fit.
                closing = self.tokenizer.encode(self.json_grammar.closing_text(seq.json_state), add_bos=False)
                if closing and len(closing) + 1 > remaining:
                    for t in closing:
                        seq.generated.append(t)
                        seq.history.append(t)
                        chunk += text.push(t)
                        tokens_out.append(TokenInfo(t, self.token_text(t) if info.logprob is not None else ""))
                    self._emit(seq, chunk + text.finish(), tokens_out)
                    self._release(seq, "length")
                    return
        if text.stopped:
            self._emit(seq, chunk, tokens_out)
            self._release(seq, "stop")
        elif len(seq.generated) >= seq.max_new:
            chunk += text.finish()
            self._emit(seq, chunk, tokens_out)
            self._release(seq, "stop" if text.stopped else "length")
        else:
            self._emit(seq, chunk, tokens_out)

    def _emit(self, seq: _Sequence, text: str, tokens_out: list[TokenInfo]) -> None:
        self._send(seq, TokenEvent(seq.index, text, tokens_out))

    def _send(self, seq: _Sequence, event: Event) -> None:
        try:
            seq.request.emit(event)
        except Exception:  # a consumer that went away must not take the engine down
            log.exception("request consumer failed")
            seq.request.cancel()

    def _release(self, seq: _Sequence, reason: str) -> None:
        """Remove an active sequence (keeping rows contiguous) and tell its consumer."""
        if seq in self._active:
            i = self._active.index(seq)
            last = len(self._active) - 1
            if i != last:
                moved = self._active[last]
                self._move_row(moved.row, i)
                moved.row = i
                self._active[i] = moved
            self._active.pop()
            self.stats.active = len(self._active)
            if self._last_prefill is not None and self._last_prefill[1] is seq:
                self._last_prefill = None
            self._fit()
        self._finish(seq, reason)

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        if reason == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
        # Like generate.py: token_ids include a final stop token (counted in usage), the text does not.
        self._send(seq, FinishEvent(seq.index, reason, seq.text.text, list(seq.generated),
                                    len(seq.request.prompt_ids), len(seq.generated), error))


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps freed blocks below its mmap threshold otherwise)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _malloc_trim = libc.malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
