"""Qwen2-Audio on the adapter: both stages, plus what only this model has.

Differs from the base: its stock placeholder count (Whisper-style encoder, 25 tokens
per second of the first 30 s window); ``encoder_real_length`` (encode the real length,
not the padded window: :mod:`vllm_affinity.encoder`); ``long_audio: windows`` (each
30 s window is one row of ``input_features``, ``affinity_num_windows`` says which rows
make one audio, and their embeddings are concatenated before pooling); the encoder stage
(``encoder``: each window's real positions merged after encoder layer E to twice the
window's token count ``num_kept(tokens, keep_ratio)``, so the encoder's stride-2 pool gives
exactly that many; on the real length, whatever ``encoder_real_length`` says).
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.models.qwen2_audio import (
    Qwen2AudioDummyInputsBuilder,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioMultiModalProcessor,
    Qwen2AudioProcessingInfo,
    _get_feat_extract_output_lengths,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig

from .. import encoder as enc_stage
from ..encoder import encode_real_length, split_windows, window_mel_frames
from .base import (
    AffinityDummyInputsMixin,
    AffinityInfoMixin,
    AffinityModelMixin,
    AffinityProcessorMixin,
    trace_merge,
)

logger = logging.getLogger("vllm.affinity")

ARCH = "Qwen2AudioForConditionalGeneration"
#: per audio, how many rows of input_features (30 s encoder windows) it spans
NUM_WINDOWS_FIELD = "affinity_num_windows"


class AffinityQwen2AudioProcessingInfo(AffinityInfoMixin, Qwen2AudioProcessingInfo):
    ARCH = ARCH

    def get_mm_max_tokens_per_item(self, seq_len, mm_counts=None):
        # one audio may span several 30 s encoder windows: size vLLM's encoder cache and
        # profiling for the longest audio this server accepts
        out = dict(super().get_mm_max_tokens_per_item(seq_len, mm_counts))
        if "audio" in out:
            out["audio"] *= self.facts.max_windows(self.affinity)
        return out


class AffinityQwen2AudioDummyInputsBuilder(AffinityDummyInputsMixin, Qwen2AudioDummyInputsBuilder):
    pass


class AffinityQwen2AudioMultiModalProcessor(AffinityProcessorMixin, Qwen2AudioMultiModalProcessor):
    info: AffinityQwen2AudioProcessingInfo

    def _window_frames(self, num_samples: int) -> list[int]:
        fe = self.info.get_feature_extractor()
        return window_mel_frames(num_samples, windows=self.info.affinity.long_audio == "windows",
                                 window_samples=fe.n_samples, hop=fe.hop_length)

    def stock_tokens(self, num_samples: int) -> int:
        """Per encoder window, the feature extractor marks ceil(samples / hop) frames (at
        most its 30 s window), then the encoder's two stride-2 stages. Stock Qwen2-Audio
        has one window (the first 30 s)."""
        frames = torch.tensor(self._window_frames(num_samples))
        return int(_get_feat_extract_output_lengths(frames)[1].sum())

    def encoder_stage_tokens(self, num_samples: int) -> int:
        """Tokens the encoder stage leaves: per window ``num_kept(its tokens, keep_ratio)``."""
        ratio = self.info.affinity.encoder.keep_ratio
        return sum(enc_stage.encoder_stage_tokens(f, ratio) for f in self._window_frames(num_samples))

    def placeholder_token_id(self) -> int:
        return self.info.get_hf_processor().audio_token_id

    def truncation_hint(self) -> str:
        return "set long_audio: windows to encode all of it, or max_audio_seconds to reject such audio"

    def _call_hf_processor(self, hf_data, hf_kwargs):
        audios = hf_data.get("audio")
        if self.info.affinity.long_audio != "windows" or not audios:
            return super()._call_hf_processor(hf_data, hf_kwargs)
        # Long audio: every 30 s window becomes one row of input_features, exactly as if
        # it were an audio of its own. (The text here is vLLM's dummy text, one
        # placeholder per HF audio; the real prompt is expanded by _get_prompt_updates.)
        n_samples = self.info.get_feature_extractor().n_samples
        windows = [split_windows(a, n_samples) for a in audios]
        data = dict(hf_data, audio=[w for ws in windows for w in ws])
        if "text" in data:
            data["text"] = self.dummy_inputs.get_dummy_text({"audio": len(data["audio"])})
        out = super()._call_hf_processor(data, hf_kwargs)
        out[NUM_WINDOWS_FIELD] = torch.tensor([len(ws) for ws in windows], dtype=torch.long)
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        num_windows = hf_inputs.get(NUM_WINDOWS_FIELD)
        if num_windows is not None:
            for key in ("input_features", "feature_attention_mask"):
                fields[key] = MultiModalFieldConfig.flat_from_sizes("audio", num_windows)
            fields[NUM_WINDOWS_FIELD] = MultiModalFieldConfig.batched("audio", keep_on_cpu=True)
        return fields


@MULTIMODAL_REGISTRY.register_processor(
    AffinityQwen2AudioMultiModalProcessor,
    info=AffinityQwen2AudioProcessingInfo,
    dummy_inputs=AffinityQwen2AudioDummyInputsBuilder,
)
class AffinityQwen2AudioForConditionalGeneration(AffinityModelMixin, Qwen2AudioForConditionalGeneration):
    """Stock Qwen2-Audio whose audio embeddings are pooled to the processor's count."""

    ARCH = ARCH
    SUPPORTS_ENCODER_REAL_LENGTH = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        enc = self.affinity.encoder
        # checked against the model at start-up (a bad merge_layer fails here, naming the field)
        self.encoder_layer = None if enc is None else enc.resolve_layer(len(self.audio_tower.layers))

    def describe(self) -> str:
        line = super().describe()
        if self.affinity.encoder is not None and not self.affinity.encoder_real_length:
            line += "; the encoder stage encodes the real audio length (+ margin), not the 30 s window"
        return line

    def _process_audio_input(self, audio_input):
        stage = self.affinity.encoder
        if (stage is None and not self.affinity.encoder_real_length) or audio_input["type"] != "audio_features":
            return super()._process_audio_input(audio_input)
        out = []
        for feats, mask in zip(audio_input["input_features"], audio_input["feature_attention_mask"]):
            frames = int(mask.sum())
            if stage is None:
                logger.debug("vllm-affinity: encoder on %d of %d mel frames", frames, feats.shape[-1])
                tokens = encode_real_length(self.audio_tower, feats, frames)
            else:
                tokens, sizes = enc_stage.encode_merged(self.audio_tower, feats, frames, self.encoder_layer,
                                                        stage.keep_ratio, stage.method, stage.window,
                                                        size_weighted=stage.size_weighted)
                trace_merge("encoder", sizes)
                logger.debug("vllm-affinity: encoder stage: %d mel frames, %d positions -> %d after encoder "
                             "layer %d, %d tokens", frames, int(sizes.sum()), sizes.numel(), self.encoder_layer,
                             tokens.shape[0])
            out.append(self.multi_modal_projector(tokens))
        return tuple(out)

    def stock_embeddings(self, **kwargs: object):
        num_windows = kwargs.pop(NUM_WINDOWS_FIELD, None)
        embeds = super().stock_embeddings(**kwargs)
        if num_windows is None:
            return embeds
        # one embedding per 30 s window: concatenate per audio
        counts = [int(x) for x in (num_windows.tolist() if isinstance(num_windows, torch.Tensor) else num_windows)]
        if sum(counts) != len(embeds):
            raise RuntimeError(f"vllm-affinity: {sum(counts)} encoder windows expected, got {len(embeds)}")
        it = iter(embeds)
        return tuple(torch.cat([next(it) for _ in range(c)]) for c in counts)
