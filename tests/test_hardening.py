"""Production hardening against a real server with both stages on: bounded load test,
faults (disconnects, an injected merge error, preemption), bad input, metrics, guard
rails, the `--affinity off` path, and tensor parallelism."""

from __future__ import annotations

import base64
import json
import re
import urllib.request

import numpy as np
import openai
import pytest

from benchmarks.load_test import SERVER_SPEC, build_requests, make_clips, run_load
from vllm_affinity import accounting
from vllm_affinity import pooling as P
from vllm_affinity_tools import speech
from vllm_affinity_tools.demo import CPU_ARGS
from vllm_affinity_tools.serving import ServerProcess

from .conftest import CACHE, PROMPT, load_audio, run_engine_subprocess

pytestmark = pytest.mark.server

BLOCK = 32
# vLLM's default prefix caching stays on: kv_block_align 'auto' rounds each drop down to a multiple
# of the block (input stage: per audio; deep stage: per span)


def kept_in(n: int, ratio: float) -> int:
    return P.block_aligned_count(n, P.num_kept(n, ratio), BLOCK, "keep_more")


def kept_deep(k_in: int) -> int:
    from vllm_affinity.plan import deep_kept_count

    return deep_kept_count(k_in, SERVER_SPEC["deep"]["keep_ratio"], BLOCK, "keep_more")


FAULT_SECONDS = 3.0  # 75 encoder tokens (a drop of 19 < one block: 75 after the input stage): the fault's span
FAULT_SPAN = kept_in(75, SERVER_SPEC["input"]["keep_ratio"])


@pytest.fixture(scope="module")
def load_clips():
    d = CACHE / "load"
    d.mkdir(parents=True, exist_ok=True)
    return make_clips(d)


@pytest.fixture(scope="module")
def fault_clip():
    return speech.utterance(FAULT_SECONDS, CACHE / "load" / "fault-3s.wav", seed=9, sample_rate=16000)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory, load_clips):
    log = tmp_path_factory.mktemp("hardening") / "server.log"
    with ServerProcess(
        tiny_model,
        ["--affinity", json.dumps(SERVER_SPEC), *CPU_ARGS, "--block-size", str(BLOCK), "--max-num-seqs", "16"],
        log_path=log, served_model_name="tiny",
        # dev mode: /reset_prefix_cache, so the load test's reference answers are computed uncached
        env={"VLLM_AFFINITY_INJECT_FAULT": f"deep-merge:{FAULT_SPAN}", "VLLM_SERVER_DEV_MODE": "1"},
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


def _part(path, fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(),
                                                   "format": fmt}}


def _chat(client, content, **kw):
    kw.setdefault("max_tokens", 4)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                          temperature=0, **kw)


def _metrics(server) -> dict[str, float]:
    root = server.base_url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(root + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(vllm[_a-z]*:[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m and (m.group(2) is None or "model_name" in m.group(2) or m.group(2) == "{}"):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


# -- load ------------------------------------------------------------------------------------
def test_bounded_load_nothing_lost(server, load_clips):
    """Prefix caching on (vLLM's default) with both stages: two-turn chats re-send audio the
    other requests send, so the deep layers' blocks are hit under load; every answer equals the
    same request answered alone on an emptied prefix cache."""
    reqs = build_requests(load_clips, 200, seed=1)
    assert sum(r.cancel for r in reqs) >= 10 and sum(r.stream for r in reqs) > 40
    assert sum(r.history is not None for r in reqs) >= 20
    summary, _ = run_load(server.base_url, "tiny", reqs, concurrency=16, log_text=server.log)
    print(f"\nload test: sent {summary.sent}, answered {summary.answered}, cancelled {summary.cancelled}, "
          f"errors {summary.errors}, mismatches {summary.mismatches}, KV usage after "
          f"{summary.kv_usage_after}, prefix-cache hit tokens {summary.prefix_cache_hit_tokens}, "
          f"retried after a 500 {summary.retried}, "
          f"tracebacks {summary.tracebacks_in_log}, {summary.wall_s:.0f} s")
    assert summary.prefix_cache_hit_tokens > 0
    assert summary.retried <= 2, "more than vLLM's rare multimodal-cache drift: a plugin fault?"
    assert summary.errors == 0, summary.error_samples
    assert summary.answered + summary.cancelled == summary.sent
    assert summary.mismatches == 0
    assert summary.kv_usage_after == 0.0, "KV blocks leaked"
    assert summary.tracebacks_in_log == 0


# -- faults ----------------------------------------------------------------------------------
def test_client_disconnect_mid_stream(server, client, load_clips):
    stream = _chat(client, [_part(load_clips[30.0]), {"type": "text", "text": "hi"}], max_tokens=64, stream=True)
    next(iter(stream))
    stream.close()
    ok = _chat(client, [_part(load_clips[2.0]), {"type": "text", "text": "hi"}])
    assert ok.choices[0].finish_reason == "length"


def test_injected_merge_error_fails_only_that_request(server, client, load_clips, fault_clip):
    from concurrent.futures import ThreadPoolExecutor

    def ask(path):
        try:
            return _chat(client, [_part(path), {"type": "text", "text": "hi"}]).choices[0].finish_reason
        except openai.APIStatusError as e:
            return e.status_code

    with ThreadPoolExecutor(4) as pool:  # the failing request shares batches with others
        got = list(pool.map(ask, [load_clips[6.0], fault_clip, load_clips[10.0], load_clips[1.0]]))
    assert got[1] == 500
    assert [got[0], got[2], got[3]] == ["length"] * 3
    assert f"deep merge failed for request" in server.log()
    assert "failing request(s)" in server.log()
    assert ask(load_clips[4.0]) == "length"  # still serving
    # the failed request's blocks leave the prefix cache (its deep rows were never written): with
    # text after the audio that fills the audio's last block (else nothing past it could be hit
    # anyway), the same prompt again hits nothing and fails again; were its blocks cached, it would
    # hit past the audio, skip the merge and answer from unwritten deep rows
    def ask_long():
        try:
            return _chat(client, [_part(fault_clip), {"type": "text", "text": "Say it again. " * 12}]
                         ).choices[0].finish_reason
        except openai.APIStatusError as e:
            return e.status_code

    hits = lambda: _metrics(server).get("vllm:prefix_cache_hits_total", 0.0)  # noqa: E731
    assert ask_long() == 500
    before = hits()
    assert ask_long() == 500
    assert hits() - before == 0


def test_preemption_under_tiny_kv_budget_same_answers(tiny_model, tmp_path, load_clips, server, client):
    """Turn 1: 30 s + 10 s (596 + 224 prompt tokens) are admitted together (36 of 41 blocks) and
    need 42 after 40 new tokens (596 + 40 stays within max_model_len 640): a preemption. Then,
    on the same budget, turn 2 of the 10 s chat (re-sending its audio: a hit on what turn 1 left
    cached) competes with a new 27 s request (which evicts it). Every answer equals the main
    server's, computed on its emptied prefix cache."""
    from benchmarks.load_test import CHAT_ANSWER, FOLLOW_UP, reset_prefix_cache

    turn1 = [[{"role": "user", "content": [_part(load_clips[s]), {"type": "text", "text": "Transcribe it."}]}]
             for s in (30.0, 10.0)]
    # (turn 2 of the 30 s chat would exceed max_model_len)
    then = [turn1[1] + [{"role": "assistant", "content": CHAT_ANSWER}, {"role": "user", "content": FOLLOW_UP}],
            [{"role": "user", "content": [_part(load_clips[27.0]), {"type": "text", "text": "Transcribe it."}]}]]

    def ask(c, messages):
        return c.chat.completions.create(model="tiny", messages=messages, max_tokens=40,
                                         temperature=0).choices[0].message.content

    want = []
    for m in turn1 + then:
        reset_prefix_cache(server.base_url)
        want.append(ask(client, m))
    page = 2 * 2 * 2 * 32 * BLOCK * 4  # (k, v) x kv_heads x layers per group x head_dim x block x fp32
    args = ["--affinity", json.dumps(SERVER_SPEC), "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "640", "--block-size", str(BLOCK), "--kv-cache-memory-bytes", str(41 * page)]
    with ServerProcess(tiny_model, args, log_path=tmp_path / "tight.log", served_model_name="tiny") as tight:
        tc = openai.OpenAI(base_url=tight.base_url, api_key="none", max_retries=0, timeout=300)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda m: ask(tc, m), turn1))
            preempted = _metrics(tight).get("vllm:num_preemptions_total", 0.0)
            got += list(pool.map(lambda m: ask(tc, m), then))
        m = _metrics(tight)
        assert "Traceback" not in tight.log()
    print(f"\ntight budget: preemptions turn 1 {preempted}, in all {m.get('vllm:num_preemptions_total')}, "
          f"prefix-cache hit tokens {m.get('vllm:prefix_cache_hits_total')}")
    assert preempted > 0, "the KV budget did not force a preemption"
    assert got == want


# -- bad input -------------------------------------------------------------------------------
def _wav_bytes(samples: np.ndarray, sr: int = 16000) -> bytes:
    import io

    import soundfile as sf

    b = io.BytesIO()
    sf.write(b, samples.astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return b.getvalue()


def _unknown_codec_wav() -> bytes:
    import struct

    data = b"\x00" * 1600
    fmt = struct.pack("<HHIIHH", 0x1234, 1, 16000, 32000, 2, 16)  # format tag no decoder knows
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _b64part(raw: bytes, fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt}}


BAD_INPUTS = {
    "corrupt base64": ({"type": "input_audio", "input_audio": {"data": "!!not base64@@", "format": "wav"}},
                       {}, "base64"),
    "non-audio file": (_b64part(b"\x89PNG\r\n\x1a\n" + b"0" * 200), {}, "audio"),
    "unsupported codec": (_b64part(_unknown_codec_wav()), {}, "unsupported audio"),
    "zero-length audio": (_b64part(_wav_bytes(np.zeros(0))), {}, "empty"),
    "audio over max_audio_seconds": (_b64part(_wav_bytes(np.zeros(16000 * 31))), {}, "max_audio_seconds=30"),
    "keep ratio out of range": (None, {"mm_processor_kwargs": {"affinity_keep_ratio": 1.5}}, "affinity_keep_ratio"),
    "keep ratio below server minimum": (None, {"mm_processor_kwargs": {"affinity_keep_ratio": 0.1}},
                                        "outside the range this server allows [0.25, 1.0]"),
    "keep ratio wrong type": (None, {"mm_processor_kwargs": {"affinity_keep_ratio": "half"}}, "affinity_keep_ratio"),
    "unknown mm_processor_kwargs key": (None, {"mm_processor_kwargs": {"sampling_rate": 8000}}, "unknown key"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_4xx_naming_the_problem(client, load_clips, case):
    part, extra, needle = BAD_INPUTS[case]
    part = part or _part(load_clips[2.0])
    with pytest.raises(openai.APIStatusError) as e:
        _chat(client, [part, {"type": "text", "text": "hi"}], extra_body=extra or None)
    assert 400 <= e.value.status_code < 500, f"{case}: {e.value.status_code} {e.value}"
    assert needle.lower() in str(e.value).lower(), f"{case}: {e.value}"
    assert _chat(client, [_part(load_clips[1.0]), {"type": "text", "text": "hi"}]).choices[0].finish_reason == "length"


# -- metrics ---------------------------------------------------------------------------------
def test_metrics_count_exactly(server, client, load_clips, reference):
    before = _metrics(server)
    expect = {"requests": 0, "in": 0, "input": 0, "deep": 0, "blocks": 0.0}
    for s, ratio in ((4.0, None), (13.0, 0.5)):
        extra = {"mm_processor_kwargs": {"affinity_keep_ratio": ratio}} if ratio else None
        r = _chat(client, [_part(load_clips[s]), {"type": "text", "text": "hi"}], max_tokens=2, extra_body=extra)
        n = reference.audio_embeddings([load_audio(load_clips[s])])[0].shape[0]
        k_in = kept_in(n, ratio or SERVER_SPEC["input"]["keep_ratio"])
        k_deep = kept_deep(k_in)
        t = r.usage.prompt_tokens
        # 4 layers, merge after layer 1: one KV group of 2 layers below, one above (the
        # accounting module's layout is checked against engine blocks in test_deep / test_adapters)
        expect["blocks"] += accounting.kv_blocks_saved(
            accounting.KVLayout(4, 1), stock_tokens=t + n - k_in, tokens=t, deep_tokens=t - k_in + k_deep, block_size=BLOCK)
        expect["requests"] += 1
        expect["in"] += n
        expect["input"] += k_in
        expect["deep"] += k_deep
    after = _metrics(server)
    d = lambda name: after.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    assert d("vllm_affinity:requests_total") == expect["requests"]
    assert d("vllm_affinity:audio_tokens_in_total") == expect["in"]
    assert d("vllm_affinity:audio_tokens_after_input_total") == expect["input"]
    assert d("vllm_affinity:audio_tokens_after_deep_total") == expect["deep"]
    assert d("vllm_affinity:kv_blocks_saved_total") == pytest.approx(expect["blocks"])
    assert d("vllm_affinity:audio_tokens_in_per_request_count") == 2
    assert expect["blocks"] > 0


# -- guard rails -----------------------------------------------------------------------------
def test_affinity_off_is_byte_for_byte_stock(tiny_model, tmp_path, load_clips):
    content = [_part(load_clips[4.0]), {"type": "text", "text": "What does the speaker say?"}]
    answers = []
    for name, args, env, plain in (
        ("off", ["--affinity", "off", *CPU_ARGS], {}, False),
        ("stock", CPU_ARGS, {"VLLM_PLUGINS": ""}, True),
    ):
        with ServerProcess(tiny_model, args, log_path=tmp_path / f"{name}.log", served_model_name="tiny",
                           env=env, plain_vllm=plain) as srv:
            c = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=120)
            r = _chat(c, content, max_tokens=12, logprobs=True, top_logprobs=3)
            answers.append(json.dumps([r.choices[0].model_dump(), r.usage.model_dump()], sort_keys=True))
            if name == "off":  # the plugin never ran: none of its log lines
                assert "plugin not loaded" in srv.log()
                assert "vllm-affinity: " not in srv.log()
    assert answers[0] == answers[1]


def test_pipeline_parallel_is_refused_with_the_deep_stage(tiny_model):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(tiny_model), pipeline_parallel_size=2,
                      hf_overrides={"affinity": {"deep": {"merge_layer": 1, "keep_ratio": 0.5}}})
    with pytest.raises(Exception, match="pipeline parallelism"):
        args.create_engine_config()


# -- tensor parallelism ----------------------------------------------------------------------
def test_tensor_parallel_2_same_outputs_and_same_merges(tiny_model, clips, tmp_path):
    job = {"model": str(tiny_model), "hf_overrides": {"affinity": SERVER_SPEC}, "prompt": PROMPT,
           "max_tokens": 16, "logprobs": 5, "requests": [{"audios": [str(c)]} for c in clips[:4]]}
    runs, traces = {}, {}
    for tp in (1, 2):
        trace = tmp_path / f"trace-tp{tp}"
        trace.mkdir()
        env = {"VLLM_AFFINITY_TRACE_DIR": str(trace)}
        if tp == 2:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank
        tp_job = dict(job, engine_kw_extra={"tensor_parallel_size": tp, "block_size": BLOCK})
        (tmp_path / f"tp{tp}").mkdir()
        runs[tp] = run_engine_subprocess(tp_job, tmp_path / f"tp{tp}", env=env)
        traces[tp] = {p.name: p.read_text().splitlines() for p in sorted(trace.glob("rank*.jsonl"))}
    assert list(traces[2]) == ["rank0.jsonl", "rank1.jsonl"]
    r0, r1 = traces[2]["rank0.jsonl"], traces[2]["rank1.jsonl"]
    assert r0 == r1, "tensor-parallel ranks made different merge decisions"
    stages = {json.loads(x)["stage"] for x in r0}
    assert stages == {"input", "deep"}
    # the encoder is replicated, so the input stage decides exactly as with one rank
    inputs = lambda lines: [x for x in lines if '"input"' in x]  # noqa: E731
    assert inputs(r0) == inputs(traces[1]["rank0.jsonl"])
    for a, b in zip(runs[1]["results"], runs[2]["results"]):
        assert a["prompt_token_ids"] == b["prompt_token_ids"]
        assert a["token_ids"] == b["token_ids"]
