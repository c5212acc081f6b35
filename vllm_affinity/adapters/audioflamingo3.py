"""AudioFlamingo3 on the adapter: both stages (Whisper-large-v3-style encoder, projector,
Qwen2 decoder, 1-D RoPE).

Differs from the base: its stock placeholder count (the processor cuts audio into 30 s
windows itself, up to ``max_audio_len``, and counts tokens from the frame mask summed
over an audio's windows; vLLM's model already concatenates the windows' embeddings per
audio, so pooling runs right after it), its ``<sound>`` placeholder, and its audio
length limit: with a deep stage one audio must fit one prefill step, so the server
accepts up to ``max_audio_seconds`` (120 s unless set; stock AF3 takes 600 s).
"""

from __future__ import annotations

import math

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

    def max_audio_seconds(self) -> float:
        """The longest audio encoded: the processor's cap, or the server's lower limit."""
        limit = self.facts.audio_seconds_limit(self.affinity)
        cap = float(self.get_hf_processor().max_audio_len)
        return cap if limit is None else min(cap, limit)

    def get_mm_max_tokens_per_item(self, seq_len, mm_counts=None):
        # the stock bound of the longest accepted audio, whatever the server ratio: a request
        # may ask for a higher keep ratio than the server default (as for Whisper)
        windows = math.ceil(round(self.max_audio_seconds() / self.facts.window_seconds, 6))
        return {"audio": self.facts.tokens_per_window * windows}


class AffinityAudioFlamingo3DummyInputsBuilder(AffinityDummyInputsMixin, AudioFlamingo3DummyInputsBuilder):
    pass


class AffinityAudioFlamingo3MultiModalProcessor(AffinityProcessorMixin, AudioFlamingo3MultiModalProcessor):
    info: AffinityAudioFlamingo3ProcessingInfo

    def stock_tokens(self, num_samples: int) -> int:
        processor = self.info.get_hf_processor()
        fe = processor.feature_extractor
        size = int(fe.sampling_rate * fe.chunk_length)
        windows = min(max(1, -(-num_samples // size)), int(processor.max_audio_len // fe.chunk_length))
        kept = min(num_samples, windows * size)
        frames = sum(-(-(min((i + 1) * size, kept) - i * size) // fe.hop_length) for i in range(windows))
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1  # conv stride 2, then average pool 2

    def placeholder_token_id(self) -> int:
        processor = self.info.get_hf_processor()
        token = getattr(processor, "audio_token", "<sound>")
        token_id = self.info.get_tokenizer().get_vocab().get(token)
        return processor.audio_token_id if token_id is None else token_id

    def truncation_hint(self) -> str:
        return f"AudioFlamingo3 encodes up to {self.info.max_audio_seconds():g} s"


@MULTIMODAL_REGISTRY.register_processor(
    AffinityAudioFlamingo3MultiModalProcessor,
    info=AffinityAudioFlamingo3ProcessingInfo,
    dummy_inputs=AffinityAudioFlamingo3DummyInputsBuilder,
)
class AffinityAudioFlamingo3ForConditionalGeneration(AffinityModelMixin, AudioFlamingo3ForConditionalGeneration):
    """Stock AudioFlamingo3 whose audio embeddings are pooled to the processor's count."""

    ARCH = ARCH
