"""Calibration for GPTQ and AWQ: run sample text through the float model and collect, for the input of
every linear layer, the statistics both methods need.

Per layer input X (all calibration tokens as rows, [T, K]):

* H = 2 X^T X, the Hessian of the layer's squared output error ||X W^T - X Wq^T||^2 w.r.t. a weight
  row (GPTQ), accumulated in float32 over samples (each sample's X^T X is one float32 matmul);
* mean |x| per input channel (AWQ's activation scale).

A fused layer (qkv_proj, gate_up_proj) reads one input, so one Hessian covers all its shards. The LM
head's input is the final norm's output (captured there: a tied head is the embedding table, whose own
forward is a lookup). Capture is one pass of the whole float model with forward hooks, each layer seeing
the float model's activations (not those of already-quantized earlier layers).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ember.errors import InvalidRequestError
from ember.eval.scoring import EmberScorer, uses_bos
from ember.eval.text import load_text
from ember.tokenizer import Tokenizer

LM_HEAD = "lm_head"  # the stats key of the LM head's input, whatever module serves as the head


@dataclass
class InputStats:
    """Running statistics of one layer input with `features` channels."""

    features: int
    hessian: torch.Tensor = field(init=False)  # [K, K] float32, sum of 2 x x^T
    abs_sum: torch.Tensor = field(init=False)  # [K] float64, sum of |x|
    rows: int = 0

    def __post_init__(self) -> None:
        self.hessian = torch.zeros(self.features, self.features, dtype=torch.float32)
        self.abs_sum = torch.zeros(self.features, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.features).to(torch.float32)
        self.hessian.addmm_(x.T, x, alpha=2.0)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.rows += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.rows, 1)).float()

    def mean_hessian(self) -> torch.Tensor:
        """H / T: the same minimizer, on a scale independent of the number of calibration tokens."""
        return self.hessian / max(self.rows, 1)


def calibration_samples(
    tokenizer: Tokenizer, num_samples: int, seq_len: int, seed: int = 0, text: str = "ptb-train"
) -> list[list[int]]:
    """`num_samples` sequences of `seq_len` tokens from `text` (PTB train by default), each starting at a
    line start drawn with `random.Random(seed)`; a BOS is put in front when the model expects one
    (seq_len includes it). Only the drawn stretches are tokenized (tokenizing all of PTB train takes
    seconds to minutes), a stretch that runs out of text before `seq_len` tokens is drawn again."""
    if num_samples < 1 or seq_len < 2:
        raise InvalidRequestError(f"calibration needs >= 1 sample of >= 2 tokens, got {num_samples} x {seq_len}")
    bos = [tokenizer.bos_token_id] if uses_bos(tokenizer) else []
    body = seq_len - len(bos)
    corpus = load_text(text)
    line_starts = [0] + [m.end() for m in re.finditer("\n", corpus) if m.end() < len(corpus)]
    rng = random.Random(seed)
    samples: list[list[int]] = []
    for _ in range(num_samples):
        for _attempt in range(100):
            start = line_starts[rng.randrange(len(line_starts))]
            chars = 8 * body
            while True:
                ids = tokenizer.encode(corpus[start : start + chars], add_special_tokens=False)
                if len(ids) > body or start + chars >= len(corpus):
                    break
                chars *= 2
            if len(ids) > body:  # one spare token: the stretch's last token may be cut mid-word
                samples.append(bos + ids[:body])
                break
        else:
            raise InvalidRequestError(f"calibration text {text!r} is too short for samples of {seq_len} tokens")
    return samples


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's matmul layers by module name (the embedding table, a lookup, is not one of them)."""
    from ember.models.layers.linear import Linear

    embedding = model.model.embed_tokens
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear) and m is not embedding}


def collect_stats(
    scorer: EmberScorer, samples: Sequence[Sequence[int]], layers: Sequence[str], lm_head: bool = False,
    progress: bool = True,
) -> dict[str, InputStats]:
    """Run every sample through the float model; stats of the inputs of `layers` (and of the LM head)."""
    model = scorer.model
    modules = linear_layers(model)
    stats: dict[str, InputStats] = {}
    handles = []

    def hook_input(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            stats[name].add(args[0])

        return hook

    try:
        for name in layers:
            if name not in modules:
                raise InvalidRequestError(f"{name!r} is not a linear layer of this model")
            stats[name] = InputStats(modules[name].in_features)
            handles.append(modules[name].register_forward_hook(hook_input(name)))
        if lm_head:
            stats[LM_HEAD] = InputStats(model.config.hidden_size)
            handles.append(model.model.norm.register_forward_hook(lambda m, a, out: stats[LM_HEAD].add(out)))
        with torch.inference_mode():
            for sample in tqdm(samples, desc="Calibrating", unit="sample", disable=not progress):
                scorer.hidden_states(sample)
    finally:
        for handle in handles:
            handle.remove()
    return stats
