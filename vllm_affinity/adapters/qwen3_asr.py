"""Qwen3-ASR on the adapter: both stages (chunked Whisper-style encoder, Qwen3 decoder).

Differs from the base: its stock count (13 tokens per 100 mel frames plus the
remainder's three stride-2 halvings, on at least ``min_length`` samples; the encoder
takes the whole audio, no windows, no cap) and, on the CPU build only, the torchvision
stand-in its vLLM module needs to import (:mod:`vllm_affinity.cpu_torchvision`,
installed by ``register()``). Its M-RoPE positions, where a checkpoint enables them, are
read from the placeholder length, which is already the pooled K; the tiny test model
uses 1-D RoPE.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen3_asr import (
    Qwen3ASRDummyInputsBuilder,
    Qwen3ASRForConditionalGeneration,
    Qwen3ASRMultiModalProcessor,
    Qwen3ASRProcessingInfo,
    _get_feat_extract_output_lengths,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .base import AffinityDummyInputsMixin, AffinityInfoMixin, AffinityModelMixin, AffinityProcessorMixin

ARCH = "Qwen3ASRForConditionalGeneration"


class AffinityQwen3AsrProcessingInfo(AffinityInfoMixin, Qwen3ASRProcessingInfo):
    ARCH = ARCH


class AffinityQwen3AsrDummyInputsBuilder(AffinityDummyInputsMixin, Qwen3ASRDummyInputsBuilder):
    pass


class AffinityQwen3AsrMultiModalProcessor(AffinityProcessorMixin, Qwen3ASRMultiModalProcessor):
    def stock_tokens(self, num_samples: int) -> int:
        fe = self.info.get_feature_extractor()
        frames = max(int(num_samples), int(getattr(fe, "min_length", 0))) // int(fe.hop_length)
        return int(_get_feat_extract_output_lengths(torch.tensor(frames)))


@MULTIMODAL_REGISTRY.register_processor(
    AffinityQwen3AsrMultiModalProcessor,
    info=AffinityQwen3AsrProcessingInfo,
    dummy_inputs=AffinityQwen3AsrDummyInputsBuilder,
)
class AffinityQwen3AsrForConditionalGeneration(AffinityModelMixin, Qwen3ASRForConditionalGeneration):
    """Stock Qwen3-ASR whose audio embeddings are pooled to the processor's count."""

    ARCH = ARCH
