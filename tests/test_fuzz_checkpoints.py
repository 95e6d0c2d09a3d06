"""Bounded checkpoint fuzzing (issue 13): a few hundred mutated GGUF files, safetensors headers, config.json,
tokenizer files, params.json and .pth files, fixed seeds. Every input loads or raises LlamaworksError in one
line: no other exception, no hang (each input has a timeout in a worker process the test kills), no memory
blow-up (the worker's address space is capped). The long run is `python benchmarks/fuzz_checkpoints.py`."""

from __future__ import annotations

import pytest

from fuzz_support import KINDS, run_fuzz

pytestmark = pytest.mark.slow


def test_mutated_checkpoints_load_or_fail_cleanly(tmp_path):
    stats = run_fuzz(420, seed=20261207, work=tmp_path, timeout=10.0, mem_limit_mb=1024)
    assert stats.inputs == 420
    assert (stats.tracebacks, stats.hangs, stats.blowups) == (0, 0, 0), "\n".join(stats.failures)
    assert stats.ok + stats.clean == 420
    for kind in KINDS:  # every format was exercised, and most mutations were caught
        assert sum(stats.by_kind[kind].values()) == 70, stats.by_kind
    assert stats.clean > 270, stats.summary()
