"""Where the fast path keeps GGUF blocks: read into a huge-page buffer (default) or memory-mapped (`mmap=True`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamaworks.assets import default_model_path
from llamaworks.bench import _is_file_mapped
from llamaworks.checkpoints.gguf import read_gguf
from llamaworks.quant import GGMLLinear
from llamaworks.quant.memory import huge_pages_available, read_into_huge_pages
from llamaworks.runtime import load_quantized_model


def test_read_into_huge_pages_returns_the_file_bytes(tmp_path) -> None:
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8)
    path = tmp_path / "blob.bin"
    path.write_bytes(data.tobytes())
    spans = [(0, 100), (101, 3000), (5000, 4999), (9999, 1)]
    arrays = read_into_huge_pages(path, spans)
    for (offset, nbytes), array in zip(spans, arrays):
        assert array.dtype == np.uint8 and array.shape == (nbytes,)
        assert np.array_equal(array, data[offset:offset + nbytes])
    assert all(a.ctypes.data % 64 == 0 for a in arrays)  # each tensor starts on a cache line


def test_read_past_end_of_file_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(EOFError, match=r"short\.bin"):
        read_into_huge_pages(path, [(5, 20)])


@pytest.mark.parametrize("mmap", [False, True])
def test_default_model_blocks_in_memory_or_mapped(mmap: bool) -> None:
    model, _, _ = load_quantized_model(None, mmap=mmap)
    mapped = read_gguf(default_model_path(), dequantize=False).state_dict["layers.0.attention.wq.weight"]
    wq = model.layers[0].attention.wq
    assert isinstance(wq, GGMLLinear)
    assert np.array_equal(wq.raw.numpy(), mapped.raw)  # same bytes either way
    assert _is_file_mapped(model) == (mmap or not huge_pages_available())
    # Tied output still shares the embedding's bytes when they were read into memory.
    assert model.output.raw.data_ptr() == model.tok_embeddings.raw.data_ptr()
    with torch.inference_mode():
        model.setup_cache(1, 16)
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]), last_only=True)).all()
