"""Affinity Pooling on transformers' ``Qwen3OmniMoeThinkerForConditionalGeneration``.

Same weights, same pooling functions (:mod:`vllm_affinity.pooling`), no vLLM; the
generation (plain greedy loop, deep merge stage) is :class:`~.base.ReferenceSpeechLM`'s.
The checkpoint is the full ``Qwen3OmniMoeForConditionalGeneration`` one
(:mod:`vllm_affinity_tools.tiny_qwen3omni`, or the hub's); only the thinker is loaded,
as vLLM does.

The audio path mirrors vLLM's ``Qwen3OmniMoeThinkerMultiModalProcessor`` and
``Qwen3OmniMoeAudioEncoder`` (transformers' ``Qwen3OmniMoeProcessor`` +
``get_audio_features`` compute the same):

1. each 16 kHz audio is featurised on its own (vLLM calls the processor once per clip),
   zero-padded to a multiple of the hop (160 samples; vLLM pre-pads so its processor
   cache works), then ``WhisperFeatureExtractor`` with ``padding=True`` (to the clip
   itself) and no truncation: ``T = ceil(n / 160)`` log-mel frames, no 30 s window,
   no cap (vLLM rewrites the frame mask to exactly those ``T`` frames);
2. encoder: the frames are cut into 100-frame chunks (``2 * n_window``), three stride-2
   conv2d per chunk (13 rows for a full chunk), sinusoidal positions per chunk, the
   valid rows of all chunks packed, windowed self-attention (``n_window_infer`` 800
   frames = 104 rows per window), LayerNorm, ``proj1`` - GELU - ``proj2`` (to the text
   hidden size; no separate projector);
3. the count is ``13 * (T // 100) + c(T % 100)`` with ``c`` three halvings (ceil) of the
   remainder, 0 for 0 (``_get_feat_extract_output_lengths``), e.g. 65 rows for 5 s
   (500 frames), 156 for 12 s, 585 for 45 s.

Text model: Qwen3-MoE (``model.model``: ``layers``, ``norm``, ``rotary_emb``; the
``lm_head`` is ``model.lm_head``) with interleaved M-RoPE. In a prompt of text and audio
only, vLLM's ``get_mrope_input_positions`` and transformers' ``get_rope_index`` give every
token the same temporal, height and width position, its index 0..T-1 (the audio rows
continue the text positions, ``<|audio_end|>`` follows them), so :meth:`rope_positions`
repeats the 1-D positions three times; a merged row's floor-of-mean position is the same
in each component. The decoder layers return a tensor (the router logits are recorded
by hooks, not returned), so the base's deep loop drives them unchanged.

The prompt holds one ``<|audio_pad|>`` per audio (unexpanded), inside the audio
brackets, e.g. ``<|im_start|>user\\n<|audio_start|><|audio_pad|><|audio_end|>QUESTION
<|im_end|>\\n<|im_start|>assistant\\n`` (:func:`vllm_affinity_tools.tiny_qwen3omni.prompt`).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import TARGET_SR, ReferenceSpeechLM, to_16k_mono

CHUNK_FRAMES = 100  # 2 * n_window; vLLM's count hard-codes it
TOKENS_PER_CHUNK = 13


class ReferenceQwen3Omni(ReferenceSpeechLM):
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32) -> None:
        from transformers import (
            AutoProcessor,
            Qwen3OmniMoeThinkerForConditionalGeneration,
        )

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        self.audio_token_id = int(self.model.config.audio_token_id)
        n_window = int(self.model.config.audio_config.n_window)
        if 2 * n_window != CHUNK_FRAMES:
            raise ValueError(f"audio_config.n_window must be 50 (vLLM counts 100-frame chunks), got {n_window}")

    @property
    def language_model(self):
        """The thinker's Qwen3-MoE text model (``layers``, ``norm``, ``rotary_emb``)."""
        return self.model.model

    @property
    def lm_head(self):
        return self.model.lm_head

    def rope_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """M-RoPE ``position_ids`` (3, B, T): text and audio tokens carry the same
        temporal, height and width position."""
        return pos[None].expand(3, *pos.shape)

    # -- audio path ------------------------------------------------------------------------
    def _hop(self) -> int:
        return int(self.processor.feature_extractor.hop_length)

    def features(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features of one or more 16 kHz waves, each zero-padded to a multiple
        of the hop (as vLLM does), padded to the longest, and their frame mask."""
        hop = self._hop()
        padded = [np.pad(w, (0, -len(w) % hop)) for w in waves]
        fe = self.processor.feature_extractor(
            padded, sampling_rate=TARGET_SR, return_attention_mask=True, padding=True,
            truncation=False, return_tensors="pt",
        )
        return fe["input_features"].to(self.model.dtype), fe["attention_mask"]

    @torch.no_grad()
    def audio_embeddings(self, audios: list[tuple[np.ndarray, int]]) -> list[torch.Tensor]:
        """Encoder output of each audio (each featurised and encoded on its own, as vLLM
        does): [(n_i, H)]."""
        out = []
        for a, sr in audios:
            wave = to_16k_mono(a, sr)
            feats, fmask = self.features([wave])
            frames = -(-int(wave.shape[0]) // self._hop())
            if int(fmask.sum()) != frames:
                raise RuntimeError(f"feature extractor gave {int(fmask.sum())} frames, vLLM counts {frames}")
            emb = self.model.get_audio_features(feats, fmask).last_hidden_state
            n = self.tokens_from_frames(frames)
            if emb.shape[0] != n:
                raise RuntimeError(f"encoder returned {emb.shape[0]} rows, the count says {n}")
            out.append(emb)
        return out

    @staticmethod
    def tokens_from_frames(frames: int) -> int:
        """13 rows per full 100-frame chunk plus three stride-2 halvings of the remainder
        (0 for none): ``_get_feat_extract_output_lengths``."""
        rest = frames % CHUNK_FRAMES
        for _ in range(3):
            rest = (rest - 1) // 2 + 1 if rest > 0 else 0
        return rest + (frames // CHUNK_FRAMES) * TOKENS_PER_CHUNK

    def num_audio_tokens(self, n_samples: int) -> int:
        """Placeholders an audio of ``n_samples`` (16 kHz) expands to (= rows of
        :meth:`audio_embeddings`): ``T = ceil(n / hop)`` frames."""
        return int(self.tokens_from_frames(-(-int(n_samples) // self._hop())))
