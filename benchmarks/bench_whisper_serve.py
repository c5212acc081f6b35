"""Whisper through `vllm serve`: transcriptions per second and cross-attention KV, stock vs plugin.

    python benchmarks/bench_whisper_serve.py [--models tiny.en base] [--requests 40] [--concurrency 8]
                                             [--specs off '{"input": ...}' ...]

For each model (real weights, converted by the set-up) and SPEC a server starts on 127.0.0.1
(fp32, the CPU build); the first 20 espeak-ng clips of the accuracy corpus
(``vllm_affinity_tools.asr.corpus``, 2-16 s) are sent through the official ``openai`` client's
``audio.transcriptions.create`` by ``--concurrency`` threads, ``--requests`` in all, after two
warm-up requests. Measured: wall time -> transcriptions/s; the encoder frames each request's
decoder attends to (``vllm_affinity:audio_tokens_after_input`` on /metrics over requests);
cross-attention KV bytes per request from that count (whole blocks of 128, fp32, the padded head
of size-weighted attention), the engine's own allocation rule. The first SPEC is the reference
("stock": keep ratio 1.0). Writes ``whisper_serve.{json,md}`` into
benchmarks/results; every figure names the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_accuracy import machine, machine_line  # noqa: E402

#: the settings measured by default: stock (the plugin at keep ratio 1.0, which equals stock vLLM's
#: engine, tests/test_whisper.py, with the English-only prompt fix: plain vLLM 0.32 answers tiny.en's
#: transcriptions with a 500 or with the wrong prompt's ' to'); the accuracy benchmark's recommendation for
#: tiny.en (docs/accuracy.md); the encoder stage after layer 1 at half the frames with size-weighted
#: cross-attention (+0.4 WER points on tiny.en, docs/accuracy.md)
DEFAULT_SPECS = [
    '{"input": {"keep_ratio": 1.0}}',
    '{"input": {"keep_ratio": 0.34, "size_weighted": true}}',
    '{"encoder": {"merge_layer": 1, "keep_ratio": 0.5}, "input": {"keep_ratio": 1.0, "size_weighted": true}}',
]
#: what the machine needs, the same for every server; nothing else, so each runs at vLLM's defaults
#: (torch.compile on; results made before issue 19 added --enforce-eager to every server)
ARGS = ["--dtype", "float32", "--max-model-len", "448", "--kv-cache-memory-bytes", str(256 << 20)]


def run_one(model: Path, spec: str, clips, a, log_dir: Path) -> dict:
    import openai
    import requests

    from vllm_affinity_tools.demo import cross_attention_kv_bytes, metric_value
    from vllm_affinity_tools.serving import ServerProcess

    from vllm_affinity.config import load_spec

    cfg = load_spec(json.loads(spec) if spec.lstrip().startswith("{") else spec)
    log = log_dir / f"whisper-serve-{model.name}-{abs(hash(spec)) % 10**8}.log"
    with ServerProcess(model, ["--affinity", spec, *ARGS], log_path=log, served_model_name="w") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=600)

        def transcribe(i: int) -> str:
            with clips[i % len(clips)].path.open("rb") as f:
                return client.audio.transcriptions.create(model="w", file=f, temperature=0).text

        for i in range(2):  # warm-up
            transcribe(i)
        base = srv.base_url.removesuffix("/v1") + "/metrics"
        m0 = requests.get(base, timeout=30).text
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.concurrency) as pool:
            texts = list(pool.map(transcribe, range(a.requests)))
        wall = time.perf_counter() - t0
        m1 = requests.get(base, timeout=30).text
    n_req = metric_value(m1, "vllm_affinity:requests_total") - metric_value(m0, "vllm_affinity:requests_total")
    kept = metric_value(m1, "vllm_affinity:audio_tokens_after_input_total") - metric_value(
        m0, "vllm_affinity:audio_tokens_after_input_total")
    per_req = kept / n_req if n_req else 1500.0  # 'off' may not count: stock is 1500 frames
    sw = bool(cfg.input is not None and cfg.input.size_weighted)
    return {"spec": spec, "requests": a.requests, "concurrency": a.concurrency, "wall_s": wall,
            "transcriptions_per_s": a.requests / wall, "frames_per_request": per_req,
            "cross_kv_bytes_per_request": cross_attention_kv_bytes(model, round(per_req), sw),
            "empty_transcripts": sum(1 for t in texts if not t.strip())}


def main(argv: list[str] | None = None) -> int:
    from vllm_affinity_tools import asr
    from vllm_affinity_tools.checkpoints.ct2_whisper import CHECKPOINTS, ensure_checkpoint

    from benchmarks.report import write_report

    p = argparse.ArgumentParser(prog="python benchmarks/bench_whisper_serve.py")
    p.add_argument("--models", nargs="+", choices=list(CHECKPOINTS), default=["tiny.en", "base"])
    p.add_argument("--specs", nargs="+", default=DEFAULT_SPECS)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="suffix of the result files' stem (whisper_serve<tag>)")
    p.add_argument("--note", default="", help="what else ran on the machine (written into the footer)")
    a = p.parse_args(argv)
    command = "python benchmarks/bench_whisper_serve.py " + " ".join(
        f"'{x}'" if " " in x else x for x in (sys.argv[1:] if argv is None else argv))
    m = machine()
    clips = asr.corpus(ROOT / ".cache" / "accuracy-clips", 20)
    log_dir = ROOT / ".cache" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    results, rows = [], []
    for name in a.models:
        model = Path(ensure_checkpoint(name=name))
        stock = None
        for spec in a.specs:
            r = run_one(model, spec, clips, a, log_dir) | {"model": name}
            stock = stock or r
            r["speedup"] = r["transcriptions_per_s"] / stock["transcriptions_per_s"]
            r["cross_kv_share"] = r["cross_kv_bytes_per_request"] / stock["cross_kv_bytes_per_request"]
            results.append(r)
            print(f"{name} {spec}: {r['transcriptions_per_s']:.2f}/s ({r['speedup']:.2f}x), "
                  f"{r['frames_per_request']:.0f} frames, KV {r['cross_kv_share']:.3f} of stock", flush=True)
            rows.append([name, f"`{spec}`", f"{r['transcriptions_per_s']:.2f}", f"{r['speedup']:.2f}x",
                         f"{r['frames_per_request']:.0f}", f"{r['cross_kv_bytes_per_request'] / 2**10:.0f} KiB",
                         f"{r['cross_kv_share'] * 100:.1f}%", str(r["empty_transcripts"])])
    header = ["model", "SPEC", "transcriptions/s", "vs stock", "frames to the decoder (mean)",
              "cross-attn KV / request", "of stock", "empty transcripts"]
    foot = (f"{a.requests} transcriptions per cell (20 espeak-ng clips of the accuracy corpus, 2-16 s, cycled), "
            f"{a.concurrency} concurrent openai clients, after 2 warm-up requests; one server per cell, each "
            f"cell run once. {a.note} Cross-attention KV from the frames count (blocks of 128, fp32, size-weighted "
            "heads 80 wide).\n\n" + machine_line(m, command))
    write_report(a.out, f"whisper_serve{a.tag}", "Whisper through vllm serve: transcriptions/s and cross-attention KV",
                 header, rows, foot, {"machine": m, "command": command, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
