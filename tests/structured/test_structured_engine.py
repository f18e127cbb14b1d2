"""Structured output in the engine, on tiny random checkpoints (random weights: only the constraint makes
the output valid): JSON Schema, JSON object, regex, choice and EBNF at temperature 1.0; unconstrained
neighbours unchanged; speculative decoding, n > 1, preemption, stop strings and logprobs; bad constraints
refused before anything is queued; nothing leaks."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from helpers import assert_no_leak

from ember import LLM, SamplingParams
from ember.errors import InvalidRequestError
from ember.structured.params import StructuredOutputsParams as Constraint

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
ARITHMETIC = 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9]{1,3} | "(" expr ")"'
ARITHMETIC_RE = re.compile(r"^[0-9()+\-]+$")
# Random weights put whitespace anywhere it is allowed; compact JSON keeps the outputs short.
COMPACT = {"disable_any_whitespace": True}
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def checkpoint(checkpoint_dir) -> str:
    return checkpoint_dir("llama")


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    return LLM(checkpoint, dtype="float32", block_size=4)


def _params(constraint: Constraint | None, seed: int = 0, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 120)
    return SamplingParams(temperature=1.0, seed=seed, structured_outputs=constraint, **kw)


def _texts(llm: LLM, params: list[SamplingParams], prompt: str = PROMPT) -> list[str]:
    return [o.outputs[0].text for o in llm.generate([prompt] * len(params), params, use_tqdm=False)]


def test_json_schema_outputs_validate(llm):
    outs = llm.generate([PROMPT] * 6, [_params(Constraint(json=PERSON, **COMPACT), seed) for seed in range(6)], use_tqdm=False)
    for out in outs:
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), PERSON)
    assert_no_leak(llm.engine)


def test_json_object_regex_choice_grammar(llm):
    cases = [
        (Constraint(json_object=True, **COMPACT), lambda t: isinstance(json.loads(t), dict)),
        (Constraint(regex=r"[a-z]{2,5}@[0-9]{3}\.(com|org)"), lambda t: re.fullmatch(r"[a-z]{2,5}@[0-9]{3}\.(com|org)", t)),
        (Constraint(choice=["yes", "no", 'a "quoted"\nchoice']), lambda t: t in ["yes", "no", 'a "quoted"\nchoice']),
        (Constraint(grammar=ARITHMETIC), lambda t: ARITHMETIC_RE.match(t) and _balanced(t)),
    ]
    for seed in range(3):
        params = [_params(c, seed, max_tokens=200) for c, _ in cases]
        outs = llm.generate([PROMPT] * len(cases), params, use_tqdm=False)
        for (constraint, valid), out in zip(cases, outs):
            text = out.outputs[0].text
            if constraint.kind == "json_object" and out.outputs[0].finish_reason == "length":
                continue  # random weights may wander in an unbounded object; the other kinds are bounded
            assert out.outputs[0].finish_reason == "stop", (constraint.kind, text)
            assert valid(text), (constraint.kind, text)


def _balanced(text: str) -> bool:
    depth = 0
    for c in text:
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


def test_unconstrained_neighbours_get_their_own_tokens(llm):
    plain = [SamplingParams(temperature=1.0, seed=s, max_tokens=30, ignore_eos=True) for s in (11, 12)]
    alone = [o.outputs[0].token_ids for o in llm.generate([PROMPT, "Hello world"], plain, use_tqdm=False)]
    mixed = llm.generate(
        [PROMPT, "Hello world", PROMPT, PROMPT],
        plain + [_params(Constraint(json=PERSON, **COMPACT), 1), _params(Constraint(regex="[0-9]{20}"), 2)],
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in mixed[:2]] == alone
    assert re.fullmatch("[0-9]{20}", mixed[3].outputs[0].text)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded"])
def test_same_output_with_speculative_decoding(checkpoint, llm, greedy):
    """Drafts the grammar rejects are cut before verification; accepted ones advance the matcher."""
    constraints = [Constraint(json=PERSON, **COMPACT), Constraint(regex="(ab|cd){10}"), Constraint(grammar=ARITHMETIC)]
    params = [
        SamplingParams(temperature=0 if greedy else 1.0, seed=5, max_tokens=80, structured_outputs=c) for c in constraints
    ]
    prompt = "(1+2)-(3+4)-(5+6) ababab {\"name\": \"ab\", \"age\": 12, \"tags\": [\"a\"]}"
    expected = [o.outputs[0].token_ids for o in llm.generate([prompt] * 3, params, use_tqdm=False)]
    spec = LLM(checkpoint, dtype="float32", block_size=4, speculative_config=NGRAM)
    got = spec.generate([prompt] * 3, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == expected
    assert spec.engine.scheduler.spec_stats.num_draft_tokens > 0
    assert_no_leak(spec.engine)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded"])
def test_jump_forward_keeps_the_output(checkpoint, greedy):
    """Forced text (JSON keys, a regex's literals) goes in as drafts; the tokens are those without it."""
    constraints = [Constraint(json=PERSON, **COMPACT), Constraint(regex="(-begin-[0-9]{2}-end-){3}")]
    params = [SamplingParams(temperature=0 if greedy else 1.0, seed=4, max_tokens=80, structured_outputs=c)
              for c in constraints]
    plain = LLM(checkpoint, dtype="float32", block_size=4, structured_jump_forward=False)
    expected = [o.outputs[0].token_ids for o in plain.generate([PROMPT] * 2, params, use_tqdm=False)]
    assert plain.engine.scheduler.spec_stats.num_draft_tokens == 0
    jumping = LLM(checkpoint, dtype="float32", block_size=4, structured_jump_forward=True)
    got = jumping.generate([PROMPT] * 2, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == expected
    stats = jumping.engine.scheduler.spec_stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    assert_no_leak(jumping.engine)


def test_n_sequences_each_follow_the_grammar(llm):
    out = llm.generate([PROMPT], _params(Constraint(json=PERSON, **COMPACT), 3, n=4), use_tqdm=False)[0]
    assert len(out.outputs) == 4
    for completion in out.outputs:
        jsonschema.validate(json.loads(completion.text), PERSON)
    assert len({c.text for c in out.outputs}) > 1


def test_preemption_replays_the_matcher(checkpoint, llm):
    """A pool too small for all requests at once: preempted requests resume with their grammar state and
    give exactly the tokens they give without preemption."""
    params = [_params(Constraint(regex="[a-z]{30,40}"), seed, max_tokens=60) for seed in range(6)]
    prompts = [PROMPT * 3] * 6
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    tiny = LLM(checkpoint, dtype="float32", block_size=4, kv_cache_tokens=96)
    outs = tiny.generate(prompts, params, use_tqdm=False)
    assert tiny.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    for out in outs:
        assert re.fullmatch("[a-z]{30,40}", out.outputs[0].text)
    assert_no_leak(tiny.engine)


def test_stop_strings_logprobs_and_length(llm):
    constraint = Constraint(regex="(ab){5}STOP(cd){5}")
    out = llm.generate([PROMPT], _params(constraint, stop=["STOP"], logprobs=2), use_tqdm=False)[0].outputs[0]
    assert out.text == "ababababab" and out.finish_reason == "stop"
    assert len(out.logprobs) == len(out.token_ids)
    short = llm.generate([PROMPT], _params(Constraint(regex="[a-z]{50}"), max_tokens=5), use_tqdm=False)[0]
    assert short.outputs[0].finish_reason == "length" and re.fullmatch("[a-z]*", short.outputs[0].text)


@pytest.mark.parametrize(
    "constraint, reason",
    [
        (dict(json={"type": "bogus"}), "invalid json"),
        (dict(json="{not json"), "not valid JSON"),
        (dict(regex="(ab"), "invalid regex"),
        (dict(grammar="root ::= undefined_rule"), "invalid grammar"),
        (dict(choice=[]), "choice"),
        (dict(json={"type": "object"}, regex="a"), "exactly one"),
        (dict(), "exactly one"),
    ],
)
def test_bad_constraints_are_refused_before_queueing(llm, constraint, reason):
    with pytest.raises(InvalidRequestError, match=reason):
        llm.generate([PROMPT], SamplingParams(structured_outputs=constraint), use_tqdm=False)
    assert_no_leak(llm.engine)
    assert _texts(llm, [_params(Constraint(choice=["ok"]))]) == ["ok"]  # and the engine keeps serving


def test_grammars_are_compiled_once(llm):
    backend = llm.engine.structured
    first = backend.submit(Constraint(json=PERSON, **COMPACT))
    same = backend.submit(Constraint(json=json.dumps(PERSON), **COMPACT))  # the same schema as text: the same key
    assert first is same
