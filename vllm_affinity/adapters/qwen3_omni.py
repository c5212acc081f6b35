"""Qwen3-Omni-MoE's thinker on the adapter: both stages, M-RoPE (:mod:`.omni`).

Differs from the base: its stock count (Qwen3-Omni's chunked encoder: 13 tokens per 100
mel frames plus three stride-2 halvings of the rest, on ceil(samples / hop) frames; vLLM
pads each audio to a whole hop and encodes all of it, no 30 s window); the Omni parts
(positions from K, ``use_audio_in_video`` refused, only audio embeddings pooled) come from
:mod:`.omni`. With a deep stage, requests with images or video are refused: vLLM adds
their "deepstack" visual features inside the first decoder layers, which the plugin's
deep forward does not replay. The MoE decoder layers are vLLM's own.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen3_omni_moe_thinker import (
    Qwen3OmniMoeThinkerDummyInputsBuilder,
    Qwen3OmniMoeThinkerForConditionalGeneration,
    Qwen3OmniMoeThinkerMultiModalProcessor,
    Qwen3OmniMoeThinkerProcessingInfo,
    _get_feat_extract_output_lengths,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .. import compat
from .base import AffinityDummyInputsMixin, AffinityInfoMixin, AffinityModelMixin, AffinityProcessorMixin
from .omni import OmniModelMixin, OmniProcessorMixin

ARCH = "Qwen3OmniMoeForConditionalGeneration"


class AffinityQwen3OmniProcessingInfo(AffinityInfoMixin, Qwen3OmniMoeThinkerProcessingInfo):
    ARCH = ARCH


class AffinityQwen3OmniDummyInputsBuilder(AffinityDummyInputsMixin, Qwen3OmniMoeThinkerDummyInputsBuilder):
    pass


class AffinityQwen3OmniMultiModalProcessor(
    OmniProcessorMixin, AffinityProcessorMixin, Qwen3OmniMoeThinkerMultiModalProcessor
):
    def stock_tokens(self, num_samples: int) -> int:
        hop = int(self.info.get_feature_extractor().hop_length)
        return int(_get_feat_extract_output_lengths(torch.tensor(-(-int(num_samples) // hop))))

    def check_request(self, inputs):
        items = inputs.mm_data_items
        visual = [m for m in ("image", "video") if m in items]
        if visual and self.info.affinity.deep is not None:
            raise ValueError(
                f"this Qwen3-Omni server has the vllm-affinity deep stage on, which serves audio and text: "
                f"the request's {' and '.join(visual)} input(s) carry deepstack features the deep stage does "
                "not replay. Send them to a server with the input stage alone"
            )
        return super().check_request(inputs)


@MULTIMODAL_REGISTRY.register_processor(
    AffinityQwen3OmniMultiModalProcessor,
    info=AffinityQwen3OmniProcessingInfo,
    dummy_inputs=AffinityQwen3OmniDummyInputsBuilder,
)
class AffinityQwen3OmniMoeThinkerForConditionalGeneration(
    OmniModelMixin, AffinityModelMixin, Qwen3OmniMoeThinkerForConditionalGeneration
):
    """Stock Qwen3-Omni-MoE thinker whose audio embeddings are pooled to the processor's count."""

    ARCH = ARCH
    SEAMS = compat.ADAPTER_SEAMS["qwen3_omni"]
