"""Helpers shared by the serving tests: a tiny random model and a uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from llamaworks.config import ModelConfig
from llamaworks.model import Transformer


def tiny_model(vocab_size: int, seed: int = 0, max_seq_len: int = 256) -> Transformer:
    """A 2-layer random model over a real vocabulary: fast, deterministic, exercises every code path."""
    torch.manual_seed(seed)
    cfg = ModelConfig(64, 2, 4, vocab_size, 160, n_kv_heads=2, tie_embeddings=True, max_seq_len=max_seq_len,
                      name="tiny-serve")
    model = Transformer(cfg)
    model.reset_parameters()
    return model.eval()


def engine_for(model: Transformer, tokenizer, *, max_rows: int = 1, max_context: int | None = None, **kw):
    """The one scheduler over the torch backend wrapping `model` (`max_rows` cache rows)."""
    from llamaworks.engine.backend import EngineOptions
    from llamaworks.engine.scheduler import Scheduler
    from llamaworks.engine.torch_backend import TorchBackend

    options = EngineOptions(max_rows=max_rows, max_context=max_context)
    return Scheduler(TorchBackend.from_model(model, tokenizer, options=options), **kw)


def native_engine_for(model: Transformer, tokenizer, directory, *, max_rows: int = 1, max_context: int | None = None,
                      **kw):
    """The one scheduler over the native backend (the server's default) running `model`, written as a Q8_0 GGUF
    with `tokenizer`'s vocabulary into `directory`."""
    from llamaworks.checkpoints import save_gguf
    from llamaworks.engine.backend import EngineOptions
    from llamaworks.engine.native import NativeBackend
    from llamaworks.engine.scheduler import Scheduler

    path = save_gguf(Path(directory) / "tiny.gguf", model, model.config, tokenizer, tensor_type="q8_0")
    options = EngineOptions(max_rows=max_rows, max_context=max_context, threads=1)
    return Scheduler(NativeBackend.load(path, options), **kw)


def generate_alone(model: Transformer, tokenizer, prompt: list[int], params):
    """One completion on a fresh one-row scheduler: the reference a batched run must equal."""
    from llamaworks.engine.scheduler import generate

    return generate(engine_for(model, tokenizer), prompt, params)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on 127.0.0.1; yields the base URL and shuts it down after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
