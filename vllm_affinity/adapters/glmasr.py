"""GLM-ASR on the adapter: both stages (Whisper-style encoder with rotary positions, a
projector that merges 4 frames, Llama decoder, 1-D RoPE).

Differs from the base: its stock count per 30 s window (conv stride 2, then
``merge_factor`` frames per token: 375 per full window). Like AudioFlamingo3 its
processor cuts audio into 30 s windows itself, up to ``max_audio_len``, and vLLM's
model concatenates an audio's windows before pooling.
"""

from __future__ import annotations

from vllm.model_executor.models.glmasr import (
    GlmAsrDummyInputsBuilder,
    GlmAsrForConditionalGeneration,
    GlmAsrMultiModalProcessor,
    GlmAsrProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .base import AffinityDummyInputsMixin, AffinityInfoMixin, AffinityModelMixin, AffinityProcessorMixin

ARCH = "GlmAsrForConditionalGeneration"


class AffinityGlmAsrProcessingInfo(AffinityInfoMixin, GlmAsrProcessingInfo):
    ARCH = ARCH


class AffinityGlmAsrDummyInputsBuilder(AffinityDummyInputsMixin, GlmAsrDummyInputsBuilder):
    pass


class AffinityGlmAsrMultiModalProcessor(AffinityProcessorMixin, GlmAsrMultiModalProcessor):
    def stock_tokens(self, num_samples: int) -> int:
        merge = int(getattr(self.info.get_hf_config(), "merge_factor", 4))
        return self.windowed_stock_tokens(num_samples, lambda f: ((f - 1) // 2 + 1 - merge) // merge + 1)


@MULTIMODAL_REGISTRY.register_processor(
    AffinityGlmAsrMultiModalProcessor,
    info=AffinityGlmAsrProcessingInfo,
    dummy_inputs=AffinityGlmAsrDummyInputsBuilder,
)
class AffinityGlmAsrForConditionalGeneration(AffinityModelMixin, GlmAsrForConditionalGeneration):
    """Stock GLM-ASR whose audio embeddings are pooled to the processor's count."""

    ARCH = ARCH
