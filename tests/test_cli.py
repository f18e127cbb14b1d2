"""`ember generate` and `ember chat` as a user runs them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from ember import LLM, SamplingParams
from ember.cli import _ENGINE_FLAGS, _SAMPLING_FLAGS, build_parser


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True, input=stdin, timeout=300)


def test_help_documents_every_flag():
    parser = build_parser()
    for command in ("generate", "chat"):
        sub = parser._subparsers._group_actions[0].choices[command]  # noqa: SLF001
        help_text = sub.format_help()
        for name in _ENGINE_FLAGS + _SAMPLING_FLAGS:
            assert "--" + name.replace("_", "-") in help_text
        for action in sub._actions:  # noqa: SLF001
            assert action.help and action.help.strip() and not action.help.startswith(" (default")


def test_every_command_formats_its_help():
    # argparse %-formats help text, so a docstring with a literal percent sign once broke `serve --help`.
    parser = build_parser()
    for command, sub in parser._subparsers._group_actions[0].choices.items():  # noqa: SLF001
        assert "usage:" in sub.format_help(), command


def test_generate_streams_the_greedy_completion(checkpoint_dir):
    folder = checkpoint_dir("llama")
    result = _run("generate", "Hello world", "--model", folder, "--temperature", "0", "--max-tokens", "10", "--ignore-eos")
    assert result.returncode == 0, result.stderr
    [expected] = LLM(folder).generate("Hello world", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert result.stdout == "Hello world" + expected.outputs[0].text + "\n"


def test_chat_loop(checkpoint_dir):
    folder = checkpoint_dir("llama")
    result = _run("chat", "--model", folder, "--temperature", "0", "--max-tokens", "5", stdin="Hello\nHow are you?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") >= 2


def test_sampling_flags_map_to_params():
    args = build_parser().parse_args(["generate", "x", "--top-k", "5", "--stop", "a", "--stop", "b", "--seed", "3"])
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(_SAMPLING_FLAGS) <= fields
    assert args.top_k == 5 and args.stop == ["a", "b"] and args.seed == 3
