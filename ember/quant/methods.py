"""How a Linear layer stores and applies its weight: one method object per layer.

Models never change for quantization: `ember.models.layers.linear.Linear` (and the vocabulary
embedding, which with tied weights is also the LM head) delegate creating, loading, finishing and
applying their weight to `layer.method`. Two methods exist:

* `UnquantizedMethod`: a float `weight` parameter in the model dtype (ember's original path).
  Quantized values that arrive (GGUF blocks, packed checkpoints) are dequantized into it.
* `QuantizedMethod(scheme)`: the weight lives as int4/int8 packed for `ember.kernels.quant_linear`.
  Float shards are quantized on arrival with round-to-nearest in `scheme`; already-quantized shards
  (GGUF, GPTQ/AWQ, ember checkpoints) are kept as they are when `scheme` is None or equal to theirs.

What a layer receives per checkpoint tensor (a "shard" of a fused qkv / gate_up weight) is a float
tensor, a `QuantizedWeight`, or a `PackedWeight` (a whole layer's packed segments, from an ember
checkpoint). After loading, the shards are stacked into as few packed weights as possible:

* shards with the same bit width stack into one packed weight; different group sizes are promoted to
  the smallest one by repeating scales/offsets (exact), e.g. a Q6_K v (int8 g16) with Q8_0 q/k (g32);
* shards of different bit widths (a Q4_K q/k with a Q6_K v) cannot share a format exactly (an int4
  offset has no int8-symmetric equivalent), so they become consecutive segments, each applied by its
  own kernel call with the outputs concatenated;
* float shards that stay float (scheme None) form a float segment; a layer whose only segment is float
  switches back to `UnquantizedMethod`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Union

import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import CorruptModelError
from ember.kernels import linear
from ember.kernels.quant_linear import Packed, embedding_rows, pack_int4, pack_int8, quant_linear, unpack
from ember.quant.scheme import QuantizedWeight, QuantScheme, quantize_rtn

if TYPE_CHECKING:
    from ember.models.layers.linear import Linear


@dataclass
class Segment:
    """Consecutive output rows of a layer's weight in one format: packed int4/int8, or float."""

    rows: int
    packed: Packed | None = None
    weight: torch.Tensor | None = None  # float [rows, K] when not packed
    scheme: QuantScheme | None = None  # what the packed codes are (None for float)

    def apply(self, x: torch.Tensor, out_dtype: torch.dtype | None, invariant: bool = True) -> torch.Tensor:
        if self.packed is not None:
            return quant_linear(x, self.packed, None, out_dtype)
        return linear(x, self.weight, None, out_dtype, invariant)

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, K]."""
        return unpack(self.packed) if self.packed is not None else self.weight.to(torch.float32)

    def nbytes(self) -> int:
        return self.packed.nbytes() if self.packed is not None else self.weight.numel() * self.weight.element_size()


@dataclass
class PackedWeight:
    """A whole layer's weight as it is saved in an ember quantized checkpoint: its segments in order."""

    segments: list[Segment]

    def dequantize(self) -> torch.Tensor:
        return torch.cat([s.dequantize() for s in self.segments])


WeightValue = Union[torch.Tensor, QuantizedWeight, PackedWeight]


class LinearMethod(Protocol):
    def create_weights(self, layer: Linear) -> None: ...
    def load_shard(self, layer: Linear, value: WeightValue, shard: int) -> None: ...
    def process_weights_after_loading(self, layer: Linear) -> None: ...
    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype | None) -> torch.Tensor: ...
    def embedding(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor: ...
    def weight_bytes(self, layer: Linear) -> int:
        """Bytes of weight one matmul reads (codes and scales as stored; the roofline's weight traffic)."""
        ...


def _shard_rows(layer: Linear, shard: int) -> tuple[int, int]:
    return sum(layer.shard_sizes[:shard]), layer.shard_sizes[shard]


def _check_shape(layer: Linear, shape: tuple[int, ...], shard: int | None) -> None:
    rows = layer.out_features if shard is None else layer.shard_sizes[shard]
    if tuple(shape) != (rows, layer.in_features):
        what = "weight" if shard is None else f"weight shard {shard}"
        raise CorruptModelError(f"tensor for {what} has shape {tuple(shape)}, expected {(rows, layer.in_features)}")


class UnquantizedMethod:
    """A float weight parameter [out, in] in the model dtype."""

    def create_weights(self, layer: Linear) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features, dtype=layer.dtype), requires_grad=False)

    def load_shard(self, layer: Linear, value: WeightValue, shard: int) -> None:
        if isinstance(value, PackedWeight):  # a whole layer
            _check_shape(layer, (sum(s.rows for s in value.segments), layer.in_features), None)
            layer.weight.data.copy_(value.dequantize())
            return
        _check_shape(layer, tuple(value.shape), shard)
        tensor = value.dequantize() if isinstance(value, QuantizedWeight) else value
        start, rows = _shard_rows(layer, shard)
        layer.weight.data.narrow(0, start, rows).copy_(tensor)

    def process_weights_after_loading(self, layer: Linear) -> None:
        pass

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype | None) -> torch.Tensor:
        return linear(x, layer.weight, bias, out_dtype, layer.batch_invariant)

    def embedding(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)

    def weight_bytes(self, layer: Linear) -> int:
        return layer.weight.numel() * layer.weight.element_size()


class QuantizedMethod:
    """Weight packed for the int4/int8 kernels; `scheme` quantizes float shards (RTN) on arrival.

    scheme None: keep whatever arrives (quantized shards stay as they are, float shards stay float).
    A scheme: the layer ends in exactly that scheme; shards quantized differently are dequantized and
    re-quantized with RTN (e.g. `lm_head_quantization=int8` on a GGUF whose head is Q6_K).
    """

    def __init__(self, scheme: QuantScheme | None = None) -> None:
        self.scheme = scheme
        self.segments: list[Segment] = []
        self._shards: dict[int, torch.Tensor | QuantizedWeight] = {}

    def create_weights(self, layer: Linear) -> None:
        pass  # nothing to allocate: shards are quantized as they arrive

    def load_shard(self, layer: Linear, value: WeightValue, shard: int) -> None:
        if isinstance(value, PackedWeight):
            _check_shape(layer, (sum(s.rows for s in value.segments), layer.in_features), None)
            if self.scheme is None or all(s.scheme == self.scheme for s in value.segments):
                self.segments = list(value.segments)
                self._shards = {}
                return
            value, shard = quantize_rtn(value.dequantize(), self.scheme), -1  # whole layer, re-quantized
        else:
            _check_shape(layer, tuple(value.shape), shard)
        if self.scheme is not None:
            if isinstance(value, QuantizedWeight) and value.scheme != self.scheme:
                value = value.dequantize()
            if not isinstance(value, QuantizedWeight):
                value = quantize_rtn(value, self.scheme)
        elif not isinstance(value, QuantizedWeight):
            value = value.to(layer.dtype)  # stays float (e.g. an F16 tensor in a GGUF)
        self._shards[shard] = value

    def process_weights_after_loading(self, layer: Linear) -> None:
        if not self._shards:
            return  # loaded whole (checkpoint) or installed
        shards = [self._shards[-1]] if -1 in self._shards else [self._shards[i] for i in range(len(layer.shard_sizes))]
        self._shards = {}
        self.segments = build_segments(shards)
        if len(self.segments) == 1 and self.segments[0].packed is None:
            # Nothing quantized after all: run the plain float path.
            weight = self.segments[0].weight
            layer.set_method(UnquantizedMethod())
            layer.weight.data.copy_(weight)

    def install(self, layer: Linear, weight: QuantizedWeight) -> None:
        """Replace the layer's weight by an already-quantized one (GPTQ/AWQ output)."""
        _check_shape(layer, weight.shape, None)
        self._shards = {}
        self.segments = build_segments([weight])

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype | None) -> torch.Tensor:
        if len(self.segments) == 1 and self.segments[0].packed is not None:
            return quant_linear(x, self.segments[0].packed, bias, out_dtype)
        # Float accumulation across segments keeps out_dtype=float32 logits exact to the kernel's accumulators.
        parts = [s.apply(x, torch.float32 if out_dtype == torch.float32 else None, layer.batch_invariant) for s in self.segments]
        y = torch.cat(parts, dim=-1)
        if bias is not None:
            y = y + bias
        return y if out_dtype in (None, y.dtype) else y.to(out_dtype)

    def embedding(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        if len(self.segments) != 1 or self.segments[0].packed is None:
            raise CorruptModelError("a quantized embedding must be a single packed weight")
        rows = embedding_rows(self.segments[0].packed, ids)  # dequantizes only the looked-up rows
        return rows.to(layer.dtype).view(*ids.shape, layer.in_features)

    def weight_bytes(self, layer: Linear) -> int:
        return sum(s.nbytes() for s in self.segments)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([s.dequantize() for s in self.segments])


def build_segments(shards: list[torch.Tensor | QuantizedWeight]) -> list[Segment]:
    """Stack consecutive shards of one kind (int4 / int8 / float) into one segment each."""
    runs: list[list[torch.Tensor | QuantizedWeight]] = []
    for shard in shards:
        if runs and _kind(runs[-1][0]) == _kind(shard):
            runs[-1].append(shard)
        else:
            runs.append([shard])
    segments = []
    for run in runs:
        if isinstance(run[0], torch.Tensor):
            weight = torch.cat(run) if len(run) > 1 else run[0]
            segments.append(Segment(weight.shape[0], weight=weight.contiguous()))
        else:
            qw = stack_quantized(run)  # type: ignore[arg-type]
            segments.append(Segment(qw.shape[0], packed=pack(qw), scheme=qw.scheme))
    return segments


def _kind(value: torch.Tensor | QuantizedWeight) -> int:
    return 0 if isinstance(value, torch.Tensor) else value.scheme.bits


def stack_quantized(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Concatenate same-bit-width weights along the output rows, at the smallest group size (exact)."""
    if len(weights) == 1:
        return weights[0]
    group = min(w.group_size for w in weights)
    if any(w.group_size % group for w in weights):
        group = _common_divisor_group(weights)
    regrouped = [_regroup(w, group) for w in weights]
    first = weights[0].scheme
    scheme = QuantScheme(first.bits, group if group != weights[0].shape[1] else -1, all(w.scheme.symmetric for w in weights))
    return QuantizedWeight(
        scheme,
        torch.cat([w.codes for w in regrouped]),
        torch.cat([w.scales for w in regrouped]),
        None if first.bits == 8 else torch.cat([w.offsets for w in regrouped]),
    )


def _common_divisor_group(weights: list[QuantizedWeight]) -> int:
    for g in (128, 64, 32, 16):
        if all(w.group_size % g == 0 for w in weights):
            return g
    raise CorruptModelError("fused weight shards have incompatible quantization group sizes")


def _regroup(weight: QuantizedWeight, group: int) -> QuantizedWeight:
    """Same weight with groups split into `group`-sized ones (scales/offsets repeated): exact."""
    repeat = weight.group_size // group
    if repeat == 1:
        return weight
    offsets = None if weight.offsets is None else weight.offsets.repeat_interleave(repeat, dim=1)
    return QuantizedWeight(weight.scheme, weight.codes, weight.scales.repeat_interleave(repeat, dim=1), offsets)


def pack(weight: QuantizedWeight) -> Packed:
    if weight.scheme.bits == 4:
        return pack_int4(weight.codes, weight.scales, weight.offsets, weight.group_size)
    return pack_int8(weight.codes, weight.scales, weight.group_size)

