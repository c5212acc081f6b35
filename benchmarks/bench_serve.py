"""Serving benchmark: real `vllm serve`, stock vs plugin, same fixed KV budget.

    python benchmarks/bench_serve.py [--shape scaled|7b|7b-fp32] [--seconds 30] [--requests 24]
                                     [--concurrency 24] [--kv-mib 64]
                                     [--variants stock paper-aggressive paper-aggressive+encoder]

For each variant a server starts on 127.0.0.1 with the same KV-cache budget; N chat
requests with the same audio (fresh noise each, so no cache serves them) are sent at
once through the `openai` client, streaming, max_tokens=16. Measured: the most
requests running at once (vLLM's ``vllm:num_requests_running``, sampled every 0.2 s),
requests/s, output tokens/s, TTFT distribution (first streamed chunk). Writes
``serve_<shape>.json`` and ``serve_<shape>.md`` into benchmarks/results.

Shapes and SPECs as in ``bench_offline.py``: ``7b`` is bf16 and runs only where the CPU
has native bf16, elsewhere ``7b-fp32`` (7B widths, 8 LM layers, fp32) runs and the file
says so; the deep merge layer keeps the paper's relative depth.
"""

from __future__ import annotations

import argparse
import base64
import json
import io
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_offline import (  # noqa: E402
    SHAPES, build_model, make_clips, pct, resolve_spec, runnable_shape, shape_dtype,
)

VARIANTS = ("stock", "paper-aggressive", "paper-aggressive+encoder", "input-only")


def _gauge(base: str, name: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def run_variant(variant: str, spec, model: Path, clip: Path, a, dtype: str) -> dict:
    import numpy as np
    import openai
    import soundfile as sf

    from vllm_affinity_tools.serving import ServerProcess

    args = ["--dtype", dtype, "--max-model-len", "2048", "--enforce-eager", "--load-format", "dummy",
            "--kv-cache-memory-bytes", str(int(a.kv_mib * 2**20)), "--block-size", "32",
            "--no-enable-prefix-caching", "--max-num-seqs", str(a.concurrency)]
    env = {}
    if spec is None:
        env["VLLM_PLUGINS"] = ""
    else:
        args = ["--affinity", json.dumps(spec), *args]
    wave, sr = sf.read(clip, dtype="float32")
    rng = np.random.default_rng(0)
    payloads = []
    for _ in range(a.requests):
        b = io.BytesIO()
        sf.write(b, wave + rng.normal(0, 1e-4, wave.shape).astype(np.float32), sr, format="WAV")
        payloads.append(base64.b64encode(b.getvalue()).decode())
    log = ROOT / ".cache" / "bench" / f"serve-{variant}.log"
    with ServerProcess(model, args, log_path=log, served_model_name="m", env=env,
                       plain_vllm=spec is None, startup_timeout=900) as srv:
        base = srv.base_url.rsplit("/v1", 1)[0]
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=3600)
        running_max, stop = [0.0], threading.Event()

        def sample():
            while not stop.is_set():
                running_max[0] = max(running_max[0], _gauge(base, "vllm:num_requests_running"))
                time.sleep(0.2)

        def one(data):
            t0 = time.perf_counter()
            ttft, tokens = None, 0
            stream = client.chat.completions.create(
                model="m", max_tokens=16, temperature=0, stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": [
                    {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                    {"type": "text", "text": "What does the speaker say?"}]}])
            for chunk in stream:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if chunk.usage is not None:  # the final chunk (dummy weights emit unprintable ids)
                    tokens = chunk.usage.completion_tokens
            return ttft, time.perf_counter() - t0, tokens

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.concurrency) as pool:
            res = list(pool.map(one, payloads))
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
    ttfts = sorted(r[0] for r in res)
    return {
        "variant": variant, "requests": a.requests, "wall_s": wall, "max_running": running_max[0],
        "requests_per_s": a.requests / wall, "output_tokens_per_s": sum(r[2] for r in res) / wall,
        "ttft_median_s": statistics.median(ttfts), "ttft_p90_s": pct(ttfts, 0.9),
        "ttft_s": ttfts,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_serve.py")
    p.add_argument("--shape", choices=list(SHAPES), default="scaled")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--kv-mib", type=float, default=128.0)
    p.add_argument("--variants", nargs="+", default=["stock", "paper-aggressive"], choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--note", default="", help="what else ran on the machine (written into the result file)")
    a = p.parse_args(argv)
    from benchmarks.bench_models import probe_cpu

    cpu = probe_cpu()
    print(f"CPU: {cpu['cpu_model']}, {cpu['cores']} cores, bf16 native: {cpu['bf16_native']} ({cpu['bf16_basis']})")
    a.shape = runnable_shape(a.shape, cpu)
    model = build_model(a.shape)
    cfg = json.loads((model / "config.json").read_text())
    specs = {v: resolve_spec(v, cfg["text_config"]["num_hidden_layers"], cfg["audio_config"]["encoder_layers"])
             for v in a.variants}
    clip = make_clips([a.seconds])[a.seconds]
    dtype = shape_dtype(a.shape)
    rows = [run_variant(v, specs[v], model, clip, a, dtype) for v in a.variants]
    stock = next((r for r in rows if r["variant"] == "stock"), None)
    from benchmarks.report import write_report

    def vs_stock(r):
        return r["max_running"] / stock["max_running"] if stock and stock["max_running"] else float("nan")

    write_report(
        a.out, f"serve_{a.shape}", f"Serving benchmark ({a.shape} shape)",
        ["variant", "most running at once", "vs stock", "requests/s", "output tokens/s", "TTFT median (s)",
         "TTFT p90 (s)"],
        [[r["variant"], f"{r['max_running']:.0f}", f"{vs_stock(r):.2f}x", f"{r['requests_per_s']:.2f}",
          f"{r['output_tokens_per_s']:.1f}", f"{r['ttft_median_s']:.2f}", f"{r['ttft_p90_s']:.2f}"] for r in rows],
        f"{a.requests} concurrent chat requests with {a.seconds:g} s of audio, KV budget {a.kv_mib:g} MiB, "
        f"block size 32, max_tokens 16, prefix caching off, {dtype}, dummy weights. CPU: {cpu['cpu_model']}, "
        f"{cpu['cores']} cores, bf16 native: {cpu['bf16_native']} ({cpu['bf16_basis']}). SPECs: "
        + "; ".join(f"{v}: {json.dumps(specs[v])}" for v in a.variants if specs[v] is not None)
        + (f". {a.note}" if a.note else ""),
        {"rows": rows, "specs": specs, "cpu": cpu, "args": {**vars(a), "out": str(a.out)}},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
