"""The tokenizer built from a GGUF's vocabulary must be the one transformers builds (our reference).

The strongest check is structural: the whole `tokenizers` serialization (normalizer, pre-tokenizer,
model vocabulary and merges in order, added tokens, post-processor, decoder) must be identical.
Id-level parity on thousands of strings is in tests/test_tokenizer.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from ember.errors import CorruptModelError, UnsupportedModelError
from ember.loader.gguf_file import GGUFFile
from ember.loader.gguf_tokenizer import build_gguf_tokenizer
from ember.model_zoo import default_model_path, qwen25_coder_05b_path

transformers = pytest.importorskip("transformers")

MODELS = {"gemma": default_model_path, "qwen": qwen25_coder_05b_path}


def _hf_tokenizer(path: str):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request) -> dict:
    """Each real GGUF once per module: its path, our metadata/tokenizer/info and transformers' tokenizer."""
    path = MODELS[request.param]()
    meta = GGUFFile(path).metadata
    start = time.perf_counter()
    tokenizer, info = build_gguf_tokenizer(meta)
    build_seconds = time.perf_counter() - start
    return {
        "name": request.param,
        "meta": meta,
        "tokenizer": tokenizer,
        "info": info,
        "build_seconds": build_seconds,
        "hf": _hf_tokenizer(path),
    }


def test_same_tokenizer_as_transformers(model: dict) -> None:
    ours = json.loads(model["tokenizer"].to_str())
    ref = json.loads(model["hf"].backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ours[key] == ref[key], key
    assert ours["added_tokens"] == ref["added_tokens"]
    ours_model, ref_model = ours.pop("model"), ref.pop("model")
    assert ours_model["vocab"] == ref_model["vocab"]
    assert ours_model["merges"] == ref_model["merges"]  # same merges in the same (rank) order
    assert ours_model == ref_model
    assert ours == ref


def test_special_info(model: dict) -> None:
    info, hf = model["info"], model["hf"]
    assert info["bos_token_id"] == hf.bos_token_id
    assert info["pad_token_id"] == hf.pad_token_id
    assert info["unk_token_id"] == hf.unk_token_id
    assert info["eos_token_id"] == hf.eos_token_id
    assert info["eos_token_ids"][0] == hf.eos_token_id
    assert info["add_bos"] == bool(hf.add_bos_token)
    assert info["chat_template"] == getattr(hf, "chat_template", None)
    if model["name"] == "gemma":
        assert info["eos_token_ids"] == [1, 106]  # <eos>, <end_of_turn>
        assert info["chat_template"] is None
    else:
        assert info["eos_token_ids"] == [151645, 151643]  # <|im_end|>, <|endoftext|>
        assert "<|im_start|>" in info["chat_template"]


def test_control_tokens_stay_whole(model: dict) -> None:
    tok = model["tokenizer"]
    if model["name"] == "gemma":
        assert tok.encode("<start_of_turn>user\n", add_special_tokens=False).ids[:2] == [105, 2364]
        assert tok.encode("a<eos>b", add_special_tokens=False).ids[1] == 1
        assert tok.encode("x").ids[0] == 2  # BOS added
    else:
        assert tok.encode("<|im_start|>user", add_special_tokens=False).ids[0] == 151644
        assert tok.encode("<tool_call>", add_special_tokens=False).ids == [151657]  # user-defined token
        assert tok.encode("x").ids == tok.encode("x", add_special_tokens=False).ids  # no BOS


def test_build_is_fast(model: dict) -> None:
    assert model["build_seconds"] < 6.0, f"building the {model['name']} tokenizer took {model['build_seconds']:.1f}s"


def _write_tiny_gguf(path: Path, model: str = "llama", arch: str = "llama") -> list[str]:
    """A small SentencePiece-style GGUF with every kind of token and a chat template."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "bc", "▁abc", "h", "i", "▁h", "hi", "▁hi", "<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * 14 + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(15)]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


def test_gguf_file_metadata_matches_gguf_reader(tmp_path: Path) -> None:
    """The tokenizer built from GGUFFile's metadata equals the one built from GGUFReader's values."""
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path)
    fast = GGUFFile(str(path))
    reader = gguf.GGUFReader(str(path))
    slow = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert fast.metadata == slow
    from_reader, _ = build_gguf_tokenizer(slow)
    from_file, _ = build_gguf_tokenizer(fast)
    assert from_reader.to_str() == from_file.to_str()


def test_llama_sentencepiece_matches_transformers(tmp_path: Path) -> None:
    """A non-Gemma SentencePiece vocabulary gets Llama's shape (Metaspace, merges ranked by score)."""
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path)
    ours, info = build_gguf_tokenizer(GGUFFile(str(path)))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert json.loads(ours.to_str()) == json.loads(hf.backend_tokenizer.to_str())
    for text in ["abc hi", " abc", "hi<|user|>ab  c", "zz é 😀", "", "<s>a</s>"]:
        assert ours.encode(text).ids == hf(text)["input_ids"], text
    assert info["add_bos"] and info["bos_token_id"] == 1 and info["eos_token_ids"] == [2]


def test_unknown_tokenizer_model_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        build_gguf_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    path = tmp_path / "rwkv.gguf"
    _write_tiny_gguf(path, model="rwkv")
    with pytest.raises(UnsupportedModelError, match="'rwkv'"):
        build_gguf_tokenizer(GGUFFile(str(path)))


def test_broken_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(CorruptModelError):
        build_gguf_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": []})
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(CorruptModelError):
        GGUFFile(str(not_gguf))
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CorruptModelError):
        GGUFFile(str(truncated))
