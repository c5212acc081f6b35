"""Run a vLLM engine in this fresh process and dump prompt ids, tokens, logprobs.

    python tests/helpers/run_engine.py JOB.json

JOB: {"model", "hf_overrides" (optional), "engine_kw", "engine_kw_extra" (optional),
"prompt", "max_tokens", "logprobs", "requests": [{"audios": [path...], "prompt"?,
"mm_processor_kwargs"?}], "alone": bool (also run each request alone), "out"}.
The plugin set is whatever VLLM_PLUGINS says (unset: all installed plugins).
The output also counts the scheduler's preemptions (read from the engine).
"""

import json
import sys

import soundfile as sf
from engine_job import load_job_and_engine


def main() -> None:
    job, llm = load_job_and_engine(sys.argv[1])
    from vllm import SamplingParams

    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    preemptions = []
    original = scheduler._preempt_request

    def counting(request, *a, **k):
        preemptions.append(request.request_id)
        return original(request, *a, **k)

    scheduler._preempt_request = counting
    sp = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True, logprobs=job["logprobs"])
    prompts = []
    for r in job["requests"]:
        p = {"prompt": r.get("prompt", job["prompt"])}
        if r.get("audios"):
            p["multi_modal_data"] = {"audio": [tuple(sf.read(a, dtype="float32")) for a in r["audios"]]}
        if r.get("mm_processor_kwargs"):
            p["mm_processor_kwargs"] = r["mm_processor_kwargs"]
        prompts.append(p)

    def dump(outs):
        return [
            {
                "prompt_token_ids": list(o.prompt_token_ids),
                "token_ids": list(o.outputs[0].token_ids),
                "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs],
            }
            for o in outs
        ]

    result = {"results": dump(llm.generate(prompts, sp, use_tqdm=False))}
    if job.get("alone"):
        result["alone"] = [dump(llm.generate([p], sp, use_tqdm=False))[0] for p in prompts]
    result["preemptions"] = len(preemptions)
    kvm = scheduler.kv_cache_manager
    result["free_blocks_end"] = kvm.block_pool.get_num_free_blocks()
    result["encoder_cache_size"] = scheduler.encoder_cache_manager.cache_size
    result["max_num_encoder_input_tokens"] = scheduler.max_num_encoder_input_tokens
    json.dump(result, open(job["out"], "w"))


if __name__ == "__main__":
    main()
