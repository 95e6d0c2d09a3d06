"""Korean like LLaMA-2-Ko on SmolLM2-135M: extend the vocabulary, continue pretraining, measure what it gained.

    python benchmarks/korean_vocab.py --work /tmp/korean [--add 500] [--fit-output 400] [--stage2-steps 210]
                                      [--llama-server BIN] [--json out.json]
    python benchmarks/korean_vocab.py --write-llama-cpp-fixture --llama-server BIN

Every step is the `llamaworks` command a user would type (printed as it runs):
  1. `tokenizer extend` on the Korean training text (the konlpy wheel's corpus: kolaw + kobill 1809890-1809897),
  2. `tokenizer stats`: tokens per Hangul syllable on held-out Korean (kobill 1809898-1809899), English token
     counts (Debian's /usr/share/common-licenses texts) with and without the new tokens,
  3. `data prepare` of the Korean and English training text with the extended tokenizer,
  4. `pretrain --init EXT --train new-rows` (stage 1), then `pretrain --init STAGE1 --train all` (stage 2), both
     with English mixed in,
  5. `perplexity`: bits per byte on held-out Korean (kobill 1809898) and English (CC0-1.0, BSD) for the base model
     (dequantized, the float reference) and the trained model (`--evaluate` adds the extended model before
     training and stage 1),
  6. `chat` with the trained model (piped), `convert --to gguf`, and llama.cpp's llama-server loading that GGUF:
     /tokenize must give our ids and /completion must answer.
The second form writes tests/fixtures/tokenizer/smollm2_ko_extended_llama_cpp.json: llama-server's ids on a tiny
GGUF carrying the vocabulary tests/test_tokenizer_extend.py builds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
KO_HELD = ("1809898.txt", "1809899.txt")
EN_TRAIN = ("Apache-2.0", "GPL-3", "LGPL-2.1", "GFDL-1.3", "Artistic")
EN_HELD = ("MPL-2.0", "CC0-1.0", "BSD")
# Bits per byte are measured on part of the held-out text (the torch reference forward is slow on a busy CPU).
KO_EVAL = ("1809898.txt",)
EN_EVAL = ("CC0-1.0", "BSD")
LICENSES = Path("/usr/share/common-licenses")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, binary: str, model: Path, threads: int = 1) -> None:
        self.port = _free_port()
        env = dict(os.environ, LD_LIBRARY_PATH=str(Path(binary).parent))
        self.proc = subprocess.Popen([binary, "-m", str(model), "-t", str(threads), "-c", "512", "-np", "1",
                                      "--port", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=env)
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{binary} exited with {self.proc.returncode} on {model}") from None
                time.sleep(0.2)
        raise RuntimeError(f"{binary} did not start")

    def post(self, route: str, body: dict) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{route}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=300).read())

    def tokenize(self, text: str) -> list[int]:
        return self.post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def write_fixture(server_bin: str) -> None:
    """llama-server's ids for the test texts on tiny GGUFs with the tests' extended vocabularies (SmolLM2's
    byte-level BPE and LLaMA's SentencePiece)."""
    import tempfile

    import torch

    import test_tokenizer_extend as t
    from conftest import package_file
    from llamaworks.assets import default_model_path
    from llamaworks.checkpoints import save_gguf
    from llamaworks.config import get_preset
    from llamaworks.model import Transformer
    from llamaworks.tokenizer import load_tokenizer
    from llamaworks.tokenizer_extend import extend_tokenizer, learn_extension, read_corpus

    corpus = read_corpus([t.KOREAN / "constitution_head.txt"])
    spm = package_file("llama-cpp-python==0.3.16", "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf")
    cases = [("smollm2_ko_extended_llama_cpp.json", default_model_path(), t.ADD, t.ENGLISH + t.MIXED,
              "SmolLM2-135M-Instruct's vocabulary"),
             ("llama_spm_ko_extended_llama_cpp.json", spm, t.SPM_ADD, t.ENGLISH[:5] + t.MIXED,
              "llama.cpp's ggml-vocab-llama-spm.gguf (LLaMA's SentencePiece vocabulary)")]
    for name, vocab, add, texts, what in cases:
        base = load_tokenizer(vocab)
        ext = learn_extension(base, corpus, add)
        tok = extend_tokenizer(base, ext)
        config = get_preset("tiny-tied").replace(vocab_size=tok.vocab_size)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            path = save_gguf(Path(d) / "tiny.gguf", Transformer(config), config, tok, tensor_type="f32")
            server = LlamaServer(server_bin, path)
            try:
                vectors = [[text, server.tokenize(text)] for text in [*texts, t.held_out_korean()]]
            finally:
                server.close()
        fixture = {"source": f"llama.cpp llama-server ({server_bin}), POST /tokenize {{content, add_special: false, "
                             f"parse_special: true}} on a tiny GGUF carrying {what} extended by {add} tokens learned "
                             "from tests/fixtures/korean/constitution_head.txt (benchmarks/korean_vocab.py "
                             "--write-llama-cpp-fixture)",
                   "added": add, "new_tokens": ext.tokens, "vectors": vectors}
        out = ROOT / "tests" / "fixtures" / "tokenizer" / name
        out.write_text(json.dumps(fixture, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        agree = sum(tok.encode(text, add_bos=False) == ids for text, ids in vectors)
        print(f"wrote {out}: llama.cpp agrees with ours on {agree}/{len(vectors)} texts")


def llamaworks(*args: str, stdin: str | None = None, threads: int = 2) -> str:
    cmd = [sys.executable, "-m", "llamaworks", "--threads", str(threads), *args]
    print("$ llamaworks " + " ".join(args), flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"failed: llamaworks {' '.join(args)}")
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return done.stdout


def korean_corpus(work: Path) -> Path:
    """konlpy/data/corpus from the konlpy 0.6.0 wheel (PyPI), downloaded once into WORK/src."""
    corpus = work / "src" / "konlpy" / "data" / "corpus"
    if not corpus.is_dir():
        (work / "src").mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "konlpy==0.6.0", "-d",
                        str(work / "src")], check=True)
        wheel = next((work / "src").glob("konlpy-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(work / "src", [n for n in z.namelist() if n.startswith("konlpy/data/corpus/")])
    return corpus


def bits_per_byte(model: str, files: list[Path], work: Path, name: str, threads: int) -> float:
    """Bits per byte over all `files` together (total NLL / total bytes); windows of 1,024 tokens side by side
    (every token scored once: the cheapest fair comparison on a busy CPU)."""
    out = work / f"ppl-{name}.json"
    if name.startswith("base-") and out.is_file() and {Path(k).name for k in json.loads(out.read_text())[
            "perplexity"]} == {f.name for f in files}:
        print(f"reusing {out} (the base model and the files are the same as in the run that wrote it)")
    else:
        llamaworks("perplexity", *map(str, files), "--model", model, "--max-length", "1024", "--stride", "1024",
                   "--no-progress", "--out", str(out), threads=threads)
    results = json.loads(out.read_text())["perplexity"].values()
    return sum(r["bits_per_byte"] * r["bytes"] for r in results) / sum(r["bytes"] for r in results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("korean-work"))
    ap.add_argument("--add", type=int, default=500)
    ap.add_argument("--fit-output", type=int, default=400, metavar="STEPS",
                    help="`tokenizer extend --fit-output STEPS` (0: the plain mean initialisation)")
    ap.add_argument("--fit-english", action="store_true",
                    help="add the English training text to the fit (`tokenizer extend --fit-corpus EN-TRAIN`)")
    ap.add_argument("--stage1-steps", type=int, default=15)
    ap.add_argument("--stage2-steps", type=int, default=210)
    ap.add_argument("--stage1-lr", default="2e-3")
    ap.add_argument("--stage2-lr", default="5e-5")
    ap.add_argument("--seq-len", default="256")
    ap.add_argument("--batch-size", default="2")
    ap.add_argument("--mix-ratio", default="0.25")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--evaluate", default="base,stage2",
                    help="models whose bits per byte are measured: base,extended,stage1,stage2")
    ap.add_argument("--llama-server", default=None, metavar="BIN")
    ap.add_argument("--write-llama-cpp-fixture", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.write_llama_cpp_fixture:
        if not a.llama_server:
            ap.error("--write-llama-cpp-fixture needs --llama-server BIN")
        write_fixture(a.llama_server)
        return 0

    from llamaworks.hardware import cpu_description

    work = a.work.resolve()
    corpus = korean_corpus(work)
    ko_train, ko_held, en_train, en_held = (work / n for n in ("ko-train", "ko-held", "en-train", "en-held"))
    for folder, files in ((ko_train, [p for p in sorted((corpus / "kobill").glob("*.txt")) if p.name not in KO_HELD]
                           + [corpus / "kolaw" / "constitution.txt"]),
                          (ko_held, [corpus / "kobill" / n for n in KO_HELD]),
                          (en_train, [LICENSES / n for n in EN_TRAIN]), (en_held, [LICENSES / n for n in EN_HELD])):
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, folder / f.name)
    t = a.threads
    ext, s1, s2 = work / "ext", work / "stage1", work / "stage2"
    t_all = time.perf_counter()
    print(llamaworks("tokenizer", "extend", "--corpus", str(ko_train), "--add", str(a.add), "--out", str(ext),
                     "--gguf-type", "none", "--fit-output", str(a.fit_output), "--no-progress",
                     *(["--fit-corpus", str(en_train)] if a.fit_english else []), threads=t))
    extend_s = time.perf_counter() - t_all
    stats = {}
    for name, folder in (("korean", ko_held), ("english", en_held)):
        stats[name] = json.loads(llamaworks("tokenizer", "stats", "--json", "-m", "default", "-m", str(ext),
                                            str(folder), threads=t))
    from llamaworks.assets import default_model_path
    from llamaworks.tokenizer import load_tokenizer
    from llamaworks.tokenizer_extend import read_corpus

    base_tok, ext_tok = load_tokenizer(default_model_path()), load_tokenizer(ext)
    en_texts = read_corpus([en_held, en_train])
    english_same = all(base_tok.encode(x) == ext_tok.encode(x) for x in en_texts)

    bpb: dict[str, dict[str, float]] = {}

    def evaluate(label: str, model: str) -> None:
        if label in a.evaluate.split(","):
            bpb[label] = {lang: bits_per_byte(model, [folder / n for n in names], work, f"{label}-{lang}", t)
                          for lang, folder, names in (("korean", ko_held, KO_EVAL), ("english", en_held, EN_EVAL))}
            print(label, bpb[label], flush=True)

    evaluate("base", "default")
    evaluate("extended", str(ext))
    common = ["--seq-len", a.seq_len, "--batch-size", a.batch_size, "--eval-every", "0", "--save-every", "0",
              "--log-every", "5", "--no-progress", "--mix-ratio", a.mix_ratio]
    for folder, data in ((ko_train, work / "data-ko"), (en_train, work / "data-en")):
        llamaworks("data", "prepare", str(folder), "--tokenizer", str(ext), "--out", str(data), "--val-fraction", "0",
                   threads=t)
    t0 = time.perf_counter()
    llamaworks("pretrain", "--init", str(ext), "--train", "new-rows", "--data", str(work / "data-ko"), "--mix-data",
               str(work / "data-en"), "--out", str(s1), "--max-steps", str(a.stage1_steps), "--lr", a.stage1_lr,
               "--warmup-steps", "4", *common, threads=t)
    stage1_s = time.perf_counter() - t0
    evaluate("stage1", str(s1 / "final"))
    t0 = time.perf_counter()
    llamaworks("pretrain", "--init", str(s1 / "final"), "--train", "all", "--data", str(work / "data-ko"),
               "--mix-data", str(work / "data-en"), "--out", str(s2), "--max-steps", str(a.stage2_steps), "--lr",
               a.stage2_lr, "--warmup-steps", "4", "--weight-decay", "0", *common, threads=t)
    stage2_s = time.perf_counter() - t0
    evaluate("stage2", str(s2 / "final"))


    reply = llamaworks("chat", "--model", str(s2 / "final"), "--temperature", "0", "--max-tokens", "40",
                       stdin="대한민국의 수도는 어디인가요?\n", threads=t)
    gguf = work / "stage2.gguf"
    llamaworks("convert", str(s2 / "final"), str(gguf), "--to", "gguf", "--dtype", "f16", threads=t)
    llama_cpp: dict = {}
    if a.llama_server:
        server = LlamaServer(a.llama_server, gguf, threads=t)
        try:
            texts = read_corpus([ko_held]) + en_texts[:1]
            llama_cpp["tokenize_agrees"] = all(server.tokenize(x) == ext_tok.encode(x) for x in texts)
            llama_cpp["completion"] = server.post("/completion", {"prompt": "대한민국 헌법 제1조", "n_predict": 24,
                                                                  "temperature": 0})["content"]
        finally:
            server.close()

    kb, ke = stats["korean"]["default"]["hangul"], stats["korean"][str(ext)]["hangul"]
    eb, ee = stats["english"]["default"]["all"], stats["english"][str(ext)]["all"]
    result = {
        "cpu": cpu_description(), "add": a.add, "vocab": ext_tok.vocab_size,
        "hangul_tokens_per_syllable": [kb["tokens_per_char"], ke["tokens_per_char"]],
        "hangul_drop": 1 - ke["tokens_per_char"] / kb["tokens_per_char"],
        "english_tokens": [eb["tokens"], ee["tokens"]], "english_ids_identical": english_same,
        "bits_per_byte": bpb, "english_bpb_rise": bpb["stage2"]["english"] / bpb["base"]["english"] - 1,
        "stage_seconds": [stage1_s, stage2_s], "extend_seconds": extend_s,
        "total_seconds": time.perf_counter() - t_all, "chat_reply": reply.strip(), "llama_cpp": llama_cpp,
    }
    print(f"\nCPU: {result['cpu']}")
    print(f"| | SmolLM2-135M | + {a.add} Korean tokens |\n|---|---|---|")
    print(f"| Hangul tokens per syllable (held-out) | {kb['tokens_per_char']:.3f} | {ke['tokens_per_char']:.3f} "
          f"(-{100 * result['hangul_drop']:.1f}%) |")
    print(f"| English tokens (held-out) | {int(eb['tokens']):,} | {int(ee['tokens']):,} "
          f"(ids identical on held-out and training English: {english_same}) |")
    print("\n| bits per byte | Korean (held-out) | English (held-out) |\n|---|---|---|")
    for label, row in bpb.items():
        print(f"| {label} | {row['korean']:.4f} | {row['english']:.4f} |")
    print(f"\nEnglish bits/byte after stage 2: {100 * result['english_bpb_rise']:+.2f}% against the base; "
          f"extend {extend_s:.0f} s, stage 1 {stage1_s:.0f} s, stage 2 {stage2_s:.0f} s, whole run "
          f"{result['total_seconds']:.0f} s")
    print(f"chat: {result['chat_reply']!r}\nllama.cpp: {llama_cpp}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    ok = (result["hangul_drop"] >= 0.4 and english_same and bpb["stage2"]["korean"] < bpb["base"]["korean"]
          and result["english_bpb_rise"] < 0.05 and llama_cpp.get("tokenize_agrees", True))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
