"""What each GGUF export costs in quality: ours against llama.cpp's `llama-quantize`, from the same float GGUF, each
measured against the float model on held-out text.

    python benchmarks/export_quality.py --llama-quantize BUILD/bin/llama-quantize [--model PATH] [--text FILE]
        [--tokens 4096] [--ctx 512] [--types F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0] [--json out.json] [--keep DIR]

1. The model (default: the embedded SmolLM2-135M-Instruct; any checkpoint, e.g. a fine-tuned HF folder) is
   written as an F32 GGUF: the float model, and the one input of both quantizers.
2. Each type is written twice: by `llamaworks` (save_gguf, as `convert --quant` / `quantize --to` do) and by
   `llama-quantize FLOAT.gguf OUT.gguf TYPE`.
3. Every file is read back through gguf-py's dequantizers into model.py in float32 (the float reference path:
   the measure is of the file's weights, not of a runtime's arithmetic) and run over the text in windows of
   --ctx tokens; the second half of each window is scored (every scored token has at least ctx/2 of context),
   as llama.cpp's `llama-perplexity --kl-divergence` does.
   Printed per file: size, perplexity, mean and 99th-percentile per-token KL divergence KL(float || file) in
   nats, and how often the file's most likely next token is the float model's.
The text (default: the Python reference manual's prose, `pydoc_data.topics`, shipped with CPython) is
tokenized once; the first --tokens tokens are used.

Exit code 1 if our Q4_K_M's mean KL divergence is above llama-quantize's Q4_K_M of the same model (the target of
issue #17), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llamaworks.checkpoints import load_checkpoint, load_model, save_gguf
from llamaworks.hardware import cpu_description

TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")


def default_text() -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def write_ours(ckpt, out: Path, qtype: str) -> None:
    tok_meta = {k: v for k, v in ckpt.metadata.items() if k.startswith("tokenizer.")} if ckpt.format == "gguf" else None
    save_gguf(out, ckpt.state_dict, ckpt.config, ckpt.tokenizer, ckpt.chat_template, tensor_type=qtype.lower(),
              tokenizer_metadata=tok_meta)


def write_theirs(binary: str, src: Path, out: Path, qtype: str, threads: int) -> None:
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(binary).resolve().parent)}
    result = subprocess.run([binary, str(src), str(out), qtype, str(threads)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{binary} failed on {qtype}:\n{result.stderr[-2000:]}")


def windows(ids: list[int], ctx: int) -> list[list[int]]:
    return [ids[i:i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]


def log_probs(path: Path, chunks: list[list[int]], ctx: int):
    """Yields, per window, float64 log-softmax (ctx/2 - 1 rows) of the positions predicting the scored tokens."""
    model = load_model(path)[0]
    first = ctx // 2
    with torch.inference_mode():
        for chunk in chunks:
            hidden = model(torch.tensor([chunk]), return_hidden=True)[:, first - 1:ctx - 1]
            logits = model.lm_head(hidden)[0].double()  # only the scored positions reach the vocabulary
            yield torch.log_softmax(logits, -1)
    del model


def measure(path: Path, chunks: list[list[int]], ctx: int, reference: np.ndarray, is_reference: bool) -> dict:
    """Perplexity of the file's model; is_reference: store its log-probs of the scored positions in `reference`,
    else compare with them (per-token KL divergence, top-1 agreement)."""
    first = ctx // 2
    nll, kls, same, row = 0.0, [], 0, 0
    for chunk, lq in zip(chunks, log_probs(path, chunks, ctx)):
        targets = torch.tensor(chunk[first:ctx])
        nll -= float(lq.gather(1, targets[:, None]).sum())
        n = lq.shape[0]
        if is_reference:
            reference[row:row + n] = lq.float().numpy()
        else:
            lp = torch.from_numpy(np.asarray(reference[row:row + n])).double()
            kls.append((lp.exp() * (lp - lq)).sum(-1).numpy())
            same += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        row += n
    out = {"file": str(path), "mib": path.stat().st_size / 2**20, "perplexity": float(np.exp(nll / row))}
    if not is_reference:
        kl = np.concatenate(kls)
        out.update(kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)), same_top1=same / row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-quantize", required=True, help="llama.cpp's llama-quantize binary")
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--text", default=None, help="held-out UTF-8 text (default: CPython's pydoc_data.topics)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the figures here too")
    ap.add_argument("--keep", default=None, help="keep the GGUF files in this folder (default: a temp folder)")
    ap.add_argument("--reuse", action="store_true", help="with --keep: measure files already there, not rewrite")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="export_quality."))
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(args.model, dequantize=True, dtype=torch.float32) if args.model else None
    if ckpt is None:
        from llamaworks.assets import default_model_path

        ckpt = load_checkpoint(default_model_path(), dequantize=True, dtype=torch.float32)
    float_path = folder / "float-F32.gguf"
    reuse = args.reuse and args.keep
    if not (reuse and float_path.exists()):
        write_ours(ckpt, float_path, "F32")
    files: list[tuple[str, str, Path, float]] = []
    for qtype in types:
        ours, theirs = folder / f"llamaworks-{qtype}.gguf", folder / f"llama-quantize-{qtype}.gguf"
        if reuse and ours.exists() and theirs.exists():
            files += [(qtype, "llamaworks", ours, float("nan")), (qtype, "llama-quantize", theirs, float("nan"))]
            continue
        t0 = time.perf_counter()
        write_ours(ckpt, ours, qtype)
        t1 = time.perf_counter()
        write_theirs(args.llama_quantize, float_path, theirs, qtype, args.threads)
        t2 = time.perf_counter()
        files += [(qtype, "llamaworks", ours, t1 - t0), (qtype, "llama-quantize", theirs, t2 - t1)]
        print(f"wrote {qtype}: ours {t1 - t0:.1f} s, llama-quantize {t2 - t1:.1f} s", file=sys.stderr)

    text = Path(args.text).read_text(encoding="utf-8") if args.text else default_text()
    tokenizer = load_model(float_path)[1]
    ids = tokenizer.encode(text)[:args.tokens]
    chunks = windows(ids, args.ctx)
    if not chunks:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than one window of --ctx {args.ctx}")
    scored = len(chunks) * (args.ctx - args.ctx // 2)

    # The float model's log-probs of every scored position, on disk (tokens x vocab float32), read back per window.
    ref_path = folder / "float-logprobs.f32"
    reference = np.lib.format.open_memmap(ref_path, mode="w+", dtype=np.float32,
                                          shape=(scored, ckpt.config.vocab_size))
    float_row = measure(float_path, chunks, args.ctx, reference, is_reference=True)

    rows = [{"type": "F32 (float model)", "by": "", **float_row}]
    for qtype, by, path, seconds in files:
        rows.append({"type": qtype, "by": by, "seconds": seconds,
                     **measure(path, chunks, args.ctx, reference, is_reference=False)})
        r = rows[-1]
        print(f"{qtype:7} {by:15} ppl {r['perplexity']:.4f}  KL {r['kl_mean']:.5f} (p99 {r['kl_p99']:.4f})",
              file=sys.stderr)
    ref_path.unlink()

    cpu = cpu_description()
    name = args.model or "SmolLM2-135M-Instruct (default model)"
    print(f"\n{name}: {len(ids)} tokens, {len(chunks)} windows of {args.ctx}, {scored} scored; CPU {cpu['model']}")
    print("| type | written by | MiB | perplexity | mean KL (nats) | p99 KL | same top-1 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        kl = f"{r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {100 * r['same_top1']:.1f}%" if "kl_mean" in r else "— | — | —"
        print(f"| {r['type']} | {r['by'] or '—'} | {r['mib']:.1f} | {r['perplexity']:.4f} | {kl} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": name, "cpu": cpu, "tokens": len(ids), "ctx": args.ctx,
                                               "scored": scored, "rows": rows}, indent=1))
    by_key = {(r["type"], r["by"]): r for r in rows}
    ours, theirs = by_key.get(("Q4_K_M", "llamaworks")), by_key.get(("Q4_K_M", "llama-quantize"))
    if ours and theirs:
        ok = ours["kl_mean"] <= theirs["kl_mean"]
        print(f"\nQ4_K_M mean KL: ours {ours['kl_mean']:.5f}, llama-quantize {theirs['kl_mean']:.5f} -> "
              f"{'ok' if ok else 'WORSE'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
