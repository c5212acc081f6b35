"""Affinity Pooling on transformers' ``Qwen2AudioForConditionalGeneration``.

Same weights, same pooling functions (:mod:`vllm_affinity.pooling`), no vLLM.
The audio path mirrors transformers' own forward (encoder with the padding mask,
projector, drop padded frames); the pooled embeddings replace K placeholder tokens
(``<|AUDIO|>``) and the greedy loops of :class:`~.base.ReferenceSpeechLM` (plain, or
the deep merge stage after decoder layer ``deep_merge_layer``) produce tokens and
per-step log-probabilities over the whole vocabulary (fp32).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch


from .base import (  # noqa: F401  (re-exported: older imports name this module)
    TARGET_SR,
    ReferenceOutput,
    ReferenceSpeechLM,
    _causal_mask,
    calibrate_keep_ratio,
    to_16k_mono,
)


class ReferenceQwen2Audio(ReferenceSpeechLM):
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        self.audio_token_id = int(self.model.config.audio_token_index)

    # -- audio path -------------------------------------------------------------------
    @torch.no_grad()
    def audio_embeddings(
        self,
        audios: list[tuple[np.ndarray, int]],
        encoder_real_length: bool = False,
        long_audio: Literal["truncate", "windows"] = "truncate",
    ) -> list[torch.Tensor]:
        """Encoder + projector output of each audio, padded frames removed: [(n_i, H)].

        ``encoder_real_length``: encode only the real frames (+ margin), as the plugin
        does with that switch (:mod:`vllm_affinity.encoder`).
        ``long_audio="windows"``: encode each 30 s window (``encoder.window_bounds``) as an
        audio of its own and concatenate the windows' outputs; "truncate" keeps 30 s."""
        waves = [to_16k_mono(a, sr) for a, sr in audios]
        if long_audio == "windows":
            from vllm_affinity.encoder import split_windows

            n_samples = self.processor.feature_extractor.n_samples
            windows = [split_windows(w, n_samples) for w in waves]
            flat = self._embed_waves([x for ws in windows for x in ws], encoder_real_length)
            it = iter(flat)
            return [torch.cat([next(it) for _ in ws]) for ws in windows]
        return self._embed_waves(waves, encoder_real_length)

    def _embed_waves(self, waves: list[np.ndarray], encoder_real_length: bool) -> list[torch.Tensor]:
        from transformers.masking_utils import create_bidirectional_mask

        feats, fmask = self.features(waves)
        tower = self.model.model.audio_tower
        if encoder_real_length:
            from vllm_affinity.encoder import encode_real_length

            proj = self.model.model.multi_modal_projector
            return [proj(encode_real_length(tower, f, int(m.sum()))) for f, m in zip(feats, fmask)]
        feat_lens, out_lens = tower._get_feat_extract_output_lengths(fmask.sum(-1))
        b, _, max_mel = feats.shape
        max_seq = (max_mel - 2) // 2 + 1
        valid = torch.arange(max_seq)[None, :] < feat_lens[:, None]
        mask = create_bidirectional_mask(
            config=tower.config,
            inputs_embeds=torch.zeros(b, max_seq, 1, dtype=feats.dtype),
            attention_mask=valid.long(),
        )
        hidden = tower(feats, attention_mask=mask).last_hidden_state
        proj = self.model.model.multi_modal_projector(hidden)
        return [proj[i, : int(out_lens[i])] for i in range(b)]

    # -- generation -------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        audios: list[tuple[np.ndarray, int]],
        *,
        encoder_real_length: bool = False,
        long_audio: Literal["truncate", "windows"] = "truncate",
        **kw,
    ) -> ReferenceOutput:
        """Greedy decoding; ``prompt`` holds one ``<|AUDIO|>`` per audio (unexpanded).
        ``encoder_real_length`` / ``long_audio`` as the plugin's switches; every other
        argument (pooling, deep stage, wrong-variant hooks) is :meth:`ReferenceSpeechLM.generate`'s."""
        return super().generate(
            prompt, audios, encoder_real_length=encoder_real_length, long_audio=long_audio, **kw
        )
