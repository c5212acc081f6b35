"""What every architecture's processor and model do the same way.

* :func:`check_request` (API-server side, before any work): per-request keys and keep
  ratio, empty audio, the server's length limit, a warning for truncated audio;
* :func:`refuse_additional_config`: the SPEC must come through ``--hf-overrides``;
* :func:`pool_to_counts` (worker side): merge each audio's embeddings to the K the
  processor fixed, with the input stage's method and window.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .. import pooling
from ..config import HF_CONFIG_KEY, REQUEST_KEEP_RATIO_KEY, AffinityConfig, AffinityConfigError, request_keep_ratio

logger = logging.getLogger("vllm.affinity")

SAMPLE_RATE = 16000


def check_request(
    cfg: AffinityConfig,
    inputs,
    *,
    model: str,
    window_s: int,
    limit_s: float | None,
    truncates: bool,
    hint: str,
):
    """Validate one request's multimodal kwargs and audios; return (keep ratio, audio items).

    Raises ValueError naming the problem (vLLM answers HTTP 400). ``limit_s``: longest
    accepted audio; ``truncates``: audio over ``window_s`` is cut (logged with ``hint``)."""
    from vllm.multimodal.parse import AudioProcessorItems

    kwargs = dict(inputs.hf_processor_mm_kwargs or {})
    unknown = sorted(set(kwargs) - {REQUEST_KEEP_RATIO_KEY})
    if unknown:
        raise ValueError(
            f"mm_processor_kwargs: unknown key(s) {unknown}; this model accepts only {REQUEST_KEEP_RATIO_KEY!r}"
        )
    ratio = request_keep_ratio(cfg, kwargs)
    items = inputs.mm_data_items
    audios = items["audio"] if "audio" in items else None
    if not isinstance(audios, AudioProcessorItems):
        return ratio, None
    for i in range(len(audios)):
        if audios.get(i) is None:  # referenced by uuid, already cached
            continue
        samples = audios.get_audio_length(i)
        if samples == 0:
            raise ValueError(f"audio item {i} is empty (0 samples)")
        seconds = samples / SAMPLE_RATE
        if limit_s is not None and seconds > limit_s:
            raise ValueError(
                f"audio item {i} is {seconds:.1f} s long, over this server's max_audio_seconds={limit_s:g}"
            )
        if truncates and seconds > window_s:
            logger.warning(
                "vllm-affinity: audio item %d is %.1f s; %s's encoder sees the first %d s, the rest "
                "is dropped (%s)", i, seconds, model, window_s, hint,
            )
    return ratio, audios


def refuse_additional_config(vllm_config) -> None:
    extra = vllm_config.additional_config or {}
    if isinstance(extra, dict) and HF_CONFIG_KEY in extra:
        raise AffinityConfigError(
            "additional_config.affinity is not read: in vLLM 0.32 the multimodal processor, "
            "which fixes each audio's token count, cannot see --additional-config. Pass "
            "--hf-overrides '{\"affinity\": SPEC}' (or `vllm-affinity serve --affinity SPEC`)."
        )


def pool_to_counts(embeds: Sequence[torch.Tensor], kept, cfg: AffinityConfig, trace=None) -> tuple:
    """Merge embedding i (n_i, d) into exactly kept[i] rows (the input stage's grouping).

    ``kept`` comes from the processor (``affinity_num_kept``); with the input stage off
    (per-request ratios only) the grouping is affinity with window 1."""
    kept = [int(x) for x in (kept.tolist() if isinstance(kept, torch.Tensor) else kept)]
    if len(kept) != len(embeds):
        raise RuntimeError(f"vllm-affinity: {len(kept)} kept counts for {len(embeds)} audios")
    stage = cfg.input
    method = stage.method if stage is not None else "affinity"
    window = stage.window if stage is not None else 1
    out = []
    for e, k in zip(embeds, kept):
        sizes = pooling.group_sizes(e, k, method, window)
        if trace is not None:
            trace("input", sizes)
        out.append(pooling.merge(e, sizes))
    return tuple(out)
