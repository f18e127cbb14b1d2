"""Choosing the layers a layer-skip draft passes over (SWIFT, Draft & Verify): on calibration text, the
share of positions where the target with those layers skipped predicts the same next token as the whole
target (teacher-forced, greedy) is the draft's expected acceptance rate; skipping more layers makes a
draft cheaper but agree less. The search ranks layers by how little skipping each alone costs, then adds
them in that order while the estimated speedup of k-token drafts still grows.

Calibration text defaults to the model's own greedy continuations of a few built-in prompts (code and
prose): the draft is then scored on the kind of tokens it will be asked to draft.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ember.config import ModelConfig
from ember.engine.llm_engine import LLMEngine
from ember.errors import InvalidRequestError
from ember.sampling_params import SamplingParams
from ember.worker.batch import ForwardBatch

CALIBRATION_PROMPTS = (
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n",
    (
        "Add type hints and a docstring to this function, then return the whole code.\n\n"
        "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n"
    ),
    "The history of the printing press begins",
    "Question: Why is the sky blue?\nAnswer:",
)


@dataclass
class LayerSkipCalibration:
    skip_layers: list[int]
    agreement: float  # share of calibration positions where the skipping draft's argmax matches the target's
    estimated_speedup: float  # tokens per unit of decode time with k-token drafts, vs plain decoding
    num_layers: int
    num_speculative_tokens: int
    num_tokens: int  # calibration positions scored

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)
            f.write("\n")


def estimated_speedup(agreement: float, draft_cost: float, k: int) -> float:
    """Expected tokens per step, 1 + a + ... + a^k for per-token acceptance a, over the step's cost in
    plain decode steps: the verification (about one) plus k draft forwards of `draft_cost` each."""
    tokens = sum(agreement**i for i in range(k + 1))
    return tokens / (1.0 + k * draft_cost)


def draft_cost(config: ModelConfig, num_skipped: int) -> float:
    """A draft forward's cost relative to the whole model's, by weights read: the layers it runs plus the
    LM head (which every draft forward pays)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = hidden * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)  # q, k, v, o
    per_layer = attention + 3 * hidden * config.intermediate_size
    head = config.vocab_size * hidden
    total = config.num_hidden_layers * per_layer + head
    return ((config.num_hidden_layers - num_skipped) * per_layer + head) / total


class _Scorer:
    """Teacher-forced agreement of a skipping forward with the whole model's argmax, over fixed sequences."""

    def __init__(self, engine: LLMEngine, sequences: list[list[int]]) -> None:
        """Takes over the idle engine's KV cache: build the engine without prefix caching."""
        if engine.has_unfinished_requests() or engine.config.enable_prefix_caching:
            raise InvalidRequestError("layer-skip calibration needs an idle engine without prefix caching")
        runner = engine.runner
        self.model, self.kv_cache = runner.model, runner.kv_cache
        device = runner.device
        block_size = self.kv_cache.block_size
        tables, next_block = [], 1  # the engine is idle: every block but the null block is free
        for sequence in sequences:
            count = -(-len(sequence) // block_size)
            tables.append(list(range(next_block, next_block + count)))
            next_block += count
        if any(next_block > spec.num_blocks for spec in self.kv_cache.groups):
            raise InvalidRequestError("calibration text does not fit the KV cache; use fewer tokens")
        self.batch_args = {
            "input_ids": torch.tensor([t for s in sequences for t in s], device=device),
            "positions": torch.tensor([p for s in sequences for p in range(len(s))], device=device),
            "start_positions": [0] * len(sequences),
            "query_lens": [len(s) for s in sequences],
            "block_tables": [tables for _ in self.kv_cache.groups],
            "kv_cache": self.kv_cache,
        }
        # Every position but each sequence's last predicts a next token that is in the text.
        rows, offset = [], 0
        for sequence in sequences:
            rows.extend(range(offset, offset + len(sequence) - 1))
            offset += len(sequence)
        self.rows = torch.tensor(rows, device=device)
        self.reference = self._argmax(frozenset())

    @torch.inference_mode()
    def _argmax(self, skip: frozenset[int]) -> torch.Tensor:
        batch = ForwardBatch(**self.batch_args, logits_indices=self.rows, skip_layers=skip)
        hidden = self.model(batch.input_ids, batch.positions, batch)
        return torch.cat([self.model.compute_logits(rows).argmax(-1) for rows in hidden[self.rows].split(64)])

    def agreement(self, skip: frozenset[int]) -> float:
        return (self._argmax(skip) == self.reference).float().mean().item()


def calibration_sequences(engine: LLMEngine, text: str | None, num_tokens: int) -> list[list[int]]:
    """Token sequences of about `num_tokens` in all: windows of the given text, or the model's own greedy
    continuations of CALIBRATION_PROMPTS."""
    if text is not None:
        ids = engine.tokenizer.encode(text)
        if len(ids) < 32:
            raise InvalidRequestError("calibration text is too short (fewer than 32 tokens)")
        ids = ids[:num_tokens]
        window = 256
        return [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]
    per_prompt = max(16, num_tokens // len(CALIBRATION_PROMPTS))
    params = SamplingParams(temperature=0, max_tokens=per_prompt, ignore_eos=True)
    sequences = []
    for index, prompt in enumerate(CALIBRATION_PROMPTS):
        prompt_ids = engine.tokenizer.encode(prompt)
        engine.add_request(f"calibrate-{index}", prompt_ids, params)
        sequences.append(prompt_ids)
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id] = list(output.outputs[0].token_ids)
    return [sequences[i] + outputs[f"calibrate-{i}"] for i in range(len(sequences))]


def calibrate_skip_layers(
    engine: LLMEngine, sequences: list[list[int]], num_speculative_tokens: int, progress: bool = True
) -> LayerSkipCalibration:
    config = engine.model_config
    layers = config.num_hidden_layers
    scorer = _Scorer(engine, sequences)
    k = num_speculative_tokens
    with tqdm(total=2 * layers, desc="calibrating layer skip", unit="forward", disable=not progress) as bar:
        alone = {}
        for layer in range(layers):
            alone[layer] = scorer.agreement(frozenset([layer]))
            bar.update()
        skip: frozenset[int] = frozenset()
        best_agreement, best_speedup = 1.0, estimated_speedup(1.0, 1.0, k)
        for layer in sorted(alone, key=lambda i: -alone[i]):
            bar.update()
            candidate = skip | {layer}
            if len(candidate) == layers:
                continue
            agreement = scorer.agreement(candidate)
            speedup = estimated_speedup(agreement, draft_cost(config, len(candidate)), k)
            if speedup > best_speedup:
                skip, best_agreement, best_speedup = candidate, agreement, speedup
    if not skip:
        raise InvalidRequestError("no layer can be skipped without making drafts cost more than they save")
    return LayerSkipCalibration(sorted(skip), best_agreement, best_speedup, layers, k, len(scorer.rows))
