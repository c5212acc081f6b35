"""Offline prefill benchmark: stock vLLM vs vllm-affinity variants, same utterances, one run.

    python benchmarks/bench_offline.py [--shape scaled|7b|7b-fp32] [--buckets 10 30 60] [--reps 3]
                                       [--variants stock off windows-only paper-aggressive
                                                   paper-aggressive+encoder input-only deep-only]
                                       [--rounds 2] [--out benchmarks/results]

Each variant runs in its own engine process (one engine at a time fits in memory);
rounds alternate the variant order (round 1 forward, round 2 reversed, ...). Inside a
process: one warm-up request (a 2 s clip), then ``--reps`` timed requests per bucket:
TTFT = from ``add_request`` to the end of the engine step that produced the first token
(processor + encoder + LM prefill + first token); the KV blocks each KV-cache group holds
are read right then, from the same request. Every request gets fresh low-level noise, so
neither the processor cache nor the encoder cache can serve it. Single process mode
(VLLM_ENABLE_V1_MULTIPROCESSING=0), dummy weights (``load_format="dummy"``).
``windows-only`` is a baseline for audio over 30 s only: with ``stock`` in the run it is
timed on those buckets alone (below 30 s it is stock's computation).

Models (built under .cache/bench from configs/ and the tiny model's tokenizer and
processor, whose audio token id is patched into the config):
* ``7b``: Qwen2-Audio-7B-Instruct's shape (configs/models/qwen2-audio-7b-instruct), bf16;
  only where the CPU has native bf16 (avx512_bf16 / amx_bf16, or a matmul probe says bf16 is
  as fast as fp32). Elsewhere ``--shape 7b`` runs ``7b-fp32`` and says so;
* ``7b-fp32``: the 7B widths (LM hidden 4096, 32 heads, MLP 11008, vocabulary 156032; the
  whole 32-layer d=1280 audio encoder) with 8 LM layers, fp32 (about 14 GiB: fits 24 GiB).
  The deep merge keeps the paper's relative depth: after layer ``min(L - 2, round(29 L / 32))``
  (6 of 8, i.e. -2; the paper's 29 of 32);
* ``scaled``: the same architecture scaled down for quick runs: LM hidden 1024 (16
  heads of 64, 8 KV heads), 12 layers, MLP 2816; encoder d_model 512, 8 layers,
  8 heads, FFN 2048; vocab 156032 kept; fp32.

Audio over 30 s: stock Qwen2-Audio (and ``off``) truncate it to 30 s, so for such a bucket
the baseline of every ratio is ``windows-only`` (no pooling, every 30 s window encoded),
which the presets' ``long_audio: windows`` also use; the table says which baseline a row uses.

Also measured: the merge itself (affinity scores + grouping + mean pooling, both stages,
on random hidden states of the model's width and dtype, in the engine process) as a
fraction of the variant's TTFT; and the CPU time other processes used while each engine
ran (from /proc/stat minus the engine's own rusage), so a noisy machine shows.

Writes ``offline_<shape>.json`` (raw runs), ``offline_<shape>.md`` (table: TTFT
median / p90, prompt tokens, audio tokens per stage, analytic prefill FLOPs and the
FLOPs-limit speed-up, KV bytes per request from the blocks the engine held, peak RSS,
ratios to the baseline) and PNG plots (``bench`` extra: matplotlib): TTFT vs audio
length, KV bytes vs audio length, measured speed-up vs the FLOPs limit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    # no pooling, audio over 30 s encoded in 30 s windows: the baseline for audio that stock
    # Qwen2-Audio would truncate to 30 s (the 60 s bucket's speed-ups are against it)
    "windows-only": {"long_audio": "windows"},
    "paper-aggressive": "paper-aggressive",
    # + the encoder stage at the setting Whisper tiny.en supports (merge half the frames after
    # half the encoder's layers: E=1 of 4 there, +0.4 WER points; E=15 of Qwen2-Audio's 32)
    "paper-aggressive+encoder": {"preset": "paper-aggressive",
                                 "encoder": {"merge_layer": 15, "keep_ratio": 0.5}},
    "input-only": "input-only",
    "deep-only": "deep-only",
}
SCALED = {
    "text_config": {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
                    "num_hidden_layers": 12, "intermediate_size": 2816},
    "audio_config": {"d_model": 512, "encoder_layers": 8, "encoder_attention_heads": 8, "encoder_ffn_dim": 2048},
}
#: the 7B widths with fewer LM layers, fp32: for CPUs without native bf16
SEVEN_B_FP32 = {"text_config": {"num_hidden_layers": 8}}
SHAPES = ("scaled", "7b", "7b-fp32")
PAPER_LAYERS, PAPER_MERGE_LAYER = 32, 29


def paper_merge_layer(num_layers: int) -> int:
    """The paper's deep merge layer (29 of 32) at the same relative depth for ``num_layers``."""
    return min(num_layers - 2, round(PAPER_MERGE_LAYER * num_layers / PAPER_LAYERS))


def runnable_shape(shape: str, cpu: dict) -> str:
    """``shape``, or ``7b-fp32`` for ``7b`` on a CPU without native bf16 (there a bf16 7B
    engine never reaches its first token: bf16 matmuls hundreds of times slower than fp32)."""
    if shape == "7b" and not (cpu["bf16_native"] or cpu.get("bf16_fast")):
        print(f"no native bf16 ({cpu['bf16_basis']}): running --shape 7b-fp32 instead (7B widths, "
              f"{SEVEN_B_FP32['text_config']['num_hidden_layers']} LM layers, the whole audio encoder, fp32)")
        return "7b-fp32"
    return shape


def shape_dtype(shape: str) -> str:
    return "bfloat16" if shape == "7b" else "float32"


def resolve_spec(variant: str, num_layers: int, encoder_layers: int):
    """The variant's SPEC as a dict for a model of ``num_layers`` LM layers (None: stock).
    Presets are read from configs/; the deep merge layer is moved to the paper's relative
    depth when the model is shallower than 32 layers; the encoder stage's layer is scaled
    to the encoder's depth (15 of 32)."""
    import yaml

    spec = SPECS[variant]
    if spec is None or spec == "off":
        return spec
    if isinstance(spec, str):
        spec = {"preset": spec}
    spec = dict(spec)
    out = {}
    if "preset" in spec:
        out = yaml.safe_load((ROOT / "configs" / f"{spec.pop('preset')}.yaml").read_text())
    out.update(spec)
    if out.get("deep") and num_layers != PAPER_LAYERS:
        out["deep"] = {**out["deep"], "merge_layer": paper_merge_layer(num_layers)}
    if out.get("encoder") and encoder_layers != 32:
        out["encoder"] = {**out["encoder"], "merge_layer": min(encoder_layers - 2, encoder_layers // 2 - 1)}
    return out


def build_model(shape: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from vllm_affinity_tools.demo import ensure_tiny_model

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
    if shape in ("scaled", "7b-fp32"):
        for part, values in (SCALED if shape == "scaled" else SEVEN_B_FP32).items():
            cfg[part].update(values)
        cfg["torch_dtype"] = cfg["text_config"]["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def make_clips(buckets: list[float]) -> dict[float, Path]:
    from vllm_affinity_tools import speech

    clips = {}
    for i, s in enumerate(buckets):
        p = CACHE / f"speech-{s:g}s.wav"
        if not p.exists():
            speech.utterance(s, p, seed=i, sample_rate=16000)
        clips[s] = p
    return clips


# -- analytic FLOPs and KV: vllm_affinity.accounting (the one definition) ----------------------
def lm_prefill_flops(cfg: dict, tokens: int, deep_layer: int | None = None, deep_tokens: int | None = None) -> float:
    from vllm_affinity.accounting import lm_prefill_flops as flops

    return flops(cfg["text_config"], tokens, deep_layer, deep_tokens)


def encoder_flops(cfg: dict, positions: int, merge_layer: int | None = None, merged: int | None = None) -> float:
    from vllm_affinity.accounting import whisper_encoder_flops

    return whisper_encoder_flops(cfg["audio_config"], positions, cfg["text_config"]["hidden_size"],
                                 merge_layer=merge_layer, merged=merged)


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
    engine = llm.llm_engine

    def timed(wave, sr, rid):
        """Seconds to the first token of one fresh request, and the KV blocks it holds then."""
        noisy = wave + rng.normal(0, 1e-4, wave.shape).astype(np.float32)
        t0 = time.perf_counter()
        engine.add_request(rid, {"prompt": prompt, "multi_modal_data": {"audio": (noisy, sr)}},
                           SamplingParams(temperature=0, max_tokens=2))
        prompt_tokens = None
        while prompt_tokens is None:
            for o in engine.step():
                if o.request_id == rid and o.outputs and o.outputs[0].token_ids:
                    prompt_tokens = len(o.prompt_token_ids)
        ttft = time.perf_counter() - t0
        rid_int = next(r for r in scheduler.requests if r.startswith(rid))
        blocks = [len(m.req_to_blocks.get(rid_int, [])) for m in kvm.coordinator.single_type_managers]
        while engine.has_unfinished_requests():
            engine.step()
        return ttft, prompt_tokens, blocks

    warm, warm_sr = sf.read(job["warmup_clip"], dtype="float32")
    timed(warm, warm_sr, "warmup")
    for secs, path in job["clips"].items():
        wave, sr = sf.read(path, dtype="float32")
        times = []
        for rep in range(job["reps"]):
            ttft, prompt_tokens, blocks = timed(wave, sr, f"b{secs}-{rep}")
            times.append(ttft)
        out["buckets"][secs] = {
            "ttft_s": times,
            "prompt_tokens": prompt_tokens,
            "kv_blocks_per_group": blocks,
            "kv_bytes": sum(b * p for b, p in zip(blocks, page_per_group)),
        }
    out["merge_s"] = merge_timings(job, llm)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(job["out"]).write_text(json.dumps(out))


def merge_timings(job: dict, llm) -> dict[str, float]:
    """Seconds the merge itself takes per bucket (both stages; median of 5): affinity
    scores, exact-count grouping and mean pooling on random states of the LM's width
    and dtype, shaped as this variant's spans. Same functions the model calls."""
    import torch

    from vllm_affinity import pooling

    if job["spec"] is None:
        return {}
    hf = llm.llm_engine.model_config.hf_config
    hidden = hf.text_config.hidden_size
    dtype = torch.bfloat16 if job["dtype"] == "bfloat16" else torch.float32
    out = {}
    for secs in job["clips"]:
        st = audio_stages(job["spec"], float(secs), hf.text_config.num_hidden_layers)
        k_in, k_deep = st["k_in"], st["k_deep"]
        cfg = load_cfg(job["spec"])
        x_in = torch.randn(st["k_enc"], hidden, dtype=dtype)
        x_deep = torch.randn(k_in, hidden, dtype=dtype)
        x_enc = [torch.randn(p, hf.audio_config.d_model, dtype=dtype) for p in st["real_positions"]]
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            if cfg.encoder is not None:
                for x, m in zip(x_enc, st["merged"]):
                    pooling.merge(x, pooling.group_sizes(x, m, cfg.encoder.method, cfg.encoder.window))
            if cfg.input is not None:
                pooling.merge(x_in, pooling.group_sizes(x_in, k_in, cfg.input.method, cfg.input.window))
            if cfg.deep is not None:
                pooling.merge(x_deep, pooling.group_sizes(x_deep, k_deep, cfg.deep.method, cfg.deep.window))
            times.append(time.perf_counter() - t0)
        out[secs] = statistics.median(times)
    return out


def cpu_busy_jiffies() -> int:
    """All CPUs' busy time so far (user+nice+system+irq+softirq+steal), in clock ticks."""
    f = open("/proc/stat").readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return user + nice + system + irq + softirq + steal


# -- driver --------------------------------------------------------------------------------
def load_cfg(spec):
    from vllm_affinity.config import load_spec

    return load_spec(spec if spec is not None else "off")


def audio_stages(spec, secs: float, num_layers: int) -> dict:
    """Token counts of one audio of ``secs`` seconds through the stages: ``n`` (stock
    tokens), ``k_enc`` (after the encoder stage), ``k_in`` (input stage), ``k_deep`` (deep
    stage), ``deep_layer``; per window ``positions`` (encoder positions after conv2 the first
    layers see), ``real_positions`` and ``merged`` (positions after the encoder stage, or None)."""
    from vllm_affinity.pooling import num_kept

    from vllm_affinity.encoder import MARGIN, encoder_output_lengths, encoder_stage_tokens, window_mel_frames

    cfg = load_cfg(spec)
    frames = window_mel_frames(int(round(secs * 16000)), windows=cfg.long_audio == "windows")
    n = sum(encoder_output_lengths(f)[1] for f in frames)
    enc = cfg.encoder
    # encoder positions (after conv2): the whole 30 s window (1500), or on the real length (the
    # switch, or the encoder stage) the real frames + margin (as vllm_affinity.encoder does)
    real_length = cfg.encoder_real_length or enc is not None
    positions = [(min(3000, f + MARGIN + (f + MARGIN) % 2) - 1) // 2 + 1 if real_length else 1500 for f in frames]
    merged = [2 * encoder_stage_tokens(f, enc.keep_ratio) for f in frames] if enc else [None] * len(frames)
    k_enc = sum(m // 2 for m in merged) if enc else n
    k_in = num_kept(k_enc, cfg.input.keep_ratio) if cfg.input else k_enc
    deep_layer = cfg.deep.resolve_layer(num_layers) if cfg.deep else None
    return dict(n=n, k_enc=k_enc, k_in=k_in, k_deep=num_kept(k_in, cfg.deep.keep_ratio) if cfg.deep else k_in,
                deep_layer=deep_layer, positions=positions, merged=merged,
                real_positions=[encoder_output_lengths(f)[0] for f in frames])


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return 0
    p = argparse.ArgumentParser(prog="python benchmarks/bench_offline.py")
    p.add_argument("--shape", choices=list(SHAPES), default="scaled")
    p.add_argument("--buckets", type=float, nargs="+", default=[10.0, 30.0, 60.0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--kv-gib", type=float, default=None, help="KV cache budget (default 1 GiB + margin for 7b)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tqdm import tqdm

    # machines of our kind differ: without native bf16 (avx512_bf16 / amx) a bf16 7B engine never
    # reaches its first token (bf16 matmuls hundreds of times slower than fp32): refuse, and say what runs
    from benchmarks.bench_models import probe_cpu

    cpu = probe_cpu()
    print(f"CPU: {cpu['cpu_model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags_found']) or '-'}; "
          f"bf16 native: {cpu['bf16_native']} ({cpu['bf16_basis']})")
    a.shape = runnable_shape(a.shape, cpu)
    a.cpu = cpu
    model = build_model(a.shape)
    cfg = json.loads((model / "config.json").read_text())
    clips = make_clips(a.buckets)
    kv_bytes = int((a.kv_gib or (1.0625 if a.shape.startswith("7b") else 0.5)) * 2**30)
    dtype = shape_dtype(a.shape)
    n_layers = cfg["text_config"]["num_hidden_layers"]
    a.specs = {v: resolve_spec(v, n_layers, cfg["audio_config"]["encoder_layers"]) for v in a.variants}
    warmup_clip = make_clips([2.0])[2.0]
    runs = []
    order = list(a.variants)
    jobs = [(r, v) for r in range(a.rounds) for v in (order if r % 2 == 0 else order[::-1])]
    for rnd, variant in tqdm(jobs, desc=f"bench_offline {a.shape}", unit="engine"):
        job_path = CACHE / f"job-{variant}-{rnd}.json"
        out_path = CACHE / f"out-{variant}-{rnd}.json"
        job_path.write_text(json.dumps({
            "variant": variant, "spec": a.specs[variant], "model": str(model), "dtype": dtype, "kv_bytes": kv_bytes,
            "clips": {str(s): str(c) for s, c in clips.items() if timed_bucket(a, variant, s)},
            "warmup_clip": str(warmup_clip), "reps": a.reps, "seed": rnd, "out": str(out_path),
        }))
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if variant == "stock":
            env["VLLM_PLUGINS"] = ""
        busy0, t0 = cpu_busy_jiffies(), time.monotonic()
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run([sys.executable, __file__, "--worker", str(job_path)], env=env,
                           capture_output=True, text=True)
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall, busy = time.monotonic() - t0, (cpu_busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")
        own = (child1.ru_utime - child0.ru_utime) + (child1.ru_stime - child0.ru_stime)
        if r.returncode != 0:
            print(r.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"variant {variant} failed")
        # CPU seconds used by anything but this engine while it ran, per second of wall time
        other = max(0.0, busy - own) / wall
        runs.append({"round": rnd, **json.loads(out_path.read_text()), "wall_s": wall,
                     "engine_cpu_s": own, "other_cpu_per_s": other})
        tqdm.write(f"{variant} (round {rnd}): {wall:.0f} s, other processes used {other:.2f} CPU")

    rows = aggregate(a, cfg, runs)
    write_outputs(a, rows, runs, dtype)
    return 0


def timed_bucket(a, variant: str, secs: float) -> bool:
    """``windows-only`` is the baseline above 30 s; below, it is stock's computation."""
    return not (variant == "windows-only" and "stock" in a.variants and secs <= 30)


def aggregate(a, cfg: dict, runs: list[dict]) -> list[dict]:
    rows = []
    n_layers = cfg["text_config"]["num_hidden_layers"]
    for secs in a.buckets:
        per_variant = {}
        for variant in a.variants:
            if not timed_bucket(a, variant, secs):
                continue
            rs = [r for r in runs if r["variant"] == variant]
            b = [r["buckets"][str(secs)] for r in rs]
            times = [t for x in b for t in x["ttft_s"]]
            st = audio_stages(a.specs[variant], secs, n_layers)
            layer, k_in, k_deep = st["deep_layer"], st["k_in"], st["k_deep"]
            enc = load_cfg(a.specs[variant]).encoder
            enc_layer = enc.resolve_layer(cfg["audio_config"]["encoder_layers"]) if enc else None
            prompt = b[0]["prompt_tokens"]
            text = prompt - k_in
            flops = sum(encoder_flops(cfg, p, enc_layer, m) for p, m in zip(st["positions"], st["merged"])) + \
                lm_prefill_flops(cfg, prompt, layer, text + k_deep if layer is not None else None)
            merge = [r["merge_s"][str(secs)] for r in rs if r.get("merge_s")]
            median = statistics.median(times)
            per_variant[variant] = dict(
                median=median, p90=pct(times, 0.9), prompt=prompt, n=st["n"], k_enc=st["k_enc"], k_in=k_in,
                k_deep=k_deep, windows=len(st["positions"]), flops=flops, kv_bytes=b[0]["kv_bytes"],
                rss=max(r["peak_rss_gib"] for r in rs), reps=len(times),
                merge_fraction=statistics.median(merge) / median if merge else None,
                other_cpu=max(r["other_cpu_per_s"] for r in rs))
        # the baseline sees the whole audio: stock up to 30 s, windows-only above
        base_name = "stock" if secs <= 30 or "windows-only" not in per_variant else "windows-only"
        base = per_variant.get(base_name)
        for variant, v in per_variant.items():
            truncated = secs > 30 and load_cfg(a.specs[variant]).long_audio != "windows"
            row = {"bucket_s": secs, "variant": variant, **v, "baseline": base_name if base else None,
                   "truncated": truncated}
            if base and not truncated:  # a truncated run answers another question: no ratio
                row["ttft_speedup"] = base["median"] / v["median"]
                row["flops_limit_speedup"] = base["flops"] / v["flops"]
                row["kv_ratio"] = v["kv_bytes"] / base["kv_bytes"]
                row["kv_ratio_analytic"] = kv_layer_blocks(v, layer_of(a, variant), n_layers) / \
                    kv_layer_blocks(base, layer_of(a, base_name), n_layers)
            rows.append(row)
    return rows


def layer_of(a, variant: str) -> int | None:
    cfg = load_cfg(a.specs[variant])
    return cfg.deep.merge_layer if cfg.deep else None


def kv_layer_blocks(v: dict, merge_layer: int | None, n_layers: int, block: int = 32) -> int:
    """Analytic KV of one prefilled request in (layer x block) units, as vLLM groups the
    layers into KV-cache groups (padding included): :mod:`vllm_affinity.accounting`."""
    from vllm_affinity.accounting import KVLayout, RequestTokens

    layout = KVLayout(n_layers, None if merge_layer is None else merge_layer % n_layers)
    tokens = RequestTokens(v["prompt"], v["n"], v["k_in"], v["k_deep"])
    return layout.layer_blocks(tokens.prompt, tokens.deep_prompt, block)


def write_outputs(a, rows: list[dict], runs: list[dict], dtype: str) -> None:
    from benchmarks.report import write_report

    nan = float("nan")

    def f(x, fmt):
        return "–" if x is None or x != x else format(x, fmt)

    write_report(
        a.out, f"offline_{a.shape}", f"Offline prefill benchmark ({a.shape} shape)",
        ["audio", "variant", "TTFT median (s)", "p90 (s)", "prompt tokens", "audio tokens in→(encoder stage→)input→deep",
         "prefill GFLOP (incl. encoder)", "baseline", "TTFT speed-up", "FLOPs-limit speed-up", "of limit",
         "KV bytes/request", "KV vs baseline (analytic)", "merge / TTFT", "peak RSS (GiB)", "other CPU"],
        [[f"{r['bucket_s']:g} s", r["variant"] + (" (first 30 s only)" if r["truncated"] else ""), f"{r['median']:.3f}", f"{r['p90']:.3f}", str(r["prompt"]),
          f"{r['n']}→" + (f"{r['k_enc']}→" if r["k_enc"] != r["n"] else "") + f"{r['k_in']}→{r['k_deep']}"
          + (f" ({r['windows']} windows)" if r["windows"] > 1 else ""),
          f"{r['flops'] / 1e9:.1f}", r["baseline"] or "–",
          f(r.get("ttft_speedup"), ".2f") + "x", f(r.get("flops_limit_speedup"), ".2f") + "x",
          f((r.get("ttft_speedup", nan) - 1) / (r.get("flops_limit_speedup", nan) - 1) * 100
            if r.get("flops_limit_speedup", 1) > 1.001 else None, ".0f") + "%",
          f"{r['kv_bytes'] / 2**20:.2f} MiB",
          f(r.get("kv_ratio"), ".3f") + f" ({f(r.get('kv_ratio_analytic'), '.3f')})",
          f(r["merge_fraction"] * 100 if r["merge_fraction"] is not None else None, ".2f") + "%",
          f"{r['rss']:.1f}", f"{r['other_cpu']:.2f}"] for r in rows],
        f"{a.reps} timed requests x {a.rounds} rounds per cell after one warm-up request (2 s clip); TTFT to the "
        "first token's engine step; audio tokens in→(encoder stage→)input→deep; "
        f"2 CPU cores, single-process engine, dummy weights, {dtype}. Baseline: stock vLLM up to 30 s; "
        "above 30 s stock truncates the audio, so the baseline is `windows-only` (no pooling, every "
        "30 s window encoded). 'of limit' = (speed-up - 1) / (FLOPs limit - 1). 'merge / TTFT': "
        "similarity + grouping + pooling of both stages, timed alone, over the variant's TTFT. "
        "'other CPU': CPUs used by other processes while the engine ran (max over rounds). "
        f"CPU: {a.cpu['cpu_model']}, {a.cpu['cores']} cores, bf16 native: {a.cpu['bf16_native']} "
        f"({a.cpu['bf16_basis']}).",
        {"runs": runs, "rows": rows, "args": vars(a) | {"out": str(a.out)}},
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install -e '.[bench]')")
        return
    for key, ylabel, stem, scale in (("median", "TTFT median (s)", "ttft", 1),
                                     ("kv_bytes", "KV cache per request (MiB)", "kv", 2**20)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in a.variants:
            sel = [r for r in rows if r["variant"] == variant and not r["truncated"]]
            ax.plot([r["bucket_s"] for r in sel], [r[key] / scale for r in sel], marker="o", label=variant)
        ax.set_xlabel("audio length (s)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs audio length ({a.shape} shape)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.out / f"offline_{a.shape}_{stem}.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    sel = [r for r in rows if r.get("ttft_speedup") and r["variant"] != r["baseline"]]
    for variant in sorted({r["variant"] for r in sel}):
        pts = [r for r in sel if r["variant"] == variant]
        ax.scatter([r["flops_limit_speedup"] for r in pts], [r["ttft_speedup"] for r in pts], label=variant)
        for r in pts:
            ax.annotate(f"{r['bucket_s']:g}s", (r["flops_limit_speedup"], r["ttft_speedup"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    if sel:
        hi = max(max(r["flops_limit_speedup"] for r in sel), max(r["ttft_speedup"] for r in sel)) * 1.05
        ax.plot([0.9, hi], [0.9, hi], "k--", lw=0.8, label="= FLOPs limit")
    ax.set_xlabel("analytic FLOPs-limit speed-up")
    ax.set_ylabel("measured TTFT speed-up")
    ax.set_title(f"Measured speed-up vs FLOPs limit ({a.shape} shape)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out / f"offline_{a.shape}_speedup.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
