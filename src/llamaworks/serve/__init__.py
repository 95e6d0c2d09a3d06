"""`llamaworks serve`: an OpenAI-compatible HTTP API with continuous batching, and a web chat page.

- `engine.py`      the scheduler thread that owns the model and decodes all active requests together
- `app.py`         the FastAPI app (`create_app`), routes, OpenAI error shapes, SSE streaming
- `schemas.py`     pydantic request models
- `constrained.py` JSON mode: a token-level JSON grammar that masks logits
- `static/`        the chat page (plain HTML/JS/CSS)
"""

from __future__ import annotations

from .engine import Engine, EngineStats, PromptTooLongError, QueueFullError

__all__ = ["Engine", "EngineStats", "PromptTooLongError", "QueueFullError", "create_app", "serve"]


def create_app(*args, **kwargs):  # imported lazily: FastAPI is only needed when serving
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def serve(*args, **kwargs) -> None:
    from .app import serve as _serve

    _serve(*args, **kwargs)
