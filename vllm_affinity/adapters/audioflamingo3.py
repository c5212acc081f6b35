"""AudioFlamingo3 on the adapter: both stages (Whisper-large-v3-style encoder, projector,
Qwen2 decoder, 1-D RoPE).

Differs from the base: its stock count per 30 s window (conv stride 2, then average
pool 2). Its processor cuts audio into 30 s windows itself, up to ``max_audio_len``
(``long_audio: "native"`` in :mod:`vllm_affinity.architectures`: the base sizes the
encoder budget and profiling for it), and vLLM's model already concatenates an audio's
windows, so pooling runs right after it. With a deep stage one audio must fit one
prefill step, so the server accepts up to ``max_audio_seconds`` (120 s unless set;
stock AF3 takes 600 s).
"""

from __future__ import annotations

from vllm.model_executor.models.audioflamingo3 import (
    AudioFlamingo3DummyInputsBuilder,
    AudioFlamingo3ForConditionalGeneration,
    AudioFlamingo3MultiModalProcessor,
    AudioFlamingo3ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .base import AffinityDummyInputsMixin, AffinityInfoMixin, AffinityModelMixin, AffinityProcessorMixin

ARCH = "AudioFlamingo3ForConditionalGeneration"


class AffinityAudioFlamingo3ProcessingInfo(AffinityInfoMixin, AudioFlamingo3ProcessingInfo):
    ARCH = ARCH


class AffinityAudioFlamingo3DummyInputsBuilder(AffinityDummyInputsMixin, AudioFlamingo3DummyInputsBuilder):
    pass


class AffinityAudioFlamingo3MultiModalProcessor(AffinityProcessorMixin, AudioFlamingo3MultiModalProcessor):
    def stock_tokens(self, num_samples: int) -> int:
        # conv stride 2, then average pool 2 (vLLM counts on the frames summed over windows;
        # full windows have 3000 frames, so the per-window sum is the same number)
        return self.windowed_stock_tokens(num_samples, lambda f: ((f - 1) // 2 + 1 - 2) // 2 + 1)


@MULTIMODAL_REGISTRY.register_processor(
    AffinityAudioFlamingo3MultiModalProcessor,
    info=AffinityAudioFlamingo3ProcessingInfo,
    dummy_inputs=AffinityAudioFlamingo3DummyInputsBuilder,
)
class AffinityAudioFlamingo3ForConditionalGeneration(AffinityModelMixin, AudioFlamingo3ForConditionalGeneration):
    """Stock AudioFlamingo3 whose audio embeddings are pooled to the processor's count."""

    ARCH = ARCH
