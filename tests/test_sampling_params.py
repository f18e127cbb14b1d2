from __future__ import annotations

import pytest

from ember import SamplingParams
from ember.errors import InvalidRequestError


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"top_k": -2}, "top_k must be"),
        ({"min_p": 2.0}, "min_p must be"),
        ({"presence_penalty": 3.0}, "presence_penalty must be"),
        ({"frequency_penalty": -2.5}, "frequency_penalty must be"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"max_tokens": -3}, "max_tokens must be a positive integer"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens .* must not exceed"),
        ({"logprobs": 50}, "logprobs must be"),
        ({"stop": [""]}, "stop must be"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": "x"}, "seed must be an integer"),
    ],
)
def test_invalid_values_are_rejected(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_defaults_and_normalization():
    params = SamplingParams(top_k=-1, stop="END")
    assert params.top_k == 0 and params.stop_strings == ["END"] and params.stop_token_ids == []
    assert SamplingParams(temperature=0).greedy
