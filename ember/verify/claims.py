"""A claim: "this model, given these prompt tokens and these sampling parameters with this seed, produced
these output tokens". Read from JSONL, one claim a line:

    {"prompt_token_ids": [...], "output_token_ids": [...], "sampling_params": {...}, "seed": 123}

`sampling_params` holds SamplingParams fields by name (vLLM's); `seed` is the sequence's own seed (what
ember returns per choice), and defaults to `sampling_params.seed`. A greedy claim (temperature 0) needs no
seed. Anything else that is wrong is an error naming the line and the field, before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ember.errors import InvalidRequestError
from ember.sampling_params import SamplingParams

_FIELDS = {"prompt_token_ids", "output_token_ids", "sampling_params", "seed", "id"}


@dataclass(frozen=True)
class Claim:
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    seed: int  # 0 for a greedy claim without one (unused)
    claim_id: str | None = None  # the caller's label, echoed in the result


def claim_from_dict(data: Any, vocab_size: int) -> Claim:
    """A claim from its JSON object; InvalidRequestError says what is wrong."""
    if not isinstance(data, dict):
        raise InvalidRequestError(f"a claim must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown claim field {unknown[0]!r} (fields: {', '.join(sorted(_FIELDS))})")
    prompt = _token_ids(data.get("prompt_token_ids"), "prompt_token_ids", vocab_size)
    output = _token_ids(data.get("output_token_ids"), "output_token_ids", vocab_size)
    if not prompt or not output:
        raise InvalidRequestError("prompt_token_ids and output_token_ids must not be empty")
    raw_params = data.get("sampling_params", {})
    if not isinstance(raw_params, dict):
        raise InvalidRequestError("sampling_params must be an object of SamplingParams fields")
    try:
        params = SamplingParams(**raw_params)
    except (TypeError, ValueError, AttributeError) as e:  # an unknown field name, a value of the wrong shape
        raise InvalidRequestError(f"sampling_params: {e}") from e
    except InvalidRequestError as e:
        raise InvalidRequestError(f"sampling_params: {e}") from e
    if params.n != 1:
        raise InvalidRequestError("sampling_params: n must be 1 (a claim is one sequence; give each its own seed)")
    if params.structured_outputs is not None:
        raise InvalidRequestError("sampling_params: structured_outputs claims cannot be verified yet")
    for token in params.stop_token_ids + list(params.logit_bias or {}):
        if token >= vocab_size:
            raise InvalidRequestError(f"sampling_params: token id {token} is outside the vocabulary [0, {vocab_size})")
    seed = data.get("seed", params.seed)
    if seed is None and not params.greedy:
        raise InvalidRequestError("seed is required for a sampled claim (temperature > 0)")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise InvalidRequestError(f"seed must be an integer, got {seed!r}")
    claim_id = data.get("id")
    if claim_id is not None and not isinstance(claim_id, (str, int)):
        raise InvalidRequestError("id must be a string or an integer")
    return Claim(prompt, output, params, seed or 0, None if claim_id is None else str(claim_id))


def load_claims(path: str, vocab_size: int) -> list[Claim]:
    """Every claim of a JSONL file (blank lines skipped); an error names the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise InvalidRequestError(f"cannot read claims file {path!r}: {e.strerror}") from e
    claims = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            claims.append(claim_from_dict(json.loads(line), vocab_size))
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path}:{number}: not JSON ({e.msg})") from e
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{path}:{number}: {e}") from e
    if not claims:
        raise InvalidRequestError(f"{path}: no claims")
    return claims


def _token_ids(value: Any, name: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidRequestError(f"{name} must be a list of token ids")
    if any(not 0 <= t < vocab_size for t in value):
        raise InvalidRequestError(f"{name}: token ids must be in [0, {vocab_size})")
    return value
