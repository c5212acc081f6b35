"""Exact KV-cache and analytic FLOPs accounting: the one definition used by the
processor's metrics, the benchmarks and the tests (pure Python, no vLLM import).

KV blocks, as vLLM 0.32 lays them out: without a deep stage every decoder layer is in
one KV-cache group, and a request of ``t`` tokens holds ``ceil(t / block_size)`` blocks
of it. With a deep stage the layers up to the merge layer and the layers above it have
different KV specs; vLLM splits the layers of each spec into groups of ``size`` layers
(the smaller count, or the larger one when it is under 1.5 times the smaller), padding
the last group of a spec when its count does not divide (a padded group still
allocates pages for ``size`` layers). A request holds ``ceil(t / bs)`` blocks in every shallow group and
``ceil(compacted / bs)`` in every deep group. "Layer-blocks" count one block of one
layer; "stock blocks" divide by the number of layers (one block of every layer).
"""

from __future__ import annotations

from dataclasses import dataclass


def blocks(tokens: int, block_size: int) -> int:
    return -(-int(tokens) // int(block_size))


@dataclass(frozen=True)
class KVLayout:
    """How vLLM groups a decoder's layers into KV-cache groups."""

    num_layers: int
    merge_layer: int | None = None  # None: no deep stage, one group of all layers

    @property
    def shallow_layers(self) -> int:
        return self.num_layers if self.merge_layer is None else self.merge_layer + 1

    @property
    def deep_layers(self) -> int:
        return self.num_layers - self.shallow_layers

    @property
    def group_size(self) -> int:
        if self.merge_layer is None:
            return self.num_layers
        small, large = sorted((self.shallow_layers, self.deep_layers))
        # vLLM's rule (kv_cache_utils in 0.32, kv_cache_planning in 0.33): the smaller
        # count, unless the larger is under 1.5x of it, then the larger (less padding)
        return large if large < small * 1.5 else small

    @property
    def shallow_groups(self) -> int:
        return blocks(self.shallow_layers, self.group_size)

    @property
    def deep_groups(self) -> int:
        return 0 if self.merge_layer is None else blocks(self.deep_layers, self.group_size)

    @property
    def padded_layers(self) -> int:
        """Layer slots allocated per block index, padding included."""
        return self.group_size * (self.shallow_groups + self.deep_groups)

    def blocks_per_group(self, tokens: int, deep_tokens: int, block_size: int) -> list[int]:
        """Blocks a request holds in each KV-cache group, shallow groups first."""
        return [blocks(tokens, block_size)] * self.shallow_groups + [blocks(deep_tokens, block_size)] * self.deep_groups

    def layer_blocks(self, tokens: int, deep_tokens: int, block_size: int) -> int:
        """Layer-blocks held (padding included) by a request of ``tokens`` positions whose
        layers above the merge layer hold ``deep_tokens``."""
        return self.group_size * sum(self.blocks_per_group(tokens, deep_tokens, block_size))


def stock_layer_blocks(num_layers: int, stock_tokens: int, block_size: int) -> int:
    """Layer-blocks stock vLLM holds for the same request (one group of all layers)."""
    return num_layers * blocks(stock_tokens, block_size)


def kv_blocks_saved(layout: KVLayout, *, stock_tokens: int, tokens: int, deep_tokens: int, block_size: int) -> float:
    """KV blocks not allocated against stock vLLM, in stock blocks (one block of every
    layer): what ``vllm_affinity:kv_blocks_saved_total`` counts at the end of prefill."""
    saved = stock_layer_blocks(layout.num_layers, stock_tokens, block_size) - layout.layer_blocks(
        tokens, deep_tokens, block_size
    )
    return saved / layout.num_layers


def cross_attention_blocks_saved(stock_frames: int, kept_frames: int, block_size: int) -> float:
    """Encoder-decoder models: cross-attention blocks not allocated (every decoder layer's
    cross-attention KV holds the encoder frames; one block of every layer)."""
    return float(blocks(stock_frames, block_size) - blocks(kept_frames, block_size))


@dataclass(frozen=True)
class RequestTokens:
    """Token counts of one request, all fixed before the engine runs."""

    prompt: int  # prompt tokens the engine computes (after the input stage)
    audio_in: int  # placeholders stock vLLM would have (sum over audios)
    audio_input: int  # placeholders after the input stage
    audio_deep: int  # rows above the merge layer (= audio_input without a deep stage)

    @property
    def stock_prompt(self) -> int:
        return self.prompt + self.audio_in - self.audio_input

    @property
    def deep_prompt(self) -> int:
        return self.prompt - self.audio_input + self.audio_deep


# -- analytic FLOPs (config dicts as in config.json) -------------------------------------------
def lm_prefill_flops(text_cfg: dict, tokens: int, deep_layer: int | None = None, deep_tokens: int | None = None) -> float:
    """Prefill FLOPs of a Qwen2/Llama-style decoder: 2 x weight FLOPs per token plus
    causal attention (QK^T and AV, half the square) per layer, and the lm_head on the
    last token. With a deep stage the layers above ``deep_layer`` see ``deep_tokens``."""
    h, inter, layers = text_cfg["hidden_size"], text_cfg["intermediate_size"], text_cfg["num_hidden_layers"]
    kv = text_cfg["num_key_value_heads"] * h // text_cfg["num_attention_heads"]
    per_token = 2 * (h * h + 2 * h * kv + h * h + 3 * h * inter)

    def layer(n: int) -> float:
        return per_token * n + 2 * 2 * h * n * n / 2

    if deep_layer is None:
        total = layers * layer(tokens)
    else:
        total = (deep_layer + 1) * layer(tokens) + (layers - deep_layer - 1) * layer(deep_tokens)
    return total + 2 * h * text_cfg["vocab_size"]


def whisper_encoder_flops(audio_cfg: dict, positions: int, lm_hidden: int, mel_bins: int = 128,
                          merge_layer: int | None = None, merged: int | None = None) -> float:
    """FLOPs of a Whisper-style encoder on ``positions`` (after conv2) plus Qwen2-Audio's
    linear projector on the average-pooled half: the two convolutions, per layer the
    projections and MLP, and full (non-causal) attention (quadratic in the positions a layer
    sees, so short clips on the stock 30 s window pay for all 1500). With the encoder stage
    (``merge_layer`` E, ``merged`` positions after it), layers E+1.. see ``merged`` positions."""
    d, ffn, layers = audio_cfg["d_model"], audio_cfg["encoder_ffn_dim"], audio_cfg["encoder_layers"]
    conv = 2 * (3 * mel_bins * d * positions * 2 + 3 * d * d * positions)

    def per_layer(p: int) -> int:
        return 2 * p * (4 * d * d + 2 * d * ffn) + 2 * 2 * d * p * p

    if merge_layer is None:
        return conv + layers * per_layer(positions) + 2 * d * lm_hidden * positions // 2
    before = merge_layer + 1
    return (conv + before * per_layer(positions) + (layers - before) * per_layer(merged)
            + 2 * d * lm_hidden * merged // 2)
