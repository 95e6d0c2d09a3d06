"""Prompts and tolerances shared by the fast-path tests of both backends (test_torch_backend.py,
test_native_backend.py), whose module docstrings state what each bound means."""

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]
LOGIT_ATOL = 2e-3  # float32 activations and KV cache against the float reference
# The defaults (int8 activations, ...) against the float reference, teacher-forced, in next-token log-probability
# over the reference's 20 most likely tokens. Set from llama.cpp's own int8 CPU paths, same GGUF, prompts and
# positions: 1.94 (its AVX-512 build) and 1.46 (its AVX2 build) at most (benchmarks/int8_vs_llama_cpp.py, llama.cpp
# 0.3.36 built from source, AMD EPYC Zen 4; docs/performance.md): ours may drift as far as llama.cpp's does.
LOW_PRECISION_LOGPROB_ATOL = 2.0
NEAR_TIE = 0.25  # free-running greedy text may part from the reference only where its top-2 margin is below this


def logprob_drift(got_logits, want_logits, k: int = 20) -> float:
    """Largest |log p_got - log p_want| over each row's k most likely tokens of `want` (rows of logits)."""
    import numpy as np

    def log_softmax(x):
        x = np.asarray(x, dtype=np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    got, want = log_softmax(got_logits), log_softmax(want_logits)
    top = np.argsort(-want, axis=-1)[..., :k]
    return float(np.abs(np.take_along_axis(got, top, -1) - np.take_along_axis(want, top, -1)).max())
