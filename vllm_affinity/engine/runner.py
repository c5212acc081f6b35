"""Model-runner mixin: compacted KV slots and attention metadata for the deep layers.

Per step, from each scheduled request's DeepPlan (the same pure function of its audio
placeholder ranges that the scheduler's deep KV manager uses):

* the deep layers see ``C`` rows instead of ``T`` tokens: every audio span scheduled
  in this step becomes its K merged rows, other tokens stay;
* row r of request i is written at the compacted KV index (position minus the tokens
  merged away before it) in the deep group's own block table;
* the deep layers' attention metadata gets compacted query_start_loc, seq_lens and
  num_actual_tokens (the CPU kernel aligns the causal mask to the END of each
  sequence, so queries and keys must both be compacted).

The model is told which flattened token ranges to merge (``AffinityStep``); which
tokens merge is decided there, on the hidden states. Hooks (private V1 runner
methods, listed and checked at start-up in :mod:`vllm_affinity.compat`, covered by
tests/test_deep.py): ``_get_slot_mappings``, ``_build_attention_metadata``,
``_model_forward``, ``execute_model``, ``sample_tokens``.

Devices: the plan is computed on the host; slot mappings, ``query_start_loc`` and
``seq_lens`` go to the runner's device (a GPU backend reads them there), while
``query_start_loc_cpu`` / ``seq_lens_cpu_upper_bound`` stay on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import server_config
from ..plan import DeepPlan
from .kv import AffinityDeepAttentionSpec


@dataclass
class AffinityStep:
    """What the model needs to merge in one forward pass."""

    # (flat_start, length, kept) of every audio span scheduled in this step, ascending
    spans: list[tuple[int, int, int]]
    span_req_ids: list[str]  # the request of each span
    num_tokens: int  # T, rows below the merge point
    num_rows: int  # C, rows above it


@dataclass
class _DeepLayout:
    step: AffinityStep
    query_start_loc_cpu: torch.Tensor  # (num_reqs + 1,) int32, compacted, host
    seq_lens_cpu: torch.Tensor  # (num_reqs,) int32, compacted, host
    slot_index: np.ndarray  # (C,) compacted KV index of each row (per request)
    row_req: np.ndarray  # (C,) request index of each row


class AffinityRunnerMixin:
    """Mix into a V1 GPUModelRunner subclass (CPUModelRunner on CPU)."""

    _affinity_layout: _DeepLayout | None = None
    _affinity_in_step: bool = False

    # -- set-up ---------------------------------------------------------------------------
    def _affinity_deep(self):
        cfg = getattr(self, "_affinity_cfg", None)
        if cfg is None:
            cfg = self._affinity_cfg = server_config(self.vllm_config.model_config.hf_config)
        return cfg.deep

    def _affinity_deep_gids(self) -> list[int]:
        return [
            gid for gid, g in enumerate(self.kv_cache_config.kv_cache_groups)
            if isinstance(g.kv_cache_spec, AffinityDeepAttentionSpec)
        ]

    def _affinity_plan(self, req_id: str) -> DeepPlan:
        gids = self._affinity_deep_gids()
        block_size = self.kv_cache_config.kv_cache_groups[gids[0]].kv_cache_spec.block_size if gids else None
        return DeepPlan.of_request(self.requests[req_id].mm_features, self._affinity_deep(), block_size)

    # -- per step -------------------------------------------------------------------------
    def execute_model(self, scheduler_output, *args, **kwargs):
        self._affinity_in_step = self._affinity_deep() is not None
        try:
            return self._affinity_attach_failures(super().execute_model(scheduler_output, *args, **kwargs))
        finally:
            self._affinity_in_step = False
            self._affinity_layout = None

    def _affinity_build_layout(self, num_tokens: int) -> _DeepLayout:
        num_reqs = self.input_batch.num_reqs
        qsl = self.query_start_loc.cpu[: num_reqs + 1].numpy()
        computed = self.input_batch.num_computed_tokens_cpu[:num_reqs]
        spans_flat: list[tuple[int, int, int]] = []
        span_reqs: list[str] = []
        slot_parts, req_parts = [], []
        c_qsl = np.zeros(num_reqs + 1, dtype=np.int32)
        c_seq = np.zeros(num_reqs, dtype=np.int32)
        for i, req_id in enumerate(self.input_batch.req_ids[:num_reqs]):
            start = int(computed[i])
            rows = self._affinity_plan(req_id).rows(start, start + int(qsl[i + 1] - qsl[i]))
            for s in rows.spans:
                spans_flat.append((int(qsl[i]) + s.offset - start, s.length, s.kept))
                span_reqs.append(req_id)
            slot_parts.append(rows.slot_index)
            req_parts.append(np.full(rows.num_rows, i, dtype=np.int64))
            c_qsl[i + 1] = c_qsl[i] + rows.num_rows
            c_seq[i] = rows.seq_len
        slot_index = np.concatenate(slot_parts) if slot_parts else np.zeros(0, np.int64)
        row_req = np.concatenate(req_parts) if req_parts else np.zeros(0, np.int64)
        step = AffinityStep(spans=spans_flat, span_req_ids=span_reqs, num_tokens=num_tokens,
                            num_rows=int(c_qsl[-1]))
        return _DeepLayout(
            step=step,
            query_start_loc_cpu=torch.from_numpy(c_qsl),
            seq_lens_cpu=torch.from_numpy(c_seq),
            slot_index=slot_index,
            row_req=row_req,
        )

    def _get_slot_mappings(self, num_tokens_padded, num_reqs_padded, num_tokens_unpadded, ubatch_slices=None):
        by_gid, by_layer = super()._get_slot_mappings(
            num_tokens_padded, num_reqs_padded, num_tokens_unpadded, ubatch_slices
        )
        if not self._affinity_in_step or by_gid is None:
            return by_gid, by_layer
        if ubatch_slices is not None or num_tokens_padded != num_tokens_unpadded:
            raise RuntimeError("vllm-affinity: the deep stage does not support padded/ubatched steps")
        layout = self._affinity_layout = self._affinity_build_layout(num_tokens_unpadded)
        for gid in self._affinity_deep_gids():
            bt = self.input_batch.block_table[gid]
            blocks = bt.block_table.np
            idx = layout.slot_index
            slots = blocks[layout.row_req, idx // bt.block_size].astype(np.int64) * bt.block_size + idx % bt.block_size
            stock = by_gid[gid]
            mapping = torch.from_numpy(slots).to(device=stock.device, dtype=stock.dtype)
            by_gid[gid] = mapping
            for name in self.kv_cache_config.kv_cache_groups[gid].layer_names:
                by_layer[name] = mapping
        return by_gid, by_layer

    def _build_attention_metadata(self, *args, **kwargs):
        attn_metadata, spec_cm = super()._build_attention_metadata(*args, **kwargs)
        layout = self._affinity_layout
        if layout is None:
            return attn_metadata, spec_cm
        from vllm.v1.attention.backend import CommonAttentionMetadata

        num_reqs = layout.seq_lens_cpu.numel()
        slot_mappings = kwargs.get("slot_mappings") or {}
        q_lens = layout.query_start_loc_cpu.diff()
        device = self.device
        query_start_loc = layout.query_start_loc_cpu.to(device, non_blocking=True)
        seq_lens = layout.seq_lens_cpu.to(device, non_blocking=True)
        for gid in self._affinity_deep_gids():
            bt = self.input_batch.block_table[gid]
            cm = CommonAttentionMetadata(
                query_start_loc=query_start_loc,
                query_start_loc_cpu=layout.query_start_loc_cpu,
                seq_lens=seq_lens,
                seq_lens_cpu_upper_bound=layout.seq_lens_cpu,
                num_reqs=num_reqs,
                num_actual_tokens=layout.step.num_rows,
                max_query_len=int(q_lens.max()) if num_reqs else 0,
                max_seq_len=int(layout.seq_lens_cpu.max()) if num_reqs else 0,
                block_table_tensor=bt.get_device_tensor(num_reqs),
                slot_mapping=slot_mappings[gid],
                causal=True,
                is_prefilling=None,
            )
            for attn_group in self.attn_groups[gid]:
                # build_metadata maps the block table to the kernel's block size, as stock does
                md = attn_group.build_metadata(cm)
                for name in attn_group.layer_names:
                    attn_metadata[name] = md
        return attn_metadata, spec_cm

    def _model_forward(self, *args, **kwargs):
        model = self.get_model()
        model.affinity_step = self._affinity_layout.step if self._affinity_layout else None
        try:
            return super()._model_forward(*args, **kwargs)
        finally:
            model.affinity_step = None
            failed = getattr(model, "affinity_failed", None)
            if failed:
                self._affinity_failed = [*getattr(self, "_affinity_failed", []), *failed]
                failed.clear()

    # -- per-request failures -------------------------------------------------------------
    def _affinity_attach_failures(self, output):
        """Hand request ids whose merge failed to the scheduler (AffinityScheduler reads
        ``affinity_failed_req_ids`` off the runner output, which is pickled as is)."""
        failed = getattr(self, "_affinity_failed", None)
        if failed and output is not None and hasattr(output, "__dict__"):
            output.affinity_failed_req_ids = list(failed)
            self._affinity_failed = []
        return output

    def sample_tokens(self, *args, **kwargs):
        return self._affinity_attach_failures(super().sample_tokens(*args, **kwargs))
