"""Affinity Pooling on transformers' ``GlmAsrForConditionalGeneration``.

Same weights, same pooling functions (:mod:`vllm_affinity.pooling`), no vLLM; the
generation (plain greedy loop, deep merge stage) is :class:`~.base.ReferenceSpeechLM`'s,
the 30 s windowing :class:`~.base.ProcessorWindowedSpeechLM`'s (AF3's, the same cut).

The audio path mirrors transformers' ``GlmAsrProcessor`` + ``get_audio_features`` and
vLLM's ``GlmAsrForConditionalGeneration``:

1. each 16 kHz audio is cut into 30 s windows, ``n_win = max(1, ceil(n / 480000))``
   capped at ``max_audio_len // 30`` (vLLM's ``chunk_counts``; audio beyond the cap is
   dropped), the last window holding the remainder;
2. every window is a zero-padded 3000-frame log-mel with its frame mask
   (``input_features``, ``input_features_mask``; vLLM renames the mask
   ``feature_attention_mask``);
3. encoder: conv1, conv2 (stride 2) -> 1500 frames, rotary self-attention over all
   1500 (no padding mask: padded frames take part, in HF and vLLM alike), LayerNorm;
   then 4 consecutive frames are concatenated into one ``intermediate_size`` row
   (``reshape(B, -1, 4 * d_model)``, 375 rows) and projected (Linear-GELU-Linear);
   the valid rows of a window are ``(c - 4) // 4 + 1`` with ``c = (f - 1) // 2 + 1``
   for ``f`` mask frames (375 for a full window);
4. the windows' valid rows are concatenated per audio: one ``(n_i, hidden)`` tensor.

The prompt holds one ``<|pad|>`` per audio (unexpanded), inside GLM-ASR's audio
brackets, e.g. ``<|user|>\\n<|begin_of_audio|><|pad|><|end_of_audio|><|user|>\\nQUESTION
<|assistant|>\\n`` (:func:`vllm_affinity_tools.tiny_glmasr.prompt`). transformers'
processor takes one audio per prompt; the reference takes any number.
"""

from __future__ import annotations

import torch

from .base import ProcessorWindowedSpeechLM

MERGE_FACTOR = 4  # encoder frames per audio token (transformers and vLLM hard-code 4)


class ReferenceGlmAsr(ProcessorWindowedSpeechLM):
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoProcessor, GlmAsrForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = GlmAsrForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        self.audio_token_id = int(self.model.config.audio_token_id)

    # -- audio path (windowing: ProcessorWindowedSpeechLM) ----------------------------
    @torch.no_grad()
    def encode_windows(self, feats: torch.Tensor, fmask: torch.Tensor) -> list[torch.Tensor]:
        """Encoder + frame merge + projector of each window, valid rows only."""
        inner = self.model.model
        hidden = inner.audio_tower(feats).last_hidden_state
        merged = hidden.reshape(feats.shape[0], -1, inner.config.audio_config.intermediate_size)
        proj = inner.multi_modal_projector(merged)
        frames = fmask.sum(-1).to(torch.long).tolist()
        return [proj[i, : self.tokens_from_frames(f)] for i, f in enumerate(frames)]

    @staticmethod
    def tokens_from_frames(frames: int) -> int:
        """conv1 (stride 1), conv2 (stride 2), then 4 frames per token: 375 per full
        window (``GlmAsrProcessor._get_audio_token_length``)."""
        for padding, kernel, stride in ((1, 3, 1), (1, 3, 2)):
            frames = (frames + 2 * padding - (kernel - 1) - 1) // stride + 1
        return (frames - MERGE_FACTOR) // MERGE_FACTOR + 1
