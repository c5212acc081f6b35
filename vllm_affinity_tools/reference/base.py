"""The architecture-independent part of the Hugging Face references: a speech LM whose
audio embeddings replace placeholder tokens of a transformers decoder-only text model
(Qwen2 or Llama: ``layers``, ``norm``, ``rotary_emb``).

Same pooling functions as the plugin (:mod:`vllm_affinity.pooling`), no vLLM. A
subclass provides the loading (``self.processor``, ``self.model`` with
``model.model.language_model`` and ``model.lm_head``, ``self.audio_token_id``),
:meth:`ReferenceSpeechLM.audio_embeddings` (encoder + projector, padded frames
removed, one ``(n_i, hidden)`` tensor per audio) and, if it differs,
:meth:`ReferenceSpeechLM.prompt_ids`; :class:`ProcessorWindowedSpeechLM` provides the
audio path of models whose processor cuts 30 s windows itself. Everything else is here:

* each audio's embeddings are pooled to K rows (``keep_ratio`` -> K =
  ``num_kept(n, keep_ratio)``, or threshold mode) and its single placeholder in the
  prompt becomes K placeholders whose embeddings are the pooled rows;
* a plain greedy loop with the HF KV cache produces tokens and per-step
  log-probabilities over the whole vocabulary (fp32);
* optional deep merge stage (``deep_merge_layer=L``): decoder layers 0..L run on the
  full prompt (positions 0..T-1); each audio span of the output of layer L is merged
  again (groups chosen on that hidden state, rows = group means, positions = floor of
  the mean member position, :func:`pooling.merge_positions`); layers L+1.. run on the
  compacted sequence with those positions, causal in compacted order, and hold a
  compacted KV cache. Decode tokens keep their original positions (T, T+1, ...) in
  every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from vllm_affinity import pooling

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
    # deep merge stage (empty / None when off): K per audio after layer L, and the
    # number of KV entries the layers above L hold at the end of generation
    deep_tokens_kept: list[int] = field(default_factory=list)
    deep_kv_len: int | None = None


def layer_out(out):
    """The hidden states of a transformers layer's output (a tensor, or a tuple led by one)."""
    return out[0] if isinstance(out, tuple) else out


def broadcast_layers(merged: torch.Tensor, repeats: torch.Tensor, layers) -> torch.Tensor:
    """Proportional attention by its definition, for the encoder references (Whisper,
    Qwen2-Audio): (1, K, d) merged rows each repeated ``repeats`` times (the full-length
    sequence of group means), the stock encoder layers on it without a mask, the first row of
    every group kept: (1, K, d). Independent of the plugin, which adds log(size) to the logits."""
    repeats = repeats.to(merged.device)
    full = torch.repeat_interleave(merged, repeats, dim=1)
    for layer in layers:
        full = layer_out(layer(full, attention_mask=None))
    return full[:, torch.cumsum(repeats, 0) - repeats]


def _causal_mask(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (1, 1, n, n) mask: 0 where key <= query, -inf above the diagonal."""
    return torch.full((n, n), float("-inf"), dtype=dtype).triu(1)[None, None]


class ReferenceSpeechLM:
    """Base of the speech-LM references (Qwen2-Audio, AudioFlamingo3, GLM-ASR)."""

    processor: Any
    model: Any
    audio_token_id: int

    # -- what an architecture provides ----------------------------------------------
    def audio_embeddings(self, audios: list[tuple[np.ndarray, int]], **kw) -> list[torch.Tensor]:
        """Encoder + projector output of each audio, padded frames removed: [(n_i, H)]."""
        raise NotImplementedError

    def features(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features of 16 kHz waves padded to the 30 s window, and their frame mask."""
        fe = self.processor.feature_extractor(
            waves, sampling_rate=TARGET_SR, return_attention_mask=True, padding="max_length",
            truncation=True, return_tensors="pt",
        )
        return fe["input_features"].to(self.model.dtype), fe["attention_mask"]

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` (one unexpanded placeholder per audio)."""
        return self.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def rope_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """The ``position_ids`` the text model takes for 1-D positions ``pos`` (B, T).
        1-D RoPE: ``pos`` itself. An M-RoPE model (Qwen2.5-Omni, Qwen3-Omni) overrides
        this with ``pos`` repeated per component, (3, B, T): a text or audio token has the
        same temporal, height and width position, and a merged row's floor-of-mean is then
        the same in each component."""
        return pos

    @property
    def language_model(self):
        """The transformers text model (Qwen2 / Llama: ``layers``, ``norm``, ``rotary_emb``)."""
        return self.model.model.language_model

    @property
    def lm_head(self):
        return self.model.lm_head

    # -- pooling ------------------------------------------------------------------------
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
        deep_merge_layer: int | None = None,
        deep_keep_ratio: float = 1.0,
        deep_window: int = 3,
        deep_method: pooling.Method = "affinity",
        deep_pool_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        deep_position_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        deep_size_weighted: bool = False,
        deep_bias_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **audio_kw,
    ) -> ReferenceOutput:
        """Greedy decoding; ``prompt`` holds one audio placeholder per audio (unexpanded).

        ``pool_fn`` replaces the pooling (tests use it for deliberately wrong variants).
        ``deep_merge_layer`` (0-based, ``0 <= L <= num_layers - 2``) turns on the deep
        merge stage after decoder layer L; ``deep_pool_fn`` maps an (m, hidden) span of
        that layer's output to group ``sizes`` (default: ``pooling.group_sizes`` with
        ``num_kept(m, deep_keep_ratio)``, ``deep_method``, ``deep_window``);
        ``deep_position_fn(positions, sizes)`` gives the merged rows' positions (default
        :func:`pooling.merge_positions`, the floor of the members' mean; tests pass wrong ones).
        ``deep_size_weighted``: the layers above L add log(group size) of every merged key to
        its attention logits, in prefill and decode (``deep_bias_fn(row_sizes)`` gives the
        bias instead: tests pass wrong ones). ``audio_kw`` goes to :meth:`audio_embeddings`.
        """
        lm = self.language_model
        n_layers = int(lm.config.num_hidden_layers)
        if deep_merge_layer is not None:
            if isinstance(deep_merge_layer, bool) or not isinstance(deep_merge_layer, int):
                raise ValueError(f"deep_merge_layer must be an int or None, got {deep_merge_layer!r}")
            if not 0 <= deep_merge_layer <= n_layers - 2:
                raise ValueError(
                    f"deep_merge_layer must be in [0, {n_layers - 2}] (num_layers - 2) for a "
                    f"{n_layers}-layer decoder, got {deep_merge_layer}"
                )
            attn_impl = lm.config._attn_implementation
            if attn_impl not in ("eager", "sdpa"):
                raise ValueError(f"deep_merge_layer needs eager or sdpa attention, model uses {attn_impl!r}")
        ids = self.prompt_ids(prompt)
        n_slots = sum(1 for t in ids if t == self.audio_token_id)
        if n_slots != len(audios):
            raise ValueError(f"prompt has {n_slots} audio placeholders for {len(audios)} audios")
        raw = self.audio_embeddings(audios, **audio_kw) if audios else []
        if pool_fn is None:

            def pool_fn(e: torch.Tensor) -> torch.Tensor:
                return self.pool(e, keep_ratio=keep_ratio, method=method, window=window, mode=mode, tau=tau)

        pooled = [pool_fn(e) for e in raw]
        full: list[int] = []
        spans: list[tuple[int, int]] = []  # (start, length) of each audio's run in `full`
        it = iter(pooled)
        for t in ids:
            if t == self.audio_token_id:
                m = int(next(it).shape[0])
                spans.append((len(full), m))
                full.extend([t] * m)
            else:
                full.append(t)
        input_ids = torch.tensor([full])
        embeds = lm.get_input_embeddings()(input_ids)
        if pooled:
            audio_mask = input_ids[0] == self.audio_token_id
            embeds[0, audio_mask] = torch.cat(pooled).to(embeds.dtype)

        if deep_merge_layer is not None:
            if deep_pool_fn is None:

                def deep_pool_fn(x: torch.Tensor) -> torch.Tensor:
                    k = pooling.num_kept(x.shape[0], deep_keep_ratio)
                    return pooling.group_sizes(x, k, deep_method, deep_window)

            out_ids, logprobs, deep_kept, deep_kv_len = self._generate_deep(
                embeds, spans, max_new_tokens, deep_merge_layer, deep_pool_fn,
                deep_position_fn or pooling.merge_positions,
                (deep_bias_fn or (lambda sizes: sizes.double().log())) if deep_size_weighted else None,
            )
        else:
            out_ids, logprobs = self._generate_plain(embeds, len(full), max_new_tokens)
            deep_kept, deep_kv_len = [], None
        return ReferenceOutput(
            prompt_token_ids=full,
            token_ids=out_ids,
            logprobs=logprobs,
            audio_tokens_in=[int(e.shape[0]) for e in raw],
            audio_tokens_kept=[int(p.shape[0]) for p in pooled],
            deep_tokens_kept=deep_kept,
            deep_kv_len=deep_kv_len,
        )

    def _generate_plain(self, embeds: torch.Tensor, prompt_len: int, max_new_tokens: int):
        """Greedy decoding through transformers' own language-model forward."""
        lm = self.language_model
        out_ids: list[int] = []
        logprobs: list[torch.Tensor] = []
        past = None
        step_in = embeds
        pos = torch.arange(prompt_len)[None, :]
        for _ in range(max_new_tokens):
            o = lm(inputs_embeds=step_in, position_ids=self.rope_positions(pos), past_key_values=past, use_cache=True)
            past = o.past_key_values
            logits = self.lm_head(o.last_hidden_state[0, -1]).float()
            nxt = int(torch.argmax(logits))
            out_ids.append(nxt)
            logprobs.append(torch.log_softmax(logits, dim=-1))
            step_in = lm.get_input_embeddings()(torch.tensor([[nxt]]))
            pos = pos[:, -1:] + 1
        return out_ids, logprobs

    def _generate_deep(
        self,
        embeds: torch.Tensor,
        spans: list[tuple[int, int]],
        max_new_tokens: int,
        merge_layer: int,
        deep_pool_fn: Callable[[torch.Tensor], torch.Tensor],
        position_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = pooling.merge_positions,
        bias_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[list[int], list[torch.Tensor], list[int], int]:
        """Greedy loop driving the decoder layers one by one with the deep merge after
        layer ``merge_layer``. Returns (tokens, logprobs, K per audio, deep KV length).
        ``bias_fn(row_sizes)``: an additive logit bias per compacted key of the deep layers
        (size-weighted attention); None: plain attention."""
        from transformers import DynamicCache

        lm = self.language_model
        layers = list(lm.layers)
        shallow, deep = layers[: merge_layer + 1], layers[merge_layer + 1 :]
        cache = DynamicCache(config=lm.config)  # per-layer caches, independent lengths
        dtype = embeds.dtype
        T = embeds.shape[1]

        def run(stack, h, pos, mask):
            pe = lm.rotary_emb(h, self.rope_positions(pos))
            for layer in stack:
                h = layer(h, attention_mask=mask, position_embeddings=pe, past_key_values=cache, use_cache=True)
            return h

        out_ids: list[int] = []
        logprobs: list[torch.Tensor] = []
        kept: list[int] = []
        for step in range(max_new_tokens):
            if step == 0:
                # prefill: layers 0..L on the full prompt, positions 0..T-1
                pos = torch.arange(T)[None, :]
                x = run(shallow, embeds, pos, _causal_mask(T, dtype))[0]
                rows, new_pos, row_sizes = [], [], []
                cursor = 0
                for start, m in spans:
                    if start < cursor:
                        raise ValueError("audio spans overlap")
                    rows.append(x[cursor:start])
                    new_pos.append(pos[0, cursor:start])
                    row_sizes.append(torch.ones(max(0, start - cursor), dtype=torch.long))
                    if m > 0:
                        span = x[start : start + m]
                        sizes = torch.as_tensor(deep_pool_fn(span), dtype=torch.long).cpu()
                        if sizes.dim() != 1 or int(sizes.sum()) != m or bool((sizes < 1).any()):
                            raise ValueError(f"deep group sizes {sizes.tolist()} do not split a span of {m}")
                        rows.append(pooling.merge(span, sizes))
                        row_sizes.append(sizes)
                        new_pos.append(position_fn(pos[0, start : start + m], sizes))
                        kept.append(int(sizes.numel()))
                    else:
                        kept.append(0)
                    cursor = start + m
                rows.append(x[cursor:])
                new_pos.append(pos[0, cursor:])
                row_sizes.append(torch.ones(T - cursor, dtype=torch.long))
                h = torch.cat(rows)[None]
                pos_c = torch.cat(new_pos)[None, :]
                C = h.shape[1]
                bias = None if bias_fn is None else bias_fn(torch.cat(row_sizes)).to(dtype).view(1, 1, 1, C)
                # layers L+1.. on the compacted sequence, merged positions, causal in compacted order
                mask = _causal_mask(C, dtype)
                h = run(deep, h, pos_c, mask if bias is None else mask + bias)
            else:
                # decode: original position T + step - 1 in every layer, one query sees all keys
                pos = torch.tensor([[T + step - 1]])
                h = lm.get_input_embeddings()(torch.tensor([[out_ids[-1]]]))
                h = run(shallow, h, pos, None)
                # the new token's own key (and earlier decoded ones) weigh 1: bias 0
                dmask = None if bias is None else torch.cat(
                    [bias, torch.zeros(1, 1, 1, step, dtype=dtype)], dim=-1)
                h = run(deep, h, pos, dmask)
            logits = self.lm_head(lm.norm(h)[0, -1]).float()
            lp = torch.log_softmax(logits, dim=-1)
            nxt = int(torch.argmax(logits))
            out_ids.append(nxt)
            logprobs.append(lp)
        deep_kv_len = int(cache.get_seq_length(merge_layer + 1)) if max_new_tokens > 0 else 0
        return out_ids, logprobs, kept, deep_kv_len


class ProcessorWindowedSpeechLM(ReferenceSpeechLM):
    """A speech LM whose transformers processor cuts each audio into 30 s windows itself
    (AudioFlamingo3, GLM-ASR): ``n_win = max(1, ceil(n / 480000))`` capped at
    ``processor.max_audio_len // chunk_length`` (audio beyond the cap is dropped), the
    last window holding the remainder; each window is a zero-padded 3000-frame log-mel
    with its frame mask; the windows' valid rows are concatenated per audio.

    A subclass provides :meth:`encode_windows` (encoder + projector of a batch of
    windows, valid rows only) and :meth:`tokens_from_frames` (the processor's count).
    """

    # -- what an architecture provides ----------------------------------------------
    def encode_windows(self, feats: torch.Tensor, fmask: torch.Tensor) -> list[torch.Tensor]:
        """Encoder + projector output of each window, padded rows removed: [(n_w, H)]."""
        raise NotImplementedError

    @staticmethod
    def tokens_from_frames(frames: int) -> int:
        """Audio tokens of ``frames`` real mel frames (the processor's formula)."""
        raise NotImplementedError

    # -- windows ------------------------------------------------------------------------
    def _window_geometry(self) -> tuple[int, int]:
        """(samples per window, most windows per audio)."""
        fe = self.processor.feature_extractor
        return int(TARGET_SR * fe.chunk_length), int(self.processor.max_audio_len // fe.chunk_length)

    def window_bounds(self, n_samples: int) -> list[tuple[int, int]]:
        """``[(start, end)]`` sample ranges of the windows the processor cuts."""
        size, max_windows = self._window_geometry()
        n_win = min(max(1, -(-int(n_samples) // size)), max_windows)
        cap = min(int(n_samples), n_win * size)
        return [(i * size, min((i + 1) * size, cap)) for i in range(n_win)]

    def split_windows(self, wave: np.ndarray) -> list[np.ndarray]:
        """The 30 s windows the processor cuts a 16 kHz wave into."""
        return [wave[a:b] for a, b in self.window_bounds(int(wave.shape[0]))]

    @torch.no_grad()
    def window_embeddings(self, audios: list[tuple[np.ndarray, int]]) -> list[list[torch.Tensor]]:
        """Encoder + projector output of every 30 s window, padded rows removed:
        ``[[(n_iw, H) per window] per audio]``."""
        waves = [to_16k_mono(a, sr) for a, sr in audios]
        windows = [self.split_windows(w) for w in waves]
        flat = [x for ws in windows for x in ws]
        feats, fmask = self.features(flat)
        it = iter(self.encode_windows(feats, fmask))
        return [[next(it) for _ in ws] for ws in windows]

    def audio_embeddings(self, audios: list[tuple[np.ndarray, int]]) -> list[torch.Tensor]:
        """Encoder + projector output of each audio, padded rows removed, windows
        concatenated in time order: [(n_i, H)]."""
        return [torch.cat(ws) for ws in self.window_embeddings(audios)]

    def num_audio_tokens(self, n_samples: int) -> int:
        """Placeholders an audio of ``n_samples`` (16 kHz) expands to (= rows of
        :meth:`audio_embeddings`): the processor's count, from the frame mask summed
        over the audio's windows."""
        hop = self.processor.feature_extractor.hop_length
        frames = sum(-(-(b - a) // hop) for a, b in self.window_bounds(n_samples))
        return int(self.tokens_from_frames(frames))


def calibrate_keep_ratio(
    ref: ReferenceSpeechLM, audios: list[tuple[np.ndarray, int]], tau: float, window: int = 1
) -> float:
    """The kept fraction that threshold mode at ``tau`` reaches on these audios:
    the basis for choosing an exact-count ``keep_ratio`` for a threshold."""
    kept = total = 0
    for e in ref.audio_embeddings(audios):
        kept += int(pooling.threshold_sizes(e, tau, window).numel())
        total += int(e.shape[0])
    return kept / max(total, 1)
