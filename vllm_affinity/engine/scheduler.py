"""``--scheduler-cls`` for the deep stage: binds the deep KV managers to the
scheduler's request map and the server's deep keep ratio."""

from __future__ import annotations

import logging

from vllm.v1.core.sched.scheduler import Scheduler

from .kv import AffinityDeepManager, request_plan

logger = logging.getLogger("vllm.affinity")


class AffinityScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        from ..config import server_config

        deep = server_config(vllm_config.model_config.hf_config).deep
        self._affinity_keep_ratio = deep.keep_ratio if deep is not None else None
        managers = [
            m for m in self.kv_cache_manager.coordinator.single_type_managers
            if isinstance(m, AffinityDeepManager)
        ]
        for m in managers:
            m.requests = self.requests
            m.keep_ratio = deep.keep_ratio if deep is not None else 1.0
        if deep is not None and not managers:
            raise RuntimeError("vllm-affinity: deep stage on but no deep KV-cache group was created")
        logger.info("vllm-affinity: scheduler bound %d deep KV-cache group(s)", len(managers))

    def _try_schedule_encoder_inputs(self, request, num_computed_tokens, num_new_tokens,
                                     encoder_compute_budget, shift_computed_tokens=0):
        # vLLM 0.32's disable_chunked_mm_input rolls a chunk back before a multimodal
        # item only when the chunk starts BEFORE the item (num_computed_tokens < start);
        # a chunk starting exactly at the item can still cut it (seen under load after a
        # previous rollback). A deep-merged span must be computed whole: stop before it.
        if self._affinity_keep_ratio is not None and num_new_tokens > 0 and request.has_encoder_inputs:
            end = request_plan(request, self._affinity_keep_ratio).schedulable_end(
                num_computed_tokens, num_computed_tokens + num_new_tokens
            )
            num_new_tokens = end - num_computed_tokens
        return super()._try_schedule_encoder_inputs(
            request, num_computed_tokens, num_new_tokens, encoder_compute_budget, shift_computed_tokens
        )

    def update_from_output(self, scheduler_output, model_runner_output):
        # Requests whose deep merge failed in the worker are finished with
        # FINISHED_ERROR (the client gets an error for that request only): the
        # scheduler's own per-request error set is drained by update_from_output.
        failed = getattr(model_runner_output, "affinity_failed_req_ids", None)
        if failed:
            live = [r for r in failed if r in self.requests]
            logger.error("vllm-affinity: failing request(s) %s after a deep-merge error", live)
            self.grammar_compile_error_reqs.update(live)
        return super().update_from_output(scheduler_output, model_runner_output)
