"""Qwen2-Audio shapes through the workload harness: stock vLLM at its defaults vs the plugin.

    python benchmarks/bench_offline.py [--shape scaled|7b|7b-fp32] [--buckets 10 30 60] [--reps 5]
                                       [--variants stock-eager-nopc off input-only paper-aggressive
                                                   paper-aggressive+encoder input+encoder deep-only
                                                   input-only+align input+encoder+align
                                                   paper-aggressive+align] [--chat-answer fixed|generated]
                                       [--decode-tokens 32] [--e2e-tokens 128] [--out benchmarks/results]

The workloads ((a) TTFT, (b) decode per token, (c) turn 2 of a chat that repeats the audio,
(d) end-to-end latency of a 30 s / 128-token request), the baseline (stock vLLM at its
defaults, the plugin not loaded), the engine process per variant and the report are
``benchmarks/harness.py``'s; this script only describes the model. Writes
``workloads_<shape>.{json,md,png}``.

Shapes (built under .cache/bench from configs/ and the tiny model's tokenizer and processor,
whose audio token id is patched into the config):
* ``7b``: Qwen2-Audio-7B-Instruct's shape, bf16; only where the CPU has native bf16
  (avx512_bf16 / amx_bf16, or a matmul probe says bf16 is as fast as fp32); elsewhere
  ``--shape 7b`` runs ``7b-fp32`` and says so. Every variant runs in eager mode here, stock
  included: stock vLLM at its defaults was OOM-killed on this 24 GiB machine kind while
  inductor compiled the 7B model (24 GB resident, issue 19), so eager is what the machine needs;
  prefix caching stays at its default (on);
* ``7b-fp32``: the 7B widths with 8 LM layers, fp32 (about 14 GiB); the deep merge keeps the
  paper's relative depth (6 of 8; the paper's 29 of 32);
* ``scaled``: the same architecture scaled down (LM hidden 1024, 12 layers; encoder d_model
  512, 8 layers), fp32, every variant at its own defaults (torch.compile on).

Audio over 30 s: stock Qwen2-Audio truncates it to 30 s, so above 30 s the baseline is
``windows-only`` (no pooling, every 30 s window encoded: the plugin loaded, no stage on, stock
vLLM's engine defaults), and stock's row there is marked "first 30 s only".
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import CACHE, cpu_line, load_cfg, make_clips, probe_cpu  # noqa: E402

#: input-only's input stage with ``kv_block_align: keep_more``
ALIGNED_INPUT = {"keep_ratio": 0.7432, "window": 1, "method": "affinity", "kv_block_align": "keep_more"}
#: the encoder stage as the Whisper results support it (issue 22; docs/accuracy.md, held-out part of
#: the varied corpus, tiny.en): half the frames merged after half the encoder's layers (E=1 of 4 there:
#: +0.0 WER points [-0.6, +0.7]; E=2: +0.1), WITH proportional attention in the layers after the merge
#: (without it E=1 moved 51 of 130 transcripts, WER -0.9 [-2.9, +0.7]); E=15 of Qwen2-Audio's 32,
#: scaled to the encoder's depth by resolve_spec
ENCODER_STAGE = {"merge_layer": 15, "keep_ratio": 0.5, "size_weighted": True}
SPECS = {
    "stock": None,  # VLLM_PLUGINS="": the plugin is not loaded at all; vLLM's defaults
    # the baseline the benchmarks used before issue 19 (eager, prefix caching off): an extra row
    "stock-eager-nopc": None,
    "off": "off",  # plugin loaded, every stage off: the plugin's overhead
    # no pooling, audio over 30 s encoded in 30 s windows: the baseline for audio that stock
    # Qwen2-Audio would truncate to 30 s (the 60 s bucket's speed-ups are against it)
    "windows-only": {"long_audio": "windows"},
    "paper-aggressive": "paper-aggressive",
    # the same with vLLM's prefix caching off (harness.NO_PREFIX_CACHING): kv_block_align 'auto'
    # is then 'off', the exact keep ratios (what paper-aggressive was before issue 21's default)
    "paper-aggressive-nopc": "paper-aggressive",
    "input-only-nopc": "input-only",
    "input+encoder-nopc": {"preset": "input-only", "encoder": ENCODER_STAGE},
    # the same with 32-token KV blocks (harness.BLOCK_SIZE_32): the CPU's 128-token default leaves
    # a short clip's aligned stages little to drop, and a chat's next turn no hit past the audio
    "stock-bs32": None,
    "paper-aggressive-bs32": "paper-aggressive",
    "input-only-bs32": "input-only",
    "input+encoder-bs32": {"preset": "input-only", "encoder": ENCODER_STAGE},
    # + the encoder stage at the setting the Whisper results support (ENCODER_STAGE)
    "paper-aggressive+encoder": {"preset": "paper-aggressive", "encoder": ENCODER_STAGE},
    # the stages that need no runner hook: input 0.7432 + the encoder stage, no deep stage
    "input+encoder": {"preset": "input-only", "encoder": ENCODER_STAGE},
    # the same without proportional attention after the merge (what the benchmarks ran before issue 22)
    "input+encoder-plain": {"preset": "input-only", "encoder": {**ENCODER_STAGE, "size_weighted": False}},
    "input-only": "input-only",
    # issue 21: each audio drops a multiple of the KV block size (rounded down), so a chat's
    # next turn recomputes the same uncached tail as stock
    "input-only+align": {"preset": "input-only", "input": {**ALIGNED_INPUT}},
    "input+encoder+align": {"preset": "input-only", "input": {**ALIGNED_INPUT}, "encoder": ENCODER_STAGE},
    # issue 21, the deep stage: its dropped rows aligned too, so prefix caching stays on
    "paper-aggressive+align": {"preset": "paper-aggressive", "input": {**ALIGNED_INPUT},
                               "deep": {"merge_layer": -3, "keep_ratio": 0.2006, "kv_block_align": "keep_more"}},
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
    if spec is None or spec == "off" or variant == "windows-only":
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


# -- analytic FLOPs and KV: vllm_affinity.accounting (the one definition) ----------------------
def lm_prefill_flops(cfg: dict, tokens: int, deep_layer: int | None = None, deep_tokens: int | None = None) -> float:
    from vllm_affinity.accounting import lm_prefill_flops as flops

    return flops(cfg["text_config"], tokens, deep_layer, deep_tokens)


def encoder_flops(cfg: dict, positions: int, merge_layer: int | None = None, merged: int | None = None) -> float:
    from vllm_affinity.accounting import whisper_encoder_flops

    return whisper_encoder_flops(cfg["audio_config"], positions, cfg["text_config"]["hidden_size"],
                                 merge_layer=merge_layer, merged=merged)


def audio_stages(spec, secs: float, num_layers: int, block_size: int | None = None,
                 prefix_caching: bool = True) -> dict:
    """Token counts of one audio of ``secs`` seconds through the stages: ``n`` (stock
    tokens), ``k_enc`` (after the encoder stage), ``k_in`` (input stage), ``k_deep`` (deep
    stage), ``deep_layer``; per window ``positions`` (encoder positions after conv2 the first
    layers see), ``real_positions`` and ``merged`` (positions after the encoder stage, or None)."""
    from vllm_affinity.plan import deep_kept_count
    from vllm_affinity.pooling import block_aligned_count, num_kept

    from vllm_affinity.encoder import MARGIN, encoder_output_lengths, encoder_stage_tokens, window_mel_frames

    # kv_block_align 'auto' as the config hook resolves it for this engine (Qwen2-Audio: decoder-only)
    cfg = load_cfg(spec).with_block_align(prefix_caching=prefix_caching, prompt_holds_audio=True)
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
    if cfg.input and cfg.input.kv_block_align != "off":  # as the processor counts (adapters/base.py)
        k_in = block_aligned_count(n, k_in, block_size, cfg.input.kv_block_align, most=k_enc)
    deep_layer = cfg.deep.resolve_layer(num_layers) if cfg.deep else None
    # the plan's count (deep.kv_block_align included), as the scheduler and workers count
    k_deep = deep_kept_count(k_in, cfg.deep.keep_ratio, block_size, cfg.deep.kv_block_align) if cfg.deep else k_in
    return dict(n=n, k_enc=k_enc, k_in=k_in, k_deep=k_deep,
                deep_layer=deep_layer, positions=positions, merged=merged,
                real_positions=[encoder_output_lengths(f)[0] for f in frames])




def extras(specs: dict, cfg: dict, n_layers: int):
    """The analytic columns of one cell: audio tokens per stage, prefill GFLOP (encoder
    included), whether the variant sees only the first 30 s."""
    def columns(variant: str, secs: float, row: dict) -> dict:
        spec = specs.get(variant)
        st = audio_stages(spec, secs, n_layers, row.get("block_size"), row.get("prefix_caching", True))
        c = load_cfg(spec)
        enc_layer = c.encoder.resolve_layer(cfg["audio_config"]["encoder_layers"]) if c.encoder else None
        text = row["prompt_tokens"] - st["k_in"]
        flops = sum(encoder_flops(cfg, p, enc_layer, m) for p, m in zip(st["positions"], st["merged"])) + \
            lm_prefill_flops(cfg, row["prompt_tokens"], st["deep_layer"],
                             text + st["k_deep"] if st["deep_layer"] is not None else None)
        chain = f"{st['n']}→" + (f"{st['k_enc']}→" if st["k_enc"] != st["n"] else "") + f"{st['k_in']}→{st['k_deep']}"
        return {"truncated": secs > 30 and c.long_audio != "windows",
                "columns": {"audio tokens (enc→)in→deep": chain, "prefill GFLOP": f"{flops / 1e9:.0f}"}}
    return columns


def main(argv: list[str] | None = None) -> int:
    from benchmarks import harness

    p = argparse.ArgumentParser(prog="python benchmarks/bench_offline.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="scaled")
    p.add_argument("--buckets", type=float, nargs="+", default=[10.0, 30.0, 60.0])
    p.add_argument("--reps", type=int, default=5, help="timed chats per cell (>= 5 for a result file)")
    p.add_argument("--variants", nargs="+", choices=[v for v in SPECS if v != "stock"],
                   default=["stock-eager-nopc", "off", "input-only", "paper-aggressive", "paper-aggressive+encoder",
                            "input+encoder", "input-only+align", "input+encoder+align", "deep-only"])
    p.add_argument("--tag", default="", help="suffix of the result files' stem (workloads_<shape><tag>)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--e2e-bucket", type=float, default=30.0)
    p.add_argument("--e2e-tokens", type=int, default=128)
    p.add_argument("--kv-mib", type=float, default=None, help="KV budget (default 512 MiB; 7b shapes: 1088 MiB)")
    p.add_argument("--timeout-min", type=float, default=60.0, help="per engine process")
    p.add_argument("--warmup", choices=["every-bucket", "first-bucket"], default="every-bucket",
                   help="untimed short chat per bucket, or on the first bucket only (eager 7B runs)")
    p.add_argument("--chat-answer", choices=["fixed", "generated"], default="fixed",
                   help="(c): turn 2 holds a fixed answer text, or turn 1's own answer token for token")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    cpu = probe_cpu()
    print(cpu_line(cpu))
    a.shape = runnable_shape(a.shape, cpu)
    model = build_model(a.shape)
    cfg = json.loads((model / "config.json").read_text())
    n_layers = cfg["text_config"]["num_hidden_layers"]
    variants = list(a.variants)
    if any(b > 30 for b in a.buckets) and "windows-only" not in variants:
        variants.append("windows-only")  # the baseline above 30 s
    specs = {v: resolve_spec(v, n_layers, cfg["audio_config"]["encoder_layers"]) for v in ["stock", *variants]}
    big = a.shape.startswith("7b")
    bench = harness.Bench(
        stem=f"workloads_{a.shape}{a.tag}", title=f"Qwen2-Audio, {a.shape} shape", model=model, dtype=shape_dtype(a.shape),
        prompt=PROMPT, specs=specs, baseline=lambda secs: "stock" if secs <= 30 else "windows-only",
        extras=extras(specs, cfg, n_layers), kv_bytes=int((a.kv_mib or (1088 if big else 512)) * 2**20),
        # 7B: what fits 24 GiB next to ~18 GiB of weights: 2048 positions (the 60 s chat's turn 2 is
        # 1607) and 1 GiB + one 128-token block of KV (vLLM holds one block back as the null block)
        max_model_len=2048 if big else 4096,
        machine_needs={"enforce_eager": True} if a.shape == "7b" else {},
        machine_needs_why=("stock vLLM at its defaults was OOM-killed on this 24 GiB machine kind while inductor "
                           "compiled the 7B model (issue 19): eager mode for every variant, prefix caching at "
                           "its default (on)."),
        notes=[f"LM layers {n_layers}, audio encoder layers {cfg['audio_config']['encoder_layers']}; above 30 s "
               "stock truncates the audio, so the baseline there is `windows-only` (every 30 s window encoded, "
               "no pooling, plugin loaded with no stage on, vLLM's defaults)."])
    clips = make_clips(a.buckets)
    harness.run(bench, variants, a.buckets, clips, reps=a.reps, decode_tokens=a.decode_tokens,
                e2e_bucket=a.e2e_bucket, e2e_tokens=a.e2e_tokens, cpu=cpu, out_dir=a.out,
                timeout_min=a.timeout_min, warmup_every_bucket=a.warmup == "every-bucket",
                chat_answer=a.chat_answer, argv=["python", "benchmarks/bench_offline.py", *(argv or sys.argv[1:])])
    return 0


PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat does the speaker say?<|im_end|>\n"
          "<|im_start|>assistant\n")


if __name__ == "__main__":
    sys.exit(main())
