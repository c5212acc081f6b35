"""Affinity Pooling on transformers' ``Qwen2AudioForConditionalGeneration``.

Same weights, same pooling functions (:mod:`vllm_affinity.pooling`), no vLLM.
The audio path mirrors transformers' own forward (encoder with the padding mask,
projector, drop padded frames); the pooled embeddings replace K placeholder tokens
and a plain greedy loop with the HF KV cache produces tokens and per-step
log-probabilities over the whole vocabulary (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from .. import pooling

TARGET_SR = 16000


def to_16k_mono(audio: np.ndarray, sr: int) -> np.ndarray:
    """Resample as vLLM's soxr path does (``soxr.resample``, default quality)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:  # (samples, channels) -> mono
        audio = audio.mean(axis=1)
    if sr != TARGET_SR:
        import soxr

        audio = soxr.resample(audio, int(sr), TARGET_SR)
    return audio


@dataclass
class ReferenceOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[torch.Tensor] = field(repr=False)  # per step, (vocab,) fp32 log-softmax
    audio_tokens_in: list[int] = field(default_factory=list)
    audio_tokens_kept: list[int] = field(default_factory=list)


class ReferenceQwen2Audio:
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        self.audio_token_id = int(self.model.config.audio_token_index)

    # -- audio path -------------------------------------------------------------------
    @torch.no_grad()
    def audio_embeddings(self, audios: list[tuple[np.ndarray, int]]) -> list[torch.Tensor]:
        """Encoder + projector output of each audio, padded frames removed: [(n_i, H)]."""
        from transformers.masking_utils import create_bidirectional_mask

        waves = [to_16k_mono(a, sr) for a, sr in audios]
        fe = self.processor.feature_extractor(
            waves,
            sampling_rate=TARGET_SR,
            return_attention_mask=True,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        feats = fe["input_features"].to(self.model.dtype)
        fmask = fe["attention_mask"]
        tower = self.model.model.audio_tower
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

    @staticmethod
    def pool(
        embeds: torch.Tensor,
        *,
        keep_ratio: float = 1.0,
        method: pooling.Method = "affinity",
        window: int = 1,
        mode: Literal["exact", "threshold"] = "exact",
        tau: float | None = None,
    ) -> torch.Tensor:
        if mode == "threshold":
            if tau is None:
                raise ValueError("threshold mode needs tau")
            sizes = pooling.threshold_sizes(embeds, tau, window)
        else:
            k = pooling.num_kept(embeds.shape[0], keep_ratio)
            sizes = pooling.group_sizes(embeds, k, method, window)
        return pooling.merge(embeds, sizes)

    # -- generation -------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        audios: list[tuple[np.ndarray, int]],
        *,
        max_new_tokens: int = 16,
        keep_ratio: float = 1.0,
        method: pooling.Method = "affinity",
        window: int = 1,
        mode: Literal["exact", "threshold"] = "exact",
        tau: float | None = None,
        pool_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> ReferenceOutput:
        """Greedy decoding; ``prompt`` holds one ``<|AUDIO|>`` per audio (unexpanded).

        ``pool_fn`` replaces the pooling (tests use it for deliberately wrong variants).
        """
        ids = self.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        n_slots = sum(1 for t in ids if t == self.audio_token_id)
        if n_slots != len(audios):
            raise ValueError(f"prompt has {n_slots} audio placeholders for {len(audios)} audios")
        raw = self.audio_embeddings(audios) if audios else []
        if pool_fn is None:

            def pool_fn(e: torch.Tensor) -> torch.Tensor:
                return self.pool(e, keep_ratio=keep_ratio, method=method, window=window, mode=mode, tau=tau)

        pooled = [pool_fn(e) for e in raw]
        full: list[int] = []
        it = iter(pooled)
        for t in ids:
            full.extend([t] * next(it).shape[0] if t == self.audio_token_id else [t])
        input_ids = torch.tensor([full])
        lm = self.model.model.language_model
        embeds = lm.get_input_embeddings()(input_ids)
        if pooled:
            audio_mask = input_ids[0] == self.audio_token_id
            embeds[0, audio_mask] = torch.cat(pooled).to(embeds.dtype)

        out_ids: list[int] = []
        logprobs: list[torch.Tensor] = []
        past = None
        step_in = embeds
        pos = torch.arange(len(full))[None, :]
        for _ in range(max_new_tokens):
            o = lm(inputs_embeds=step_in, position_ids=pos, past_key_values=past, use_cache=True)
            past = o.past_key_values
            logits = self.model.lm_head(o.last_hidden_state[0, -1]).float()
            lp = torch.log_softmax(logits, dim=-1)
            nxt = int(torch.argmax(logits))
            out_ids.append(nxt)
            logprobs.append(lp)
            step_in = lm.get_input_embeddings()(torch.tensor([[nxt]]))
            pos = pos[:, -1:] + 1
        return ReferenceOutput(
            prompt_token_ids=full,
            token_ids=out_ids,
            logprobs=logprobs,
            audio_tokens_in=[int(e.shape[0]) for e in raw],
            audio_tokens_kept=[int(p.shape[0]) for p in pooled],
        )


def calibrate_keep_ratio(
    ref: ReferenceQwen2Audio, audios: list[tuple[np.ndarray, int]], tau: float, window: int = 1
) -> float:
    """The kept fraction that threshold mode at ``tau`` reaches on these audios:
    the basis for choosing an exact-count ``keep_ratio`` for a threshold."""
    kept = total = 0
    for e in ref.audio_embeddings(audios):
        kept += int(pooling.threshold_sizes(e, tau, window).numel())
        total += int(e.shape[0])
    return kept / max(total, 1)
