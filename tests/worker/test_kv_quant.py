"""KV-cache quantization (kv_cache_dtype int8 / fp8_e4m3): the per-vector scheme's error bounds, the paged
decode kernel and its PyTorch fallback against float attention with a bound derived from the scheme, and
engine runs on tiny checkpoints (closeness to the float cache, batch invariance, prefix caching, forks,
preemption, no leaked blocks, capacity)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from ember import LLM, SamplingParams
from ember.cli import build_parser
from ember.errors import InvalidRequestError
from ember.kernels.paged_attention import paged_attention_module, paged_decode_attention, paged_decode_attention_torch
from ember.worker.kv_cache import KV_CACHE_DTYPES, KVGroupSpec, PagedKVCache, bytes_per_block, dequantize
from helpers import assert_no_leak

SCHEMES = ["int8", "fp8_e4m3"]
needs_kernel = pytest.mark.skipif(paged_attention_module() is None, reason="kernel cannot be built here")
# A small pool keeps engine start-up fast (the block manager keeps an object per block).
SMALL_POOL = dict(dtype="float32", block_size=4, kv_cache_memory=0.01)


def _vectors(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Head vectors [..., D] with ranges over five orders of magnitude, an outlier in the first, the
    second all zero."""
    x = torch.randn(shape, generator=generator).view(-1, shape[-1])
    x *= torch.logspace(-3, 2, x.shape[0])[torch.randperm(x.shape[0], generator=generator)][:, None]
    x[0, 3] *= 50.0
    x[1] = 0.0
    return x.view(shape)


# -- the scheme ----------------------------------------------------------------------------------------


def test_int8_round_trip_is_within_half_a_scale():
    scheme = KV_CACHE_DTYPES["int8"]
    x = _vectors(torch.Generator().manual_seed(0), (7, 12, 64))
    codes, scales = scheme.quantize(x)
    assert codes.dtype == torch.int8 and scales.shape == x.shape[:-1]
    assert codes.abs().max() == 127  # each vector's absmax maps to the largest code
    error = (dequantize(codes, scales, torch.float32) - x).abs()
    assert (error <= scales[..., None] / 2 * (1 + 1e-6)).all()
    assert (dequantize(codes, scales, torch.float32).view(-1, 64)[1] == 0).all()  # a zero vector stays zero (no NaN)


def test_fp8_round_trip_is_within_the_e4m3_bound():
    scheme = KV_CACHE_DTYPES["fp8_e4m3"]
    x = _vectors(torch.Generator().manual_seed(1), (7, 12, 64))
    codes, scales = scheme.quantize(x)
    assert codes.dtype == torch.float8_e4m3fn and not codes.float().isnan().any()
    error = (dequantize(codes, scales, torch.float32) - x).abs()
    assert (error <= scheme.error_bound(x, scales) * (1 + 1e-6)).all()


def test_bad_kv_cache_dtype_is_rejected(checkpoint_dir):
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype 'int4'"):
        LLM(checkpoint_dir("llama"), kv_cache_dtype="int4")


def test_cli_flag():
    args = build_parser().parse_args(["generate", "hi", "--kv-cache-dtype", "int8"])
    assert args.kv_cache_dtype == "int8"


# -- the cache -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_reads_dequantized_blocks_and_copies_scales(kv_dtype, dtype):
    """Writes (the fused kernel where it builds) give exactly scheme.quantize's codes and scales."""
    g = torch.Generator().manual_seed(2)
    cache = PagedKVCache([KVGroupSpec("all", None, (0,), 6)], 4, 2, 16, torch.float32, "cpu", kv_dtype)
    cache.initialize_blocks(0, torch.arange(6))
    k, v = _vectors(g, (8, 2, 16)).to(dtype), torch.randn(8, 2, 16, generator=g).to(dtype)
    slots = torch.tensor([4, 5, 6, 7, 12, 13, 14, 15])  # blocks 1 and 3
    cache.write(0, slots, k, v)
    scheme = cache.scheme
    expected_k, expected_v = (dequantize(*scheme.quantize(x), torch.float32) for x in (k, v))
    keys, values = cache.gather(0, torch.tensor([[1, 3]]))
    assert torch.equal(keys[0], expected_k) and torch.equal(values[0], expected_v)
    keys, _ = cache.slice(0, 1, 1)
    assert torch.equal(keys[0], expected_k[:4])
    cache.copy_block(0, 3, 5)  # copy-on-write: codes and scales
    keys, values = cache.gather(0, torch.tensor([[5]]))
    assert torch.equal(keys[0], expected_k[4:]) and torch.equal(values[0], expected_v[4:])


def test_bytes_per_block_counts_codes_and_scales():
    # The default model (Gemma 3 270M): 1 KV head of 256 dims in bf16 -> 256 one-byte codes + a 4-byte scale.
    bf16 = bytes_per_block(16, 18, 1, 256, torch.bfloat16)
    assert bf16 == 2 * 16 * 18 * 512
    for kv_dtype in SCHEMES:
        quantized = bytes_per_block(16, 18, 1, 256, torch.bfloat16, kv_dtype)
        assert quantized == 2 * 16 * 18 * 260 and bf16 / quantized > 1.96


# -- the decode kernel and its fallback ----------------------------------------------------------------


def _attention_error_bound(scheme, q, keys, values, k_scales, v_scales, scale):  # noqa: ANN001
    """Bound on |attention(quantized K, V) - attention(K, V)| per output element of one sequence.

    q: [H, D]; keys, values: [K, Hkv, D] (the visible positions); scales: [K, Hkv]. With every key's
    element error at most bk, each score moves by at most delta = scale * max_i sum_d |q_d| bk[i, d]
    (soft-capping is 1-Lipschitz); then every softmax weight changes by a factor within exp(+-2 delta),
    so sum_i |dp_i| |v_i| <= (exp(2 delta) - 1) max_i |v_i|; value errors add at most max_i bv[i].
    """
    heads, kv_heads = q.shape[0], keys.shape[1]
    bk = scheme.error_bound(keys, k_scales)  # [K, Hkv, D]
    bv = scheme.error_bound(values, v_scales)
    kv_head = torch.arange(heads) // (heads // kv_heads)
    delta = scale * torch.einsum("hd,khd->hk", q.abs(), bk[:, kv_head]).amax(-1)  # [H]
    spread = (torch.exp(2 * delta) - 1)[:, None] * values.abs().amax(0)[kv_head]
    return bv.amax(0)[kv_head] + spread  # [H, D]


@pytest.mark.parametrize("kv_dtype", SCHEMES)
@pytest.mark.parametrize("heads, kv_heads, window, softcap", [(4, 1, None, None), (8, 2, 5, None), (4, 4, None, 20.0)])
def test_quantized_decode_attention_is_within_the_scheme_bound(kv_dtype, heads, kv_heads, window, softcap):
    g = torch.Generator().manual_seed(heads + kv_heads)
    scheme = KV_CACHE_DTYPES[kv_dtype]
    block_size, dim, num_blocks, scale = 4, 32, 40, 0.2
    k_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g) * 2
    v_pool = _vectors(g, (num_blocks, block_size, kv_heads, dim))
    (k_codes, k_scales), (v_codes, v_scales) = scheme.quantize(k_pool), scheme.quantize(v_pool)
    ends = [13, 1, 8, 37]
    tables = [torch.randperm(num_blocks - 1, generator=g)[: -(-e // block_size)].add(1).tolist() for e in ends]
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    starts = [max(0, e - window) if window else 0 for e in ends]
    q = torch.randn(len(ends), heads, dim, generator=g)
    ranges = torch.tensor(starts), torch.tensor(ends)
    exact = paged_decode_attention_torch(q, k_pool, v_pool, padded, *ranges, scale, softcap)
    quantized = (q, k_codes, v_codes, padded, *ranges, scale, softcap, k_scales, v_scales)
    fallback = paged_decode_attention_torch(*quantized)
    for b, (start, end) in enumerate(zip(starts, ends)):
        positions = torch.arange(start, end)
        rows = torch.tensor(tables[b])[positions // block_size], positions % block_size
        bound = _attention_error_bound(scheme, q[b], k_pool[rows], v_pool[rows], k_scales[rows], v_scales[rows], scale)
        assert ((fallback[b] - exact[b]).abs() <= bound + 1e-5).all()
    if paged_attention_module() is not None:
        kernel = paged_decode_attention(*quantized)
        assert torch.allclose(kernel, fallback, atol=1e-5, rtol=1e-5)  # same math, summation order aside
        bf16 = paged_decode_attention(q.bfloat16(), *quantized[1:])  # bfloat16 queries read the same codes
        assert torch.allclose(bf16.float(), paged_decode_attention_torch(q.bfloat16(), *quantized[1:]).float(), atol=1e-2)


@needs_kernel
def test_kernel_decodes_every_fp8_code():
    """One visible position: the output is that position's value vector, i.e. the decoded codes."""
    bits = torch.arange(256, dtype=torch.int32)
    bits[(bits & 0x7F) == 0x7F] = 0  # the two NaN codes, never written by the quantizer
    codes = torch.zeros(2, 1, 1, 256, dtype=torch.uint8)
    codes[1, 0, 0] = bits.to(torch.uint8)
    codes = codes.view(torch.float8_e4m3fn)
    ones = torch.ones(2, 1, 1)
    q = torch.randn(1, 1, 256)
    args = (q, codes, codes, torch.tensor([[1]]), torch.tensor([0]), torch.tensor([1]), 1.0, None, ones, ones)
    assert torch.equal(paged_decode_attention(*args)[0, 0], codes[1, 0, 0].float())


# -- the engine ----------------------------------------------------------------------------------------


def _prompts(count: int, seed: int, low: int = 4, high: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(4, 500, (n,), generator=g).tolist() for n in lengths]


def _tokens(outputs) -> list[list[int]]:  # noqa: ANN001
    return [o.outputs[0].token_ids for o in outputs]


# Observed on these checkpoints: |d logprob| <= 0.01 (int8) and <= 0.03 (fp8) while the tokens agree.
# int8 rounds each element by at most 1/254 of its vector's absmax; e4m3 by up to 1/16 of the element, so
# fp8 gets the looser bound. Both are several times the observed error, far below a change of greedy pick
# (except at near ties, which the test allows).
LOGPROB_TOLERANCE = {"int8": 0.05, "fp8_e4m3": 0.15}


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: a sliding-window group too
def test_quantized_cache_tracks_the_float_cache(checkpoint_dir, family):
    """Greedy decoding with a quantized cache picks the float cache's tokens, with close logprobs; the
    two may only part at a near tie of the float run (tiny random models have many)."""
    folder = checkpoint_dir(family)
    prompts = _prompts(4, seed=0)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    reference = LLM(folder, **SMALL_POOL).generate(prompts, params, use_tqdm=False)
    for kv_dtype, tolerance in LOGPROB_TOLERANCE.items():
        llm = LLM(folder, **SMALL_POOL, kv_cache_dtype=kv_dtype)
        got = llm.generate(prompts, params, use_tqdm=False)
        agreeing = 0
        for ref, out in zip(reference, got):
            ref, out = ref.outputs[0], out.outputs[0]
            for step, (a, b) in enumerate(zip(ref.token_ids, out.token_ids)):
                ref_lp, out_lp = ref.logprobs[step], out.logprobs[step]
                if a != b:
                    assert b in ref_lp and ref_lp[a].logprob - ref_lp[b].logprob <= 2 * tolerance
                    break
                assert abs(ref_lp[a].logprob - out_lp[a].logprob) <= tolerance
                agreeing += 1
        if family == "llama":  # no near ties on this one: every token agrees
            assert agreeing == 4 * 16
        assert_no_leak(llm.engine)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_int8_batch_invariance_with_chunked_prefill(checkpoint_dir, family):
    folder = checkpoint_dir(family)
    prompts = _prompts(8, seed=3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone_llm = LLM(folder, **SMALL_POOL, kv_cache_dtype="int8")
    alone = [_tokens(alone_llm.generate([p], params, use_tqdm=False))[0] for p in prompts]
    llm = LLM(folder, **SMALL_POOL, kv_cache_dtype="int8", max_num_batched_tokens=24)
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == alone
    assert_no_leak(llm.engine)


def test_int8_prefix_cache_hit_equals_miss(checkpoint_dir):
    folder = checkpoint_dir("gemma3")  # its sliding-window group drops blocks out of the window
    shared = _prompts(1, seed=5, low=50, high=51)[0]
    prompts = [shared + tail for tail in ([7, 8, 9], [10, 11], [12])]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    cold = LLM(folder, **SMALL_POOL, kv_cache_dtype="int8", enable_prefix_caching=False)
    expected = _tokens(cold.generate(prompts, params, use_tqdm=False))
    warm = LLM(folder, **SMALL_POOL, kv_cache_dtype="int8")
    warm.generate([shared], params, use_tqdm=False)
    hits_before = warm.engine.kv_manager.stats.hits
    assert [_tokens(warm.generate([p], params, use_tqdm=False))[0] for p in prompts] == expected
    assert warm.engine.kv_manager.stats.hits - hits_before >= 3 * 48
    assert_no_leak(warm.engine)


def test_int8_forks_and_preemption(checkpoint_dir):
    """n > 1 siblings share, then copy, a partly filled quantized block; a tiny pool forces preemption."""
    folder = checkpoint_dir("llama")
    prompt = _prompts(1, seed=9, low=22, high=23)[0]  # 22 tokens: a partly filled last block to copy
    llm = LLM(folder, **SMALL_POOL, kv_cache_dtype="int8")
    forked = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True), use_tqdm=False)
    separate = [
        _tokens(llm.generate([prompt], SamplingParams(temperature=1.0, seed=5 + i, max_tokens=10, ignore_eos=True), use_tqdm=False))[0]
        for i in range(3)
    ]
    assert [c.token_ids for c in forked[0].outputs] == separate
    assert_no_leak(llm.engine)

    prompts = _prompts(6, seed=2, low=10, high=30)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = _tokens(llm.generate(prompts, params, use_tqdm=False))
    tiny = LLM(folder, dtype="float32", block_size=4, kv_cache_tokens=64, kv_cache_dtype="int8")
    assert _tokens(tiny.generate(prompts, params, use_tqdm=False)) == expected
    assert tiny.engine.scheduler.num_preemptions > 0
    assert_no_leak(tiny.engine)


def test_quantized_cache_holds_more_tokens_in_the_same_memory(checkpoint_dir, caplog):
    # head_dim 16: 32 bf16 bytes per head vector vs 16 codes + a 4-byte scale (the default model's 256
    # dims make that 512 vs 260 bytes, see test_bytes_per_block_counts_codes_and_scales).
    folder = checkpoint_dir("llama")
    settings = dict(dtype="bfloat16", block_size=16, kv_cache_memory=0.02)
    auto = LLM(folder, **settings).engine.kv_manager.capacity_tokens
    with caplog.at_level(logging.INFO, logger="ember"):
        int8 = LLM(folder, **settings, kv_cache_dtype="int8").engine.kv_manager.capacity_tokens
    assert math.isclose(int8 / auto, 32 / 20, rel_tol=0.01)
    assert f"KV cache holds {int8} tokens as torch.int8" in caplog.text
