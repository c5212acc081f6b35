"""The adapter concept: what every architecture does the same way, written once.

An architecture is served by three mixins placed in front of vLLM's own classes, so
an adapter can still override any vLLM hook it must:

* :class:`AffinityInfoMixin`      (ProcessingInfo, API server): reads and validates the
  server SPEC once per engine, strips the plugin's request key before the HF processor,
  resamples with soxr (vLLM's default needs torchaudio, absent from CPU installs);
* :class:`AffinityProcessorMixin` (multimodal processor, API server): validates each
  request (HTTP 400 naming the problem), fixes every audio's pooled count
  ``K = num_kept(n, keep_ratio)`` before anything runs, hands K to the model as the
  per-item field ``affinity_num_kept``, shrinks the stock placeholder to K tokens and
  accounts for what it did (log lines, Prometheus metrics);
* :class:`AffinityModelMixin`     (model, worker): pools the stock audio embeddings to
  exactly K (input stage) and, with a deep stage, runs the decoder stack with the merge
  after layer L (the layers above it use the deep KV-cache spec of ``engine/kv.py``).

What differs per architecture is small and declared by the adapter:
``stock_tokens(num_samples)`` (the stock placeholder count of one audio, a pure
function of its length: the processor's one source for n, also on processor-cache hits),
``placeholder_token_id()``, ``describe()``, optionally ``stock_embeddings(**kwargs)``
and ``decoder()`` (the decoder stack of a deep stage). The engine-facing numbers
(window, tokens per window, deep stage allowed, positions) are data in
:mod:`vllm_affinity.architectures`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from .. import accounting, budget, pooling
from ..architectures import ArchFacts, facts_for
from ..config import (
    HF_CONFIG_KEY,
    REQUEST_KEEP_RATIO_KEY,
    AffinityConfig,
    AffinityConfigError,
    request_keep_ratio,
    server_config,
)

# A child of vLLM's logger, so lines use vLLM's handler, format and VLLM_LOGGING_LEVEL.
logger = logging.getLogger("vllm.affinity")

NUM_KEPT_FIELD = "affinity_num_kept"
#: processed-data keys of audio features (their absence means precomputed embeddings)
FEATURE_KEYS = ("input_features", "input_audio_features", "whisper_input_features")
SAMPLE_RATE = 16000
#: attribute set on a ProcessorInputs (a dataclass) that is not a request to count: vLLM's profiling
#: input (get_dummy_inputs), Whisper's language-detection request
UNCOUNTED_MARK = "_affinity_uncounted"
STATS_INTERVAL_S = 10.0
FAULT_ENV = "VLLM_AFFINITY_INJECT_FAULT"
TRACE_ENV = "VLLM_AFFINITY_TRACE_DIR"


def validated_config(facts: ArchFacts, hf_config: Any) -> AffinityConfig:
    """The server SPEC (``hf_overrides.affinity``), validated for this architecture."""
    return facts.validate(server_config(hf_config))


def refuse_additional_config(vllm_config) -> None:
    extra = vllm_config.additional_config or {}
    if isinstance(extra, dict) and HF_CONFIG_KEY in extra:
        raise AffinityConfigError(
            "additional_config.affinity is not read: in vLLM 0.32 the multimodal processor, "
            "which fixes each audio's token count, cannot see --additional-config. Pass "
            "--hf-overrides '{\"affinity\": SPEC}' (or `vllm-affinity serve --affinity SPEC`)."
        )


class TokenStats:
    """Audio tokens in / to the LM, logged at most every STATS_INTERVAL_S (info)."""

    def __init__(self) -> None:
        self.audios = self.tokens_in = self.tokens_out = 0
        self.last = time.monotonic()

    def add(self, n: Sequence[int], k: Sequence[int]) -> None:
        self.audios += len(n)
        self.tokens_in += sum(n)
        self.tokens_out += sum(k)
        now = time.monotonic()
        if now - self.last >= STATS_INTERVAL_S:
            saved = 1.0 - self.tokens_out / max(self.tokens_in, 1)
            logger.info(
                "vllm-affinity: %d audios in the last %.0f s: %d audio tokens in, %d to the LM "
                "(%.1f%% saved)",
                self.audios, now - self.last, self.tokens_in, self.tokens_out, 100 * saved,
            )
            self.audios = self.tokens_in = self.tokens_out = 0
            self.last = now


def trace_merge(stage: str, sizes: torch.Tensor) -> None:
    """Debug hook: with ``VLLM_AFFINITY_TRACE_DIR`` set, every rank appends each merge
    decision (group sizes) to ``rank<R>.jsonl`` there, so tests can prove that all
    tensor-parallel ranks merge identically."""
    trace_dir = os.environ.get(TRACE_ENV)
    if not trace_dir:
        return
    import json

    from vllm.distributed import get_tensor_model_parallel_rank

    path = os.path.join(trace_dir, f"rank{get_tensor_model_parallel_rank()}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"stage": stage, "sizes": sizes.tolist()}) + "\n")


def _maybe_inject_fault(span_len: int) -> None:
    """Test hook: ``VLLM_AFFINITY_INJECT_FAULT=deep-merge:N`` makes the deep merge of
    every audio span of N tokens raise (the fault tests use it; unset in production)."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec.startswith("deep-merge:") and int(spec.split(":", 1)[1]) == span_len:
        raise RuntimeError(f"injected fault ({FAULT_ENV}={spec})")


# -- API server side ----------------------------------------------------------------------------
class AffinityInfoMixin:
    """Mix in front of the architecture's ProcessingInfo. Subclasses set ``ARCH``."""

    ARCH: ClassVar[str]

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.facts = facts_for(self.ARCH)
        # validated once per engine; a bad SPEC fails here, at start-up. --hf-overrides lands on
        # the top-level HF config (some architectures' get_hf_config() returns a sub-config)
        self.affinity = validated_config(self.facts, self.ctx.model_config.hf_config)
        self.stats = TokenStats()

    def get_hf_processor(self, **kwargs: object):
        kwargs.pop(REQUEST_KEEP_RATIO_KEY, None)  # ours, not an HF processor argument
        return super().get_hf_processor(**kwargs)

    def get_data_parser(self):
        parser = super().get_data_parser()
        # torchaudio (vLLM's default resampler) is absent from CPU installs: use soxr
        parser.audio_resampler.method = "soxr"
        return parser

    # -- architectures whose processor windows long audio itself (facts.long_audio "native") --
    def native_max_audio_seconds(self) -> float:
        """The longest audio encoded: the processor's ``max_audio_len``, or the server's lower limit."""
        limit = self.facts.audio_seconds_limit(self.affinity)
        cap = getattr(self.get_hf_processor(), "max_audio_len", None)
        if cap is None:  # no cap of its own: the stock budget is profiled on one window
            return float(limit if limit is not None else self.facts.window_seconds)
        return float(cap) if limit is None else min(float(cap), limit)

    def get_mm_max_tokens_per_item(self, seq_len, mm_counts=None):
        if self.facts.long_audio != "native":
            return super().get_mm_max_tokens_per_item(seq_len, mm_counts)
        # the stock bound of the longest accepted audio, whatever the server ratio: a request
        # may ask for a higher keep ratio than the server default
        windows = math.ceil(round(self.native_max_audio_seconds() / self.facts.window_seconds, 6))
        return {"audio": self.facts.tokens_per_window * windows}


class AffinityDummyInputsMixin:
    """Mix in front of the architecture's dummy-inputs builder: vLLM profiles memory (and,
    on GPU, runs a dummy request through the processor) with the longest audio this
    server accepts: several windows where the plugin windows long audio, never longer
    than ``max_audio_seconds`` (a longer dummy would be refused by the request checks)."""

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        import numpy as np

        data = super().get_dummy_mm_data(seq_len, mm_counts, mm_options)
        if not data.get("audio"):
            return data
        facts, cfg = self.info.facts, self.info.affinity
        audios = data["audio"]
        windows = facts.max_windows(cfg)
        if facts.long_audio == "plugin-windows" and windows and windows > 1:
            audios = [np.tile(a, windows) for a in audios]
        limit = facts.audio_seconds_limit(cfg)
        if limit is not None:
            audios = [a[: int(limit * SAMPLE_RATE)] for a in audios]
        data["audio"] = audios
        return data


class AffinityProcessorMixin:
    """Mix in front of the architecture's multimodal processor."""

    info: AffinityInfoMixin
    #: the stock processor's own kwargs a request may pass beside the plugin's (others: 400)
    EXTRA_MM_KWARGS: ClassVar[tuple[str, ...]] = ()

    # -- what an adapter declares -------------------------------------------------------------
    def stock_tokens(self, num_samples: int) -> int:
        """Placeholders stock vLLM gives one 16 kHz audio of ``num_samples`` samples."""
        raise NotImplementedError

    def encoder_stage_tokens(self, num_samples: int) -> int:
        """Tokens one audio has after the encoder stage (architectures with ``encoder_stage``)."""
        raise NotImplementedError(f"{self.info.facts.name}: no encoder stage")

    def placeholder_token_id(self) -> int:
        """The token id of one audio placeholder (what the replacement repeats K times).
        Default: the HF processor's ``audio_token`` in the tokenizer's vocabulary."""
        processor = self.info.get_hf_processor()
        token_id = self.info.get_tokenizer().get_vocab().get(getattr(processor, "audio_token", None))
        return processor.audio_token_id if token_id is None else token_id

    def windowed_stock_tokens(self, num_samples: int, tokens_of_frames) -> int:
        """Stock count of a processor that cuts audio into ``chunk_length`` windows itself, up
        to ``max_audio_len``: per window, ``tokens_of_frames`` of its mel frames
        (ceil(samples / hop), what the feature extractor's mask marks), summed."""
        processor = self.info.get_hf_processor()
        fe = processor.feature_extractor
        size = int(fe.sampling_rate * fe.chunk_length)
        windows = min(max(1, -(-num_samples // size)), int(processor.max_audio_len // fe.chunk_length))
        kept = min(num_samples, windows * size)
        return sum(tokens_of_frames(-(-(min((i + 1) * size, kept) - i * size) // fe.hop_length))
                   for i in range(windows))

    def kv_blocks_saved(self, prompt_len: int, n: list[int], kept: list[int], kept_deep: list[int]) -> float:
        """KV blocks not allocated against stock at the end of prefill, in stock blocks
        (decoder-only LMs; see :mod:`vllm_affinity.accounting`)."""
        bs = self.block_size()
        if not bs:
            return 0.0
        tokens = accounting.RequestTokens(prompt_len, sum(n), sum(kept), sum(kept_deep))
        num_layers = int(self.info.ctx.model_config.hf_text_config.num_hidden_layers)
        deep = self.info.affinity.deep
        layout = accounting.KVLayout(num_layers, deep.resolve_layer(num_layers) if deep else None)
        return accounting.kv_blocks_saved(
            layout, stock_tokens=tokens.stock_prompt, tokens=tokens.prompt, deep_tokens=tokens.deep_prompt,
            block_size=bs,
        )

    # -- shared ---------------------------------------------------------------------------------
    def block_size(self) -> int | None:
        # set by the config hook: the processor sees only the model config
        cache = getattr(self.info.ctx.model_config, "_affinity_cache_config", None)
        return getattr(cache, "block_size", None) if cache is not None else None

    def keep_ratio(self, hf_processor_mm_kwargs: Mapping[str, object] | None) -> float:
        """The request's input keep ratio: server default merged with its own kwargs."""
        merged = self.info.ctx.get_merged_mm_kwargs(hf_processor_mm_kwargs or {})
        return request_keep_ratio(self.info.affinity, merged)

    def kept_counts(self, audios: Sequence, ratio: float) -> tuple[list[int], list[int]]:
        """(n, K) per audio (waveforms): the one source of both. K follows the input stage's
        budget policy (vllm_affinity/budget.py); the prompt's placeholders, the metrics and
        the log all read K from here (via the placeholders)."""
        stage = self.info.affinity.input
        facts = self.info.facts
        n = [self.stock_tokens(len(a)) for a in audios]
        if self.info.affinity.encoder is not None:  # the input stage pools what the encoder stage left
            # (the config refuses a voiced budget with an encoder stage)
            left = [self.encoder_stage_tokens(len(a)) for a in audios]
            return n, self._block_aligned(n, [pooling.num_kept(x, ratio) for x in left], left)
        if stage is None or stage.budget == "fixed":
            return n, self._block_aligned(n, [pooling.num_kept(x, ratio) for x in n], n)
        spt = facts.window_seconds * SAMPLE_RATE / facts.tokens_per_window
        return n, self._block_aligned(n, [
            budget.kept_count(x, ratio, policy=stage.budget, wave=a, samples_per_token=spt,
                              silence_groups=stage.silence_groups, voiced_db=stage.voiced_db)
            for x, a in zip(n, audios)], n)

    def _block_aligned(self, n: list[int], kept: list[int], left: list[int]) -> list[int]:
        """``input.kv_block_align``: each audio drops a multiple of the KV block size
        (:func:`vllm_affinity.pooling.block_aligned_count`; ``left``: the rows the encoder
        stage left, the most the input stage can keep)."""
        stage = self.info.affinity.input
        if stage is None or stage.kv_block_align == "off":
            return kept
        bs = self.block_size()
        if not bs:  # the config hook did not run: no engine config to align to
            raise RuntimeError("vllm-affinity: input.kv_block_align needs the KV block size, which the "
                               "config hook hands to the processor; it did not run for this model")
        return [pooling.block_aligned_count(m, k, bs, stage.kv_block_align, most=most)
                for m, k, most in zip(n, kept, left)]

    def check_request(self, inputs):
        """Validate the request's kwargs and audios (ValueError: vLLM answers HTTP 400);
        return its audio items (or None)."""
        from vllm.multimodal.parse import AudioProcessorItems

        cfg, facts = self.info.affinity, self.info.facts
        kwargs = dict(inputs.hf_processor_mm_kwargs or {})
        accepted = (REQUEST_KEEP_RATIO_KEY, *self.EXTRA_MM_KWARGS)
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            only = repr(accepted[0]) if len(accepted) == 1 else f"{list(accepted)}"
            raise ValueError(f"mm_processor_kwargs: unknown key(s) {unknown}; this model accepts only {only}")
        request_keep_ratio(cfg, kwargs)  # raises naming the field
        items = inputs.mm_data_items
        audios = items["audio"] if "audio" in items else None
        if not isinstance(audios, AudioProcessorItems):
            return None
        limit = facts.audio_seconds_limit(cfg)
        truncates = facts.max_windows(cfg) == 1
        for i in range(len(audios)):
            if audios.get(i) is None:  # referenced by uuid, already cached
                continue
            samples = audios.get_audio_length(i)
            if samples == 0:
                raise ValueError(f"audio item {i} is empty (0 samples)")
            seconds = samples / SAMPLE_RATE
            if limit is not None and seconds > limit:
                raise ValueError(
                    f"audio item {i} is {seconds:.1f} s long, over this server's max_audio_seconds={limit:g}"
                )
            if truncates and seconds > facts.window_seconds:
                logger.warning(
                    "vllm-affinity: audio item %d is %.1f s; %s's encoder sees the first %g s, the rest "
                    "is dropped (%s)", i, seconds, facts.name, facts.window_seconds, self.truncation_hint(),
                )
        return audios

    def truncation_hint(self) -> str:
        return "set max_audio_seconds to reject such audio"

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options):
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        # vLLM's start-up profiling input: processed like a request, but not one (no log line,
        # not counted on /metrics)
        setattr(inputs, UNCOUNTED_MARK, True)
        return inputs

    def apply(self, inputs, timing_ctx):
        audios = self.check_request(inputs)
        out = super().apply(inputs, timing_ctx)
        if audios is not None and not getattr(inputs, UNCOUNTED_MARK, False):
            self._account(out, self.keep_ratio(inputs.hf_processor_mm_kwargs), audios)
        return out

    def _account(self, out, ratio: float, audios) -> None:
        """Log and count what the plugin did to this request (all counts are exact)."""
        placeholders = out["mm_placeholders"].get("audio", [])
        kept = [int(p.length) for p in placeholders]
        n = [
            self.stock_tokens(audios.get_audio_length(i)) if audios.get(i) is not None else k
            for i, k in enumerate(kept)
        ]
        deep = self.info.affinity.deep
        kept_deep = kept
        if deep is not None:  # the plan's counts (deep.kv_block_align included)
            from ..plan import deep_kept_count

            kept_deep = [deep_kept_count(k, deep.keep_ratio, self.block_size(), deep.kv_block_align) for k in kept]
        prompt_len = len(out.get("encoder_prompt_token_ids") or out["prompt_token_ids"])
        blocks = self.kv_blocks_saved(prompt_len, n, kept, kept_deep)
        deep_part = f" -> {kept_deep} above the deep merge layer" if deep is not None else ""
        logger.debug(
            "vllm-affinity: audio tokens %s -> %s (keep_ratio=%s)%s; %.2f KV blocks saved",
            n, kept, ratio, deep_part, blocks,
        )
        self.info.stats.add(n, kept)
        from ..metrics import record

        record(sum(n), sum(kept), sum(kept_deep), blocks)

    def _call_hf_processor(self, hf_data, hf_kwargs):
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != REQUEST_KEEP_RATIO_KEY}
        return super()._call_hf_processor(hf_data, hf_kwargs)

    def _postprocess_hf_mm_data(self, hf_data, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(hf_data, hf_processor_mm_kwargs, processed_data)
        audios = None
        if isinstance(hf_data, Mapping):  # vLLM's key is "audios"; some processors rename it
            audios = hf_data.get("audio", hf_data.get("audios"))
        if not audios or not any(k in processed_data for k in FEATURE_KEYS):  # precomputed embeddings
            return processed_data
        audios = audios if isinstance(audios, list) else [audios]
        _, k = self.kept_counts(audios, self.keep_ratio(hf_processor_mm_kwargs))
        processed_data[NUM_KEPT_FIELD] = torch.tensor(k, dtype=torch.long)
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[NUM_KEPT_FIELD] = MultiModalFieldConfig.batched("audio", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        from vllm.multimodal.parse import AudioProcessorItems
        from vllm.multimodal.processing import PromptReplacement

        stock = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        kept = out_mm_kwargs.get_data().get(NUM_KEPT_FIELD)
        if kept is None:
            return stock
        token = self.placeholder_token_id()

        def replacement(item_idx: int) -> list[int]:
            k = int(kept[item_idx])
            if k == 0:
                audio_len = mm_items.get_items("audio", AudioProcessorItems).get_audio_length(item_idx)
                raise ValueError(f"The audio (len={audio_len}) is too short to be represented inside the model")
            return [token] * k

        # the stock target (where the audio goes), K placeholders instead of n
        return [
            PromptReplacement(modality=u.modality, target=u.target, replacement=replacement)
            if u.modality == "audio" else u
            for u in stock
        ]


# -- worker side ----------------------------------------------------------------------------------
def pool_to_counts(embeds: Sequence[torch.Tensor], kept, cfg: AffinityConfig, *, with_sizes: bool = False) -> tuple:
    """Merge embedding i (n_i, d) into exactly kept[i] rows (the input stage's grouping).

    ``kept`` comes from the processor; with the input stage off (per-request ratios
    only) the grouping is affinity with window 1. ``with_sizes``: (rows, group sizes) per
    audio (size-weighted attention needs them)."""
    kept = [int(x) for x in (kept.tolist() if isinstance(kept, torch.Tensor) else kept)]
    if len(kept) != len(embeds):
        raise RuntimeError(f"vllm-affinity: {len(kept)} kept counts for {len(embeds)} audios")
    stage = cfg.input
    method = stage.method if stage is not None else "affinity"
    window = stage.window if stage is not None else 1
    out = []
    for e, k in zip(embeds, kept):
        if k > e.shape[0]:
            raise RuntimeError(f"vllm-affinity: {k} placeholders planned for an audio of {e.shape[0]} embeddings")
        sizes = pooling.group_sizes(e, k, method, window)
        trace_merge("input", sizes)
        out.append((pooling.merge(e, sizes), sizes) if with_sizes else pooling.merge(e, sizes))
    return tuple(out)


def merge_step(h, residual, positions, step, method: str, window: int, failed: list[str]):
    """Merge every audio span of the step (flattened rows) after the merge layer.

    Affinity is computed on the residual stream h + residual (what the HF decoder layer
    returns); a merged row carries the mean stream in ``h`` and zero residual. Returns
    (h, residual, positions) with C rows, ``back``: the row of each of the T tokens, and
    ``row_sizes``: how many tokens each of the C rows stands for (1 outside the spans).
    ``positions`` is (T,) for 1-D RoPE or (sections, T) for M-RoPE: a merged row takes
    the floor of its members' mean in every component.

    If choosing one span's groups fails, that span falls back to equal-size bins (the
    row count, hence KV slots, stay as planned, so the batch goes on) and its request
    id is appended to ``failed``: the scheduler then fails that request alone.
    """
    hs, rs, ps, back, row_sizes = [], [], [], [], []
    cursor = row = 0

    def copy(a: int, b: int) -> None:
        nonlocal row
        if b > a:
            hs.append(h[a:b]); rs.append(residual[a:b]); ps.append(positions[..., a:b])
            back.append(torch.arange(row, row + b - a, device=h.device))
            row_sizes.append(torch.ones(b - a, dtype=torch.long))
            row += b - a

    for (a, m, k), req_id in zip(step.spans, step.span_req_ids):
        copy(cursor, a)
        x = h[a : a + m] + residual[a : a + m]
        try:
            _maybe_inject_fault(m)
            sizes = pooling.group_sizes(x, k, method, window)
        except Exception as exc:  # noqa: BLE001 - one request fails, not the engine
            logger.error(
                "vllm-affinity: deep merge failed for request %s (audio span of %d tokens): %r; "
                "failing this request, the batch goes on", req_id, m, exc,
            )
            failed.append(req_id)
            sizes = pooling.uniform_sizes(m, k)
        trace_merge("deep", sizes)
        merged = pooling.merge(x, sizes)
        hs.append(merged); rs.append(torch.zeros_like(merged))
        span_pos = positions[..., a : a + m]
        ps.append(
            pooling.merge_positions(span_pos, sizes) if span_pos.dim() == 1
            else torch.stack([pooling.merge_positions(p, sizes) for p in span_pos])
        )
        back.append(row + pooling.group_index(sizes, h.device))
        row_sizes.append(sizes.cpu().long())
        row += k
        cursor = a + m
    copy(cursor, h.shape[0])
    if row != step.num_rows:
        raise RuntimeError(f"vllm-affinity: merged to {row} rows, the runner planned {step.num_rows}")
    return torch.cat(hs), torch.cat(rs), torch.cat(ps, dim=-1), torch.cat(back), torch.cat(row_sizes)


class AffinityModelMixin:
    """Mix in front of the architecture's vLLM model class. Subclasses set ``ARCH``."""

    ARCH: ClassVar[str]
    #: the adapter encodes the real audio length when the SPEC asks (encoder_real_length)
    SUPPORTS_ENCODER_REAL_LENGTH: ClassVar[bool] = False
    #: private hooks of this architecture's vLLM module the adapter overrides
    #: (``compat.ADAPTER_SEAMS``), checked when the model is built
    SEAMS: ClassVar[tuple] = ()

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        from .. import compat

        compat.check_seams(self.SEAMS)
        refuse_additional_config(vllm_config)
        self.affinity_facts = facts_for(self.ARCH)
        self.affinity = validated_config(self.affinity_facts, vllm_config.model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.affinity_step = None  # set by the runner for each forward pass
        self.affinity_failed: list[str] = []  # request ids whose merge failed, drained by the runner
        self.deep_layer: int | None = None
        self.deep_size_weighted: list = []  # the deep layers' size-weighted attentions, if on
        if self.affinity.deep is not None:
            from ..engine.kv import AffinityDeepAttention

            layers = self.decoder().layers
            self.deep_layer = self.affinity.deep.resolve_layer(len(layers))
            for layer in layers[self.deep_layer + 1 :]:
                layer.self_attn.attn.__class__ = AffinityDeepAttention
            if self.affinity.deep.size_weighted:
                from ..engine.size_weighted import install_deep_size_weighted

                self.deep_size_weighted = install_deep_size_weighted(layers[self.deep_layer + 1 :], vllm_config)
        logger.info("vllm-affinity: %s", self.describe())

    # -- what an adapter may override -----------------------------------------------------------
    def describe(self) -> str:
        facts = self.affinity_facts
        line = f"{facts.name} with Affinity Pooling, " + self.affinity.describe(
            real_length=self.SUPPORTS_ENCODER_REAL_LENGTH, windows=facts.long_audio == "plugin-windows")
        if self.affinity.encoder_real_length and not self.SUPPORTS_ENCODER_REAL_LENGTH:
            line += f"; encoder_real_length is ignored for {facts.name} (its encoder runs as stock)"
        if facts.long_audio == "native":
            limit = facts.audio_seconds_limit(self.affinity)
            line += (f"; audio over {facts.window_seconds:g} s is handled by {facts.name}'s own processor"
                     + (f", up to {limit:g} s" if limit is not None else ""))
        return line

    def decoder(self):
        """The decoder stack (``embed_input_ids``, ``layers``, ``norm``) the deep stage drives;
        vLLM's Qwen2/Llama-style ``language_model.model`` by default."""
        return self.language_model.model

    def stock_embeddings(self, **kwargs: object):
        """One (n_i, hidden) embedding per audio, as stock vLLM computes them."""
        return super().embed_multimodal(**kwargs)

    # -- shared -----------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        kept = kwargs.pop(NUM_KEPT_FIELD, None)
        embeds = self.stock_embeddings(**kwargs)
        if kept is None or embeds is None or len(embeds) == 0:
            return embeds
        return pool_to_counts(embeds, kept, self.affinity)

    def forward(self, input_ids, positions, *args, **kwargs):
        if self.deep_layer is None:  # stock, whatever the architecture's signature
            return super().forward(input_ids, positions, *args, **kwargs)
        # decoder-only LMs: forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        inputs_embeds = args[1] if len(args) > 1 else kwargs.get("inputs_embeds")
        lm = self.decoder()
        h = inputs_embeds if inputs_embeds is not None else lm.embed_input_ids(input_ids)
        residual = None
        for layer in lm.layers[: self.deep_layer + 1]:
            h, residual = layer(positions, h, residual)
        step, back, row_sizes = self.affinity_step, None, None
        if step is not None and step.spans:
            deep = self.affinity.deep
            h, residual, positions, back, row_sizes = merge_step(
                h, residual, positions, step, deep.method, deep.window, self.affinity_failed
            )
        # size-weighted deep attention: the log size of every row of this forward pass (0 = unmerged)
        if self.deep_size_weighted:
            log_sizes = (h.new_zeros(h.shape[0], dtype=torch.float32) if row_sizes is None
                         else row_sizes.to(h.device, torch.float32).log())
            for attn in self.deep_size_weighted:
                attn.log_sizes = log_sizes
        for layer in lm.layers[self.deep_layer + 1 :]:
            h, residual = layer(positions, h, residual)
        for attn in self.deep_size_weighted:
            attn.log_sizes = None
        h, _ = lm.norm(h, residual)
        # one row per scheduled token again (logits are read at the last token of each
        # request, which is never inside an audio span in chat prompts)
        return h if back is None else h[back]
