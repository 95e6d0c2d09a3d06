"""THE generation loop: one scheduler over a backend's KV cache rows, used by `generate`, `chat`, `serve`, the
Python API and rejection sampling alike (one row for a chat, `max_rows` for the server).

Each step is one `backend.forward` call that holds
- one token for every sequence that is decoding, and
- the next chunk of the prompts still being read (chunked prefill): all of a prompt when nothing else is decoding,
  else only enough tokens to fill one pass of the decode kernels, so a long prompt never stalls the other streams
  for more than a fraction of a step;
then every sequence whose last fed token was scored samples its next token with the one sampler
(`sampling.sample_token`) and advances its stop-token / stop-string / length state.

Rows and the prefix cache: the scheduler knows which tokens fill each row's positions. A new sequence goes to the
free row that already holds the longest prefix of its prompt (a chat's earlier turns, a shared system prompt), or,
when a busy row holds a longer one, that prefix is copied over (`backend.copy`); only the rest is computed. When a
sequence finishes its row keeps up to `keep_prefix` positions for the next request and releases the rest, so
memory follows the live rows.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..sampling import (
    ContextLengthError,
    GenerationResult,
    SamplingParams,
    StopStringFilter,
    sample_token,
    stop_ids,
    token_logprobs,
)
from .backend import Backend

log = logging.getLogger("llamaworks.engine")


# A prompt token beside decoding rows costs about as much for its share of the weights as its attention over this
# many positions (measured on SmolLM2: ~0.7 ms against ~1.5 us per position); the cost model's one fixed shape.
POSITION_OFFSET = 512


class QueueFullError(RuntimeError):
    """The waiting queue is full (the server answers 503 with Retry-After)."""


class PromptTooLongError(ContextLengthError):
    """The prompt leaves no room in the context (the server answers 400 context_length_exceeded)."""


# -- events sent to a request's consumer (from the thread that runs the steps) --------------------------------
@dataclass
class TokenInfo:
    id: int
    text: str
    logprob: float | None = None
    top: list[tuple[int, str, float]] | None = None  # (token id, token text, logprob), best first


@dataclass
class TokenEvent:
    index: int  # choice index within the request
    text: str  # newly released text ("" while a possible stop string is held back)
    tokens: list[TokenInfo]  # the token(s) generated this step


@dataclass
class FinishEvent:
    index: int
    reason: str  # "stop" | "length" | "cancelled" | "error"
    text: str  # the whole completion (stop string excluded)
    token_ids: list[int]  # every sampled id, a final stop token included
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    stop_sequence: str | int | None = None
    prefill_seconds: float = 0.0  # admission to the first sampled token
    decode_seconds: float = 0.0  # first sampled token to the last
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (not computed)


Event = TokenEvent | FinishEvent


@dataclass
class EngineStats:
    steps: int = 0
    decode_steps: int = 0  # steps that decoded at least one sequence
    decode_rows: int = 0  # sum over those steps of the sequences decoded together
    max_rows_in_step: int = 0
    multi_row_steps: int = 0
    prefills: int = 0  # sequences whose prompt needed computing
    prefill_tokens: int = 0  # prompt tokens computed
    cached_prompt_tokens: int = 0  # prompt tokens taken from the prefix cache instead
    generated_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0
    errors: int = 0
    active: int = 0
    waiting: int = 0
    kv_cache_bytes: int = 0  # the backend's resident KV cache after the last step

    @property
    def mean_batch(self) -> float:
        return self.decode_rows / self.decode_steps if self.decode_steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mean_batch": round(self.mean_batch, 3)}


class Request:
    """Handle returned by `Scheduler.submit`; `cancel()` stops its sequences at the next step."""

    def __init__(self, prompt_ids: list[int], emit: Callable[[Event], None], n: int, logprobs: int | None,
                 json_mode: bool) -> None:
        self.prompt_ids = prompt_ids
        self.emit = emit
        self.n = n
        self.logprobs = logprobs
        self.json_mode = json_mode
        self.cancelled = threading.Event()
        self.unfinished = n

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def done(self) -> bool:
        return self.unfinished == 0


class _Sequence:
    """One choice of one request: its sampling state, its stop rules and where its tokens are in the cache."""

    def __init__(self, request: Request, index: int, params: SamplingParams, seed: int, stops: set[int],
                 max_new: int, tokenizer: Any) -> None:
        self.request, self.index, self.params = request, index, params
        self.rng = np.random.default_rng(seed)
        self.stop_ids = stops
        self.max_new = max_new
        self.text = StopStringFilter(tokenizer, params.stop, prompt_ids=request.prompt_ids)
        self.history = list(request.prompt_ids)  # prompt + generated: what the penalties look at
        self.generated: list[int] = []
        self.json_state: Any = None
        self.row = -1
        self.pending: list[int] = []  # tokens to feed before the next sample (prompt rest, or the last sampled)
        self.finished = False
        self.prefill_seconds = self.decode_seconds = 0.0  # step time while reading the prompt / decoding
        self.cached_tokens = 0  # prompt tokens found in the row (or copied) instead of computed

    @property
    def prefilling(self) -> bool:
        return not self.generated


@dataclass
class _Row:
    tokens: list[int] = field(default_factory=list)  # what fills positions 0..len-1 of this cache row
    seq: _Sequence | None = None
    used: float = 0.0  # when it last held a sequence (free rows are reused least recently used first)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n, i = min(len(a), len(b)), 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    """Continuous batching over `backend`'s rows. `submit` is thread-safe; `step` runs on one thread at a time:
    the caller's (`generate_stream`, `run`) or the background thread started by `start()` (the server).

    keep_prefix: positions a finished sequence's row keeps for the next request (None: all of them, as a chat
    wants its earlier turns; the server keeps a bounded prefix so memory returns after a long prompt).
    step_tokens: at most this many tokens per step while other sequences decode (prompt chunks fill the step);
    stall_limit: within that, prompt tokens (shortest prompt first) are added while the predicted step time stays
    within this many decode-only steps of the same rows: both are measured as it runs (a prompt token's cost grows
    with its position), so a long prompt slows the streams' tokens by about that factor at most while it is read;
    prefill_chunk: prompt tokens per step when nothing else is decoding.
    """

    def __init__(self, backend: Backend, *, queue_size: int = 64, keep_prefix: int | None = None,
                 step_tokens: int = 32, stall_limit: float = 2.0, prefill_chunk: int = 256) -> None:
        if queue_size < 1 or step_tokens < 2 or prefill_chunk < 1:
            raise ValueError("queue_size, step_tokens (>= 2) and prefill_chunk must be positive")
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.context = int(backend.config.max_seq_len)
        self.vocab_size = int(backend.config.vocab_size)
        self.queue_size = queue_size
        self.keep_prefix = keep_prefix
        self.step_tokens = step_tokens
        self.stall_limit = stall_limit
        self._decode_seconds: dict[int, float] = {}  # decoding rows -> recent time of a decode-only step
        self._mixed_steps = 0  # steps planned while rows decode and a prompt waits to be read
        self._seconds_per_position = 0.0  # what a prompt token adds per position it attends to (learned)
        self._work = self._work_seconds = 0.0
        self.prefill_chunk = prefill_chunk
        self.stats = EngineStats()
        self._rows = [_Row() for _ in range(backend.max_rows)]
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._step_lock = threading.Lock()
        self._json_grammar: Any = None
        self._token_texts: list[str] | None = None

    @property
    def max_rows(self) -> int:
        return len(self._rows)

    # -- requests ---------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, emit: Callable[[Event], None], *, n: int = 1,
               logprobs: int | None = None, json_mode: bool = False) -> Request:
        """Queue `n` sequences sharing `prompt_ids`. Raises QueueFullError, or PromptTooLongError for a prompt
        that leaves no room in the context; token ids outside the vocabulary are a ValueError."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt: at least one token expected (e.g. BOS)")
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        room = self.context - len(prompt)
        if room < 1:
            raise PromptTooLongError(f"prompt has {len(prompt)} tokens but the context holds {self.context} (at "
                                     "least one more is needed for the reply)")
        request = Request(prompt, emit, n, logprobs, json_mode)
        stops = stop_ids(self.tokenizer, params)
        seqs = []
        for i in range(n):
            # Choice i of a seeded request draws from seed + i: reproducible, yet the n choices differ.
            seed = (params.seed + i) % (1 << 64) if params.seed is not None else random.getrandbits(63)
            seq = _Sequence(request, i, params, seed, stops, min(params.max_new_tokens, room), self.tokenizer)
            if json_mode:
                from ..serve.constrained import JsonState

                seq.json_state = JsonState()
            seqs.append(seq)
        with self._cond:
            if len(self._waiting) + n > self.queue_size:
                self.stats.rejected += 1
                raise QueueFullError(f"the request queue is full ({self.queue_size} waiting)")
            self._waiting.extend(seqs)
            self.stats.waiting = len(self._waiting)
            self._cond.notify_all()
        return request

    def run(self, request: Request) -> None:
        """Step on the caller's thread until `request` is finished (no background thread may be running)."""
        if self._running:
            raise RuntimeError("the scheduler runs on its own thread: wait for the request's events instead")
        while not request.done:
            self.step()

    # -- the background thread (the server) ---------------------------------------------------------------------
    def start(self) -> Scheduler:
        if not self._running:
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
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for seq in waiting + list(self._active):
            self._finish(seq, "cancelled")
        self._active.clear()

    @property
    def running(self) -> bool:
        return self._running

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._waiting and not self._active:
                    self._cond.wait()
                if not self._running:
                    return
            self.step()

    # -- one step -------------------------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit waiting sequences into free rows, run one forward over every active sequence, sample, emit."""
        with self._step_lock:
            self._drop_cancelled()
            self._admit()
            if not self._active:
                return
            batch = self._plan()
            rows, tokens, positions, scored = batch
            t0 = time.perf_counter()
            try:
                logits = self.backend.forward(rows, tokens, positions, [i for i, _ in scored])
            except Exception as exc:  # keep serving: fail the sequences of this step, forget their rows' contents
                log.exception("engine step failed")
                self.stats.errors += 1
                for seq in list(self._active):
                    self._rows[seq.row].tokens = []
                    self._release(seq, "error", error=f"{type(exc).__name__}: {exc}")
                return
            seconds = time.perf_counter() - t0
            self._account(batch, seconds)
            for (_, seq), row_logits in zip(scored, logits):
                self._sample(seq, row_logits)
            self.stats.kv_cache_bytes = self.backend.cache_bytes()

    def _plan(self) -> tuple[list[int], list[int], list[int], list[tuple[int, _Sequence]]]:
        """The step's tokens: decoding sequences first (one token each), then prompt chunks up to the budget."""
        rows: list[int] = []
        tokens: list[int] = []
        positions: list[int] = []
        scored: list[tuple[int, _Sequence]] = []  # (index of the token whose logits are sampled, sequence)

        def feed(seq: _Sequence, count: int) -> None:
            row = self._rows[seq.row]
            take, seq.pending = seq.pending[:count], seq.pending[count:]
            for t in take:
                rows.append(seq.row)
                tokens.append(t)
                positions.append(len(row.tokens))
                row.tokens.append(t)
            if not seq.pending:
                scored.append((len(tokens) - 1, seq))

        decoding = [s for s in self._active if not s.prefilling]
        for seq in decoding:
            feed(seq, 1)
        # Shortest prompt first: a short request arriving during a long prompt is answered without waiting for it.
        prefilling = sorted((s for s in self._active if s.prefilling), key=lambda s: len(s.pending))
        if not decoding:
            budget = self.prefill_chunk
            for seq in prefilling:
                count = min(budget, len(seq.pending))
                feed(seq, count)
                budget -= count
            return rows, tokens, positions, scored
        if not prefilling:
            return rows, tokens, positions, scored
        self._mixed_steps += 1
        if self._mixed_steps % 8 == 0:
            return rows, tokens, positions, scored  # every 8th leaves prompts out: what does decoding alone cost now?
        room = max(self.step_tokens - len(decoding), 1)
        seconds_left = self._prompt_seconds(len(decoding))
        taken = 0
        for seq in prefilling:
            start, count = len(self._rows[seq.row].tokens), 0
            while count < len(seq.pending) and taken < room:
                cost = self._token_cost(start + count)
                if cost > seconds_left and taken:  # at least one prompt token per step: every prompt advances
                    break
                seconds_left -= cost
                count += 1
                taken += 1
            if count:
                feed(seq, count)
        return rows, tokens, positions, scored

    def _prompt_seconds(self, decoding: int) -> float:
        """Time a step may spend on prompt tokens beside `decoding` rows: (stall_limit - 1) decode-only steps."""
        if not self._decode_seconds:
            return float("inf")  # nothing measured yet: this step teaches the costs
        nearest = min(self._decode_seconds, key=lambda n: abs(n - decoding))  # rows come and go
        return (self.stall_limit - 1.0) * self._decode_seconds[nearest]

    def _token_cost(self, position: int) -> float:
        """Predicted seconds one prompt token at `position` adds to a step: proportional to the positions its
        attention reads plus a constant for its share of the weights (0 until a step has been measured)."""
        return self._seconds_per_position * (position + POSITION_OFFSET)

    def _account(self, batch: tuple[list[int], list[int], list[int], list[tuple[int, _Sequence]]],
                 seconds: float) -> None:
        rows, tokens, positions, scored = batch
        prompt_rows = {s.row for s in self._active if s.prefilling}
        self.stats.steps += 1
        decoded = [s for _, s in scored if not s.prefilling]
        n = len(decoded)
        if n:
            self.stats.decode_steps += 1
            self.stats.decode_rows += n
            self.stats.max_rows_in_step = max(self.stats.max_rows_in_step, n)
            self.stats.multi_row_steps += n > 1
        self.stats.prefill_tokens += len(tokens) - n
        self._learn_costs(n, [p for p, row in zip(positions, rows) if row in prompt_rows], seconds)
        for seq in self._active:
            if seq.prefilling:
                seq.prefill_seconds += seconds
            else:
                seq.decode_seconds += seconds

    def _learn_costs(self, decoding: int, prompt_positions: list[int], seconds: float) -> None:
        """Learn what a decode-only step of `decoding` rows costs now (it grows with their lengths) and, from the
        steps that carried prompt tokens beside them, the seconds per unit of `position + POSITION_OFFSET` a prompt
        token adds (a ratio over recent steps, older ones fading)."""
        if not decoding:
            return
        base = self._decode_seconds.get(decoding)
        if not prompt_positions:
            self._decode_seconds[decoding] = seconds if base is None else 0.5 * base + 0.5 * seconds
            return
        if base is None:
            return
        self._work = 0.8 * self._work + sum(p + POSITION_OFFSET for p in prompt_positions)
        self._work_seconds = 0.8 * self._work_seconds + max(seconds - base, 0.0)
        self._seconds_per_position = self._work_seconds / self._work

    # -- admission and the prefix cache -----------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        with self._cond:
            dropped = [s for s in self._waiting if s.request.cancelled.is_set()]
            for seq in dropped:
                self._waiting.remove(seq)
            self.stats.waiting = len(self._waiting)
        for seq in dropped:
            self._finish(seq, "cancelled")
        for seq in [s for s in self._active if s.request.cancelled.is_set()]:
            self._release(seq, "cancelled")

    def _admit(self) -> None:
        free = [i for i, r in enumerate(self._rows) if r.seq is None]
        if not free:
            return
        with self._cond:
            chosen: list[_Sequence] = []
            deferred: list[_Sequence] = []
            while self._waiting and len(chosen) < len(free):
                seq = self._waiting.popleft()
                # A sibling choice whose prompt another row is still reading waits for it, then copies it.
                if any(s.request is seq.request and s.prefilling for s in self._active + chosen):
                    deferred.append(seq)
                else:
                    chosen.append(seq)
            self._waiting.extendleft(reversed(deferred))
            self.stats.waiting = len(self._waiting)
        for seq in chosen:
            self._place(seq)

    def _place(self, seq: _Sequence) -> None:
        prompt = seq.request.prompt_ids
        free = [i for i, r in enumerate(self._rows) if r.seq is None]
        shared = {i: _common_prefix(self._rows[i].tokens, prompt) for i in free}
        best_free = max(free, key=lambda i: (shared[i], -self._rows[i].used))
        busy = [(_common_prefix(self._rows[s.row].tokens, prompt), s.row) for s in self._active]
        best_busy = max(busy, default=(0, -1))
        limit = len(prompt) - 1  # the last prompt token always runs: its logits give the first sample
        if best_busy[0] > shared[best_free]:
            # Copy the busy row's prefix into the free row holding the least (least recently used among equals).
            row = min(free, key=lambda i: (shared[i], self._rows[i].used))
            reused = min(best_busy[0], limit)
            self.backend.copy(best_busy[1], row, reused)
            self._rows[row].tokens = self._rows[best_busy[1]].tokens[:reused]
        else:
            row = best_free
            reused = min(shared[row], limit)
            del self._rows[row].tokens[reused:]
        self._rows[row].seq = seq
        seq.row, seq.pending = row, list(prompt[reused:])
        seq.cached_tokens = reused
        self._active.append(seq)
        self.stats.prefills += 1
        self.stats.cached_prompt_tokens += reused
        self.stats.active = len(self._active)

    # -- sampling and stopping ---------------------------------------------------------------------------------
    @property
    def json_grammar(self) -> Any:
        if self._json_grammar is None:
            from ..serve.constrained import JsonGrammar

            self._json_grammar = JsonGrammar.for_tokenizer(self.tokenizer)
        return self._json_grammar

    def token_text(self, token_id: int) -> str:
        """The text of one token, as shown in logprobs."""
        if self._token_texts is None:
            from ..serve.constrained import token_strings

            self._token_texts = token_strings(self.tokenizer)
        return self._token_texts[token_id] if 0 <= token_id < len(self._token_texts) else ""

    def _sample(self, seq: _Sequence, logits: np.ndarray) -> None:
        allowed = None
        if seq.json_state is not None:
            allowed = self.json_grammar.allowed(seq.json_state, seq.stop_ids, logits.shape[-1])
        want = seq.request.logprobs
        # Log-probabilities see the history without the new token, as the sampler does.
        logp = token_logprobs(logits, seq.params, seq.history) if want is not None else None
        token = sample_token(logits, seq.params, seq.history, seq.rng, allowed)
        info = TokenInfo(token, self.token_text(token) if logp is not None else "")
        if logp is not None:
            info.logprob = float(logp[token])
            if want:
                top = np.argsort(-logp, kind="stable")[:want]
                info.top = [(int(t), self.token_text(int(t)), float(logp[t])) for t in top]
        self._advance(seq, token, info)

    def _advance(self, seq: _Sequence, token: int, info: TokenInfo) -> None:
        """Account for one sampled token: stop tokens, stop strings, JSON completion, the length limit."""
        self.stats.generated_tokens += 1
        seq.generated.append(token)
        seq.history.append(token)
        text = seq.text
        if token in seq.stop_ids:
            self._emit(seq, text.finish(), [info])
            self._release(seq, "stop", stop_sequence=token)
            return
        chunk = text.push(token)
        infos = [info]
        if seq.json_state is not None:
            seq.json_state = self.json_grammar.advance(seq.json_state, token)
            remaining = seq.max_new - len(seq.generated)
            if not self.json_grammar.is_complete(seq.json_state):
                # Keep the output parseable within max_tokens: append the closing tokens while they fit.
                closing = self.tokenizer.encode(self.json_grammar.closing_text(seq.json_state), add_bos=False)
                if closing and len(closing) + 1 > remaining:
                    for t in closing:
                        seq.generated.append(t)
                        seq.history.append(t)
                        chunk += text.push(t)
                        infos.append(TokenInfo(t, self.token_text(t) if info.logprob is not None else ""))
                    self._emit(seq, chunk + text.finish(), infos)
                    self._release(seq, "length")
                    return
        if text.stopped:
            self._emit(seq, chunk, infos)
            self._release(seq, "stop", stop_sequence=text.matched)
        elif len(seq.generated) >= seq.max_new:
            chunk += text.finish()
            self._emit(seq, chunk, infos)
            if text.stopped:  # a stop string completed in the decoder's flushed tail
                self._release(seq, "stop", stop_sequence=text.matched)
            else:
                self._release(seq, "length")
        else:
            self._emit(seq, chunk, infos)
            seq.pending = [token]

    def _emit(self, seq: _Sequence, text: str, infos: list[TokenInfo]) -> None:
        self._send(seq, TokenEvent(seq.index, text, infos))

    def _send(self, seq: _Sequence, event: Event) -> None:
        try:
            seq.request.emit(event)
        except Exception:  # a consumer that went away must not take the engine down
            log.exception("request consumer failed")
            seq.request.cancel()

    def _release(self, seq: _Sequence, reason: str, *, error: str | None = None,
                 stop_sequence: str | int | None = None) -> None:
        """Take a sequence out of its row (keeping a bounded prefix for later requests) and tell its consumer."""
        if seq in self._active:
            self._active.remove(seq)
            row = self._rows[seq.row]
            row.seq, row.used = None, time.perf_counter()
            keep = len(row.tokens) if self.keep_prefix is None else min(len(row.tokens), self.keep_prefix)
            del row.tokens[keep:]
            try:
                self.backend.release(seq.row, keep)
            except Exception:  # memory not returned is not worth failing the request for
                log.exception("releasing row %d failed", seq.row)
            self.stats.active = len(self._active)
        self._finish(seq, reason, error=error, stop_sequence=stop_sequence)

    def _finish(self, seq: _Sequence, reason: str, *, error: str | None = None,
                stop_sequence: str | int | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        seq.request.unfinished -= 1
        if reason == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
        self._send(seq, FinishEvent(seq.index, reason, seq.text.text, list(seq.generated),
                                    len(seq.request.prompt_ids), len(seq.generated), error, stop_sequence,
                                    seq.prefill_seconds, seq.decode_seconds, seq.cached_tokens))


def _result(event: FinishEvent) -> GenerationResult:
    """The API's result of a finished sequence (RuntimeError for one that failed)."""
    if event.reason == "error":
        raise RuntimeError(f"generation failed: {event.error}")
    return GenerationResult(text=event.text, token_ids=event.token_ids,
                            finish_reason="stop" if event.reason == "stop" else "length",
                            prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                            prefill_seconds=event.prefill_seconds, decode_seconds=event.decode_seconds,
                            stop_sequence=event.stop_sequence)


# -- synchronous generation on the caller's thread -------------------------------------------------------------
def generate_stream(scheduler: Scheduler, prompt_ids: Sequence[int],
                    params: SamplingParams | None = None) -> Iterator[str | GenerationResult]:
    """Text chunks as they become final (never a partial UTF-8 character, never part of a stop string), then one
    GenerationResult. Raises ContextLengthError before generating when the prompt does not fit."""
    params = params or SamplingParams()
    events: collections.deque[Event] = collections.deque()
    request = scheduler.submit(prompt_ids, params, events.append)
    try:
        while True:
            if not events:
                if request.done:
                    return
                scheduler.step()
                continue
            event = events.popleft()
            if isinstance(event, TokenEvent):
                if event.text:
                    yield event.text
            else:
                yield _result(event)
    finally:
        if not request.done:  # the consumer stopped early: free the row at the next step
            request.cancel()
            scheduler.step()


def generate(scheduler: Scheduler, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> GenerationResult:
    """One completion without streaming."""
    result = None
    for item in generate_stream(scheduler, prompt_ids, params):
        if isinstance(item, GenerationResult):
            result = item
    assert result is not None
    return result


def generate_batch(scheduler: Scheduler, prompts: Sequence[Sequence[int]],
                   params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                   n: int = 1) -> list[GenerationResult]:
    """Completions of several prompts, decoded together in the scheduler's rows. n > 1: n choices per prompt
    sharing its prompt (read once), result i * n + j being choice j of prompt i."""
    if params is None or isinstance(params, SamplingParams):
        params = [params or SamplingParams()] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    if n < 1:
        raise ValueError(f"n={n}: expected at least one choice per prompt")
    finished: dict[int, FinishEvent] = {}
    requests = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        def emit(event: Event, i: int = i) -> None:
            if isinstance(event, FinishEvent):
                finished[i * n + event.index] = event
        requests.append(scheduler.submit(prompt, p, emit, n=n))
    while not all(r.done for r in requests):
        scheduler.step()
    return [_result(finished[i]) for i in range(len(prompts) * n)]


__all__ = ["EngineStats", "Event", "FinishEvent", "PromptTooLongError", "QueueFullError", "Request", "Scheduler",
           "TokenEvent", "TokenInfo", "generate", "generate_batch", "generate_stream"]
