"""Speculative decoding settings, with vLLM's `speculative_config` names, checked before the model loads."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from ember.errors import InvalidRequestError
from ember.spec.ngram import NgramProposer
from ember.spec.proposer import Proposer

METHODS = ("ngram",)
_PLANNED = ("draft_model", "layer_skip")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    """How drafts are made: "ngram" (prompt lookup over prompt + output)."""
    num_speculative_tokens: int = 4
    """Most draft tokens verified per request per step."""
    prompt_lookup_min: int = 2
    """ngram: shortest suffix matched."""
    prompt_lookup_max: int = 4
    """ngram: longest suffix matched (tried first)."""

    def __post_init__(self) -> None:
        if self.method in _PLANNED:
            raise InvalidRequestError(f"speculative method {self.method!r} is not available yet; use one of {METHODS}")
        if self.method not in METHODS:
            raise InvalidRequestError(f"unknown speculative method {self.method!r}; choose one of {METHODS}")
        _positive("num_speculative_tokens", self.num_speculative_tokens, 1, 32)
        _positive("prompt_lookup_min", self.prompt_lookup_min, 1, 64)
        _positive("prompt_lookup_max", self.prompt_lookup_max, self.prompt_lookup_min, 64)

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """From a SpeculativeConfig, a dict, or JSON text (the CLI's --speculative-config)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise InvalidRequestError(f"speculative_config is not valid JSON: {error}") from None
        if not isinstance(value, dict):
            raise InvalidRequestError("speculative_config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidRequestError(f"speculative_config: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**value)


def _positive(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequestError(f"speculative_config.{name} must be an integer in [{low}, {high}], got {value!r}")


def make_proposer(config: SpeculativeConfig | None) -> Proposer | None:
    if config is None:
        return None
    return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
