"""Size-weighted attention in the decoder layers above the deep merge (``deep.size_weighted``).

Each such layer's ``Attention`` is replaced by a padded-head one of the same layer name (its
KV-cache spec, hence vLLM's allocation, has the padded head size), wrapped in
:class:`SizeWeightedDeepAttention`, which adds the bias dimension to q, k and v
(:mod:`vllm_affinity.size_weighted`). The merged rows' log sizes of the current forward pass
are set on the wrappers by the model (``AffinityModelMixin.forward``) right before the deep
layers run, and cleared after; a step without a merge (decode, text-only prefill) has none:
its keys get log 1 = 0. The keys written to the deep KV cache keep their bias dimension, so
later decode steps weigh the merged rows alike.

Page sizes: vLLM gives every KV-cache group the same page size, so the layers below the merge
(unpadded heads) get their pages padded to the deep layers' (``page_size_padded``); the KV
bytes the benchmarks report include that padding.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import size_weighted as sw
from .kv import AffinityDeepAttention


class SizeWeightedDeepAttention(nn.Module):
    """``attn(q, k, v)`` of a Qwen2/Llama-style layer, with the bias dimension."""

    def __init__(self, inner: AffinityDeepAttention, head_dim: int) -> None:
        super().__init__()
        self.inner = inner
        self.head_dim = head_dim
        self.log_sizes: torch.Tensor | None = None  # this forward pass's rows (set by the model)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        # one log size per row of q (the model sets them for its whole forward pass)
        log_sizes = self.log_sizes if self.log_sizes is not None else q.new_zeros(q.shape[0], dtype=torch.float32)
        q, k, v = sw.augment(q, k, v, log_sizes, num_heads=inner.num_heads, num_kv_heads=inner.num_kv_heads,
                             head_dim=self.head_dim, padded=inner.head_size, scale=inner.impl.scale)
        return sw.unpad_heads(inner(q, k, v), inner.num_heads, self.head_dim, inner.head_size)


def padded_head_size_for(head_dim: int, vllm_config, attn_type: str | None = None) -> int:
    """The padded head size (room for the bias dimension) the configured attention backend takes."""
    from vllm.v1.attention.selector import get_attn_backend

    backend = get_attn_backend(head_dim, vllm_config.model_config.dtype, vllm_config.cache_config.cache_dtype,
                               attn_type=attn_type)
    return sw.padded_head_size(head_dim, backend.supports_head_size)


def install_deep_size_weighted(deep_layers, vllm_config) -> list[SizeWeightedDeepAttention]:
    """Swap the attention of every layer above the merge for a size-weighted one."""
    context = vllm_config.compilation_config.static_forward_context
    cache_config = vllm_config.cache_config
    head_dim = deep_layers[0].self_attn.attn.head_size
    padded = padded_head_size_for(head_dim, vllm_config)
    out = []
    for layer in deep_layers:
        old = layer.self_attn.attn
        del context[old.layer_name]  # the new layer registers itself under the same name
        inner = AffinityDeepAttention(
            old.num_heads, padded, old.impl.scale, num_kv_heads=old.num_kv_heads, cache_config=cache_config,
            quant_config=vllm_config.quant_config, prefix=old.layer_name,
        )
        layer.self_attn.attn = wrapper = SizeWeightedDeepAttention(inner, head_dim)
        out.append(wrapper)
    return out
