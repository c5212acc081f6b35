"""Whisper with Affinity Pooling of the encoder output (input stage only).

Whisper's decoder sees the audio only through cross-attention, over the encoder's
1500 output frames (30 s window, 50 frames/s). The plugin mean-pools those frames to
``K = num_kept(1500, keep_ratio)`` before the decoder's cross-attention, so every
cross-attention layer computes on, and keeps KV cache for, K frames instead of 1500.

How K reaches vLLM 0.32 (no patch needed): the encoder's token count is the length of
the audio placeholder in the encoder prompt (the multimodal processor's prompt
update). Everything downstream reads that one number (``mm_position.length``):
the scheduler's cross-attention block allocation (``num_encoder_tokens`` ->
``CrossAttentionManager``), the runner's encoder sequence lengths and cross-attention
slot mapping, and the encoder-cache budget. So:

* the processor (API-server side) validates the request, computes K from the server
  SPEC or the per-request ``mm_processor_kwargs.affinity_keep_ratio``, makes the
  placeholder K tokens long and hands K to the model as the per-item field
  ``affinity_num_kept``;
* the model (worker side) runs the stock encoder, then merges each audio's 1500
  frames into exactly K (exact-count grouping, :mod:`vllm_affinity.pooling`).

Not applicable to Whisper: the deep stage (it merges audio positions inside a
decoder-only LM's own sequence; Whisper's decoder has none) is refused with a config
error; ``encoder_real_length`` and ``long_audio`` are ignored with a log line (presets
set them for Qwen2-Audio): Whisper's encoder is trained on the zero-padded 30 s window
and vLLM's Whisper always encodes all of it; audio over 30 s is truncated as stock (the
transcription API splits long audio into 30 s chunks, one request each), or refused
with ``max_audio_seconds``.

The SPEC travels in the HF config (``--hf-overrides '{"affinity": SPEC}'``), as for
Qwen2-Audio. With no input stage and no per-request override, everything is stock.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.model_executor.models.whisper import (
    WhisperDummyInputsBuilder,
    WhisperForConditionalGeneration,
    WhisperMultiModalProcessor,
    WhisperProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from .. import pooling
from .common import check_request, pool_to_counts, refuse_additional_config
from ..config import (
    HF_CONFIG_KEY,
    REQUEST_KEEP_RATIO_KEY,
    AffinityConfig,
    AffinityConfigError,
    load_spec,
    request_keep_ratio,
)

# A child of vLLM's logger, so lines use vLLM's handler, format and VLLM_LOGGING_LEVEL.
logger = logging.getLogger("vllm.affinity")

NUM_KEPT_FIELD = "affinity_num_kept"
WINDOW_S = 30


def whisper_config(hf_config: Any) -> AffinityConfig:
    """The server SPEC (``hf_overrides.affinity``), validated for Whisper."""
    where = f"hf_overrides.{HF_CONFIG_KEY}"
    cfg = load_spec(getattr(hf_config, HF_CONFIG_KEY, None), where=where)
    if cfg.deep is not None:
        raise AffinityConfigError(
            f"invalid vllm-affinity config: {where}.deep is not supported for Whisper: the deep "
            "stage merges audio positions inside a decoder-only speech LM's sequence, and "
            "Whisper's decoder has none (it reads the audio through cross-attention). Use the "
            "input stage alone, which merges the encoder output before cross-attention, e.g. "
            "the preset 'input-only' or {\"input\": {\"keep_ratio\": 0.74}}"
        )
    return cfg


def describe(cfg: AffinityConfig, frames: int) -> str:
    """One line: what the plugin does to each audio's encoder frames."""
    s = cfg.input
    if s is None:
        what = f"input stage off: all {frames} encoder frames reach the decoder's cross-attention"
    else:
        what = (
            f"encoder frames {frames} -> {pooling.num_kept(frames, s.keep_ratio)} per audio "
            f"(keep_ratio={s.keep_ratio}, window={s.window}, method={s.method}), mean-pooled "
            "before the decoder's cross-attention, whose KV cache shrinks alike"
        )
    if cfg.allow_request_override:
        what += (
            f"; requests may set mm_processor_kwargs.{REQUEST_KEEP_RATIO_KEY} in "
            f"[{cfg.min_request_keep_ratio}, {cfg.max_request_keep_ratio}]"
        )
    return what


class AffinityWhisperProcessingInfo(WhisperProcessingInfo):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        # validated once per engine; a bad SPEC fails here, at start-up
        self.affinity = whisper_config(self.get_hf_config())

    def get_hf_processor(self, **kwargs: object):
        # our key is not an HF processor argument
        kwargs.pop(REQUEST_KEEP_RATIO_KEY, None)
        return super().get_hf_processor(**kwargs)

    def get_data_parser(self):
        # torchaudio (vLLM's default resampler) is absent from CPU installs: use soxr
        fe = self.get_feature_extractor()
        return MultiModalDataParser(
            target_sr=fe.sampling_rate,
            target_channels=self.get_target_channels(),
            audio_resample_method="soxr",
            expected_hidden_size=self._get_expected_hidden_size(),
        )

    def get_mm_max_tokens_per_item(self, seq_len, mm_counts=None):
        # The stock bound (all 1500 frames), whatever the server ratio: a request may ask
        # for a higher keep ratio than the server default. Sizes the encoder budget only.
        return {"audio": self.get_num_audio_tokens()}


class AffinityWhisperMultiModalProcessor(WhisperMultiModalProcessor):
    info: AffinityWhisperProcessingInfo

    def apply(self, inputs, timing_ctx):
        """Validate the request first (HTTP 400 naming the problem)."""
        cfg = self.info.affinity
        check_request(
            cfg, inputs, model="Whisper", window_s=WINDOW_S, limit_s=cfg.max_audio_seconds, truncates=True,
            hint="the transcription API splits long audio; set max_audio_seconds to reject such audio",
        )
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data, hf_kwargs):
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != REQUEST_KEEP_RATIO_KEY}
        return super()._call_hf_processor(hf_data, hf_kwargs)

    def _frames(self) -> int:
        return self.info.get_num_audio_tokens()  # max_source_positions: 1500

    def _postprocess_hf_mm_data(self, hf_data, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(hf_data, hf_processor_mm_kwargs, processed_data)
        feats = processed_data.get("input_features")
        if feats is None:
            return processed_data
        merged_kwargs = self.info.ctx.get_merged_mm_kwargs(hf_processor_mm_kwargs)
        ratio = request_keep_ratio(self.info.affinity, merged_kwargs)
        # always present (K = 1500 when off: the model's merge is then the identity), so
        # items of different requests batch together in the encoder
        k = pooling.num_kept(self._frames(), ratio)
        processed_data[NUM_KEPT_FIELD] = torch.full((len(feats),), k, dtype=torch.long)
        logger.debug("vllm-affinity: Whisper encoder frames %d -> %d (keep_ratio=%s)", self._frames(), k, ratio)
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[NUM_KEPT_FIELD] = MultiModalFieldConfig.batched("audio", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        stock = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        kept = out_mm_kwargs.get_data().get(NUM_KEPT_FIELD)
        if kept is None:
            return stock

        def replacement(item_idx: int) -> list[int]:
            return [0] * int(kept[item_idx])

        # the same dummy encoder prompt as stock ([0] -> one 0 per encoder token), K long
        return [PromptReplacement(modality="audio", target=[0], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(
    AffinityWhisperMultiModalProcessor,
    info=AffinityWhisperProcessingInfo,
    dummy_inputs=WhisperDummyInputsBuilder,
)
class AffinityWhisperForConditionalGeneration(WhisperForConditionalGeneration):
    """Stock Whisper whose encoder output is pooled to the processor's count."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        refuse_additional_config(vllm_config)
        hf_config = vllm_config.model_config.hf_config
        self.affinity = whisper_config(hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        frames = int(hf_config.max_source_positions)
        logger.info("vllm-affinity: Whisper with Affinity Pooling: %s", describe(self.affinity, frames))
        if self.affinity.encoder_real_length:
            logger.info(
                "vllm-affinity: encoder_real_length is ignored for Whisper (its encoder is trained "
                "on the zero-padded %d s window; the encoder runs on all of it, as stock)", WINDOW_S,
            )
        if getattr(self.affinity, "long_audio", "truncate") != "truncate":
            logger.info(
                "vllm-affinity: long_audio=%s is ignored for Whisper (audio over %d s is truncated "
                "as stock; the transcription API splits long audio into %d s chunks)",
                self.affinity.long_audio, WINDOW_S, WINDOW_S,
            )

    def embed_multimodal(self, **kwargs: object):
        kept = kwargs.pop(NUM_KEPT_FIELD, None)
        embeds = super().embed_multimodal(**kwargs)
        if kept is None:
            return embeds
        return pool_to_counts(embeds, kept, self.affinity)
