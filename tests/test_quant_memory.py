"""Where the fast path keeps GGUF blocks: read into a huge-page buffer (default) or memory-mapped (`mmap=True`)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from llamaworks.assets import default_model_path
from llamaworks.checkpoints.gguf import read_gguf
from llamaworks.engine.backend import EngineOptions
from llamaworks.engine.torch_backend import TorchBackend, _is_file_mapped
from llamaworks.quant import GGMLLinear, kernels
from llamaworks.quant.memory import huge_pages_available, read_into_huge_pages


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
    backend = TorchBackend.load(None, EngineOptions(mmap=mmap, max_context=16))
    model = backend.model
    mapped = read_gguf(default_model_path(), dequantize=False).state_dict["layers.0.attention.wq.weight"]
    wq = model.layers[0].attention.wq
    assert isinstance(wq, GGMLLinear)
    # Same bytes either way (in memory the rows are regrouped for the x8 kernel, unless --mmap).
    assert wq.interleaved == (not _is_file_mapped(model) and kernels.can_interleave())
    raw = kernels.deinterleave_rows_torch(wq.raw, wq.ggml_type, wq.in_features) if wq.interleaved else wq.raw
    assert np.array_equal(raw.numpy(), mapped.raw)
    assert _is_file_mapped(model) == (mmap or not huge_pages_available())
    # Tied output still shares the embedding's bytes when they were read into memory.
    assert model.output.raw.data_ptr() == model.tok_embeddings.raw.data_ptr()
    assert np.isfinite(backend.forward([0, 0, 0], [1, 2, 3], [0, 1, 2], [2])).all()


def test_torch_start_up_pages_are_released_and_come_back_on_use() -> None:
    """page_out_library_code drops the clean pages libtorch touched at import (a fresh process, so no page is
    already out); torch keeps working, faulting back the code it needs."""
    import subprocess
    import sys

    code = """
import torch, sys
from llamaworks.quant.memory import page_out_library_code
def file_kib():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssFile:'))
before = file_kib()
advised = page_out_library_code()
after = file_kib()
x = torch.randn(64, 64)
ok = torch.allclose((x @ torch.eye(64)).sum(), x.sum(), atol=1e-3)
print(before, after, advised, int(ok))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, after, advised, ok = (int(v) for v in out)
    assert ok == 1
    if advised == 0:
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4) or this is not Linux")
    assert advised > 100 * 2**20  # libtorch_cpu's read-only mappings alone are several hundred MiB of address space
    assert before - after > 20 * 1024  # KiB: measured ~57 MiB of libtorch pages leave


def test_load_pages_out_torch_once_per_process(monkeypatch) -> None:
    from llamaworks.quant import memory

    calls = []
    monkeypatch.setattr(memory, "page_out_library_code", lambda part: calls.append(part) or 0)
    monkeypatch.setattr(memory, "_released", False)
    TorchBackend.load(None)
    assert calls == [memory.TORCH_LIBRARIES]
    TorchBackend.load(None)  # once per process: a second model must not push out the code the first uses
    assert calls == [memory.TORCH_LIBRARIES]


def test_native_load_pages_out_the_libraries_at_the_first_load_only(monkeypatch) -> None:
    from llamaworks.engine.native import NativeBackend
    from llamaworks.quant import memory

    calls = []
    monkeypatch.setattr(memory, "page_out_library_code", lambda part: calls.append(part) or 0)
    monkeypatch.setattr(memory, "_released", False)
    NativeBackend.load(None, EngineOptions(max_context=64))
    # before the weights arrive, and again at the end: the load's own code (conversion, regrouping) goes too
    assert calls == [memory.SHARED_LIBRARIES, memory.SHARED_LIBRARIES]
    NativeBackend.load(None, EngineOptions(max_context=64))  # nor after a torch model: the first load decides
    TorchBackend.load(None)
    assert calls == [memory.SHARED_LIBRARIES, memory.SHARED_LIBRARIES]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")
def test_native_page_out_spares_mapped_data_files(tmp_path) -> None:
    """The native backend pages out libraries only: a model or data file mapped in the process (a torch model with
    mmap=True, training data) keeps its resident pages."""
    import subprocess

    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 4096 * 4)  # 4 MiB
    code = f"""
import mmap, sys
from llamaworks.quant.memory import SHARED_LIBRARIES, page_out_library_code
f = open({str(data)!r}, 'rb')
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
total = sum(m[i] for i in range(0, len(m), 4096))  # touch every page
def rss_of(path):
    kib, inside = 0, False
    for line in open('/proc/self/smaps'):
        if line[0] in '0123456789abcdef' and '-' in line.split()[0]:
            inside = line.rstrip().endswith(path)
        elif inside and line.startswith('Rss:'):
            kib += int(line.split()[1])
    return kib
before = rss_of({str(data)!r})
advised = page_out_library_code(SHARED_LIBRARIES)
print(before, rss_of({str(data)!r}), advised)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, after, advised = (int(v) for v in out)
    assert before >= 4000 and advised > 0  # KiB; the libraries were advised
    assert after == before


_NATIVE_PROCESS = """
import sys
from llamaworks.engine.backend import EngineOptions
from llamaworks.engine.native import NativeBackend
def kib(field):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field + ':'))
b = NativeBackend.load(None, EngineOptions(max_context=1024, threads=2))  # each thread keeps its own scratch
anon_before = kib('RssAnon')
b.forward([0] * 512, list(range(1000, 1512)), range(512), [511])
heavy = sorted(m for m in ('hashlib', '_hashlib', 'shutil', 'tempfile', 'subprocess', 'logging') if m in sys.modules)
print(anon_before, kib('RssAnon'), b.cache_bytes() // 1024, ','.join(heavy) or '-')
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_native_process_holds_weights_cache_and_little_else() -> None:
    """A fresh process running the native backend: a 512-token prompt leaves only its KV cache behind (its
    activations go back to the OS), and nothing the runtime never uses is imported (OpenSSL through hashlib,
    shutil's compressors, subprocess, logging). The start-up pages' release is checked above by its call: its
    effect cannot be seen from a child of pytest, which maps the same library pages (MADV_PAGEOUT skips shared
    pages)."""
    import subprocess

    from llamaworks.quant import lean_kernels

    lean_kernels.library()  # built here if need be: building imports what the runtime must not
    out = subprocess.run([sys.executable, "-c", _NATIVE_PROCESS], capture_output=True, text=True, check=True)
    anon_before, anon_after, cache_kib, heavy = out.stdout.split()
    assert heavy == "-", f"the native runtime imported {heavy}"
    # The prompt's chunk buffers are a few MiB while it runs; afterwards the cache's pages are what remains.
    assert int(anon_after) - int(anon_before) <= int(cache_kib) + 1024, (anon_before, anon_after, cache_kib)
