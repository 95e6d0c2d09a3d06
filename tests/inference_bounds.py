"""Prompts and tolerances shared by the fast-path tests of both runtimes (test_torch_backend.py,
test_native_backend.py), whose module docstrings state what each bound means."""

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]
LOGIT_ATOL = 2e-3  # float32 activations and KV cache against the float reference
LOW_PRECISION_LOGIT_ATOL = 2.0  # the defaults (int8 activations, ...) against the float reference, teacher-forced
NEAR_TIE = 0.25  # free-running greedy text may part from the reference only where its top-2 margin is below this
