"""`llamaworks serve`: an OpenAI-compatible HTTP API over the one scheduler (engine/scheduler.py: continuous
batching, chunked prefill, prefix cache) on the native backend by default, and a web chat page.

- `app.py`         the FastAPI app (`create_app`), routes, OpenAI error shapes, SSE streaming
- `schemas.py`     pydantic request models
- `constrained.py` JSON mode: a token-level JSON grammar that masks logits
- `static/`        the chat page (plain HTML/JS/CSS)
"""

from __future__ import annotations

from typing import Any


def create_app(*args: Any, **kwargs: Any) -> Any:  # imported lazily: FastAPI is only needed when serving
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def serve(*args: Any, **kwargs: Any) -> int:
    from .app import serve as _serve

    return _serve(*args, **kwargs)


__all__ = ["create_app", "serve"]
