"""Speculative decoding settings, with vLLM's `speculative_config` names, checked before the model loads."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from ember.errors import InvalidRequestError

METHODS = ("ngram", "draft_model", "layer_skip")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    """How drafts are made: "ngram" (prompt lookup over prompt + output), "draft_model" (a smaller model
    with the same vocabulary) or "layer_skip" (the target with some layers skipped)."""
    num_speculative_tokens: int = 4
    """Most draft tokens verified per request per step."""
    prompt_lookup_min: int = 2
    """ngram: shortest suffix matched."""
    prompt_lookup_max: int = 4
    """ngram: longest suffix matched (tried first)."""
    model: str | None = None
    """draft_model: path of the draft (a GGUF file or a Hugging Face folder)."""
    draft_p_min: float = 0.6
    """draft_model, layer_skip: stop drafting once the draft's top probability falls below this."""
    skip_layers: tuple[int, ...] | None = None
    """layer_skip: the target's layers the draft passes over (`ember calibrate-layer-skip` picks them)."""
    skip_layers_file: str | None = None
    """layer_skip: a JSON file written by `ember calibrate-layer-skip`, instead of `skip_layers`."""
    disable_by_batch_size: int | None = None
    """Draft nothing while more requests than this are in a step (verification then costs more than it
    saves); None: always draft."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidRequestError(f"unknown speculative method {self.method!r}; choose one of {METHODS}")
        _positive("num_speculative_tokens", self.num_speculative_tokens, 1, 32)
        _positive("prompt_lookup_min", self.prompt_lookup_min, 1, 64)
        _positive("prompt_lookup_max", self.prompt_lookup_max, self.prompt_lookup_min, 64)
        if self.disable_by_batch_size is not None:
            _positive("disable_by_batch_size", self.disable_by_batch_size, 1, 1 << 20)
        p_min = self.draft_p_min
        if isinstance(p_min, bool) or not isinstance(p_min, int | float) or not 0.0 <= p_min <= 1.0:
            raise InvalidRequestError(f"speculative_config.draft_p_min must be a number in [0, 1], got {p_min!r}")
        if self.method == "draft_model" and not isinstance(self.model, str):
            raise InvalidRequestError('speculative_config: method "draft_model" needs "model", the draft\'s path')
        if self.method != "draft_model" and self.model is not None:
            raise InvalidRequestError('speculative_config.model is only used by method "draft_model"')
        if self.method == "layer_skip":
            self._check_skip_layers()
        elif self.skip_layers is not None or self.skip_layers_file is not None:
            raise InvalidRequestError('speculative_config.skip_layers(_file) is only used by method "layer_skip"')

    def _check_skip_layers(self) -> None:
        if (self.skip_layers is None) == (self.skip_layers_file is None):
            raise InvalidRequestError(
                'speculative_config: method "layer_skip" needs one of "skip_layers" (a list of layer indices) or '
                '"skip_layers_file" (written by `ember calibrate-layer-skip`)'
            )
        if self.skip_layers is not None:
            layers = self.skip_layers
            if not isinstance(layers, list | tuple) or not layers or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
            ):
                raise InvalidRequestError("speculative_config.skip_layers must be a non-empty list of layer indices")
            object.__setattr__(self, "skip_layers", tuple(sorted(set(layers))))

    def layers_to_skip(self) -> frozenset[int]:
        """layer_skip: the skip set, from the list or the calibration file."""
        if self.skip_layers is not None:
            return frozenset(self.skip_layers)
        return frozenset(read_skip_layers(self.skip_layers_file or ""))

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


def read_skip_layers(path: str) -> list[int]:
    """The skip set saved by `ember calibrate-layer-skip`."""
    try:
        with open(path) as f:
            saved = json.load(f)
        layers = saved["skip_layers"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise InvalidRequestError(f"speculative_config.skip_layers_file {path!r} is not a calibration file: {error}")
    if not isinstance(layers, list) or not all(isinstance(i, int) and i >= 0 for i in layers):
        raise InvalidRequestError(f"speculative_config.skip_layers_file {path!r}: skip_layers is not a list of indices")
    return layers
