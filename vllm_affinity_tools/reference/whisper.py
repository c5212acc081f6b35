"""Affinity Pooling on transformers' ``WhisperForConditionalGeneration`` (no vLLM).

The ground truth for the vLLM Whisper path (:mod:`vllm_affinity.adapters.whisper`) and
the place for variants vLLM cannot run. Same weights, same pooling functions
(:mod:`vllm_affinity.pooling`):

1. the stock encoder turns the zero-padded 30 s log-mel window into 1500 frames;
2. the frames are grouped and mean-pooled: exact-count (``keep_ratio`` -> K =
   ``num_kept(1500, keep_ratio)``, ``method`` affinity or uniform, look-back ``window``),
   or the paper's threshold scan (``tau``: data-dependent K, reference only);
3. a plain greedy loop runs the decoder with its cross-attention on the K pooled
   frames (HF KV cache) and records per-step log-probabilities over the whole
   vocabulary (fp32).

``proportional=True`` (reference only) adds ``log(group size)`` to every
cross-attention logit of a pooled frame, ``softmax(q k / sqrt(d) + log s)``: a group
then gets the attention mass its members would get together if they were equal
(ToMe's proportional attention). It is applied by handing HF's cross-attention an
additive bias through its ``attention_mask`` argument (the decoder itself passes none).

Encoding dominates nothing here but is still done once per clip: :meth:`encode` /
:func:`encode` return the frames, and every decode entry point accepts them instead of
audio, so an accuracy sweep encodes each clip once and decodes it many times.

    from vllm_affinity_tools.reference.whisper import load, transcribe, encode, transcribe_batch
    model, processor = load(".cache/whisper-tiny.en-hf")
    ids, text, kept = transcribe(model, processor, (wave, sr), keep_ratio=0.5)
    states = encode(model, processor, [(w, sr) for w, sr in clips])      # (B, 1500, d)
    outs = transcribe_batch(model, processor, states, tau=0.8, proportional=True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from vllm_affinity import pooling
from .base import broadcast_layers, layer_out
from .qwen2_audio import TARGET_SR, to_16k_mono

DEFAULT_PROMPT = "<|startoftranscript|><|notimestamps|>"
DEFAULT_MAX_NEW_TOKENS = 128

#: an audio: (wave, sample_rate), or a 1-D 16 kHz wave
Audio = tuple[np.ndarray, int] | np.ndarray
#: a pooling override (tests: deliberately wrong variants): frames (n, d) -> pooled (k, d)
PoolFn = Callable[[torch.Tensor], torch.Tensor]


class Transcript(NamedTuple):
    token_ids: list[int]  # generated tokens (EOS included when generation stopped on it)
    text: str  # special tokens skipped
    kept: int  # encoder frames the decoder attended to


@dataclass
class ReferenceWhisperOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[torch.Tensor] = field(repr=False)  # per step, (vocab,) fp32 log-softmax
    text: str = ""
    frames_in: int = 0
    kept: int = 0
    sizes: torch.Tensor | None = field(default=None, repr=False)  # group sizes (None: no pooling)

    def transcript(self) -> Transcript:
        return Transcript(self.token_ids, self.text, self.kept)


def load(model_dir: str, dtype: torch.dtype = torch.float32):
    """(model, processor) of a transformers Whisper checkpoint, in eval mode."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    return model, processor


def _wave(audio: Audio) -> np.ndarray:
    if isinstance(audio, tuple):
        return to_16k_mono(*audio)
    return np.asarray(audio, dtype=np.float32)


@torch.no_grad()
def encode(model, processor, audios: Sequence[Audio] | Audio, batch_size: int = 8) -> torch.Tensor:
    """Encoder output of each audio of a list, ``(B, 1500, d)``; of one audio (a
    ``(wave, sr)`` tuple or a 16 kHz array), ``(1500, d)``.

    The features are vLLM's: the zero-padded 30 s log-mel window (longer audio is
    truncated), soxr resampling to 16 kHz."""
    single = isinstance(audios, (tuple, np.ndarray))
    waves = [_wave(a) for a in ([audios] if single else audios)]
    dtype = next(model.parameters()).dtype
    out = []
    for i in range(0, len(waves), batch_size):
        feats = processor.feature_extractor(
            waves[i : i + batch_size], sampling_rate=TARGET_SR, return_tensors="pt", truncation=True
        ).input_features.to(dtype)
        out.append(model.model.encoder(feats).last_hidden_state)
    states = torch.cat(out)
    return states[0] if single else states


@torch.no_grad()
def encode_merged(model, processor, audio: Audio, merge_layer: int, keep_ratio: float, method: str = "affinity",
                  window: int = 1, sizes: torch.Tensor | None = None, merge_fn=None,
                  size_weighted: bool = False, repeat_fn=None):
    """The encoder stage on transformers' WhisperEncoder: layers 0..E on the 1500 frames,
    the frames merged to ``num_kept(1500, keep_ratio)`` (group means; ``sizes`` forces the
    groups, ``merge_fn(h, sizes)`` replaces the merge: tests), layers E+1.. and the final norm
    on the merged frames. ``size_weighted``: proportional attention after the merge, by its
    definition (every frame replaced by its group's mean, the stock layers on all 1500, one row
    per group; ``repeat_fn(sizes)`` replaces the repeat counts: tests), not by the plugin's
    log-size bias. Returns ((K, d) output, sizes, the (1500, d) states after layer E)."""
    enc = model.model.encoder
    dtype = next(model.parameters()).dtype
    feats = processor.feature_extractor([_wave(audio)], sampling_rate=TARGET_SR, return_tensors="pt",
                                        truncation=True).input_features.to(dtype)
    x = torch.nn.functional.gelu(enc.conv1(feats))
    x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
    h = x + enc.embed_positions.weight[: x.shape[1]]
    layers = list(enc.layers)
    for layer in layers[: merge_layer + 1]:
        h = layer_out(layer(h, attention_mask=None))
    mid = h[0]
    if sizes is None:
        sizes = pooling.group_sizes(mid, pooling.num_kept(mid.shape[0], keep_ratio), method, window)
    h = (merge_fn or pooling.merge)(mid, sizes)[None]
    if size_weighted:
        h = broadcast_layers(h, (repeat_fn or (lambda s: s))(sizes), layers[merge_layer + 1 :])
    else:
        for layer in layers[merge_layer + 1 :]:
            h = layer_out(layer(h, attention_mask=None))
    return enc.layer_norm(h)[0], sizes, mid


def pool_frames(
    states: torch.Tensor,
    keep_ratio: float = 1.0,
    method: str = "affinity",
    window: int = 1,
    tau: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group one audio's frames ``(n, d)`` and mean-pool them: (pooled (k, d), sizes).

    ``tau`` set: the paper's threshold scan (``method``/``keep_ratio`` unused);
    otherwise exact-count grouping into ``num_kept(n, keep_ratio)`` groups."""
    n = states.shape[0]
    if tau is not None:
        sizes = pooling.threshold_sizes(states, tau, window)
    else:
        sizes = pooling.group_sizes(states, pooling.num_kept(n, keep_ratio), method, window)
    return pooling.merge(states, sizes), sizes


@contextmanager
def cross_attention_bias(model, bias: torch.Tensor | None):
    """Add ``bias`` (broadcastable to (B, heads, q, K), additive, pre-softmax) to every
    decoder cross-attention logit while the block runs. ``None``: no change."""
    if bias is None:
        yield
        return
    mods = [layer.encoder_attn for layer in model.model.decoder.layers]
    for m in mods:
        orig = m.forward

        def forward(*args, _orig=orig, **kwargs):
            kwargs["attention_mask"] = bias
            return _orig(*args, **kwargs)

        m.forward = forward  # instance attribute: nn.Module.__call__ picks it up
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def _prompt_ids(processor, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(processor.tokenizer.encode(prompt, add_special_tokens=False))
    return [int(t) for t in prompt]


@torch.no_grad()
def greedy_decode(
    model,
    memory: torch.Tensor,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    bias: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    ignore_eos: bool = False,
    return_logprobs: bool = True,
) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Greedy tokens for a batch of encoder memories ``(B, K, d)`` (one shared decoder
    prompt), and per sequence the per-step fp32 log-softmax over the vocabulary.

    A sequence stops after emitting EOS (kept in its tokens) unless ``ignore_eos``.
    ``bias``: additive cross-attention bias ``(B, 1, 1, K)`` (padding, proportional)."""
    from transformers import DynamicCache, EncoderDecoderCache

    dec = model.model.decoder
    b = memory.shape[0]
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    ids = torch.tensor([list(prompt_ids)] * b, dtype=torch.long)
    tokens: list[list[int]] = [[] for _ in range(b)]
    lps: list[list[torch.Tensor]] = [[] for _ in range(b)]
    done = [False] * b
    with cross_attention_bias(model, bias):
        for _ in range(max_new_tokens):
            h = dec(input_ids=ids, encoder_hidden_states=memory, past_key_values=cache, use_cache=True)
            cache = h.past_key_values
            logits = model.proj_out(h.last_hidden_state[:, -1]).float()
            logp = torch.log_softmax(logits, dim=-1)
            nxt = logp.argmax(-1)
            for i in range(b):
                if done[i]:
                    continue
                t = int(nxt[i])
                tokens[i].append(t)
                if return_logprobs:
                    lps[i].append(logp[i].clone())
                if t == eos and not ignore_eos:
                    done[i] = True
            if all(done):
                break
            ids = nxt.view(b, 1)
    return tokens, lps


class ReferenceWhisper:
    """A loaded checkpoint plus the method; see the module docstring."""

    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32) -> None:
        self.model, self.processor = load(model_dir, dtype)
        self.frames = int(self.model.config.max_source_positions)

    def encode(self, audios, batch_size: int = 8) -> torch.Tensor:
        return encode(self.model, self.processor, audios, batch_size)

    def encode_merged(self, audio: Audio, merge_layer: int, keep_ratio: float, **kw):
        return encode_merged(self.model, self.processor, audio, merge_layer, keep_ratio, **kw)

    def _states(self, audio_or_states) -> torch.Tensor:
        if isinstance(audio_or_states, torch.Tensor):
            return audio_or_states
        return self.encode(audio_or_states)

    @torch.no_grad()
    def generate(
        self,
        audio: Audio | torch.Tensor,
        *,
        keep_ratio: float = 1.0,
        method: str = "affinity",
        window: int = 1,
        tau: float | None = None,
        proportional: bool = False,
        pool_fn: PoolFn | None = None,
        sizes: torch.Tensor | None = None,
        bias_sizes: torch.Tensor | None = None,
        prompt: str | Sequence[int] = DEFAULT_PROMPT,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        ignore_eos: bool = False,
    ) -> ReferenceWhisperOutput:
        """One audio (or its encoder frames ``(1500, d)``) -> greedy transcript with logprobs.

        ``pool_fn`` replaces the grouping (tests: deliberately wrong poolings); ``sizes``
        pools with exactly these group sizes; ``bias_sizes`` (with ``proportional``) are
        the sizes whose logs bias the cross-attention, if not the pooling's own (tests:
        deliberately wrong biases)."""
        states = self._states(audio)
        if sizes is not None:
            memory = pooling.merge(states, sizes)
        elif pool_fn is not None:
            memory = pool_fn(states)
        elif tau is None and pooling.num_kept(states.shape[0], keep_ratio) == states.shape[0]:
            memory = states
        else:
            memory, sizes = pool_frames(states, keep_ratio, method, window, tau)
        bias = None
        weights = bias_sizes if bias_sizes is not None else sizes
        if proportional and weights is not None:
            bias = weights.to(memory.dtype).log().view(1, 1, 1, -1)
        prompt_ids = _prompt_ids(self.processor, prompt)
        toks, lps = greedy_decode(
            self.model, memory[None], prompt_ids, max_new_tokens, bias=bias, ignore_eos=ignore_eos
        )
        return ReferenceWhisperOutput(
            prompt_token_ids=prompt_ids,
            token_ids=toks[0],
            logprobs=lps[0],
            text=self.processor.tokenizer.decode(toks[0], skip_special_tokens=True),
            frames_in=int(states.shape[0]),
            kept=int(memory.shape[0]),
            sizes=sizes,
        )

    @torch.no_grad()
    def generate_batch(
        self,
        audios: Sequence[Audio] | torch.Tensor,
        *,
        keep_ratio: float = 1.0,
        method: str = "affinity",
        window: int = 1,
        tau: float | None = None,
        proportional: bool = False,
        prompt: str | Sequence[int] = DEFAULT_PROMPT,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        batch_size: int = 8,
        return_logprobs: bool = False,
    ) -> list[ReferenceWhisperOutput]:
        """Many audios (or their frames ``(B, 1500, d)``), decoded ``batch_size`` at a time.

        Pooled memories of different lengths (threshold mode) are right-padded and the
        padding masked with -inf in the cross-attention bias. Batched matmuls round
        differently from one-at-a-time decoding (~1e-6): parity tests use :meth:`generate`."""
        states = self._states(audios)
        if states.dim() == 2:
            states = states[None]
        prompt_ids = _prompt_ids(self.processor, prompt)
        n = states.shape[1]
        pooled = []
        for s in states:
            if tau is None and pooling.num_kept(n, keep_ratio) == n:
                pooled.append((s, None))
            else:
                pooled.append(pool_frames(s, keep_ratio, method, window, tau))
        outs: list[ReferenceWhisperOutput] = []
        for i in range(0, len(pooled), batch_size):
            chunk = pooled[i : i + batch_size]
            kmax = max(m.shape[0] for m, _ in chunk)
            ragged = any(m.shape[0] != kmax for m, _ in chunk)
            memory = torch.zeros((len(chunk), kmax, states.shape[-1]), dtype=states.dtype)
            bias = None
            if ragged or (proportional and any(s is not None for _, s in chunk)):
                bias = torch.zeros((len(chunk), 1, 1, kmax), dtype=states.dtype)
            for j, (m, sizes) in enumerate(chunk):
                memory[j, : m.shape[0]] = m
                if bias is not None:
                    bias[j, ..., m.shape[0] :] = float("-inf")
                    if proportional and sizes is not None:
                        bias[j, 0, 0, : m.shape[0]] = sizes.to(states.dtype).log()
            toks, lps = greedy_decode(
                self.model, memory, prompt_ids, max_new_tokens, bias=bias, return_logprobs=return_logprobs
            )
            for j, (m, sizes) in enumerate(chunk):
                outs.append(ReferenceWhisperOutput(
                    prompt_token_ids=prompt_ids,
                    token_ids=toks[j],
                    logprobs=lps[j],
                    text=self.processor.tokenizer.decode(toks[j], skip_special_tokens=True),
                    frames_in=n,
                    kept=int(m.shape[0]),
                    sizes=sizes,
                ))
        return outs


def _wrap(model, processor) -> ReferenceWhisper:
    ref = ReferenceWhisper.__new__(ReferenceWhisper)
    ref.model, ref.processor = model, processor
    ref.frames = int(model.config.max_source_positions)
    return ref


def transcribe(
    model,
    processor,
    audio: Audio | torch.Tensor,
    keep_ratio: float = 1.0,
    method: str = "affinity",
    window: int = 1,
    tau: float | None = None,
    proportional: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    prompt: str | Sequence[int] = DEFAULT_PROMPT,
) -> Transcript:
    """Greedy transcript of one audio (or its encoder frames from :func:`encode`).

    Returns ``(token_ids, text, kept)``; ``kept``: encoder frames after pooling (1500
    when off; data-dependent with ``tau``)."""
    return _wrap(model, processor).generate(
        audio, keep_ratio=keep_ratio, method=method, window=window, tau=tau,
        proportional=proportional, max_new_tokens=max_new_tokens, prompt=prompt,
    ).transcript()


def transcribe_batch(
    model,
    processor,
    audios: Sequence[Audio] | torch.Tensor,
    keep_ratio: float = 1.0,
    method: str = "affinity",
    window: int = 1,
    tau: float | None = None,
    proportional: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    prompt: str | Sequence[int] = DEFAULT_PROMPT,
    batch_size: int = 8,
) -> list[Transcript]:
    """:func:`transcribe` for many audios (or ``(B, 1500, d)`` frames), batched."""
    outs = _wrap(model, processor).generate_batch(
        audios, keep_ratio=keep_ratio, method=method, window=window, tau=tau,
        proportional=proportional, max_new_tokens=max_new_tokens, prompt=prompt, batch_size=batch_size,
    )
    return [o.transcript() for o in outs]


__all__ = [
    "ReferenceWhisper", "ReferenceWhisperOutput", "Transcript", "load", "encode", "pool_frames",
    "cross_attention_bias", "greedy_decode", "transcribe", "transcribe_batch",
]
