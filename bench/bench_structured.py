#!/usr/bin/env python
"""Structured output benchmark: what a JSON schema costs ember per token, and llama.cpp's server next to it.

Every row decodes the same prompt token ids (ember's tokenizer, the model's chat template: "describe this
person as JSON") on the same GGUF, `batch` requests at a time. The schema is a person: name, age, tags
(1-4 strings), an address object (street, city, 5-digit zip) and a boolean, about 60-120 tokens of output.

- **constrained** (greedy, the schema; ember also with jump-forward, opt-in: the text the grammar forces
  next, e.g. `", "age": `, is proposed as drafts and verified in the same step, so a step may yield several
  tokens; exact in float32, but on quantized weights the multi-token verification may round differently,
  which the "same tokens" column shows);
- **unconstrained**: the same prompts, greedy, no schema, `ignore_eos` and each request's max_tokens set to the
  token count of its constrained output (ember's rows: ember's counts; llama-server's: its own), so both
  decode exactly the same number of tokens per request. overhead = unconstrained tok/s / constrained tok/s.

decode tok/s = output tokens after each request's first / time from the group's first token to its end (as in
bench_spec; llama-server's from its own `timings`). ember's step time is that window / the engine steps in it.
The mask cost is timed by wrapping the GrammarProcessor's `apply` (matchers advanced, one bitmask row filled
by xgrammar per constrained row, then applied) and the token-mask kernel inside it: fill = apply - kernel,
per step with constrained rows, next to the step time.

Grammar compile (ember's StructuredOutputBackend, fresh ones apart from the engine's): cold = a new backend's
first compile (the vocabulary set up for xgrammar, then the schema), new schema = a second, different schema
on the set-up backend, cached = the first schema again (the backend's cache by key); best of --compile-repeats.

Validity: --samples requests at temperature 1.0 (seed i for sample i) with the schema, each output parsed
and checked with jsonschema.validate; also reported for every greedy constrained row.

llama.cpp: `llama-server` (`LLAMA_SERVER=/path/to/llama-server` or --llama-server, else skipped), 2 threads,
flash attention, parallel slots (-np = the largest batch), `/completion` with "json_schema" (its own
schema-to-GBNF grammar) and the same prompt token ids, concurrent requests for batch > 1.

    LLAMA_SERVER=/work/llama.cpp/build/bin/llama-server python bench/bench_structured.py   # both models, 1 and 32
    python bench/bench_structured.py --quick                                               # smoke run, a minute or two
    python bench/bench_structured.py --models qwen0.5b --batch 1,8 --prompts 8 --samples 16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ember  # noqa: F401  (sets the OpenMP wait policy before torch loads)
import jsonschema
from ember import LLM, SamplingParams
from ember.model_zoo import default_model_path, qwen25_coder_05b_path
from ember.structured import processor as processor_module
from ember.structured.backend import StructuredOutputBackend, import_xgrammar
from ember.structured.params import StructuredOutputsParams
from ember.structured.processor import GrammarProcessor
from ember.tokenizer import Tokenizer

from bench_single_stream import cpu_model, package_version
from llama_server import LlamaServer, base_command, free_port, group_decode

ZOO: dict[str, Callable[[], str]] = {"default": default_model_path, "qwen0.5b": qwen25_coder_05b_path}

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 48},
                "city": {"type": "string", "maxLength": 32},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "active"],
    "additionalProperties": False,
}
# Compiled only (the "new schema" compile rows): an order, of about the same size.
ORDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
                               "price": {"type": "number"}},
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
            "minItems": 1,
        },
        "note": {"type": ["string", "null"]},
    },
    "required": ["order_id", "status", "items"],
    "additionalProperties": False,
}

PEOPLE = [
    "a retired lighthouse keeper", "a young violin teacher", "a night-shift nurse", "a beekeeper", "a train driver",
    "a pastry chef", "a marine biologist", "a bicycle mechanic", "a museum guard", "a chess coach", "a florist",
    "a software tester", "a tram conductor", "a carpenter", "a radio host", "a glassblower",
]
CITIES = ["Lisbon", "Oslo", "Denver", "Osaka", "Tunis", "Quebec"]


def person_prompts(count: int) -> list[str]:
    return [
        f"Describe {PEOPLE[i % len(PEOPLE)]} from {CITIES[i % len(CITIES)]} as a JSON object with the fields name, "
        "age, tags (a few short words), address (street, city, zip) and active. Answer with the JSON only."
        for i in range(count)
    ]


def encode_prompts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    if tokenizer.chat_template is None:
        return [tokenizer.encode(t) for t in texts]
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    return [tokenizer.encode(r, add_special_tokens=False) for r in rendered]


def valid_json(text: str, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@dataclass
class Run:
    """One group run (or several in sequence) of one mode."""

    tokens: list[list[int]]
    texts: list[str]
    decode_time: float = 0.0
    decode_tokens: int = 0
    steps: int = 0  # ember: engine steps in the decode window
    mask_time: float = 0.0  # ember: GrammarProcessor.apply in the decode window
    kernel_time: float = 0.0  # ember: the token-mask kernel inside it
    mask_calls: int = 0  # ember: apply calls with constrained rows
    truncated: int = 0  # outputs that hit max_tokens

    @property
    def speed(self) -> float:
        return self.decode_tokens / self.decode_time if self.decode_time else 0.0


@dataclass
class Row:
    model: str
    batch: int
    engine: str  # "ember" or "llama-server"
    mode: str
    run: Run | None = None
    valid: str = "-"
    note: str = ""
    same_tokens: str = "-"
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# ember
# ---------------------------------------------------------------------------------------------------


class MaskTimer:
    """Wraps the engine's GrammarProcessor.apply and the token-mask kernel it calls; times them while on."""

    def __init__(self, llm: LLM) -> None:
        self.processor = next(p for p in llm.engine.runner.sampler.processors if isinstance(p, GrammarProcessor))
        self.on = False
        self.apply_time = self.kernel_time = 0.0
        self.calls = 0
        inner_apply, inner_kernel = self.processor.apply, processor_module.apply_token_bitmask

        def apply(logits: Any, rows: Any) -> Any:
            if not self.on:
                return inner_apply(logits, rows)
            start = time.perf_counter()
            result = inner_apply(logits, rows)
            self.apply_time += time.perf_counter() - start
            return result

        def kernel(logits: Any, bitmask: Any, indices: Any) -> Any:
            if not self.on:
                return inner_kernel(logits, bitmask, indices)
            start = time.perf_counter()
            result = inner_kernel(logits, bitmask, indices)
            self.kernel_time += time.perf_counter() - start
            self.calls += 1  # apply reaches the kernel once per step with constrained rows
            return result

        self.processor.apply = apply  # type: ignore[method-assign]
        processor_module.apply_token_bitmask = kernel
        self._restore = (inner_kernel,)

    def restore(self) -> None:
        del self.processor.apply  # the instance attribute: back to the class's method
        processor_module.apply_token_bitmask = self._restore[0]

    def take(self) -> tuple[float, float, int]:
        values = (self.apply_time, self.kernel_time, self.calls)
        self.apply_time = self.kernel_time = 0.0
        self.calls = 0
        return values


def ember_run(llm: LLM, timer: MaskTimer, prompts: list[list[int]], params: list[SamplingParams], batch: int) -> Run:
    engine = llm.engine
    result = Run([], [])
    for start in range(0, len(prompts), batch):
        ids = [f"r{time.monotonic_ns()}-{i}" for i in range(start, min(start + batch, len(prompts)))]
        for request_id, i in zip(ids, range(start, start + len(ids))):
            engine.add_request(request_id, prompts[i], params[i])
        first: float | None = None
        finished: dict[str, Any] = {}
        timer.take()
        while engine.has_unfinished_requests():
            outputs = engine.step()
            if first is not None:
                result.steps += 1
            for out in outputs:
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter()
                    timer.take()  # the mask of the prefill step is not decode
                    timer.on = True
                if out.finished:
                    finished[out.request_id] = out.outputs[0]
        timer.on = False
        result.decode_time += time.perf_counter() - (first or time.perf_counter())
        apply_time, kernel_time, calls = timer.take()
        result.mask_time += apply_time
        result.kernel_time += kernel_time
        result.mask_calls += calls
        for request_id in ids:
            out = finished[request_id]
            result.tokens.append(list(out.token_ids))
            result.texts.append(out.text)
            result.decode_tokens += max(len(out.token_ids) - 1, 0)
            result.truncated += out.finish_reason == "length" and not params[0].ignore_eos
    return result


def structured(schema: dict[str, Any]) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=schema)


def ember_compile_times(llm: LLM, repeats: int) -> dict[str, float]:
    """Seconds: cold (a fresh backend's first compile, vocabulary setup included), new (another schema after
    setup), cached (the first again); best of `repeats` fresh backends."""
    engine = llm.engine
    import_xgrammar()
    times: dict[str, list[float]] = {"cold": [], "new": [], "cached": []}
    for _ in range(repeats):
        backend = StructuredOutputBackend(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)
        try:
            for name, schema in (("cold", PERSON_SCHEMA), ("new", ORDER_SCHEMA), ("cached", PERSON_SCHEMA)):
                start = time.perf_counter()
                backend.compile(structured(schema))
                times[name].append(time.perf_counter() - start)
        finally:
            backend.shutdown()
        del backend
        gc.collect()
    return {name: min(values) for name, values in times.items()}


def measure_ember(model_name: str, model: str, args: argparse.Namespace, prompts: list[list[int]],
                  ) -> tuple[list[Row], dict[str, float], tuple[int, int, float]]:  # fmt: skip
    llm = LLM(model, max_num_seqs=max(64, max(args.batches)))
    timer = MaskTimer(llm)
    rows: list[Row] = []
    try:
        compile_times = ember_compile_times(llm, args.compile_repeats)
        print(f"  {model_name}: ember compile {compile_times}", flush=True)
        jf = timer.processor.jump_forward
        constrained = SamplingParams(temperature=0, max_tokens=args.max_tokens, structured_outputs=structured(PERSON_SCHEMA))
        warm = SamplingParams(temperature=0, max_tokens=8, structured_outputs=structured(PERSON_SCHEMA))
        ember_run(llm, timer, prompts[:1], [warm], 1)
        ember_run(llm, timer, prompts[:1], [SamplingParams(temperature=0, max_tokens=8)], 1)
        for batch in args.batches:
            group = prompts[: max(batch, args.prompts)]
            timer.processor.jump_forward = False
            plain = ember_run(llm, timer, group, [constrained] * len(group), batch)
            timer.processor.jump_forward = True
            jumped = ember_run(llm, timer, group, [constrained] * len(group), batch)
            timer.processor.jump_forward = jf
            free = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=max(len(t), 1)) for t in plain.tokens]
            unconstrained = ember_run(llm, timer, group, free, batch)
            rows.append(Row(model_name, batch, "ember", "unconstrained", unconstrained))
            for mode, run in (("constrained", plain), ("constrained + jump-forward", jumped)):
                valid = sum(valid_json(t, PERSON_SCHEMA) for t in run.texts)
                note = f"{run.truncated} hit max_tokens" if run.truncated else ""
                same = "yes" if run.tokens == plain.tokens else "NO"
                rows.append(Row(model_name, batch, "ember", mode, run, f"{valid}/{len(run.texts)}", note, same))
            print(f"  {model_name}: ember batch {batch} measured", flush=True)
        sampled = [
            SamplingParams(temperature=1.0, seed=i, max_tokens=args.max_tokens, structured_outputs=structured(PERSON_SCHEMA))
            for i in range(args.samples)
        ]
        samples = ember_run(llm, timer, [prompts[i % len(prompts)] for i in range(args.samples)], sampled, args.samples)
        validity = (sum(valid_json(t, PERSON_SCHEMA) for t in samples.texts), args.samples,
                    sum(map(len, samples.tokens)) / args.samples)  # fmt: skip
    finally:
        timer.restore()
        llm.engine.structured.shutdown()
        del llm, timer
        gc.collect()
    return rows, compile_times, validity


# ---------------------------------------------------------------------------------------------------
# llama-server
# ---------------------------------------------------------------------------------------------------


def server_run(server: LlamaServer, prompts: list[list[int]], bodies: list[dict[str, Any]], batch: int) -> Run:
    result = Run([], [])
    with ThreadPoolExecutor(batch) as pool:
        for start in range(0, len(prompts), batch):
            jobs = [{"prompt": prompts[i], "return_tokens": True, **bodies[i]}
                    for i in range(start, min(start + batch, len(prompts)))]  # fmt: skip
            results = list(pool.map(server.complete, jobs))
            seconds, tokens = group_decode(results)
            result.decode_time += seconds
            result.decode_tokens += tokens
            for r in results:
                result.tokens.append(list(r.get("tokens", [])))
                result.texts.append(r["content"])
                result.truncated += bool(r.get("stop_type") == "limit") and not bodies[0].get("ignore_eos")
    return result


def measure_llama_server(model_name: str, model: str, args: argparse.Namespace, prompts: list[list[int]],
                         ) -> tuple[list[Row], tuple[int, int, float] | None, str]:  # fmt: skip
    if not args.llama_server:
        return [], None, "skipped: set LLAMA_SERVER (or --llama-server) to a llama-server binary"
    slot_ctx = max(len(p) for p in prompts) + args.max_tokens + 64
    slots = max(max(args.batches), args.samples)
    port = free_port()
    try:
        server = LlamaServer(base_command(args.llama_server, model, port, slots, slot_ctx), port)
    except RuntimeError as e:
        return [], None, f"error: {e}"
    rows: list[Row] = []
    constrained = {"n_predict": args.max_tokens, "temperature": 0.0, "json_schema": PERSON_SCHEMA}
    try:
        server_run(server, prompts[:1], [{**constrained, "n_predict": 8}], 1)  # warm-up
        for batch in args.batches:
            group = prompts[: max(batch, args.prompts)]
            run = server_run(server, group, [constrained] * len(group), batch)
            free = [{"n_predict": max(len(t), 1), "temperature": 0.0, "ignore_eos": True} for t in run.tokens]
            unconstrained = server_run(server, group, free, batch)
            valid = sum(valid_json(t, PERSON_SCHEMA) for t in run.texts)
            note = f"{run.truncated} hit max_tokens" if run.truncated else ""
            rows.append(Row(model_name, batch, "llama-server", "unconstrained", unconstrained))
            rows.append(Row(model_name, batch, "llama-server", "constrained", run, f"{valid}/{len(run.texts)}", note))
            print(f"  {model_name}: llama-server batch {batch} measured", flush=True)
        sampled = [{"n_predict": args.max_tokens, "temperature": 1.0, "seed": i, "json_schema": PERSON_SCHEMA}
                   for i in range(args.samples)]  # fmt: skip
        samples = server_run(server, [prompts[i % len(prompts)] for i in range(args.samples)], sampled, args.samples)
        validity = (sum(valid_json(t, PERSON_SCHEMA) for t in samples.texts), args.samples,
                    sum(map(len, samples.tokens)) / args.samples)  # fmt: skip
    except Exception as e:
        return rows, None, f"error: {type(e).__name__}: {e} ({server.log_tail(3)})"
    finally:
        server.close()
    return rows, validity, ""


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}" if seconds < 0.1 else f"{seconds * 1000:.0f}"


def print_decode_table(rows: list[Row]) -> None:
    print("| model | batch | engine | mode | output tokens | decode tok/s | unconstrained / constrained | "
          "step ms | mask ms/step (fill + kernel) | mask share | valid | same tokens | note |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|---|---|")
    for row in rows:
        r = row.run
        assert r is not None
        base = next((x.run for x in rows if (x.model, x.batch, x.engine, x.mode) ==
                     (row.model, row.batch, row.engine, "unconstrained")), None)  # fmt: skip
        overhead = f"{base.speed / r.speed:.2f}x" if base and r.speed and row.mode != "unconstrained" else "-"
        step = r.decode_time / r.steps if r.steps else None
        if row.engine == "ember" and row.mode != "unconstrained" and r.mask_calls:
            per = r.mask_time / r.mask_calls
            kernel = r.kernel_time / r.mask_calls
            mask = f"{ms(per)} ({ms(per - kernel)} + {ms(kernel)})"
            share = f"{r.mask_time / r.decode_time:.1%}" if r.decode_time else "-"
        else:
            mask, share = "-", "-"
        tokens = sum(map(len, r.tokens))
        print(f"| {row.model} | {row.batch} | {row.engine} | {row.mode} | {tokens} | {r.speed:.1f} | {overhead} | "
              f"{ms(step) if step else '-'} | {mask} | {share} | {row.valid} | {row.same_tokens} | {row.note} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:]))  # fmt: skip
    parser.add_argument("--models", default="default,qwen0.5b",
                        help=f"comma-separated GGUF paths or zoo names ({', '.join(ZOO)}); default: both")
    parser.add_argument("--batch", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--prompts", type=int, default=4,
                        help="at least this many prompts per batch size, run `batch` at a time (default 4: batch 1 "
                        "decodes 4 requests one after the other, batch 32 one group of 32)")
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="constrained max_tokens (the JSON ends well before it; outputs that hit it are noted)")
    parser.add_argument("--samples", type=int, default=8, help="temperature-1.0 samples for validity (default 8)")
    parser.add_argument("--compile-repeats", type=int, default=3, help="fresh backends for compile times (best of)")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                        help="llama-server binary (default: $LLAMA_SERVER; its rows are skipped without one)")
    parser.add_argument("--no-llama-server", action="store_true", help="ember rows only")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the default model only, batch 1,4, 2 prompts, 2 samples, 1 compile repeat")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batch, args.prompts, args.samples, args.compile_repeats = "default", "1,4", 2, 2, 1
    if args.no_llama_server:
        args.llama_server = None
    args.batches = [int(b) for b in args.batch.split(",")]

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}; "
          f"xgrammar {package_version('xgrammar')}; llama-server {args.llama_server or 'not given'}")
    print(f"{args.prompts}+ prompts per batch size, constrained max_tokens {args.max_tokens}; "
          f"{args.samples} samples at temperature 1.0 for validity")
    rows: list[Row] = []
    compiles: dict[str, dict[str, float]] = {}
    validity: dict[tuple[str, str], tuple[int, int, float]] = {}
    notes: list[str] = []
    for name in args.models.split(","):
        model = ZOO[name]() if name in ZOO else name
        tokenizer = Tokenizer.from_pretrained(model)
        prompts = encode_prompts(tokenizer, person_prompts(max(max(args.batches), args.prompts, args.samples)))
        ember_rows, compile_times, ember_validity = measure_ember(name, model, args, prompts)
        rows += ember_rows
        compiles[name] = compile_times
        validity[(name, "ember")] = ember_validity
        server_rows, server_validity, note = measure_llama_server(name, model, args, prompts)
        rows += server_rows
        if server_validity:
            validity[(name, "llama-server")] = server_validity
        if note:
            print(f"  {name}: llama-server {note}", flush=True)
            notes.append(f"- {name}, llama-server: {note}")

    print()
    print_decode_table(rows)
    print("\n| model | compile cold (first: vocabulary setup + schema) | new schema after setup | cached |")
    print("|---|---:|---:|---:|")
    for name, t in compiles.items():
        print(f"| {name} | {ms(t['cold'])} ms | {ms(t['new'])} ms | {t['cached'] * 1e6:.0f} us |")
    print(f"\n| model | engine | valid at temperature 1.0 (parse + jsonschema.validate) | mean output tokens |")
    print("|---|---|---:|---:|")
    for (name, engine), (valid, total, mean) in validity.items():
        print(f"| {name} | {engine} | {valid}/{total} | {mean:.0f} |")
    if notes:
        print("\nnot measured:\n" + "\n".join(notes))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": [{"model": r.model, "batch": r.batch, "engine": r.engine, "mode": r.mode,
                                 "tok_s": r.run.speed if r.run else None, "valid": r.valid, "note": r.note}
                                for r in rows],
                       "compile_s": compiles,
                       "validity": [[n, e, *v] for (n, e), v in validity.items()]}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
