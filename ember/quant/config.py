"""Which quantization method each layer of a model gets, from the user's two settings.

Rules (the EngineConfig field docstrings repeat them for the CLI):

`quantization`
  * ``auto``  weights that arrive quantized stay quantized: a GGUF's Q4_K/Q5_0/Q6_K/Q8_0 tensors run
              as int4/int8 (exact conversions, no re-quantization), an ember quantized checkpoint
              loads as saved; float weights (F16/F32 GGUF tensors, plain HF folders) stay float.
  * ``none``  everything is dequantized to the model dtype (ember's float path, e.g. for parity tests).
  * a scheme (``int8``, ``int4``, ``int4-g128``, ...): every Linear ends in that scheme, quantized on
    load with round-to-nearest (from float; quantized sources are dequantized first).

`lm_head_quantization`: the same choices for the LM head (with tied embeddings, the embedding table,
which then also serves the lookups); ``auto`` follows `quantization`.

An untied input embedding is only a row lookup (no matmul to speed up), so a scheme does not apply to
it: it stays float, or stays as it arrived under ``auto``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ember.quant.methods import LinearMethod, QuantizedMethod, UnquantizedMethod
from ember.quant.scheme import QuantScheme

AUTO = "auto"
NONE = "none"


@dataclass(frozen=True)
class LayerPolicy:
    """keep: weights arriving quantized stay so; scheme: RTN target (None: keep floats float)."""

    keep: bool = False
    scheme: QuantScheme | None = None

    @classmethod
    def parse(cls, text: str) -> LayerPolicy:
        key = text.strip().lower()
        if key == AUTO:
            return cls(keep=True)
        if key == NONE:
            return cls()
        return cls(keep=True, scheme=QuantScheme.parse(key))

    def method(self) -> LinearMethod:
        if self.scheme is None and not self.keep:
            return UnquantizedMethod()
        return QuantizedMethod(self.scheme)

    @property
    def description(self) -> str:
        return self.scheme.name if self.scheme else ("as stored" if self.keep else "float")


@dataclass(frozen=True)
class QuantConfig:
    linear: LayerPolicy = LayerPolicy()
    lm_head: LayerPolicy = LayerPolicy()
    embedding: LayerPolicy = LayerPolicy()  # an untied input embedding

    @classmethod
    def from_settings(cls, quantization: str = AUTO, lm_head_quantization: str = AUTO) -> QuantConfig:
        linear = LayerPolicy.parse(quantization)
        head = linear if lm_head_quantization.strip().lower() == AUTO else LayerPolicy.parse(lm_head_quantization)
        return cls(linear, head, LayerPolicy(keep=linear.keep and linear.scheme is None))

    def for_float_source(self) -> QuantConfig:
        """Nothing arrives quantized (a plain HF folder): "keep" has nothing to keep, so those layers take
        the float path directly instead of resolving to it after loading."""

        def drop_keep(policy: LayerPolicy) -> LayerPolicy:
            return policy if policy.scheme is not None else LayerPolicy()

        return QuantConfig(drop_keep(self.linear), drop_keep(self.lm_head), drop_keep(self.embedding))

    @property
    def quantizes_on_load(self) -> bool:
        return self.linear.scheme is not None or self.lm_head.scheme is not None

    @property
    def is_float(self) -> bool:
        return self == QuantConfig()


def apply_quant_config(model: nn.Module, config: QuantConfig) -> None:
    """Give every Linear of a freshly built (not yet loaded) CausalLM the method `config` asks for."""
    from ember.models.layers.linear import Linear, VocabEmbedding  # layers import this package

    tied = getattr(model, "lm_head", None) is None
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        if isinstance(module, VocabEmbedding):
            policy = config.lm_head if tied else config.embedding
        elif module is getattr(model, "lm_head", None):
            policy = config.lm_head
        else:
            policy = config.linear
        module.set_method(policy.method())
