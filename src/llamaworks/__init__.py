"""llamaworks: own an open LLaMA-family chatbot end to end.

    import llamaworks
    llm = llamaworks.load()                      # the bundled SmolLM2-135M-Instruct, or a path
    llm.chat("Tell me about llamas.", temperature=0)
    for piece in llm.stream([{"role": "user", "content": "Hi!"}]):
        print(piece, end="", flush=True)

Imports are lazy: `import llamaworks` does not import torch (or anything heavy); the API lives in api.py.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("LLM", "BACKENDS", "choose_backend", "load", "load_backend", "resolve_device", "resolve_dtype")


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'llamaworks' has no attribute {name!r}")


__all__ = ["BACKENDS", "LLM", "__version__", "choose_backend", "load", "load_backend", "resolve_device",
           "resolve_dtype"]
