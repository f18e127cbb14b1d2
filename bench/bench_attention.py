"""Micro-benchmark of one attention layer of a step whose sequences have short query blocks.

Times `ForwardBatch.attention` (cache write included) for B sequences with q_len new queries each over a
C-token cache, through the paged kernel in one call ("batched") against today's per-sequence path in the
same run ("per-seq": decode rows in the kernel, every multi-query sequence its own gather/slice + mask +
SDPA, i.e. ForwardBatch.max_paged_queries = 1). Decode (q_len 1) is also timed against the decode-only kernel of an
earlier commit (built from `git show REV:ember/kernels/paged_attention.cpp`), which must not be faster;
"max diff" is the largest difference between their outputs (the new kernel's vector exp differs from
std::exp by < 1 ulp).

    .venv/bin/python bench/bench_attention.py                       # the BENCHMARKS.md table
    .venv/bin/python bench/bench_attention.py --sweep               # q_len crossover vs SDPA
    .venv/bin/python bench/bench_attention.py --contexts 512 --kv-cache-dtype int8 --quick

The CPU may be shared: each cell is the best of --repeats rounds, the variants alternating inside a round.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import time
from collections.abc import Callable
from types import ModuleType

import ember  # noqa: F401  (OpenMP wait policy before torch loads)
import torch

from ember.kernels.paged_attention import paged_attention_module
from ember.worker.batch import ForwardBatch
from ember.worker.kv_cache import KVGroupSpec, PagedKVCache

HEADS = {  # name: (query heads, kv heads, head_dim)
    "gemma3-270m": (4, 1, 256),
    "qwen2.5-1.5b": (12, 2, 128),
}
BLOCK_SIZE = 16
# The decode-only kernel before short query blocks (the last commit that changed it).
BASELINE_REV = "37761e4"


def old_kernel(rev: str) -> ModuleType:
    """The paged decode kernel as of `rev`, built once into its own cache directory."""
    from torch.utils.cpp_extension import load

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(
        ["git", "show", f"{rev}:ember/kernels/paged_attention.cpp"], cwd=root, check=True, capture_output=True
    ).stdout
    digest = hashlib.sha256(source).hexdigest()[:12]
    build_dir = os.path.expanduser(f"~/.cache/ember/kernels/bench-paged-attention-{digest}")
    os.makedirs(build_dir, exist_ok=True)
    path = os.path.join(build_dir, "paged_attention_old.cpp")
    with open(path, "wb") as f:
        f.write(source)
    return load(
        name=f"ember_paged_attention_{digest}",
        sources=[path],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=build_dir,
    )


class Step:
    """A cache of B sequences with `context` tokens each and a step adding `q_len` tokens to each."""

    def __init__(self, heads: tuple[int, int, int], batch: int, q_len: int, context: int, dtype: torch.dtype,
                 kv_cache_dtype: str, shuffled: bool) -> None:
        self.heads, self.kv_heads, self.dim = heads
        end = context + q_len
        per_seq = -(-end // BLOCK_SIZE)
        num_blocks = batch * per_seq + 1
        self.cache = PagedKVCache(
            [KVGroupSpec("all", None, (0,), num_blocks)], BLOCK_SIZE, self.kv_heads, self.dim, dtype, "cpu", kv_cache_dtype
        )
        g = torch.Generator().manual_seed(0)
        ids = torch.randperm(num_blocks - 1, generator=g) + 1 if shuffled else torch.arange(1, num_blocks)
        self.tables = [ids[b * per_seq : (b + 1) * per_seq].tolist() for b in range(batch)]
        self.batch, self.q_len, self.context = batch, q_len, context
        tokens = batch * q_len
        self.q = torch.randn(tokens, self.heads, self.dim, generator=g).to(dtype)
        self.k = torch.randn(tokens, self.kv_heads, self.dim, generator=g).to(dtype)
        self.v = torch.randn(tokens, self.kv_heads, self.dim, generator=g).to(dtype)
        self.forward_batch()  # zeroes the blocks on first use; then fill them
        cache = self.cache
        for pool, scales in ((cache.keys[0], cache.key_scales[0]), (cache.values[0], cache.value_scales[0])):
            values = torch.randn(pool.shape, generator=g)
            if scales is None:
                pool.copy_(values)
            else:
                codes, new_scales = self.cache.scheme.quantize(values)
                pool.view(torch.uint8).copy_(codes.view(torch.uint8))
                scales.copy_(new_scales)

    def forward_batch(self, max_paged_queries: int | None = None) -> ForwardBatch:
        tokens = self.batch * self.q_len
        positions = [p for _ in range(self.batch) for p in range(self.context, self.context + self.q_len)]
        return ForwardBatch(
            input_ids=torch.zeros(tokens, dtype=torch.long),
            positions=torch.tensor(positions),
            start_positions=[self.context] * self.batch,
            query_lens=[self.q_len] * self.batch,
            block_tables=[self.tables],
            logits_indices=torch.arange(tokens),
            kv_cache=self.cache,
            max_paged_queries=max_paged_queries,
        )

    def layer(self, max_paged_queries: int | None) -> Callable[[], torch.Tensor]:
        """One layer's attention, routed with this max_paged_queries (metadata built once, as per step)."""
        fb = self.forward_batch(max_paged_queries)
        return lambda: fb.attention(0, self.q, self.k, self.v, self.dim**-0.5, None, None)

    def decode_args(self) -> tuple:
        """Arguments of the old decode kernel for this step's last query of each sequence (q_len 1)."""
        assert self.q_len == 1
        cache = self.cache
        tables = torch.tensor(self.tables)
        end = torch.full((self.batch,), self.context + 1)
        return (self.q, cache.keys[0], cache.values[0], tables, torch.zeros_like(end), end, self.dim**-0.5, 0.0,
                cache.key_scales[0], cache.value_scales[0])


def race(fns: dict[str, Callable[[], object]], repeats: int, budget_s: float) -> dict[str, float]:
    """Best ms per call of each function; the functions alternate inside every round."""
    iters = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        iters[name] = max(1, int(budget_s / max(time.perf_counter() - t0, 1e-6)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / iters[name])
    return {name: t * 1e3 for name, t in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(HEADS))
    parser.add_argument("--contexts", default="512,2048")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--q-len", type=int, default=5, help="queries per sequence (k drafts + 1)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8_e4m3"])
    parser.add_argument("--shuffled", action="store_true", help="random block ids (default: consecutive per sequence, "
                        "where today's path slices instead of gathering)")
    parser.add_argument("--sweep", action="store_true", help="q_len 2..64 (1 and --batch sequences): kernel vs SDPA")
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.2, help="seconds per timed round and variant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.budget = 2, 0.05
    dtype = getattr(torch, args.dtype)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, {args.dtype}, "
          f"kv {args.kv_cache_dtype}, {'shuffled' if args.shuffled else 'consecutive'} blocks, best of {args.repeats}")
    models = args.models.split(",")
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.sweep:
        sweep(models, contexts, args, dtype)
        return
    old, new = old_kernel(args.baseline_rev), paged_attention_module()
    print("| model (H/Hkv/D) | context | B x q_len | per-seq ms | batched ms | speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    for model in models:
        for context in contexts:
            step = Step(HEADS[model], args.batch, args.q_len, context, dtype, args.kv_cache_dtype, args.shuffled)
            paths = {"old": step.layer(1), "new": step.layer(None)}
            times = race(paths, args.repeats, args.budget)
            print(f"| {model} ({'/'.join(map(str, HEADS[model]))}) | {context} | {args.batch} x {args.q_len} | "
                  f"{times['old']:.3f} | {times['new']:.3f} | {times['old'] / times['new']:.2f}x |", flush=True)
    print()
    print("| model | context | B (q_len 1) | old decode kernel ms | new kernel ms | new/old | max diff |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for model in models:
        for context in contexts:
            for batch in (1, args.batch):
                step = Step(HEADS[model], batch, 1, context, dtype, args.kv_cache_dtype, args.shuffled)
                decode = step.decode_args()
                general = (*decode[:4], torch.arange(batch + 1), *decode[4:7], 0, *decode[7:])
                fns = {"old": lambda: old.paged_decode_attention(*decode), "new": lambda: new.paged_attention(*general)}
                times = race(fns, args.repeats, args.budget)
                diff = (old.paged_decode_attention(*decode).float() - fns["new"]().float()).abs().max()
                print(f"| {model} | {context} | {batch} | {times['old']:.3f} | {times['new']:.3f} | "
                      f"{times['new'] / times['old']:.2f} | {diff:.1e} |", flush=True)


def sweep(models: list[str], contexts: list[int], args: argparse.Namespace, dtype: torch.dtype) -> None:
    """Where SDPA (per sequence) overtakes the kernel as q_len grows."""
    print("| model | context | B | q_len | per-seq SDPA ms | kernel ms | kernel/SDPA |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model in models:
        for context in contexts:
            for batch in (1, args.batch):
                for q_len in (2, 5, 9, 17, 32, 64):
                    step = Step(HEADS[model], batch, q_len, context, dtype, args.kv_cache_dtype, args.shuffled)
                    times = race({"sdpa": step.layer(1), "kernel": step.layer(None)}, args.repeats, args.budget)
                    print(f"| {model} | {context} | {batch} | {q_len} | {times['sdpa']:.3f} | {times['kernel']:.3f} | "
                          f"{times['kernel'] / times['sdpa']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
