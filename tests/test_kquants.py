"""The K-quant writer: Q4_K/Q5_K/Q6_K blocks (checkpoints/kquants.py) and llama.cpp's per-tensor mixes
(checkpoints/quant_mix.py), held to outside implementations:

- ggml's own reference quantizers and dequantizers (ggml-quants.c from the llama.cpp that llama-cpp-python 0.3.16's
  sdist vendors, compiled here with the system C compiler): our blocks decode the same under ggml and gguf-py, and
  fit the data at least as well as ggml's own blocks (Q6_K: the same blocks, up to float summation order);
- llama.cpp's `llama-quantize` type choices, recorded per tensor in fixtures/quant_mix/llama_quantize_types.json;
- transformers loading and running a written Q4_K_M file; llama.cpp's llama-server running one (where built).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import ASSETS, package_file
from llamaworks.checkpoints import expected_shapes, load_checkpoint, load_model, save_gguf, save_hf
from llamaworks.checkpoints.ggml_types import QUANT_SIZES, GGMLType
from llamaworks.checkpoints.gguf import ours_to_gguf_name
from llamaworks.checkpoints.kquants import quantize
from llamaworks.checkpoints.quant_mix import tensor_type
from llamaworks.config import get_preset
from llamaworks.model import Transformer
from test_checkpoints_gguf import byte_level_vocab, logits, rel_error

GGML_SDIST = "llama-cpp-python==0.3.16"
# ggml-quants.c calls these only on paths the reference row functions never take; they make the library load.
GGML_STUBS = """#include <stdlib.h>
#include <stddef.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) { (void)file; (void)line; (void)fmt; abort(); }
size_t ggml_row_size(int type, long long ne) { (void)type; (void)ne; abort(); }
const char *ggml_type_name(int type) { (void)type; return "?"; }
size_t ggml_type_size(int type) { (void)type; abort(); }
"""
KTYPES = [GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
FIXTURE = Path(__file__).parent / "fixtures" / "quant_mix" / "llama_quantize_types.json"


@pytest.fixture(scope="module")
def ggml() -> ctypes.CDLL:
    """ggml's reference (de)quantizers as a shared library (built once into the test-asset cache)."""
    root = package_file(GGML_SDIST, "vendor/llama.cpp/ggml/")
    lib = ASSETS / "ggml-quants-ref" / "libggml_quants_ref.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        stubs = lib.parent / "stubs.c"
        stubs.write_text(GGML_STUBS)
        tmp = lib.with_suffix(".tmp")
        subprocess.run([os.environ.get("CC", "cc"), "-O2", "-fPIC", "-shared", "-std=gnu11", f"-I{root / 'include'}",
                        f"-I{root / 'src'}", str(root / "src" / "ggml-quants.c"), str(stubs), "-lm", "-o", str(tmp)],
                       check=True)
        tmp.rename(lib)
    return ctypes.CDLL(str(lib))


def ggml_quantize(lib: ctypes.CDLL, x: np.ndarray, qtype: GGMLType) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    block, size = QUANT_SIZES[qtype]
    out = np.zeros((x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
    fn = getattr(lib, f"quantize_row_{qtype.name.lower().replace('_k', '_K')}_ref")
    fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    return out


def ggml_dequantize(lib: ctypes.CDLL, blocks: np.ndarray, qtype: GGMLType, shape: tuple[int, int]) -> np.ndarray:
    blocks = np.ascontiguousarray(blocks)
    out = np.zeros(shape, dtype=np.float32)
    fn = getattr(lib, f"dequantize_row_{qtype.name.lower().replace('_k', '_K')}")
    fn(blocks.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(out.size))
    return out


def weight_like(rows: int = 48, cols: int = 1024, seed: int = 0) -> np.ndarray:
    """Gaussian rows with outlier columns, plus the awkward cases: a zero row, a constant row, an all-positive
    row, a row of tiny values, a row with one huge value."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    x[:, ::61] *= 10
    x[0] = 0
    x[1] = 0.37
    x[2] = np.abs(x[2]) + 0.01
    x[3] *= 1e-6
    x[4, 100] = 50.0
    return x


def sub_block_errors(x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """Squared error per sub-block, weighted as the K-quant fit weighs it (rms of the sub-block + |x|)."""
    xs, ys = x.reshape(-1, size).astype(np.float64), y.reshape(-1, size).astype(np.float64)
    w = np.sqrt(np.square(xs).mean(-1, keepdims=True)) + np.abs(xs)
    return (w * np.square(xs - ys)).sum(-1)


@pytest.mark.parametrize("qtype", KTYPES, ids=[t.name for t in KTYPES])
def test_blocks_are_ggmls_and_refined_ones_fit_no_worse(ggml, qtype: GGMLType) -> None:
    """By default (what the writer uses) our blocks are byte for byte ggml's reference quantizer's (layout and
    search); with refine=True, Q4_K/Q5_K blocks decode the same under ggml and gguf-py and fit every block at
    least as well as ggml's, by the weighted error both searches minimise; Q6_K has no refinement."""
    x = weight_like()
    theirs = ggml_quantize(ggml, x, qtype)
    exact = quantize(x, qtype)
    assert exact.shape == theirs.shape == (x.shape[0], x.shape[1] // 256 * QUANT_SIZES[qtype][1])
    np.testing.assert_array_equal(exact, theirs)

    ours = quantize(x, qtype, refine=True)
    got = gguf.quants.dequantize(ours, gguf.GGMLQuantizationType(int(qtype))).reshape(x.shape)
    np.testing.assert_array_equal(got, ggml_dequantize(ggml, ours, qtype, x.shape))
    want = ggml_dequantize(ggml, theirs, qtype, x.shape)
    np.testing.assert_array_equal(got[0], 0)  # a zero row stays zero
    sub = 16 if qtype == GGMLType.Q6_K else 32
    ours_err = sub_block_errors(x, got, sub).reshape(x.size // 256, -1).sum(-1)
    theirs_err = sub_block_errors(x, want, sub).reshape(x.size // 256, -1).sum(-1)
    assert (ours_err <= theirs_err * (1 + 1e-6)).all()
    if qtype != GGMLType.Q6_K:  # the refinement does something: most blocks move, the error drops
        assert (ours != theirs).any(1).mean() > 0.5 and ours_err.sum() < 0.97 * theirs_err.sum()


@pytest.mark.parametrize("model", ["smollm2-135m", "tinyllama-1.1b", "tiny-80-layer-gqa"])
def test_mix_types_are_llama_quantizes(model: str) -> None:
    """Each tensor's type for Q4_K_M, Q5_K_M, Q6_K, Q8_0 and Q4_0 is the one llama-quantize chose for it."""
    recorded = json.loads(FIXTURE.read_text())["models"][model]
    if model == "tiny-80-layer-gqa":
        config = get_preset("tiny-llama2").replace(dim=256, n_layers=80, n_heads=4, n_kv_heads=2, hidden_dim=512,
                                                   vocab_size=256)
    else:
        config = get_preset(model)
    for mix, types in recorded.items():
        ours = {ours_to_gguf_name(name): tensor_type(name, shape, config, mix.lower()).name
                for name, shape in expected_shapes(config).items()}
        assert ours == types, mix


def test_pure_gives_every_matrix_the_base_type(tmp_path) -> None:
    """pure=True (llama-quantize --pure): no wider output, no "more bits" layers; the file says so."""
    model = tiny_k_model(n_layers=8)
    for mix, base in [("q4_0", "Q4_0"), ("q4_k_m", "Q4_K")]:
        mixed = gguf.GGUFReader(save_gguf(tmp_path / f"{mix}.gguf", model, model.config, None, tensor_type=mix))
        pure = gguf.GGUFReader(save_gguf(tmp_path / f"{mix}-pure.gguf", model, model.config, None, tensor_type=mix,
                                         pure=True))
        assert {t.tensor_type.name for t in mixed.tensors if len(t.shape) == 2} != {base}  # the mix widens some
        assert {t.tensor_type.name for t in pure.tensors if len(t.shape) == 2} == {base}


def tiny_k_model(n_layers: int = 8, tied: bool = False, seed: int = 0, std: float = 0.05) -> Transformer:
    """A small random LLaMA whose rows fill 256-value blocks, so every K-quant type is written."""
    config = get_preset("tiny-llama2").replace(dim=256, n_layers=n_layers, n_heads=4, n_kv_heads=2, hidden_dim=512,
                                               vocab_size=256, tie_embeddings=tied, name="tiny-k")
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    model.reset_parameters(std=std)
    return model


@pytest.mark.slow  # transformers' GGUF loading: 66 s on the shared 2-core machine
def test_q4_k_m_file_runs_in_transformers(tmp_path) -> None:
    """transformers reads our Q4_K_M file's K blocks (gguf-py's dequantizers) into the logits we compute from it,
    and the file is closer to the float model than gguf-py's own Q4_0 quantization of it."""
    transformers = pytest.importorskip("transformers")
    model = tiny_k_model()
    path = save_gguf(tmp_path / "k.gguf", model, model.config, None, tensor_type="q4_k_m",
                     tokenizer_metadata=byte_level_vocab())
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {"Q4_K", "Q6_K"} <= set(types.values()) and types["output.weight"] == "Q6_K"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    ours = logits(load_model(path)[0], tokens)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours, atol=1e-4, rtol=1e-4)
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    raw = {k: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), q4_0), q4_0)).reshape(v.shape)
           if v.ndim == 2 else v for k, v in model.state_dict().items()}
    baseline = Transformer(model.config).eval()
    baseline.load_state_dict(raw)
    want = logits(model, tokens)
    assert rel_error(ours, want) < rel_error(logits(baseline, tokens), want)


# -- llama.cpp running the files ------------------------------------------------------------------------------
def llama_server_binary() -> str | None:
    """llama.cpp's llama-server: $LLAMA_SERVER, or the source build beside llama-cpp-python 0.3.36 on the project's
    machine (docs/performance.md: how it is built)."""
    for candidate in (os.environ.get("LLAMA_SERVER"),
                      "/root/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build-native/bin/llama-server"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def ascii_vocab() -> dict:
    """256 tokens that each decode to whole ASCII characters (llama-server holds back a token that ends inside a
    UTF-8 character, and with it its probabilities): 94 printable characters, 161 letter pairs, an end token."""
    singles = [chr(c) for c in range(33, 127)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = [a + b for a in letters for b in letters][:161]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": singles + pairs
            + ["<|end|>"], "tokenizer.ggml.token_type": [1] * 255 + [3],
            "tokenizer.ggml.merges": [f"{p[0]} {p[1]}" for p in pairs], "tokenizer.ggml.bos_token_id": 255,
            "tokenizer.ggml.eos_token_id": 255, "tokenizer.ggml.add_bos_token": False}


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m"])  # both hold Q6_K tensors too
def test_llama_cpp_runs_our_k_quant_files(tmp_path, mix: str) -> None:
    """llama.cpp's llama-server loads each mix we write and, teacher-forced on a token sequence, gives next-token
    log-probabilities within LOW_PRECISION_LOGPROB_ATOL of the float reference of the same file (gguf-py's
    dequantizers + model.py), the bound set from llama.cpp's own CPU paths against that reference: llama.cpp reads
    every block as gguf-py does (and test_blocks_are_ggmls_... shows the blocks hold what we meant). Measured on
    this model: at most 0.08; llama-quantize's own Q4_K_M and Q6_K files of it drift by 0.078 and 0.064."""
    binary = llama_server_binary()
    if binary is None:
        pytest.skip("llama.cpp's llama-server is not built here (set LLAMA_SERVER=/path/to/llama-server)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from int8_vs_llama_cpp import LlamaServer

    from inference_bounds import LOW_PRECISION_LOGPROB_ATOL

    model = tiny_k_model(std=0.05)
    path = save_gguf(tmp_path / f"{mix}.gguf", model, model.config, None, tensor_type=mix,
                     tokenizer_metadata=ascii_vocab())
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types >= {"q4_k_m": {"Q4_K", "Q6_K"}, "q5_k_m": {"Q5_K", "Q6_K"}}[mix]
    reference = load_model(path)[0]
    ids = torch.randint(0, 254, (33,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = torch.log_softmax(reference(torch.tensor([ids]))[0].double(), -1).numpy()
    os.environ.setdefault("LD_LIBRARY_PATH", str(Path(binary).parent))
    server = LlamaServer(binary, str(path), 1)
    try:
        drift = 0.0
        for n in range(4, 34, 6):
            got = server.top_logprobs(ids[:n], 40)
            top = np.argsort(-want[n - 1])[:20]
            assert set(top[:5].tolist()) <= set(got), f"position {n}: llama.cpp's top-40 misses the reference's top-5"
            drift = max(drift, max(abs(got[int(t)] - want[n - 1, t]) for t in top if int(t) in got))
    finally:
        server.close()
    assert drift <= LOW_PRECISION_LOGPROB_ATOL, drift


# -- convert's default precision ------------------------------------------------------------------------------
def test_convert_writes_the_sources_precision(tmp_path, capsys) -> None:
    """No --dtype/--quant: a float32 HF folder becomes an F16 GGUF (half the bytes, said so); a quantized GGUF keeps
    every tensor's type and bytes."""
    from llamaworks.checkpoints.convert import convert

    model = tiny_k_model(n_layers=2)
    src = save_hf(tmp_path / "hf", model, model.config, None)
    f32 = convert(src, tmp_path / "f32.gguf", to="gguf", dtype="f32", progress=False)
    out = convert(src, tmp_path / "default.gguf", to="gguf")
    assert "F16 from the source's float32 weights" in capsys.readouterr().err
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert {types[k] for k in types if not k.endswith("norm.weight")} == {"F16"}
    assert out.stat().st_size < 0.55 * f32.stat().st_size
    back = load_checkpoint(out).state_dict
    for name, t in model.state_dict().items():
        torch.testing.assert_close(back[name].float(), t.half().float(), rtol=0, atol=0)

    q = save_gguf(tmp_path / "q.gguf", model, model.config, None, tensor_type="q4_k_m",
                  tokenizer_metadata=byte_level_vocab())
    again = convert(q, tmp_path / "again.gguf", to="gguf", progress=False)
    a, b = gguf.GGUFReader(q), gguf.GGUFReader(again)
    assert [(t.name, t.tensor_type) for t in a.tensors] == [(t.name, t.tensor_type) for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        np.testing.assert_array_equal(np.asarray(ta.data), np.asarray(tb.data))
    assert b.fields["general.file_type"].contents() == 15  # the source's: MOSTLY_Q4_K_M
    assert abs(again.stat().st_size - q.stat().st_size) < 4096


def test_quantize_verb_writes_the_mix(tmp_path, capsys) -> None:
    """`llamaworks quantize HF_DIR OUT --to q5_k_m`: the fine-tuned-model path, llama.cpp's Q5_K_M types."""
    from llamaworks import cli

    model = tiny_k_model(n_layers=8, tied=True)
    src = save_hf(tmp_path / "hf", model, model.config, None)
    assert cli.main(["quantize", str(src), str(tmp_path / "m.gguf"), "--to", "q5_k_m"]) == 0
    assert "m.gguf (q5_k_m" in capsys.readouterr().out
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q6_K" and "output.weight" not in types  # tied: embeddings as output
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.1.ffn_down.weight"] == "Q5_K"
    assert reader.fields["general.file_type"].contents() == 17  # MOSTLY_Q5_K_M


def test_bad_shapes_and_names_are_refused() -> None:
    with pytest.raises(ValueError, match="do not fill Q4_K blocks of 256"):
        quantize(np.zeros((2, 96), np.float32), GGMLType.Q4_K)
    from llamaworks.checkpoints.convert import convert

    with pytest.raises(ValueError, match="--quant must be one of q8_0, q6_k, q5_k_m, q4_k_m"):
        convert("x", "y", to="gguf", quant="q3_k_s")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
