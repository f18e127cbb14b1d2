"""Bad model inputs give one clear error (and the CLI exits 2 with one line, no traceback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from ember import LLM
from ember.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError
from ember.model_zoo import default_model_path


@pytest.fixture
def broken(tmp_path, checkpoint_dir):
    """Copy of the tiny llama checkpoint that a test may damage."""
    folder = tmp_path / "model"
    shutil.copytree(checkpoint_dir("llama"), folder)
    return folder


def _truncated_gguf(tmp_path) -> str:
    path = tmp_path / "truncated.gguf"
    with open(default_model_path(), "rb") as src:
        path.write_bytes(src.read(50_000_000))
    return str(path)


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        LLM("/no/such/model")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        LLM(str(tmp_path))


def test_not_a_model_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ModelNotFoundError, match="neither a .gguf file"):
        LLM(str(path))


def test_unsupported_architecture(broken):
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'FalconForCausalLM' is not supported .*LlamaForCausalLM"):
        LLM(str(broken))


def test_invalid_config_json(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match="invalid JSON"):
        LLM(str(broken))


def test_truncated_safetensors(broken):
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModelError, match="model.safetensors"):
        LLM(str(broken))


def test_missing_tensor(broken):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CorruptModelError, match="lacks tensors for: model.layers.1.mlp.gate_up_proj"):
        LLM(str(broken))


def test_truncated_gguf(tmp_path):
    with pytest.raises(CorruptModelError, match="truncated.gguf"):
        LLM(_truncated_gguf(tmp_path))


def test_garbage_gguf(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CorruptModelError, match="garbage.gguf"):
        LLM(str(path))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--model", "/no/such/model"], "does not exist"),
        (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "hi", "--top-p", "2"], "top_p must be in"),
        (["generate", "hi", "--dtype", "int3"], "unknown dtype"),
    ],
)
def test_cli_errors_are_one_line(args, message):
    result = _cli(*args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_cli_bad_files(tmp_path, broken):
    (broken / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "hidden_size": 8,
                                                    "num_attention_heads": 1, "num_hidden_layers": 1,
                                                    "intermediate_size": 8, "vocab_size": 8}))
    for path, message in ((_truncated_gguf(tmp_path), "not a readable GGUF"), (str(broken), "is not supported")):
        result = _cli("generate", "hi", "--model", path)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0]


def test_cli_prompt_too_long(checkpoint_dir):
    result = _cli("generate", "word " * 100, "--model", checkpoint_dir("llama"), "--max-model-len", "32")
    assert result.returncode == 2 and "context limit" in result.stderr and "Traceback" not in result.stderr
