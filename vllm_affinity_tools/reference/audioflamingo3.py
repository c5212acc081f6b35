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

import numpy as np
import torch

from .base import TARGET_SR, ReferenceSpeechLM, to_16k_mono


class ReferenceAudioFlamingo3(ReferenceSpeechLM):
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AudioFlamingo3ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        self.audio_token_id = int(self.model.config.audio_token_id)

    # -- audio path -------------------------------------------------------------------
    def split_windows(self, wave: np.ndarray) -> list[np.ndarray]:
        """The 30 s windows ``AudioFlamingo3Processor`` cuts a 16 kHz wave into."""
        fe = self.processor.feature_extractor
        size = int(TARGET_SR * fe.chunk_length)
        max_windows = int(self.processor.max_audio_len // fe.chunk_length)
        n = int(wave.shape[0])
        n_win = min(max(1, (n + size - 1) // size), max_windows)
        cap = min(n, n_win * size)
        return [wave[i * size : min((i + 1) * size, cap)] for i in range(n_win)]

    @torch.no_grad()
    def window_embeddings(self, audios: list[tuple[np.ndarray, int]]) -> list[list[torch.Tensor]]:
        """Encoder + projector output of every 30 s window, padded rows removed:
        ``[[(n_iw, H) per window] per audio]``."""
        waves = [to_16k_mono(a, sr) for a, sr in audios]
        windows = [self.split_windows(w) for w in waves]
        flat = [x for ws in windows for x in ws]
        feats, fmask = self.features(flat)
        tower = self.model.model.audio_tower
        hidden = tower(feats, input_features_mask=fmask).last_hidden_state
        proj = self.model.model.multi_modal_projector(hidden)
        _, post_lens = tower._get_feat_extract_output_lengths(fmask.sum(-1).to(torch.long))
        rows = [proj[i, : int(post_lens[i])] for i in range(len(flat))]
        it = iter(rows)
        return [[next(it) for _ in ws] for ws in windows]

    def audio_embeddings(self, audios: list[tuple[np.ndarray, int]]) -> list[torch.Tensor]:
        """Encoder + projector output of each audio, padded rows removed, windows
        concatenated in time order: [(n_i, H)]."""
        return [torch.cat(ws) for ws in self.window_embeddings(audios)]

    def num_audio_tokens(self, n_samples: int) -> int:
        """Placeholders an audio of ``n_samples`` (16 kHz) expands to (= rows of
        :meth:`audio_embeddings`): the processor's count, from the frame mask summed
        over the audio's windows."""
        fe = self.processor.feature_extractor
        size = int(TARGET_SR * fe.chunk_length)
        n_win = min(max(1, -(-n_samples // size)), int(self.processor.max_audio_len // fe.chunk_length))
        cap = min(n_samples, n_win * size)
        frames = sum(-(-(min((i + 1) * size, cap) - i * size) // fe.hop_length) for i in range(n_win))
        conv = (frames - 1) // 2 + 1
        return (conv - 2) // 2 + 1
