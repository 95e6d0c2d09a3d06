"""Checkpoint fuzzing shared by tests/test_fuzz_checkpoints.py (bounded, in `make test`) and
benchmarks/fuzz_checkpoints.py (long runs).

Seeds are small valid checkpoints of every format (a GGUF with a byte-level vocabulary and Q8_0 + F32 tensors,
an HF folder with a tokenizer and chat template, a Meta folder). Each input is one seed with one mutation: bit
flips, truncation, huge counts and lengths written over header fields, type ids changed, safetensors header
edits (valid files with wrong shapes included), config.json/params.json/tokenizer file values replaced with
hostile ones (wrong types, 2^31, 0, deep nesting, NaN). Every input must load or raise `LlamaworksError` (one
line); anything else is a traceback.

Each input runs in a worker process (address space capped with RLIMIT_AS, recycled after a failure) that the
parent kills when it takes longer than the per-input timeout: a hang is counted, never waited out.
"""

from __future__ import annotations

import json
import os
import random
import resource
import select
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HUGE = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 0xFFFFFFFF00000000, 7]
JSON_HOSTILE: list[Any] = [2.0, "tiny", "llama3", 2**31, 2**63, -1, 0, None, True, [], {}, 1e308, float("nan"),
                           float("inf"), "x" * 1000, [[[[[]]]]], {"rope_type": "llama3"}, 1e-300, 3]
KINDS = ("gguf", "safetensors", "config", "tokenizer", "params", "pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


# -- seeds --------------------------------------------------------------------------------------------------
def make_seeds(directory: Path) -> dict[str, Path]:
    """Small valid checkpoints of every format, written by our writers."""
    import torch

    from llamaworks.checkpoints import save_gguf, save_hf, save_meta
    from llamaworks.config import get_preset
    from llamaworks.model import Transformer

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny-tied")).eval()
    model.reset_parameters(std=0.05)
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
             "tokenizer.ggml.tokens": [*chars[:254], "ab", "<|end|>"],
             "tokenizer.ggml.token_type": [1] * 255 + [3], "tokenizer.ggml.merges": ["a b"],
             "tokenizer.ggml.bos_token_id": 255, "tokenizer.ggml.eos_token_id": 255,
             "tokenizer.ggml.add_bos_token": False}
    gguf_path = save_gguf(directory / "seed.gguf", model, model.config, None, tensor_type="q8_0",
                          tokenizer_metadata=vocab)
    from llamaworks.tokenizer import Tokenizer

    hf = save_hf(directory / "hf", model, model.config, Tokenizer.from_gguf_metadata(vocab, "seed"),
                 chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    llama2 = Transformer(get_preset("tiny-llama2")).eval()
    llama2.reset_parameters(std=0.05)
    meta = save_meta(directory / "meta", llama2, llama2.config)
    return {"gguf": gguf_path, "hf": hf, "meta": meta}


# -- mutations ----------------------------------------------------------------------------------------------
def _gguf_header_end(data: bytes) -> int:
    """About where the seed's header ends (its vocabulary included): what the mutations should mostly hit."""
    return min(len(data), 8192)


def _overwrite(data: bytearray, rng: random.Random, end: int) -> None:
    width = rng.choice((4, 8))
    pos = rng.randrange(0, max(1, end - width))
    data[pos:pos + width] = (rng.choice(HUGE) % (1 << (8 * width))).to_bytes(width, "little")


def _key_value_offsets(data: bytes) -> list[tuple[str, int]]:
    """(key, offset of its u32 type id) for every metadata key, by a tolerant walk of a valid seed."""
    out = []
    pos = 24
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", data, pos)[0]
        key = data[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        out.append((key, pos))
        vtype = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if vtype in sizes:
            pos += sizes[vtype]
        elif vtype == 8:
            pos += 8 + struct.unpack_from("<Q", data, pos)[0]
        else:
            item, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if item in sizes:
                pos += sizes[item] * count
            else:
                for _ in range(count):
                    pos += 8 + struct.unpack_from("<Q", data, pos)[0]
    return out


def mutate_gguf(seed: bytes, rng: random.Random, kv_offsets: list[tuple[str, int]]) -> bytes:
    data = bytearray(seed)
    end = _gguf_header_end(seed)
    how = rng.randrange(7)
    if how == 0:  # bit flips, mostly in the header
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(end if rng.random() < 0.9 else len(data))
            data[pos] ^= 1 << rng.randrange(8)
    elif how == 1:  # truncation
        return bytes(data[:rng.randrange(len(data))])
    elif how == 2:  # a huge or boundary count/length/offset somewhere in the header
        for _ in range(rng.randint(1, 3)):
            _overwrite(data, rng, end)
    elif how == 3:  # a metadata value replaced by a huge one (block_count = 2^31 and friends)
        _key, off = rng.choice(kv_offsets)
        vtype = struct.unpack_from("<I", data, off)[0]
        width = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}.get(vtype, 8)
        if vtype == 9:
            width, off = 8, off + 4  # the array's element count
        value = rng.choice(HUGE) % (1 << (8 * width))
        data[off + 4:off + 4 + width] = value.to_bytes(width, "little")
    elif how == 4:  # a metadata type id changed (an int read as a float, a string as an array, ...)
        _key, off = rng.choice(kv_offsets)
        struct.pack_into("<I", data, off, rng.choice([0, 4, 5, 6, 7, 8, 9, 10, 12, 13, 2**31]))
    elif how == 5:  # header counts (tensors, keys)
        struct.pack_into("<Q", data, rng.choice((8, 16)), rng.choice(HUGE))
    else:  # bytes inserted or removed inside the header
        pos = rng.randrange(24, end)
        if rng.random() < 0.5:
            del data[pos:pos + rng.randint(1, 16)]
        else:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(data)


def mutate_safetensors(seed: bytes, rng: random.Random) -> bytes:
    n = struct.unpack_from("<Q", seed, 0)[0]
    header = json.loads(seed[8:8 + n])
    body = seed[8 + n:]
    how = rng.randrange(5)
    if how == 0:  # bit flips in the header bytes
        data = bytearray(seed)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(min(len(data), 8 + n))
            data[pos] ^= 1 << rng.randrange(8)
        return bytes(data)
    if how == 1:  # truncation
        return seed[:rng.randrange(len(seed))]
    if how == 2:  # header length huge or off by some
        return struct.pack("<Q", rng.choice([*HUGE, n + 1, n - 1, len(seed)])) + seed[8:]
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    what = rng.choice(("dtype", "shape", "data_offsets", "drop", "reshape", "rename", "reshape"))
    if what == "reshape":  # still a valid safetensors file: same bytes, another shape (reaches our checks)
        numel = 1
        for d in entry["shape"]:
            numel *= d
        divisors = [d for d in range(1, numel + 1) if numel % d == 0]
        rows = rng.choice(divisors)
        entry["shape"] = rng.choice([[rows, numel // rows], [numel], [1, 1, numel]])
    elif what == "rename":  # two tensors swap names (shapes then disagree with what the names promise)
        other = rng.choice(names)
        header[name], header[other] = header[other], header[name]
    elif what == "dtype":
        entry["dtype"] = rng.choice(["F64", "I8", "BOOL", "U8", "F8_E4M3", "XX", 3, "BF16", "F16"])
    elif what == "shape":
        entry["shape"] = rng.choice([[2**31, 2**31], [-1, 64], [], [0], [64, 64, 64, 64, 64], "x", [2**63]])
    elif what == "data_offsets":
        entry["data_offsets"] = rng.choice([[0, 2**63], [5, 3], [0, len(body) + 1], [-1, 4], [0], "x"])
    else:
        del header[name]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_json(seed: dict, rng: random.Random) -> str:
    how = rng.randrange(4)
    d = json.loads(json.dumps(seed))
    if how == 0:  # one field replaced by a hostile value
        d[rng.choice(list(d))] = rng.choice(JSON_HOSTILE)
    elif how == 1:  # several fields, some removed
        for _ in range(rng.randint(2, 5)):
            k = rng.choice(list(d))
            if rng.random() < 0.3:
                d.pop(k, None)
            else:
                d[k] = rng.choice(JSON_HOSTILE)
            if not d:
                break
    elif how == 2:  # deep nesting somewhere
        depth = rng.choice((50, 1000, 100_000))
        return json.dumps(d)[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    else:  # text-level damage
        text = bytearray(json.dumps(d).encode())
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(text))
            text[pos] = rng.randrange(256)
        return text.decode("utf-8", errors="surrogateescape")
    return json.dumps(d, allow_nan=True)


def make_input(kind: str, rng: random.Random, seeds: dict[str, Path], cache: dict[str, Any], target: Path) -> Path:
    """Write one mutated checkpoint under `target` (a fresh folder); returns the path to load."""
    if target.exists():
        shutil.rmtree(target)
    if kind == "gguf":
        if "gguf" not in cache:
            data = seeds["gguf"].read_bytes()
            cache["gguf"] = (data, _key_value_offsets(data))
        data, offsets = cache["gguf"]
        target.mkdir(parents=True)
        path = target / "m.gguf"
        path.write_bytes(mutate_gguf(data, rng, offsets))
        return path
    if kind in ("safetensors", "config", "tokenizer"):
        shutil.copytree(seeds["hf"], target)
        if kind == "tokenizer":
            f = target / rng.choice(TOKENIZER_FILES)
            f.write_bytes(mutate_json(json.loads(f.read_text()), rng).encode("utf-8", errors="surrogateescape"))
        elif kind == "safetensors":
            st = target / "model.safetensors"
            st.write_bytes(mutate_safetensors(st.read_bytes(), rng))
        else:
            cfg = target / "config.json"
            text = mutate_json(json.loads(cfg.read_text()), rng)
            cfg.write_bytes(text.encode("utf-8", errors="surrogateescape"))
        return target
    shutil.copytree(seeds["meta"], target)
    if kind == "params":
        p = target / "params.json"
        p.write_bytes(mutate_json(json.loads(p.read_text()), rng).encode("utf-8", errors="surrogateescape"))
    else:  # the .pth (a zip of pickles), damaged
        p = target / "consolidated.00.pth"
        data = bytearray(p.read_bytes())
        if rng.random() < 0.5:
            data = data[:rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(len(data))
                data[pos] ^= 1 << rng.randrange(8)
        p.write_bytes(bytes(data))
    return target


# -- the worker: loads inputs, reports one result line per input --------------------------------------------
def worker_main(mem_limit_mb: int) -> None:
    """Read paths on stdin; for each print `ok`, `clean`, `traceback <one line>` or `blowup <one line>`."""
    import torch

    from llamaworks.checkpoints import load_model
    from llamaworks.errors import LlamaworksError

    torch.set_num_threads(1)
    try:
        from llamaworks import lean

        if not lean.available():
            lean = None
    except ImportError:
        lean = None
    soft = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    vm = _vm_size()
    limit = vm + mem_limit_mb * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    budget_kb = soft + mem_limit_mb * 1024
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        path = line.rstrip("\n")
        try:
            load_model(path)
            if path.endswith(".gguf") and lean is not None:
                lean.NativeBackend.load(path, lean.EngineOptions(max_context=64, threads=1))  # the CLI's torch-free one
            result = "ok"
        except LlamaworksError as e:
            text = str(e).strip()
            if "\n" in text:
                result = "traceback multi-line message: " + text[:200].replace("\n", "|")
            elif "MemoryError" in text:
                result = "blowup " + text[:300]
            else:
                result = "clean " + text[:300]
        except MemoryError as e:
            result = f"blowup MemoryError {str(e)[:200]}"
        except BaseException as e:
            result = f"traceback {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if peak > budget_kb and not result.startswith("blowup"):
            result = f"blowup peak RSS {peak // 1024} MiB ({result})"
        out.write(result.replace("\n", " ") + "\n")
        out.flush()
        if result.startswith(("blowup", "traceback")):
            return  # a fresh worker for the next input


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Stats:
    inputs: int = 0
    ok: int = 0
    clean: int = 0
    tracebacks: int = 0
    hangs: int = 0
    blowups: int = 0
    seconds: float = 0.0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    messages: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, outcome: str, detail: str) -> None:
        self.inputs += 1
        setattr(self, outcome, getattr(self, outcome) + 1)
        k = self.by_kind.setdefault(kind, {})
        k[outcome] = k.get(outcome, 0) + 1
        if outcome == "clean":
            first = detail.split(": ", 1)[-1][:60]
            self.messages[first] = self.messages.get(first, 0) + 1

    def summary(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "loaded": self.ok, "clean_errors": self.clean, "tracebacks": self.tracebacks,
                "hangs": self.hangs, "memory_blowups": self.blowups, "seconds": round(self.seconds, 1),
                "by_kind": self.by_kind}


class Worker:
    def __init__(self, src: Path, mem_limit_mb: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", LLAMAWORKS_DEBUG="")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
             f"import fuzz_support; fuzz_support.worker_main({mem_limit_mb})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, bufsize=1)
        if self._read(120) != "ready":
            raise RuntimeError("fuzz worker did not start")

    def _read(self, timeout: float) -> str | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line.rstrip("\n") if line else ""

    def run(self, path: Path, timeout: float) -> tuple[str, str]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{path}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return "traceback", "worker died"
        line = self._read(timeout)
        if line is None:
            return "hangs", f"no answer within {timeout} s"
        if line == "":  # the worker died (killed by the kernel: a memory blow-up past the cap)
            code = self.proc.wait()
            return "blowups", f"worker exited with {code}"
        outcome, _, detail = line.partition(" ")
        return {"ok": "ok", "clean": "clean", "traceback": "tracebacks", "blowup": "blowups"}[outcome], detail

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_fuzz(n_inputs: int | None, seed: int, work: Path, *, seconds: float | None = None, timeout: float = 10.0,
             mem_limit_mb: int = 1024, kinds: tuple[str, ...] = KINDS, progress_every: int = 0,
             log: Any = None) -> Stats:
    """Generate and run inputs until `n_inputs` or `seconds` is reached (whichever comes first)."""
    src = ROOT / "src"
    seeds = make_seeds(work / "seeds")
    rng = random.Random(seed)
    cache: dict[str, Any] = {}
    stats = Stats()
    worker = Worker(src, mem_limit_mb)
    t0 = time.perf_counter()
    try:
        while (n_inputs is None or stats.inputs < n_inputs) and (seconds is None or time.perf_counter() - t0 < seconds):
            kind = kinds[stats.inputs % len(kinds)]
            path = make_input(kind, rng, seeds, cache, work / "input")
            outcome, detail = worker.run(path, timeout)
            stats.add(kind, outcome, detail)
            if outcome not in ("ok", "clean"):
                keep = work / f"failure-{stats.inputs:07d}-{kind}"
                shutil.copytree(path.parent if path.is_file() else path, keep, dirs_exist_ok=True)
                stats.failures.append(f"{kind} #{stats.inputs} {outcome}: {detail} (kept in {keep})")
            if not worker.alive() or outcome in ("hangs", "blowups", "tracebacks"):
                worker.close()
                worker = Worker(src, mem_limit_mb)
            if progress_every and stats.inputs % progress_every == 0 and log is not None:
                stats.seconds = time.perf_counter() - t0
                print(json.dumps(stats.summary()), file=log, flush=True)
    finally:
        worker.close()
        stats.seconds = time.perf_counter() - t0
    return stats
