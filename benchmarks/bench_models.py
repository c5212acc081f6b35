"""Offline prefill benchmark of the newly adapted architectures at full size, dummy weights.

    python benchmarks/bench_models.py [--model omni-7b qwen3asr-1.7b] [--buckets 10 30] [--reps 2]
                                      [--rounds 1] [--variants stock paper-aggressive [input-only]]
                                      [--scaled] [--dtype auto|bfloat16|float32]
                                      [--text-layers N --encoder-layers M] [--out benchmarks/results]

The sibling of ``bench_offline.py`` (Qwen2-Audio) for the architectures added on the
adapter, same method and same report: one engine process per variant
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``; ``stock`` runs with ``VLLM_PLUGINS=""``, the plugin
not loaded at all), one warm-up request per bucket, then ``--reps`` timed requests with
``max_tokens=1`` and fresh 1e-4 noise (no processor or encoder cache can serve them), KV
blocks read from the scheduler's KV-cache managers after one ``engine.step()`` of a fresh
request, dummy weights (``load_format="dummy"``), prefix caching off, ``max_model_len`` 2048,
a small KV budget (``kv_cache_memory_bytes``), one engine at a time, each under a timeout.

Models (``--model``), their full-size configs in ``configs/models/<name>/config.json``
(which values come from where: the ``_sources`` key there); the benchmark model dir
``.cache/bench/<name>[-scaled]/`` holds that config, with the tiny checkpoint's special token
ids patched in, and the tiny checkpoint's tokenizer / processor files (no weights):

* ``omni-7b``: Qwen2.5-Omni-7B's thinker (registry name ``Qwen2_5OmniModel``), tokenizer
  from ``.cache/tiny-qwen25omni``; the vision tower is not loaded (image and video limits 0);
  25 audio tokens per second (Qwen2-Audio's arithmetic; vLLM does not truncate at 30 s);
* ``qwen3asr-1.7b``: Qwen3-ASR-1.7B (``Qwen3ASRForConditionalGeneration``), tokenizer from
  ``.cache/tiny-qwen3asr``; 13 audio tokens per 100 mel frames.

The prompt is the tiny builder's ``prompt(question)`` (the model's chat prompt, one audio).

CPU and dtype: the CPU is probed first (``/proc/cpuinfo`` flags ``avx512_bf16`` /
``amx_bf16``: bf16 is native; otherwise a short bf16 vs fp32 matmul is timed, under a
timeout). bf16 when native (or measured no slower than 0.8x fp32), else fp32; when the
chosen dtype does not fit the memory budget (an estimate: weights + KV budget + 3.5 GiB), the
text and encoder layer counts are scaled down by the same factor until it fits, and a deep
stage's merge layer keeps its relative depth (the preset's SPEC is passed as an object with
``deep.merge_layer`` moved). The CPU model, flags found, dtype and layer counts go into the
JSON and the markdown footer.

``--scaled``: the same architectures scaled down for a quick end-to-end check (text 4
layers, hidden 512 = 4 heads of 128, 2 KV heads, MLP 1536; audio encoder 4 layers, d_model
256, 4 heads, FFN 1024; fp32; merge layer at the same relative depth).

Per cell: TTFT median / p90, prompt tokens (the engine's), audio tokens stock -> after the
input stage -> above the merge layer (the processor's arithmetic and
``vllm_affinity.pooling.num_kept``, checked against the engine's prompt length), analytic
prefill GFLOP (``vllm_affinity.accounting.lm_prefill_flops`` on the text config plus an
approximate audio-encoder count, the same for every variant here since these adapters run
the encoder as stock) and the FLOPs-limit speed-up, KV bytes per request from the blocks the
engine held and its ratio to stock (analytic in brackets, ``accounting.KVLayout``), the
merge's own time over TTFT, peak RSS, CPU used by other processes, ratios to stock.

Writes ``offline_<model>[_scaled].json`` (raw runs, CPU probe, shapes), ``.md`` (table) and,
with matplotlib, ``_ttft.png``, ``_kv.png``, ``_speedup.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_offline import cpu_busy_jiffies, load_cfg, make_clips, pct

CACHE = ROOT / ".cache" / "bench"
QUESTION = "What does the speaker say?"
VARIANTS = {  # variant -> preset (None: stock vLLM, the plugin not loaded)
    "stock": None,
    "off": "off",
    "input-only": "input-only",
    "paper-aggressive": "paper-aggressive",
    "deep-only": "deep-only",
}
SCALED_TEXT = {"hidden_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
               "intermediate_size": 1536}
SCALED_AUDIO = {"d_model": 256, "encoder_layers": 4, "encoder_attention_heads": 4, "encoder_ffn_dim": 1024,
                "output_dim": 512}
RUNTIME_GIB = 3.5  # RSS beyond weights and KV (bench_offline's 7B: 20.2 GiB peak for 15.6 GiB of weights)


@dataclass(frozen=True)
class Model:
    key: str  # --model
    name: str  # configs/models/<name>
    title: str
    tiny: str  # tiny checkpoint under .cache: tokenizer, processor, token ids
    builder: str  # vllm_affinity_tools module with prompt(question)
    nested: str | None  # key of the sub-config holding text_config / audio_config
    ids: tuple[str, ...]  # token-id keys of that sub-config copied from the tiny checkpoint
    limit_mm: dict = field(default_factory=dict)
    scaled_extra: dict = field(default_factory=dict)  # more scaled overrides: part -> values


MODELS = {
    "omni-7b": Model(
        "omni-7b", "qwen2.5-omni-7b", "Qwen2.5-Omni-7B (thinker)", "tiny-qwen25omni", "tiny_qwen25omni",
        "thinker_config",
        ("audio_token_index", "image_token_index", "video_token_index", "audio_start_token_id",
         "audio_end_token_id", "vision_start_token_id", "vision_end_token_id", "user_token_id",
         "pad_token_id", "eos_token_id"),
        limit_mm={"audio": 1, "image": 0, "video": 0},  # audio-only prompts: no vision tower
        scaled_extra={"vision_config": {"depth": 2, "hidden_size": 128, "intermediate_size": 256, "num_heads": 2,
                                        "fullatt_block_indexes": [1], "out_hidden_size": 512}},
    ),
    "qwen3asr-1.7b": Model(
        "qwen3asr-1.7b", "qwen3-asr-1.7b", "Qwen3-ASR-1.7B", "tiny-qwen3asr", "tiny_qwen3asr", None,
        ("audio_token_id", "pad_token_id", "eos_token_id"),
        limit_mm={"audio": 1},
        scaled_extra={"audio_config": {"downsample_hidden_size": 64}},
    ),
}


def sub(cfg: dict, model: Model) -> dict:
    """The (thinker) config holding text_config and audio_config."""
    return cfg[model.nested] if model.nested else cfg


# -- CPU probe -----------------------------------------------------------------------------
MATMUL = """
import json, time, torch
torch.manual_seed(0)
out = {}
for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
    a, b = torch.randn(1024, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    out[name] = 5 * 2 * 1024 ** 3 / (time.perf_counter() - t0) / 1e9
print(json.dumps(out))
"""


def probe_cpu(timeout_s: float = 120.0, cpuinfo: str | None = None) -> dict:
    """CPU model, bf16-relevant flags and whether bf16 is native (flags, else a timed matmul)."""
    model_name, flags = "unknown", set()
    try:
        for line in (cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()).splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model_name == "unknown":
                model_name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "avx512f", "avx2")
    found = [f for f in wanted if f in flags]
    out = {"cpu_model": model_name, "flags_found": found, "cores": os.cpu_count(),
           "bf16_native": "avx512_bf16" in flags or "amx_bf16" in flags, "matmul_gflops": None}
    if out["bf16_native"]:
        out["bf16_basis"] = "cpuinfo flag " + ("amx_bf16" if "amx_bf16" in flags else "avx512_bf16")
        return out
    try:
        r = subprocess.run([sys.executable, "-c", MATMUL], capture_output=True, text=True, timeout=timeout_s,
                           check=False)
        g = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    except (subprocess.TimeoutExpired, IndexError, ValueError):
        g = None
    out["matmul_gflops"] = g
    if g and g["bfloat16"] >= 0.8 * g["float32"]:
        out["bf16_fast"] = True
        out["bf16_basis"] = f"no bf16 flag; bf16 matmul {g['bfloat16']:.0f} GFLOP/s vs fp32 {g['float32']:.0f}"
    else:
        out["bf16_fast"] = False
        out["bf16_basis"] = ("no bf16 flag; bf16 matmul " + (f"{g['bfloat16']:.0f} GFLOP/s vs fp32 {g['float32']:.0f}"
                             if g else f"timed out or failed ({timeout_s:.0f} s)"))
    return out


def mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 16.0


# -- shapes, parameters, layers ------------------------------------------------------------
def param_counts(cfg: dict, model: Model) -> dict[str, float]:
    """Parameters: fixed (embeddings, lm_head, projector), per text layer, per encoder layer
    (the vision tower is not loaded: image / video limits are 0)."""
    s = sub(cfg, model)
    t, a = s["text_config"], s["audio_config"]
    h, inter, heads, kv = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"], t["num_key_value_heads"]
    hd = t.get("head_dim") or h // heads
    text_layer = h * heads * hd * 2 + 2 * h * kv * hd + 3 * h * inter
    tied = t.get("tie_word_embeddings", False)
    fixed = t["vocab_size"] * h * (1 if tied else 2)
    d, ffn = a["d_model"], a["encoder_ffn_dim"]
    enc_layer = 4 * d * d + 2 * d * ffn
    if model.key == "omni-7b":
        fixed += 3 * a["num_mel_bins"] * d + 3 * d * d + d * a["output_dim"]
    else:
        c = a["downsample_hidden_size"]
        fixed += 9 * c + 2 * 9 * c * c + c * (a["num_mel_bins"] // 8) * d + d * d + d * a["output_dim"]
    return {"fixed": fixed, "text_layer": text_layer, "enc_layer": enc_layer}


def estimate_gib(cfg: dict, model: Model, dtype_bytes: int, text_layers: int, enc_layers: int, kv_gib: float) -> float:
    p = param_counts(cfg, model)
    weights = p["fixed"] + text_layers * p["text_layer"] + enc_layers * p["enc_layer"]
    return weights * dtype_bytes / 2**30 + kv_gib + RUNTIME_GIB


def fit_layers(cfg: dict, model: Model, dtype_bytes: int, kv_gib: float, budget_gib: float) -> tuple[int, int]:
    """Largest (text, encoder) layer counts, scaled by one factor, that fit the budget."""
    s = sub(cfg, model)
    L, E = s["text_config"]["num_hidden_layers"], s["audio_config"]["encoder_layers"]
    for i in range(100, 0, -1):
        f = i / 100
        lt, le = max(4, round(L * f)), max(1, round(E * f))
        if estimate_gib(cfg, model, dtype_bytes, lt, le, kv_gib) <= budget_gib:
            return lt, le
    return 4, 1


def set_layers(cfg: dict, model: Model, text_layers: int, enc_layers: int) -> None:
    s = sub(cfg, model)
    s["text_config"]["num_hidden_layers"] = text_layers
    s["text_config"].pop("layer_types", None)
    s["audio_config"]["encoder_layers"] = enc_layers


def build_model(model: Model, *, scaled: bool, dtype: str, text_layers: int | None, enc_layers: int | None) -> Path:
    """The benchmark model dir: the full-size (or scaled) config with the tiny checkpoint's
    token ids, and the tiny checkpoint's tokenizer / processor files. Rewritten every run
    (cheap), so a changed layer count or dtype never reads a stale config."""
    tiny = ROOT / ".cache" / model.tiny
    if not (tiny / "tokenizer.json").exists():
        raise SystemExit(f"{tiny} missing: build it with python -m vllm_affinity_tools.{model.builder} {tiny}")
    out = CACHE / (model.name + ("-scaled" if scaled else ""))
    out.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors") and not f.name.startswith("."):
            shutil.copy(f, out / f.name)
    cfg = json.loads((ROOT / "configs" / "models" / model.name / "config.json").read_text())
    cfg.pop("_sources", None)
    tiny_cfg = json.loads((tiny / "config.json").read_text())
    s, ts = sub(cfg, model), sub(tiny_cfg, model)
    for key in model.ids:
        s[key] = ts[key]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        s["text_config"][key] = ts["text_config"][key]
    if scaled:
        s["text_config"].update(SCALED_TEXT)
        s["audio_config"].update(SCALED_AUDIO)
        for part, values in model.scaled_extra.items():
            s[part].update(values)
    if text_layers is not None or enc_layers is not None:
        set_layers(cfg, model, text_layers or s["text_config"]["num_hidden_layers"],
                   enc_layers or s["audio_config"]["encoder_layers"])
    s["text_config"].pop("layer_types", None)
    cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


# -- SPECs and token counts ----------------------------------------------------------------
def spec_for(variant: str, layers: int, full_layers: int):
    """The variant's server SPEC: the preset name, or at a reduced depth the preset as an
    object whose deep merge layer keeps its relative depth."""
    preset = VARIANTS[variant]
    if preset is None:
        return None
    cfg = load_cfg(preset)
    if cfg.deep is None or layers == full_layers:
        return preset
    import yaml

    from vllm_affinity.config import presets_dir

    data = yaml.safe_load((presets_dir() / f"{preset}.yaml").read_text())
    full = cfg.deep.resolve_layer(full_layers)
    data["deep"]["merge_layer"] = min(max(round((full + 1) / full_layers * layers) - 1, 0), layers - 2)
    return data


def stock_audio_tokens(model: Model, samples: int, fe: dict) -> int:
    """Placeholders stock vLLM puts in the prompt for one audio (the adapters' stock_tokens)."""
    hop = int(fe["hop_length"])
    if model.key == "omni-7b":  # the mask's frames (see mel_frames), then conv2 and the pool (Qwen2-Audio's)
        frames = mel_frames(model, samples, fe)
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1
    frames = max(samples, int(fe.get("min_length", 0))) // hop  # Qwen3-ASR: 13 per 100 frames + the rest
    rest = (frames % 100 - 1) // 2 + 1
    return ((rest - 1) // 2 + 1 - 1) // 2 + 1 + (frames // 100) * 13


def mel_frames(model: Model, samples: int, fe: dict) -> int:
    """Real mel frames the encoder sees. Qwen2.5-Omni (vLLM calls the processor with
    ``truncation=False``): ceil(samples / hop) up to the 30 s window (padded to it), samples //
    hop above (not padded); Qwen3-ASR: samples // hop on at least ``min_length`` samples."""
    hop = int(fe["hop_length"])
    if model.key == "omni-7b":
        return -(-samples // hop) if samples <= int(fe["n_samples"]) else samples // hop
    return max(samples, int(fe.get("min_length", 0))) // hop


def audio_stages(spec, n: int, num_layers: int) -> tuple[int, int, int | None]:
    """(after the input stage, above the merge layer, merge layer) for n stock tokens."""
    from vllm_affinity.pooling import num_kept

    cfg = load_cfg(spec)
    k_in = num_kept(n, cfg.input.keep_ratio) if cfg.input else n
    if cfg.deep:
        return k_in, num_kept(k_in, cfg.deep.keep_ratio), cfg.deep.resolve_layer(num_layers)
    return k_in, k_in, None


# -- analytic FLOPs ------------------------------------------------------------------------
def lm_prefill_flops(text_cfg: dict, tokens: int, deep_layer: int | None, deep_tokens: int | None) -> float:
    from vllm_affinity.accounting import lm_prefill_flops as flops

    return flops(text_cfg, tokens, deep_layer, deep_tokens)


def encoder_flops(model: Model, a: dict, frames: int, n: int) -> float:
    """Approximate FLOPs of the stock audio encoder on ``frames`` mel frames giving ``n`` tokens:
    convolutions, per layer the projections, MLP and (chunk / window local) attention, and
    the projector. Qwen2.5-Omni: 2 * n_window-frame chunks, conv1d stem, attention within a
    chunk, stride-2 pool, proj. Qwen3-ASR: 100-frame chunks, three stride-2 conv2d and a
    linear to d_model (13 rows per chunk), attention over n_window_infer-frame windows,
    proj1 + proj2 on every row."""
    d, ffn, layers, mel = a["d_model"], a["encoder_ffn_dim"], a["encoder_layers"], a["num_mel_bins"]
    if model.key == "omni-7b":
        chunk = 2 * a["n_window"]
        sizes = [chunk] * (frames // chunk) + ([frames % chunk] if frames % chunk else [])
        pos = [(c - 1) // 2 + 1 for c in sizes]
        positions = sum(pos)
        conv = 2 * 3 * mel * d * frames + 2 * 3 * d * d * positions
        attn = sum(4 * d * p * p for p in pos)
        return conv + layers * (2 * positions * (4 * d * d + 2 * d * ffn) + attn) + 2 * d * a["output_dim"] * n
    c, chunk = a["downsample_hidden_size"], 2 * a["n_window"]
    chunks = -(-frames // chunk)
    f1, f2, f3 = mel // 2, mel // 4, mel // 8
    t1, t2, t3 = (chunk + 1) // 2, (chunk + 3) // 4, 13
    conv = chunks * (2 * 9 * c * f1 * t1 + 2 * 9 * c * c * f2 * t2 + 2 * 9 * c * c * f3 * t3
                     + 2 * c * f3 * d * t3)
    window = 13 * (a["n_window_infer"] // chunk)
    wins = [window] * (n // window) + ([n % window] if n % window else [])
    attn = sum(4 * d * p * p for p in wins)
    return conv + layers * (2 * n * (4 * d * d + 2 * d * ffn) + attn) + 2 * n * (d * d + d * a["output_dim"])


# -- one engine process --------------------------------------------------------------------
def worker(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    import numpy as np
    import soundfile as sf
    from vllm import LLM, SamplingParams

    t_load = time.perf_counter()
    kw = dict(dtype=job["dtype"], load_format="dummy", max_model_len=2048, enforce_eager=True,
              kv_cache_memory_bytes=job["kv_bytes"], block_size=32, enable_prefix_caching=False,
              limit_mm_per_prompt=job["limit_mm"])
    if job["spec"] is not None:
        kw["hf_overrides"] = {"affinity": job["spec"]}
    llm = LLM(job["model"], **kw)
    load_s = time.perf_counter() - t_load
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    kvm = scheduler.kv_cache_manager
    groups = kvm.kv_cache_config.kv_cache_groups
    page_per_group = [g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in groups]
    prompt = job["prompt"]
    rng = np.random.default_rng(job["seed"])
    out = {"variant": job["variant"], "buckets": {}, "load_s": load_s, "kv_groups": len(groups),
           "page_bytes_all_groups": sum(page_per_group)}
    sp = SamplingParams(temperature=0, max_tokens=1)
    for secs, path in job["clips"].items():
        wave, sr = sf.read(path, dtype="float32")
        times = []
        for rep in range(job["reps"] + 1):  # the first one is the warm-up
            noisy = wave + rng.normal(0, 1e-4, wave.shape).astype(np.float32)
            t0 = time.perf_counter()
            o = llm.generate([{"prompt": prompt, "multi_modal_data": {"audio": (noisy, sr)}}], sp, use_tqdm=False)[0]
            if rep:
                times.append(time.perf_counter() - t0)
        # KV held at the end of prefill: one step of a fresh request, read the managers
        engine = llm.llm_engine
        engine.add_request(f"kv-{secs}", {"prompt": prompt, "multi_modal_data": {"audio": (wave, sr)}},
                           SamplingParams(max_tokens=2))
        engine.step()
        rid = next(r for r in scheduler.requests if r.startswith(f"kv-{secs}"))
        blocks = [len(m.req_to_blocks.get(rid, [])) for m in kvm.coordinator.single_type_managers]
        while engine.has_unfinished_requests():
            engine.step()
        out["buckets"][secs] = {
            "ttft_s": times,
            "prompt_tokens": len(o.prompt_token_ids),
            "kv_blocks_per_group": blocks,
            "kv_bytes": sum(b * p for b, p in zip(blocks, page_per_group)),
        }
    out["merge_s"] = merge_timings(job, llm)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(job["out"]).write_text(json.dumps(out))


def merge_timings(job: dict, llm) -> dict[str, float]:
    """Seconds the merge itself takes per bucket (both stages, median of 5 after an untimed one) on random states
    of the LM's width and dtype, shaped as this variant's spans (bench_offline's method)."""
    import torch

    from vllm_affinity import pooling

    if job["spec"] is None:
        return {}
    cfg = load_cfg(job["spec"])
    hidden = llm.llm_engine.model_config.hf_text_config.hidden_size
    dtype = torch.bfloat16 if job["dtype"] == "bfloat16" else torch.float32
    out = {}
    for secs, (n, k_in, k_deep) in job["counts"].items():
        x_in, x_deep = torch.randn(n, hidden, dtype=dtype), torch.randn(k_in, hidden, dtype=dtype)
        times = []
        for _ in range(6):  # the first one untimed (first-call overheads)
            t0 = time.perf_counter()
            if cfg.input is not None:
                pooling.merge(x_in, pooling.group_sizes(x_in, k_in, cfg.input.method, cfg.input.window))
            if cfg.deep is not None:
                pooling.merge(x_deep, pooling.group_sizes(x_deep, k_deep, cfg.deep.method, cfg.deep.window))
            times.append(time.perf_counter() - t0)
        out[secs] = statistics.median(times[1:])
    return out


def run_engine(job_path: Path, log_path: Path, env: dict, timeout_s: float) -> int:
    """The worker in its own process group; killed (the whole group) at the timeout."""
    with log_path.open("w") as log:
        p = subprocess.Popen([sys.executable, __file__, "--worker", str(job_path)], env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return -9


# -- driver --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return 0
    p = argparse.ArgumentParser(prog="python benchmarks/bench_models.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--buckets", type=float, nargs="+", default=[10.0, 30.0])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=["stock", "paper-aggressive"], choices=list(VARIANTS))
    p.add_argument("--scaled", action="store_true", help="small shapes of the same architectures, fp32")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p.add_argument("--text-layers", type=int, default=None, help="override the text layer count")
    p.add_argument("--encoder-layers", type=int, default=None, help="override the audio encoder layer count")
    p.add_argument("--kv-gib", type=float, default=None, help="KV cache budget (default 1 GiB; 0.25 scaled)")
    p.add_argument("--mem-gib", type=float, default=None, help="memory budget (default MemTotal - 2 GiB)")
    p.add_argument("--timeout-min", type=float, default=40.0, help="per engine process")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    if "stock" not in a.variants:
        a.variants = ["stock", *a.variants]  # every ratio is against stock
    from tqdm import tqdm

    cpu = probe_cpu()
    kv_gib = a.kv_gib or (0.25 if a.scaled else 1.0)
    budget = a.mem_gib or mem_total_gib() - 2.0
    if a.scaled or a.dtype == "float32":
        dtype = "float32"
    elif a.dtype == "bfloat16" or cpu["bf16_native"] or cpu.get("bf16_fast"):
        dtype = "bfloat16"
    else:
        dtype = "float32"
    cpu["dtype"] = dtype
    print(f"CPU: {cpu['cpu_model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags_found']) or '-'}; "
          f"bf16 native: {cpu['bf16_native']} ({cpu['bf16_basis']}); dtype {dtype}")
    clips = make_clips(a.buckets)
    import soundfile as sf

    for key in a.model:
        model = MODELS[key]
        full = json.loads((ROOT / "configs" / "models" / model.name / "config.json").read_text())
        fs = sub(full, model)
        full_text, full_enc = fs["text_config"]["num_hidden_layers"], fs["audio_config"]["encoder_layers"]
        text_layers, enc_layers, reduced = a.text_layers, a.encoder_layers, None
        if not a.scaled and text_layers is None and enc_layers is None:
            need = estimate_gib(full, model, 2 if dtype == "bfloat16" else 4, full_text, full_enc, kv_gib)
            if need > budget:
                text_layers, enc_layers = fit_layers(full, model, 2 if dtype == "bfloat16" else 4, kv_gib, budget)
                reduced = (f"{dtype} at full depth needs ~{need:.1f} GiB > budget {budget:.1f} GiB: text layers "
                           f"{text_layers}/{full_text}, encoder layers {enc_layers}/{full_enc}")
                print(reduced)
        path = build_model(model, scaled=a.scaled, dtype=dtype, text_layers=text_layers, enc_layers=enc_layers)
        cfg = json.loads((path / "config.json").read_text())
        s = sub(cfg, model)
        n_layers, n_enc = s["text_config"]["num_hidden_layers"], s["audio_config"]["encoder_layers"]
        specs = {v: spec_for(v, n_layers, full_text) for v in a.variants}
        fe = json.loads((path / "processor_config.json").read_text())["feature_extractor"]
        import importlib

        prompt = importlib.import_module(f"vllm_affinity_tools.{model.builder}").prompt(QUESTION)
        samples = {s_: sf.info(str(c)).frames for s_, c in clips.items()}
        for c in clips.values():
            if sf.info(str(c)).samplerate != 16000:
                raise SystemExit(f"{c}: expected 16 kHz")
        est = estimate_gib(cfg, model, 2 if dtype == "bfloat16" else 4, n_layers, n_enc, kv_gib)
        shape = {"model": key, "config": str(path), "dtype": dtype, "text_layers": n_layers, "text_layers_full": full_text,
                 "encoder_layers": n_enc, "encoder_layers_full": full_enc, "reduced": reduced,
                 "scaled": a.scaled, "estimated_peak_gib": est, "budget_gib": budget, "kv_gib": kv_gib,
                 "limit_mm_per_prompt": model.limit_mm,
                 "merge_layer": {v: (load_cfg(sp).deep.resolve_layer(n_layers) if load_cfg(sp).deep else None)
                                 for v, sp in specs.items()},
                 "prompt": prompt}
        print(f"{model.title}: {path} ({dtype}, text {n_layers}/{full_text} layers, encoder {n_enc}/{full_enc}, "
              f"~{est:.1f} GiB estimated)")
        runs = []
        order = list(a.variants)
        jobs = [(r, v) for r in range(a.rounds) for v in (order if r % 2 == 0 else order[::-1])]
        for rnd, variant in tqdm(jobs, desc=f"bench_models {key}", unit="engine"):
            stem = f"{model.name}{'-scaled' if a.scaled else ''}-{variant}-{rnd}"
            job_path, out_path, log_path = (CACHE / f"job-{stem}.json", CACHE / f"out-{stem}.json",
                                            CACHE / f"log-{stem}.txt")
            out_path.unlink(missing_ok=True)
            counts = {}
            for secs in a.buckets:
                n = stock_audio_tokens(model, samples[secs], fe)
                k_in, k_deep, _ = audio_stages(specs[variant], n, n_layers)
                counts[str(secs)] = (n, k_in, k_deep)
            job_path.write_text(json.dumps({
                "variant": variant, "spec": specs[variant], "model": str(path), "dtype": dtype,
                "kv_bytes": int(kv_gib * 2**30), "limit_mm": model.limit_mm, "prompt": prompt,
                "clips": {str(s_): str(c) for s_, c in clips.items()}, "counts": counts, "reps": a.reps,
                "seed": rnd, "out": str(out_path),
            }))
            env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            if variant == "stock":
                env["VLLM_PLUGINS"] = ""
            busy0, t0 = cpu_busy_jiffies(), time.monotonic()
            child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            rc = run_engine(job_path, log_path, env, a.timeout_min * 60)
            child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall, busy = time.monotonic() - t0, (cpu_busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")
            own = (child1.ru_utime - child0.ru_utime) + (child1.ru_stime - child0.ru_stime)
            if rc != 0 or not out_path.exists():
                print(log_path.read_text()[-4000:], file=sys.stderr)
                why = f"timed out after {a.timeout_min:g} min" if rc == -9 else f"exit status {rc}"
                raise SystemExit(f"{key} variant {variant} failed ({why}); log: {log_path}")
            other = max(0.0, busy - own) / wall  # CPUs used by anything but this engine
            runs.append({"round": rnd, **json.loads(out_path.read_text()), "wall_s": wall,
                         "engine_cpu_s": own, "other_cpu_per_s": other})
            tqdm.write(f"{key} {variant} (round {rnd}): {wall:.0f} s, other processes used {other:.2f} CPU")
        rows, checks = aggregate(a, model, cfg, specs, runs, samples, fe)
        write_outputs(a, model, rows, runs, cpu, shape, checks)
    return 0


def aggregate(a, model: Model, cfg: dict, specs: dict, runs: list[dict], samples: dict, fe: dict):
    from vllm_affinity.accounting import KVLayout, RequestTokens

    s = sub(cfg, model)
    text, audio = s["text_config"], s["audio_config"]
    n_layers = text["num_hidden_layers"]
    rows, checks = [], []
    for secs in a.buckets:
        per_variant = {}
        n = stock_audio_tokens(model, samples[secs], fe)
        frames = mel_frames(model, samples[secs], fe)
        enc = encoder_flops(model, audio, frames, n)
        for variant in a.variants:
            rs = [r for r in runs if r["variant"] == variant]
            b = [r["buckets"][str(secs)] for r in rs]
            times = [t for x in b for t in x["ttft_s"]]
            k_in, k_deep, layer = audio_stages(specs[variant], n, n_layers)
            prompt = b[0]["prompt_tokens"]
            text_tokens = prompt - k_in
            lm = lm_prefill_flops(text, prompt, layer, text_tokens + k_deep if layer is not None else None)
            merge = [r["merge_s"][str(secs)] for r in rs if r.get("merge_s")]
            layout = KVLayout(n_layers, layer)
            tokens = RequestTokens(prompt, n, k_in, k_deep)
            median = statistics.median(times)
            per_variant[variant] = dict(
                median=median, p90=pct(times, 0.9), prompt=prompt, n=n, k_in=k_in, k_deep=k_deep,
                text_tokens=text_tokens, merge_layer=layer, lm_flops=lm, encoder_flops=enc, flops=lm + enc,
                kv_bytes=b[0]["kv_bytes"], kv_layer_blocks=layout.layer_blocks(tokens.prompt, tokens.deep_prompt, 32),
                rss=max(r["peak_rss_gib"] for r in rs), reps=len(times),
                merge_fraction=statistics.median(merge) / median if merge else None,
                other_cpu=max(r["other_cpu_per_s"] for r in rs))
        base = per_variant["stock"]
        for variant, v in per_variant.items():
            if v["text_tokens"] != base["text_tokens"]:
                checks.append(f"{secs:g} s {variant}: engine prompt {v['prompt']} - audio {v['k_in']} = "
                              f"{v['text_tokens']} text tokens, stock has {base['text_tokens']}")
            rows.append({"bucket_s": secs, "variant": variant, **v, "baseline": "stock",
                         "truncated": False,  # both encode the whole audio (the processor's own chunks)
                         "ttft_speedup": base["median"] / v["median"],
                         "flops_limit_speedup": base["flops"] / v["flops"],
                         "kv_ratio": v["kv_bytes"] / base["kv_bytes"],
                         "kv_ratio_analytic": v["kv_layer_blocks"] / base["kv_layer_blocks"]})
    return rows, checks


def write_outputs(a, model: Model, rows: list[dict], runs: list[dict], cpu: dict, shape: dict,
                  checks: list[str]) -> None:
    from benchmarks.report import write_report

    nan = float("nan")
    stem = f"offline_{model.key}" + ("_scaled" if a.scaled else "")

    def f(x, fmt):
        return "–" if x is None or math.isnan(x) else format(x, fmt)

    layers = (f"text {shape['text_layers']}/{shape['text_layers_full']} layers, audio encoder "
              f"{shape['encoder_layers']}/{shape['encoder_layers_full']} layers"
              + (" (scaled shape)" if a.scaled else "")
              + (f" (reduced to fit: {shape['reduced']})" if shape["reduced"] else ""))
    merge = ", ".join(f"{v}: {m}" for v, m in shape["merge_layer"].items() if m is not None)
    footer = (
        f"{model.title}{' scaled' if a.scaled else ''}. {a.reps} timed requests x {a.rounds} rounds per cell after a "
        f"warm-up; max_tokens=1; single-process engine, dummy weights, {shape['dtype']}; {layers}"
        + (f"; merge layer (0-based) {merge}" if merge else "")
        + ("; vision tower not loaded (image / video limit 0)" if model.key == "omni-7b" else "")
        + f". CPU: {cpu['cpu_model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags_found']) or 'none of interest'}"
        f", bf16 native: {'yes' if cpu['bf16_native'] else 'no'} ({cpu['bf16_basis']}). Baseline: stock vLLM "
        "(`VLLM_PLUGINS=\"\"`). Audio tokens: stock count (the processor's arithmetic) → after the input stage → "
        "above the merge layer. 'prefill GFLOP': LM prefill (vllm_affinity.accounting.lm_prefill_flops) plus an "
        "approximate audio-encoder count, the same in every variant (these adapters run the encoder as stock). "
        "'of limit' = (speed-up - 1) / (FLOPs limit - 1). 'merge / TTFT': similarity + grouping + pooling of both "
        "stages, timed alone, over the variant's TTFT. 'other CPU': CPUs used by other processes while the engine "
        "ran (max over rounds)."
        + (f" WARNING: other processes used up to {busy:.2f} CPUs while an engine ran: the timings are not "
           "comparable; rerun on an idle machine." if (busy := max(r["other_cpu"] for r in rows)) > 0.25 else "")
        + (" COUNT CHECK FAILED: " + "; ".join(checks) if checks else
           " Count check: engine prompt length - audio tokens is the same text length in every variant.")
    )
    write_report(
        a.out, stem, f"Offline prefill benchmark ({model.title}{', scaled shape' if a.scaled else ''})",
        ["audio", "variant", "TTFT median (s)", "p90 (s)", "prompt tokens", "audio tokens in→input→deep",
         "prefill GFLOP", "baseline", "TTFT speed-up", "FLOPs-limit speed-up", "of limit",
         "KV bytes/request", "KV vs baseline (analytic)", "merge / TTFT", "peak RSS (GiB)", "other CPU"],
        [[f"{r['bucket_s']:g} s", r["variant"] + (" (first 30 s only)" if r["truncated"] else ""),
          f"{r['median']:.3f}", f"{r['p90']:.3f}", str(r["prompt"]), f"{r['n']}→{r['k_in']}→{r['k_deep']}",
          f"{r['flops'] / 1e9:.1f}", r["baseline"],
          f(r.get("ttft_speedup"), ".2f") + "x", f(r.get("flops_limit_speedup"), ".2f") + "x",
          f((r.get("ttft_speedup", nan) - 1) / (r.get("flops_limit_speedup", nan) - 1) * 100
            if r.get("flops_limit_speedup", 1) > 1.001 else None, ".0f") + "%",
          f"{r['kv_bytes'] / 2**20:.2f} MiB",
          f(r.get("kv_ratio"), ".3f") + f" ({f(r.get('kv_ratio_analytic'), '.3f')})",
          f(r["merge_fraction"] * 100 if r["merge_fraction"] is not None else None, ".2f") + "%",
          f"{r['rss']:.1f}", f"{r['other_cpu']:.2f}"] for r in rows],
        footer,
        {"runs": runs, "rows": rows, "cpu": cpu, "shape": shape, "count_check": checks or "ok",
         "args": vars(a) | {"out": str(a.out)}},
    )
    print(footer)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install -e '.[bench]')")
        return
    title = model.title + (" scaled" if a.scaled else "")
    for key, ylabel, suffix, scale in (("median", "TTFT median (s)", "ttft", 1),
                                       ("kv_bytes", "KV cache per request (MiB)", "kv", 2**20)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in a.variants:
            sel = [r for r in rows if r["variant"] == variant]
            ax.plot([r["bucket_s"] for r in sel], [r[key] / scale for r in sel], marker="o", label=variant)
        ax.set_xlabel("audio length (s)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs audio length ({title})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.out / f"{stem}_{suffix}.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    sel = [r for r in rows if r["variant"] != "stock"]
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
    ax.set_title(f"Measured speed-up vs FLOPs limit ({title})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out / f"{stem}_speedup.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
