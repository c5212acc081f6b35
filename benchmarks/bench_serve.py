"""Serving under load (workload (e)): real `vllm serve`, stock vLLM at its defaults vs the plugin.

    python benchmarks/bench_serve.py [--shape scaled|7b|7b-fp32] [--sessions 24] [--two-turn 0.33]
                                     [--max-concurrency 8] [--kv-mib 256] [--seed 0] [--lengths 10 20 30 45 60]
                                     [--variants paper-aggressive input+encoder input-only windows-only]

A fixed, seeded mix of chat sessions (the same for every variant): each session's audio is
10–60 s of espeak-ng speech (one of 10 / 20 / 30 / 45 / 60 s, fresh 1e-4 noise per session so
no cache serves one session from another), its turn 1 asks for 32–256 output tokens
(``ignore_eos``), and a share of the sessions (``--two-turn``) sends a turn 2 after turn 1's
answer: turn 1's messages, the answer, a new question, the same audio again (the prefix-cache
case). ``--max-concurrency`` clients pull sessions from one queue (vllm bench serve's
``--max-concurrency``), all streaming through the `openai` client.

Every variant's server starts with the same flags: dtype, dummy weights, ``--max-model-len``,
the KV budget (``--kv-cache-memory-bytes``: a fixed budget is where fewer KV blocks per
request turn into more requests at once); nothing else, so stock runs at vLLM's defaults
(torch.compile, prefix caching, chunked prefill, multi-process engine) and the plugin at its
own defaults. ``stock`` runs first and again at the end (drift). For the ``7b`` shape every
variant adds ``--enforce-eager`` (stock's inductor compile did not fit the machine, issue 19).
Above 30 s stock Qwen2-Audio truncates the audio to 30 s (so stock does less work there; the
plugin's presets encode every 30 s window).

Metrics (vllm bench serve's names): completed, duration, request_throughput,
output_throughput, mean/median/p99 TTFT, TPOT and ITL in ms, and max_concurrent_requests (the
most requests running at once, vLLM's ``vllm:num_requests_running`` sampled every 0.2 s), plus
the prefix cache's hit tokens (``vllm:prefix_cache_hits_total``). ``windows-only`` (the plugin
loaded, no stage on, audio over 30 s encoded in 30 s windows) is an extra row: stock at its
defaults, but hearing the whole audio. Writes ``serve_<shape>.{json,md}``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_offline import SHAPES, SPECS, build_model, resolve_spec, runnable_shape, shape_dtype  # noqa: E402
from benchmarks.common import CACHE, cpu_line, make_clips, pct, probe_cpu  # noqa: E402
from benchmarks.harness import ANSWER, FOLLOW_UP  # noqa: E402

LENGTHS = (10.0, 20.0, 30.0, 45.0, 60.0)
QUESTION = "What does the speaker say?"


def build_sessions(n: int, two_turn: float, seed: int, lengths=LENGTHS) -> list[dict]:
    """The seeded mix: audio length, output tokens, whether a turn 2 follows."""
    import random

    rng = random.Random(seed)
    return [{"id": i, "seconds": rng.choice(tuple(lengths)), "max_tokens": rng.randint(32, 256),
             "two_turn": rng.random() < two_turn, "noise_seed": rng.randrange(2**31)} for i in range(n)]


def _metric(base: str, name: str) -> float:
    from vllm_affinity_tools.serving import metric

    return metric(base, name) or 0.0


def run_variant(variant: str, spec, model: Path, payloads: dict, sessions: list[dict], a, dtype: str) -> dict:
    import openai

    from vllm_affinity_tools.serving import ServerProcess

    args = ["--dtype", dtype, "--max-model-len", str(a.max_model_len), "--load-format", "dummy",
            "--kv-cache-memory-bytes", str(int(a.kv_mib * 2**20)), "--limit-mm-per-prompt", '{"audio": 1}']
    if a.shape == "7b":
        args.append("--enforce-eager")
    env = {}
    if spec is None:
        env["VLLM_PLUGINS"] = ""
    else:
        args = ["--affinity", json.dumps(spec), *args]
    log = CACHE / f"serve-{variant.replace(' ', '_')}.log"
    with ServerProcess(model, args, log_path=log, served_model_name="m", env=env,
                       plain_vllm=spec is None, startup_timeout=1800) as srv:
        base = srv.base_url.rsplit("/v1", 1)[0]
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=3600)
        running_max, stop = [0.0], threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    running_max[0] = max(running_max[0], _metric(base, "vllm:num_requests_running"))
                except OSError:
                    pass
                time.sleep(0.2)

        def turn(messages: list, max_tokens: int) -> dict:
            t0 = time.perf_counter()
            stamps, text, usage = [], [], None
            stream = client.chat.completions.create(
                model="m", max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, messages=messages)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content is not None:
                    stamps.append(time.perf_counter())
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            end = time.perf_counter()
            out_tokens = usage.completion_tokens if usage else len(stamps)
            return {"ttft_s": stamps[0] - t0 if stamps else None, "latency_s": end - t0,
                    "itl_s": [b - a_ for a_, b in zip(stamps, stamps[1:])],
                    "tpot_s": (end - stamps[0]) / (out_tokens - 1) if stamps and out_tokens > 1 else None,
                    "output_tokens": out_tokens, "prompt_tokens": usage.prompt_tokens if usage else None,
                    "cached_tokens": (usage.prompt_tokens_details.cached_tokens
                                      if usage and usage.prompt_tokens_details else None)}

        def session(s: dict) -> list[dict]:
            user = {"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": payloads[s["id"]], "format": "wav"}},
                {"type": "text", "text": QUESTION}]}
            r1 = {"session": s["id"], "turn": 1, **turn([user], s["max_tokens"])}
            if not s["two_turn"]:
                return [r1]
            msgs = [user, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": FOLLOW_UP}]
            return [r1, {"session": s["id"], "turn": 2, **turn(msgs, 32)}]

        work: queue.Queue = queue.Queue()
        for s in sessions:
            work.put(s)
        results, lock = [], threading.Lock()

        def client_loop():
            while True:
                try:
                    s = work.get_nowait()
                except queue.Empty:
                    return
                rs = session(s)
                with lock:
                    results.extend(rs)

        hits0 = _metric(base, "vllm:prefix_cache_hits_total")  # a Counter: exposed with _total
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client_loop) for _ in range(a.max_concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        duration = time.perf_counter() - t0
        stop.set()
        sampler.join()
        hits = _metric(base, "vllm:prefix_cache_hits_total") - hits0
    return summarize(variant, results, duration, running_max[0], hits)


def summarize(variant: str, results: list[dict], duration: float, max_running: float, hits: float) -> dict:
    def ms(xs, f):
        xs = [x for x in xs if x is not None]
        return f(xs) * 1e3 if xs else None

    ttft = [r["ttft_s"] for r in results]
    tpot = [r["tpot_s"] for r in results]
    itl = [x for r in results for x in r["itl_s"]]
    t2 = [r["ttft_s"] for r in results if r["turn"] == 2]
    out = sum(r["output_tokens"] for r in results)
    return {
        "variant": variant, "completed": len(results), "duration": duration,
        "request_throughput": len(results) / duration, "output_throughput": out / duration,
        "total_token_throughput": (out + sum(r["prompt_tokens"] or 0 for r in results)) / duration,
        **{f"{stat}_{name}_ms": ms(xs, f) for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl))
           for stat, f in (("mean", statistics.mean), ("median", statistics.median), ("p99", lambda v: pct(v, 0.99)))},
        "median_turn2_ttft_ms": ms(t2, statistics.median),
        "max_concurrent_requests": max_running, "prefix_cache_hit_tokens": hits,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import soundfile as sf

    p = argparse.ArgumentParser(prog="python benchmarks/bench_serve.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="scaled")
    p.add_argument("--sessions", type=int, default=24)
    p.add_argument("--two-turn", type=float, default=0.33, help="share of sessions with a turn 2")
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--kv-mib", type=float, default=256.0)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lengths", type=float, nargs="+", default=list(LENGTHS),
                   help="audio lengths (s) the sessions draw from; 10 20 30: a mix stock hears whole")
    p.add_argument("--variants", nargs="+", choices=[v for v in SPECS if v != "stock"],
                   default=["paper-aggressive", "input+encoder", "input-only", "windows-only"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--note", default="", help="what else ran on the machine (written into the result file)")
    a = p.parse_args(argv)
    cpu = probe_cpu()
    print(cpu_line(cpu))
    a.shape = runnable_shape(a.shape, cpu)
    model = build_model(a.shape)
    cfg = json.loads((model / "config.json").read_text())
    order = ["stock", *[v for v in a.variants if v != "stock"], "stock (again)"]
    specs = {v: resolve_spec(v.removesuffix(" (again)"), cfg["text_config"]["num_hidden_layers"],
                             cfg["audio_config"]["encoder_layers"]) for v in order}
    sessions = build_sessions(a.sessions, a.two_turn, a.seed, a.lengths)
    clips = make_clips(sorted(set(a.lengths)))
    payloads = {}
    for s in sessions:
        wave, sr = sf.read(clips[s["seconds"]], dtype="float32")
        noise = np.random.default_rng(s["noise_seed"]).normal(0, 1e-4, wave.shape).astype(np.float32)
        b = io.BytesIO()
        sf.write(b, wave + noise, sr, format="WAV")
        payloads[s["id"]] = base64.b64encode(b.getvalue()).decode()
    dtype = shape_dtype(a.shape)
    rows = []
    for v in order:
        print(f"[bench_serve] {v} ...", flush=True)
        rows.append(run_variant(v, specs[v], model, payloads, sessions, a, dtype))
        r = rows[-1]
        print(f"  {r['completed']} requests in {r['duration']:.0f} s, TTFT p99 {r['p99_ttft_ms']:.0f} ms, "
              f"max running {r['max_concurrent_requests']:.0f}", flush=True)
    write(a, rows, specs, sessions, cpu, dtype, argv)
    return 0


def write(a, rows: list[dict], specs: dict, sessions: list[dict], cpu: dict, dtype: str, argv) -> None:
    from benchmarks.report import write_report

    stock = rows[0]

    def f(x, fmt=".0f"):
        return "–" if x is None else format(x, fmt)

    def ratio(key, higher_better):
        def r(row):
            if not stock.get(key) or not row.get(key):
                return "–"
            return f"{(row[key] / stock[key]) if higher_better else (stock[key] / row[key]):.2f}x"
        return r

    cols = [("request_throughput", "requests/s", ".3f", True), ("output_throughput", "output tok/s", ".1f", True),
            ("median_ttft_ms", "TTFT p50 ms", ".0f", False), ("p99_ttft_ms", "TTFT p99 ms", ".0f", False),
            ("median_itl_ms", "ITL p50 ms", ".1f", False), ("p99_itl_ms", "ITL p99 ms", ".1f", False),
            ("median_tpot_ms", "TPOT p50 ms", ".1f", False), ("median_turn2_ttft_ms", "turn-2 TTFT p50 ms", ".0f", False),
            ("max_concurrent_requests", "most running at once", ".0f", True)]
    header = ["variant", "completed", "duration s"]
    for _, title, _, _ in cols:
        header += [title, "×"]
    header.append("prefix-cache hit tokens")
    table = []
    for r in rows:
        line = [r["variant"], str(r["completed"]), f(r["duration"])]
        for key, _, fmt, hb in cols:
            line += [f(r[key], fmt), ratio(key, hb)(r)]
        line.append(f(r["prefix_cache_hit_tokens"]))
        table.append(line)
    two = sum(s["two_turn"] for s in sessions)
    footer = "\n".join([
        f"{len(sessions)} sessions ({two} of them two-turn), seed {a.seed}: audio "
        + ", ".join(f"{x:g} s ×{sum(s['seconds'] == x for s in sessions)}" for x in sorted({s["seconds"] for s in sessions}))
        + f"; turn 1 {min(s['max_tokens'] for s in sessions)}–{max(s['max_tokens'] for s in sessions)} output tokens "
        f"(ignore_eos), turn 2 32; {a.max_concurrency} concurrent clients, streaming through the openai client. "
        "× = against stock (> 1 is better: throughput variant / stock, latency stock / variant).",
        f"Qwen2-Audio {a.shape} shape, {dtype}, dummy weights; every server: --max-model-len {a.max_model_len}, "
        f"--kv-cache-memory-bytes {int(a.kv_mib * 2**20)} ({a.kv_mib:g} MiB), --limit-mm-per-prompt audio 1"
        + (", --enforce-eager (stock's inductor compile did not fit, issue 19)" if a.shape == "7b" else "")
        + "; nothing else: stock at vLLM's defaults (plugin not loaded), each plugin variant at its own defaults. "
        "Stock truncates audio over 30 s to 30 s.",
        cpu_line(cpu) + ".",
        f"Command: `python benchmarks/bench_serve.py {' '.join(argv or sys.argv[1:])}`.",
        "SPECs: " + "; ".join(f"`{v}`: `{json.dumps(s)}`" for v, s in specs.items() if s is not None) + "."
        + (f" {a.note}" if a.note else ""),
    ])
    write_report(a.out, f"serve_{a.shape}", f"Serving under load ({a.shape} shape)", header, table, footer,
                 {"rows": rows, "specs": specs, "sessions": sessions, "cpu": cpu,
                  "command": " ".join(argv or sys.argv[1:]), "args": {**vars(a), "out": str(a.out)}})
    print(footer)


if __name__ == "__main__":
    sys.exit(main())
