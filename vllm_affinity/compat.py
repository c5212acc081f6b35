"""Every private vLLM touchpoint of the plugin, in one place, checked at ``register()``.

The plugin builds on vLLM's extension points (model registry, multimodal processor
hooks, KV-cache spec registry, ``--scheduler-cls`` / ``--worker-cls``, per-architecture
config hooks), but several of the methods it overrides are private and change between
releases. :data:`SEAMS` lists each one with the parameters the plugin relies on;
:func:`check` verifies them against the running vLLM and fails naming the seam, so a
vLLM whose seams moved stops at start-up instead of misbehaving later.

Supported: vLLM 0.32.0 (CPU and GPU), 0.33.0 and 0.34.0 (GPU only: no CPU build exists).
vLLM 0.34 deleted the V1 model runner the deep stage hooks into (``gpu_model_runner.py``), so
the seams only the deep stage uses (``Seam.deep``) are checked apart, by
:func:`check_deep_stage`, when a SPEC has a deep stage: on 0.34 the input and encoder stages
run and a deep stage is refused at start-up with a message that says why.
Version-dependent behaviour lives here too:

* :func:`fail_requests`: ``Scheduler.grammar_compile_error_reqs`` is a ``set[str]`` in
  0.32 and a ``dict[str, RequestError]`` in 0.33 (where the message reaches the client);
* :func:`needs_chunk_split_guard`: vLLM 0.32's ``disable_chunked_mm_input`` rolls a chunk
  back only when it starts BEFORE an item (``<``); 0.33 uses ``<=``, so the plugin's
  scheduler guard is needed on 0.32 only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields

#: releases checked against (CI: 0.32.0 on CPU; 0.33.0 from its source, tests/test_compat.py)
SUPPORTED_VLLM = ("0.32.0", "0.33.0", "0.34.0")
#: the releases whose model runner the deep stage hooks into (0.34 has no V1 runner)
DEEP_STAGE_VLLM = ("0.32.0", "0.33.0")
#: [lowest, first refused) release series: other patch releases inside start with a warning
#: when every seam checks out (pyproject's gpu extra admits the same range)
SUPPORTED_RANGE = ((0, 32, 0), (0, 35, 0))


class VllmSeamError(RuntimeError):
    """The running vLLM lacks a seam the plugin needs (or it changed shape)."""


@dataclass(frozen=True)
class Seam:
    """``module:Qualname.attr`` and the leading parameters (after ``self``) it must take."""

    where: str
    params: tuple[str, ...] | None = None  # None: only existence is checked
    why: str = ""
    #: checked only on this platform at start-up ("cpu" / "gpu"; None: everywhere). Importing
    #: vllm.v1.worker.cpu_worker replaces torch.cuda events/streams and memory queries with
    #: CPU stand-ins (vllm.v1.worker.cpu.shm), so it must never be imported on a GPU host.
    platform: str | None = None
    #: used by the deep stage only (its runner, worker, scheduler and KV manager hooks):
    #: checked by :func:`check_deep_stage` when a SPEC has a deep stage, not at register()
    deep: bool = False


def _deep(where: str, params: tuple[str, ...] | None = None, why: str = "", platform: str | None = None) -> Seam:
    return Seam(where, params, why, platform, deep=True)


SEAMS: tuple[Seam, ...] = (
    # deep stage, worker side (engine/runner.py)
    _deep("vllm.v1.worker.gpu_model_runner:GPUModelRunner._get_slot_mappings",
          ("num_tokens_padded", "num_reqs_padded", "num_tokens_unpadded", "ubatch_slices"),
          "compacted KV slots of the layers above the merge"),
    _deep("vllm.v1.worker.gpu_model_runner:GPUModelRunner._build_attention_metadata",
          ("num_tokens", "num_reqs", "max_query_len"), "compacted attention metadata of the deep layers"),
    _deep("vllm.v1.worker.gpu_model_runner:GPUModelRunner._model_forward",
          ("input_ids", "positions", "intermediate_tensors", "inputs_embeds"), "hands the step's spans to the model"),
    _deep("vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model", ("scheduler_output",)),
    _deep("vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens", ("grammar_output",)),
    _deep("vllm.v1.worker.cpu_model_runner:CPUModelRunner.__init__", ("vllm_config", "device"), platform="cpu"),
    _deep("vllm.v1.worker.cpu_worker:CPUWorker.init_device", (), platform="cpu"),
    _deep("vllm.v1.worker.gpu_worker:Worker.init_device", (), platform="gpu"),
    _deep("vllm.v1.worker.gpu_model_runner:GPUModelRunner.__init__", ("vllm_config", "device")),
    Seam("vllm.v1.attention.backend:CommonAttentionMetadata"),  # its fields: checked at register()
    _deep("vllm.v1.worker.utils:AttentionGroup.build_metadata", ("common_attn_metadata",)),
    # deep stage, scheduler side (engine/scheduler.py, engine/kv.py)
    _deep("vllm.v1.core.sched.scheduler:Scheduler._try_schedule_encoder_inputs",
          ("request", "num_computed_tokens", "num_new_tokens", "encoder_compute_budget"),
          "keeps an audio span in one prefill chunk"),
    _deep("vllm.v1.core.sched.scheduler:Scheduler.update_from_output", ("scheduler_output", "model_runner_output"),
          "fails a request whose merge failed"),
    _deep("vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.get_num_blocks_to_allocate",
          ("request_id", "num_tokens", "new_computed_blocks", "total_computed_tokens",
          "num_local_computed_tokens", "num_tokens_main_model"), "allocates the compacted deep-group blocks"),
    _deep("vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.allocate_new_blocks",
          ("request_id", "num_tokens", "num_tokens_main_model")),
    # deep.kv_block_align: the deep group's blocks cached and found by prefix (engine/kv.py)
    _deep("vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.find_longest_cache_hit",
          ("block_hashes", "max_length", "kv_cache_group_ids", "block_pool", "kv_cache_spec"),
          "finds the compacted blocks a prefix determines"),
    _deep("vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.cache_blocks", ("request", "num_tokens"),
          "caches the compacted blocks under their determining token block"),
    _deep("vllm.v1.core.block_pool:BlockPool.cache_full_blocks",
          ("request", "blocks", "num_cached_blocks", "num_full_blocks", "block_size", "kv_cache_group_id")),
    _deep("vllm.v1.core.block_pool:BlockPool.get_cached_block", ("block_hash", "kv_cache_group_ids")),
    _deep("vllm.v1.core.block_pool:BlockPool.evict_blocks", ("block_ids",),
          "drops a failed merge's blocks from the prefix cache"),
    _deep("vllm.v1.core.kv_cache_manager:KVCacheManager.get_block_ids", ("request_id",)),
    # register() registers the deep KV spec in every process, whatever the SPEC
    Seam("vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry._ensure_registered", ()),
    Seam("vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry.register"),
    Seam("vllm.v1.kv_cache_interface:AttentionSpec"),
    _deep("vllm.model_executor.layers.attention:Attention.get_kv_cache_spec", ("vllm_config",)),
    # size-weighted attention (engine/size_weighted.py, adapters/whisper.py): padded-head layers
    Seam("vllm.model_executor.layers.attention:Attention.__init__", ("num_heads", "head_size", "scale", "num_kv_heads"),
         "a padded-head attention layer of the same name"),
    Seam("vllm.v1.attention.selector:get_attn_backend", ("head_size", "dtype", "kv_cache_dtype"),
         "the head sizes the backend supports"),
    Seam("vllm.v1.attention.backend:AttentionBackend.supports_head_size", ("head_size",)),
    # config time (engine/config_hook.py)
    Seam("vllm.model_executor.models.config:MODELS_CONFIG_MAP"),
    Seam("vllm.model_executor.models.config:VerifyAndUpdateConfig"),
    # multimodal processing (adapters/base.py)
    Seam("vllm.multimodal.processing:BaseMultiModalProcessor.apply", ("inputs", "timing_ctx")),
    Seam("vllm.multimodal.processing:BaseMultiModalProcessor.get_dummy_inputs",
         ("seq_len", "mm_counts", "mm_options"), "marks the profiling input, which is not counted"),
    Seam("vllm.multimodal.processing:BaseMultiModalProcessor._call_hf_processor", ("hf_data", "hf_kwargs")),
    Seam("vllm.multimodal.processing:BaseMultiModalProcessor._postprocess_hf_mm_data",
         ("mm_inputs", "hf_processor_mm_kwargs", "processed_data")),
    Seam("vllm.multimodal.processing:BaseMultiModalProcessor._get_mm_fields_config",
         ("hf_inputs", "hf_processor_mm_kwargs")),
    Seam("vllm.multimodal.processing:BaseMultiModalProcessor._get_prompt_updates",
         ("mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs")),
    Seam("vllm.multimodal.processing:InputProcessingContext.get_merged_mm_kwargs"),
    Seam("vllm.multimodal.processing:BaseProcessingInfo.get_mm_max_tokens_per_item", ("seq_len", "mm_counts")),
    Seam("vllm.multimodal.processing:BaseProcessingInfo.get_data_parser", ()),
    Seam("vllm.multimodal.processing:BaseDummyInputsBuilder.get_dummy_mm_data",
         ("seq_len", "mm_counts", "mm_options")),
    Seam("vllm.multimodal.audio:AudioResampler.__init__", ("target_sr", "method"),
         "soxr resampling (the parser's audio_resampler.method)"),
    Seam("vllm.model_executor.models.qwen2_audio:Qwen2AudioForConditionalGeneration._process_audio_input",
         ("audio_input",), "Qwen2-Audio's encoder on the real length"),
    Seam("vllm.multimodal.inputs:MultiModalFieldConfig.batched", ("modality",)),
    Seam("vllm.multimodal.inputs:MultiModalFieldConfig.flat_from_sizes", ("modality", "size_per_item")),
    # patches/audio_decode_errors.py
    Seam("vllm.multimodal.media.audio:load_audio"),
)


def _omni_seams(cls: str) -> tuple[Seam, ...]:
    why = "Omni M-RoPE positions from K / pooling only the audio embeddings (adapters/omni.py)"
    return tuple(Seam(f"{cls}.{name}", params, why) for name, params in (
        ("iter_mm_features", ("mm_features",)),
        ("_compute_audio_token_count", ("audio_feature_length",)),
        ("get_mrope_input_positions", ("input_tokens", "mm_features")),
        ("_parse_and_validate_multimodal_inputs", ()),
        ("_process_audio_input", ("audio_input",)),
        ("_process_image_input", ("image_input",)),
        ("_process_video_input", ("video_input",)),
    ))


#: seams of one adapter's vLLM model module, checked when that adapter's model is built (its
#: module is imported only for that architecture: the Omni ones need torchvision)
ADAPTER_SEAMS: dict[str, tuple[Seam, ...]] = {
    "whisper": (
        Seam("vllm.model_executor.models.whisper:WhisperCrossAttention.forward",
             ("hidden_states", "encoder_hidden_states"), "size-weighted cross-attention (adapters/whisper.py)"),
        Seam("vllm.model_executor.layers.attention.cross_attention:CrossAttention.__init__",
             ("num_heads", "head_size", "scale", "cache_config", "attn_type"), "a padded-head cross-attention"),
        # encoder.size_weighted: the plugin runs an encoder layer's own modules (qkv_proj, q_size,
        # kv_size, num_heads, head_dim, scaling, out_proj, the two norms, mlp) with a bias
        Seam("vllm.model_executor.models.whisper:WhisperEncoderLayer.forward", ("hidden_states",),
             "size-weighted attention in the encoder after the encoder-stage merge (adapters/whisper.py)"),
        Seam("vllm.model_executor.models.whisper:WhisperAttention._init_qkv", ("embed_dim",),
             "the encoder layer's fused qkv_proj the size-weighted encoder layer splits"),
        Seam("vllm.model_executor.models.utils:cast_overflow_tensors", None,
             "the encoder layer's last step, repeated by the size-weighted encoder layer"),
    ),
    "kimi_audio": (
        Seam("vllm.model_executor.models.kimi_audio:KimiAudioForConditionalGeneration.embed_input_ids",
             ("input_ids", "multimodal_embeddings"), "places the pooled fused rows (adapters/kimi_audio.py)"),
        Seam("vllm.tokenizers.kimi_audio:KimiAudioTokenizer.apply_chat_template",
             ("messages", "tools", "chat_template", "tokenize"), "patches/kimi_chat_template.py wraps it"),
    ),
    "qwen2_5_omni": _omni_seams(
        "vllm.model_executor.models.qwen2_5_omni_thinker:Qwen2_5OmniThinkerForConditionalGeneration"),
    "qwen3_omni": _omni_seams(
        "vllm.model_executor.models.qwen3_omni_moe_thinker:Qwen3OmniMoeThinkerForConditionalGeneration"),
}


def all_seams() -> tuple[Seam, ...]:
    """:data:`SEAMS` and every adapter's (what a source dump of another release is read for)."""
    return SEAMS + tuple(seam for seams in ADAPTER_SEAMS.values() for seam in seams)


def check_seams(seams: tuple[Seam, ...]) -> None:
    """Check an adapter's seams against the running vLLM."""
    for seam in seams:
        check_seam(seam)


#: fields of CommonAttentionMetadata the runner sets for the deep layers
COMMON_ATTENTION_FIELDS = (
    "query_start_loc", "query_start_loc_cpu", "seq_lens", "seq_lens_cpu_upper_bound", "num_reqs",
    "num_actual_tokens", "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping", "causal",
    "is_prefilling",
)
#: fields of AttentionSpec copied into the deep spec (a new field must have a default)
ATTENTION_SPEC_FIELDS = ("block_size", "num_kv_heads", "head_size", "dtype")


def vllm_version() -> str:
    import vllm

    return vllm.__version__.split("+")[0]


def _resolve(where: str):
    import importlib

    module_name, _, qual = where.partition(":")
    obj = importlib.import_module(module_name)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _positional_names(fn) -> list[str]:
    sig = inspect.signature(fn)
    return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind is not p.VAR_KEYWORD
            and p.kind is not p.VAR_POSITIONAL]


def _compare(seam: Seam, have: list[str] | None, version: str) -> None:
    if seam.params is None:
        return
    if have is None or have[: len(seam.params)] != list(seam.params):
        raise VllmSeamError(
            f"vllm-affinity: {seam.where} takes ({', '.join(have or [])}) in vLLM {version}; the plugin "
            f"expects ({', '.join(seam.params)}, ...) (supported vLLM: {', '.join(SUPPORTED_VLLM)})"
        )


def _missing(seam: Seam, version: str, detail: str = "") -> VllmSeamError:
    return VllmSeamError(
        f"vllm-affinity: vLLM {version} has no {seam.where}{detail}; the plugin supports "
        f"vLLM {', '.join(SUPPORTED_VLLM)}{' (needed for: ' + seam.why + ')' if seam.why else ''}"
    )


def check_seam(seam: Seam) -> None:
    """Check one seam against the running vLLM."""
    try:
        obj = _resolve(seam.where)
    except (ImportError, AttributeError) as exc:
        raise _missing(seam, vllm_version(), f" ({exc})") from None
    _compare(seam, _positional_names(obj) if seam.params is not None else None, vllm_version())


def check_dataclass_fields(where: str, needed: tuple[str, ...], have: list[str], version: str) -> None:
    missing = [f for f in needed if f not in have]
    if missing:
        raise VllmSeamError(f"vllm-affinity: {where} lacks field(s) {missing} in vLLM {version}")


def check() -> None:
    """Verify every seam but the deep stage's against the running vLLM (called by
    ``register()``; the deep stage's: :func:`check_deep_stage`)."""
    import logging

    version = vllm_version()
    low, high = SUPPORTED_RANGE
    if not low <= _version_tuple(version) < high:
        raise VllmSeamError(
            f"vllm-affinity supports vLLM {', '.join(SUPPORTED_VLLM)}; this is vLLM {version}"
        )
    if version not in SUPPORTED_VLLM:
        logging.getLogger("vllm.affinity").warning(
            "vllm-affinity: vLLM %s is not a tested release (%s); its seams check out", version,
            ", ".join(SUPPORTED_VLLM))
    platform = _platform()
    for seam in SEAMS:
        if seam.platform in (None, platform) and not seam.deep:
            check_seam(seam)
    for where, needed in (("vllm.v1.attention.backend:CommonAttentionMetadata", COMMON_ATTENTION_FIELDS),
                          ("vllm.v1.kv_cache_interface:AttentionSpec", ATTENTION_SPEC_FIELDS)):
        check_dataclass_fields(where, needed, [f.name for f in fields(_resolve(where))], version)


def _deep_stage_error(seam: Seam, version: str, detail: str) -> VllmSeamError:
    return VllmSeamError(
        f"vllm-affinity: the deep stage needs {seam.where}{' (' + seam.why + ')' if seam.why else ''}, which "
        f"vLLM {version} {detail}: the deep stage hooks into vLLM's V1 model runner, which vLLM 0.34 removed. "
        f"The input and encoder stages run on vLLM {version}; for the deep stage use vLLM "
        f"{' or '.join(DEEP_STAGE_VLLM)}, or drop `deep` from the SPEC"
    )


def check_deep_stage() -> None:
    """The deep stage's seams against the running vLLM (called by the config hook when the
    SPEC has a deep stage, before any engine process starts)."""
    version = vllm_version()
    platform = _platform()
    for seam in SEAMS:
        if not seam.deep or seam.platform not in (None, platform):
            continue
        try:
            obj = _resolve(seam.where)
        except (ImportError, AttributeError):
            raise _deep_stage_error(seam, version, "does not have") from None
        try:
            _compare(seam, _positional_names(obj) if seam.params is not None else None, version)
        except VllmSeamError as exc:
            raise _deep_stage_error(seam, version, f"has in another shape ({exc})") from None


def _platform() -> str:
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "gpu"


def check_source_dump(dump: dict, version: str, deep: bool = True) -> None:
    """The same checks against a dump of another release's source
    (``vllm_affinity_tools.vllm_seams``: releases that cannot be installed here); ``deep``:
    the deep stage's seams too (refused the way :func:`check_deep_stage` refuses them)."""
    for seam in all_seams():
        if seam.deep and not deep:
            continue
        if seam.where not in dump["seams"]:
            raise _deep_stage_error(seam, version, "does not have") if seam.deep else _missing(seam, version)
        _compare(seam, dump["seams"][seam.where], version)
    check_dataclass_fields("vllm.v1.attention.backend:CommonAttentionMetadata", COMMON_ATTENTION_FIELDS,
                           dump["fields"]["vllm.v1.attention.backend:CommonAttentionMetadata"], version)
    check_dataclass_fields("vllm.v1.kv_cache_interface:AttentionSpec", ATTENTION_SPEC_FIELDS,
                           dump["fields"]["vllm.v1.kv_cache_interface:AttentionSpec"], version)


# -- version-dependent behaviour ----------------------------------------------------------------
def _version_tuple(v: str) -> tuple[int, ...]:
    import re

    return tuple(int(re.match(r"\d+", x).group()) for x in v.split(".")[:3])


def needs_chunk_split_guard(version: str | None = None) -> bool:
    """vLLM < 0.33 lets a prefill chunk that starts exactly at an audio item cut it."""
    return _version_tuple(version or vllm_version()) < (0, 33, 0)


def fail_requests(scheduler, req_ids: list[str], message: str) -> None:
    """Finish ``req_ids`` with FINISHED_ERROR at the scheduler's next update, through its
    own per-request error collection (drained by ``update_from_output``): a ``set`` of
    ids in vLLM 0.32 (the client sees a generic error), a ``dict`` of ``RequestError`` in
    0.33 (the client sees ``message``)."""
    errors = scheduler.grammar_compile_error_reqs
    if isinstance(errors, dict):
        from vllm.outputs import RequestError

        for rid in req_ids:
            errors[rid] = RequestError(code="internal_error", message=message)
    else:
        errors.update(req_ids)
