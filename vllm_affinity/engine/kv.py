"""KV cache of the layers above the merge point: a spec of its own and a manager that
allocates blocks for the compacted sequence (exact, from the request's DeepPlan).

Why a separate spec: a spec subclassing FullAttentionSpec would be grouped with the
shallow layers (same block tables), so the deep layers could not hold fewer blocks.
Subclassing AttentionSpec gives them their own KV-cache group(s) and block tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm.model_executor.layers.attention import Attention

from ..plan import DeepPlan


@dataclass(frozen=True, kw_only=True)
class AffinityDeepAttentionSpec(AttentionSpec):
    """Full causal attention whose KV holds the deep-merged (compacted) sequence."""

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # upper bound: a request without audio compacts nothing
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes

    @classmethod
    def from_attention_spec(cls, spec: AttentionSpec) -> "AffinityDeepAttentionSpec":
        base = {f.name for f in fields(AttentionSpec)}
        return cls(**{f.name: getattr(spec, f.name) for f in fields(spec) if f.name in base})


class AffinityDeepAttention(Attention):
    """Attention of a layer above the merge point: its KV lives in the deep group
    (the model mixin swaps the class of those layers' ``Attention`` in place)."""

    def get_kv_cache_spec(self, vllm_config):
        return AffinityDeepAttentionSpec.from_attention_spec(super().get_kv_cache_spec(vllm_config))


class AffinityDeepManager(FullAttentionManager):
    """Allocates ``ceil(compacted(num_tokens) / block_size)`` blocks per request.

    ``requests`` (the scheduler's request map) and ``keep_ratio`` are bound by
    AffinityScheduler right after construction; the plan is a pure function of the
    request, so it is the same after preemption and on every call.
    """

    requests: Mapping[str, Any] | None = None
    keep_ratio: float = 1.0

    def compacted(self, request_id: str, num_tokens: int) -> int:
        if self.requests is None:
            raise RuntimeError(
                "vllm-affinity: the deep KV manager is not bound to a scheduler; the deep "
                "stage needs scheduler_cls=vllm_affinity.engine.scheduler.AffinityScheduler"
            )
        req = self.requests.get(request_id)
        if req is None:
            return num_tokens
        return DeepPlan.from_features(req.mm_features, self.keep_ratio).compacted(num_tokens)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, *args, **kwargs) -> int:
        return super().get_num_blocks_to_allocate(
            request_id,
            self.compacted(request_id, num_tokens),
            new_computed_blocks,
            total_computed_tokens,
            num_local_computed_tokens,
            self.compacted(request_id, num_tokens_main_model),
            *args,
            **kwargs,
        )

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        return super().allocate_new_blocks(
            request_id,
            self.compacted(request_id, num_tokens),
            self.compacted(request_id, num_tokens_main_model),
        )


def register_kv_spec() -> None:
    """Register the spec with its manager (idempotent). The built-in specs must be
    registered first: the registry skips its own registration once non-empty."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        AffinityDeepAttentionSpec, AffinityDeepManager, uniform_type_base_spec=AffinityDeepAttentionSpec
    )
