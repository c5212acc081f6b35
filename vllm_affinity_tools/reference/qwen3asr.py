"""Affinity Pooling on transformers' ``Qwen3ASRForConditionalGeneration``.

Same weights, same pooling functions (:mod:`vllm_affinity.pooling`), no vLLM; the
generation (plain greedy loop, deep merge stage) is :class:`~.base.ReferenceSpeechLM`'s.

The audio path mirrors transformers' ``Qwen3ASRProcessor`` + ``get_audio_features`` and
vLLM's ``Qwen3ASRForConditionalGeneration``:

1. each 16 kHz audio is featurised on its own (vLLM calls the processor once per
   clip): ``Qwen3ASRFeatureExtractor`` zero-pads clips shorter than ``min_length``
   (8000 samples, 0.5 s), computes ``T = max(n, 8000) // 160`` log-mel frames (no 30 s
   window, no cap, no truncation) and pads the mel axis to a multiple of 100 with a
   frame mask;
2. encoder: the frames are cut into 100-frame chunks (``2 * n_window``), three
   stride-2 conv2d per chunk (13 rows for a full chunk), sinusoidal positions per
   chunk, the valid rows of all chunks packed, windowed self-attention
   (``n_window_infer`` 800 frames = 104 rows per window), LayerNorm, then the projector
   (Linear-GELU-Linear; vLLM's ``audio_tower.proj1/proj2``);
3. the count is ``13 * (T // 100) + c(T % 100)`` with ``c`` three halvings (ceil) of
   the remainder, 0 for 0 (vLLM's ``_get_feat_extract_output_lengths``), e.g. 65 rows
   for 5 s (500 frames), 260 for 20 s (2000 frames).

The prompt holds one ``<|audio_pad|>`` per audio (unexpanded), inside the audio
brackets, e.g. ``<|im_start|>user\\n<|audio_start|><|audio_pad|><|audio_end|>QUESTION
<|im_end|>\\n<|im_start|>assistant\\n`` (:func:`vllm_affinity_tools.tiny_qwen3asr.prompt`).
transformers' processor takes one audio per prompt; the reference takes any number.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import TARGET_SR, ReferenceSpeechLM, to_16k_mono

CHUNK_FRAMES = 100  # 2 * n_window; vLLM's count hard-codes it
TOKENS_PER_CHUNK = 13


class ReferenceQwen3Asr(ReferenceSpeechLM):
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoProcessor, Qwen3ASRForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = Qwen3ASRForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        self.audio_token_id = int(self.model.config.audio_token_id)
        n_window = int(self.model.config.audio_config.n_window)
        if 2 * n_window != CHUNK_FRAMES:
            raise ValueError(f"audio_config.n_window must be 50 (vLLM counts 100-frame chunks), got {n_window}")

    # -- audio path ------------------------------------------------------------------------
    def features(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features of one or more 16 kHz waves (padded to the longest, mel axis
        to a multiple of 100) and their frame mask, as the processor computes them."""
        fe = self.processor.feature_extractor(
            waves, sampling_rate=TARGET_SR, return_attention_mask=True, padding=True,
            truncation=False, n_window=CHUNK_FRAMES // 2, return_tensors="pt",
        )
        return fe["input_features"].to(self.model.dtype), fe["attention_mask"]

    @torch.no_grad()
    def audio_embeddings(self, audios: list[tuple[np.ndarray, int]]) -> list[torch.Tensor]:
        """Encoder + projector output of each audio (each featurised and encoded on its
        own, as vLLM does): [(n_i, H)]."""
        out = []
        for a, sr in audios:
            feats, fmask = self.features([to_16k_mono(a, sr)])
            emb = self.model.model.get_audio_features(feats, fmask).pooler_output
            n = self.tokens_from_frames(int(fmask.sum()))
            if emb.shape[0] != n:
                raise RuntimeError(f"encoder returned {emb.shape[0]} rows, the count says {n}")
            out.append(emb)
        return out

    @staticmethod
    def tokens_from_frames(frames: int) -> int:
        """13 rows per full 100-frame chunk plus three stride-2 halvings of the remainder
        (0 for none): ``Qwen3ASRProcessor._get_audio_token_length``."""
        rest = frames % CHUNK_FRAMES
        for _ in range(3):
            rest = (rest - 1) // 2 + 1 if rest > 0 else 0
        return rest + (frames // CHUNK_FRAMES) * TOKENS_PER_CHUNK

    def num_audio_tokens(self, n_samples: int) -> int:
        """Placeholders an audio of ``n_samples`` (16 kHz) expands to (= rows of
        :meth:`audio_embeddings`): ``T = max(n, min_length) // hop`` frames."""
        fe = self.processor.feature_extractor
        return int(self.tokens_from_frames(max(int(n_samples), int(fe.min_length)) // int(fe.hop_length)))
