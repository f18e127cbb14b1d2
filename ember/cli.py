"""`ember generate`, `ember chat` and `ember bench` (in ember.benchmark). Flags of generate and chat come
from the fields (and field docstrings) of `EngineConfig` and `SamplingParams`, so the help text always
matches the code."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import os
import sys
import textwrap
from typing import Any

from ember.benchmark import add_bench_parser, run_bench
from ember.eval.cli import add_eval_parser
from ember.quant.cli import add_quantize_parser
from ember.spec.cli import add_calibrate_parser
from ember.verify.cli import add_verify_arguments, run_verify
from ember.config import EngineConfig
from ember.errors import EmberError
from ember.sampling_params import SamplingParams

# Sampling fields offered as flags (the rest are API-only, e.g. prompt_logprobs).
_SAMPLING_FLAGS = [
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "seed", "max_tokens", "min_tokens", "stop", "ignore_eos", "n", "skip_special_tokens",
]


# The engine's own seed (for unseeded requests) stays API-only: --seed is the request's.
_ENGINE_FLAGS = [f.name for f in dataclasses.fields(EngineConfig) if f.name != "seed"]


def field_docs(cls: type) -> dict[str, str]:
    """The string literal written under each dataclass field, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, names: list[str] | None, overrides: dict[str, Any]) -> None:
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or (names is not None and f.name not in names):
            continue
        default = overrides.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        # argparse %-formats help text: a literal percent sign in a docstring must not break --help.
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        kind = _flag_type(f.type, default)
        if f.name == "stop":
            parser.add_argument(flag, action="append", default=None, help=help_text + "; repeat for several")
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def _flag_type(annotation: Any, default: Any) -> Any:
    text = str(annotation)
    if "float" in text:
        return float
    if "int" in text:
        return int
    return str if default is None or isinstance(default, str) else type(default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="Fast LLM inference on the CPU.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="stream a completion of PROMPT to the terminal")
    generate.add_argument("prompt", help="the text to complete")
    chat = commands.add_parser("chat", help="interactive chat with an instruct model (uses its chat template)")
    chat.add_argument("--system", default=None, help="system message that starts the conversation")
    chat.add_argument("--chat-template", default=None, help="file with a jinja2 chat template to use instead of the model's")
    for sub, max_tokens in ((generate, 128), (chat, 512)):
        _add_dataclass_flags(sub, EngineConfig, _ENGINE_FLAGS, {})
        _add_dataclass_flags(sub, SamplingParams, _SAMPLING_FLAGS, {"max_tokens": max_tokens})
        sub.add_argument("--verbose", action="store_true", help="log engine details to stderr")
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics)")
    _add_dataclass_flags(serve, EngineConfig, _ENGINE_FLAGS, {})
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--api-key", default=os.environ.get("EMBER_API_KEY"),
                       help="require `Authorization: Bearer KEY` on every route but /health and /openapi.json "
                            "(default: the EMBER_API_KEY environment variable, which unlike the flag is not "
                            "visible in `ps`)")  # fmt: skip
    serve.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    serve.add_argument("--served-model-name", default=None, help="model name clients use (default: the --model value)")
    serve.add_argument("--max-waiting-requests", type=int, default=256,
                       help="requests allowed to wait for a batch slot; beyond it: 429 with Retry-After (default: 256)")
    serve.add_argument("--max-body-bytes", type=int, default=4 << 20,
                       help="largest request body, and longest prompt a chat template may render (default: 4 MiB)")
    serve.add_argument("--header-timeout", type=float, default=15.0,
                       help="seconds a connection may take to send a request's head (default: 15)")
    serve.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds a request's body may take to arrive (default: 30)")
    serve.add_argument("--verbose", action="store_true", help="log engine details to stderr")
    add_bench_parser(commands)
    add_eval_parser(commands)
    add_quantize_parser(commands)
    add_calibrate_parser(commands)
    verify = commands.add_parser("verify", help="Token-DiFR: check claimed outputs against this model and configuration")
    _add_dataclass_flags(verify, EngineConfig, _ENGINE_FLAGS, {})
    add_verify_arguments(verify)
    return parser


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    values = vars(args)
    return EngineConfig(**{name: values[name] for name in _ENGINE_FLAGS})


def _split_args(args: argparse.Namespace) -> tuple[EngineConfig, SamplingParams]:
    values = vars(args)
    return _engine_config(args), SamplingParams(**{name: values[name] for name in _SAMPLING_FLAGS})


def _stream(engine: Any, request_id: str, prompt: str | list[int], params: SamplingParams) -> str:
    """Run one request to the end, printing text as it arrives; returns the first completion's text."""
    engine.add_request(request_id, prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if params.n == 1:
                sys.stdout.write(output.outputs[0].delta_text)
                sys.stdout.flush()
            final = output
    if params.n > 1 and final is not None:
        for completion in final.outputs:
            sys.stdout.write(f"--- completion {completion.index} ({completion.finish_reason}) ---\n{completion.text}\n")
    return final.outputs[0].text if final is not None else ""


def _run_generate(args: argparse.Namespace) -> None:
    from ember.engine.llm_engine import LLMEngine

    config, params = _split_args(args)
    engine = LLMEngine(config)
    engine.process_prompt(args.prompt)  # fail on a bad prompt before printing anything
    sys.stdout.write(args.prompt)
    _stream(engine, "generate", args.prompt, params)
    sys.stdout.write("\n")


def _run_chat(args: argparse.Namespace) -> None:
    from ember.engine.llm_engine import LLMEngine

    config, params = _split_args(args)
    template = _read_template(args.chat_template)
    engine = LLMEngine(config)
    tokenizer = engine.tokenizer
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    tokenizer.apply_chat_template(messages + [{"role": "user", "content": "hi"}], chat_template=template)
    print("ember chat: type a message, Ctrl-D to quit.", file=sys.stderr)
    for turn in range(1_000_000):
        try:
            user = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        messages.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, chat_template=template)
        reply = _stream(engine, f"chat-{turn}", tokenizer.encode(prompt, add_special_tokens=False), params)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})


def _run_serve(args: argparse.Namespace) -> None:
    from ember.server.app import ServerSettings
    from ember.server.launch import serve, served_model_name

    config = _engine_config(args)
    if args.max_waiting_requests < 1:
        raise EmberError("--max-waiting-requests must be at least 1")
    logging.getLogger("ember").setLevel(logging.INFO)  # the startup lines: model, KV capacity, address
    settings = ServerSettings(served_model_name(config, args.served_model_name), args.api_key or None,
                              args.metrics_public, args.max_body_bytes, args.header_timeout, args.body_timeout)
    serve(config, settings, args.host, args.port, args.max_waiting_requests)


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise EmberError(f"cannot read chat template {path!r}: {e.strerror}") from e


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        if args.command == "generate":
            _run_generate(args)
        elif args.command == "bench":
            run_bench(args)
        elif args.command == "serve":
            _run_serve(args)
        elif args.command == "verify":
            run_verify(_engine_config(args), args)
        elif args.command in ("eval", "quantize", "calibrate-layer-skip"):
            args.handler(args)
        else:
            _run_chat(args)
    except EmberError as e:
        print(f"ember: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
