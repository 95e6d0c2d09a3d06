"""`llamaworks bench`: figures, the kernel/memory settings it ran with, and its JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import pytest

from llamaworks import bench
from llamaworks.memory_stats import current_rss_bytes
from llamaworks.quant import kernels
from llamaworks.quant.memory import huge_pages_available


class TimedBackend:
    """The real backend with a clock and a token count of its own around every forward call: an outside measure
    of the work the bench reports (its figures come from its own timers around the same calls)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[int, float]] = []  # (tokens, seconds) per forward call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def forward(self, rows, tokens, positions, logits_for=None):
        start = time.perf_counter()
        out = self.inner.forward(rows, tokens, positions, logits_for)
        self.calls.append((len(tokens), time.perf_counter() - start))
        return out


@pytest.fixture
def measured(monkeypatch) -> dict[str, Any]:
    """Wraps api.load_backend (which run_bench calls): the load time, the RSS right after loading, and the backend
    wrapped in TimedBackend."""
    from llamaworks import api

    real = api.load_backend
    record: dict[str, Any] = {}

    def load(*args, **kwargs):
        start = time.perf_counter()
        backend = real(*args, **kwargs)
        record["load_s"] = time.perf_counter() - start
        record["rss_after_load_mib"] = current_rss_bytes() / 2**20
        record["backend"] = TimedBackend(backend)
        return record["backend"]

    monkeypatch.setattr(api, "load_backend", load)
    record["rss_before_mib"] = current_rss_bytes() / 2**20
    return record


def check_figures_against_the_work_done(r: dict[str, Any], measured: dict[str, Any]) -> None:
    """The bench's figures against what the backend was really asked to do and how long that took.

    Each bench timer encloses the measured forward calls (plus an argmax), so a figure may be slower than the
    measured calls imply, never faster; the slack is the rounding of the reported figure.
    """
    prompt, gen, runs = r["prompt_tokens"], r["gen_tokens"], r["runs"]
    calls = measured["backend"].calls
    # the first token of the short prompt and one decode step, then per run: the prompt, gen - 1 decode steps
    assert [n for n, _ in calls[1:]] == [1] + ([prompt] + [1] * (gen - 1)) * runs
    assert r["ttft_s"] >= calls[0][1] + calls[1][1] - 5e-4
    for i in range(runs):
        run = calls[2 + i * gen: 2 + (i + 1) * gen]
        assert r["prefill_tok_s_all"][i] <= prompt / run[0][1] + 0.05, i
        assert r["decode_tok_s_all"][i] <= (gen - 1) / sum(s for _, s in run[1:]) + 0.05, i
    assert r["load_s"] >= measured["load_s"] - 5e-4
    # RSS: read just before run_bench (a few allocations apart), and a peak no lower than the RSS once loaded.
    assert abs(r["rss_before_load_mib"] - measured["rss_before_mib"]) < 16
    assert r["peak_rss_mib"] >= measured["rss_after_load_mib"] - 0.1


@pytest.mark.parametrize("mmap", [None, True])
def test_bench_of_the_torch_backend(mmap: bool | None, measured: dict[str, Any]) -> None:
    import torch

    r = bench.run_bench(None, prompt_tokens=24, gen_tokens=4, ctx=64, runs=2, mmap=mmap, backend="torch")
    assert r["backend"] == "torch" and r["threads"] == torch.get_num_threads()
    # The reported figure is the median of the runs, each the token count over its time (3 decode steps).
    assert len(r["decode_tok_s_all"]) == 2
    assert r["decode_tok_s"] == pytest.approx(sum(r["decode_tok_s_all"]) / 2, abs=0.1)
    check_figures_against_the_work_done(r, measured)
    assert r["int8_activations"] and r["bf16_prefill"] == kernels.bf16_native()  # the EngineOptions defaults
    assert r["kv_dtype"] == "float32" and r["kernel_isa"] == kernels.isa()  # the model's activation dtype
    assert r["weights_in"] == ("mmap" if mmap or not huge_pages_available() else "memory")
    # SmolLM2's 210 Q4_1 layer linears are regrouped when the weights are in owned memory; the tied output is not.
    owned = r["weights_in"] == "memory" and kernels.can_interleave()
    assert r["interleaved_linears"] == (pytest.approx(210 / 211, abs=1e-3) if owned else 0.0)


@pytest.mark.parametrize("mmap", [None, True])
def test_bench_of_the_native_backend(mmap: bool | None, measured: dict[str, Any]) -> None:
    from llamaworks.quant import lean_kernels

    r = bench.run_bench(None, prompt_tokens=40, gen_tokens=4, ctx=64, runs=2, mmap=mmap, threads=1)  # auto: native
    assert r["backend"] == "native" and r["kv_dtype"] == "float16" and not r["bf16_prefill"]
    assert r["threads"] == measured["backend"].inner.threads == 1  # the threads it ran with, as asked
    assert len(r["prefill_tok_s_all"]) == 2
    assert r["prefill_tok_s"] == pytest.approx(sum(r["prefill_tok_s_all"]) / 2, abs=0.1)
    check_figures_against_the_work_done(r, measured)
    assert r["int8_activations"]  # the default numerics (EngineOptions.int8_activations)
    assert r["weights_in"] == ("mmap" if mmap else "memory")
    owned = not mmap
    assert r["interleaved_linears"] == (1.0 if owned else 0.0)  # every layer matrix; the tied output stays plain
    # Every figure names the machine: the CPU as /proc/cpuinfo has it and the kernel paths in use.
    cpuinfo = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    assert name in r["cpu"] and r["cpu_target"] == "native" and r["kernel_isa"] == lean_kernels.isa()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64-v3 is an x86 target (aarch64: test_kernel_matrix)")
def test_bench_builds_the_kernels_for_another_cpu_class() -> None:
    r = bench.run_bench(None, prompt_tokens=8, gen_tokens=2, ctx=64, runs=1, cpu_target="x86-64-v3")
    assert r["backend"] == "native" and r["cpu_target"] == "x86-64-v3"
    assert r["kernel_isa"].startswith("avx2 (int8 dot: maddubs)") and "avx512" not in r["kernel_isa"]
    with pytest.raises(ValueError, match="CPU target"):
        bench.run_bench(None, prompt_tokens=8, gen_tokens=2, ctx=16, runs=1, cpu_target="native; rm -rf /")


def test_bench_json_output_and_bad_sizes(capsys) -> None:
    assert bench.main(None, prompt_tokens=16, gen_tokens=2, ctx=32, runs=1, as_json=True) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["engine"] == "llamaworks" and result["prompt_tokens"] == 16
    with pytest.raises(ValueError, match="exceed --ctx"):
        bench.run_bench(None, prompt_tokens=30, gen_tokens=8, ctx=32)


def test_peak_rss_is_this_process_own() -> None:
    """A child spawned by a big parent reports its own peak, not the parent's (ru_maxrss would: it survives
    exec, which made every vs_peers worker report at least the driver's size)."""
    import subprocess
    import sys

    import numpy as np

    from llamaworks.memory_stats import current_rss_bytes, peak_rss_bytes

    ballast = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MiB, touched
    assert peak_rss_bytes() >= current_rss_bytes() >= ballast.nbytes
    code = "from llamaworks.memory_stats import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 150 * 2**20 < ballast.nbytes


@pytest.mark.slow
def test_vs_peers_runs_a_git_revision_beside_this_tree(tmp_path) -> None:
    """`vs_peers.py --baseline REV` measures REV's own worker from a temporary worktree, alternating with this tree,
    prints the ratio between them, and removes the worktree afterwards."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        pytest.fail("vs_peers --baseline needs a git checkout; this test runs in one (make test, .ci/run)")

    def worktrees() -> list[str]:
        return subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True, text=True,
                              check=True).stdout.splitlines()

    before = worktrees()
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "vs_peers.py"), "--engines", "llamaworks",
                          "--baseline", "HEAD", "--runs", "1", "--warmup", "0", "--prompt-tokens", "16",
                          "--gen-tokens", "4", "--ctx", "64", "--json", str(tmp_path / "out.json")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert f"llamaworks / llamaworks@{head}" in run.stdout
    summary = json.loads((tmp_path / "out.json").read_text())["summary"]
    assert summary[f"llamaworks@{head}"]["decode_tok_s"]["median"] > 0
    assert worktrees() == before
    for revs in (["no-such-revision"], ["HEAD", "--output=x"]):  # refused before any worktree is made
        bad = subprocess.run([sys.executable, str(root / "benchmarks" / "vs_peers.py"), "--engines", "llamaworks",
                              *[f"--baseline={rev}" for rev in revs], "--runs", "1"], capture_output=True, text=True)
        assert bad.returncode != 0 and f"--baseline {revs[-1]}: not a commit" in bad.stderr, bad.stderr
        assert worktrees() == before
