"""Helpers for the eval tests: a tiny random model and the default model's HF tokenizer behind our interface.

The adapter exists only until `llamaworks.tokenizer` lands; it mirrors that interface (encode with add_bos,
bos_id/eos_id/bos_token) so the eval code is exercised exactly as it will be with the real Tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from llamaworks.config import get_preset
from llamaworks.engine.backend import EngineOptions
from llamaworks.engine.torch_backend import TorchBackend
from llamaworks.model import Transformer

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


class HFTokenizerAdapter:
    def __init__(self, hf) -> None:
        self.hf = hf
        self.vocab_size = len(hf)
        self.bos_id, self.eos_id = hf.bos_token_id, hf.eos_token_id
        self.bos_token, self.eos_token = hf.bos_token, hf.eos_token
        self.pad_id = hf.pad_token_id
        self.add_bos = bool(getattr(hf, "add_bos_token", False))
        self.chat_template = getattr(hf, "chat_template", None)

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """The default model's tokenizer: ours when llamaworks.tokenizer exists, else HF's read from the GGUF."""
    from llamaworks.assets import default_model_path

    path = default_model_path()
    try:
        from llamaworks.tokenizer import load_tokenizer

        return load_tokenizer(path)
    except ImportError:
        from transformers import AutoTokenizer

        return HFTokenizerAdapter(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))


def backend_of(model: Transformer, tokenizer=None, rows: int = 16) -> TorchBackend:
    """The evaluation backend on an in-memory model: float32 KV cache, `rows` rows (context + 15 choices)."""
    return TorchBackend.from_model(model, tokenizer, EngineOptions(max_rows=rows, kv_dtype="float32"))


def tiny_model(vocab_size: int = 49152, seed: int = 0, **overrides) -> Transformer:
    """A random 2-layer GQA model over the default tokenizer's vocabulary, with weights wide enough to matter."""
    config = dataclasses.replace(get_preset("tiny-tied"), vocab_size=vocab_size, max_seq_len=4096, **overrides)
    torch.manual_seed(seed)
    model = Transformer(config)
    model.reset_parameters(std=0.2)
    return model.eval()


