"""Memory and speed of full fine-tuning vs LoRA vs QLoRA on one model (default: the bundled SmolLM2-135M).

    python benchmarks/finetune_memory.py [--model PATH] [--steps 3] [--tokens 128] [--methods full,lora,qlora]

For each recipe, in a fresh subprocess: load the model, make it trainable as `llamaworks finetune` does, run
optimizer steps on random tokens and print, in MiB (2**20 bytes):
  weights   bytes of every parameter and buffer (NF4 blocks for QLoRA's base)
  grads     bytes of the gradients (trainable parameters only)
  optim     bytes of AdamW's state (two fp32 moments per trainable parameter)
  peak_rss  the process's peak resident memory (includes loading the float checkpoint first)
  steps/s   optimizer steps per second after one warm-up step
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(method: str, model_path: str | None, steps: int, tokens: int, rank: int) -> dict:
    import torch

    from llamaworks.checkpoints import load_model
    from llamaworks.memory_stats import peak_rss_bytes
    from llamaworks.train.finetune import FinetuneConfig, prepare_model
    from llamaworks.train.loop import TrainConfig, build_optimizer

    model, _, _ = load_model(model_path)
    cfg = FinetuneConfig(method=method, data=["-"], lora_rank=rank)
    prepare_model(model, cfg)
    model.train()
    opt = build_optimizer(model, TrainConfig(lr=1e-4))
    x = torch.randint(0, model.config.vocab_size, (1, tokens + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers so they can be counted

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    optim = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    return {
        "method": method,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "weights_mib": (nbytes(model.parameters()) + nbytes(model.buffers())) / 2**20,
        "grads_mib": nbytes(grads) / 2**20,
        "optim_mib": nbytes(optim) / 2**20,
        "peak_rss_mib": (peak_rss_bytes() or 0) / 2**20,
        "steps_per_s": steps / seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one method, print JSON
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.model, a.steps, a.tokens, a.rank)))
        return
    rows = []
    for method in a.methods.split(","):
        cmd = [sys.executable, __file__, "--one", method, "--steps", str(a.steps), "--tokens", str(a.tokens),
               "--rank", str(a.rank)] + (["--model", a.model] if a.model else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        r = rows[-1]
        print(f"{r['method']:6s} trainable {r['trainable']:>12,}  weights {r['weights_mib']:7.1f} MiB  "
              f"grads {r['grads_mib']:7.1f} MiB  optim {r['optim_mib']:7.1f} MiB  "
              f"total {r['weights_mib'] + r['grads_mib'] + r['optim_mib']:7.1f} MiB  "
              f"peak RSS {r['peak_rss_mib']:7.0f} MiB  "
              f"{r['steps_per_s']:.3f} steps/s ({a.tokens} tokens/step)", flush=True)


if __name__ == "__main__":
    main()
