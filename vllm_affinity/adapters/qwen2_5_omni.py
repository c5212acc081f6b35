"""Qwen2.5-Omni's thinker on the adapter: both stages, M-RoPE (:mod:`.omni`).

Differs from the base: its stock count (Whisper-style encoder, 25 tokens per second of the
whole audio: vLLM calls transformers' processor with ``truncation=False``, so audio over
30 s is encoded whole, in the encoder's chunks of 2 * n_window frames); the Omni parts
(positions from K, ``use_audio_in_video`` refused, only audio embeddings pooled) come from
:mod:`.omni`. Served for both registry names vLLM maps to this thinker
(``Qwen2_5OmniModel``, ``Qwen2_5OmniForConditionalGeneration``); the talker (speech
output) is not part of vLLM's model.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen2_5_omni_thinker import (
    Qwen2_5OmniThinkerDummyInputsBuilder,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2_5OmniThinkerMultiModalProcessor,
    Qwen2_5OmniThinkerProcessingInfo,
)
from vllm.model_executor.models.qwen2_audio import _get_feat_extract_output_lengths
from vllm.multimodal import MULTIMODAL_REGISTRY

from .. import compat
from .base import AffinityDummyInputsMixin, AffinityInfoMixin, AffinityModelMixin, AffinityProcessorMixin
from .omni import OmniModelMixin, OmniProcessorMixin

ARCH = "Qwen2_5OmniModel"  # its facts; "Qwen2_5OmniForConditionalGeneration" has the same


class AffinityQwen25OmniProcessingInfo(AffinityInfoMixin, Qwen2_5OmniThinkerProcessingInfo):
    ARCH = ARCH


class AffinityQwen25OmniDummyInputsBuilder(AffinityDummyInputsMixin, Qwen2_5OmniThinkerDummyInputsBuilder):
    pass


class AffinityQwen25OmniMultiModalProcessor(
    OmniProcessorMixin, AffinityProcessorMixin, Qwen2_5OmniThinkerMultiModalProcessor
):
    def stock_tokens(self, num_samples: int) -> int:
        """The feature extractor's mask frames, then two stride-2 stages. Up to its 30 s
        window the audio is padded to it and the mask marks ceil(samples / hop) frames; a
        longer audio is not padded and has samples // hop frames (the last partial hop has
        no STFT frame)."""
        fe = self.info.get_feature_extractor()
        n, hop = int(num_samples), int(fe.hop_length)
        frames = -(-n // hop) if n <= int(fe.n_samples) else n // hop
        return int(_get_feat_extract_output_lengths(torch.tensor(frames))[1])


@MULTIMODAL_REGISTRY.register_processor(
    AffinityQwen25OmniMultiModalProcessor,
    info=AffinityQwen25OmniProcessingInfo,
    dummy_inputs=AffinityQwen25OmniDummyInputsBuilder,
)
class AffinityQwen25OmniThinkerForConditionalGeneration(
    OmniModelMixin, AffinityModelMixin, Qwen2_5OmniThinkerForConditionalGeneration
):
    """Stock Qwen2.5-Omni thinker whose audio embeddings are pooled to the processor's count."""

    ARCH = ARCH
    SEAMS = compat.ADAPTER_SEAMS["qwen2_5_omni"]
