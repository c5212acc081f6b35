"""Load test of a real server with both stages on (loopback only, bounded).

    python benchmarks/load_test.py [--requests 1000] [--concurrency 32] [--out FILE]

Starts `vllm-affinity serve` on 127.0.0.1 with the tiny model (vLLM's prefix caching on,
as by default), sends a mix of audio (1-30 s), text-only, two-audio and two-turn chat
requests (a follow-up that re-sends an audio the single-turn requests also send, so the
prefix cache hits it in every KV group, deep layers included), streaming and not, cancels
~10% mid-flight (the client closes the stream after its first chunk), then re-runs every
distinct request alone on an emptied prefix cache (``/reset_prefix_cache``, the server in
``VLLM_SERVER_DEV_MODE``) and compares greedy answers. It passes when every request that
was not cancelled is answered, no answer differs from the same request alone and uncached,
the KV cache is empty again (vLLM's ``vllm:kv_cache_usage_perc`` back to 0) and the server
log has no traceback. tests/test_hardening.py runs a CI-sized version (200 requests, 16
clients); this script runs larger ones and writes the summary as JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DURATIONS = (1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 13.0, 16.0, 20.0, 24.0, 27.0, 30.0)
QUESTIONS = ("What does the speaker say?", "Summarize the audio.", "Transcribe it.")
#: a two-turn chat: turn 1 (audio + question) with this answer, then this follow-up
CHAT_ANSWER, FOLLOW_UP = "The speaker reads a short passage.", "Summarize it in one sentence."


@dataclass
class LoadRequest:
    key: str  # identical keys are identical requests
    content: list | str
    max_tokens: int
    stream: bool
    cancel: bool
    history: list | None = None  # earlier turns of a chat (messages), before this user turn


@dataclass
class LoadResult:
    key: str
    status: str  # answered | cancelled | error
    text: str = ""
    error: str = ""
    seconds: float = 0.0
    retries: int = 0  # 500s retried before this result


@dataclass
class Summary:
    sent: int = 0
    answered: int = 0
    cancelled: int = 0
    errors: int = 0
    mismatches: int = 0
    kv_usage_after: float | None = None
    prefix_cache_hit_tokens: float | None = None  # during the load (vllm:prefix_cache_hits)
    retried: int = 0  # requests answered after a retried 500 (see _one)
    tracebacks_in_log: int | None = None
    wall_s: float = 0.0
    error_samples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.errors == 0 and self.mismatches == 0 and self.kv_usage_after == 0.0
                and not self.tracebacks_in_log and self.answered + self.cancelled == self.sent)


def make_clips(out_dir: Path) -> dict[float, Path]:
    sys.path.insert(0, str(ROOT))
    from vllm_affinity_tools import speech

    clips = {}
    for i, s in enumerate(DURATIONS):
        p = out_dir / f"load-{s:g}s.wav"
        if not p.exists():
            speech.utterance(s, p, seed=i, sample_rate=16000, voice=("en-us", "en-gb")[i % 2])
        clips[s] = p
    return clips


def _audio_part(path: Path) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(),
                                                   "format": "wav"}}


def build_requests(clips: dict[float, Path], n: int, seed: int = 0, cancel_frac: float = 0.1) -> list[LoadRequest]:
    rng = random.Random(seed)
    parts = {s: _audio_part(p) for s, p in clips.items()}
    out = []
    for i in range(n):
        kind = rng.choices(["audio", "text", "two", "chat"], weights=[7, 2, 1, 2])[0]
        q = rng.choice(QUESTIONS)
        max_tokens = rng.choice((4, 8, 16))
        history = None
        if kind == "chat":  # turn 2 re-sends turn 1's audio: a prefix-cache hit across the audio
            s = rng.choice(DURATIONS)
            history = [{"role": "user", "content": [parts[s], {"type": "text", "text": q}]},
                       {"role": "assistant", "content": CHAT_ANSWER}]
            content = FOLLOW_UP
            key = f"chat:{s}:{q}:{max_tokens}"
        elif kind == "audio":
            s = rng.choice(DURATIONS)
            content = [parts[s], {"type": "text", "text": q}]
            key = f"audio:{s}:{q}:{max_tokens}"
        elif kind == "two":
            a, b = rng.sample(DURATIONS[:6], 2)
            content = [parts[a], parts[b], {"type": "text", "text": q}]
            key = f"two:{a}:{b}:{q}:{max_tokens}"
        else:
            content = f"{q} Request {i % 7}."
            key = f"text:{i % 7}:{q}:{max_tokens}"
        cancel = rng.random() < cancel_frac
        out.append(LoadRequest(key, content, max_tokens, stream=cancel or rng.random() < 0.5, cancel=cancel,
                               history=history))
    return out


def _one(client, model: str, req: LoadRequest, retries: int = 1) -> LoadResult:
    """One request; a 500 before any output is retried (``retries`` times, counted): vLLM 0.32
    answers a P0/P1 multimodal-cache drift (the API server believes the engine still holds an
    audio item it evicted) with a retryable 500 and relies on the client to resend, as the
    official client does by default (max_retries=2); seen once in 200 requests with two-turn
    chats re-sending audio. Any other error, or a 500 that persists, counts as an error."""
    for attempt in range(retries + 1):
        res = _attempt(client, model, req)
        res.retries = attempt
        if res.status != "error" or not res.error.startswith("InternalServerError"):
            break
    return res


def _attempt(client, model: str, req: LoadRequest) -> LoadResult:
    t0 = time.monotonic()
    messages = [*(req.history or []), {"role": "user", "content": req.content}]
    try:
        if req.stream:
            stream = client.chat.completions.create(model=model, messages=messages, max_tokens=req.max_tokens,
                                                    temperature=0, stream=True)
            text = []
            for chunk in stream:
                if req.cancel:
                    stream.close()  # client disconnect mid-flight
                    return LoadResult(req.key, "cancelled", seconds=time.monotonic() - t0)
                if chunk.choices and chunk.choices[0].delta.content:
                    text.append(chunk.choices[0].delta.content)
            return LoadResult(req.key, "answered", "".join(text), seconds=time.monotonic() - t0)
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=req.max_tokens, temperature=0)
        return LoadResult(req.key, "answered", r.choices[0].message.content or "", seconds=time.monotonic() - t0)
    except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
        return LoadResult(req.key, "error", error=f"{type(exc).__name__}: {exc}"[:300],
                          seconds=time.monotonic() - t0)


def kv_usage(base_url: str) -> float | None:
    from vllm_affinity_tools.serving import metric

    return metric(base_url, "vllm:kv_cache_usage_perc")


def reset_prefix_cache(base_url: str, timeout_s: float = 30.0) -> None:
    """Empty the server's prefix cache (vLLM's dev endpoint, ``VLLM_SERVER_DEV_MODE=1``); it
    refuses while blocks are held, so retry until the aborted requests have drained."""
    root = base_url.rsplit("/v1", 1)[0]
    deadline = time.monotonic() + timeout_s
    while True:
        req = urllib.request.Request(root + "/reset_prefix_cache", method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            if json.loads(r.read().decode() or "{}").get("success", False):
                return
        if time.monotonic() > deadline:
            raise RuntimeError("the server refused to reset its prefix cache (blocks still held)")
        time.sleep(0.5)


def run_load(base_url: str, model: str, reqs: list[LoadRequest], concurrency: int,
             log_text=None, settle_s: float = 30.0, uncached_alone: bool = True) -> tuple[Summary, list[LoadResult]]:
    """``uncached_alone``: each distinct request's reference answer is computed alone on an
    emptied prefix cache (the server must run with ``VLLM_SERVER_DEV_MODE=1``)."""
    import openai

    local = threading.local()

    def client():
        if not hasattr(local, "c"):
            local.c = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
        return local.c

    from vllm_affinity_tools.serving import metric

    hits_before = metric(base_url, "vllm:prefix_cache_hits_total")
    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda r: _one(client(), model, r), reqs))
    summary = Summary(sent=len(reqs), wall_s=time.monotonic() - t0)
    hits_after = metric(base_url, "vllm:prefix_cache_hits_total")
    if hits_before is not None and hits_after is not None:
        summary.prefix_cache_hit_tokens = hits_after - hits_before
    alone: dict[str, str] = {}
    seq = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
    for req in reqs:
        if req.key not in alone:
            if uncached_alone:
                reset_prefix_cache(base_url, settle_s)
            alone[req.key] = _one(seq, model, LoadRequest(req.key, req.content, req.max_tokens, False, False,
                                                          req.history)).text
    for req, res in zip(reqs, results):
        summary.retried += res.retries > 0
        if res.status == "answered":
            summary.answered += 1
            if res.text != alone[req.key]:
                summary.mismatches += 1
        elif res.status == "cancelled":
            summary.cancelled += 1
        else:
            summary.errors += 1
            if len(summary.error_samples) < 5:
                summary.error_samples.append(res.error)
    deadline = time.monotonic() + settle_s  # aborted requests drain asynchronously
    while True:
        summary.kv_usage_after = kv_usage(base_url)
        if summary.kv_usage_after == 0.0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if log_text is not None:
        summary.tracebacks_in_log = log_text().count("Traceback")
    return summary, results


SERVER_SPEC = {
    "input": {"keep_ratio": 0.74},
    "deep": {"merge_layer": 1, "keep_ratio": 0.3},
    "max_audio_seconds": 30,
    "min_request_keep_ratio": 0.25,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/load_test.py")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load_test.json")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from vllm_affinity_tools.demo import CPU_ARGS, ensure_tiny_model
    from vllm_affinity_tools.serving import ServerProcess

    cache = ROOT / ".cache" / "load"
    cache.mkdir(parents=True, exist_ok=True)
    clips = make_clips(cache)
    reqs = build_requests(clips, a.requests, a.seed)
    model = ensure_tiny_model(ROOT / ".cache" / "tiny-qwen2-audio")
    with ServerProcess(model, ["--affinity", json.dumps(SERVER_SPEC), *CPU_ARGS, "--block-size", "32",
                               "--max-num-seqs", str(a.concurrency)],
                       log_path=cache / "server.log", served_model_name="tiny",
                       env={"VLLM_SERVER_DEV_MODE": "1"}) as srv:  # /reset_prefix_cache
        summary, _ = run_load(srv.base_url, "tiny", reqs, a.concurrency, log_text=srv.log)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({**summary.__dict__, "ok": summary.ok, "concurrency": a.concurrency}, indent=2))
    print(json.dumps({**summary.__dict__, "ok": summary.ok}, indent=2))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
