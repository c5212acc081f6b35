"""KV cache of the layers above the merge point: a spec of its own and a manager that
allocates blocks for the compacted sequence (exact, from the request's DeepPlan).

Why a separate spec: a spec subclassing FullAttentionSpec would be grouped with the
shallow layers (same block tables), so the deep layers could not hold fewer blocks.
Subclassing AttentionSpec gives them their own KV-cache group(s) and block tables.
"""

from __future__ import annotations

import hashlib
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
    """Allocates ``ceil(compacted(num_tokens) / block_size)`` blocks per request and, with
    ``deep.kv_block_align``, caches and finds them by prefix like stock's full attention.

    ``requests`` (the scheduler's request map) and ``deep`` (the server's deep stage) are bound
    by AffinityScheduler right after construction; the plan is a pure function of the
    request, so it is the same after preemption and on every call.

    Prefix caching of the deep layers' blocks. Why a deep block is a function of the token
    prefix alone: the layers up to the merge are causal, so the hidden states the merge reads
    at a position depend only on the tokens up to it; a span's groups are chosen on the span's
    own rows, its count is fixed by the plan (the audio's placeholder count and the server's
    deep stage). So compacted row r is determined by the first ``plan.row_determined_at(r)``
    tokens (a text row: its own prefix; a merged row: its span's end) and deep block i by the
    token block holding its last row's determinant. Deep block i is cached under a hash
    derived from that token block's hash (which chains every earlier token, the audio's
    multimodal hash and the request's keep ratio included) and i. A hit must end at a
    token-block boundary h that is also a deep-block boundary (``compacted(h) % block_size
    == 0``) and not inside a span; ``deep.kv_block_align`` makes every boundary past a span
    one. vLLM's hybrid coordinator leaves the blocks and hit length of a group whose spec is
    not full attention to its manager, and cuts the full-attention groups to that length.
    """

    requests: Mapping[str, Any] | None = None
    deep: Any = None
    #: the scheduler's request map, for the class-level hit search (vLLM calls it on the class,
    #: with the request's block-hash list only): one scheduler per engine-core process
    _bound_requests: Mapping[str, Any] | None = None
    _bound_deep: Any = None

    @classmethod
    def bind(cls, manager: "AffinityDeepManager", requests: Mapping[str, Any], deep: Any) -> None:
        manager.requests, manager.deep = requests, deep
        cls._bound_requests, cls._bound_deep = requests, deep

    def plan(self, request_id: str) -> DeepPlan | None:
        if self.requests is None:
            raise RuntimeError(
                "vllm-affinity: the deep KV manager is not bound to a scheduler; the deep "
                "stage needs scheduler_cls=vllm_affinity.engine.scheduler.AffinityScheduler"
            )
        req = self.requests.get(request_id)
        return None if req is None else DeepPlan.of_request(req.mm_features, self.deep, self.block_size)

    def compacted(self, request_id: str, num_tokens: int) -> int:
        plan = self.plan(request_id)
        return num_tokens if plan is None else plan.compacted(num_tokens)

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

    # -- prefix caching --------------------------------------------------------------------
    @staticmethod
    def deep_block_hash(token_block_hash: bytes, index: int) -> bytes:
        return hashlib.sha256(b"vllm-affinity-deep" + bytes(token_block_hash) + index.to_bytes(8, "little")).digest()

    @staticmethod
    def _deep_hashes(plan: DeepPlan, block_hashes, num_rows: int, block_size: int) -> list[bytes]:
        """Hashes of the full deep blocks among the first ``num_rows`` compacted rows whose
        determining token block is hashed, from block 0 up to the first that is not."""
        out = []
        for i in range(num_rows // block_size):
            t = (plan.row_determined_at((i + 1) * block_size - 1) - 1) // block_size
            if t >= len(block_hashes):
                break
            out.append(AffinityDeepManager.deep_block_hash(block_hashes[t], i))
        return out

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        if not self.kv_cache_spec.prefix_cacheable or self.block_pool.hash_block_size != self.block_size:
            return
        plan = DeepPlan.of_request(request.mm_features, self.deep, self.block_size)
        hashes = self._deep_hashes(plan, request.block_hashes, plan.compacted(num_tokens), self.block_size)
        num_cached = self.num_cached_block.get(request.request_id, 0)
        if num_cached >= len(hashes):
            return
        self.block_pool.cache_full_blocks(
            request=_WithBlockHashes(request, hashes), blocks=self.req_to_blocks[request.request_id],
            num_cached_blocks=num_cached, num_full_blocks=len(hashes), block_size=self.block_size,
            kv_cache_group_id=self.kv_cache_group_id,
        )
        self.num_cached_block[request.request_id] = len(hashes)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               *args, **kwargs):
        empty = tuple([] for _ in kv_cache_group_ids)
        bs = kv_cache_spec.block_size
        request = next((r for r in (cls._bound_requests or {}).values() if r.block_hashes is block_hashes), None)
        if request is None or block_pool.hash_block_size != bs:
            return empty, 0
        plan = DeepPlan.of_request(request.mm_features, cls._bound_deep, bs)
        limit = min(max_length, len(block_hashes) * bs)
        hashes = cls._deep_hashes(plan, block_hashes, plan.compacted(limit), bs)
        found: list[list] = [[] for _ in kv_cache_group_ids]
        best_tokens = best_blocks = 0
        for i, h in enumerate(hashes):
            cached = block_pool.get_cached_block(h, kv_cache_group_ids)
            if cached is None:
                break
            for blocks, b in zip(found, cached):
                blocks.append(b)
            tokens = plan.tokens_at((i + 1) * bs)
            if tokens is not None and tokens % bs == 0 and tokens <= limit:
                best_tokens, best_blocks = tokens, i + 1
        return tuple(blocks[:best_blocks] for blocks in found), best_tokens


class _WithBlockHashes:
    """The request as BlockPool.cache_full_blocks reads it, with the deep blocks' hashes."""

    def __init__(self, request, block_hashes: list[bytes]) -> None:
        self._request, self.block_hashes = request, block_hashes

    def __getattr__(self, name):
        return getattr(self._request, name)


def register_kv_spec() -> None:
    """Register the spec with its manager (idempotent). The built-in specs must be
    registered first: the registry skips its own registration once non-empty."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        AffinityDeepAttentionSpec, AffinityDeepManager, uniform_type_base_spec=AffinityDeepAttentionSpec
    )
