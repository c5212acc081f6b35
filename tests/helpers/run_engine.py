"""Run a vLLM engine in this fresh process and dump prompt ids, tokens, logprobs.

    python tests/helpers/run_engine.py JOB.json

JOB: {"model", "hf_overrides" (optional), "engine_kw", "prompt", "max_tokens",
"logprobs", "requests": [{"audios": [path...], "mm_processor_kwargs": {...}}], "out"}.
The plugin set is whatever VLLM_PLUGINS says (unset: all installed plugins).
"""

import json
import sys

import soundfile as sf


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    from vllm import LLM, SamplingParams

    kw = dict(job["engine_kw"], **job.get("engine_kw_extra", {}))
    if job.get("hf_overrides"):
        kw["hf_overrides"] = job["hf_overrides"]
    llm = LLM(job["model"], **kw)
    sp = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True, logprobs=job["logprobs"])
    prompts = []
    for r in job["requests"]:
        p = {"prompt": r.get("prompt", job["prompt"])}
        if r.get("audios"):
            p["multi_modal_data"] = {"audio": [tuple(sf.read(a, dtype="float32")) for a in r["audios"]]}
        if r.get("mm_processor_kwargs"):
            p["mm_processor_kwargs"] = r["mm_processor_kwargs"]
        prompts.append(p)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    res = [
        {
            "prompt_token_ids": list(o.prompt_token_ids),
            "token_ids": list(o.outputs[0].token_ids),
            "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs],
        }
        for o in outs
    ]
    json.dump({"results": res}, open(job["out"], "w"))


if __name__ == "__main__":
    main()
