"""The one KV/FLOPs accounting module (pure). Its KV numbers are also checked against
the blocks a real engine holds (tests/test_deep.py::test_accounting_equals_engine_blocks)."""

from __future__ import annotations

import pytest

from vllm_affinity import accounting as A


@pytest.mark.parametrize(
    "layers, merge_layer, size, shallow_groups, deep_groups, padded",
    [
        (4, None, 4, 1, 0, 4),  # no deep stage: one group of every layer
        (4, 1, 2, 1, 1, 4),  # the tiny test model
        (4, 0, 1, 1, 3, 4),  # one shallow layer: three deep groups of one
        (5, 1, 2, 1, 2, 6),  # 2 shallow / 3 deep (1.5x): the second deep group is padded
        (32, 13, 18, 1, 1, 36),  # 14 shallow / 18 deep (< 1.5x): groups of 18, 4 padding layers
        (32, 27, 4, 7, 1, 32),  # 28 / 4
        (32, 29, 2, 15, 1, 32),  # Qwen2-Audio-7B, the paper's layer 29
        (28, 25, 2, 13, 1, 28),  # a 28-layer Qwen2 decoder (Kimi-Audio / AF3-size)
    ],
)
def test_layout_groups_layers_as_vllm_does(layers, merge_layer, size, shallow_groups, deep_groups, padded):
    lay = A.KVLayout(layers, merge_layer)
    assert (lay.group_size, lay.shallow_groups, lay.deep_groups, lay.padded_layers) == (
        size, shallow_groups, deep_groups, padded)


def test_blocks_saved_without_padding_matches_the_per_layer_count():
    # 4 layers, merge after layer 1, block 16: stock 797 tokens; pooled prompt 605; deep 159
    lay = A.KVLayout(4, 1)
    saved = A.kv_blocks_saved(lay, stock_tokens=797, tokens=605, deep_tokens=159, block_size=16)
    b = lambda t: -(-t // 16)  # noqa: E731
    assert saved == pytest.approx((2 * (b(797) - b(605)) + 2 * (b(797) - b(159))) / 4)


def test_padding_costs_memory_and_is_counted():
    padded = A.KVLayout(5, 1)  # deep groups hold 2 x 2 layer slots for 3 layers
    # (the metric clamps a negative saving to 0: vllm_affinity.metrics.record)
    assert padded.layer_blocks(100, 100, 10) == 6 * 10 > A.stock_layer_blocks(5, 100, 10)
    assert A.kv_blocks_saved(padded, stock_tokens=100, tokens=100, deep_tokens=100, block_size=10) < 0


def test_request_tokens():
    t = A.RequestTokens(prompt=419, audio_in=500, audio_input=372, audio_deep=75)
    assert (t.stock_prompt, t.deep_prompt) == (547, 122)


def test_cross_attention_blocks():
    assert A.cross_attention_blocks_saved(1500, 750, 128) == 12 - 6


def test_flops_deep_stage_only_shrinks_the_layers_above():
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_key_value_heads": 2,
           "num_attention_heads": 4, "vocab_size": 100}
    full = A.lm_prefill_flops(cfg, 100)
    assert A.lm_prefill_flops(cfg, 100, deep_layer=1, deep_tokens=100) == pytest.approx(full)
    # merging earlier leaves more layers on the short sequence
    assert A.lm_prefill_flops(cfg, 100, 1, 10) < A.lm_prefill_flops(cfg, 100, 2, 10) < full
