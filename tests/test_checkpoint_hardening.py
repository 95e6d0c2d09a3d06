"""Issue 13 items 1, 2, 5 and 8: no code from training state, no path outside a checkpoint's folder, configs
checked against the tensors before anything is sized, and writes that a kill cannot leave half done.

Each test builds the hostile or interrupted input of the issue and checks what the user sees (one line naming
the file and field) and what is left on disk. Hostile GGUF files are written with gguf.GGUFWriter (llama.cpp's
own writer), not with our code.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llamaworks import cli
from llamaworks.checkpoints import load_checkpoint, save_gguf, save_hf, save_meta
from llamaworks.checkpoints.gguf import MAX_TOKENIZER_ARRAY, ours_to_gguf_name, parse_gguf
from llamaworks.config import ModelConfig, get_preset
from llamaworks.data.loader import TokenWindowSource
from llamaworks.errors import ConfigError, FormatError
from llamaworks.files import clean_stale_temps, replace_dir
from llamaworks.model import Transformer
from llamaworks.train import checkpointing as ckpt
from llamaworks.train.loop import TrainConfig, run_training

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str = "tiny-tied", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(get_preset(name)).eval()
    m.reset_parameters(std=0.2)
    return m


def one_line(excinfo: pytest.ExceptionInfo, *pieces: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for piece in pieces:
        assert piece in msg, (piece, msg)
    return msg


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- item 1: training state loads with weights_only=True; planted pickles run nothing -----------------------
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what an attacker's pickle does: call os.system when unpickled
        return (os.system, (f"touch {self.marker}",))


def _train(out: Path, steps: int, resume: bool = False, keep_last: int = 0):
    torch.manual_seed(0)
    m = Transformer(get_preset("tiny-llama2").replace(vocab_size=64))
    m.reset_parameters()
    rng = np.random.default_rng(0)
    src = TokenWindowSource([rng.integers(0, 64, 3000).astype(np.uint16)], 16, 2)
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, max_steps=steps, save_every=1, keep_last=keep_last, out_dir=out,
                      progress=False, tensorboard=False, plot=False, save_final=False, log_every=1)
    return run_training(m, train_data=src, cfg=cfg, save_fn=lambda model, d: None, resume=resume)


def test_training_state_is_plain_data(tmp_path):
    _train(tmp_path, 2)
    step = tmp_path / "checkpoints" / "step-000002"
    shared = torch.load(step / "trainer_state.pt", weights_only=True)
    rank = torch.load(step / "rank0.pt", weights_only=True)
    assert shared["step"] == 2 and set(shared["optimizer"]) == {"state", "param_groups"}
    rng = rank["rng"]
    assert rng["torch"].dtype == torch.uint8
    assert rng["numpy"]["key"].shape == (624,) and len(rng["python"]["state"]) == 625
    assert rank["data"] == {"batches": 2, "seed": 0}


@pytest.mark.parametrize("planted", ["trainer_state.pt", "rank0.pt"])
def test_planted_pickle_is_refused_on_resume_and_runs_nothing(tmp_path, planted):
    _train(tmp_path, 1)
    marker = tmp_path / "pwned"
    target = tmp_path / "checkpoints" / "step-000001" / planted
    torch.save({"step": 1, "payload": _RunsCode(marker)}, target)
    with pytest.raises(FormatError) as e:
        _train(tmp_path, 2, resume=True)
    one_line(e, str(target), "refusing to unpickle")
    assert not marker.exists()


def test_saving_non_plain_state_fails_at_save_time():
    with pytest.raises(TypeError, match=r"rank0.pt\['data'\]\['sampler'\]: a builtins.object"):
        ckpt.to_plain({"data": {"sampler": object()}}, "rank0.pt")


# -- item 8 (training side): pruning renames first, leftovers are cleaned on the next run ---------------------
PRUNE_CHILD = """
import os, shutil, signal, sys
sys.path.insert(0, {src!r})
from llamaworks.train import checkpointing as ckpt
def killed(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
shutil.rmtree = killed   # die at the moment the folder is being deleted
ckpt.prune_checkpoints(sys.argv[1], 1)
"""


def test_pruning_killed_midway_leaves_no_half_deleted_step(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        d = root / ckpt.step_dir_name(step)
        d.mkdir(parents=True)
        (d / "trainer_state.pt").write_bytes(b"x")
        (d / "model.safetensors").write_bytes(b"y" * 100)
    child = tmp_path / "child.py"
    child.write_text(PRUNE_CHILD.format(src=str(SRC)))
    r = subprocess.run([sys.executable, str(child), str(root)], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    names = sorted(p.name for p in root.iterdir())
    assert "step-000001" not in names and "step-000002" in names  # renamed away before the delete began
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]
    assert any(n.startswith(".step-000001.") and n.endswith(".trash") for n in names)
    (root / "step-000000").mkdir()  # what an older version's killed rmtree left: no trainer_state.pt
    ckpt.prune_checkpoints(root, 0)  # the next run
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]


# -- item 2: no path read from a file reaches outside its folder ---------------------------------------------
def _sharded_hf(tmp_path: Path) -> Path:
    model = tiny()
    d = tmp_path / "hf"
    save_hf(d, model, model.config, max_shard_size=20_000)
    assert (d / "model.safetensors.index.json").is_file()
    return d


def _point_first_shard(d: Path, new: str) -> tuple[Path, str]:
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (new if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return d / first, first


def test_index_with_parent_path_is_refused(tmp_path):
    d = _sharded_hf(tmp_path)
    shard, _ = _point_first_shard(d, "../stolen.safetensors")
    shard.rename(tmp_path / "stolen.safetensors")  # a loadable file: before the fix it was read
    with pytest.raises(FormatError) as e:
        load_checkpoint(d)
    one_line(e, "model.safetensors.index.json", "weight_map entry '../stolen.safetensors'", "outside")


def test_index_with_absolute_path_is_refused(tmp_path):
    d = _sharded_hf(tmp_path)
    shard, _ = _point_first_shard(d, str(tmp_path / "abs.safetensors"))
    shard.rename(tmp_path / "abs.safetensors")
    with pytest.raises(FormatError) as e:
        load_checkpoint(d)
    one_line(e, "weight_map entry", "outside")


def test_index_symlink_resolving_outside_is_refused(tmp_path):
    d = _sharded_hf(tmp_path)
    shard, _ = _point_first_shard(d, "link.safetensors")
    shard.rename(tmp_path / "elsewhere.safetensors")
    (d / "link.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FormatError) as e:
        load_checkpoint(d)
    one_line(e, "weight_map entry 'link.safetensors' resolves to", "outside")


def test_hub_cache_snapshot_links_to_blobs_still_load(tmp_path):
    """huggingface_hub's cache: snapshots/REV/<file> -> ../../blobs/<hash>, inside the cached repo."""
    d = _sharded_hf(tmp_path)
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in d.iterdir():
        f.rename(blobs / f.name)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f.name)
    assert load_checkpoint(snap).config.n_layers == 2


def test_lora_base_path_outside_adapter_is_refused(tmp_path):
    from llamaworks.train.merge import _base_from_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    outside = tmp_path / "base"
    outside.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(outside)}))
    with pytest.raises(ConfigError, match=r"is outside .*pass --base"):
        _base_from_adapter(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "HuggingFaceTB/SmolLM2"}))
    assert _base_from_adapter(adapter) is None  # a hub id: the bundled default is used, as before


# -- item 5: configs checked against the tensors present, before anything is sized ----------------------------
def _gguf_tensors(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    m = Transformer(config)
    m.reset_parameters(std=0.2)
    return {ours_to_gguf_name(k): v.numpy() for k, v in m.state_dict().items()}


def write_gguf_raw(path: Path, config: ModelConfig, **override) -> Path:
    """A llama GGUF written with gguf.GGUFWriter, header values overridden (None: key left out)."""
    kv = {"context_length": config.max_seq_len, "embedding_length": config.dim, "block_count": config.n_layers,
          "feed_forward_length": config.hidden_dim, "attention.head_count": config.n_heads,
          "attention.head_count_kv": config.kv_heads, "attention.layer_norm_rms_epsilon": config.norm_eps,
          "rope.freq_base": config.rope_theta, "vocab_size": config.vocab_size}
    kv.update(override.pop("kv", {}))
    tokens = override.pop("tokens", None)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in kv.items():
        if value is None:
            continue
        if isinstance(value, float):
            w.add_float32(f"llama.{key}", value)
        elif isinstance(value, str):
            w.add_string(f"llama.{key}", value)
        else:
            w.add_uint32(f"llama.{key}", value)
    if tokens is not None:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
    for name, data in _gguf_tensors(config).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CFG = get_preset("tiny-tied")


@pytest.mark.parametrize("kv, pieces", [
    ({"block_count": 2**31}, ["llama.block_count is 2147483648", "expected an integer from 1 to 1024"]),
    ({"block_count": 7}, ["llama.block_count is 7, but the file holds tensors for 2 layer(s)"]),
    ({"attention.head_count": 0}, ["llama.attention.head_count is 0"]),
    ({"attention.head_count_kv": 3}, ["llama.attention.head_count_kv is 3, expected a divisor of n_heads (4)"]),
    ({"context_length": 2**31}, ["llama.context_length is 2147483648", "from 1 to 16777216"]),
    ({"vocab_size": 300}, ["llama.vocab_size is 300, but the token embedding has shape [256, 64]"]),
    ({"embedding_length": 1.5}, ["llama.embedding_length is '1.5' (float), expected an integer"]),
    ({"attention.layer_norm_rms_epsilon": "tiny"}, ["llama.attention.layer_norm_rms_epsilon is 'tiny'"]),
])
def test_gguf_header_values_are_checked(tmp_path, kv, pieces):
    path = write_gguf_raw(tmp_path / "bad.gguf", CFG, kv=kv)
    t0 = time.perf_counter()
    with pytest.raises(FormatError) as e:
        load_checkpoint(path)
    one_line(e, str(path), *pieces)
    assert time.perf_counter() - t0 < 5


def test_gguf_tokenizer_larger_than_embedding_is_refused(tmp_path):
    path = write_gguf_raw(tmp_path / "vocab.gguf", CFG, kv={"vocab_size": None},
                          tokens=[f"t{i}" for i in range(CFG.vocab_size + 10)])
    with pytest.raises(FormatError) as e:
        load_checkpoint(path)
    # without llama.vocab_size the token list decides the vocabulary; the embedding has 256 rows
    one_line(e, str(path), "vocab_size is 266, but the token embedding has shape [256, 64]")
    path = write_gguf_raw(tmp_path / "vocab2.gguf", CFG, tokens=[f"t{i}" for i in range(CFG.vocab_size + 10)])
    with pytest.raises(FormatError) as e:
        load_checkpoint(path)
    one_line(e, str(path), "tokenizer.ggml.tokens has 266 entries, more than the 256 rows of token_embd.weight")


def test_native_backend_checks_the_header_before_the_tokenizer(tmp_path):
    """The native backend reads the vocabulary in a parse of its own (after the header's checks): a vocabulary
    larger than the embedding is the same one-line error as for every other loader."""
    from llamaworks.engine.native import NativeBackend

    path = write_gguf_raw(tmp_path / "vocab.gguf", CFG, tokens=[f"t{i}" for i in range(CFG.vocab_size + 10)])
    with pytest.raises(FormatError) as e:
        NativeBackend.load(path)
    one_line(e, str(path), "tokenizer.ggml.tokens has 266 entries, more than the 256 rows of token_embd.weight")


def test_gguf_skipped_arrays_are_checked_and_keep_their_length(tmp_path, smollm2_gguf):
    """parse_gguf(skip=...) reads past the vocabulary's arrays without making their objects: every other key is
    as in a full parse, a skipped array keeps only its length, and a damaged one is the same error."""
    from llamaworks.checkpoints.gguf import VOCABULARY_KEYS, SkippedArray

    full, tensors = parse_gguf(smollm2_gguf)
    part, part_tensors = parse_gguf(smollm2_gguf, skip=VOCABULARY_KEYS)
    assert full.keys() == part.keys() and len(tensors) == len(part_tensors)
    skipped = {k for k, v in part.items() if isinstance(v, SkippedArray)}
    assert skipped == VOCABULARY_KEYS & full.keys() and "tokenizer.ggml.tokens" in skipped
    for key, value in full.items():
        if key in skipped:
            assert len(part[key]) == len(value) > 1000
        else:
            assert part[key] == value, key

    data = smollm2_gguf.read_bytes()
    cut = data.index(b"tokenizer.ggml.merges") + 2000  # inside the merges array
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    messages = []
    for skip in ((), VOCABULARY_KEYS):
        with pytest.raises(FormatError) as e:
            parse_gguf(bad, skip=skip)
        messages.append(one_line(e, str(bad), "file is truncated", "past the end of the file"))
    assert messages[0] == messages[1]


def _insert_array_kv(path: Path, key: str, item_type: int, count: int, item_size: int) -> None:
    """Insert `key` = an array of `count` zero items as the first metadata entry, plus a padding string entry
    so that the tensor data keeps its alignment (GGUF kv: u64 key length, key, u32 type, value)."""
    def kv(name: str, vtype: int, payload: bytes) -> bytes:
        return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", vtype) + payload

    entry = kv(key, 9, struct.pack("<IQ", item_type, count) + bytes(count * item_size))
    pad_len = 0
    while (len(entry) + len(kv("general.padding", 8, struct.pack("<Q", pad_len) + b"x" * pad_len))) % 32:
        pad_len += 1
    entry += kv("general.padding", 8, struct.pack("<Q", pad_len) + b"x" * pad_len)
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, 16, struct.unpack_from("<Q", data, 16)[0] + 2)
    path.write_bytes(bytes(data[:24]) + entry + bytes(data[24:]))


def test_gguf_array_spanning_the_file_is_not_a_python_list(tmp_path):
    path = write_gguf_raw(tmp_path / "arr.gguf", CFG)
    _insert_array_kv(path, "general.junk", 7, 20_000_000, 1)  # a 20 MB bool array
    meta, _ = parse_gguf(path)
    assert isinstance(meta["general.junk"], np.ndarray) and not meta["general.junk"].flags.owndata
    assert load_checkpoint(path).config.n_layers == 2  # the file itself is fine otherwise

    bad = write_gguf_raw(tmp_path / "tok.gguf", CFG)
    _insert_array_kv(bad, "tokenizer.ggml.token_type", 5, MAX_TOKENIZER_ARRAY + 1, 4)
    with pytest.raises(FormatError) as e:
        parse_gguf(bad)
    one_line(e, str(bad), "tokenizer.ggml.token_type holds 2,097,153 values, more than the 2,097,152 allowed")


def _hf_dir(tmp_path: Path) -> Path:
    model = tiny()
    return save_hf(tmp_path / "hf", model, model.config)


@pytest.mark.parametrize("edit, pieces", [
    ({"num_hidden_layers": 2.0}, ["num_hidden_layers is 2.0 (float), expected an integer"]),
    ({"num_hidden_layers": 2**31}, ["num_hidden_layers is 2147483648, expected an integer from 1 to 1024"]),
    ({"num_hidden_layers": 3}, ["num_hidden_layers is 3, but the file holds tensors for 2 layer(s)"]),
    ({"rms_norm_eps": "tiny"}, ["rms_norm_eps is 'tiny' (str), expected a number"]),
    ({"rope_scaling": "llama3"}, ["rope_scaling is 'llama3' (str), expected an object"]),
    ({"num_attention_heads": 0}, ["num_attention_heads is 0"]),
    ({"num_key_value_heads": 3}, ["num_key_value_heads is 3, expected a divisor of n_heads (4)"]),
    ({"max_position_embeddings": 2**31}, ["max_position_embeddings is 2147483648"]),
    ({"vocab_size": 1000}, ["vocab_size is 1000, but the token embedding has shape [256, 64]"]),
    ({"tie_word_embeddings": "yes"}, ["tie_word_embeddings is 'yes' (str), expected true or false"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                       "original_max_position_embeddings": 8192}}, ["rope_scaling.high_freq_factor is 1.0"]),
])
def test_hf_config_json_types_and_ranges(tmp_path, edit, pieces):
    refused_after_edit(_hf_dir(tmp_path), "config.json", edit, pieces)


def refused_after_edit(d, name: str, edit: dict, pieces: list[str]) -> None:
    """Checkpoint folder d with `edit` merged into its JSON file `name` loads to one line naming the file."""
    data = json.loads((d / name).read_text())
    data.update(edit)
    (d / name).write_text(json.dumps(data))
    with pytest.raises(FormatError) as e:
        load_checkpoint(d)
    one_line(e, str(d / name), *pieces)


def test_deeply_nested_json_is_one_line(tmp_path):
    d = _hf_dir(tmp_path)
    (d / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(FormatError) as e:
        load_checkpoint(d)
    one_line(e, str(d / "config.json"), "nested too deeply")


@pytest.mark.parametrize("edit, pieces", [
    ({"n_layers": 2**31}, ["n_layers is 2147483648, expected an integer from 1 to 1024"]),
    ({"n_layers": 2.0}, ["n_layers is 2.0 (float), expected an integer"]),
    ({"n_heads": 0}, ["n_heads is 0"]),
    ({"norm_eps": "tiny"}, ["norm_eps is 'tiny' (str), expected a number"]),
    ({"multiple_of": 0}, ["multiple_of is 0"]),
])
def test_meta_params_json(tmp_path, edit, pieces):
    model = tiny("tiny-llama2")
    refused_after_edit(save_meta(tmp_path / "meta", model, model.config), "params.json", edit, pieces)


def test_cli_reports_a_hostile_gguf_in_one_line(tmp_path, capsys):
    path = write_gguf_raw(tmp_path / "bad.gguf", CFG, kv={"block_count": 2**31})
    code = cli.main(["generate", "--model", str(path), "--prompt", "hi", "--max-tokens", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "llama.block_count is 2147483648" in err
    assert "Traceback" not in err


# -- item 8: writes a kill cannot leave half done; normal permissions ----------------------------------------
CONVERT_CHILD = """
import os, signal, sys
sys.path.insert(0, {src!r})
import safetensors.torch
real = safetensors.torch.save_file
def save_then_die(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    os.kill(os.getpid(), signal.SIGKILL)   # killed after the new weights are on disk, before config.json
safetensors.torch.save_file = save_then_die
from llamaworks.checkpoints.convert import convert
convert(sys.argv[1], sys.argv[2], "hf", progress=False)
"""


def test_convert_to_hf_killed_midway_leaves_the_old_folder_whole(tmp_path):
    old_model, new_model = tiny("tiny-tied", seed=1), tiny("tiny-llama2", seed=2)
    dst = save_hf(tmp_path / "dst", old_model, old_model.config)
    (dst / "README.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    src = save_gguf(tmp_path / "src.gguf", new_model, new_model.config, tensor_type="f32")
    child = tmp_path / "child.py"
    child.write_text(CONVERT_CHILD.format(src=str(SRC)))
    r = subprocess.run([sys.executable, str(child), str(src), str(dst)], capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before  # old config.json with the old weights
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".dst.")]
    assert leftovers  # the killed run's temp folder ...
    from llamaworks.checkpoints.convert import convert

    convert(src, dst, "hf", progress=False)  # ... is removed by the next write
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.")]
    ckpt_ = load_checkpoint(dst)
    assert ckpt_.config.tie_embeddings is False and (dst / "README.md").read_text() == "mine"
    assert (dst / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def test_stale_temp_files_of_killed_writers_are_removed(tmp_path):
    model = tiny()
    pid = dead_pid()
    stale = tmp_path / f".m.gguf.{pid}-abc123.tmp"
    stale.write_bytes(b"half a file")
    alive = tmp_path / f".m.gguf.{os.getppid()}-abc123.tmp"  # a writer that still runs: left alone
    alive.write_bytes(b"in progress")
    save_gguf(tmp_path / "m.gguf", model, model.config, tensor_type="f16")
    assert not stale.exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "m.gguf"])
    assert clean_stale_temps(tmp_path, "other") == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_umask_permissions(tmp_path, umask, smollm2_gguf):
    from llamaworks.checkpoints.hf import write_hf  # noqa: F401 (imported before the umask changes)
    from llamaworks.files import DIR_MODE, FILE_MODE
    from llamaworks.tokenizer import load_tokenizer
    from llamaworks.train.lora import LoRAConfig, apply_lora, save_adapter

    old = os.umask(umask)
    try:
        code = (f"import os; os.umask({umask}); import sys; sys.path.insert(0, {str(SRC)!r}); "
                f"from llamaworks.files import FILE_MODE, DIR_MODE; print(FILE_MODE, DIR_MODE)")
        file_mode, dir_mode = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                       text=True, check=True).stdout.split())
        assert (file_mode, dir_mode) == (0o666 & ~umask, 0o777 & ~umask)
    finally:
        os.umask(old)
    # This process read its umask at import; the modes it gives are that umask's, never mkstemp's 0600.
    tok = load_tokenizer(smollm2_gguf)
    model = tiny()
    d = save_hf(tmp_path / "hf", model, model.config, tok)
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=("q", "v")))
    save_adapter(model, tmp_path / "adapter")
    files = [d / "tokenizer.json", d / "tokenizer_config.json", d / "config.json", d / "model.safetensors",
             tmp_path / "adapter" / "adapter_config.json", tmp_path / "adapter" / "adapter_model.safetensors"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == FILE_MODE, f
    assert stat.S_IMODE(d.stat().st_mode) == DIR_MODE


def test_replace_dir_keeps_other_files_and_drops_stale_outputs(tmp_path):
    """finetune's final save: OUT keeps checkpoints/ and metrics, loses the old run's model files."""
    from llamaworks.train.finetune import _final_output

    out = tmp_path / "out"
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    (out / "checkpoints" / "step-000001" / "trainer_state.pt").write_bytes(b"s")
    (out / "metrics.csv").write_text("step,loss\n")
    for stale in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                  "model.safetensors.index.json", "config.json", "adapter"):
        (out / stale).write_text("old") if stale != "adapter" else (out / stale).mkdir()
    with replace_dir(out, drop=_final_output) as stage:
        (stage / "model.safetensors").write_text("new")
        (stage / "config.json").write_text("new")
        assert (out / "config.json").read_text() == "old"  # nothing visible until the swap
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "metrics.csv",
                                                      "model.safetensors"]
    assert (out / "config.json").read_text() == "new"
    assert (out / "checkpoints" / "step-000001" / "trainer_state.pt").read_bytes() == b"s"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    with pytest.raises(RuntimeError), replace_dir(out) as stage:  # a failed write changes nothing
        (stage / "config.json").write_text("newer")
        raise RuntimeError
    assert (out / "config.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_plain_but_malformed_training_state_is_one_line(tmp_path):
    _train(tmp_path, 1)
    step = tmp_path / "checkpoints" / "step-000001"
    rank = torch.load(step / "rank0.pt", weights_only=True)
    rank["rng"]["numpy"]["key"] = [1, 2, 3]  # loads with weights_only, but is not an RNG state
    torch.save(rank, step / "rank0.pt")
    with pytest.raises(FormatError) as e:
        _train(tmp_path, 2, resume=True)
    one_line(e, str(step / "rank0.pt"), "bad numpy RNG state")
    shared = torch.load(step / "trainer_state.pt", weights_only=True)
    shared["step"] = "1"
    torch.save(shared, step / "trainer_state.pt")
    with pytest.raises(FormatError) as e:
        _train(tmp_path, 2, resume=True)
    one_line(e, str(step / "trainer_state.pt"), "'step' must be a non-negative integer")


def test_replace_dir_without_atomic_exchange_and_recovery(tmp_path, monkeypatch):
    """Where renameat2 is missing: two renames, and a kill between them is undone by the next write."""
    import llamaworks.files as files

    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    with files.replace_dir(out) as stage:
        (stage / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]
    # the state a kill between the two renames leaves: no `out`, the old folder under its .old name
    out.rename(tmp_path / f".out.{dead_pid()}-x2.old")
    files.recover_dir(out)
    assert (out / "config.json").read_text() == "new"


def test_a_step_saved_again_replaces_the_old_one_whole(tmp_path):
    _train(tmp_path / "a", 2)
    root = tmp_path / "a" / "checkpoints"
    (root / "step-000002" / "stale-marker").write_text("from the first run")
    _train(tmp_path / "a", 2, resume=False)  # same steps again: step-000002 is written a second time
    assert not (root / "step-000002" / "stale-marker").exists()
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002"]


def test_a_kv_cache_the_machine_cannot_hold_is_one_line():
    """A context_length within the checked range can still ask for more than the machine has: one line."""
    from llamaworks.model import lazy_zeros

    with pytest.raises(ConfigError) as e:
        lazy_zeros((1, 8, 2**24, 2**17), torch.float16)
    one_line(e, "cannot reserve 35,184,372,088,832 bytes", "--max-context")


MEMORY_CHILD = """
import resource, sys
sys.path.insert(0, {src!r})
import torch  # noqa: F401 (imported before measuring: the reader would import it)
from llamaworks.checkpoints import load_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ckpt = load_checkpoint(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(type(ckpt.metadata["general.junk"]).__name__, (after - before) // 1024)
"""


def test_a_98_mb_metadata_array_costs_no_memory(tmp_path):
    """The issue's file: a bool array spanning a 98 MB GGUF peaked at 908 MB as a Python list."""
    path = write_gguf_raw(tmp_path / "big.gguf", CFG)
    _insert_array_kv(path, "general.junk", 7, 98_000_000, 1)
    child = tmp_path / "child.py"
    child.write_text(MEMORY_CHILD.format(src=str(SRC)))
    out = subprocess.run([sys.executable, str(child), str(path)], capture_output=True, text=True, check=True)
    kind, grown_mib = out.stdout.split()
    assert kind == "ndarray" and int(grown_mib) < 60, out.stdout
