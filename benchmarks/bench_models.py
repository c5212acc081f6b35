"""The other adapted architectures at full size (dummy weights) through the workload harness.

    python benchmarks/bench_models.py [--model omni-7b qwen3asr-1.7b] [--buckets 10 30 60] [--reps 5]
                                      [--variants stock-eager-nopc input-only paper-aggressive deep-only]
                                      [--scaled] [--dtype auto|bfloat16|float32]
                                      [--text-layers N --encoder-layers M] [--out benchmarks/results]

The sibling of ``bench_offline.py`` (Qwen2-Audio): the workloads ((a) TTFT, (b) decode per
token, (c) turn 2 of a chat repeating the audio, (d) a 30 s / 128-token request), the baseline
(stock vLLM at its defaults, the plugin not loaded) and the report are ``benchmarks/harness.py``'s;
this script describes the models. Writes ``workloads_<model>[_scaled].{json,md,png}``.

Models (``--model``), their full-size configs in ``configs/models/<name>/config.json``
(which values come from where: the ``_sources`` key there); the benchmark model dir
``.cache/bench/<name>[-scaled]/`` holds that config, with the tiny checkpoint's special token
ids patched in, and the tiny checkpoint's tokenizer / processor files (no weights):

* ``omni-7b``: Qwen2.5-Omni-7B's thinker (registry name ``Qwen2_5OmniModel``), tokenizer
  from ``.cache/tiny-qwen25omni``; the vision tower is not loaded (image and video limits 0);
  25 audio tokens per second; vLLM does not truncate at 30 s, so stock is the baseline at
  every length;
* ``qwen3asr-1.7b``: Qwen3-ASR-1.7B (``Qwen3ASRForConditionalGeneration``), tokenizer from
  ``.cache/tiny-qwen3asr``; 13 audio tokens per 100 mel frames.

The prompt is the tiny builder's ``prompt(question)`` (the model's chat prompt, one audio).

CPU and dtype: the CPU is probed first (``benchmarks/common.probe_cpu``). bf16 where native,
else fp32; when the chosen dtype does not fit the memory budget (an estimate: weights + KV
budget + 3.5 GiB), the text and encoder layer counts are scaled down by one factor until it
fits, and a deep stage's merge layer keeps its relative depth. A 7B-class model in bf16 runs
every variant in eager mode (stock vLLM at its defaults was OOM-killed while inductor compiled
a 7B model on this 24 GiB machine kind, issue 19); smaller ones run at vLLM's defaults.

``--scaled``: the same architectures scaled down for a quick end-to-end check (text 4
layers, hidden 512; audio encoder 4 layers, d_model 256; fp32).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import CACHE, cpu_line, load_cfg, make_clips, mem_total_gib, probe_cpu  # noqa: E402

QUESTION = "What does the speaker say?"
VARIANTS = {  # variant -> preset (None: stock vLLM, the plugin not loaded)
    "stock": None,
    "stock-eager-nopc": None,  # the pre-issue-19 baseline (eager, prefix caching off): an extra row
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


# -- driver --------------------------------------------------------------------------------
def extras(model: Model, specs: dict, cfg: dict, samples: dict, fe: dict):
    """The analytic columns of one cell: audio tokens stock → input → deep, prefill GFLOP."""
    s = sub(cfg, model)
    text, audio = s["text_config"], s["audio_config"]

    def columns(variant: str, secs: float, row: dict) -> dict:
        n = stock_audio_tokens(model, samples[secs], fe)
        k_in, k_deep, layer = audio_stages(specs.get(variant), n, text["num_hidden_layers"])
        t = row["prompt_tokens"] - k_in
        flops = lm_prefill_flops(text, row["prompt_tokens"], layer, t + k_deep if layer is not None else None) \
            + encoder_flops(model, audio, mel_frames(model, samples[secs], fe), n)
        return {"columns": {"audio tokens in→input→deep": f"{n}→{k_in}→{k_deep}", "text tokens": str(t),
                            "prefill GFLOP": f"{flops / 1e9:.0f}"}}
    return columns


def main(argv: list[str] | None = None) -> int:
    import importlib

    import soundfile as sf

    from benchmarks import harness

    p = argparse.ArgumentParser(prog="python benchmarks/bench_models.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--buckets", type=float, nargs="+", default=[10.0, 30.0, 60.0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != "stock"],
                   default=["stock-eager-nopc", "input-only", "paper-aggressive"])
    p.add_argument("--scaled", action="store_true", help="small shapes of the same architectures, fp32")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p.add_argument("--text-layers", type=int, default=None, help="override the text layer count")
    p.add_argument("--encoder-layers", type=int, default=None, help="override the audio encoder layer count")
    p.add_argument("--kv-gib", type=float, default=None, help="KV cache budget (default 2 GiB; 0.25 scaled)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="engine max_model_len (default 4096; 2048 for a 7B-class bf16 model, as bench_offline's 7b)")
    p.add_argument("--mem-gib", type=float, default=None, help="memory budget (default MemTotal - 2 GiB)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--e2e-bucket", type=float, default=30.0)
    p.add_argument("--e2e-tokens", type=int, default=128)
    p.add_argument("--timeout-min", type=float, default=60.0, help="per engine process")
    p.add_argument("--warmup", choices=["every-bucket", "first-bucket"], default="every-bucket",
                   help="untimed short chat per bucket, or on the first bucket only (eager 7B runs)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    cpu = probe_cpu()
    kv_gib = a.kv_gib or (0.25 if a.scaled else 2.0)
    budget = a.mem_gib or mem_total_gib() - 2.0
    if a.scaled or a.dtype == "float32":
        dtype = "float32"
    elif a.dtype == "bfloat16" or cpu["bf16_native"] or cpu.get("bf16_fast"):
        dtype = "bfloat16"
    else:
        dtype = "float32"
    cpu["dtype"] = dtype
    print(cpu_line(cpu) + f"; dtype {dtype}")
    clips = make_clips(a.buckets)
    samples = {s_: sf.info(str(c)).frames for s_, c in clips.items()}
    for key in a.model:
        model = MODELS[key]
        full = json.loads((ROOT / "configs" / "models" / model.name / "config.json").read_text())
        fs = sub(full, model)
        full_text, full_enc = fs["text_config"]["num_hidden_layers"], fs["audio_config"]["encoder_layers"]
        text_layers, enc_layers, reduced = a.text_layers, a.encoder_layers, None
        width = 2 if dtype == "bfloat16" else 4
        if not a.scaled and text_layers is None and enc_layers is None:
            need = estimate_gib(full, model, width, full_text, full_enc, kv_gib)
            if need > budget:
                text_layers, enc_layers = fit_layers(full, model, width, kv_gib, budget)
                reduced = (f"{dtype} at full depth needs ~{need:.1f} GiB > budget {budget:.1f} GiB: text layers "
                           f"{text_layers}/{full_text}, encoder layers {enc_layers}/{full_enc}")
                print(reduced)
        path = build_model(model, scaled=a.scaled, dtype=dtype, text_layers=text_layers, enc_layers=enc_layers)
        cfg = json.loads((path / "config.json").read_text())
        s = sub(cfg, model)
        n_layers, n_enc = s["text_config"]["num_hidden_layers"], s["audio_config"]["encoder_layers"]
        specs = {v: spec_for(v, n_layers, full_text) for v in ["stock", *a.variants]}
        fe = json.loads((path / "processor_config.json").read_text())["feature_extractor"]
        prompt = importlib.import_module(f"vllm_affinity_tools.{model.builder}").prompt(QUESTION)
        est = estimate_gib(cfg, model, width, n_layers, n_enc, kv_gib)
        # a 7B-class bf16 model: inductor's compile did not fit this machine kind for stock (issue 19)
        eager = not a.scaled and est > 12.0
        merge = {v: load_cfg(sp).deep.resolve_layer(n_layers) for v, sp in specs.items()
                 if sp is not None and load_cfg(sp).deep}
        bench = harness.Bench(
            stem=f"workloads_{key}" + ("_scaled" if a.scaled else ""),
            title=f"{model.title}{', scaled shape' if a.scaled else ''}", model=path, dtype=dtype, prompt=prompt,
            specs=specs, extras=extras(model, specs, cfg, samples, fe), limit_mm=model.limit_mm,
            kv_bytes=int(kv_gib * 2**30), max_model_len=a.max_model_len or (2048 if eager else 4096),
            machine_needs={"enforce_eager": True} if eager else {},
            machine_needs_why=(f"~{est:.0f} GiB estimated for this model: stock vLLM at its defaults was "
                               "OOM-killed on this 24 GiB machine kind while inductor compiled a 7B model "
                               "(issue 19), so eager mode for every variant; prefix caching at its default (on)."),
            notes=[f"Text layers {n_layers}/{full_text}, audio encoder layers {n_enc}/{full_enc}"
                   + (f" (reduced to fit: {reduced})" if reduced else "")
                   + (f"; deep merge layer (0-based) {merge}" if merge else "")
                   + ("; vision tower not loaded (image / video limit 0)" if key == "omni-7b" else "")
                   + ". 'prefill GFLOP': LM prefill plus an approximate audio-encoder count (these adapters "
                   "run the encoder as stock)."])
        harness.run(bench, a.variants, a.buckets, clips, reps=a.reps, decode_tokens=a.decode_tokens,
                    e2e_bucket=a.e2e_bucket, e2e_tokens=a.e2e_tokens, cpu=cpu, out_dir=a.out,
                    timeout_min=a.timeout_min, warmup_every_bucket=a.warmup == "every-bucket",
                    argv=["python", "benchmarks/bench_models.py", *(argv or sys.argv[1:])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
