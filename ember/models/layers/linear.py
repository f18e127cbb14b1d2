"""Linear layers whose weights may be several checkpoint tensors stacked along the output dim.

Fusing q/k/v (and gate/up) into one matmul halves the number of small kernels per layer, which matters
for batch-1 decode where each op costs a dispatch; the checkpoint still stores them separately, so each
shard is loaded into its row range.

How the weight is stored and multiplied (float, or int4/int8 packed) is the layer's `method`
(`ember.quant.methods`), chosen per layer by the model's quantization config before loading; model
code only ever builds plain `Linear`s.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.errors import CorruptModelError
from ember.quant.methods import LinearMethod, UnquantizedMethod, WeightValue


class Linear(nn.Module):
    """y = x W^T (+ b); `shard_sizes` lists the output rows of each stacked checkpoint tensor."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, shard_sizes: list[int] | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.shard_sizes = shard_sizes or [out_features]
        assert sum(self.shard_sizes) == out_features
        self.dtype = torch.get_default_dtype()  # float weights and activations (the model dtype)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        # Float weights in bf16 go through ember's kernel at every row count, so a row's output does not depend
        # on the batch; False lets large batches use oneDNN's faster GEMM (EngineConfig.batch_invariant).
        self.batch_invariant = True
        self.method: LinearMethod = UnquantizedMethod()
        self.method.create_weights(self)

    def set_method(self, method: LinearMethod) -> None:
        """Switch how the weight is stored (before loading, or when a method resolves to another)."""
        if "weight" in self._parameters:
            del self._parameters["weight"]  # the empty float weight was never touched: no memory to free
        self.method = method
        method.create_weights(self)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.method.apply(self, x, self.bias, out_dtype)

    def load_shard(self, param_name: str, tensor: WeightValue, shard: int = 0) -> None:
        """Load one checkpoint tensor (`weight` or `bias`) into its rows of the stacked parameter."""
        if param_name == "weight":
            self.method.load_shard(self, tensor, shard)
            return
        param: torch.Tensor = getattr(self, param_name)
        start = sum(self.shard_sizes[:shard])
        rows = self.shard_sizes[shard]
        target = param.data.narrow(0, start, rows)
        if tuple(tensor.shape) != tuple(target.shape):
            raise CorruptModelError(
                f"tensor for {param_name} shard {shard} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
            )
        target.copy_(tensor)

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={type(self.method).__name__}"


class VocabEmbedding(Linear):
    """Token embedding table [vocab, hidden]. With tied weights it is also the LM head, so it is a Linear
    (hidden -> vocab) whose method also serves row lookups: a quantized table dequantizes only the rows
    looked up."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(embedding_dim, num_embeddings)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.method.embedding(self, ids)

    def logits(self, hidden: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.method.apply(self, hidden, None, out_dtype)
