"""Affinity Pooling on transformers' ``AudioFlamingo3ForConditionalGeneration``.

Same weights, same pooling functions (:mod:`vllm_affinity.pooling`), no vLLM; the
generation (plain greedy loop, deep merge stage) is :class:`~.base.ReferenceSpeechLM`'s.

The audio path mirrors transformers' ``AudioFlamingo3Processor`` + model forward and
vLLM's ``AudioFlamingo3ForConditionalGeneration``:

1. each 16 kHz audio is cut into 30 s windows, ``n_win = max(1, ceil(n / 480000))``
   capped at ``max_audio_len // 30`` (the processor's ``chunk_counts``; audio beyond
   the cap is dropped), the last window holding the remainder;
2. every window is a zero-padded 3000-frame log-mel with its frame mask
   (``input_features``, ``input_features_mask``; vLLM renames the mask
   ``feature_attention_mask``);
3. encoder (conv, 1500 positions, padding-masked self-attention, AvgPool1d(2),
   LayerNorm) + projector; the valid rows of a window are
   ``((frames - 1) // 2 + 1 - 2) // 2 + 1`` (750 for a full window);
4. the windows' valid rows are concatenated per audio: one ``(n_i, hidden)`` tensor.

The prompt holds one ``<sound>`` per audio (unexpanded), e.g.
``<|im_start|>user\\n<sound>QUESTION<|im_end|>\\n<|im_start|>assistant\\n``.
"""

from __future__ import annotations

import torch

from .base import ProcessorWindowedSpeechLM


class ReferenceAudioFlamingo3(ProcessorWindowedSpeechLM):
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AudioFlamingo3ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        self.audio_token_id = int(self.model.config.audio_token_id)

    # -- audio path (windowing: ProcessorWindowedSpeechLM) ----------------------------
    @torch.no_grad()
    def encode_windows(self, feats: torch.Tensor, fmask: torch.Tensor) -> list[torch.Tensor]:
        """Encoder (padding-masked) + projector of each window, valid rows only."""
        tower = self.model.model.audio_tower
        hidden = tower(feats, input_features_mask=fmask).last_hidden_state
        proj = self.model.model.multi_modal_projector(hidden)
        _, post_lens = tower._get_feat_extract_output_lengths(fmask.sum(-1).to(torch.long))
        return [proj[i, : int(post_lens[i])] for i in range(feats.shape[0])]

    @staticmethod
    def tokens_from_frames(frames: int) -> int:
        """Conv stride 2, then AvgPool1d(2): 750 per full window."""
        conv = (frames - 1) // 2 + 1
        return (conv - 2) // 2 + 1
