#!/usr/bin/env python
"""Quantization table: every weight / KV scheme on one model, quality and speed, with llama.cpp on the same
GGUF measured in the same run.

For each scheme (a row), in its own subprocess so rows never share memory or warm caches:
- weight bytes: the model's parameters and buffers as loaded (packed codes + scales for quantized layers);
- quality: `ember eval kld` against a saved reference (the GGUF dequantized to bfloat16, the `bf16` row):
  token perplexity on PTB test (--ctx, --max-tokens), Δppl vs the reference, mean KLD and top-1 agreement;
- speed: single-stream greedy decode tok/s (--prompt-tokens prompt, --decode-tokens new, best of --repeats),
  prefill tok/s of a --prefill-tokens prompt (best of --repeats), and output tok/s of --num-prompts requests
  of --io-len prompt + --io-len output tokens submitted together (continuous batching).
Calibrated schemes (GPTQ, AWQ) are made first with `ember quantize` into --work-dir (reused if present).
llama.cpp: perplexity with the same windows and token ids (`ember eval perplexity --engine llama.cpp`),
decode/prefill with bench_single_stream.py's runner, batch throughput with bench_throughput.py.

    python bench/bench_quant.py --out quant.json                        # the default model, every row
    python bench/bench_quant.py --rows bf16,gguf,int8 --max-tokens 4096  # a quick subset
    python bench/bench_quant.py --model qwen1.5b.gguf --rows bf16,gguf,int8,int4-g32,gptq-g128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import ember  # noqa: E402,F401  (OpenMP wait policy before torch)

# name -> (engine settings, how to make it). "quantize" rows load a checkpoint made by `ember quantize`.
ROWS: dict[str, dict[str, Any]] = {
    "bf16": {"quantization": "none"},
    "gguf": {"quantization": "auto"},
    "gguf+kv-int8": {"quantization": "auto", "kv_cache_dtype": "int8"},
    "gguf+kv-fp8": {"quantization": "auto", "kv_cache_dtype": "fp8_e4m3"},
    "int8": {"quantization": "int8", "lm_head_quantization": "int8"},
    "int8 (head bf16)": {"quantization": "int8", "lm_head_quantization": "none"},
    "int4-g32": {"quantization": "int4-g32", "lm_head_quantization": "int4-g32"},
    "int4-g32 (head bf16)": {"quantization": "int4-g32", "lm_head_quantization": "none"},
    "int4-g128": {"quantization": "int4-g128", "lm_head_quantization": "int4-g128"},
    "int4-g128 (head int8)": {"quantization": "int4-g128", "lm_head_quantization": "int8"},
    # Calibrated checkpoints (`ember quantize`, layers only: GPTQ over the 262k x 640 head is the slow part),
    # loaded as saved or with the head RTN-quantized on load.
    "gptq-g128 (head bf16)": {"checkpoint": "gptq-g128", "quantize": ["--method", "gptq", "--bits", "4", "--group-size", "128"]},
    "gptq-g128 (head int8)": {"checkpoint": "gptq-g128", "lm_head_quantization": "int8"},
    "awq-g128 (head bf16)": {"checkpoint": "awq-g128", "quantize": ["--method", "awq", "--bits", "4", "--group-size", "128"]},
    "awq-g128 (head int8)": {"checkpoint": "awq-g128", "lm_head_quantization": "int8"},
    "gptq-g32 (head bf16)": {"checkpoint": "gptq-g32", "quantize": ["--method", "gptq", "--bits", "4", "--group-size", "32"]},
    "gptq-g32 (head int8)": {"checkpoint": "gptq-g32", "lm_head_quantization": "int8"},
    "gptq-g32 (head int4)": {"checkpoint": "gptq-g32", "lm_head_quantization": "int4-g32"},
    "awq-g32 (head bf16)": {"checkpoint": "awq-g32", "quantize": ["--method", "awq", "--bits", "4", "--group-size", "32"]},
    "awq-g32 (head int8)": {"checkpoint": "awq-g32", "lm_head_quantization": "int8"},
    "awq-g32 (head int4)": {"checkpoint": "awq-g32", "lm_head_quantization": "int4-g32"},
}


def model_weight_bytes(model: Any) -> int:
    """Bytes of every weight as held in memory: float parameters, plus the packed codes and scales of
    quantized layers (kept by their per-layer method, not as parameters); a tied table counts once."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    for module in model.modules():
        for segment in getattr(getattr(module, "method", None), "segments", None) or []:
            if segment.packed is not None:
                seen[id(segment.packed)] = segment.packed.nbytes()
            elif segment.weight is not None:
                seen[id(segment.weight)] = segment.weight.numel() * segment.weight.element_size()
    return sum(seen.values())


def child(row: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Load one scheme and measure its speed (quality comes from `ember eval kld` in another process)."""
    import torch

    from ember import LLM, SamplingParams
    from ember.benchmark import random_requests, run_throughput

    settings = {k: v for k, v in row.items() if k in ("quantization", "lm_head_quantization", "kv_cache_dtype")}
    llm = LLM(row["model"], dtype="bfloat16", **settings)
    weight_bytes = model_weight_bytes(llm.engine.runner.model)
    tokenizer = llm.get_tokenizer()
    vocab = min(tokenizer.vocab_size, llm.engine.model_config.vocab_size)

    def prompt(length: int, seed: int) -> list[int]:
        return random_requests(tokenizer, 1, length, 1, seed, vocab)[0].prompt_token_ids

    def timed(ids: list[int], new: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([ids], params, use_tqdm=False)
        return time.perf_counter() - start

    timed(prompt(16, 99), 8)  # warm-up
    decode_prompt = prompt(args.prompt_tokens, 1)
    # decode: time of n+1 tokens minus time of 1 token = n decode steps (prefill cancels out)
    decode_s = min(timed(decode_prompt, args.decode_tokens + 1) - timed(decode_prompt, 1) for _ in range(args.repeats))
    prefill_s = min(timed(prompt(args.prefill_tokens, 2 + i), 1) for i in range(args.repeats))
    requests = random_requests(tokenizer, args.num_prompts, args.io_len, args.io_len, 3, vocab)
    throughput = run_throughput(llm, requests, use_tqdm=False)
    return {
        "weight_bytes": weight_bytes,
        "decode_tok_s": args.decode_tokens / decode_s,
        "prefill_tok_s": args.prefill_tokens / prefill_s,
        "throughput_out_tok_s": throughput.output_tokens_per_s,
        "kv_capacity_tokens": llm.engine.kv_manager.capacity_tokens,
        "threads": torch.get_num_threads(),
    }


def run(cmd: list[str], log: str) -> None:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")


def eval_args(row: dict[str, Any]) -> list[str]:
    out = ["--model", row["model"], "--dtype", "bfloat16"]
    for key in ("quantization", "lm_head_quantization", "kv_cache_dtype"):
        if key in row:
            out += [f"--{key.replace('_', '-')}", row[key]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF (default: Gemma 3 270M Q4_K_M)")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--no-quality", action="store_true", help="speed columns only")
    parser.add_argument("--no-speed", action="store_true", help="quality columns only (no quiet machine needed)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16384, help="PTB test tokens scored (default: 16384)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--io-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--work-dir", default=os.path.expanduser("~/.cache/ember/bench_quant"))
    parser.add_argument("--out", default=None, help="JSON results")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="print the table of saved --out files (merged)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = [name for name in args.rows.split(",") if name not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(ROWS)}")
    if args.table:
        reports = []
        for path in args.table:
            with open(path) as f:
                reports.append(json.load(f))
        print(table(merge(reports)))
        return
    if args.child:
        print(json.dumps(child(json.loads(args.child), args)))
        return

    from ember.model_zoo import default_model_path

    model = args.model or default_model_path()
    tag = os.path.splitext(os.path.basename(model))[0]
    work = os.path.join(args.work_dir, tag)
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "log.txt")
    ember_cli = [sys.executable, "-m", "ember.cli"]
    reference = os.path.join(work, f"reference-ctx{args.ctx}-{args.max_tokens}.pt")
    if not os.path.exists(reference) and not args.no_quality:
        run(ember_cli + ["eval", "kld", "--model", model, "--quantization", "none", "--dtype", "bfloat16",
                         "--ctx", str(args.ctx), "--max-tokens", str(args.max_tokens), "--save-reference", reference,
                         "--no-progress"], log)
    report: dict[str, Any] = {"model": model, "ctx": args.ctx, "max_tokens": args.max_tokens,
                              "load_before": os.getloadavg(), "rows": []}
    for name in args.rows.split(","):
        row = dict(ROWS[name], model=model)
        if "checkpoint" in row:
            out_dir = os.path.join(work, row.pop("checkpoint"))
            recipe = row.pop("quantize", None) or next(r["quantize"] for r in ROWS.values() if "quantize" in r
                                                        and os.path.join(work, r["checkpoint"]) == out_dir)
            if not os.path.exists(os.path.join(out_dir, "config.json")):
                started = time.perf_counter()
                run(ember_cli + ["quantize", "--model", model, "--out", out_dir, "--calib-samples",
                                 str(args.calib_samples), "--no-progress", *recipe], log)
                row["calibration_s"] = time.perf_counter() - started
            row = {**row, "model": out_dir, "recipe": recipe}
        quality: dict[str, Any] = {}
        if not args.no_quality:
            quality_file = os.path.join(work, "quality.json")
            run(ember_cli + ["eval", "kld", *eval_args(row), "--reference", reference, "--max-tokens",
                             str(args.max_tokens), "--json", quality_file, "--no-progress"], log)
            with open(quality_file) as f:
                quality = json.load(f)
        speed: dict[str, Any] = {}
        if not args.no_speed:
            speed = json.loads(subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(row), *sys.argv[1:]], check=True, capture_output=True,
                text=True,
            ).stdout.strip().splitlines()[-1])
        entry = {"row": name, **row, "quality": quality, **speed}
        report["rows"].append(entry)
        print(json.dumps(entry), flush=True)
    if not args.no_llama_cpp:
        report["llama.cpp"] = llama_cpp_row(model, args, work, log)
    report["load_after"] = os.getloadavg()
    print(table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


def llama_cpp_row(model: str, args: argparse.Namespace, work: str, log: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if not args.no_quality:
        ppl_file = os.path.join(work, "llamacpp-ppl.json")
        run([sys.executable, "-m", "ember.cli", "eval", "perplexity", "--engine", "llama.cpp", "--model", model,
             "--ctx", str(args.ctx), "--max-tokens", str(args.max_tokens), "--json", ppl_file, "--no-progress"], log)
        with open(ppl_file) as f:
            result["perplexity"] = json.load(f)
    if args.no_speed:
        return result
    single = os.path.join(work, "llamacpp-single.json")
    run([sys.executable, os.path.join(HERE, "bench_single_stream.py"), "--model", model, "--engines", "llama.cpp",
         "--repeats", str(args.repeats), "--decode-tokens", str(args.decode_tokens),
         "--prompt-tokens", str(args.prompt_tokens), "--prefill-tokens", str(args.prefill_tokens), "--out", single], log)
    batch = os.path.join(work, "llamacpp-throughput.json")
    run([sys.executable, os.path.join(HERE, "bench_throughput.py"), "--model", model, "--engines", "llama.cpp",
         "--num-prompts", str(args.num_prompts), "--input-len", str(args.io_len), "--output-len", str(args.io_len),
         "--out", batch], log)
    with open(single) as g, open(batch) as h:
        return {**result, "single": json.load(g), "throughput": json.load(h)}


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several runs of the same rows (e.g. a --no-quality and a --no-speed run): later runs
    fill in the fields earlier ones lack; llama.cpp's parts likewise."""
    merged: dict[str, Any] = {"rows": [], "llama.cpp": {}}
    by_name: dict[str, dict[str, Any]] = {}
    for report in reports:
        for row in report["rows"]:
            if row["row"] not in by_name:
                by_name[row["row"]] = {"quality": {}}
                merged["rows"].append(by_name[row["row"]])
            entry = by_name[row["row"]]
            for key, value in row.items():
                if key == "quality":
                    entry["quality"] = entry["quality"] or value
                else:
                    entry.setdefault(key, value)
        for key, value in (report.get("llama.cpp") or {}).items():
            merged["llama.cpp"].setdefault(key, value)
    return merged


def table(report: dict[str, Any]) -> str:
    """Markdown: every row, speed as a ratio to llama.cpp measured in the same run, then llama.cpp itself."""
    nan = float("nan")
    llama = report.get("llama.cpp") or {}
    single = (llama.get("single") or {}).get("results", [{}])[0]
    batch = (llama.get("throughput") or {}).get("results", [{}])[0]
    base = {
        "decode_tok_s": single.get("decode_tok_s", nan),
        "prefill_tok_s": single.get("prefill_tok_s", nan),
        "throughput_out_tok_s": batch.get("output_tok_s", nan),
    }

    def speed(r: dict[str, Any], key: str, digits: int) -> str:
        value = r.get(key, nan)
        return f"{value:.{digits}f} ({value / base[key]:.2f}x)"

    lines = [
        "| scheme | weight MB | ppl | Δppl | mean KLD | p99 KLD | top-1 | decode tok/s | prefill tok/s | "
        "batch out tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        q = r["quality"]
        lines.append(
            f"| {r['row']} | {r.get('weight_bytes', nan) / 1e6:.0f} | {q.get('ppl_model', nan):.2f} | "
            f"{q.get('delta_ppl_pct', nan):+.2f}% | {q.get('mean_kld', nan):.4f} | {q.get('p99_kld', nan):.3f} | "
            f"{100 * q.get('top1_agreement', nan):.1f}% | {speed(r, 'decode_tok_s', 1)} | "
            f"{speed(r, 'prefill_tok_s', 0)} | {speed(r, 'throughput_out_tok_s', 0)} |"
        )
    ppl = (llama.get("perplexity") or {}).get("ppl", nan)
    reference = next((r["quality"].get("ppl_reference") for r in report["rows"] if r["quality"]), nan)
    lines.append(
        f"| llama.cpp (same GGUF) | – | {ppl:.2f} | {100 * (ppl / reference - 1):+.2f}% | – | – | – | "
        f"{base['decode_tok_s']:.1f} (1.00x) | {base['prefill_tok_s']:.0f} (1.00x) | "
        f"{base['throughput_out_tok_s']:.0f} (1.00x) |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
