"""M-RoPE input positions of the Omni thinkers with pooled audio (vllm_affinity/adapters/omni.py).

vLLM's own ``get_mrope_input_positions`` runs on the plugin's model classes (built without
weights: the method reads only the thinker config and the request's features). Expected,
for a prompt whose audio was pooled from n to K placeholders: stock vLLM's positions of the
stock prompt (n placeholders) with the audio block cut to its first K columns and every
later column moved back by n - K in all three components, i.e. K consecutive text-like
audio positions and everything after them (text, an image grid) where it would follow K
stock tokens. Stock vLLM's code on the pooled prompt gets them wrong (sensitivity)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.engine  # imports vLLM's model modules


class _Item(dict):
    """The mapping of one feature's tensors (``data[key].data``), as vLLM's items hold them."""

    def __init__(self, **tensors):
        super().__init__({k: SimpleNamespace(data=v) for k, v in tensors.items()})


def _feature(modality: str, offset: int, length: int, **tensors):
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    return MultiModalFeatureSpec(data=_Item(**tensors), modality=modality, identifier=f"{modality}{offset}",
                                 mm_position=PlaceholderRange(offset=offset, length=length))


def _bare(cls, config):
    """An instance of the model class without weights: only ``config`` (transformers' thinker
    config, the released model's defaults: spatial merge 2) is read."""
    m = object.__new__(cls)
    m.config = config
    return m


def _classes(which: str):
    if which == "qwen2_5_omni":
        from transformers import Qwen2_5OmniThinkerConfig as C
        from vllm.model_executor.models.qwen2_5_omni_thinker import Qwen2_5OmniThinkerForConditionalGeneration as S

        from vllm_affinity.adapters.qwen2_5_omni import AffinityQwen25OmniThinkerForConditionalGeneration as A
    else:
        from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig as C
        from vllm.model_executor.models.qwen3_omni_moe_thinker import (
            Qwen3OmniMoeThinkerForConditionalGeneration as S,
        )

        from vllm_affinity.adapters.qwen3_omni import AffinityQwen3OmniMoeThinkerForConditionalGeneration as A
    config = C()
    assert config.vision_config.spatial_merge_size == 2
    return _bare(S, config), _bare(A, config)


def _prompt(parts):
    """[(kind, length)] -> (token list, {kind: offset})."""
    tokens, offsets = [], {}
    for kind, n in parts:
        offsets.setdefault(kind, len(tokens))
        tokens += [7] * n
    return tokens, offsets


@pytest.mark.parametrize("which", ["qwen2_5_omni", "qwen3_omni"])
@pytest.mark.parametrize("with_image", [False, True])
def test_pooled_audio_positions_follow_k(which, with_image):
    stock, plugin = _classes(which)
    frames = 1000  # 10 s of mel frames
    n = stock._compute_audio_token_count(frames)
    k = n // 2
    grid = torch.tensor([1, 8, 4])  # one frame of 8 x 4 patches -> 4 x 2 tokens after the 2 x 2 merge
    image_tokens = 8

    def layout(audio_len):
        parts = [("text", 5)] + ([("image", image_tokens), ("text2", 3)] if with_image else [])
        parts += [("audio", audio_len), ("tail", 6)]
        tokens, off = _prompt(parts)
        feats = [_feature("audio", off["audio"], audio_len, audio_feature_lengths=torch.tensor(frames))]
        if with_image:
            feats.insert(0, _feature("image", off["image"], image_tokens, image_grid_thw=grid))
        return tokens, feats, off["audio"]

    stock_tokens, stock_feats, a = layout(n)
    expected, _ = stock.get_mrope_input_positions(stock_tokens, stock_feats)
    expected = torch.cat([expected[:, : a + k], expected[:, a + n :] - (n - k)], dim=1)

    tokens, feats, a2 = layout(k)
    assert a2 == a
    got, delta = plugin.get_mrope_input_positions(tokens, feats)
    assert got.shape == (3, len(tokens))
    assert torch.equal(got, expected)
    # the audio block: K consecutive positions, equal in every component
    audio = got[:, a : a + k]
    assert torch.equal(audio[0], audio[1]) and torch.equal(audio[1], audio[2])
    assert torch.equal(audio[0], torch.arange(k) + int(audio[0, 0]))
    if not with_image:
        assert torch.equal(got, torch.arange(len(tokens)).expand(3, -1)) and delta == 0
    # pooling off (K = n): the plugin's positions are stock's
    off_got, off_delta = plugin.get_mrope_input_positions(stock_tokens, stock_feats)
    assert torch.equal(off_got, stock.get_mrope_input_positions(stock_tokens, stock_feats)[0])
    # sensitivity: vLLM's own code on the pooled prompt counts n audio positions from the
    # feature length and does not give these positions
    try:
        wrong, _ = stock.get_mrope_input_positions(tokens, feats)
        assert wrong.shape != got.shape or not torch.equal(wrong, got)
    except (ValueError, RuntimeError, AssertionError, IndexError):
        pass  # or fails outright
