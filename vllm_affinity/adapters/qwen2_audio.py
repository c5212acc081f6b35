"""Qwen2-Audio with Affinity Pooling.

Input stage (the EVS pattern of vLLM's video pruning):
* the processor (API-server side) validates the request, fixes each audio's
  placeholder count to ``K = num_kept(n, keep_ratio)`` before the encoder runs, hands
  K to the model as a per-item field ``affinity_num_kept`` and counts what it did
  (log lines, Prometheus metrics);
* the model (worker side) runs the stock encoder + projector, then merges each
  audio's ``n`` embeddings into exactly K by exact-count grouping.

Deep stage: the model runs decoder layers 0..L, merges every audio span the runner
scheduled in this step (``merge_step``), and runs the layers above L on the shorter
sequence; their attention layers use the deep KV-cache spec (see ``vllm_affinity.engine``).

The server SPEC travels in the HF config (``--hf-overrides '{"affinity": SPEC}'``):
it is the one channel both the processor and the model can read in vLLM 0.32.
With both stages off, everything is stock.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.qwen2_audio import (
    Qwen2AudioDummyInputsBuilder,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioMultiModalDataParser,
    Qwen2AudioMultiModalProcessor,
    Qwen2AudioProcessingInfo,
    _get_feat_extract_output_lengths,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import AudioProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from .. import pooling
from .common import check_request, pool_to_counts, refuse_additional_config
from ..encoder import split_windows, window_mel_frames
from ..engine.kv import AffinityDeepAttentionSpec
from ..config import (
    ENCODER_WINDOW_SECONDS,
    HF_CONFIG_KEY,
    REQUEST_KEEP_RATIO_KEY,
    AffinityConfig,
    load_spec,
    request_keep_ratio,
    server_config,
)

# A child of vLLM's logger, so lines use vLLM's handler, format and VLLM_LOGGING_LEVEL.
logger = logging.getLogger("vllm.affinity")

NUM_KEPT_FIELD = "affinity_num_kept"
#: per audio, how many rows of input_features (30 s encoder windows) it spans
NUM_WINDOWS_FIELD = "affinity_num_windows"
STATS_INTERVAL_S = 10.0


class _TokenStats:
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


class AffinityQwen2AudioProcessingInfo(Qwen2AudioProcessingInfo):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        # validated once per engine; a bad SPEC fails here, at start-up
        self.affinity = server_config(self.get_hf_config())
        self.stats = _TokenStats()

    def get_hf_processor(self, **kwargs: object):
        # our keys are not HF processor arguments
        kwargs.pop(REQUEST_KEEP_RATIO_KEY, None)
        return super().get_hf_processor(**kwargs)

    def get_mm_max_tokens_per_item(self, seq_len, mm_counts=None):
        # one audio may span several 30 s encoder windows: size vLLM's encoder cache and
        # profiling for the longest audio this server accepts
        out = dict(super().get_mm_max_tokens_per_item(seq_len, mm_counts))
        if "audio" in out:
            out["audio"] *= self.affinity.max_windows
        return out

    def get_data_parser(self):
        # torchaudio (vLLM's default resampler) is absent from CPU installs: use soxr
        fe = self.get_feature_extractor()
        return Qwen2AudioMultiModalDataParser(
            target_sr=fe.sampling_rate,
            target_channels=self.get_target_channels(),
            audio_resample_method="soxr",
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )


class AffinityQwen2AudioDummyInputsBuilder(Qwen2AudioDummyInputsBuilder):
    """Profiles with the longest audio the server accepts (several windows with
    ``long_audio: windows``), so vLLM's memory profile covers the real worst case."""

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        data = super().get_dummy_mm_data(seq_len, mm_counts, mm_options)
        windows = self.info.affinity.max_windows
        if windows > 1 and data.get("audio"):
            data["audio"] = [np.tile(a, windows) for a in data["audio"]]
        return data


class AffinityQwen2AudioMultiModalProcessor(Qwen2AudioMultiModalProcessor):
    info: AffinityQwen2AudioProcessingInfo

    def apply(self, inputs, timing_ctx):
        """Validate the request first (HTTP 400 naming the problem), then account."""
        cfg = self.info.affinity
        ratio, audios = check_request(
            cfg, inputs, model="Qwen2-Audio", window_s=ENCODER_WINDOW_SECONDS, limit_s=cfg.audio_seconds_limit,
            truncates=cfg.long_audio == "truncate",
            hint="set long_audio: windows to encode all of it, or max_audio_seconds to reject such audio",
        )
        out = super().apply(inputs, timing_ctx)
        if audios is not None:
            self._account(out, ratio, audios)
        return out

    @staticmethod
    def _audio_items(items: MultiModalDataItems) -> AudioProcessorItems | None:
        if "audio" not in items:
            return None
        audio = items["audio"]
        return audio if isinstance(audio, AudioProcessorItems) else None

    def _encoder_tokens(self, num_samples: int) -> int:
        """Placeholder count of a 16 kHz audio before pooling: per encoder window, the
        feature extractor marks ceil(samples / hop) frames (at most its 30 s window),
        then the encoder's two stride-2 stages. Stock Qwen2-Audio has one window (the
        first 30 s). Computed from the waveform, so processor-cache hits count too."""
        fe = self.info.get_feature_extractor()
        frames = torch.tensor(window_mel_frames(
            num_samples, windows=self.info.affinity.long_audio == "windows",
            window_samples=fe.n_samples, hop=fe.hop_length))
        return int(_get_feat_extract_output_lengths(frames)[1].sum())

    def _account(self, out, ratio: float, audios: AudioProcessorItems) -> None:
        """Log and count what the plugin did to this request (all counts are exact)."""
        cfg = self.info.affinity
        placeholders = out["mm_placeholders"].get("audio", [])
        kept = [int(p.length) for p in placeholders]
        n = [
            self._encoder_tokens(audios.get_audio_length(i)) if audios.get(i) is not None else k
            for i, k in enumerate(kept)
        ]
        deep = cfg.deep
        kept_deep = [pooling.num_kept(k, deep.keep_ratio) for k in kept] if deep is not None else kept
        blocks = self._blocks_saved(len(out["prompt_token_ids"]), n, kept, kept_deep)
        logger.debug(
            "vllm-affinity: audio tokens %s -> %s (keep_ratio=%s) -> %s above the deep merge layer; "
            "%.2f KV blocks saved",
            n, kept, ratio, kept_deep, blocks,
        )
        self.info.stats.add(n, kept)
        from ..metrics import record

        record(sum(n), sum(kept), sum(kept_deep), blocks)

    def _blocks_saved(self, prompt_len: int, n, kept, kept_deep) -> float:
        """KV blocks not allocated at the end of prefill, in stock blocks (a block of
        every decoder layer): stock prompt vs this prompt in each KV-cache group."""
        cache = getattr(self.info.ctx.model_config, "_affinity_cache_config", None)
        if cache is None or not cache.block_size:
            return 0.0
        bs = cache.block_size
        num_layers = self.info.get_hf_config().text_config.num_hidden_layers
        stock = prompt_len + sum(n) - sum(kept)
        deep_len = prompt_len - sum(kept) + sum(kept_deep)
        blocks = lambda t: -(-t // bs)  # noqa: E731
        deep = self.info.affinity.deep
        if deep is None:
            return float(blocks(stock) - blocks(prompt_len))
        # vLLM groups layers of one spec into KV-cache groups of equal size (the smaller
        # of the two counts), padding the last group of a spec when it does not divide
        shallow_layers = deep.resolve_layer(num_layers) + 1
        deep_layers = num_layers - shallow_layers
        size = min(shallow_layers, deep_layers)
        shallow_groups, deep_groups = -(-shallow_layers // size), -(-deep_layers // size)
        saved_layer_blocks = size * (
            shallow_groups * (blocks(stock) - blocks(prompt_len)) + deep_groups * (blocks(stock) - blocks(deep_len))
        )
        return saved_layer_blocks / num_layers

    def _call_hf_processor(self, hf_data, hf_kwargs):
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != REQUEST_KEEP_RATIO_KEY}
        audios = hf_data.get("audio")
        if self.info.affinity.long_audio != "windows" or not audios:
            return super()._call_hf_processor(hf_data, hf_kwargs)
        # Long audio: every 30 s window becomes one row of input_features, exactly as if
        # it were an audio of its own; NUM_WINDOWS_FIELD says which rows make one audio.
        # (The text here is vLLM's dummy text, one placeholder per HF audio; the real
        # prompt is expanded by _get_prompt_updates.)
        n_samples = self.info.get_feature_extractor().n_samples
        windows = [split_windows(a, n_samples) for a in audios]
        data = dict(hf_data, audio=[w for ws in windows for w in ws])
        if "text" in data:
            data["text"] = self.dummy_inputs.get_dummy_text({"audio": len(data["audio"])})
        out = super()._call_hf_processor(data, hf_kwargs)
        out[NUM_WINDOWS_FIELD] = torch.tensor([len(ws) for ws in windows], dtype=torch.long)
        return out

    def _postprocess_hf_mm_data(self, hf_data, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(
            hf_data, hf_processor_mm_kwargs, processed_data
        )
        mask = processed_data.get("feature_attention_mask")
        if mask is None:  # precomputed embeddings: nothing to pool
            return processed_data
        merged_kwargs = self.info.ctx.get_merged_mm_kwargs(hf_processor_mm_kwargs)
        ratio = request_keep_ratio(self.info.affinity, merged_kwargs)
        _, lengths = _get_feat_extract_output_lengths(mask.sum(-1))
        n = [int(x) for x in lengths.tolist()]
        num_windows = processed_data.get(NUM_WINDOWS_FIELD)
        if num_windows is not None:  # one audio = several rows: sum its windows
            n = [int(sum(x)) for x in torch.split(torch.tensor(n), num_windows.tolist())]
        k = [pooling.num_kept(x, ratio) for x in n]
        processed_data[NUM_KEPT_FIELD] = torch.tensor(k, dtype=torch.long)
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[NUM_KEPT_FIELD] = MultiModalFieldConfig.batched("audio", keep_on_cpu=True)
        num_windows = hf_inputs.get(NUM_WINDOWS_FIELD)
        if num_windows is not None:
            for key in ("input_features", "feature_attention_mask"):
                fields[key] = MultiModalFieldConfig.flat_from_sizes("audio", num_windows)
            fields[NUM_WINDOWS_FIELD] = MultiModalFieldConfig.batched("audio", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        stock = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        kept = out_mm_kwargs.get_data().get(NUM_KEPT_FIELD)
        if kept is None:
            return stock
        audio_token_id = self.info.get_hf_processor().audio_token_id

        def replacement(item_idx: int) -> list[int]:
            k = int(kept[item_idx])
            if k == 0:
                audio_len = mm_items.get_items("audio", AudioProcessorItems).get_audio_length(item_idx)
                raise ValueError(
                    f"The audio (len={audio_len}) is too short to be represented inside the model"
                )
            return [audio_token_id] * k

        return [PromptReplacement(modality="audio", target=[audio_token_id], replacement=replacement)]


class AffinityDeepAttention(Attention):
    """Attention of a layer above the merge point: its KV lives in the deep group."""

    def get_kv_cache_spec(self, vllm_config):
        return AffinityDeepAttentionSpec.from_attention_spec(super().get_kv_cache_spec(vllm_config))


FAULT_ENV = "VLLM_AFFINITY_INJECT_FAULT"
TRACE_ENV = "VLLM_AFFINITY_TRACE_DIR"


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


def merge_step(h, residual, positions, step, method: str, window: int, failed: list[str]):
    """Merge every audio span of the step (flattened rows) after the merge layer.

    Affinity is computed on the residual stream h + residual (what the HF decoder layer
    returns); a merged row carries the mean stream in ``h`` and zero residual. Returns
    (h, residual, positions) with C rows and ``back``: the row of each of the T tokens.

    If choosing one span's groups fails, that span falls back to equal-size bins (the
    row count, hence KV slots, stay as planned, so the batch goes on) and its request
    id is appended to ``failed``: the scheduler then fails that request alone.
    """
    hs, rs, ps, back = [], [], [], []
    cursor = row = 0

    def copy(a: int, b: int) -> None:
        nonlocal row
        if b > a:
            hs.append(h[a:b]); rs.append(residual[a:b]); ps.append(positions[a:b])
            back.append(torch.arange(row, row + b - a, device=h.device))
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
        ps.append(pooling.merge_positions(positions[a : a + m], sizes))
        back.append(row + pooling.group_index(sizes, h.device))
        row += k
        cursor = a + m
    copy(cursor, h.shape[0])
    if row != step.num_rows:
        raise RuntimeError(f"vllm-affinity: merged to {row} rows, the runner planned {step.num_rows}")
    return torch.cat(hs), torch.cat(rs), torch.cat(ps), torch.cat(back)


@MULTIMODAL_REGISTRY.register_processor(
    AffinityQwen2AudioMultiModalProcessor,
    info=AffinityQwen2AudioProcessingInfo,
    dummy_inputs=AffinityQwen2AudioDummyInputsBuilder,
)
class AffinityQwen2AudioForConditionalGeneration(Qwen2AudioForConditionalGeneration):
    """Stock Qwen2-Audio whose audio embeddings are pooled to the processor's count."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        refuse_additional_config(vllm_config)
        self.affinity = server_config(vllm_config.model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.affinity_step = None  # set by the runner for each forward pass
        self.affinity_failed: list[str] = []  # request ids whose merge failed, drained by the runner
        self.deep_layer: int | None = None
        if self.affinity.deep is not None:
            layers = self.language_model.model.layers
            self.deep_layer = self.affinity.deep.resolve_layer(len(layers))
            for layer in layers[self.deep_layer + 1 :]:
                layer.self_attn.attn.__class__ = AffinityDeepAttention
        logger.info("vllm-affinity: Qwen2-Audio with Affinity Pooling, %s", self.affinity.describe())

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self.deep_layer is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        lm = self.language_model.model
        h = inputs_embeds if inputs_embeds is not None else lm.embed_input_ids(input_ids)
        residual = None
        for layer in lm.layers[: self.deep_layer + 1]:
            h, residual = layer(positions, h, residual)
        step, back = self.affinity_step, None
        if step is not None and step.spans:
            deep = self.affinity.deep
            h, residual, positions, back = merge_step(
                h, residual, positions, step, deep.method, deep.window, self.affinity_failed
            )
        for layer in lm.layers[self.deep_layer + 1 :]:
            h, residual = layer(positions, h, residual)
        h, _ = lm.norm(h, residual)
        # one row per scheduled token again (logits are read at the last token of each
        # request, which is never inside an audio span in chat prompts)
        return h if back is None else h[back]

    def _process_audio_input(self, audio_input):
        if not self.affinity.encoder_real_length or audio_input["type"] != "audio_features":
            return super()._process_audio_input(audio_input)
        from ..encoder import encode_real_length

        out = []
        for feats, mask in zip(audio_input["input_features"], audio_input["feature_attention_mask"]):
            frames = int(mask.sum())
            logger.debug("vllm-affinity: encoder on %d of %d mel frames", frames, feats.shape[-1])
            out.append(self.multi_modal_projector(encode_real_length(self.audio_tower, feats, frames)))
        return tuple(out)

    def embed_multimodal(self, **kwargs: object):
        kept = kwargs.pop(NUM_KEPT_FIELD, None)
        num_windows = kwargs.pop(NUM_WINDOWS_FIELD, None)
        embeds = super().embed_multimodal(**kwargs)
        if num_windows is not None:  # one embedding per 30 s window: concatenate per audio
            counts = [int(x) for x in (num_windows.tolist() if isinstance(num_windows, torch.Tensor) else num_windows)]
            if sum(counts) != len(embeds):
                raise RuntimeError(f"vllm-affinity: {sum(counts)} encoder windows expected, got {len(embeds)}")
            it = iter(embeds)
            embeds = tuple(torch.cat([next(it) for _ in range(c)]) for c in counts)
        if kept is None:
            return embeds
        return pool_to_counts(embeds, kept, self.affinity, trace_merge)
