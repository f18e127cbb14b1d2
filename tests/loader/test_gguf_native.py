"""GGUF weights kept quantized: the Q4_K/Q8_0/Q5_0/Q6_K -> int4/int8 conversions equal gguf_quants'
dequantization bit for bit on the default model's real tensors; fused shards of different formats
stack exactly; the quantized-GGUF model stays close to the dequantized one."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from ember import LLM, SamplingParams
from ember.errors import UnsupportedModelError
from ember.loader.gguf_file import GGUFFile
from ember.loader.gguf_native import scheme_for, to_quantized_weight
from ember.loader.gguf_quants import dequantize
from ember.loader.model_loader import load_model, resolve_model
from ember.model_zoo import default_model_path
from ember.models.layers.linear import Linear
from ember.quant.config import QuantConfig
from ember.quant.methods import QuantizedMethod
from ember.quant.scheme import QuantScheme, quantize_rtn
from helpers import batch_logits

pytestmark = pytest.mark.slow

EXPECTED = {
    T.Q4_K: (QuantScheme(4, 32, False), 0, 15),
    T.Q8_0: (QuantScheme(8, 32, True), -128, 127),
    T.Q5_0: (QuantScheme(8, 32, True), -16, 15),
    T.Q6_K: (QuantScheme(8, 16, True), -32, 31),
}


@pytest.fixture(scope="module")
def gguf() -> GGUFFile:
    return GGUFFile(default_model_path())


def _tensors_of(gguf: GGUFFile, qtype: T, count: int = 2):
    found = [t for t in gguf.tensors if t.qtype == qtype and len(t.shape) == 2]
    return sorted(found, key=lambda t: t.data.nbytes)[:count]  # the smallest: the test stays fast


@pytest.mark.parametrize("qtype", list(EXPECTED), ids=lambda t: t.name)
def test_conversion_equals_dequantization_exactly(gguf, qtype):
    scheme, low, high = EXPECTED[qtype]
    tensors = _tensors_of(gguf, qtype)
    assert tensors, f"the default model has no {qtype.name} tensor"
    for t in tensors:
        q = to_quantized_weight(t.data, t.qtype, t.shape)
        assert q.scheme == scheme == scheme_for(qtype)
        assert q.codes.min() >= low and q.codes.max() <= high
        assert torch.equal(q.dequantize(), dequantize(t.data, t.qtype, t.shape)), t.name


def test_float_types_are_not_converted_and_unknown_types_are_refused(gguf):
    norm = next(t for t in gguf.tensors if t.qtype == T.F32)
    assert to_quantized_weight(norm.data, norm.qtype, norm.shape) is None
    with pytest.raises(UnsupportedModelError, match="Q4_0"):
        scheme_for(T.Q4_0)


def test_fused_shards_of_different_formats_stack_exactly(gguf):
    # q: Q5_0 (int8 g32), v: Q8_0 (int8 g32), down: Q6_K (int8 g16) with an RTN int4 shard of the same
    # width: one packed int8 weight at g16 (g32 scales repeated) and an int4 segment after it.
    down = next(t for t in gguf.tensors if t.name == "blk.0.ffn_down.weight")
    six_k = to_quantized_weight(down.data, down.qtype, down.shape)
    eight = quantize_rtn(dequantize(down.data, down.qtype, down.shape), QuantScheme.parse("int8-g32"))
    four = quantize_rtn(dequantize(down.data, down.qtype, down.shape).flip(0), QuantScheme.parse("int4-g64"))
    rows, cols = six_k.shape
    layer = Linear(cols, 3 * rows, shard_sizes=[rows] * 3)
    layer.set_method(QuantizedMethod(None))
    for shard, weight in enumerate((six_k, eight, four)):
        layer.load_shard("weight", weight, shard)
    layer.process_weights_after_loading()
    segments = layer.method.segments
    assert [(s.rows, s.scheme) for s in segments] == [
        (2 * rows, QuantScheme(8, 16, True)),
        (rows, QuantScheme.parse("int4-g64")),
    ]
    reference = torch.cat([six_k.dequantize(), eight.dequantize(), four.dequantize()])
    assert torch.equal(layer.method.dequantize(), reference)
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(0))
    tolerance = 1e-4 * (x.abs() @ reference.abs().T) + 1e-5
    assert ((layer(x) - x @ reference.T).abs() <= tolerance).all()


@pytest.fixture(scope="module")
def default_llms() -> tuple[LLM, LLM]:
    """The default model run from its quantized blocks, and dequantized to float32."""
    path = default_model_path()
    return LLM(path, dtype="float32"), LLM(path, dtype="float32", quantization="none")


def test_default_model_runs_quantized_and_matches_dequantized(default_llms):
    native_llm, float_llm = default_llms
    native, dequantized = native_llm.engine.runner.model, float_llm.engine.runner.model
    layer = native.model.layers[0]
    assert layer.self_attn.qkv_proj.method.segments[0].scheme == QuantScheme(8, 32, True)  # Q5_0 q/k + Q8_0 v
    assert layer.self_attn.o_proj.method.segments[0].scheme == QuantScheme(4, 32, False)  # Q4_K
    assert layer.mlp.down_proj.method.segments[0].scheme == QuantScheme(8, 16, True)  # Q6_K
    assert isinstance(native.model.embed_tokens.method, QuantizedMethod)  # Q8_0 tied embedding / LM head
    prompts = [[2, 818, 5279, 529, 7001, 563], [2, 3689, 17, 9, 1000, 25000, 42]]
    for got, expected in zip(batch_logits(native, prompts), batch_logits(dequantized, prompts)):
        # Same weights exactly; only the kernel's arithmetic differs (activations carry ~16 bits).
        assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_default_model_greedy_tokens_native_vs_dequantized(default_llms):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    native, floats = (llm.generate(prompts, params, use_tqdm=False) for llm in default_llms)
    assert [o.outputs[0].token_ids for o in native] == [o.outputs[0].token_ids for o in floats]


def test_llama_q_k_row_permutation_is_undone_on_quantized_weights(tmp_path):
    """llama.cpp interleaves Llama Q/K rows; ember undoes it on the packed rows (with their scales)."""
    import gguf
    import numpy as np
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    reference = transformers.LlamaForCausalLM(cfg).eval()
    path = str(tmp_path / "q8.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in (
        (writer.add_context_length, 64), (writer.add_embedding_length, 64), (writer.add_block_count, 1),
        (writer.add_feed_forward_length, 96), (writer.add_head_count, 4), (writer.add_head_count_kv, 2),
        (writer.add_layer_norm_rms_eps, cfg.rms_norm_eps), (writer.add_vocab_size, 256),
    ):  # fmt: skip
        add(value)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    for name, tensor in reference.state_dict().items():
        array = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            part = name.split(".")[-2]
            block = names.get(part, {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}.get(part))
            gguf_name = f"blk.0.{block}.weight"
            if part in ("q_proj", "k_proj"):
                heads = 4 if part == "q_proj" else 2
                array = array.reshape(heads, 2, -1, 64).swapaxes(1, 2).reshape(array.shape)  # llama.cpp's order
        if array.ndim == 2:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, T.Q8_0), raw_dtype=T.Q8_0)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    source = resolve_model(path)
    native = load_model(source, torch.float32, "cpu", QuantConfig.from_settings("auto"))
    assert native.model.layers[0].self_attn.qkv_proj.method.segments[0].scheme == QuantScheme(8, 32, True)
    dequantized = load_model(source, torch.float32, "cpu", QuantConfig.from_settings("none"))
    prompt = [[5, 17, 42, 99, 3, 250, 7]]
    got, expected = batch_logits(native, prompt)[0], batch_logits(dequantized, prompt)[0]
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
    with torch.no_grad():  # and both are transformers' model up to Q8_0 rounding
        exact = reference(torch.tensor(prompt)).logits[0]
    assert (got - exact).abs().max() <= 0.05 * exact.abs().max()
