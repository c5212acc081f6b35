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

from vllm_affinity import pooling

from .base import (  # noqa: F401  (re-exported: older imports name this module)
    TARGET_SR,
    ReferenceOutput,
    ReferenceSpeechLM,
    _causal_mask,
    broadcast_layers,
    calibrate_keep_ratio,
    layer_out,
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
        encoder_stage: dict | None = None,
    ) -> list[torch.Tensor]:
        """Encoder + projector output of each audio, padded frames removed: [(n_i, H)].

        ``encoder_real_length``: encode only the real frames (+ margin), as the plugin
        does with that switch (:mod:`vllm_affinity.encoder`).
        ``long_audio="windows"``: encode each 30 s window (``encoder.window_bounds``) as an
        audio of its own and concatenate the windows' outputs; "truncate" keeps 30 s.
        ``encoder_stage``: keyword arguments of :meth:`encode_merged` (the encoder stage, on
        every window)."""
        waves = [to_16k_mono(a, sr) for a, sr in audios]
        if long_audio == "windows":
            from vllm_affinity.encoder import split_windows

            n_samples = self.processor.feature_extractor.n_samples
            windows = [split_windows(w, n_samples) for w in waves]
            flat = self._embed_waves([x for ws in windows for x in ws], encoder_real_length, encoder_stage)
            it = iter(flat)
            return [torch.cat([next(it) for _ in ws]) for ws in windows]
        return self._embed_waves(waves, encoder_real_length, encoder_stage)

    def _stock_mask(self, fmask: torch.Tensor, max_mel: int, dtype: torch.dtype):
        """transformers' key-padding mask of the stock 30 s window, and the real lengths."""
        from transformers.masking_utils import create_bidirectional_mask

        tower = self.model.model.audio_tower
        feat_lens, out_lens = tower._get_feat_extract_output_lengths(fmask.sum(-1))
        max_seq = (max_mel - 2) // 2 + 1
        valid = torch.arange(max_seq)[None, :] < feat_lens[:, None]
        mask = create_bidirectional_mask(
            config=tower.config,
            inputs_embeds=torch.zeros(fmask.shape[0], max_seq, 1, dtype=dtype),
            attention_mask=valid.long(),
        )
        return mask, feat_lens, out_lens

    @torch.no_grad()
    def encode_merged(self, feats: torch.Tensor, fmask: torch.Tensor, *, merge_layer: int, keep_ratio: float,
                      method: str = "affinity", window: int = 1, merge_fn=None, after_pool: bool = False,
                      size_weighted: bool = False, repeat_fn=None) -> list[torch.Tensor]:
        """The encoder stage on transformers' Qwen2AudioEncoder, written from its forward:
        the stock 30 s window with its padding mask through layers 0..E; per audio, the real
        positions merged into ``2 num_kept(tokens, keep_ratio)`` groups (``merge_fn(h, sizes)``
        replaces the merge: tests); layers E+1.. on them alone, the stride-2 pool, the norm.
        ``after_pool`` (a wrong variant): merge the pooled tokens instead. ``size_weighted``
        (proportional attention after the merge), computed the way it is defined and not the
        way the plugin computes it (a log-size bias): every position replaced by its group's
        mean, layers E+1.. on that full-length sequence, then one row per group
        (``repeat_fn(sizes)`` replaces the repeat counts: tests). Returns the encoder output of
        each audio, (K_i, d_model)."""
        tower = self.model.model.audio_tower
        mask, feat_lens, out_lens = self._stock_mask(fmask, feats.shape[-1], feats.dtype)
        x = torch.nn.functional.gelu(tower.conv1(feats.to(tower.conv1.weight.dtype)))
        x = torch.nn.functional.gelu(tower.conv2(x)).permute(0, 2, 1)
        h = x + tower.embed_positions.weight
        layers = list(tower.layers)
        for layer in layers[: merge_layer + 1]:
            h = layer_out(layer(h, mask))
        out = []
        for i in range(h.shape[0]):
            k = pooling.num_kept(int(out_lens[i]), keep_ratio)
            mid = h[i, : int(feat_lens[i])] if not after_pool else h[i : i + 1]
            if after_pool:  # wrong: the stock encoder to the end, the merge on its tokens
                for layer in layers[merge_layer + 1 :]:
                    mid = layer_out(layer(mid, mask[i : i + 1]))
                tokens = tower.layer_norm(tower.avg_pooler(mid.permute(0, 2, 1)).permute(0, 2, 1))[0]
                tokens = tokens[: int(out_lens[i])]
                out.append(pooling.merge(tokens, pooling.group_sizes(tokens, k, method, window)))
                continue
            sizes = pooling.group_sizes(mid, 2 * k, method, window)
            g = (merge_fn or pooling.merge)(mid, sizes)[None]
            if size_weighted:
                g = broadcast_layers(g, (repeat_fn or (lambda s: s))(sizes), layers[merge_layer + 1 :])
            else:
                for layer in layers[merge_layer + 1 :]:
                    g = layer_out(layer(g, None))
            out.append(tower.layer_norm(tower.avg_pooler(g.permute(0, 2, 1)).permute(0, 2, 1))[0])
        return out

    def _embed_waves(self, waves: list[np.ndarray], encoder_real_length: bool,
                     encoder_stage: dict | None = None) -> list[torch.Tensor]:
        feats, fmask = self.features(waves)
        tower = self.model.model.audio_tower
        if encoder_stage is not None:
            proj = self.model.model.multi_modal_projector
            return [proj(t) for t in self.encode_merged(feats, fmask, **encoder_stage)]
        if encoder_real_length:
            from vllm_affinity.encoder import encode_real_length

            proj = self.model.model.multi_modal_projector
            return [proj(encode_real_length(tower, f, int(m.sum()))) for f, m in zip(feats, fmask)]
        mask, _, out_lens = self._stock_mask(fmask, feats.shape[-1], feats.dtype)
        b = feats.shape[0]
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
        encoder_stage: dict | None = None,
        **kw,
    ) -> ReferenceOutput:
        """Greedy decoding; ``prompt`` holds one ``<|AUDIO|>`` per audio (unexpanded).
        ``encoder_real_length`` / ``long_audio`` as the plugin's switches, ``encoder_stage``
        the keyword arguments of :meth:`encode_merged`; every other
        argument (pooling, deep stage, wrong-variant hooks) is :meth:`ReferenceSpeechLM.generate`'s."""
        return super().generate(
            prompt, audios, encoder_real_length=encoder_real_length, long_audio=long_audio,
            encoder_stage=encoder_stage, **kw
        )
