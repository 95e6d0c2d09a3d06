"""`llamaworks` on the command line: parsing in-process, and the real console script via subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llamaworks import cli

LLAMAWORKS = str(Path(sys.executable).parent / "llamaworks")


def run(*args: str, stdin: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([LLAMAWORKS, *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def stats_lines(stderr: str) -> int:
    return sum(line.startswith("[") and "tok/s" in line for line in stderr.splitlines())


# -- in-process ------------------------------------------------------------------------------------
def test_format_param_count():
    assert cli.format_param_count(134_515_008) == "135M"
    assert cli.format_param_count(1_100_048_384) == "1.1B"
    assert cli.format_param_count(7_000_000_000) == "7.0B"
    assert cli.format_param_count(98_000) == "0.1M"


def test_every_verb_has_threads_and_a_runner():
    parser = cli.build_parser()
    for argv in (["chat", "--threads", "1"], ["generate", "-p", "x", "--threads", "1"], ["models"],
                 ["--threads", "3", "convert", "a", "b", "--to", "hf"]):
        args = parser.parse_args(argv)
        assert callable(args.run)
    assert parser.parse_args(["--threads", "3", "models"]).threads == 3
    assert parser.parse_args(["models", "--threads", "2"]).threads == 2
    assert parser.parse_args(["chat"]).threads is None  # resolved to physical cores in main()
    for action in parser._subparsers._group_actions[0].choices.values():  # every verb, nested ones too
        assert "--threads" in action.format_help(), action.prog
    args = parser.parse_args(["chat", "--temperature", "0", "--max-tokens", "5", "--stop", "a", "--stop", "b"])
    assert cli.sampling_kwargs(args) == {"temperature": 0.0, "max_new_tokens": 5, "stop": ["a", "b"]}
    args = parser.parse_args(["generate", "-p", "x", "--stop", "\\n\\n", "--top-p", "0.9"])
    assert cli.sampling_kwargs(args) == {"top_p": 0.9, "max_new_tokens": 128, "stop": ["\n\n"]}


def test_physical_cores_is_positive():
    assert 1 <= cli.physical_cores() <= (len(__import__("os").sched_getaffinity(0)))


def test_no_verb_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "chat" in capsys.readouterr().err


def test_bad_input_is_one_line_error(capsys, tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"NOPE" + bytes(100))
    assert cli.main(["convert", str(bogus), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "bogus.gguf" in err


# -- the console script ----------------------------------------------------------------------------
def test_models_lists_presets():
    result = run("models")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    assert lines["smollm2-135m"][1] == "135M"
    assert lines["tinyllama-1.1b"][1] == "1.1B"
    assert lines["llama-2-7b"][1] == "6.7B" and lines["mistral-7b"][1] == "7.2B"


def test_missing_model_is_one_line_error():
    result = run("generate", "--model", "/nonexistent", "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "/nonexistent" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_generate_greedy_stream_and_plain_agree():
    plain = run("generate", "--prompt", "The capital of France is", "--max-tokens", "8", "--temperature", "0")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip()
    streamed = run("generate", "--prompt", "The capital of France is", "--max-tokens", "8", "--temperature", "0",
                   "--stream", "--stats")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout
    assert "tok/s" in streamed.stderr


@pytest.mark.slow
def test_chat_with_piped_stdin():
    stdin = ("What is the capital of France? Answer with the city name.\n/help\n/reset\n"
             "/system You answer in one word.\nSay hello.\n/exit\nignored\n")
    result = run("chat", "--temperature", "0", "--max-tokens", "24", "--threads", "1", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert ">>>" not in result.stdout and "\x1b[" not in result.stdout + result.stderr  # no prompt, no colours
    assert stats_lines(result.stderr) == 2  # one per reply; "ignored" came after /exit
    assert "(conversation reset)" in result.stderr and "/system TEXT" in result.stderr
    assert "(system prompt set)" in result.stderr


@pytest.mark.slow
def test_chat_drops_oldest_turns_when_context_is_full():
    turns = ["Tell me about llamas.", "And alpacas?", "Which one is bigger?", "Thanks, and camels?"]
    result = run("chat", "--temperature", "0", "--max-tokens", "16", "--max-context", "128", "--threads", "1",
                 stdin="\n".join(turns) + "\n")
    assert result.returncode == 0, result.stderr
    assert "no longer fits the 128-token context" in result.stderr
    assert "system prompt is kept" in result.stderr
    assert stats_lines(result.stderr) == len(turns)


def test_default_names_the_bundled_model_wherever_a_model_path_is_taken(tmp_path, monkeypatch) -> None:
    from llamaworks.assets import default_model_path
    from llamaworks.checkpoints import detect_format
    from llamaworks.data.prepare import resolve_tokenizer

    assert detect_format("default") == ("gguf", default_model_path())  # `convert default OUT` reads it
    assert resolve_tokenizer("default").vocab_size == 49152
    monkeypatch.chdir(tmp_path)  # a real file or folder named "default" wins over the alias
    (tmp_path / "default").mkdir()
    from llamaworks.errors import FormatError

    with pytest.raises(FormatError, match="default: not a checkpoint directory"):
        detect_format("default")
