"""The batched sampler against direct per-row computations."""

from __future__ import annotations

import torch

from ember.sampling_params import SamplingParams
from ember.worker.sampler import Sampler, SamplingRow, _apply_penalties, filtered_probs
from ember.worker.sampling_noise import position_uniform

VOCAB = 50


def _row(seed: int = 0, position: int = 5, eos: list[int] | None = None, **params) -> SamplingRow:
    return SamplingRow(
        request_id="r", params=SamplingParams(**params), eos_token_ids=eos or [], output_token_ids=[3, 3, 4],
        seed=seed, position=position, prompt_token_ids=[1, 2],
    )


def test_greedy_is_argmax():
    logits = torch.randn(3, VOCAB)
    out = Sampler()(logits, [_row(temperature=0.0)] * 3)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_top_p_min_p_filters():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    rows = [_row(top_k=5), _row(top_p=0.5), _row(min_p=0.2), _row()]
    probs = filtered_probs(logits, rows)
    assert (probs[0] > 0).sum() == 5 and set(probs[0].nonzero().flatten().tolist()) == set(logits[0].topk(5).indices.tolist())
    full = logits[1].softmax(-1)
    ordered = full.sort(descending=True).values
    keep = int(((ordered.cumsum(0) - ordered) <= 0.5).sum())
    assert (probs[1] > 0).sum() == keep
    full2 = logits[2].softmax(-1)
    assert torch.equal(probs[2] > 0, full2 >= 0.2 * full2.max())
    assert (probs[3] > 0).all()


def test_penalties_follow_vllm_semantics():
    logits = torch.full((1, VOCAB), 2.0)
    logits[0, 1] = -2.0
    out = _apply_penalties(logits, [_row(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)])
    assert out[0, 1] == -4.0  # prompt token, negative logit: multiplied
    assert out[0, 2] == 1.0  # prompt token, positive: divided
    assert out[0, 3] == 1.0 - 0.5 - 0.5  # output token twice: divided, then presence and 2x frequency
    assert out[0, 10] == 2.0  # unseen: untouched


def test_min_tokens_suppresses_eos_and_stop_ids():
    logits = torch.zeros(3, VOCAB)
    logits[:, 7] = 100.0
    logits[:, 9] = 90.0
    rows = [
        _row(temperature=0.0, eos=[7], min_tokens=4, stop_token_ids=[9]),  # 3 generated < 4: both suppressed
        _row(temperature=0.0, eos=[7], min_tokens=3),  # reached: eos allowed
        _row(temperature=0.0, eos=[7], min_tokens=4, ignore_eos=True),  # eos is no stop token here
    ]
    tokens = Sampler()(logits.clone(), rows).token_ids
    assert tokens[0] not in (7, 9) and tokens[1] == 7 and tokens[2] == 7


def test_logit_bias_is_added():
    logits = torch.zeros(2, VOCAB)
    logits[:, 3] = 5.0
    rows = [_row(temperature=0.0, logit_bias={11: 6.0}), _row(temperature=0.0, logit_bias={3: -100.0, 12: 1.0})]
    assert Sampler()(logits, rows).token_ids == [11, 12]


def test_noise_depends_only_on_seed_and_position():
    assert position_uniform(7, 3) == position_uniform(7, 3)
    values = [position_uniform(seed, position) for seed in range(50) for position in range(50)]
    assert len(set(values)) == len(values) and all(0.0 <= u < 1.0 for u in values)
    assert abs(sum(values) / len(values) - 0.5) < 0.02


def test_seeded_rows_do_not_depend_on_batch():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))
    alone = Sampler()(logits[:1], [_row(seed=42)])
    batched = Sampler()(logits, [_row(seed=42), _row(seed=1, top_k=3), _row(temperature=0.0)])
    assert alone.token_ids[0] == batched.token_ids[0]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    counts = torch.zeros(3)
    sampler = Sampler()
    for seed in range(2000):
        counts[sampler(logits.clone(), [_row(seed=seed)]).token_ids[0]] += 1
    assert torch.allclose(counts / 2000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)
