"""Affinity Pooling on transformers' ``Qwen2_5OmniThinkerForConditionalGeneration``.

Same weights, same pooling functions (:mod:`vllm_affinity.pooling`), no vLLM; the
generation (plain greedy loop, deep merge stage) is :class:`~.base.ReferenceSpeechLM`'s,
with M-RoPE positions (:meth:`ReferenceQwen25Omni.rope_positions`).

The audio path mirrors transformers' ``Qwen2_5OmniProcessor`` + ``get_audio_features``
and vLLM's ``Qwen2_5OmniThinkerForConditionalGeneration`` (whose audio tower *is*
transformers' ``Qwen2_5OmniAudioEncoder``):

1. each 16 kHz audio is featurised on its own (vLLM calls the processor once per
   clip) by the 128-bin ``WhisperFeatureExtractor`` with ``padding="max_length"`` (the
   processor forces it) and ``truncation=False`` (vLLM passes it to every HF processor
   call): a clip up to 30 s is zero-padded to 3000 frames, a longer one is **not** cut
   (45 s -> 4500 frames: vLLM keeps the whole clip, where transformers' processor with
   its default ``truncation=True`` would keep 30 s); the frame mask holds
   ``f = ceil(n / 160)`` ones up to 30 s, ``n // 160`` beyond, and only those frames
   reach the encoder (vLLM's ``input_audio_features`` = the masked frames,
   ``audio_feature_lengths`` = ``f``);
2. encoder: the frames are cut into 100-frame chunks (``2 * n_window``), conv1, conv2
   (stride 2) and sinusoidal positions per chunk, self-attention within each chunk
   (``cu_seqlens``), stride-2 average pooling over the whole audio, LayerNorm, ``proj``
   to the text hidden size (no separate projector);
3. the count is ``((f - 1) // 2 + 1 - 2) // 2 + 1`` (``_get_feat_extract_output_lengths``,
   vLLM's and the processor's), e.g. 125 rows for 5 s (500 frames), 300 for 12 s, 1125
   for 45 s.

Positions: the text model uses M-RoPE (``mrope_section``); for text and audio tokens
vLLM's ``get_mrope_input_positions`` gives the same position in all three components
(consecutive over text, ``<|audio_bos|>``, the audio rows, ``<|audio_eos|>``), so the
1-D positions of the base loops are repeated per component (3, B, T).

The prompt holds one ``<|AUDIO|>`` per audio (unexpanded), inside the audio brackets,
e.g. ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
<|audio_bos|><|AUDIO|><|audio_eos|>QUESTION<|im_end|>\\n<|im_start|>assistant\\n``
(:func:`vllm_affinity_tools.tiny_qwen25omni.prompt`).

Layout in transformers 5: the thinker holds ``audio_tower``, ``visual``, ``model`` (the
text model itself: ``layers``, ``norm``, ``rotary_emb``) and ``lm_head``; there is no
``model.language_model``.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import TARGET_SR, ReferenceSpeechLM, to_16k_mono


class ReferenceQwen25Omni(ReferenceSpeechLM):
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32) -> None:
        from transformers import (
            AutoProcessor,
            Qwen2_5OmniThinkerForConditionalGeneration,
        )

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        self.audio_token_id = int(self.model.config.audio_token_id)

    # -- layout -----------------------------------------------------------------------------
    @property
    def language_model(self):
        """The thinker's text model (``model.model``: layers, norm, rotary_emb)."""
        return self.model.model

    @property
    def lm_head(self):
        return self.model.lm_head

    def rope_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """M-RoPE: the 1-D positions in each of the three components, (3, B, T)."""
        return pos[None].expand(3, *pos.shape)

    # -- audio path ---------------------------------------------------------------------------
    def features(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features of 16 kHz waves as vLLM's processor call computes them
        (``padding="max_length"``, ``truncation=False``: padded to 30 s, longer clips
        kept whole) and their frame mask."""
        fe = self.processor.feature_extractor(
            waves, sampling_rate=TARGET_SR, return_attention_mask=True, padding="max_length",
            truncation=False, return_tensors="pt",
        )
        return fe["input_features"].to(self.model.dtype), fe["attention_mask"]

    @torch.no_grad()
    def audio_embeddings(self, audios: list[tuple[np.ndarray, int]]) -> list[torch.Tensor]:
        """Encoder + projection output of each audio (each featurised and encoded on its
        own, as vLLM does), padded frames removed: [(n_i, H)]."""
        out = []
        for a, sr in audios:
            wave = to_16k_mono(a, sr)
            feats, fmask = self.features([wave])
            emb = self.model.get_audio_features(feats, feature_attention_mask=fmask).last_hidden_state
            n = self.num_audio_tokens(int(wave.shape[0]))
            if emb.shape[0] != n or int(fmask.sum()) != self.frames(int(wave.shape[0])):
                raise RuntimeError(f"encoder returned {emb.shape[0]} rows ({int(fmask.sum())} frames), the count says {n}")
            out.append(emb)
        return out

    def frames(self, n_samples: int) -> int:
        """Mask frames of a clip of ``n_samples`` (16 kHz) as vLLM's processor call makes
        them: ``ceil(n / hop)`` up to 30 s (the clip is padded to 480000 samples), ``n // hop``
        beyond (no padding, no cut; the extractor trims the mask to the STFT frames)."""
        fe = self.processor.feature_extractor
        n, hop = int(n_samples), int(fe.hop_length)
        return -(-n // hop) if n <= int(fe.n_samples) else n // hop

    @staticmethod
    def tokens_from_frames(frames: int) -> int:
        """``((f - 1) // 2 + 1 - 2) // 2 + 1``: conv2 (stride 2), then the stride-2 pool."""
        return ((int(frames) - 1) // 2 + 1 - 2) // 2 + 1

    def num_audio_tokens(self, n_samples: int) -> int:
        """Placeholders an audio of ``n_samples`` (16 kHz) expands to in vLLM (= rows of
        :meth:`audio_embeddings`): :meth:`tokens_from_frames` of :meth:`frames`, no 30 s cap."""
        return int(self.tokens_from_frames(self.frames(n_samples)))
