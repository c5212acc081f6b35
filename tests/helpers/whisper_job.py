"""Run a Whisper vLLM engine in this fresh process and dump what the tests compare.

    python tests/helpers/whisper_job.py JOB.json

JOB: {"model", "hf_overrides" (optional), "engine_kw", "decoder_prompt", "max_tokens",
"logprobs", "batches": [[{"audio": path, "mm_processor_kwargs"?}, ...], ...] (each batch
is one ``LLM.generate`` call, in order),
"kv_probe": [keep ratio or null, ...] (optional), "bad": [mm_processor_kwargs, ...]
(optional), "audio_for_probe": path (optional), "trace_groups": bool (optional), "out"}.

Output JSON:
* ``batches``: per batch, per request the decoder prompt ids, generated token ids,
  per-step top-k logprobs and the encoder placeholder length(s) the scheduler saw
  (``encoder_lens``, from each request's ``mm_features``);
* ``kv``: per probed keep ratio, after the request's first (prefill) step, the blocks
  each KV-cache manager holds for it, with the managers' class names and block size;
* ``errors``: per ``bad`` entry, the exception type (and its bases) and message;
* ``groups`` (with ``trace_groups``): per batch, every grouping the model computed
  (K, group sizes, and the sum of the encoder frames as a fingerprint of the audio);
  the engine, hence the model, runs in this process, so wrapping
  ``vllm_affinity.pooling.group_sizes`` sees them.
The plugin set is whatever VLLM_PLUGINS says (unset: all installed plugins).
"""

import json
import sys
import time

import soundfile as sf
from engine_job import load_job_and_engine


def _prompt(job, audio, mm_kwargs=None):
    enc = {"prompt": "", "multi_modal_data": {"audio": audio}}
    if mm_kwargs:
        enc["mm_processor_kwargs"] = mm_kwargs
    return {"encoder_prompt": enc, "decoder_prompt": job["decoder_prompt"]}


def main() -> None:
    t0 = time.perf_counter()
    job, llm = load_job_and_engine(sys.argv[1])
    timings = {"engine_start_s": time.perf_counter() - t0}
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    kvm = scheduler.kv_cache_manager
    seen: list[list[int]] = []
    original = scheduler.add_request

    def recording(request, *a, **k):
        seen.append([f.mm_position.length for f in (request.mm_features or [])])
        return original(request, *a, **k)

    scheduler.add_request = recording
    sp = SamplingParams(temperature=0, max_tokens=job["max_tokens"], logprobs=job["logprobs"])
    audios = {}

    def audio(path):
        if path not in audios:
            audios[path] = tuple(sf.read(path, dtype="float32"))
        return audios[path]

    traced: list[dict] = []
    if job.get("trace_groups"):
        from vllm_affinity import pooling

        group_sizes = pooling.group_sizes

        def tracing(x, k, method="affinity", window=1):
            sizes = group_sizes(x, k, method, window)
            traced.append({"k": int(k), "method": method, "window": int(window),
                           "sizes": sizes.tolist(), "fingerprint": float(x.double().sum())})
            return sizes

        pooling.group_sizes = tracing

    t0 = time.perf_counter()
    result = {"batches": [], "groups": []}
    for batch in job.get("batches", []):
        seen.clear()
        traced.clear()
        prompts = [_prompt(job, audio(r["audio"]), r.get("mm_processor_kwargs")) for r in batch]
        outs = llm.generate(prompts, sp, use_tqdm=False)
        result["batches"].append([
            {
                "prompt_token_ids": list(o.prompt_token_ids),
                "token_ids": list(o.outputs[0].token_ids),
                "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs],
                "encoder_lens": lens,
            }
            for o, lens in zip(outs, list(seen))
        ])
        result["groups"].append(list(traced))
    timings["generate_s"] = time.perf_counter() - t0

    result["kv"] = []
    managers = kvm.coordinator.single_type_managers
    for i, ratio in enumerate(job.get("kv_probe", [])):
        mm = {"affinity_keep_ratio": ratio} if ratio is not None else None
        engine.add_request(f"probe{i}", _prompt(job, audio(job["audio_for_probe"]), mm),
                           SamplingParams(temperature=0, max_tokens=4))
        (rid,) = [r for r in scheduler.requests if r.startswith(f"probe{i}")]
        req = scheduler.requests[rid]
        while req.num_computed_tokens < req.num_prompt_tokens:  # the prefill step(s)
            engine.step()
        result["kv"].append({
            "ratio": ratio,
            "encoder_lens": [f.mm_position.length for f in req.mm_features],
            "blocks": [len(m.req_to_blocks.get(rid, [])) for m in managers],
        })
        while engine.has_unfinished_requests():
            engine.step()
    result["managers"] = [type(m).__name__ for m in managers]
    result["specs"] = [type(g.kv_cache_spec).__name__ for g in kvm.kv_cache_config.kv_cache_groups]
    result["block_size"] = kvm.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    result["free_blocks_end"] = kvm.block_pool.get_num_free_blocks()

    result["errors"] = []
    for bad in job.get("bad", []):
        try:
            llm.generate([_prompt(job, audio(job["audio_for_probe"]), bad)], sp, use_tqdm=False)
            result["errors"].append(None)
        except Exception as e:  # noqa: BLE001 - reported to the test
            result["errors"].append({"types": [c.__name__ for c in type(e).__mro__], "message": str(e)})
    result["timings"] = timings
    json.dump(result, open(job["out"], "w"))


if __name__ == "__main__":
    main()
