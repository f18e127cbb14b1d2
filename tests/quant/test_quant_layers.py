"""Quantization as a per-layer method: RTN bounds, quantized Linear vs its float reference, tiny
checkpoints quantized on load (close to float, batch invariant in the engine), and bad scheme strings."""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from ember.errors import InvalidRequestError
from ember.loader.model_loader import load_model, resolve_model
from ember.model_zoo import default_model_path
from ember.models.layers.linear import Linear
from ember.quant.config import QuantConfig
from ember.quant.methods import QuantizedMethod, UnquantizedMethod
from ember.quant.scheme import PER_CHANNEL, QuantizedWeight, QuantScheme, quantize_rtn
from helpers import assert_no_leak, batch_logits

SCHEMES = ["int8", "int8-g32", "int4", "int4-g128", "int4-pc", "int4-g64-sym"]
PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 64, 128, 33], [11, 12], [300, 1, 2, 3, 4, 5]]


@pytest.fixture(scope="module")
def real_weight() -> torch.Tensor:
    """A real projection: layer 0's gate weight of the default model, dequantized [2048, 640]."""
    from ember.loader.gguf_file import GGUFFile
    from ember.loader.gguf_quants import dequantize

    f = GGUFFile(default_model_path())
    t = next(t for t in f.tensors if t.name == "blk.0.ffn_gate.weight")
    return dequantize(t.data, t.qtype, t.shape)


def test_scheme_strings_round_trip_and_defaults():
    assert QuantScheme.parse("int8") == QuantScheme(8, PER_CHANNEL, True)
    assert QuantScheme.parse("int4") == QuantScheme(4, 32, False)
    assert QuantScheme.parse("INT4-G128") == QuantScheme(4, 128, False)
    for text in SCHEMES:
        scheme = QuantScheme.parse(text)
        assert QuantScheme.parse(scheme.name) == scheme


@pytest.mark.parametrize("text", ["int3", "int4-g7", "fp8", "int8-asym", "int4-g32-g", ""])
def test_bad_scheme_strings_are_clear_errors(text):
    with pytest.raises(InvalidRequestError, match="quantization"):
        QuantScheme.parse(text)


def test_bad_scheme_fails_before_loading(checkpoint_dir):
    with pytest.raises(InvalidRequestError, match="int5"):
        LLM(checkpoint_dir("llama"), quantization="int5")


@pytest.mark.parametrize("text", SCHEMES)
def test_rtn_codes_in_range_and_error_within_half_a_step(real_weight, text):
    scheme = QuantScheme.parse(text)
    q = quantize_rtn(real_weight, scheme)
    lo, hi = (0, 15) if scheme.bits == 4 else (-127, 127)
    assert q.codes.min() >= lo and q.codes.max() <= hi
    n, k = real_weight.shape
    g = q.group_size
    assert g == (k if scheme.group_size == PER_CHANNEL else scheme.group_size)
    err = (q.dequantize() - real_weight).abs().view(n, k // g, g)
    bound = q.max_error().unsqueeze(-1)
    assert (err <= bound * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize("text", ["int4", "int4-g128", "int8", "int4-g64-sym"])
def test_rtn_parameters_are_float16_values_so_packing_stores_two_bytes(real_weight, text):
    from ember.kernels.quant_linear import pack_int4, pack_int8

    q = quantize_rtn(real_weight, QuantScheme.parse(text))
    for t in (q.scales, q.offsets):
        assert t is None or torch.equal(t.to(torch.float16).float(), t)
    g = q.group_size
    packed = pack_int4(q.codes, q.scales, q.offsets, g) if q.offsets is not None else pack_int8(q.codes, q.scales, g)
    assert packed.scales.dtype == torch.float16


@pytest.mark.parametrize("text", SCHEMES)
def test_quantized_linear_matches_float_within_the_scheme_bound(real_weight, text):
    scheme = QuantScheme.parse(text)
    n, k = real_weight.shape
    with torch.device("cpu"):
        layer = Linear(k, n)
    layer.set_method(QuantizedMethod(scheme))
    layer.load_shard("weight", real_weight)
    layer.process_weights_after_loading()
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(0))
    y = layer(x)
    reference = x @ real_weight.T
    q = quantize_rtn(real_weight, scheme)
    # |W_q - W| <= scale / 2 per element, so |y - y_ref| <= sum_k |x_k| * scale(n, k) / 2 ...
    per_element = q.max_error().repeat_interleave(q.group_size, dim=1)
    bound = x.abs() @ per_element.T
    # ... plus the kernel's own rounding (its activations carry ~16 bits): relative to sum |x||W_q|.
    bound += 1e-4 * (x.abs() @ q.dequantize().abs().T) + 1e-5
    assert ((y - reference).abs() <= bound).all()
    # And it is the dequantized weight's product, to the kernel's precision.
    exact = x @ q.dequantize().T
    assert ((y - exact).abs() <= 1e-4 * (x.abs() @ q.dequantize().abs().T) + 1e-5).all()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("text", ["int8", "int4"])
def test_tiny_models_quantized_on_load_stay_close_to_float(checkpoint_dir, family, text):
    source = resolve_model(checkpoint_dir(family))
    reference = load_model(source, torch.float32, "cpu")
    model = load_model(source, torch.float32, "cpu", QuantConfig.from_settings(text))
    untied_embedding = None if source.config.tie_word_embeddings else model.model.embed_tokens
    linears = [m for m in model.modules() if isinstance(m, Linear) and m is not untied_embedding]
    assert all(isinstance(m.method, QuantizedMethod) for m in linears)
    # The quantized model computes the model whose weights are the dequantized ones (kernel precision) ...
    dequantized = load_model(source, torch.float32, "cpu")
    for name, module in dequantized.named_modules():
        if isinstance(module, Linear):
            quantized = model.get_submodule(name)
            if isinstance(quantized.method, QuantizedMethod):
                module.weight.data.copy_(quantized.method.dequantize())
    got, exact, floats = (batch_logits(m, PROMPTS) for m in (model, dequantized, reference))
    for g, e, f in zip(got, exact, floats):
        scale = f.abs().max()
        assert (g - e).abs().max() <= 2e-3 * scale
        # ... and stays near the float model (loose: tiny random weights have no outliers to spare, and
        # Gemma's softcapped logits move most): int8 within a few %, int4 RTN within tens of %.
        assert (g - f).abs().max() <= (0.08 if text == "int8" else 0.5) * scale


def test_quantized_tied_embedding_serves_lookups_and_logits(checkpoint_dir):
    source = resolve_model(checkpoint_dir("llama"))  # tied word embeddings
    assert source.config.tie_word_embeddings
    model = load_model(source, torch.float32, "cpu", QuantConfig.from_settings("int4"))
    embed = model.model.embed_tokens
    assert isinstance(embed.method, QuantizedMethod)
    ids = torch.tensor([[0, 5, 511], [7, 7, 300]])
    table = embed.method.dequantize()
    assert torch.equal(embed(ids), table[ids])
    # lm_head_quantization=none keeps the tied table float while the layers are int4.
    float_head = load_model(source, torch.float32, "cpu", QuantConfig.from_settings("int4", "none"))
    assert isinstance(float_head.model.embed_tokens.method, UnquantizedMethod)
    assert isinstance(float_head.model.layers[0].mlp.down_proj.method, QuantizedMethod)


def test_untied_head_and_embedding_policies(checkpoint_dir):
    source = resolve_model(checkpoint_dir("qwen2"))  # untied lm_head
    assert not source.config.tie_word_embeddings
    model = load_model(source, torch.float32, "cpu", QuantConfig.from_settings("int4", "int8"))
    assert isinstance(model.model.embed_tokens.method, UnquantizedMethod)  # a lookup: stays float
    assert model.lm_head.method.segments[0].scheme == QuantScheme.parse("int8")
    assert model.model.layers[0].self_attn.qkv_proj.method.segments[0].scheme == QuantScheme.parse("int4")


@pytest.mark.parametrize("text", ["int8", "int4-g32"])
def test_engine_batch_invariance_with_quantized_weights(checkpoint_dir, text):
    folder = checkpoint_dir("llama")
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 500, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (4,), generator=g)]
    llm = LLM(folder, dtype="float32", block_size=4, max_num_batched_tokens=24, quantization=text)
    alone = [llm.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert together == alone
    assert_no_leak(llm.engine)


def test_install_quantized_replaces_a_layer(checkpoint_dir):
    from ember.quant.checkpoint import install_quantized

    source = resolve_model(checkpoint_dir("qwen3"))
    model = load_model(source, torch.float32, "cpu")
    layer = model.get_submodule("model.layers.1.self_attn.qkv_proj")
    weight = quantize_rtn(layer.weight.data, QuantScheme.parse("int4-g64"))
    install_quantized(model, {"model.layers.1.self_attn.qkv_proj": weight})
    assert isinstance(layer.method, QuantizedMethod) and "weight" not in dict(layer.named_parameters())
    x = torch.randn(3, layer.in_features)
    expected = x @ weight.dequantize().T + layer.bias if layer.bias is not None else x @ weight.dequantize().T
    assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(InvalidRequestError):
        install_quantized(model, {"model.norm": weight})


def test_quantized_weight_dequantize_matches_definition():
    codes = torch.tensor([[0, 15, 7, 8] * 4], dtype=torch.uint8)
    scales = torch.tensor([[0.5]])
    offsets = torch.tensor([[-1.0]])
    w = QuantizedWeight(QuantScheme(4, 16), codes, scales, offsets).dequantize()
    assert torch.equal(w, codes.float() * 0.5 - 1.0)
