"""Kimi-Audio (``MoonshotKimiaForCausalLM``) on the adapter: input and deep stages
(Whisper-large-v3 encoder, 4 frames concatenated into one row, VQ adaptor, Qwen2 decoder,
1-D RoPE). The model of the paper's second set of experiments.

What differs from the base:

* **What is pooled is the LM's input, not the encoder's output.** vLLM's Kimi-Audio fuses
  at embedding time: a placeholder ``<|im_kimia_text_blank|>`` at audio row ``i`` becomes
  ``(e_blank + a_i) * sqrt(2)``. Pooling ``a`` and fusing afterwards would choose groups on
  other vectors than the ones the decoder reads, so :meth:`stock_embeddings` returns the
  fused rows (exactly stock's arithmetic), the base pools them, and :meth:`embed_input_ids`
  only places them.
* **Its count.** The processor featurises the audio to its own length (no 30 s padding;
  the feature extractor truncates at 30 s): ``T = min(ceil(n / 160), 3000)`` mel frames,
  ``13 * (T // 100) + c(T % 100)`` placeholders, while the encoder gives
  ``ceil(ceil(T / 2) / 4)`` rows (390 placeholders for 375 rows on 30 s). Stock fills the
  placeholders past the rows with the bare blank embedding (not scaled); so does the adapter.
* **One audio at a time through the encoder.** Stock stacks a batch's features, which fails
  when two requests' audios differ in length (``torch.stack``); the adapter encodes each
  audio on its own (one audio per prompt, the processor's limit, so a request never loses).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.kimi_audio import (
    KimiAudioDummyInputsBuilder,
    KimiAudioForConditionalGeneration,
    KimiAudioMultiModalProcessor,
    KimiAudioProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .. import compat
from .base import AffinityDummyInputsMixin, AffinityInfoMixin, AffinityModelMixin, AffinityProcessorMixin

ARCH = "MoonshotKimiaForCausalLM"
BLANK_ID = 151666  # <|im_kimia_text_blank|>: vLLM's Kimi processor and tokenizer hard-code it
FUSION_SCALE = 2**0.5  # vLLM's Kimi-Audio: (text + audio) * sqrt(2)


def placeholder_count(frames: int) -> int:
    """Kimi-Audio's placeholders for ``frames`` mel frames: 13 per full 100, then three
    halvings (ceil) of the remainder (0 for 0)."""
    rest = frames % 100
    c = (rest - 1) // 2 + 1
    c = ((c - 1) // 2 + 1 - 1) // 2 + 1
    return int(c + (frames // 100) * 13)


class AffinityKimiAudioProcessingInfo(AffinityInfoMixin, KimiAudioProcessingInfo):
    ARCH = ARCH


class AffinityKimiAudioDummyInputsBuilder(AffinityDummyInputsMixin, KimiAudioDummyInputsBuilder):
    pass


class AffinityKimiAudioMultiModalProcessor(AffinityProcessorMixin, KimiAudioMultiModalProcessor):
    def stock_tokens(self, num_samples: int) -> int:
        fe = self.info.get_feature_extractor()
        return placeholder_count(min(-(-num_samples // fe.hop_length), int(fe.nb_max_frames)))

    def placeholder_token_id(self) -> int:
        return BLANK_ID

    def truncation_hint(self) -> str:
        return "Kimi-Audio's feature extractor keeps 30 s; set max_audio_seconds to reject longer audio"


@MULTIMODAL_REGISTRY.register_processor(
    AffinityKimiAudioMultiModalProcessor,
    info=AffinityKimiAudioProcessingInfo,
    dummy_inputs=AffinityKimiAudioDummyInputsBuilder,
)
class AffinityKimiAudioForConditionalGeneration(AffinityModelMixin, KimiAudioForConditionalGeneration):
    """Stock Kimi-Audio whose fused audio rows are pooled to the processor's count."""

    ARCH = ARCH
    SEAMS = compat.ADAPTER_SEAMS["kimi_audio"]

    def stock_embeddings(self, **kwargs: object):
        """The LM-input rows of each audio's n placeholders, as stock vLLM fuses them."""
        feats = kwargs.get("whisper_input_features")
        masks = kwargs.get("feature_attention_mask")
        if feats is None:
            return []
        feats = list(feats.unbind(0)) if isinstance(feats, torch.Tensor) else list(feats)
        masks = list(masks.unbind(0)) if isinstance(masks, torch.Tensor) else list(masks)
        embed = self.language_model.model.embed_tokens
        out = []
        for f, m in zip(feats, masks):
            frames = int(m.sum())
            audio = self.audio_tower([f[..., :frames]])  # (1, ceil(T/2), d)
            b, t, d = audio.shape
            audio = torch.nn.functional.pad(audio, (0, 0, 0, (-t) % 4)).reshape(b, -1, 4 * d)
            audio = self.multi_modal_projector(audio)[0]
            n = placeholder_count(frames)
            blank = embed(torch.full((n,), BLANK_ID, dtype=torch.long, device=audio.device))
            used = min(n, audio.shape[0])
            rows = blank.clone()
            rows[:used] = (audio[:used].to(blank.dtype) + blank[:used]) * FUSION_SCALE
            out.append(rows)
        return out

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        """Text embeddings with the (pooled) fused audio rows placed at the placeholders."""
        inputs_embeds = self.language_model.model.embed_tokens(input_ids)
        if not multimodal_embeddings or is_multimodal is None or not bool(is_multimodal.any()):
            return inputs_embeds
        rows = torch.cat([e.reshape(-1, e.shape[-1]) for e in multimodal_embeddings])
        slots = int(is_multimodal.sum())
        if rows.shape[0] != slots:
            raise RuntimeError(f"vllm-affinity: {rows.shape[0]} Kimi-Audio rows for {slots} audio placeholders")
        inputs_embeds[is_multimodal] = rows.to(inputs_embeds.dtype)
        return inputs_embeds

