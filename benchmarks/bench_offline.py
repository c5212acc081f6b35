"""Offline prefill benchmark: stock vLLM vs vllm-affinity variants, same utterances, one run.

    python benchmarks/bench_offline.py [--shape scaled|7b] [--buckets 10 30] [--reps 3]
                                       [--variants stock off paper-aggressive input-only deep-only]
                                       [--rounds 2] [--out benchmarks/results]

Each variant runs in its own engine process (one engine at a time fits in memory);
rounds alternate the variant order (round 1 forward, round 2 reversed, ...). Inside a
process: one warm-up request per bucket, then ``--reps`` timed requests per bucket
with ``max_tokens=1`` (prefill isolated: encoder + LM prefill + first token). Every
request gets fresh low-level noise, so neither the processor cache nor the encoder
cache can serve it. Single process mode (VLLM_ENABLE_V1_MULTIPROCESSING=0), dummy
weights (``load_format="dummy"``), bf16 for the 7B shape.

Models (built under .cache/bench from configs/ and the tiny model's tokenizer and
processor, whose audio token id is patched into the config):
* ``7b``: Qwen2-Audio-7B-Instruct's shape (configs/models/qwen2-audio-7b-instruct);
* ``scaled``: the same architecture scaled down for quick runs: LM hidden 1024 (16
  heads of 64, 8 KV heads), 12 layers, MLP 2816; encoder d_model 512, 8 layers,
  8 heads, FFN 2048; vocab 156032 kept; fp32.

Writes ``offline_<shape>.json`` (raw runs), ``offline_<shape>.md`` (table: TTFT
median / p90, prompt tokens, audio tokens per stage, analytic prefill FLOPs and the
FLOPs-limit speed-up, KV bytes per request from the blocks the engine held, peak RSS,
ratios to stock) and, with matplotlib installed, ``offline_<shape>_ttft.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"
SPECS = {
    "stock": None,  # VLLM_PLUGINS="": the plugin is not loaded at all
    "off": "off",  # plugin loaded, every stage off: the plugin's overhead
    "paper-aggressive": "paper-aggressive",
    "input-only": "input-only",
    "deep-only": "deep-only",
}
SCALED = {
    "text_config": {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
                    "num_hidden_layers": 12, "intermediate_size": 2816},
    "audio_config": {"d_model": 512, "encoder_layers": 8, "encoder_attention_heads": 8, "encoder_ffn_dim": 2048},
}


def build_model(shape: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from vllm_affinity.demo import ensure_tiny_model

    tiny = ensure_tiny_model(ROOT / ".cache" / "tiny-qwen2-audio")
    out = CACHE / f"qwen2-audio-{shape}"
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((ROOT / "configs" / "models" / "qwen2-audio-7b-instruct" / "config.json").read_text())
    tiny_cfg = json.loads((tiny / "config.json").read_text())
    cfg["audio_token_index"] = tiny_cfg["audio_token_index"]
    cfg["text_config"]["bos_token_id"] = tiny_cfg["text_config"]["bos_token_id"]
    cfg["text_config"]["eos_token_id"] = tiny_cfg["text_config"]["eos_token_id"]
    if shape == "scaled":
        for part, values in SCALED.items():
            cfg[part].update(values)
        cfg["torch_dtype"] = cfg["text_config"]["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def make_clips(buckets: list[float]) -> dict[float, Path]:
    from vllm_affinity import speech

    clips = {}
    for i, s in enumerate(buckets):
        p = CACHE / f"speech-{s:g}s.wav"
        if not p.exists():
            speech.utterance(s, p, seed=i, sample_rate=16000)
        clips[s] = p
    return clips


# -- analytic FLOPs ------------------------------------------------------------------------
def lm_prefill_flops(cfg: dict, tokens: int, deep_layer: int | None = None, deep_tokens: int | None = None) -> float:
    """2 * params-FLOPs per token plus attention (QK^T and AV), per layer."""
    t = cfg["text_config"]
    h, inter, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    kv = t["num_key_value_heads"] * h // t["num_attention_heads"]
    per_token = 2 * (h * h + 2 * h * kv + h * h + 3 * h * inter)

    def layer(n):
        return per_token * n + 2 * 2 * h * n * n / 2  # causal attention: half the square

    if deep_layer is None:
        total = layers * layer(tokens)
    else:
        total = (deep_layer + 1) * layer(tokens) + (layers - deep_layer - 1) * layer(deep_tokens)
    return total + 2 * h * t["vocab_size"]  # lm_head on the last token


def encoder_flops(cfg: dict, positions: int) -> float:
    a = cfg["audio_config"]
    d, ffn, layers = a["d_model"], a["encoder_ffn_dim"], a["encoder_layers"]
    conv = 2 * (3 * 128 * d * positions * 2 + 3 * d * d * positions)
    per_layer = 2 * positions * (4 * d * d + 2 * d * ffn) + 2 * 2 * d * positions * positions
    return conv + layers * per_layer + 2 * d * cfg["text_config"]["hidden_size"] * positions // 2


# -- one engine process --------------------------------------------------------------------
def worker(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    import numpy as np
    import resource

    import soundfile as sf
    from vllm import LLM, SamplingParams

    kw = dict(dtype=job["dtype"], load_format="dummy", max_model_len=2048, enforce_eager=True,
              kv_cache_memory_bytes=job["kv_bytes"], block_size=32, enable_prefix_caching=False,
              limit_mm_per_prompt={"audio": 1})
    if job["spec"] is not None:
        kw["hf_overrides"] = {"affinity": job["spec"]}
    llm = LLM(job["model"], **kw)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    kvm = scheduler.kv_cache_manager
    page = sum(g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in kvm.kv_cache_config.kv_cache_groups)
    page_per_group = [g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in kvm.kv_cache_config.kv_cache_groups]
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat does the speaker say?<|im_end|>\n"
              "<|im_start|>assistant\n")
    rng = np.random.default_rng(job["seed"])
    out = {"variant": job["variant"], "buckets": {}, "page_bytes_all_groups": page}
    sp = SamplingParams(temperature=0, max_tokens=1)
    for secs, path in job["clips"].items():
        wave, sr = sf.read(path, dtype="float32")
        times = []
        for rep in range(job["reps"] + 1):  # first one is the warm-up
            noisy = wave + rng.normal(0, 1e-4, wave.shape).astype(np.float32)
            t0 = time.perf_counter()
            o = llm.generate([{"prompt": prompt, "multi_modal_data": {"audio": (noisy, sr)}}], sp, use_tqdm=False)[0]
            if rep:
                times.append(time.perf_counter() - t0)
        # KV actually held at the end of prefill: step a fresh request once, read the managers
        engine = llm.llm_engine
        engine.add_request("kv", {"prompt": prompt, "multi_modal_data": {"audio": (wave, sr)}},
                           SamplingParams(max_tokens=2))
        engine.step()
        rid = next(r for r in scheduler.requests if r.startswith("kv"))
        blocks = [len(m.req_to_blocks.get(rid, [])) for m in kvm.coordinator.single_type_managers]
        while engine.has_unfinished_requests():
            engine.step()
        out["buckets"][secs] = {
            "ttft_s": times,
            "prompt_tokens": len(o.prompt_token_ids),
            "kv_blocks_per_group": blocks,
            "kv_bytes": sum(b * p for b, p in zip(blocks, page_per_group)),
        }
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(job["out"]).write_text(json.dumps(out))


# -- driver --------------------------------------------------------------------------------
def audio_stages(spec, n: int, num_layers: int) -> tuple[int, int, int | None, bool]:
    from vllm_affinity.config import load_spec
    from vllm_affinity.pooling import num_kept

    cfg = load_spec(spec) if spec else load_spec("off")
    k_in = num_kept(n, cfg.input.keep_ratio) if cfg.input else n
    if cfg.deep:
        return k_in, num_kept(k_in, cfg.deep.keep_ratio), cfg.deep.resolve_layer(num_layers), cfg.encoder_real_length
    return k_in, k_in, None, cfg.encoder_real_length


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return 0
    p = argparse.ArgumentParser(prog="python benchmarks/bench_offline.py")
    p.add_argument("--shape", choices=["scaled", "7b"], default="scaled")
    p.add_argument("--buckets", type=float, nargs="+", default=[10.0, 30.0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--kv-gib", type=float, default=None, help="KV cache budget (default 1 GiB + margin for 7b)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tqdm import tqdm

    model = build_model(a.shape)
    cfg = json.loads((model / "config.json").read_text())
    clips = make_clips(a.buckets)
    kv_bytes = int((a.kv_gib or (1.0625 if a.shape == "7b" else 0.5)) * 2**30)
    dtype = "bfloat16" if a.shape == "7b" else "float32"
    runs = []
    order = list(a.variants)
    jobs = [(r, v) for r in range(a.rounds) for v in (order if r % 2 == 0 else order[::-1])]
    for rnd, variant in tqdm(jobs, desc=f"bench_offline {a.shape}", unit="engine"):
        job_path = CACHE / f"job-{variant}-{rnd}.json"
        out_path = CACHE / f"out-{variant}-{rnd}.json"
        job_path.write_text(json.dumps({
            "variant": variant, "spec": SPECS[variant], "model": str(model), "dtype": dtype, "kv_bytes": kv_bytes,
            "clips": {str(s): str(c) for s, c in clips.items()}, "reps": a.reps, "seed": rnd, "out": str(out_path),
        }))
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if variant == "stock":
            env["VLLM_PLUGINS"] = ""
        r = subprocess.run([sys.executable, __file__, "--worker", str(job_path)], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"variant {variant} failed")
        runs.append({"round": rnd, **json.loads(out_path.read_text())})

    # aggregate
    rows = []
    n_layers = cfg["text_config"]["num_hidden_layers"]
    for secs in a.buckets:
        n = int(secs * 25)
        per_variant = {}
        for variant in a.variants:
            rs = [r for r in runs if r["variant"] == variant]
            b = [r["buckets"][str(secs)] for r in rs]
            times = [t for x in b for t in x["ttft_s"]]
            k_in, k_deep, layer, real_len = audio_stages(SPECS[variant], n, n_layers)
            prompt = b[0]["prompt_tokens"]
            text = prompt - k_in
            positions = (int(secs * 100) + 4) // 2 if real_len else 1500
            flops = encoder_flops(cfg, positions) + lm_prefill_flops(
                cfg, prompt, layer, text + k_deep if layer is not None else None)
            per_variant[variant] = dict(
                median=statistics.median(times), p90=pct(times, 0.9), prompt=prompt, k_in=k_in, k_deep=k_deep,
                flops=flops, kv_bytes=b[0]["kv_bytes"], rss=max(r["peak_rss_gib"] for r in rs), n=len(times))
        stock = per_variant.get("stock")
        for variant, v in per_variant.items():
            row = {"bucket_s": secs, "variant": variant, **v}
            if stock:
                row["ttft_speedup"] = stock["median"] / v["median"]
                row["flops_limit_speedup"] = stock["flops"] / v["flops"]
                row["kv_ratio"] = v["kv_bytes"] / stock["kv_bytes"]
            rows.append(row)

    from benchmarks.report import write_report

    nan = float("nan")
    write_report(
        a.out, f"offline_{a.shape}", f"Offline prefill benchmark ({a.shape} shape)",
        ["audio", "variant", "TTFT median (s)", "p90 (s)", "prompt tokens", "audio tokens in→input→deep",
         "prefill GFLOP", "TTFT speed-up", "FLOPs-limit speed-up", "KV bytes/request", "KV vs stock",
         "peak RSS (GiB)"],
        [[f"{r['bucket_s']:g} s", r["variant"], f"{r['median']:.3f}", f"{r['p90']:.3f}", str(r["prompt"]),
          f"{int(r['bucket_s'] * 25)}→{r['k_in']}→{r['k_deep']}", f"{r['flops'] / 1e9:.1f}",
          f"{r.get('ttft_speedup', nan):.2f}x", f"{r.get('flops_limit_speedup', nan):.2f}x",
          f"{r['kv_bytes'] / 2**20:.2f} MiB", f"{r.get('kv_ratio', nan):.2f}", f"{r['rss']:.1f}"] for r in rows],
        f"{a.reps} timed requests x {a.rounds} rounds per cell after a warm-up; max_tokens=1; "
        f"2 CPU cores, single-process engine, dummy weights, {dtype}.",
        {"runs": runs, "rows": rows, "args": vars(a) | {"out": str(a.out)}},
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in a.variants:
            xs = [r["bucket_s"] for r in rows if r["variant"] == variant]
            ax.plot(xs, [r["median"] for r in rows if r["variant"] == variant], marker="o", label=variant)
        ax.set_xlabel("audio length (s)")
        ax.set_ylabel("TTFT median (s)")
        ax.set_title(f"TTFT vs audio length ({a.shape})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.out / f"offline_{a.shape}_ttft.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
