"""Size-weighted ("proportional") attention, exactly, in attention kernels that take no bias.

A merged row stands for ``s`` original rows. Attended as one key it weighs as much as any
single key; size-weighted attention lets it weigh what its members weighed together:

    softmax_j(scale * q . k_j + log s_j)

which is exactly plain attention over ``s_j`` copies of row j (ToMe's proportional
attention). No vLLM attention backend takes a per-key additive bias (CPU: ALiBi slopes,
sinks and softcap only; FlashAttention and FlashInfer likewise), so the bias rides in the
keys: every head gets one more dimension, holding ``log(s_j) / scale`` in each key and
``1`` in each query, and zeros in the values. Then

    scale * [q, 1] . [k_j, log(s_j) / scale] = scale * q . k_j + log s_j

and the output's extra dimension is 0 (a weighted mean of zeros), sliced off. Backends
accept a fixed set of head sizes, so the head is zero-padded up to the next one the
backend supports (CPU 64 -> 80; GPU FlashAttention 64 -> 72): that padding is the whole
cost, in KV bytes per kept row (:func:`padded_head_size`).

Where the sizes travel: a size-weighted model appends one column, ``log(size)``, to each
audio's pooled rows (:func:`with_log_sizes`), so the sizes move with the rows through
vLLM's encoder cache and batching; the attention that reads them splits it off
(:func:`split_log_sizes`). Pure torch, no vLLM import.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: head sizes are padded to a multiple of this (every kernel we know aligns to 8 or more)
HEAD_ALIGN = 8


def padded_head_size(head_dim: int, supported: Callable[[int], bool], align: int = HEAD_ALIGN,
                     limit: int = 1024) -> int:
    """The smallest head size ``> head_dim`` (room for the bias dimension), a multiple of
    ``align``, that ``supported`` accepts."""
    size = (head_dim // align + 1) * align
    while size <= limit:
        if supported(size):
            return size
        size += align
    raise ValueError(f"no supported head size in ({head_dim}, {limit}] for size-weighted attention")


def with_log_sizes(rows: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
    """``(K, d)`` merged rows + their group sizes -> ``(K, d + 1)``, last column log(size)
    (0 for unmerged rows: ``sizes=None``)."""
    col = torch.zeros(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
    if sizes is not None:
        if sizes.shape != (rows.shape[0],):
            raise ValueError(f"{tuple(sizes.shape)} sizes for {rows.shape[0]} rows")
        col[:, 0] = sizes.to(device=rows.device, dtype=torch.float32).log().to(rows.dtype)
    return torch.cat([rows, col], dim=1)


def split_log_sizes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`with_log_sizes`: ``(T, d + 1)`` -> rows ``(T, d)``, log sizes ``(T,)``."""
    return x[:, :-1], x[:, -1]


def pad_heads(x: torch.Tensor, num_heads: int, head_dim: int, padded: int,
              extra: torch.Tensor | float | None = None) -> torch.Tensor:
    """``(T, H * head_dim)`` -> ``(T, H * padded)``: each head zero-padded, its first padding
    column (index ``head_dim``) set to ``extra`` (a number, or ``(T,)`` per row; None: 0)."""
    t = x.shape[0]
    out = x.new_zeros(t, num_heads, padded)
    out[..., :head_dim] = x.view(t, num_heads, head_dim)
    if extra is not None:
        out[..., head_dim] = extra.view(t, 1).to(x.dtype) if isinstance(extra, torch.Tensor) else extra
    return out.view(t, num_heads * padded)


def unpad_heads(x: torch.Tensor, num_heads: int, head_dim: int, padded: int) -> torch.Tensor:
    """``(T, H * padded)`` -> ``(T, H * head_dim)``: the first ``head_dim`` of every head."""
    t = x.shape[0]
    return x.view(t, num_heads, padded)[..., :head_dim].reshape(t, num_heads * head_dim)


def augment(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, log_sizes: torch.Tensor | None,
            *, num_heads: int, num_kv_heads: int, head_dim: int, padded: int, scale: float):
    """Queries, keys and values for a kernel of head size ``padded`` that computes
    softmax(scale * q.k + log size) (keys and values None: decode steps read them from the cache)."""
    q = pad_heads(q, num_heads, head_dim, padded, 1.0)
    if k is None:
        return q, None, None
    if log_sizes is None:
        raise ValueError("size-weighted attention: keys without their log sizes")
    k = pad_heads(k, num_kv_heads, head_dim, padded, log_sizes.to(k.dtype) / scale)
    v = pad_heads(v, num_kv_heads, head_dim, padded)
    return q, k, v


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """softmax(scale * q k^T + log sizes) v, one head, ``q (T, d)``, ``k, v (S, d)``: the
    definition the padded-head form must equal (tests)."""
    logits = scale * q @ k.T
    if sizes is not None:
        logits = logits + sizes.to(logits.dtype).log()
    return torch.softmax(logits, dim=-1) @ v
