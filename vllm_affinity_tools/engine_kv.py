"""What a vLLM engine held for each request, read from the engine itself (offline ``LLM``
with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the scheduler lives in this process): the KV
bytes of every KV-cache group when the request is freed (a request's blocks only grow), and
the placeholder length of each of its audios as the scheduler saw it.

Shared by ``vllm-affinity calibrate`` and ``benchmarks/bench_accuracy.py``.
"""

from __future__ import annotations


def _groups(llm):
    """The engine's KV-cache groups and the kind of each: ``cross`` or ``self``."""
    groups = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.kv_cache_config.kv_cache_groups
    return groups, ["cross" if type(g.kv_cache_spec).__name__ == "CrossAttentionSpec" else "self" for g in groups]


def record_requests(llm) -> dict[str, dict]:
    """Wrap the engine's KV-cache manager ``free``; return the dict it fills, keyed by the
    engine-core request id: ``{"audio_tokens": [...], "<kind>_kv_bytes": int, ...}`` where
    kind is ``cross`` (encoder-decoder cross-attention) or ``self``. Bytes = blocks held x page
    bytes (padding included) x layers of the group."""
    kvm = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager
    groups, kinds = _groups(llm)
    page = [g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in groups]
    held: dict[str, dict] = {}
    free = kvm.free

    def recording_free(request):
        blocks = [len(m.req_to_blocks.get(request.request_id, [])) for m in kvm.coordinator.single_type_managers]
        held[request.request_id] = {
            "audio_tokens": [f.mm_position.length for f in (request.mm_features or [])],
            **{f"{k}_kv_bytes": sum(b * p for b, p, kk in zip(blocks, page, kinds) if kk == k) for k in set(kinds)},
        }
        return free(request)

    kvm.free = recording_free
    return held


def by_output_id(held: dict[str, dict]) -> dict[str, dict]:
    """``held`` keyed by the ``LLM``'s request ids (the engine core's extend them: "0" -> "0-<suffix>")."""
    return {k.split("-", 1)[0]: v for k, v in held.items()}


def kv_layout(llm) -> dict:
    """Head size per KV kind and the block size of the engine's KV-cache groups."""
    groups, kinds = _groups(llm)
    return {"head_sizes": {k: g.kv_cache_spec.head_size for k, g in zip(kinds, groups)},
            "block_size": groups[0].kv_cache_spec.block_size}
