"""``--scheduler-cls`` for the deep stage: binds the deep KV managers to the
scheduler's request map and the server's deep keep ratio, keeps an audio span in one
prefill chunk where vLLM does not, and fails a request whose merge failed."""

from __future__ import annotations

import logging

from vllm.v1.core.sched.scheduler import Scheduler

from .. import compat
from ..config import server_config
from ..plan import DeepPlan
from .kv import AffinityDeepManager

logger = logging.getLogger("vllm.affinity")


class AffinityScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        deep = server_config(vllm_config.model_config.hf_config).deep
        self._affinity_deep = deep
        self._affinity_chunk_guard = deep is not None and compat.needs_chunk_split_guard()
        managers = [
            m for m in self.kv_cache_manager.coordinator.single_type_managers
            if isinstance(m, AffinityDeepManager)
        ]
        for m in managers:
            AffinityDeepManager.bind(m, self.requests, deep)
        if deep is not None and not managers:
            raise RuntimeError("vllm-affinity: deep stage on but no deep KV-cache group was created")
        logger.info("vllm-affinity: scheduler bound %d deep KV-cache group(s)%s", len(managers),
                    "; audio spans kept whole across prefill chunks" if self._affinity_chunk_guard else "")

    def _try_schedule_encoder_inputs(self, request, num_computed_tokens, num_new_tokens,
                                     encoder_compute_budget, *args, **kwargs):
        # vLLM 0.32's disable_chunked_mm_input rolls a chunk back before a multimodal
        # item only when the chunk starts BEFORE the item (num_computed_tokens < start);
        # a chunk starting exactly at the item can still cut it (seen under load after a
        # previous rollback). A deep-merged span must be computed whole: stop before it.
        # vLLM 0.33 checks `<=` itself (compat.needs_chunk_split_guard).
        if self._affinity_chunk_guard and num_new_tokens > 0 and request.has_encoder_inputs:
            end = DeepPlan.of_request(request.mm_features, self._affinity_deep, None).schedulable_end(
                num_computed_tokens, num_computed_tokens + num_new_tokens
            )
            num_new_tokens = end - num_computed_tokens
        return super()._try_schedule_encoder_inputs(
            request, num_computed_tokens, num_new_tokens, encoder_compute_budget, *args, **kwargs
        )

    def update_from_output(self, scheduler_output, model_runner_output):
        # Requests whose deep merge failed in the worker are finished with
        # FINISHED_ERROR (the client gets an error for that request only).
        failed = getattr(model_runner_output, "affinity_failed_req_ids", None)
        if failed:
            live = [r for r in failed if r in self.requests]
            logger.error("vllm-affinity: failing request(s) %s after a deep-merge error", live)
            # vLLM caches a step's full blocks when it schedules them, before they are computed;
            # a failed merge left the deep layers' rows unwritten: no later prompt may hit them
            pool = self.kv_cache_manager.block_pool
            pool.evict_blocks({b for r in live for group in self.kv_cache_manager.get_block_ids(r) for b in group})
            compat.fail_requests(self, live, "vllm-affinity: deep merge failed for this request "
                                             "(the server log has the cause); other requests are unaffected")
        return super().update_from_output(scheduler_output, model_runner_output)
