"""The native backend (engine/native.py + quant/_lean.cpp) against the backend contract, the float reference and
the torch backend.

Tolerances (stated once):
- With float32 activations (`EngineOptions(int8_activations=False)`) and a float32 KV cache the native forward
  pass reads the same block values the float reference dequantizes and differs by summation order only: greedy
  tokens are identical for 16 steps and logits agree within LOGIT_ATOL = 2e-3 (SmolLM2 and tiny random models).
- With the default int8 activations it drifts like llama.cpp's int8 path (and the torch backend with int8 activations):
  fed the reference's greedy tokens, next-token log-probabilities over the reference's 20 likeliest tokens stay within
  LOW_PRECISION_LOGPROB_ATOL = 2.0 of the float reference (llama.cpp's own int8 paths drift up to 1.94 there)
  and the argmax agrees wherever the reference's top-2 margin exceeds 0.5; free-running greedy text may part
  from the reference only at a near tie (top-2 margin below NEAR_TIE = 0.25). Example of such a tie: SmolLM2's
  chat answer to "What is the capital of France?" opens with 'L' (24.96) or 'The' (24.94): the int8 paths of
  llama.cpp and of this backend answer "L'Étoile, ...", the float reference "The capital of France is Paris."
- Batches, chunks and rows are exact: a token's arithmetic depends only on its own row's cache and activations
  (each row's activations are quantized on their own, attention reads only its row), so running rows together or
  alone, a prompt in one call or split anywhere, a prefix copied or computed, all give bit-identical logits, with
  float and with int8 activations (observed difference: 0.0; asserted with np.array_equal).
- The parity tests run on every kernel build this machine can run besides its own (MATRIX): on an AVX-512 machine
  also the AVX2 build (x86-64-v3), on an aarch64 machine with dotprod also plain NEON (armv8-a). The scalar
  reference build is held to the SIMD paths kernel by kernel (test_kernel_matrix.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from inference_bounds import LOGIT_ATOL, LOW_PRECISION_LOGPROB_ATOL, NEAR_TIE, PROMPTS, logprob_drift
from llamaworks.api import choose_backend, load
from llamaworks.checkpoints import load_model, save_gguf
from llamaworks.config import get_preset
from llamaworks.engine.backend import Backend, EngineOptions
from llamaworks.engine.native import NativeBackend, NativeUnsupported, available
from llamaworks.engine.scheduler import Scheduler, generate, generate_stream
from llamaworks.errors import ConfigError, FormatError
from llamaworks.hardware import cpu_description
from llamaworks.model import Transformer
from llamaworks.sampling import ContextLengthError, SamplingParams

if not available():  # pragma: no cover - a machine without a C++ compiler
    pytest.skip("the native library cannot be built here", allow_module_level=True)

_SIMD = cpu_description()["simd"].split()
MATRIX = ["native", *(["x86-64-v3"] if "avx512f" in _SIMD else []), *(["armv8-a"] if "asimddp" in _SIMD else [])]
FLOAT = EngineOptions(int8_activations=False)
LLAMAS = ("Llamas are domesticated South American camelids, widely used as meat and pack animals by Andean "
          "cultures since pre-Columbian times. They are social animals and live with others as a herd.")
LONG = " ".join([LLAMAS] * 4)  # 156 tokens: more than one 128-token chunk


@pytest.fixture(scope="module")
def smollm2():
    backend = NativeBackend.load(None, EngineOptions(max_context=256, max_rows=4))
    reference, _, _ = load_model(None)
    return backend, reference


@pytest.fixture(scope="module")
def smollm2_float():
    return NativeBackend.load(None, FLOAT.with_(max_context=256, max_rows=4))


def run(backend: NativeBackend, ids: list[int], start: int = 0, row: int = 0) -> np.ndarray:
    """Every token's logits (n, vocab) for `ids` at positions start.. of `row`."""
    return backend.forward([row] * len(ids), ids, range(start, start + len(ids)), range(len(ids)))


def native_greedy(backend: NativeBackend, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    logits = run(backend, ids)[-1]
    out, seen = [], [logits]
    for i in range(steps):
        out.append(int(logits.argmax()))
        logits = run(backend, [out[-1]], len(ids) + i)[0]
        seen.append(logits)
    return out, np.stack(seen)


@torch.inference_mode()
def reference_greedy(model: Transformer, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    model.setup_cache(1, 256, torch.float32)
    row = torch.tensor([0])
    logits = model(torch.tensor([ids]), positions=torch.arange(len(ids))[None], cache_rows=row, last_only=True)[0, -1]
    out, seen = [], [logits]
    for i in range(steps):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), positions=torch.tensor([[len(ids) + i]]), cache_rows=row,
                       last_only=True)[0, -1]
        seen.append(logits)
    return out, torch.stack(seen).float().numpy()


def native_forced(backend: NativeBackend, ids: list[int], tokens: list[int]) -> np.ndarray:
    """Logits after the prompt and after each of `tokens` fed in turn (teacher forcing)."""
    out = [run(backend, ids)[-1]]
    for i, t in enumerate(tokens):
        out.append(run(backend, [t], len(ids) + i)[0])
    return np.stack(out)


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# -- the default model against the float reference ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("cpu_target", MATRIX)
def test_float_activations_greedy_equals_float_reference(smollm2, cpu_target: str) -> None:
    reference = smollm2[1]
    backend = NativeBackend.load(None, FLOAT.with_(max_context=256, kv_dtype="float32", cpu_target=cpu_target))
    assert backend.interleaved_share == 1.0 and isinstance(backend, Backend)
    for prompt in PROMPTS:
        ids = backend.tokenizer.encode(prompt)
        got, got_logits = native_greedy(backend, ids, 16)
        want, want_logits = reference_greedy(reference, ids, 16)
        assert got == want, f"{prompt!r}: {backend.tokenizer.decode(got)!r} != {backend.tokenizer.decode(want)!r}"
        assert np.abs(got_logits - want_logits).max() < LOGIT_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("cpu_target", MATRIX)
def test_int8_activations_drift_against_float_reference(smollm2, cpu_target: str) -> None:
    reference = smollm2[1]
    backend = (smollm2[0] if cpu_target == "native"
               else NativeBackend.load(None, EngineOptions(max_context=256, cpu_target=cpu_target)))
    assert backend.options.int8_activations  # the default on every CPU
    for prompt in PROMPTS:
        ids = backend.tokenizer.encode(prompt)
        want, want_logits = reference_greedy(reference, ids, 16)
        got_logits = native_forced(backend, ids, want)
        assert logprob_drift(got_logits, want_logits) < LOW_PRECISION_LOGPROB_ATOL
        top2 = -np.sort(-want_logits, axis=-1)[:, :2]
        clear = top2[:, 0] - top2[:, 1] > 0.5
        assert np.array_equal(got_logits.argmax(-1)[clear], want_logits.argmax(-1)[clear])
        got, _ = native_greedy(backend, ids, 16)
        parted = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if parted is not None:
            margin = top2[parted, 0] - top2[parted, 1]
            assert margin < NEAR_TIE, f"{prompt!r}: parts at token {parted} where the margin is {margin:.2f}"


# -- the contract: batches, chunks, rows -----------------------------------------------------------------------
@pytest.mark.parametrize("numerics", ["int8", "float"])
def test_rows_batched_together_equal_each_row_alone(smollm2, smollm2_float, numerics: str) -> None:
    """Three rows with different prompts at different positions, interleaved token by token in one call (and then
    one decode step each, batched), give the logits each row gives alone."""
    backend = smollm2[0] if numerics == "int8" else smollm2_float
    tok = backend.tokenizer
    # more than one 128-token chunk, the last one short
    first = tok.encode(LONG)[:130]
    prompts = [first, tok.encode("The capital of France is"), tok.encode("def fibonacci(n):")]
    alone, alone_next = [], []
    for p in prompts:
        alone.append(run(backend, p, row=3))
        alone_next.append(run(backend, [42], len(p), row=3)[0])
    rows, tokens, positions, index = [], [], [], {}
    for i in range(max(len(p) for p in prompts)):
        for r, p in enumerate(prompts):
            if i < len(p):
                index[r, i] = len(rows)
                rows.append(r)
                tokens.append(p[i])
                positions.append(i)
    assert len(tokens) > 128
    wanted = [index[r, i] for r, p in enumerate(prompts) for i in range(len(p))]
    together = backend.forward(rows, tokens, positions, wanted)
    assert np.array_equal(together, np.concatenate(alone))
    step = backend.forward([2, 0, 1], [42, 42, 42], [len(prompts[2]), len(prompts[0]), len(prompts[1])], [1, 2, 0])
    assert np.array_equal(step, np.stack([alone_next[0], alone_next[1], alone_next[2]]))


@pytest.mark.parametrize("numerics", ["int8", "float"])
def test_a_prompt_split_anywhere_equals_one_call(smollm2, smollm2_float, numerics: str) -> None:
    backend = smollm2[0] if numerics == "int8" else smollm2_float
    ids = backend.tokenizer.encode(LONG)
    assert len(ids) > 131  # more than one 128-token chunk
    whole = run(backend, ids)
    # cuts that put each int8 kernel on either side (AVX-512: up to 13 rows the x8 group kernel, then 16-row
    # lane groups of the prompt kernel, a short last one padded from 14 rows, else the group kernel again), chunk
    # boundaries, and chunks of 1-3 tokens (float: plain rows once took another kernel below 4 tokens)
    for cut in (1, 2, 3, 13, 31, 32, 33, 127, 128, 129, 130, 131, len(ids) - 1):
        first, rest = run(backend, ids[:cut]), run(backend, ids[cut:], cut)
        assert np.array_equal(np.concatenate([first, rest]), whole), cut
    assert np.array_equal(backend.forward([0] * len(ids), ids, range(len(ids)), [len(ids) - 1, 0]),
                          whole[[len(ids) - 1, 0]])  # logits_for in any order


def test_copy_then_continue_equals_the_whole_prompt(smollm2) -> None:
    backend, _ = smollm2
    ids = backend.tokenizer.encode(LLAMAS)
    whole = run(backend, ids, row=2)
    run(backend, ids[:20], row=1)
    run(backend, [7, 7, 7, 7, 7], 20, row=3)  # row 3 holds something else beyond the copy
    backend.copy(1, 3, 20)
    assert np.array_equal(run(backend, ids[20:], 20, row=3), whole[20:])


def test_release_returns_memory_and_keeps_the_prefix() -> None:
    backend = NativeBackend.load(None, EngineOptions(max_context=2048, max_rows=2))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, backend.config.vocab_size, 1500).tolist()
    keep = 100
    empty = backend.cache_bytes()
    assert empty == 0
    logits = run(backend, ids, row=1)
    used, rss_used = backend.cache_bytes(), rss_bytes()
    per_position = 2 * backend.config.n_layers * backend.config.kv_heads * backend.config.head_size * 2
    assert used >= 1500 * per_position  # float16 keys and values, whole pages
    backend.release(1, keep)
    freed, rss_freed = used - backend.cache_bytes(), rss_used - rss_bytes()
    assert freed > 0.9 * (1500 - keep) * per_position
    assert rss_freed > 0.8 * freed  # the pages went back to the OS, not just out of the count
    assert np.array_equal(run(backend, [ids[keep]], keep, row=1)[0], logits[keep])  # positions < keep are intact
    backend.release(1)
    assert backend.cache_bytes() == 0


def test_out_of_range_arguments_are_one_line_value_errors(smollm2) -> None:
    backend, _ = smollm2
    cases = [
        (lambda: backend.forward([0, 0], [1, 49152], [0, 1], [1]),
         r"^token id 49152 is outside the vocabulary \(0\.\.49151\)$"),
        (lambda: backend.forward([0], [-1], [0], [0]), r"^token id -1 is outside the vocabulary"),
        (lambda: backend.forward([4], [1], [0], [0]), r"^row 4 is outside the cache's rows \(0\.\.3\)$"),
        (lambda: backend.forward([0], [1], [256], [0]),
         r"^position 256 is outside the context of 256 positions \(0\.\.255\)$"),
        (lambda: backend.forward([0], [1], [-3], [0]), r"^position -3 is outside"),
        (lambda: backend.forward([0], [1], [0], [1]), r"^logits_for index 1 is outside the batch of 1 tokens$"),
        (lambda: backend.copy(0, 9, 3), r"^destination row 9 is outside the cache's rows"),
        (lambda: backend.copy(0, 1, 257), r"^length 257 is outside the context of 256 positions$"),
        (lambda: backend.release(-1), r"^row -1 is outside the cache's rows"),
        (lambda: backend.release(0, 300), r"^keep 300 is outside the context"),
        (lambda: backend.forward([0, 0], [1], [0], [0]), r"^1 tokens, 2 rows and 1 positions: expected one each$"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_two_backends_keep_their_own_numerics(smollm2, smollm2_float) -> None:
    """int8 and float activations are options of each backend, not a process-wide switch: loaded side by side,
    each gives its own numerics, whichever ran last, and each equals a fresh load with its options."""
    int8, floats = smollm2[0], smollm2_float
    ids = int8.tokenizer.encode("The capital of France is")
    a, b = run(int8, ids), run(floats, ids)
    assert not np.array_equal(a, b) and logprob_drift(a, b) < LOW_PRECISION_LOGPROB_ATOL
    assert np.array_equal(run(int8, ids), a) and np.array_equal(run(floats, ids), b)  # after each other
    assert np.array_equal(run(NativeBackend.load(None, FLOAT.with_(max_context=64)), ids), b)


def test_forked_child_runs_the_parents_model(smollm2) -> None:
    """A fork's child has none of the parent's pool threads; it makes its own instead of waiting forever."""
    backend, _ = smollm2
    ids = [1, 2, 3, 4, 5]
    want = run(backend, ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            got = run(backend, ids)
            os.write(write, b"1" if np.array_equal(got, want) else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    assert answer == b"1"


# -- the scheduler on this backend and the front ends -------------------------------------------------------------
def test_a_repeated_prompt_reuses_the_row(smollm2, monkeypatch) -> None:
    """The one-row scheduler keeps what the row holds: the same prompt again runs only its last token."""
    backend, _ = smollm2
    sched = Scheduler(backend)
    ids = backend.tokenizer.encode("One two three four five six seven")
    params = SamplingParams(temperature=0, max_new_tokens=3)
    first = generate(sched, ids, params)
    calls = []
    real = backend.forward

    def spy(rows, tokens, positions, logits_for):
        calls.append((list(tokens), list(positions)))
        return real(rows, tokens, positions, logits_for)

    monkeypatch.setattr(backend, "forward", spy)
    again = generate(sched, ids, params)
    assert again.token_ids == first.token_ids
    assert calls[0] == ([ids[-1]], [len(ids) - 1])  # only the last prompt token ran again, at its own position


def test_generation_never_imports_torch(tmp_path) -> None:
    code = ("import sys\nfrom llamaworks.cli import main\n"
            "assert main(['generate', '-p', 'The capital of France is', '-t', '0', '-n', '8', '--stats']) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "8 tokens (length)" in result.stderr


def test_api_on_the_native_backend_matches_the_scheduler(smollm2) -> None:
    llm = load(backend="native", max_context=256)
    assert isinstance(llm.backend, NativeBackend) and llm.model is llm.backend
    params = dict(temperature=0, max_new_tokens=12)
    text = llm.chat("What is 2+2?", **params)
    ids = llm.encode_chat("What is 2+2?")
    result = generate(Scheduler(smollm2[0]), ids, SamplingParams(**params))
    assert text == result.text and llm.last_result.completion_tokens == result.completion_tokens
    pieces = list(llm.stream([{"role": "user", "content": "What is 2+2?"}], **params))
    assert "".join(pieces) == text


def test_stop_strings_and_context_limits(smollm2) -> None:
    backend, _ = smollm2
    sched = Scheduler(backend)
    ids = backend.tokenizer.encode("1, 2, 3, 4, 5,")
    result = generate(sched, ids, SamplingParams(temperature=0, max_new_tokens=30, stop=[" 9"]))
    assert result.finish_reason == "stop" and result.stop_sequence == " 9" and " 9" not in result.text
    assert result.text.startswith(" 6, 7, 8,")
    with pytest.raises(ContextLengthError):
        list(generate_stream(sched, [1] * 256, SamplingParams()))
    limited = generate(sched, [1] * 250, SamplingParams(temperature=0, max_new_tokens=50))
    assert limited.finish_reason == "length" and limited.completion_tokens == 6  # 256 positions in all


def test_bad_files_get_one_line_errors(tmp_path) -> None:
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"\0" * 64)
    with pytest.raises(FormatError, match="not a GGUF file"):
        NativeBackend.load(not_gguf)
    with pytest.raises(ConfigError, match="GGUF files only"):
        choose_backend("native", tmp_path)


def test_files_the_native_backend_cannot_run_fall_back_to_torch(tmp_path) -> None:
    config = get_preset("tiny-llama2")  # hidden size 172: not whole 32-element blocks
    path = save_gguf(tmp_path / "odd.gguf", Transformer(config), config, tensor_type="f16")
    with pytest.raises(NativeUnsupported, match="multiples of 32"):
        NativeBackend.load(path)
    # The file has no tokenizer, which only load() minds: auto got that far on the torch backend.
    with pytest.raises(FormatError, match="no tokenizer"):
        load(path, backend="auto")
    with pytest.raises(NativeUnsupported):
        load(path, backend="native")


def test_backend_choice() -> None:
    assert choose_backend(None, None) == "native"  # the API's default is the CLI's: auto
    assert choose_backend("auto", None) == "native"
    assert choose_backend("auto", None, "cuda") == "torch"
    assert choose_backend("auto", None, "cpu", "bf16") == "torch"
    assert choose_backend("auto", None, reference=True) == "torch"
    with pytest.raises(ConfigError, match="CPU only"):
        choose_backend("native", None, "cuda")
    with pytest.raises(ConfigError, match="not one of"):
        choose_backend("lean", None)


# -- tiny random models written as GGUF ----------------------------------------------------------------------
def _tiny_gguf(tmp_path, preset: str, tensor_type: str, seed: int = 0):
    config = get_preset(preset)
    torch.manual_seed(seed)
    model = Transformer(config)
    model.reset_parameters(std=0.2)
    # pure: every matrix of the named type (the mix would make the output Q6_K, which this backend reads as Q8_0)
    path = save_gguf(tmp_path / f"{preset}-{tensor_type}.gguf", model, config, tensor_type=tensor_type, pure=True)
    reference, _, _ = load_model(path)
    return path, reference


@pytest.mark.parametrize(("preset", "tensor_type"), [("tiny-llama3", "q4_0"), ("tiny-tied", "q4_1"),
                                                     ("tiny-mistral", "q8_0"), ("tiny-12m", "q4_0")])
def test_tiny_models_equal_the_float_reference(tmp_path, preset: str, tensor_type: str) -> None:
    """GQA (1 and 2 key/value heads), llama3 rope scaling, tied output, a sliding window (8 < prompt), x8 rows."""
    path, reference = _tiny_gguf(tmp_path, preset, tensor_type)
    backend = NativeBackend.load(path, FLOAT.with_(kv_dtype="float32", max_rows=2))
    ids = np.random.default_rng(1).integers(0, backend.config.vocab_size, 45).tolist()
    with torch.inference_mode():
        want = reference(torch.tensor([ids]))[0].numpy()
    got = run(backend, ids, row=1)
    assert np.abs(got - want).max() < LOGIT_ATOL
    # and one decode step after it
    with torch.inference_mode():
        want_next = reference(torch.tensor([[*ids, 7]]))[0, -1].numpy()
    assert np.abs(run(backend, [7], len(ids), row=1)[0] - want_next).max() < LOGIT_ATOL


def test_mapped_plain_rows_equal_interleaved_rows(tmp_path) -> None:
    """The float reference's values either way, with float activations: the x8 kernel dequantizes a group once and
    then dots, the plain one dequantizes inside the dot; each differs from the reference by float rounding order
    only (LOGIT_ATOL). (With int8 activations those last bits can flip an activation's int8 rounding further on:
    then the two layouts differ like int8 and float do.)"""
    path, reference = _tiny_gguf(tmp_path, "tiny-12m", "q4_1")
    in_memory = NativeBackend.load(path, FLOAT.with_(kv_dtype="float32"))
    mapped = NativeBackend.load(path, FLOAT.with_(kv_dtype="float32", mmap=True))
    assert mapped.weights_in == "mmap" and mapped.interleaved_share == 0.0
    assert in_memory.interleaved_share == 1.0
    ids = list(range(3, 40))
    with torch.inference_mode():
        want = reference(torch.tensor([ids]))[0].numpy()
    for backend in (in_memory, mapped):
        assert np.abs(run(backend, ids) - want).max() < LOGIT_ATOL


@pytest.mark.parametrize("tensor_type", ["f16", "q5_0"])
def test_other_tensor_types_are_converted_to_q8_0(tmp_path, tensor_type: str) -> None:
    """An F16 or Q5_0 file runs as Q8_0 blocks of its values: exactly what a Q8_0 file written from them holds."""
    path, reference = _tiny_gguf(tmp_path, "tiny-tied", tensor_type)
    as_q8 = save_gguf(tmp_path / "from-other.gguf", reference, reference.config, tensor_type="q8_0")
    converted, written = NativeBackend.load(path), NativeBackend.load(as_q8)
    ids = list(range(10, 30))
    assert np.array_equal(run(converted, ids), run(written, ids))


def test_seeded_sampling_repeats(smollm2) -> None:
    backend, _ = smollm2
    ids = backend.tokenizer.encode("Once upon a time")
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_new_tokens=12)
    first = generate(Scheduler(backend), ids, params)
    second = generate(Scheduler(backend), ids, params)
    assert first.token_ids == second.token_ids and first.completion_tokens == 12
