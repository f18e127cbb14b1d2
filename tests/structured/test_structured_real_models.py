"""Structured output on the real GGUF models: the default model (a base model: only the constraint makes
its output valid) and Qwen2.5-Coder 0.5B Instruct. Every one of 32 JSON Schemas, at temperature 1.0 over
two seeds, parses and validates; regex, choice and EBNF outputs match; the raw-byte vocabulary given to
xgrammar spells every token as the tokenizer decodes it."""

from __future__ import annotations

import ast
import json
import re

import jsonschema
import pytest
from helpers import assert_no_leak
from schemas import RECURSIVE, SCHEMAS

from ember import LLM, SamplingParams
from ember.model_zoo import default_model_path, qwen25_coder_05b_path
from ember.structured.backend import StructuredOutputBackend, raw_vocabulary
from ember.structured.params import StructuredOutputsParams as Constraint
from ember.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

MODELS = {"gemma": default_model_path, "qwen": qwen25_coder_05b_path}
SEEDS = (0, 1)
TEXTS = ["Hello, world!", "  leading spaces\tand tabs\n", "naïve café 東京 🙂", '{"a": [1, 2.5e-3, null]}', "x" * 40]


@pytest.fixture(scope="module", params=list(MODELS))
def model(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def llm(model) -> LLM:
    return LLM(MODELS[model](), max_model_len=1024, max_num_seqs=64)


def _prompt(llm: LLM, model: str, name: str) -> str:
    request = f"Reply with a JSON value for the schema named {name!r}."
    if model == "gemma":
        return f"Example of {name.replace('_', ' ')} data as JSON:\n"
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True)


def test_every_schema_validates(llm, model):
    names = list(SCHEMAS)
    prompts = [_prompt(llm, model, name) for name in names for _ in SEEDS]
    params = [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=256, structured_outputs=Constraint(json=SCHEMAS[name]))
        for name in names
        for seed in SEEDS
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    failures = []
    for (name, seed), out in zip([(n, s) for n in names for s in SEEDS], outs):
        completion = out.outputs[0]
        try:
            assert completion.finish_reason == "stop", f"finished by {completion.finish_reason}"
            value = json.loads(completion.text)
            jsonschema.validate(value, SCHEMAS[name])
            declared = list(SCHEMAS[name].get("properties", {}))
            if isinstance(value, dict):  # properties come in the schema's order
                assert [k for k in value if k in declared] == [k for k in declared if k in value], "key order"
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            failures.append(f"{name} seed {seed}: {str(e).splitlines()[0]}: {completion.text!r}")
    assert not failures, "\n".join(failures)
    assert_no_leak(llm.engine)


# Arithmetic with one level of parentheses and a bounded number of terms: an unbounded `expr ::= term (op term)*`
# at temperature 1 may go on past any max_tokens, and a constraint cannot make a model stop.
ARITHMETIC = """root ::= term (op term){0,2}
term ::= num | "(" num (op num){0,2} ")"
num ::= [1-9] [0-9]{0,2} | "0"
op ::= "+" | "*"
"""


def _is_arithmetic(text: str) -> bool:
    """`text` is a Python expression of integers, + and * (the grammar's language)."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Mult)
    return all(isinstance(node, allowed) for node in ast.walk(tree)) and "(" * 2 not in text


def test_regex_choice_and_grammar(llm, model):
    date = r"(19|20)[0-9]{2}-[01][0-9]-[0-3][0-9]"
    cases = [
        (Constraint(regex=date), lambda t: re.fullmatch(date, t)),
        (Constraint(choice=["positive", "negative", "neutral"]), lambda t: t in ("positive", "negative", "neutral")),
        (Constraint(grammar=ARITHMETIC), _is_arithmetic),
    ]
    prompt = "Write one answer: the date, the sentiment, or an arithmetic expression.\n"
    params = [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=128, structured_outputs=constraint)
        for constraint, _ in cases
        for seed in SEEDS
    ]
    outs = llm.generate([prompt] * len(params), params, use_tqdm=False)
    for (constraint, valid), out in zip([case for case in cases for _ in SEEDS], outs):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop" and valid(text), (constraint.kind, text)


def test_raw_vocabulary_spells_tokens_as_decoded(model):
    """xgrammar sees each token's bytes; joined over an encoding they must give the text back."""
    tokenizer = Tokenizer.from_pretrained(MODELS[model]())
    vocab = raw_vocabulary(tokenizer)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(vocab[i] for i in ids) == text.encode(), text
    assert all(vocab[i] == b"" for i in tokenizer.all_special_ids)


def _tree(depth: int) -> dict:
    return {"value": depth % 10} if depth == 0 else {"value": depth % 10, "children": [_tree(depth - 1), _tree(depth - 1)]}


def test_recursive_schema_accepts_any_depth_and_rejects_what_breaks_it(model):
    """A self-referencing $ref compiles to a recursive grammar: a tree eight levels deep is accepted token by
    token and ends at EOS; three children (maxItems 2), an unknown key or keys out of the schema's order are
    refused. Sampled recursion is not part of the schema sweep: a model at temperature 1 may nest past any
    max_tokens."""
    tokenizer = Tokenizer.from_pretrained(MODELS[model]())
    backend = StructuredOutputBackend(tokenizer, tokenizer.vocab_size, tokenizer.eos_token_ids)
    try:
        constraint = Constraint(json=RECURSIVE)

        def accepts(value: object) -> bool:
            matcher = backend.matcher(constraint)
            ids = tokenizer.encode(json.dumps(value), add_special_tokens=False)
            return all(matcher.accept_token(i) for i in ids) and matcher.accept_token(tokenizer.eos_token_id) and matcher.is_terminated()

        deep = _tree(8)
        jsonschema.validate(deep, RECURSIVE)
        assert accepts(deep)
        assert not accepts({"value": 1, "children": [{"value": 2}, {"value": 3}, {"value": 4}]})
        assert not accepts({"value": 1, "children": [{"value": 2, "name": "x"}]})
        assert not accepts({"children": [{"value": 2}], "value": 1})
    finally:
        backend.shutdown()
