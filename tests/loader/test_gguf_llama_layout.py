"""llama.cpp permutes Llama Q/K rows for its RoPE layout; ember must undo that. A tiny Llama written as a
GGUF the way llama.cpp's converter does gives transformers' logits for the same weights."""

from __future__ import annotations

import gguf
import numpy as np
import torch
import transformers

from ember.loader.model_loader import load_model, resolve_model
from ember.quant.config import QuantConfig
from helpers import batch_logits


def _llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q_proj/k_proj rows (written here from its description:
    each head's rows go from [first half, second half] to interleaved pairs)."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _write_gguf(model: transformers.LlamaForCausalLM, path: str) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", array.astype(np.float16))
        elif name == "model.norm.weight":
            writer.add_tensor("output_norm.weight", array)
        elif name == "lm_head.weight":
            writer.add_tensor("output.weight", array.astype(np.float16))
        else:
            layer, part = name.removeprefix("model.layers.").split(".", 1)
            module = part.rsplit(".", 1)[0]
            if module == "self_attn.q_proj":
                array = _llama_cpp_permute(array, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = _llama_cpp_permute(array, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{names[module]}.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_llama_gguf_matches_transformers(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    reference = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # round the embeddings to what the F16 tensors in the GGUF hold
        reference.model.embed_tokens.weight.copy_(reference.model.embed_tokens.weight.half().float())
        reference.lm_head.weight.copy_(reference.lm_head.weight.half().float())
    path = str(tmp_path / "tiny-llama.gguf")
    _write_gguf(reference, path)
    source = resolve_model(path)
    assert source.config.architecture == "LlamaForCausalLM" and not source.config.tie_word_embeddings
    model = load_model(source, torch.float32, "cpu", QuantConfig.from_settings("none"))
    prompts = [[5, 17, 42, 99, 3, 250, 7], [11, 12]]
    for prompt, logits in zip(prompts, batch_logits(model, prompts)):
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        assert (logits - expected).abs().max().item() <= 1e-4
