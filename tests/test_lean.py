"""The torch-free runtime (lean.py + quant/_lean.cpp) against the float reference and the torch runtime.

Tolerances (stated once):
- With float32 activations (`lean_kernels.int8_decode(False)`) and a float32 KV cache the lean forward pass reads
  the same block values the float reference dequantizes and differs by summation order only: greedy tokens are
  identical for 16 steps and logits agree within LOGIT_ATOL = 2e-3 (SmolLM2 and tiny random models).
- With the default int8 activations it drifts like llama.cpp's int8 path (and the torch runtime's decode):
  fed the reference's greedy tokens, logits stay within LOW_PRECISION_LOGIT_ATOL = 2.0 of the float reference
  and the argmax agrees wherever the reference's top-2 margin exceeds 0.5; free-running greedy text may part
  from the reference only at a near tie (top-2 margin below NEAR_TIE = 0.25). Example of such a tie: SmolLM2's
  chat answer to "What is the capital of France?" opens with 'L' (24.96) or 'The' (24.94): the int8 paths of
  llama.cpp and of this runtime answer "L'Étoile, ...", the float reference "The capital of France is Paris."
- Prompts run in chunks: splitting a prompt across calls gives bit-identical logits (each row's activations
  are quantized on their own; attention reads the cache).
- The parity tests run on every kernel build this machine can run besides its own (MATRIX): on an AVX-512 machine
  also the AVX2 build (x86-64-v3), on an aarch64 machine with dotprod also plain NEON (armv8-a). The scalar
  reference build is held to the SIMD paths kernel by kernel (test_kernel_matrix.py).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from inference_bounds import LOGIT_ATOL, LOW_PRECISION_LOGIT_ATOL, NEAR_TIE, PROMPTS
from llamaworks import choose_runtime, load
from llamaworks.checkpoints import load_model, save_gguf
from llamaworks.config import get_preset
from llamaworks.errors import ConfigError, FormatError
from llamaworks.hardware import cpu_description
from llamaworks.model import Transformer
from llamaworks.quant import lean_kernels
from llamaworks.sampling import ContextLengthError, SamplingParams

lean = pytest.importorskip("llamaworks.lean")
if not lean.available():  # pragma: no cover - a machine without a C++ compiler
    pytest.skip("the torch-free library cannot be built here", allow_module_level=True)

_SIMD = cpu_description()["simd"].split()
MATRIX = ["native", *(["x86-64-v3"] if "avx512f" in _SIMD else []), *(["armv8-a"] if "asimddp" in _SIMD else [])]


@pytest.fixture
def float_activations():
    was = lean_kernels.int8_decode()
    lean_kernels.int8_decode(False)
    yield
    lean_kernels.int8_decode(was)


@pytest.fixture(scope="module")
def smollm2():
    model = lean.LeanModel.load(max_context=256)
    reference, _, _ = load_model(None)
    return model, reference


def lean_greedy(model, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    model.reset()
    logits = model.forward(ids, 0)
    out, seen = [], [logits]
    for i in range(steps):
        out.append(int(logits.argmax()))
        logits = model.forward([out[-1]], len(ids) + i)
        seen.append(logits)
    return out, np.stack(seen)


@torch.inference_mode()
def reference_greedy(model: Transformer, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    model.setup_cache(1, 256)
    logits = model(torch.tensor([ids]), start_pos=0, last_only=True)[0, -1]
    out, seen = [], [logits]
    for i in range(steps):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), start_pos=len(ids) + i, last_only=True)[0, -1]
        seen.append(logits)
    return out, torch.stack(seen).float().numpy()


def lean_forced(model, ids: list[int], tokens: list[int]) -> np.ndarray:
    """Logits after the prompt and after each of `tokens` fed in turn (teacher forcing)."""
    model.reset()
    out = [model.forward(ids, 0)]
    for i, t in enumerate(tokens):
        out.append(model.forward([t], len(ids) + i))
    return np.stack(out)


# -- the default model -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("cpu_target", MATRIX)
def test_float_activations_greedy_equals_float_reference(smollm2, cpu_target: str) -> None:
    reference = smollm2[1]
    was = lean_kernels.int8_decode(cpu_target=cpu_target)
    lean_kernels.int8_decode(False, cpu_target)
    try:
        model = lean.LeanModel.load(max_context=256, kv_dtype="float32", cpu_target=cpu_target)
        assert model.interleaved_share == 1.0
        for prompt in PROMPTS:
            ids = model.tokenizer.encode(prompt)
            got, got_logits = lean_greedy(model, ids, 16)
            want, want_logits = reference_greedy(reference, ids, 16)
            assert got == want, f"{prompt!r}: {model.tokenizer.decode(got)!r} != {model.tokenizer.decode(want)!r}"
            assert np.abs(got_logits - want_logits).max() < LOGIT_ATOL
    finally:
        lean_kernels.int8_decode(was, cpu_target)


@pytest.mark.slow
@pytest.mark.parametrize("cpu_target", MATRIX)
def test_int8_activations_drift_against_float_reference(smollm2, cpu_target: str) -> None:
    reference = smollm2[1]
    assert lean_kernels.int8_decode(cpu_target=cpu_target)  # the default on every CPU
    model = smollm2[0] if cpu_target == "native" else lean.LeanModel.load(max_context=256, cpu_target=cpu_target)
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        want, want_logits = reference_greedy(reference, ids, 16)
        got_logits = lean_forced(model, ids, want)
        assert np.abs(got_logits - want_logits).max() < LOW_PRECISION_LOGIT_ATOL
        top2 = -np.sort(-want_logits, axis=-1)[:, :2]
        clear = top2[:, 0] - top2[:, 1] > 0.5
        assert np.array_equal(got_logits.argmax(-1)[clear], want_logits.argmax(-1)[clear])
        got, _ = lean_greedy(model, ids, 16)
        parted = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if parted is not None:
            margin = top2[parted, 0] - top2[parted, 1]
            assert margin < NEAR_TIE, f"{prompt!r}: parts at token {parted} where the margin is {margin:.2f}"


def test_prompt_split_across_calls_gives_identical_logits(smollm2) -> None:
    model, _ = smollm2
    ids = model.tokenizer.encode("Llamas are domesticated South American camelids, widely used as meat and pack "
                                 "animals by Andean cultures since pre-Columbian times. They are social animals "
                                 "and live with others as a herd.")
    assert len(ids) > 33  # more than one 32-token chunk
    whole = model.forward(ids, 0, all_logits=True)
    model.reset()
    first = model.forward(ids[:13], 0, all_logits=True)
    rest = model.forward(ids[13:], 13, all_logits=True)
    assert np.array_equal(np.concatenate([first, rest]), whole)
    assert model.cached == ids


def test_prefill_reuses_the_cached_prefix(smollm2, monkeypatch) -> None:
    model, _ = smollm2
    ids = model.tokenizer.encode("One two three four five six seven")
    model.reset()
    want = model.forward(ids, 0)
    model.forward([5, 6, 7], len(ids))  # a reply that the next prompt does not repeat
    calls = []
    real = model.forward

    def spy(tokens, start_pos, **kw):
        calls.append((list(tokens), start_pos))
        return real(tokens, start_pos, **kw)

    monkeypatch.setattr(model, "forward", spy)
    assert np.array_equal(model.prefill(ids), want)
    assert calls == [([ids[-1]], len(ids) - 1)]  # only the last prompt token ran again, at its own position


def test_generation_never_imports_torch(tmp_path) -> None:
    code = ("import sys\nfrom llamaworks.cli import main\n"
            "assert main(['generate', '-p', 'The capital of France is', '-t', '0', '-n', '8', '--stats']) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "8 tokens (length)" in result.stderr


def test_api_on_the_lean_runtime_matches_the_loop(smollm2) -> None:
    llm = load(runtime="lean", max_context=256)
    assert isinstance(llm.model, lean.LeanModel)
    params = dict(temperature=0, max_new_tokens=12)
    text = llm.chat("What is 2+2?", **params)
    ids = llm.encode_chat("What is 2+2?")
    result = lean.generate(smollm2[0], llm.tokenizer, ids, SamplingParams(**params))
    assert text == result.text and llm.last_result.completion_tokens == result.completion_tokens
    pieces = list(llm.stream([{"role": "user", "content": "What is 2+2?"}], **params))
    assert "".join(pieces) == text


def test_stop_strings_and_context_limits(smollm2) -> None:
    model, _ = smollm2
    ids = model.tokenizer.encode("1, 2, 3, 4, 5,")
    result = lean.generate(model, model.tokenizer, ids, SamplingParams(temperature=0, max_new_tokens=30,
                                                                       stop=[" 9"]))
    assert result.finish_reason == "stop" and result.stop_sequence == " 9" and " 9" not in result.text
    assert result.text.startswith(" 6, 7, 8,")
    with pytest.raises(ContextLengthError):
        list(lean.generate_stream(model, model.tokenizer, [1] * 256, SamplingParams()))
    limited = lean.generate(model, model.tokenizer, [1] * 250, SamplingParams(temperature=0, max_new_tokens=50))
    assert limited.finish_reason == "length" and limited.completion_tokens == 6  # 256 positions in all


def test_bad_input_gets_one_line_errors(smollm2, tmp_path) -> None:
    model, _ = smollm2
    with pytest.raises(RuntimeError, match=r"^llamaworks: token id 49152 is outside the vocabulary \(0\.\.49151\)$"):
        model.forward([1, 49152], 0)
    with pytest.raises(RuntimeError, match="do not fit the context of 256 tokens"):
        model.forward([1, 2], 255)
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"\0" * 64)
    with pytest.raises(FormatError, match="not a GGUF file"):
        lean.LeanModel.load(not_gguf)
    with pytest.raises(ConfigError, match="GGUF files only"):
        choose_runtime("lean", tmp_path)


def test_files_the_lean_runtime_cannot_run_fall_back_to_torch(tmp_path) -> None:
    config = get_preset("tiny-llama2")  # hidden size 172: not whole 32-element blocks
    path = save_gguf(tmp_path / "odd.gguf", Transformer(config), config, tensor_type="f16")
    with pytest.raises(lean.LeanUnsupported, match="multiples of 32"):
        lean.LeanModel.load(path)
    # The file has no tokenizer, which only load() minds: auto got that far on the torch runtime.
    with pytest.raises(FormatError, match="no tokenizer"):
        load(path, runtime="auto")
    with pytest.raises(lean.LeanUnsupported):
        load(path, runtime="lean")


def test_forked_child_runs_the_parents_model(smollm2) -> None:
    """A fork's child has none of the parent's pool threads; it makes its own instead of waiting forever."""
    import os

    model, _ = smollm2
    ids = [1, 2, 3, 4, 5]
    want = model.forward(ids, 0)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            got = model.forward(ids, 0)
            os.write(write, b"1" if np.array_equal(got, want) else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    assert answer == b"1"


def test_cache_bookkeeping_and_bad_calls(smollm2) -> None:
    model, _ = smollm2
    model.reset()
    model.forward([1, 2, 3], 0)
    model.forward([4], 5)  # beyond what is known: the cache holds nothing reusable any more
    assert model.cached == []
    model.forward([1, 2, 3, 4], 0)
    model.forward([9], 2)  # rewinding overwrites position 2 and forgets what followed
    assert model.cached == [1, 2, 9]
    with pytest.raises(ValueError, match="at least one token"):
        model.prefill([])


def test_the_two_libraries_keep_their_own_switches() -> None:
    from llamaworks.quant import kernels

    assert kernels.native_available()
    torch_int8, lean_int8 = kernels.int8_decode(), lean_kernels.int8_decode()
    try:
        lean_kernels.int8_decode(not lean_int8)
        assert kernels.int8_decode() == torch_int8 and lean_kernels.int8_decode() == (not lean_int8)
    finally:
        lean_kernels.int8_decode(lean_int8)


def test_runtime_choice() -> None:
    assert choose_runtime(None, None) == "torch"  # the Python API's default
    assert choose_runtime("auto", None) == "lean"  # the CLI's default on the bundled GGUF
    assert choose_runtime("auto", None, "cuda") == "torch"
    assert choose_runtime("auto", None, "cpu", "bf16") == "torch"
    assert choose_runtime("auto", None, reference=True) == "torch"
    with pytest.raises(ConfigError, match="CPU only"):
        choose_runtime("lean", None, "cuda")
    with pytest.raises(ConfigError, match="not one of"):
        choose_runtime("fast", None)


# -- tiny random models written as GGUF ----------------------------------------------------------------------
def _tiny_gguf(tmp_path, preset: str, tensor_type: str, seed: int = 0):
    config = get_preset(preset)
    torch.manual_seed(seed)
    model = Transformer(config)
    model.reset_parameters(std=0.2)
    path = save_gguf(tmp_path / f"{preset}-{tensor_type}.gguf", model, config, tensor_type=tensor_type)
    reference, _, _ = load_model(path)
    return path, reference


@pytest.mark.parametrize(("preset", "tensor_type"), [("tiny-llama3", "q4_0"), ("tiny-tied", "q4_1"),
                                                     ("tiny-mistral", "q8_0"), ("tiny-12m", "q4_0")])
def test_tiny_models_equal_the_float_reference(tmp_path, float_activations, preset: str, tensor_type: str) -> None:
    """GQA (1 and 2 key/value heads), llama3 rope scaling, tied output, a sliding window (8 < prompt), x8 rows."""
    path, reference = _tiny_gguf(tmp_path, preset, tensor_type)
    model = lean.LeanModel.load(path, kv_dtype="float32")
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 45).tolist()
    with torch.inference_mode():
        want = reference(torch.tensor([ids]))[0].numpy()
    got = model.forward(ids, 0, all_logits=True)
    assert np.abs(got - want).max() < LOGIT_ATOL
    # and one decode step after it
    with torch.inference_mode():
        want_next = reference(torch.tensor([[*ids, 7]]))[0, -1].numpy()
    assert np.abs(model.forward([7], len(ids)) - want_next).max() < LOGIT_ATOL


def test_mapped_plain_rows_equal_interleaved_rows(tmp_path, float_activations) -> None:
    """Same values either way (with int8 activations the two kernels' float sums differ in their last bits, which
    can flip an activation's int8 rounding further on: then they differ like int8 and float do)."""
    path, _ = _tiny_gguf(tmp_path, "tiny-12m", "q4_1")
    in_memory = lean.LeanModel.load(path)
    mapped = lean.LeanModel.load(path, mmap=True)
    assert mapped.weights_in == "mmap" and mapped.interleaved_share == 0.0
    assert in_memory.interleaved_share == 1.0
    ids = list(range(3, 40))
    np.testing.assert_allclose(in_memory.forward(ids, 0, all_logits=True), mapped.forward(ids, 0, all_logits=True),
                               atol=1e-4)


@pytest.mark.parametrize("tensor_type", ["f16", "q5_0"])
def test_other_tensor_types_are_converted_to_q8_0(tmp_path, tensor_type: str) -> None:
    """An F16 or Q5_0 file runs as Q8_0 blocks of its values: exactly what a Q8_0 file written from them holds."""
    path, reference = _tiny_gguf(tmp_path, "tiny-tied", tensor_type)
    as_q8 = save_gguf(tmp_path / "from-other.gguf", reference, reference.config, tensor_type="q8_0")
    converted, written = lean.LeanModel.load(path), lean.LeanModel.load(as_q8)
    ids = list(range(10, 30))
    assert np.array_equal(converted.forward(ids, 0, all_logits=True), written.forward(ids, 0, all_logits=True))


# -- sampling ------------------------------------------------------------------------------------------------
def test_sampling_filters_match_the_torch_sampler() -> None:
    from llamaworks.generate import _filtered, _penalized

    rng = np.random.default_rng(0)
    # 4000 plausible tokens and 20000 hopeless ones (the nucleus filter sorts only the former when it can)
    logits = np.concatenate([rng.standard_normal(4000) * 3, np.full(20000, -60.0)]).astype(np.float32)
    history = [5, 5, 17, 3999]
    for params in [SamplingParams(top_k=40), SamplingParams(top_p=0.9), SamplingParams(top_k=50, top_p=0.8),
                   SamplingParams(top_p=0.995), SamplingParams(repetition_penalty=1.3, presence_penalty=0.5,
                                                                frequency_penalty=0.2)]:
        x = lean._penalized(logits, params, history)
        ref = _penalized(torch.from_numpy(logits)[None], [params], [history])[0]
        np.testing.assert_allclose(x, ref.numpy(), rtol=1e-6)
        kept = np.isfinite(lean._nucleus(x, params.top_k, params.top_p))
        ref_kept = torch.isfinite(_filtered(ref[None], [params])[0]).numpy()
        assert np.array_equal(kept, ref_kept), params


def test_sampling_draws_follow_the_distribution() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2, 0.0], dtype=np.float64) + 1e-30).astype(np.float32)
    rng = np.random.default_rng(3)
    params = SamplingParams(temperature=1.0)
    counts = np.bincount([lean.sample_token(logits, params, [], rng) for _ in range(20000)], minlength=4)
    np.testing.assert_allclose(counts / 20000, [0.5, 0.3, 0.2, 0.0], atol=0.015)
    assert counts[3] == 0
    assert lean.sample_token(logits, SamplingParams(temperature=0), [], rng) == 0
    only_best = SamplingParams(temperature=1.0, min_p=0.7)
    assert {lean.sample_token(logits, only_best, [], rng) for _ in range(200)} == {0}


def test_seeded_sampling_repeats(smollm2) -> None:
    model, _ = smollm2
    ids = model.tokenizer.encode("Once upon a time")
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_new_tokens=12)
    first = lean.generate(model, model.tokenizer, ids, params)
    second = lean.generate(model, model.tokenizer, ids, params)
    assert first.token_ids == second.token_ids and first.completion_tokens == 12
