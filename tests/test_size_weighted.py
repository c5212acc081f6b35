"""The padded-head form of size-weighted attention (vllm_affinity/size_weighted.py), pure torch:
it must equal softmax(scale * q.k + log size) v, and the bias must matter."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_affinity import size_weighted as sw

H, D = 3, 64


def _attend(q, k, v, heads, kv_heads, head_dim, scale):
    """Plain multi-head attention (what a backend computes), (T, H*hd) layouts."""
    t, s = q.shape[0], k.shape[0]
    q = q.view(t, heads, head_dim).transpose(0, 1)
    k = k.view(s, kv_heads, head_dim).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    v = v.view(s, kv_heads, head_dim).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    out = torch.softmax(scale * q @ k.transpose(1, 2), -1) @ v
    return out.transpose(0, 1).reshape(t, heads * head_dim)


@pytest.mark.parametrize("kv_heads", [H, 1])
@pytest.mark.parametrize("padded", [80, 72, 128])
def test_padded_heads_equal_the_biased_softmax(kv_heads, padded):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, H * D, generator=g, dtype=torch.float64)
    k = torch.randn(7, kv_heads * D, generator=g, dtype=torch.float64) * 3
    v = torch.randn(7, kv_heads * D, generator=g, dtype=torch.float64)
    sizes = torch.tensor([1, 9, 2, 30, 1, 4, 200])
    scale = D ** -0.5
    qa, ka, va = sw.augment(q, k, v, sizes.double().log(), num_heads=H, num_kv_heads=kv_heads, head_dim=D,
                            padded=padded, scale=scale)
    assert qa.shape == (5, H * padded) and ka.shape == va.shape == (7, kv_heads * padded)
    got = sw.unpad_heads(_attend(qa, ka, va, H, kv_heads, padded, scale), H, D, padded)
    for h in range(H):
        hk = h // (H // kv_heads)
        want = sw.reference_attention(q[:, h * D:(h + 1) * D], k[:, hk * D:(hk + 1) * D], v[:, hk * D:(hk + 1) * D],
                                      sizes, scale)
        assert torch.allclose(got[:, h * D:(h + 1) * D], want, atol=1e-12)
    plain = _attend(q, k, v, H, kv_heads, D, scale)
    assert (got - plain).abs().max() > 1e-2  # the bias matters


def test_size_weighting_equals_repeated_rows():
    """softmax with log s over one row = plain softmax over s copies of it."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, D, generator=g, dtype=torch.float64) for n in (4, 5, 5))
    sizes = torch.tensor([3, 1, 2, 5, 1])
    got = sw.reference_attention(q, k, v, sizes, D ** -0.5)
    want = sw.reference_attention(q, k.repeat_interleave(sizes, 0), v.repeat_interleave(sizes, 0), None, D ** -0.5)
    assert torch.allclose(got, want, atol=1e-12)


def test_log_size_column_round_trip():
    rows = torch.randn(6, 10)
    sizes = torch.tensor([1, 2, 3, 4, 5, 6])
    x = sw.with_log_sizes(rows, sizes)
    assert x.shape == (6, 11)
    back, logs = sw.split_log_sizes(x)
    assert torch.equal(back, rows) and torch.allclose(logs, sizes.float().log())
    assert torch.equal(sw.split_log_sizes(sw.with_log_sizes(rows, None))[1], torch.zeros(6))
    with pytest.raises(ValueError, match="sizes for 6 rows"):
        sw.with_log_sizes(rows, sizes[:3])


def test_decode_step_pads_queries_only():
    q = torch.randn(2, H * D)
    qa, ka, va = sw.augment(q, None, None, None, num_heads=H, num_kv_heads=H, head_dim=D, padded=80, scale=0.1)
    assert ka is None and va is None and torch.equal(qa.view(2, H, 80)[..., D], torch.ones(2, H))
    with pytest.raises(ValueError, match="without their log sizes"):
        sw.augment(q, q, q, None, num_heads=H, num_kv_heads=H, head_dim=D, padded=80, scale=0.1)


@pytest.mark.parametrize("head_dim,supported,want", [
    (64, [32, 64, 80, 96, 112, 128], 80),  # CPU
    (128, [32, 64, 80, 96, 112, 128, 160, 192], 160),  # CPU, Qwen-style heads
    (64, None, 72),  # any multiple of 8 (FlashAttention)
    (80, [80, 96], 96),
])
def test_padded_head_size(head_dim, supported, want):
    ok = (lambda s: True) if supported is None else supported.__contains__
    assert sw.padded_head_size(head_dim, ok) == want
    assert want > head_dim and want % 8 == 0 and math.isfinite(want)


def test_no_supported_head_size_is_an_error():
    with pytest.raises(ValueError, match="no supported head size"):
        sw.padded_head_size(64, lambda s: False)
