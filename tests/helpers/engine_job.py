"""Shared by the engine helper scripts: read a JOB file and build its vLLM engine."""

import json


def load_job_and_engine(path: str):
    job = json.loads(open(path).read())
    from vllm import LLM

    kw = dict(job["engine_kw"], **job.get("engine_kw_extra", {}))
    if job.get("hf_overrides"):
        kw["hf_overrides"] = job["hf_overrides"]
    return job, LLM(job["model"], **kw)
