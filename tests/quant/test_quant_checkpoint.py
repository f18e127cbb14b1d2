"""Quantized checkpoints: save -> LLM(folder) reloads without re-quantizing and gives identical logits,
for RTN-quantized HF checkpoints and for the GGUF-native default model (mixed int4/int8 layers)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ember import LLM, SamplingParams
from ember.errors import UnsupportedModelError
from ember.loader.model_loader import load_model, resolve_model
from ember.model_zoo import default_model_path
from ember.models.layers.linear import Linear
from ember.quant.checkpoint import install_quantized, save_quantized
from ember.quant.config import QuantConfig
from ember.quant.methods import QuantizedMethod, UnquantizedMethod
from ember.quant.scheme import QuantScheme, quantize_rtn
from helpers import batch_logits

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12, 13]]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _same_layers(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for name, module in a.named_modules():
        if isinstance(module, Linear):
            other = b.get_submodule(name)
            assert type(module.method) is type(other.method), name
            if isinstance(module.method, QuantizedMethod):
                assert [(s.rows, s.scheme) for s in module.method.segments] == [
                    (s.rows, s.scheme) for s in other.method.segments
                ], name


@pytest.mark.parametrize(("family", "quantization", "head"), [("qwen2", "int4", "int8"), ("gemma3", "int8-g32", "auto")])
def test_rtn_checkpoint_round_trip(checkpoint_dir, tmp_path, family, quantization, head):
    folder = checkpoint_dir(family)
    llm = LLM(folder, dtype="float32", quantization=quantization, lm_head_quantization=head)
    model = llm.engine.runner.model
    out = str(tmp_path / "quantized")
    save_quantized(model, out, folder)
    config = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert config["quant_method"] == "ember" and config["scheme"] == QuantScheme.parse(quantization).name
    assert config["lm_head"] is True

    reloaded = LLM(out, dtype="float32")
    _same_layers(model, reloaded.engine.runner.model)
    for a, b in zip(batch_logits(model, PROMPTS), batch_logits(reloaded.engine.runner.model, PROMPTS)):
        assert torch.equal(a, b)
    texts = ["Hello world", "def add(a, b):"]
    assert [o.outputs[0].token_ids for o in llm.generate(texts, GREEDY, use_tqdm=False)] == [
        o.outputs[0].token_ids for o in reloaded.generate(texts, GREEDY, use_tqdm=False)
    ]
    # quantization=none dequantizes the saved weights into a float model.
    floats = load_model(resolve_model(out), torch.float32, "cpu", QuantConfig.from_settings("none"))
    assert all(isinstance(m.method, UnquantizedMethod) for m in floats.modules() if isinstance(m, Linear))


def test_installed_weights_save_and_reload(checkpoint_dir, tmp_path):
    """The calibration path: install externally quantized weights (as GPTQ/AWQ would), save, reload."""
    folder = checkpoint_dir("llama")  # tied embeddings: the head is model.embed_tokens
    model = load_model(resolve_model(folder), torch.float32, "cpu")
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            weights[name] = quantize_rtn(module.weight.data, QuantScheme.parse("int4-g64" if "mlp" in name else "int8"))
    install_quantized(model, weights)
    out = str(tmp_path / "installed")
    save_quantized(model, out, folder, method="gptq")
    config = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert config["method"] == "gptq" and config["scheme"] == "mixed" and config["lm_head_scheme"] == "int8-pc"
    reloaded = load_model(resolve_model(out), torch.float32, "cpu", QuantConfig.from_settings("auto"))
    _same_layers(model, reloaded)
    for a, b in zip(batch_logits(model, PROMPTS), batch_logits(reloaded, PROMPTS)):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_gguf_native_checkpoint_round_trip(tmp_path):
    path = default_model_path()
    llm = LLM(path)  # bfloat16, the GGUF's blocks kept (int4 and int8 layers, Q8_0 tied embedding)
    out = str(tmp_path / "gemma-native")
    save_quantized(llm.engine.runner.model, out, path, method="gguf")
    reloaded = LLM(out)
    _same_layers(llm.engine.runner.model, reloaded.engine.runner.model)
    texts = ["The capital of France is", "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"]
    for text in texts:  # the converted tokenizer encodes like the GGUF's
        assert reloaded.engine.tokenizer.encode(text) == llm.engine.tokenizer.encode(text)
    first = llm.generate(texts, GREEDY, use_tqdm=False)
    again = reloaded.generate(texts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
    assert [o.outputs[0].text for o in first] == [o.outputs[0].text for o in again]


def test_foreign_quantized_checkpoints_are_refused(checkpoint_dir, tmp_path):
    folder = checkpoint_dir("llama")
    out = tmp_path / "gptq"
    out.mkdir()
    config = json.load(open(os.path.join(folder, "config.json")))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="gptq"):
        LLM(str(out))
