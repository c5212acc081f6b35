"""Whisper with Affinity Pooling of the encoder output (input stage only).

Whisper's decoder sees the audio only through cross-attention, over the encoder's
1500 output frames (30 s window, 50 frames/s). The plugin mean-pools those frames to
``K = num_kept(1500, keep_ratio)`` before the decoder's cross-attention, so every
cross-attention layer computes on, and keeps KV cache for, K frames instead of 1500.

How K reaches vLLM 0.32 (no patch needed): the encoder's token count is the length of
the audio placeholder in the encoder prompt (the multimodal processor's prompt
update). Everything downstream reads that one number (``mm_position.length``):
the scheduler's cross-attention block allocation (``num_encoder_tokens`` ->
``CrossAttentionManager``), the runner's encoder sequence lengths and cross-attention
slot mapping, and the encoder-cache budget. So:

* the processor (API-server side) validates the request, computes K from the server
  SPEC or the per-request ``mm_processor_kwargs.affinity_keep_ratio``, makes the
  placeholder K tokens long and hands K to the model as the per-item field
  ``affinity_num_kept``;
* the model (worker side) runs the stock encoder, then merges each audio's 1500
  frames into exactly K (exact-count grouping, :mod:`vllm_affinity.pooling`).

Not applicable to Whisper: the deep stage (it merges audio positions inside a
decoder-only LM's own sequence; Whisper's decoder has none) is refused with a config
error; ``encoder_real_length`` and ``long_audio`` are ignored with a log line (presets
set them for Qwen2-Audio): Whisper's encoder is trained on the zero-padded 30 s window
and vLLM's Whisper always encodes all of it; audio over 30 s is truncated as stock (the
transcription API splits long audio into 30 s chunks, one request each), or refused
with ``max_audio_seconds``.

The SPEC travels in the HF config (``--hf-overrides '{"affinity": SPEC}'``), as for
Qwen2-Audio. With no input stage and no per-request override, everything is stock.
Differs from the base: a constant stock count (1500 frames), the placeholder token (0,
the dummy encoder prompt), cross-attention KV accounting, and its start-up log line.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.models.whisper import (
    WhisperCrossAttention,
    WhisperDummyInputsBuilder,
    WhisperForConditionalGeneration,
    WhisperMultiModalProcessor,
    WhisperProcessingInfo,
)
from vllm.model_executor.models.utils import cast_overflow_tensors
from vllm.multimodal import MULTIMODAL_REGISTRY

from .. import accounting, pooling
from ..encoder import size_bias
from ..compat import ADAPTER_SEAMS
from .. import size_weighted as sw
from ..config import REQUEST_KEEP_RATIO_KEY, AffinityConfig
from ..architectures import facts_for
from .base import (
    NUM_KEPT_FIELD,
    AffinityDummyInputsMixin,
    AffinityInfoMixin,
    AffinityModelMixin,
    AffinityProcessorMixin,
    UNCOUNTED_MARK,
    pool_to_counts,
    trace_merge,
    validated_config,
)

logger = logging.getLogger("vllm.affinity")

ARCH = "WhisperForConditionalGeneration"


#: mm_processor_kwargs key the plugin puts on the transcription API's language-detection prompt
LANGUAGE_DETECTION_KEY = "affinity_language_detection"
#: openai-whisper: a checkpoint is multilingual iff its vocabulary has at least this many entries
MULTILINGUAL_VOCAB = 51865


def english_only(hf_config) -> bool:
    """An English-only Whisper checkpoint (tiny.en, base.en, ...)."""
    return int(hf_config.vocab_size) < MULTILINGUAL_VOCAB


def whisper_config(hf_config) -> AffinityConfig:
    """The server SPEC (``hf_overrides.affinity``), validated for Whisper (no deep stage)."""
    return validated_config(facts_for(ARCH), hf_config)


def describe(cfg: AffinityConfig, frames: int) -> str:
    """One line: what the plugin does to each audio's encoder frames."""
    s, e = cfg.input, cfg.encoder
    pre = ""
    if e is not None:
        pre = (f"encoder stage: frames merged {frames} -> {pooling.num_kept(frames, e.keep_ratio)} after encoder "
               f"layer {e.merge_layer} (keep_ratio={e.keep_ratio}, window={e.window}, method={e.method}"
               + (", size-weighted (proportional) attention after the merge" if e.size_weighted else "") + "); ")
        frames = pooling.num_kept(frames, e.keep_ratio)
    if s is None:
        what = f"input stage off: all {frames} encoder frames reach the decoder's cross-attention"
    else:
        what = (
            f"encoder frames {frames} -> {pooling.num_kept(frames, s.keep_ratio)} per audio "
            f"(keep_ratio={s.keep_ratio}, window={s.window}, method={s.method}), mean-pooled "
            "before the decoder's cross-attention, whose KV cache shrinks alike"
        )
        if s.size_weighted:
            what += "; size-weighted cross-attention (softmax(q.k/sqrt(d) + log group size))"
    if cfg.allow_request_override:
        what += (
            f"; requests may set mm_processor_kwargs.{REQUEST_KEEP_RATIO_KEY} in "
            f"[{cfg.min_request_keep_ratio}, {cfg.max_request_keep_ratio}]"
        )
    return pre + what


class AffinityWhisperProcessingInfo(AffinityInfoMixin, WhisperProcessingInfo):
    ARCH = ARCH

    def get_mm_max_tokens_per_item(self, seq_len, mm_counts=None):
        # The stock bound (all 1500 frames), whatever the server ratio: a request may ask
        # for a higher keep ratio than the server default. Sizes the encoder budget only.
        return {"audio": self.get_num_audio_tokens()}


class AffinityWhisperDummyInputsBuilder(AffinityDummyInputsMixin, WhisperDummyInputsBuilder):
    pass


class AffinityWhisperMultiModalProcessor(AffinityProcessorMixin, WhisperMultiModalProcessor):
    info: AffinityWhisperProcessingInfo

    def stock_tokens(self, num_samples: int) -> int:
        return self.info.get_num_audio_tokens()  # max_source_positions: 1500, whatever the length

    def placeholder_token_id(self) -> int:
        return 0  # the dummy encoder prompt: one 0 per encoder token, as stock

    def truncation_hint(self) -> str:
        return "the transcription API splits long audio; set max_audio_seconds to reject such audio"

    def encoder_stage_tokens(self, num_samples: int) -> int:
        return pooling.num_kept(self.stock_tokens(num_samples), self.info.affinity.encoder.keep_ratio)

    def kv_blocks_saved(self, prompt_len, n, kept, kept_deep) -> float:
        bs = self.block_size()
        return accounting.cross_attention_blocks_saved(sum(n), sum(kept), bs) if bs else 0.0

    EXTRA_MM_KWARGS = (LANGUAGE_DETECTION_KEY,)

    def apply(self, inputs, timing_ctx):
        if not (inputs.hf_processor_mm_kwargs or {}).get(LANGUAGE_DETECTION_KEY):
            return super().apply(inputs, timing_ctx)
        # the transcription API's language-detection request precedes the transcription of the
        # same audio: pooled alike, but not counted (the audio is counted once, with its transcript)
        setattr(inputs, UNCOUNTED_MARK, True)
        logger.debug("vllm-affinity: language-detection request, not counted")
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data, hf_kwargs):
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != LANGUAGE_DETECTION_KEY}
        return super()._call_hf_processor(hf_data, hf_kwargs)


def compose_sizes(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    """Frames per row after two merges: ``second`` groups the rows that ``first`` made."""
    if first is None or second is None:
        return second if first is None else first
    return torch.zeros(len(second), dtype=first.dtype).index_add_(0, pooling.group_index(second, "cpu"), first)


class SizeWeightedCrossAttention(WhisperCrossAttention):
    """Whisper's cross-attention over merged encoder rows, each weighted by its group size.

    The encoder states arrive with one more column, log(group size)
    (:func:`vllm_affinity.size_weighted.with_log_sizes`); queries, keys and values get one
    more head dimension carrying it, zero-padded to ``padded_head_size`` (one the attention
    backend supports), and the output is sliced back. The layer's KV cache holds the padded
    keys, so decode steps see the same bias. Built by :func:`install_size_weighted`.
    """

    padded_head_size: int

    def forward(self, hidden_states, encoder_hidden_states):  # type: ignore[override]
        q, _ = self.q_proj(hidden_states)
        k = v = log_sizes = None
        if encoder_hidden_states is not None:  # prefill: the encoder rows of this step
            rows, log_sizes = sw.split_log_sizes(encoder_hidden_states)
            kv, _ = self.kv_proj(rows)
            k, v = kv.split([self.kv_size, self.kv_size], dim=-1)
        q, k, v = sw.augment(q, k, v, log_sizes, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                             head_dim=self.head_dim, padded=self.padded_head_size, scale=self.scaling)
        out = sw.unpad_heads(self.attn(q, k, v), self.num_heads, self.head_dim, self.padded_head_size)
        output, _ = self.out_proj(out)
        return output


def install_size_weighted(decoder_layers, vllm_config) -> int:
    """Swap every decoder layer's cross-attention for :class:`SizeWeightedCrossAttention`
    with a padded-head ``CrossAttention`` of the same layer name (so the KV-cache spec,
    hence vLLM's allocation, has the padded head size). Returns the padded head size."""
    from vllm.model_executor.layers.attention.cross_attention import CrossAttention
    from vllm.v1.attention.backend import AttentionType

    from ..engine.size_weighted import padded_head_size_for

    context = vllm_config.compilation_config.static_forward_context
    cache_config = vllm_config.cache_config
    padded = padded_head_size_for(decoder_layers[0].encoder_attn.head_dim, vllm_config,
                                  attn_type=AttentionType.ENCODER_DECODER)
    for layer in decoder_layers:
        xattn = layer.encoder_attn
        old = xattn.attn
        # the new layer registers itself under the same name: the old one leaves first
        del context[old.layer_name]
        xattn.attn = CrossAttention(
            xattn.num_heads, padded, xattn.scaling, num_kv_heads=xattn.num_kv_heads,
            cache_config=cache_config, quant_config=vllm_config.quant_config, prefix=old.layer_name,
            attn_type=AttentionType.ENCODER_DECODER,
        )
        xattn.__class__ = SizeWeightedCrossAttention
        xattn.padded_head_size = padded
    return padded


def size_weighted_encoder_layer(layer, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """vLLM's ``WhisperEncoderLayer.forward`` on (1, K, d) merged frames, with the additive
    ``bias`` (1, 1, K, K) on the self-attention logits (``encoder.size_weighted``: log group
    sizes). The encoder's attention is not paged (``MMEncoderAttention`` on whole sequences),
    so the plugin computes it with the layer's own projections and SDPA; everything else is
    the layer's modules as they are. Heads are this rank's (tensor parallelism: the output
    projection all-reduces as in the stock layer)."""
    attn = layer.self_attn
    residual = h
    x = layer.self_attn_layer_norm(h)
    qkv, _ = attn.qkv_proj(x)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    b, t, _ = q.shape
    heads, dim = attn.num_heads, attn.head_dim
    q, k, v = (y.view(b, t, -1, dim).transpose(1, 2) for y in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scaling)
    out, _ = attn.out_proj(out.transpose(1, 2).reshape(b, t, heads * dim))
    h = residual + out
    residual = h
    h = residual + layer.mlp(layer.final_layer_norm(h))
    return cast_overflow_tensors(h)


@MULTIMODAL_REGISTRY.register_processor(
    AffinityWhisperMultiModalProcessor,
    info=AffinityWhisperProcessingInfo,
    dummy_inputs=AffinityWhisperDummyInputsBuilder,
)
class AffinityWhisperForConditionalGeneration(AffinityModelMixin, WhisperForConditionalGeneration):
    """Stock Whisper whose encoder output is pooled to the processor's count."""

    ARCH = ARCH
    SEAMS = ADAPTER_SEAMS["whisper"]

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        stage = self.affinity.input
        self.size_weighted = bool(stage is not None and stage.size_weighted)
        enc = self.affinity.encoder
        self.encoder_layer = None if enc is None else enc.resolve_layer(len(self.model.encoder.layers))
        if self.size_weighted:
            layers = self.model.decoder.layers
            head_dim = layers[0].encoder_attn.head_dim
            padded = install_size_weighted(layers, vllm_config)
            logger.info(
                "vllm-affinity: size-weighted cross-attention in %d decoder layers: head size %d -> %d "
                "(1 bias dimension + %d padding), %.3gx cross-attention KV bytes per kept frame",
                len(layers), head_dim, padded, padded - head_dim - 1, padded / head_dim)

    def encode_merged(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder stage on one audio's log-mel features: vLLM's WhisperEncoder, with the
        frames merged after layer E. Returns the (K_enc, d) output and its group sizes."""
        enc, stage = self.model.encoder, self.affinity.encoder
        x = torch.nn.functional.gelu(enc.conv1(features))
        x = torch.nn.functional.gelu(enc.conv2(x)).transpose(-1, -2)
        h = (x + enc.embed_positions.weight[: x.size(-2), :]).to(x.dtype)[None]
        for layer in enc.layers[: self.encoder_layer + 1]:
            h = layer(h)
        k = pooling.num_kept(h.shape[1], stage.keep_ratio)
        sizes = pooling.group_sizes(h[0], k, stage.method, stage.window)
        trace_merge("encoder", sizes)
        h = pooling.merge(h[0], sizes)[None]
        bias = size_bias(sizes, h.dtype, h.device) if stage.size_weighted else None
        for layer in enc.layers[self.encoder_layer + 1 :]:
            h = layer(h) if bias is None else size_weighted_encoder_layer(layer, h, bias)
        return enc.layer_norm(h)[0], sizes

    def embed_multimodal(self, **kwargs: object):
        if not self.size_weighted and self.encoder_layer is None:
            return super().embed_multimodal(**kwargs)
        kept = kwargs.pop(NUM_KEPT_FIELD, None)
        if self.encoder_layer is None:
            embeds = self.stock_embeddings(**kwargs)
            enc_sizes = [None] * len(embeds)
        else:
            audio_input = self._parse_and_validate_audio_input(**kwargs)
            embeds, enc_sizes = zip(*(self.encode_merged(f) for f in audio_input["input_features"]))
        pooled = ([(e, None) for e in embeds] if kept is None
                  else pool_to_counts(embeds, kept, self.affinity, with_sizes=True))
        if not self.size_weighted:
            return tuple(rows for rows, _ in pooled)
        # every encoder output carries its rows' log sizes, in original frames (0: unmerged), in
        # one more column
        return tuple(sw.with_log_sizes(rows, compose_sizes(es, sizes)) for (rows, sizes), es in zip(pooled, enc_sizes))

    # -- /v1/audio/transcriptions on English-only checkpoints (tiny.en, base.en, ...) ----------
    # Stock vLLM 0.32 builds every Whisper prompt as <|startoftranscript|><|lang|><|task|>
    # <|notimestamps|> and, without `language`, first asks the model for a language token. An
    # English-only checkpoint was trained on <|startoftranscript|><|notimestamps|> alone: the
    # multilingual prompt yields ' to', ' (2)' or nothing, and its detection answer is no language
    # token (AssertionError, HTTP 500). openai-whisper's rule: English-only iff the vocabulary has
    # fewer than 51865 entries. Multilingual checkpoints keep vLLM's behaviour.
    @classmethod
    def get_generation_prompt(cls, stt_params):
        if not english_only(stt_params.model_config.hf_config):
            return super().get_generation_prompt(stt_params)
        from vllm.inputs import ExplicitEncoderDecoderPrompt, TextPrompt

        if stt_params.language not in (None, "en"):
            raise ValueError(f"language={stt_params.language!r}: this Whisper checkpoint is English-only")
        if stt_params.task_type != "transcribe":
            raise ValueError(f"task {stt_params.task_type!r}: this Whisper checkpoint is English-only "
                             "and only transcribes")
        prev = f"<|prev|>{stt_params.request_prompt}" if stt_params.request_prompt else ""
        return ExplicitEncoderDecoderPrompt(
            encoder_prompt=TextPrompt(
                prompt="", multi_modal_data={"audio": (stt_params.audio, stt_params.stt_config.sample_rate)}),
            decoder_prompt=TextPrompt(prompt=prev + "<|startoftranscript|><|notimestamps|>"),
        )

    @classmethod
    def get_language_detection_prompt(cls, audio, stt_config):
        prompt = super().get_language_detection_prompt(audio, stt_config)
        # marks the request for the processor (it is not counted as an audio of its own)
        prompt["encoder_prompt"]["mm_processor_kwargs"] = {LANGUAGE_DETECTION_KEY: True}
        return prompt

    @classmethod
    def parse_language_detection_output(cls, token_ids, tokenizer) -> str:
        if len(tokenizer) < MULTILINGUAL_VOCAB:  # English-only: there is nothing to detect
            return "en"
        return super().parse_language_detection_output(token_ids, tokenizer)

    def describe(self) -> str:
        frames = int(self.config.max_source_positions)
        line = f"Whisper with Affinity Pooling: {describe(self.affinity, frames)}"
        window = self.affinity_facts.window_seconds
        if self.affinity.encoder_real_length:
            line += (f"; encoder_real_length is ignored for Whisper (its encoder is trained on the "
                     f"zero-padded {window:g} s window; the encoder runs on all of it, as stock)")
        if self.affinity.long_audio != "truncate":
            line += (f"; long_audio={self.affinity.long_audio} is ignored for Whisper (audio over {window:g} s "
                     f"is truncated as stock; the transcription API splits long audio into {window:g} s chunks)")
        return line
