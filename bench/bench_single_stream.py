#!/usr/bin/env python
"""Single-stream CPU benchmark of ember against llama.cpp and transformers on the default model.

Measures, for each engine in its own subprocess (run one after the other, so they never share the
cores, and so that environment variables are set before torch is imported):

- decode tok/s: a `--prompt-tokens` prompt, `--decode-tokens` new tokens, greedy, EOS ignored;
  decode = (t_N - t_1) / (N - 1), where t_1 is the time to the first token (TTFT);
- prefill tok/s: `--prefill-tokens` / (time to the first token of a `--prefill-tokens` prompt).

Every measurement is one warm-up and then the best of `--repeats`. All engines get the same prompt
token ids (from ember's tokenizer, BOS first) and the same environment (OMP_WAIT_POLICY=ACTIVE).

    python bench/bench_single_stream.py                       # all engines, one markdown table
    python bench/bench_single_stream.py --engines ember-bf16,llama.cpp --repeats 5 --out results.json
    python bench/bench_single_stream.py --profile              # where ember bf16 decode time goes: the roofline report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Protocol

ENGINES = ("ember-gguf", "ember-bf16", "ember-fp32", "llama.cpp", "hf-bf16", "hf-fp32")
BASELINE = "llama.cpp"
RESULT_PREFIX = "BENCH_RESULT "
PROFILE_STEPS = 32

# Any fixed English text works: it is only turned into token ids (repeated when a prompt needs more).
PROMPT_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening just before sunset, carrying a "
    "small brass lamp and a notebook in which he wrote down the color of the sky, the direction of the "
    "wind and the ships he could see on the horizon. Over the years the notebook grew into a shelf of "
    "notebooks, and the shelf into a small library that visitors from the village came to read on "
    "rainy afternoons. Some of them looked for the day they were born, others for the storm that had "
    "taken a boat from their family, and a few simply liked the calm handwriting and the short, exact "
    "sentences about clouds. When the keeper grew too old for the stairs, a girl from the harbor "
    "offered to carry the lamp for him, and he taught her how to read the weather from the shape of "
    "the waves, how to trim the wick so the flame would not smoke, and how to write a line that says "
    "only what was seen. "
)


class Runner(Protocol):
    """An engine under test: greedy generation of exactly `n` tokens after `prompt`, EOS ignored."""

    def generate(self, prompt: list[int], n: int) -> list[int]: ...


@dataclass
class Result:
    engine: str
    decode_tok_s: float | None  # None when t_N <= t_1 (only under heavy noise)
    ttft_ms: float
    prefill_tok_s: float
    decode_tokens: int
    prompt_tokens: int
    prefill_tokens: int
    load_s: float
    first_tokens: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Engines (each constructed only inside its child process)
# ---------------------------------------------------------------------------------------------------


class EmberRunner:
    def __init__(self, dtype: str, kv_cache_dtype: str = "auto", quantization: str = "none") -> None:
        from ember import LLM, SamplingParams  # before torch: ember sets OMP_WAIT_POLICY at import

        self._params = SamplingParams
        # Prefix caching off: repeats of the same prompt would otherwise skip the prefill being measured.
        self.llm = LLM(
            dtype=dtype, enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype, quantization=quantization
        )

    def generate(self, prompt: list[int], n: int) -> list[int]:
        params = self._params(temperature=0, max_tokens=n, ignore_eos=True)
        outputs = self.llm.generate([prompt], params, use_tqdm=False)
        return list(outputs[0].outputs[0].token_ids)


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's low-level loop: eval the prompt, then one token at a time."""

    def __init__(self, model_path: str, n_ctx: int) -> None:
        import llama_cpp
        import numpy as np

        self._np = np
        self._get_logits = llama_cpp.llama_get_logits_ith
        self.llm = llama_cpp.Llama(
            model_path,
            n_threads=2,
            n_threads_batch=2,
            n_ctx=n_ctx,
            n_batch=512,
            flash_attn=True,  # a bool in 0.3.x, mapped to LLAMA_FLASH_ATTN_TYPE_ENABLED
            verbose=False,
        )
        self._n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        logits = self._np.ctypeslib.as_array(self._get_logits(self.llm.ctx, -1), shape=(self._n_vocab,))
        return int(logits.argmax())

    def generate(self, prompt: list[int], n: int) -> list[int]:
        self.llm.reset()  # n_tokens = 0; eval() then drops every cached position >= 0 (fresh KV cache)
        self.llm.eval(prompt)
        tokens = [self._argmax()]
        while len(tokens) < n:  # EOS is never checked: exactly n tokens
            self.llm.eval([tokens[-1]])
            tokens.append(self._argmax())
        return tokens


class HFRunner:
    def __init__(self, model_path: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(2)
        self._torch = torch
        folder, name = os.path.split(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype)).eval()

    def generate(self, prompt: list[int], n: int) -> list[int]:
        torch = self._torch
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                top_p=None,
                top_k=None,
                pad_token_id=0,
            )
        return out[0, len(prompt) :].tolist()


def make_runner(engine: str, model_path: str, n_ctx: int, kv_cache_dtype: str = "auto") -> Runner:
    if engine == "ember-bf16":  # the GGUF dequantized to bfloat16
        return EmberRunner("bfloat16", kv_cache_dtype)
    if engine == "ember-gguf":  # the GGUF's Q4_K/Q5_0/Q6_K/Q8_0 weights kept quantized (ember's default)
        return EmberRunner("bfloat16", kv_cache_dtype, quantization="auto")
    if engine == "ember-fp32":
        return EmberRunner("float32", kv_cache_dtype)
    if engine == "llama.cpp":
        return LlamaCppRunner(model_path, n_ctx)
    if engine == "hf-bf16":
        return HFRunner(model_path, "bfloat16")
    if engine == "hf-fp32":
        return HFRunner(model_path, "float32")
    raise ValueError(f"unknown engine {engine!r}")


# ---------------------------------------------------------------------------------------------------
# Measurement (child side)
# ---------------------------------------------------------------------------------------------------


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """One warm-up call, then the fastest of `repeats` timed calls (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def generate_checked(runner: Runner, prompt: list[int], n: int) -> list[int]:
    tokens = runner.generate(prompt, n)
    if len(tokens) != n:
        raise RuntimeError(f"asked for {n} tokens, got {len(tokens)}")
    return tokens


def measure(engine: str, runner: Runner, prompt: list[int], prefill: list[int], n: int, repeats: int) -> Result:
    first_tokens = generate_checked(runner, prompt, min(n, 16))
    ttft = best_time(lambda: generate_checked(runner, prompt, 1), repeats)
    full = best_time(lambda: generate_checked(runner, prompt, n), repeats)
    prefill_s = best_time(lambda: generate_checked(runner, prefill, 1), repeats)
    return Result(
        engine=engine,
        decode_tok_s=(n - 1) / (full - ttft) if full > ttft else None,
        ttft_ms=ttft * 1e3,
        prefill_tok_s=len(prefill) / prefill_s,
        decode_tokens=n,
        prompt_tokens=len(prompt),
        prefill_tokens=len(prefill),
        load_s=0.0,
        first_tokens=first_tokens,
    )


def child_main(engine: str, prompts_file: str, decode_tokens: int, repeats: int, kv_cache_dtype: str = "auto") -> None:
    with open(prompts_file) as f:
        spec = json.load(f)
    n_ctx = max(1024, len(spec["prefill"]) + 8, len(spec["prompt"]) + decode_tokens + 8)
    start = time.perf_counter()
    runner = make_runner(engine, spec["model"], n_ctx, kv_cache_dtype)
    load_s = time.perf_counter() - start
    result = measure(engine, runner, spec["prompt"], spec["prefill"], decode_tokens, repeats)
    result.load_s = load_s
    if engine.startswith("ember") and kv_cache_dtype != "auto":
        result.engine += f" (KV {kv_cache_dtype})"
    print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)


# ---------------------------------------------------------------------------------------------------
# Profile of ember bf16 decode (child side)
# ---------------------------------------------------------------------------------------------------


def profile_child(prompts_file: str) -> None:
    """Decode steps of ember bf16, timed whole and then phase by phase (ember.benchmarks.step_profile),
    against the machine's measured ceilings (the roofline report of `ember bench`)."""
    from ember import LLM, SamplingParams
    from ember.benchmarks.ceilings import machine_ceilings
    from ember.benchmarks.roofline import ModelCost, build_report, report_table
    from ember.benchmarks.step_profile import StepProfiler

    with open(prompts_file) as f:
        prompt = json.load(f)["prompt"]
    llm = LLM(dtype="bfloat16")
    engine = llm.engine
    warmup = 8
    params = SamplingParams(temperature=0, max_tokens=2 * PROFILE_STEPS + warmup + 2, ignore_eos=True)
    engine.add_request("profile", prompt, params)
    for _ in range(1 + warmup):  # prefill, then a few decode steps
        engine.step()
    with StepProfiler(engine, detailed=False) as timed:
        for _ in range(PROFILE_STEPS):
            engine.step()
    with StepProfiler(engine) as profiler:
        for _ in range(PROFILE_STEPS):
            engine.step()
    engine.abort_request("profile")
    roofline = build_report(profiler.records, ModelCost.of_engine(engine), machine_ceilings(engine.runner.device),
                            engine.runner.model.dtype, timed.mean_step_ms())  # fmt: skip
    report = {"engine": "ember-bf16", "steps": PROFILE_STEPS, "roofline": roofline.to_dict(), "table": report_table(roofline)}
    print(RESULT_PREFIX + json.dumps(report), flush=True)


# ---------------------------------------------------------------------------------------------------
# Parent: prompts, subprocesses, tables
# ---------------------------------------------------------------------------------------------------


def make_prompt(tokenizer: Any, length: int) -> list[int]:
    """Exactly `length` token ids of PROMPT_TEXT (repeated as needed), BOS first."""
    text = PROMPT_TEXT
    while True:
        ids = tokenizer.encode(text)
        if tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
            ids = [tokenizer.bos_token_id] + ids
        if len(ids) >= length:
            return ids[:length]
        text += PROMPT_TEXT


def write_prompts(prompt_tokens: int, prefill_tokens: int, model: str | None = None) -> str:
    from ember.model_zoo import default_model_path
    from ember.tokenizer import Tokenizer

    model = model or default_model_path()
    tokenizer = Tokenizer.from_pretrained(model)
    spec = {
        "model": model,
        "prompt": make_prompt(tokenizer, prompt_tokens),
        "prefill": make_prompt(tokenizer, prefill_tokens),
    }
    fd, path = tempfile.mkstemp(prefix="ember_bench_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    return path


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # the same for every engine (llama.cpp's ggml uses OpenMP too)
    return env


def run_child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", *args], capture_output=True, text=True, env=child_env()
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-20:])
    raise RuntimeError(f"child {args[0]} failed (exit {proc.returncode}):\n{tail}")


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "llama-cpp-python": package_version("llama_cpp_python"),
        "ember": package_version("ember"),
        "OMP_WAIT_POLICY": child_env()["OMP_WAIT_POLICY"],
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "-"


def results_table(results: Sequence[dict[str, Any]]) -> str:
    first = results[0]
    n, p, pre = first["decode_tokens"], first["prompt_tokens"], first["prefill_tokens"]
    base = next((r for r in results if r["engine"] == BASELINE), None)
    lines = [
        f"| engine | decode tok/s | TTFT ms ({p}-tok prompt) | prefill tok/s ({pre}) "
        f"| decode vs {BASELINE} | prefill vs {BASELINE} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['engine']} | {fmt(r['decode_tok_s'])} | {r['ttft_ms']:.1f} | {r['prefill_tok_s']:.1f} "
            f"| {ratio(r['decode_tok_s'], base and base['decode_tok_s'])} "
            f"| {ratio(r['prefill_tok_s'], base and base['prefill_tok_s'])} |"
        )
    return "\n".join(lines) + f"\n\ndecode: {n} new tokens, time of the {n - 1} after the first; best of repeats."


def agreement_note(results: Sequence[dict[str, Any]]) -> str:
    """Greedy outputs should agree at least at the start; different dtypes/kernels may diverge later."""
    heads = {r["engine"]: r["first_tokens"] for r in results}
    ref_engine, ref = next(iter(heads.items()))
    notes = []
    for engine, tokens in heads.items():
        same = next((i for i, (a, b) in enumerate(zip(ref, tokens)) if a != b), min(len(ref), len(tokens)))
        notes.append(f"{engine}: {same}/{len(tokens)}")
    return f"greedy tokens matching {ref_engine} (first {len(ref)}): " + ", ".join(notes)


def profile_table(p: dict[str, Any]) -> str:
    return f"ember bf16 decode, {p['steps']} steps\n\n{p['table']}"


def print_machine(info: dict[str, Any]) -> None:
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if info["load_avg_1min"] > 0.5:
        print("warning: the machine is not idle; other processes skew the numbers (torch engines most)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--model", default=None, help="GGUF file (default: Gemma 3 270M Q4_K_M)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (best is kept)")
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--out", help="write results (and machine info) to this JSON file")
    parser.add_argument("--profile", action="store_true", help="only profile ember bf16 decode")
    parser.add_argument("--kv-cache-dtype", default="auto", help="ember's KV cache storage: auto, int8 or fp8_e4m3")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        if args.profile:
            profile_child(args.prompts_file)
        else:
            child_main(args.child, args.prompts_file, args.decode_tokens, args.repeats, args.kv_cache_dtype)
        return

    engines = ["ember-bf16"] if args.profile else [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        sys.exit(f"unknown engine(s): {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    if args.decode_tokens < 2:
        sys.exit("--decode-tokens must be at least 2")
    info = machine_info()
    print_machine(info)
    prompts_file = write_prompts(args.prompt_tokens, args.prefill_tokens, args.model)
    try:
        if args.profile:
            report = run_child(["ember-bf16", "--profile", "--prompts-file", prompts_file])
            print(profile_table(report))
            output: dict[str, Any] = {"machine": info, "profile": report}
        else:
            results = run_engines(engines, args, prompts_file)
            print(results_table(results))
            print(agreement_note(results))
            output = {"machine": info, "results": results}
    finally:
        os.unlink(prompts_file)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(output, f, indent=2)
        print(f"wrote {args.out}")


def run_engines(engines: Sequence[str], args: argparse.Namespace, prompts_file: str) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    results = []
    with tqdm(engines, desc="engines", unit="engine") as bar:
        for engine in bar:
            bar.set_postfix_str(engine)
            child_args = [engine, "--prompts-file", prompts_file, "--repeats", str(args.repeats)]
            child_args += ["--decode-tokens", str(args.decode_tokens), "--kv-cache-dtype", args.kv_cache_dtype]
            results.append(run_child(child_args))
    return results


if __name__ == "__main__":
    main()
