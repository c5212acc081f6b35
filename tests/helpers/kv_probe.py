"""KV-cache accounting read from a real engine (in this fresh process).

    python tests/helpers/kv_probe.py JOB.json

Reports, for one audio request after its prefill step, the blocks each KV-cache
manager holds for it (and the scheduler-side plan numbers), the free-block count
before, after it finishes, and after a request cancelled mid-prefill.
"""

import json
import sys

import soundfile as sf
from engine_job import load_job_and_engine


def main() -> None:
    job, llm = load_job_and_engine(sys.argv[1])
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    kvm = scheduler.kv_cache_manager
    out = {"free_initial": kvm.block_pool.get_num_free_blocks(),
           "groups": [type(g.kv_cache_spec).__name__ for g in kvm.kv_cache_config.kv_cache_groups],
           "block_size": kvm.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size}
    sp = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True)
    audio = tuple(sf.read(job["audio"], dtype="float32"))

    engine.add_request("held", {"prompt": job["prompt"], "multi_modal_data": {"audio": [audio]}}, sp)
    (rid,) = [r for r in scheduler.requests if r.startswith("held")]
    req = scheduler.requests[rid]
    while req.num_computed_tokens < req.num_prompt_tokens:  # the whole prefill
        engine.step()
    out["num_computed_tokens"] = req.num_computed_tokens
    out["audio_ranges"] = [(f.mm_position.offset, f.mm_position.length) for f in req.mm_features]
    out["blocks"] = [len(m.req_to_blocks.get(rid, [])) for m in kvm.coordinator.single_type_managers]
    out["managers"] = [type(m).__name__ for m in kvm.coordinator.single_type_managers]
    while engine.has_unfinished_requests():
        engine.step()
    out["free_after_finish"] = kvm.block_pool.get_num_free_blocks()

    # cancelled mid-prefill: a long text prefix is scheduled in a first chunk, the audio
    # (never split) waits for the next step; abort in between
    engine.add_request("cancel", {"prompt": job["long_prompt"], "multi_modal_data": {"audio": [audio]}}, sp)
    engine.step()
    (cid,) = [r for r in scheduler.requests if r.startswith("cancel")]
    creq = scheduler.requests[cid]
    out["cancel_computed"] = creq.num_computed_tokens
    out["cancel_prompt_len"] = creq.num_prompt_tokens
    out["cancel_blocks_mid"] = [len(m.req_to_blocks.get(cid, [])) for m in kvm.coordinator.single_type_managers]
    engine.abort_request([cid], internal=True)
    while engine.has_unfinished_requests():
        engine.step()
    out["free_after_cancel"] = kvm.block_pool.get_num_free_blocks()
    json.dump(out, open(job["out"], "w"))


if __name__ == "__main__":
    main()
