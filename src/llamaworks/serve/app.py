"""The OpenAI-compatible FastAPI app: routes, error shapes, SSE streaming, tool calls, the chat page.

Every request becomes one or more sequences in the scheduler (engine/scheduler.py: one per choice and prompt,
on the native backend by default); its thread calls back with events, which cross into the event loop through
`call_soon_threadsafe` and an asyncio.Queue per request. A streaming client that disconnects cancels its
sequences (the response generator is closed); a non-streaming one is noticed by polling
`request.is_disconnected()`.

No request can hold up the others (docs/security.md):
- `_Guard`, in front of everything: the API key is checked before a body is read (401 first), and bodies larger
  than `max_body_bytes` are refused with 413 without being buffered.
- Chat-template rendering and tokenization run on a small worker pool, never on the event loop; the template runs
  under its own limits (chat_template.TemplateLimits), a prompt too long to ever fit the context is refused from
  its length before it is tokenized, and the whole preparation has a wall-clock budget (`prompt_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.scheduler import FinishEvent, PromptTooLongError, QueueFullError, TokenEvent, TokenInfo
from ..engine.scheduler import Scheduler as Engine
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest

STATIC_DIR = Path(__file__).resolve().parent / "static"
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
MAX_BODY_BYTES = 4 * 1024 * 1024  # default request body cap (`serve --max-body-bytes`)
KEEP_PREFIX = 512  # positions a finished request's cache row keeps for the next request's shared prefix
PROMPT_SECONDS = 10.0  # default wall-clock budget for rendering + tokenizing one request's prompts
PROMPT_WORKERS = 2  # threads that render and tokenize prompts (the event loop never does)
FINGERPRINT = f"llamaworks-{__version__}"
TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
# How a template without its own tool support is told about tools (Hermes / SmolLM2 / Qwen style).
TOOL_SYSTEM_PROMPT = (
    "You are a function calling AI model. You may call one or more functions to assist with the user query. "
    "Here are the available tools: <tools>{tools}</tools> For each function call, return a json object with the "
    'function name and arguments within <tool_call></tool_call> XML tags: <tool_call>{{"name": <function-name>, '
    '"arguments": <args-json-object>}}</tool_call>'
)


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        # A message quoting client text must still encode: lone surrogates become U+FFFD.
        message = self.message.encode("utf-8", "replace").decode("utf-8")
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _Guard:
    """Pure-ASGI front door: API key first (401), then the body size cap (413), both in OpenAI's error shape.

    The body is read here, at most `max_body_bytes` of it, and replayed to the app; a declared Content-Length
    over the cap is refused before anything is read.
    """

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                return await error.response()(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.max_body_bytes
        too_large = APIError(413, f"request body larger than {limit} bytes (the server's --max-body-bytes)",
                             code="request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await too_large.response()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await too_large.response()(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: the client's disconnect, for streaming responses

        return await self.app(scope, replay, send)


def _now() -> int:
    return int(time.time())


class _Server:
    """State shared by the routes: the engine, its tokenizer and chat template, the model's public name."""

    def __init__(self, engine: Engine, model_name: str, chat_template: Any = None,
                 prompt_seconds: float = PROMPT_SECONDS) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.created = _now()
        self._template = chat_template
        self.prompt_seconds = prompt_seconds
        self.max_prompt_chars = prompt_char_limit(self.tokenizer, engine.context)
        self.pool: ThreadPoolExecutor | None = None

    async def prepare(self, fn: Callable, *args: Any) -> Any:
        """Run prompt work (template rendering, tokenization) on the worker pool within `prompt_seconds`."""
        if self.pool is None:
            self.pool = ThreadPoolExecutor(PROMPT_WORKERS, thread_name_prefix="llamaworks-prompt")
        future = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        try:
            return await asyncio.wait_for(future, self.prompt_seconds)
        except asyncio.TimeoutError:
            raise APIError(503, f"preparing the prompt took longer than {self.prompt_seconds:g} s; retry shortly",
                           type="server_error", code="timeout", headers={"Retry-After": "1"}) from None

    def check_length(self, text: str, param: str) -> None:
        """Refuse, before tokenizing, text that cannot fit the context whatever it tokenizes to."""
        if len(text) > self.max_prompt_chars:
            raise APIError(400, f"{param}: {len(text)} characters cannot fit the {self.engine.context}-token "
                           "context", param=param, code="context_length_exceeded")

    @property
    def template(self):
        if self._template is None:
            from ..chat_template import template_for

            self._template = template_for(self.tokenizer)
        return self._template

    @property
    def template_supports_tools(self) -> bool:
        source = getattr(self.template, "source", "") or ""
        return "tools" in source

    # -- prompts ------------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        # A template that writes the BOS token itself must not get a second one from the tokenizer.
        bos = getattr(self.tokenizer, "bos_token", None)
        add_bos = False if bos and text.startswith(bos) else None
        return self.tokenizer.encode(text, add_bos=add_bos)

    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[list[int], str]:
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and req.tool_choice != "none" \
            else None
        messages = [self._message_dict(m, native_tools=self.template_supports_tools) for m in req.messages]
        kwargs: dict[str, Any] = {}
        if tools and self.template_supports_tools:
            kwargs["tools"] = tools
        elif tools:
            instructions = TOOL_SYSTEM_PROMPT.format(tools=json.dumps(tools))
            if messages and messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + instructions}
            else:
                messages.insert(0, {"role": "system", "content": instructions})
        template = self.template
        try:
            text = template.render(messages, add_generation_prompt=True, **kwargs)
        except Exception as exc:  # ChatTemplateError: the template raised, or went over its limits
            raise APIError(400, f"messages: the chat template rejected the conversation: {exc}",
                           param="messages") from None
        self.check_length(text, "messages")
        return self.encode_text(text), text

    @staticmethod
    def _message_dict(m: ChatMessage, native_tools: bool) -> dict[str, Any]:
        if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
            raise APIError(400, "messages: only text content parts are supported", param="messages")
        role = "system" if m.role == "developer" else m.role
        d: dict[str, Any] = {"role": role, "content": m.text()}
        if m.tool_calls:
            calls = [{"id": c.id, "type": "function",
                      "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                     for c in m.tool_calls]
            if native_tools:
                d["tool_calls"] = calls
            else:
                d["content"] += "".join("<tool_call>" + json.dumps(c["function"]) + "</tool_call>" for c in calls)
        if m.role == "tool":
            if native_tools:
                d["tool_call_id"] = m.tool_call_id
            else:
                d = {"role": "user", "content": f"<tool_response>{m.text()}</tool_response>"}
        if m.name:
            d["name"] = m.name
        return d

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def sampling(self, req, max_tokens: int | None, json_mode: bool):
        from ..errors import ConfigError
        from ..sampling import SamplingParams

        room = self.engine.context
        try:
            return SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                seed=req.seed,
                max_new_tokens=max_tokens or room,
                stop=req.stop_list,
            )
        except ConfigError as exc:
            raise APIError(400, str(exc)) from exc

    def check_fan_out(self, prompts: int, n: int) -> None:
        """A request whose sequences (prompts x n) exceed the queue could never be admitted: 400, not 503."""
        if prompts * n > self.engine.queue_size:
            raise APIError(400, f"n: {prompts} prompt(s) x n={n} = {prompts * n} sequences; this server queues at "
                           f"most {self.engine.queue_size} per request", param="n", code="invalid_value")

    def submit(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, prompts: list[list[int]], params,
               n: int, logprobs: int | None, json_mode: bool) -> list:
        """Submit every prompt (n choices each); choice index = prompt_index * n + choice."""
        self.check_fan_out(len(prompts), n)
        handles = []
        for p_index, prompt in enumerate(prompts):
            offset = p_index * n

            def emit(event, offset=offset) -> None:
                event.index += offset
                loop.call_soon_threadsafe(queue.put_nowait, event)

            try:
                handles.append(self.engine.submit(prompt, params, emit, n=n, logprobs=logprobs, json_mode=json_mode))
            except QueueFullError as exc:
                for h in handles:
                    h.cancel()
                raise APIError(503, f"server busy: {exc}; retry shortly", type="server_error", code="queue_full",
                               headers={"Retry-After": "1"}) from exc
            except PromptTooLongError as exc:
                for h in handles:
                    h.cancel()
                raise APIError(400, f"{exc}", param="messages" if "messages" in str(exc) else "prompt",
                               code="context_length_exceeded") from exc
            except ValueError as exc:
                for h in handles:
                    h.cancel()
                raise APIError(400, f"{exc}") from exc
        return handles


def prompt_char_limit(tokenizer: Any, max_context: int) -> int:
    """Characters beyond which a text cannot fit `max_context` tokens: no token covers more input characters
    than its vocabulary piece is long (byte-level pieces are one character per byte; SentencePiece's '▁' is one
    space), so a text needs at least len(text) / longest-piece tokens."""
    engine = getattr(tokenizer, "engine", None)
    try:
        longest = max(len(piece) for piece in engine.get_vocab(with_added_tokens=True))
    except Exception:  # not an HF `tokenizers` engine: no early refusal, the engine still checks the length
        return 1 << 62
    return max_context * max(1, longest)


def _json_or_text(s: str) -> Any:
    try:
        return json.loads(s)
    except (TypeError, ValueError):
        return s


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """Split model output into plain content and OpenAI `tool_calls` (Hermes-style <tool_call>{json}</tool_call>)."""
    calls = []
    for m in TOOL_CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or "name" not in obj:
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": str(obj["name"]),
                                   "arguments": args if isinstance(args, str) else json.dumps(args)}})
    if not calls:
        return text, []
    content = TOOL_CALL_RE.sub("", text).strip()
    return content or None, calls


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _sse_generation_error(event: Any) -> str:
    """The stream's last event when generation failed mid-way (the status line has already gone out)."""
    return _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error", "param": None,
                           "code": None}})


def _stream_chunk(kind: str, rid: str, created: int, model_name: str, choices: list, include_usage: bool,
                  usage: Any) -> str:
    """One SSE chunk of a streamed chat or text completion (usage only when the client asked for it)."""
    obj = {"id": rid, "object": kind, "created": created, "model": model_name,
           "system_fingerprint": FINGERPRINT, "choices": choices}
    if include_usage:
        obj["usage"] = usage
    return _sse(obj)


def _chat_logprob_entry(t: TokenInfo) -> dict:
    return {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode("utf-8")),
            "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
                             for _, s, lp in (t.top or [])]}


class _Choice:
    """Accumulates one choice's events."""

    def __init__(self) -> None:
        self.tokens: list[TokenInfo] = []
        self.finish: FinishEvent | None = None


async def _collect(request: Request, queue: asyncio.Queue, handles: list, total: int) -> list[_Choice]:
    choices = [_Choice() for _ in range(total)]
    done = 0
    next_check = time.monotonic() + DISCONNECT_POLL_S
    try:
        while done < total:
            # Look for a departed client every DISCONNECT_POLL_S, whether or not tokens keep arriving.
            if time.monotonic() >= next_check:
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected")
                next_check = time.monotonic() + DISCONNECT_POLL_S
            try:
                event = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue
            if isinstance(event, TokenEvent):
                choices[event.index].tokens.extend(event.tokens)
            else:
                choices[event.index].finish = event
                done += 1
    finally:
        if done < total:
            for h in handles:
                h.cancel()
    for c in choices:
        if c.finish.reason == "error":
            raise APIError(500, f"generation failed: {c.finish.error}", type="server_error")
    return choices


def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict:
    completion = sum(c.finish.completion_tokens for c in choices if c.finish)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length", "tool_calls") else "stop"


def create_app(engine: Engine, api_key: str | None = None, model_name: str = "llamaworks",
               chat_template: Any = None, *, max_body_bytes: int = MAX_BODY_BYTES,
               prompt_seconds: float = PROMPT_SECONDS) -> FastAPI:
    """The ASGI app. Starts `engine` at startup if it is not running (and then stops it at shutdown).

    max_body_bytes: larger request bodies get 413. prompt_seconds: budget for rendering + tokenizing a request.
    """
    from ..errors import ConfigError

    if max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes {max_body_bytes}: expected a positive number of bytes")
    server = _Server(engine, model_name, chat_template, prompt_seconds=prompt_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        started_here = not engine.running
        if started_here:
            engine.start()
        yield
        if started_here:
            engine.stop()
        if server.pool is not None:
            server.pool.shutdown(wait=False, cancel_futures=True)
            server.pool = None

    app = FastAPI(title="llamaworks", version=__version__, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        # Of a union's several complaints, a value error (a surrogate, a range) says more than "not a str".
        errors = sorted(errors, key=lambda e: e.get("type") != "value_error")
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
        # Union members show up as type tags in the location ("prompt.list[int].0"): leave them out.
        loc = [x for x in loc if not re.fullmatch(r"[a-z_]+\[.*\]|str|int|float|bool|dict|list", x)]
        where = ".".join(loc) or "body"
        return APIError(400, f"{where}: {first.get('msg')}", param=loc[0] if loc else None,
                        code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    auth: list = []  # the API key is checked by _Guard before a body is read
    # -- page and health --------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok" if engine.running else "stopped", "model": model_name,
                "max_batch": engine.max_rows, "queue_size": engine.queue_size, "context": engine.context,
                "engine": engine.stats.to_dict()}

    # -- models -----------------------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": server.created, "owned_by": "llamaworks"}

    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=auth)
    async def get_model(name: str):
        server.check_model(name)
        return model_card()

    # -- chat -------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        server.check_model(req.model)
        json_mode = bool(req.response_format and req.response_format.type == "json_object")
        if req.response_format and req.response_format.type == "json_schema":
            raise APIError(400, "response_format: json_schema is not supported; use {'type': 'json_object'}",
                           param="response_format")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs: requires logprobs=true", param="top_logprobs")
        prompt, _ = await server.prepare(server.chat_prompt, req)
        params = server.sampling(req, req.max_completion_tokens or req.max_tokens, json_mode)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        tools_on = bool(req.tools) and req.tool_choice != "none"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handles = server.submit(loop, queue, [prompt], params, req.n, logprobs, json_mode)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = _now()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream_response(_chat_stream(rid, created, queue, handles, req.n, len(prompt), include_usage,
                                                 logprobs is not None, tools_on), handles)
        choices = await _collect(request, queue, handles, req.n)
        out = []
        for i, c in enumerate(choices):
            text, calls = (parse_tool_calls(c.finish.text) if tools_on else (c.finish.text, []))
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = calls
            out.append({"index": i, "message": message,
                        "logprobs": {"content": [_chat_logprob_entry(t) for t in c.tokens]}
                        if logprobs is not None else None,
                        "finish_reason": "tool_calls" if calls else _finish_reason(c.finish.reason)})
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "system_fingerprint": FINGERPRINT, "choices": out, "usage": _usage(len(prompt), choices)}

    async def _chat_stream(rid: str, created: int, queue: asyncio.Queue, handles: list, n: int,
                           prompt_tokens: int, include_usage: bool, want_logprobs: bool,
                           tools_on: bool) -> AsyncIterator[str]:
        def chunk(choices: list, usage: Any = None) -> str:
            return _stream_chunk("chat.completion.chunk", rid, created, model_name, choices, include_usage, usage)

        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        finished: list[FinishEvent] = []
        while len(finished) < n:
            event = await queue.get()
            if isinstance(event, TokenEvent):
                if tools_on or not (event.text or (want_logprobs and event.tokens)):
                    continue  # with tools the whole reply is held back: a tool call is not content
                lp = {"content": [_chat_logprob_entry(t) for t in event.tokens]} if want_logprobs else None
                yield chunk([{"index": event.index, "delta": {"content": event.text}, "logprobs": lp,
                              "finish_reason": None}])
                continue
            if event.reason == "error":
                yield _sse_generation_error(event)
                return
            finished.append(event)
            reason = _finish_reason(event.reason)
            if tools_on:
                text, calls = parse_tool_calls(event.text)
                delta: dict[str, Any] = {"content": text}
                if calls:
                    delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
                    reason = "tool_calls"
                yield chunk([{"index": event.index, "delta": delta, "logprobs": None, "finish_reason": None}])
            yield chunk([{"index": event.index, "delta": {}, "logprobs": None, "finish_reason": reason}])
        if include_usage:
            completion = sum(f.completion_tokens for f in finished)
            yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                             "total_tokens": prompt_tokens + completion})
        yield "data: [DONE]\n\n"

    # -- completions ------------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request):
        server.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix: not supported", param="suffix")
        if req.echo:
            raise APIError(400, "echo: not supported", param="echo")
        json_mode = bool(req.response_format and req.response_format.type == "json_object")
        server.check_fan_out(_prompt_count(req.prompt), req.n)
        prompts = await server.prepare(_completion_prompts, req.prompt, server, engine.tokenizer.vocab_size)
        params = server.sampling(req, req.max_tokens, json_mode)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handles = server.submit(loop, queue, prompts, params, req.n, req.logprobs, json_mode)
        total = len(prompts) * req.n
        prompt_tokens = sum(len(p) for p in prompts)
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = _now()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream_response(_completion_stream(rid, created, queue, total, prompt_tokens, include_usage,
                                                       req.logprobs), handles)
        choices = await _collect(request, queue, handles, total)
        out = [{"index": i, "text": c.finish.text,
                "logprobs": _completion_logprobs(c.tokens, 0) if req.logprobs is not None else None,
                "finish_reason": _finish_reason(c.finish.reason)} for i, c in enumerate(choices)]
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "system_fingerprint": FINGERPRINT, "choices": out, "usage": _usage(prompt_tokens, choices)}

    async def _completion_stream(rid: str, created: int, queue: asyncio.Queue, total: int, prompt_tokens: int,
                                 include_usage: bool, logprobs: int | None) -> AsyncIterator[str]:
        def chunk(choices: list, usage: Any = None) -> str:
            return _stream_chunk("text_completion", rid, created, model_name, choices, include_usage, usage)

        offsets = [0] * total
        finished: list[FinishEvent] = []
        while len(finished) < total:
            event = await queue.get()
            if isinstance(event, TokenEvent):
                if not (event.text or (logprobs is not None and event.tokens)):
                    continue
                lp = _completion_logprobs(event.tokens, offsets[event.index]) if logprobs is not None else None
                offsets[event.index] += len(event.text)
                yield chunk([{"index": event.index, "text": event.text, "logprobs": lp, "finish_reason": None}])
                continue
            if event.reason == "error":
                yield _sse_generation_error(event)
                return
            finished.append(event)
            yield chunk([{"index": event.index, "text": "", "logprobs": None,
                          "finish_reason": _finish_reason(event.reason)}])
        if include_usage:
            completion = sum(f.completion_tokens for f in finished)
            yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                             "total_tokens": prompt_tokens + completion})
        yield "data: [DONE]\n\n"

    return app


def _completion_logprobs(tokens: list[TokenInfo], offset: int) -> dict:
    text_offset, pos = [], offset
    for t in tokens:
        text_offset.append(pos)
        pos += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{s: lp for _, s, lp in (t.top or [])} for t in tokens], "text_offset": text_offset}


def _prompt_count(prompt: Any) -> int:
    if isinstance(prompt, str) or (prompt and all(isinstance(x, int) for x in prompt)):
        return 1
    return len(prompt)


def _completion_prompts(prompt: Any, server: _Server, vocab_size: int) -> list[list[int]]:
    """str | list[str] | list[int] | list[list[int]] -> token id lists (runs on the prompt worker pool)."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            server.check_length(item, "prompt")
            ids = server.tokenizer.encode(item)
        else:
            ids = list(item)
            if any(not 0 <= t < vocab_size for t in ids):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab_size})", param="prompt")
        if not ids:
            raise APIError(400, "prompt: must contain at least one token", param="prompt")
        out.append(ids)
    return out


def _stream_response(gen: AsyncIterator[str], handles: list) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        try:
            async for part in gen:
                yield part
        finally:
            # Normal end, client disconnect (the generator is closed/cancelled) or error: free the slots.
            for h in handles:
                h.cancel()

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def serve(model: str | None = None, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, queue_size: int = 64, device: str | None = None, dtype: str | None = None,
          chat_template: str | None = None, max_context: int | None = None, model_name: str | None = None,
          reference: bool = False, mmap: bool | None = None, backend: str | None = "auto", threads: int | None = None,
          cpu_target: str = "native", max_body_bytes: int = MAX_BODY_BYTES) -> int:
    """`llamaworks serve`: load a model onto a backend (native by default for a GGUF on the CPU) and serve it until
    interrupted. Returns an exit code."""
    import uvicorn

    from ..api import load_backend
    from ..chat_template import template_for
    from ..engine.backend import EngineOptions
    from ..errors import ConfigError

    if max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes {max_body_bytes}: expected a positive number of bytes")
    sock = listen_socket(host, port)  # before loading: a busy port should fail in a second, not after the model
    if max_batch < 1 or queue_size < 1:
        raise ConfigError(f"--max-batch {max_batch} / --queue-size {queue_size}: expected at least 1")
    options = EngineOptions.from_environment(max_rows=max_batch, max_context=max_context, threads=threads, mmap=mmap,
                                             cpu_target=cpu_target)
    backend_ = load_backend(model, backend=backend, options=options, device=device, dtype=dtype, reference=reference)
    if backend_.tokenizer is None:
        raise ConfigError(f"{model}: the checkpoint carries no tokenizer")
    name = model_name or _model_name(getattr(backend_, "path", None), backend_.config)
    # Rows keep a bounded prefix when their sequence ends (a shared system prompt, a chat's start) so the
    # server's memory returns after a long prompt.
    engine = Engine(backend_, queue_size=queue_size, keep_prefix=KEEP_PREFIX)
    app = create_app(engine, api_key=api_key, model_name=name,
                     chat_template=template_for(backend_.tokenizer, chat_template),
                     max_body_bytes=max_body_bytes)
    print(f"llamaworks: serving {name} at http://{host}:{port}/ (OpenAI base_url http://{host}:{port}/v1)",
          flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    return 0


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket, or a one-line ConfigError (bad port, address in use, unknown host)."""
    from ..errors import ConfigError

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a port number from 0 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _model_name(path: Any, config: Any) -> str:
    if path:
        p = Path(path)
        return p.stem if p.is_file() else p.name
    return getattr(config, "name", None) or "llamaworks"
