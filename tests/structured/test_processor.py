"""GrammarProcessor on its own: verification rows masked as one-token steps would be, rejected drafts
leave the matcher where it was, drafts cut at the first rejected token, jump-forward tokens."""

from __future__ import annotations

import torch

from ember import SamplingParams
from ember.structured.backend import StructuredOutputBackend
from ember.structured.params import StructuredOutputsParams as Constraint
from ember.structured.processor import GrammarProcessor
from ember.tokenizer import Tokenizer
from ember.worker.logits_processors import LogitsRow


def _setup(checkpoint_dir, regex: str):
    tokenizer = Tokenizer.from_pretrained(checkpoint_dir("llama"))
    backend = StructuredOutputBackend(tokenizer, tokenizer.vocab_size, tokenizer.eos_token_ids)
    processor = GrammarProcessor(backend)
    params = SamplingParams(structured_outputs=Constraint(regex=regex))
    return tokenizer, processor, params


def _allowed(processor: GrammarProcessor, params: SamplingParams, histories: list[list[int]], vocab: int) -> list[set[int]]:
    rows = [LogitsRow("r", params, [2], history) for history in histories]
    logits = processor.apply(torch.zeros(len(rows), vocab), rows)
    return [set(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in logits]


def test_rows_with_drafts_and_rejected_drafts(checkpoint_dir):
    tokenizer, processor, params = _setup(checkpoint_dir, "ab(c|d)e quick brown fox")
    a, b, c, d, e, x = (tokenizer.encode(ch, add_special_tokens=False)[0] for ch in "abcdex")
    vocab = tokenizer.vocab_size
    processor.add_request("r", params, [])
    first = _allowed(processor, params, [[], [a], [a, b]], vocab)
    assert first[0] == {a} and first[1] == {b} and {c, d} <= first[2] and x not in first[2]
    # A draft the grammar rejects (x): rows after it are left alone, and the matcher is rolled back.
    _allowed(processor, params, [[], [x], [x, b]], vocab)
    assert _allowed(processor, params, [[]], vocab) == [{a}]
    assert processor.valid_draft_prefix("r", [a, b, x, e]) == 2
    processor.accept("r", [a, b])
    assert {c, d} <= _allowed(processor, params, [[a, b]], vocab)[0]
    processor.accept("r", [c])
    forced = processor.forced_tokens("r")  # the literal's tokens, maybe without the last
    assert forced and "e quick brown fox".startswith(tokenizer.decode(forced))
    processor.remove_request("r")
    processor.add_request("r", params, [a, b, d])  # resumed after preemption: its tokens replayed
    assert _allowed(processor, params, [[a, b, d]], vocab) == [{e}]
