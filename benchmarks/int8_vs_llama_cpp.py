"""How far int8 activations move the default model's next-token log-probabilities from the float reference: ours
against llama.cpp's own CPU paths, same GGUF, same prompts, teacher-forced along the reference's greedy path.

    python benchmarks/int8_vs_llama_cpp.py --llama-server BIN [--llama-server BIN2 ...] [--cpu-target x86-64-v3]

For each prompt of tests/inference_bounds.PROMPTS and each of 17 positions, the float reference (model.py on the
dequantized GGUF, float64 log-softmax) gives log p for every token; llama.cpp's `llama-server` (its /completion
route, n_probs 100: log-probabilities of its top 100 before sampling) and our native backend (int8 activations, the
default) give theirs. Printed: the largest |log p - log p_reference| over the reference's 20 likeliest tokens (the
set tests/inference_bounds.logprob_drift uses), for each llama.cpp build and for ours, with the CPU.
tests/inference_bounds.LOW_PRECISION_LOGPROB_ATOL is set from llama.cpp's figures: our int8 path may drift as far
as llama.cpp's own CPU paths do, not further.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, binary: str, model: str, threads: int) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen([binary, "-m", model, "-t", str(threads), "-c", "512", "-np", "1",
                                      "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{binary} did not start")

    def top_logprobs(self, ids: list[int], k: int = 100) -> dict[int, float]:
        body = json.dumps({"prompt": ids, "n_predict": 1, "n_probs": k, "temperature": 0, "cache_prompt": True,
                           "post_sampling_probs": False}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", body,
                                         {"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
        return {p["id"]: p["logprob"] for p in reply["completion_probabilities"][0]["top_logprobs"]}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def main() -> int:
    import torch

    from inference_bounds import PROMPTS
    from llamaworks.assets import default_model_path
    from llamaworks.checkpoints import load_model
    from llamaworks.engine.backend import EngineOptions
    from llamaworks.engine.native import NativeBackend
    from llamaworks.hardware import cpu_description

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", action="append", required=True, metavar="BIN", help="llama.cpp's llama-server")
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-target", default="native", help="our kernels' build target (x86-64-v3: AVX2)")
    a = ap.parse_args()

    reference, tokenizer, _ = load_model(a.model)
    reference.eval()
    ours = NativeBackend.load(a.model, EngineOptions(max_context=256, threads=a.threads, cpu_target=a.cpu_target))
    servers = [LlamaServer(b, a.model, a.threads) for b in a.llama_server]
    worst = {b: 0.0 for b in a.llama_server} | {"llamaworks": 0.0}
    try:
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            seq, want = list(ids), []
            with torch.no_grad():
                for _ in range(17):
                    logits = reference(torch.tensor([seq]))[0, -1].double()
                    want.append(torch.log_softmax(logits, -1).numpy())
                    seq.append(int(logits.argmax()))
            forced = seq[len(ids):-1]
            mine = [ours.forward([0] * len(ids), ids, range(len(ids)), [len(ids) - 1])[0]]
            mine += [ours.forward([0], [t], [len(ids) + i], [0])[0] for i, t in enumerate(forced)]
            for i in range(17):
                mine_lp = torch.log_softmax(torch.tensor(mine[i], dtype=torch.float64), -1).numpy()
                tokens = np.argsort(-want[i])[:20]
                worst["llamaworks"] = max(worst["llamaworks"], float(np.abs(mine_lp[tokens] - want[i][tokens]).max()))
                for binary, server in zip(a.llama_server, servers):
                    theirs = server.top_logprobs(ids + forced[:i])
                    missing = [int(t) for t in tokens if int(t) not in theirs]
                    if missing:
                        raise RuntimeError(f"{binary}: reference tokens {missing} are not in its top 100")
                    worst[binary] = max(worst[binary], max(abs(theirs[int(t)] - want[i][t]) for t in tokens))
    finally:
        for server in servers:
            server.close()
    cpu = cpu_description()
    print(f"CPU: {cpu['model']}; SIMD: {cpu['simd']}; threads {a.threads}; ours built for {a.cpu_target}")
    print(f"model: {a.model}; {len(PROMPTS)} prompts x 17 teacher-forced positions; tokens: the reference's top 20")
    print("| engine | max abs(log p - log p_float reference) |\n|---|---|")
    for name, value in worst.items():
        print(f"| {name} | {value:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
