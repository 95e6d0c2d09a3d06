"""docs/finetuning.md's KakaoTalk walkthrough, end to end, printing the numbers the page quotes.

    python benchmarks/persona_walkthrough.py --work /tmp/walk            # minutes on 2 idle CPU cores

1. writes an invented Korean KakaoTalk PC export (tests/kakao_persona_support.py: the persona 지우 ends sentences
   with 용/당/엉 and says "헐 대박"; BOM, CRLF, placeholders, a phone number);
2. `llamaworks data inspect` on it;
3. `llamaworks finetune lora` on the bundled SmolLM2-135M-Instruct with a held-out fifth of the conversations
   (validation loss before and after training);
4. `llamaworks eval persona` on the held-out prompts, base against fine-tuned: marker rates, distinct-1/2, copy
   rate, reply length; the table lands in the run folder (finetune.json "persona_eval", persona_eval.json).

Every step is the CLI a user types (run here with this interpreter's `-m llamaworks`), echoed before it runs.
The export's quality after `convert --quant` is measured by benchmarks/export_quality.py (docs/formats.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from llamaworks.hardware import cpu_description

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from kakao_persona_support import PERSONA, write_persona_export  # noqa: E402


def llamaworks(*args: str) -> float:
    cmd = [sys.executable, "-m", "llamaworks", *map(str, args)]
    print("$ llamaworks " + " ".join(map(str, args)), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")})
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the export and the run")
    ap.add_argument("--days", type=int, default=10, help="days of chat in the export (default 10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetune-args", default="--seq-len 256 --batch-size 1 --max-steps 16 --lr 2e-3 --log-every 2",
                    help="extra finetune flags (default: %(default)s)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    export = write_persona_export(a.work / "KakaoTalk_지우.txt", days=a.days)
    run = a.work / "me"
    t = {}
    t["inspect"] = llamaworks("data", "inspect", export, "--kakao-assistant", PERSONA, "--tokenizer", "default",
                              "--seq-len", "256", "--show", "1")
    t["finetune"] = llamaworks("--threads", a.threads, "finetune", "lora", "--data", export, "--kakao-assistant",
                               PERSONA, "--val-fraction", "0.2", *a.finetune_args.split(), "--out", run,
                               "--no-progress")
    t["eval persona"] = llamaworks("--threads", a.threads, "eval", "persona", "--model", run, "--data", export,
                                   "--no-progress")
    doc = json.loads((run / "finetune.json").read_text(encoding="utf-8"))
    print(f"\nCPU: {cpu_description()['model']}, {a.threads} threads; seconds: "
          + ", ".join(f"{k} {v:.0f}" for k, v in t.items()))
    print(f"validation loss: before {doc['val_loss_before']:.4f}, after {doc['val_loss']:.4f} "
          f"({doc['steps']} steps; schedule: {doc['schedule']})")
    print(doc["persona_eval"]["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
