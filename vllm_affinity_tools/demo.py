"""The main job on an embedded default: serve a model with the plugin and answer an
audio chat request, showing the audio tokens saved.

    python -m vllm_affinity_tools.demo [--model DIR] [--affinity SPEC] [--seconds S] [--audio FILE]
                                       [--whisper-affinity SPEC | --no-whisper]

Default: the tiny random-weight Qwen2-Audio (built on first use into
.cache/tiny-qwen2-audio), 20 s of espeak-ng speech, preset paper-aggressive, the
CPU build of vLLM. Random weights answer gibberish; the point is the token counts.

Then real words: Whisper tiny.en (real weights, converted by the set-up) transcribes the
same clip through ``/v1/audio/transcriptions``, once at keep ratio 1.0 (vLLM's own computation
on all 1500 frames; plain vLLM 0.32 gets tiny.en's transcription prompt wrong) and once with the plugin (``--whisper-affinity``, default: the setting the accuracy
benchmark recommends for tiny.en), printing both transcripts and the cross-attention KV.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path

CACHE = Path(".cache")
TINY_DIR = CACHE / "tiny-qwen2-audio"
#: tiny.en's recommended file (configs/recommended/whisper-tiny.en.yaml, shipped in the wheel: chosen on
#: the varied corpus's tuning part, -0.1 WER points on its held-out part; docs/accuracy.md)
WHISPER_RECOMMENDED = "recommended/whisper-tiny.en.yaml"
# The demo shows token counts and transcripts and times nothing, so its servers start in eager
# mode (tens of seconds faster on CPU); speed is measured in benchmarks/ against stock at defaults.
WHISPER_ARGS = ["--dtype", "float32", "--max-model-len", "448", "--kv-cache-memory-bytes", str(256 << 20),
                "--enforce-eager"]
CPU_ARGS = [
    "--dtype", "float32",
    "--max-model-len", "2048",
    "--kv-cache-memory-bytes", str(256 << 20),
    "--enforce-eager",
]


def ensure_tiny_model(path: Path = TINY_DIR) -> Path:
    if not (path / "config.json").exists():
        from .tiny import build

        print(f"[demo] building the tiny test model in {path}", flush=True)
        build(path)
    return path


def audio_token_count(model_dir: Path, audio_path: Path) -> int:
    """Stock Qwen2-Audio's placeholder count for this audio (HF processor)."""
    import soundfile as sf
    from transformers import AutoProcessor

    from .reference.qwen2_audio import to_16k_mono

    proc = AutoProcessor.from_pretrained(model_dir)
    wave, sr = sf.read(audio_path, dtype="float32")
    out = proc(text="<|AUDIO|>", audio=[to_16k_mono(wave, sr)], sampling_rate=16000, truncation=True)
    return sum(1 for t in out["input_ids"][0] if t == proc.audio_token_id)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_affinity_tools.demo")
    p.add_argument("--model", type=Path, default=None, help="model dir (default: tiny test model)")
    p.add_argument("--affinity", default="paper-aggressive", help="SPEC: preset, YAML path or JSON")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--audio", type=Path, default=None, help="an audio file instead of espeak-ng speech")
    p.add_argument("--whisper-affinity", help="SPEC of the Whisper part (default: tiny.en's recommended file, "
                   f"configs/{WHISPER_RECOMMENDED})")
    p.add_argument("--no-whisper", action="store_true", help="skip the Whisper transcription part")
    a = p.parse_args(argv)

    import openai

    from . import speech
    from .serving import ServerProcess, metric

    model = a.model or ensure_tiny_model()
    audio = a.audio or speech.utterance(a.seconds, CACHE / "demo" / f"speech-{a.seconds:g}s.wav")
    data = base64.b64encode(audio.read_bytes()).decode()
    fmt = audio.suffix.lstrip(".")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "input_audio", "input_audio": {"data": data, "format": fmt}},
                {"type": "text", "text": "What does the speaker say?"},
            ],
        }
    ]
    n_audio = audio_token_count(model, audio)
    log = CACHE / "demo" / "server.log"
    print(f"[demo] starting: vllm-affinity serve {model} --affinity {a.affinity} ... (log: {log})", flush=True)
    t0 = time.monotonic()
    with ServerProcess(model, ["--affinity", a.affinity, *CPU_ARGS], log_path=log, served_model_name="demo") as srv:
        print(f"[demo] server up in {time.monotonic() - t0:.0f} s at {srv.base_url}", flush=True)
        client = openai.OpenAI(base_url=srv.base_url, api_key="none")

        def ask(extra: dict | None):
            return client.chat.completions.create(
                model="demo", messages=messages, max_tokens=24, temperature=0, extra_body=extra
            )

        full = ask({"mm_processor_kwargs": {"affinity_keep_ratio": 1.0}})  # stock count
        deep_before = metric(srv.base_url, "vllm_affinity:audio_tokens_after_deep_total") or 0.0
        pooled = ask(None)  # the server's SPEC
        # the rows the server kept above the merge (its counter: kv_block_align included)
        k_deep = (metric(srv.base_url, "vllm_affinity:audio_tokens_after_deep_total") or 0.0) - deep_before
    text_tokens = full.usage.prompt_tokens - n_audio
    kept = pooled.usage.prompt_tokens - text_tokens
    from vllm_affinity.config import load_spec

    deep = load_spec(json.loads(a.affinity) if a.affinity.lstrip().startswith("{") else a.affinity).deep
    print()
    print(f"audio: {audio} ({a.seconds:g} s)" if not a.audio else f"audio: {audio}")
    if a.model is None:
        # the tiny model has random weights: its answer is arbitrary token ids, often bytes that
        # are not even valid UTF-8; say so instead of letting it look like a broken server
        print(f"answer (tiny random-weight model, meaningless by construction; the point is the token "
              f"counts below): {pooled.choices[0].message.content!r}")
    else:
        print(f"answer: {pooled.choices[0].message.content!r}")
    print(f"audio tokens before: {n_audio}   after ({a.affinity}): {kept}   saved: {n_audio - kept} "
          f"({100 * (n_audio - kept) / max(n_audio, 1):.1f}%)")
    print(f"prompt tokens (usage.prompt_tokens): {full.usage.prompt_tokens} -> {pooled.usage.prompt_tokens}")
    if deep is not None and kept:
        k_deep = int(k_deep)
        t = pooled.usage.prompt_tokens
        n_layers = json.loads((Path(model) / "config.json").read_text())["text_config"]["num_hidden_layers"]
        layer = deep.resolve_layer(n_layers)
        print(f"deep stage (after decoder layer {layer} of {n_layers}): audio positions {kept} -> {k_deep}; "
              f"the layers above hold KV for {t - kept + k_deep} of the prompt's {t} positions "
              f"(stock: {full.usage.prompt_tokens})")
    if not a.no_whisper:
        from vllm_affinity.config import presets_dir

        whisper_demo(audio, a.whisper_affinity or str(presets_dir() / WHISPER_RECOMMENDED))
    return 0


def metric_value(text: str, name: str) -> float:
    """A counter's value in a /metrics text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def cross_attention_kv_bytes(model_dir: Path, frames: int, size_weighted: bool, block: int = 128) -> int:
    """Cross-attention KV bytes one request holds on the CPU build (fp32, blocks of 128 frames;
    size-weighted heads padded 64 -> 80), the same arithmetic as the engine's allocation."""
    import math

    cfg = json.loads((model_dir / "config.json").read_text())
    heads, d = cfg["decoder_attention_heads"], cfg["d_model"]
    head = d // heads
    if size_weighted:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        from vllm_affinity.size_weighted import padded_head_size

        head = padded_head_size(head, CPUAttentionBackend.supports_head_size)
    return cfg["decoder_layers"] * 2 * math.ceil(frames / block) * block * heads * head * 4


def whisper_demo(audio: Path, spec: str) -> None:
    """Real words: Whisper tiny.en through /v1/audio/transcriptions, stock vs the plugin."""
    import openai
    import requests

    from vllm_affinity.config import load_spec

    from .checkpoints.ct2_whisper import ensure_checkpoint
    from .serving import ServerProcess

    model = Path(ensure_checkpoint())
    cfg = load_spec(json.loads(spec) if spec.lstrip().startswith("{") else spec)
    out = {}
    # "stock": the plugin at keep ratio 1.0, i.e. vLLM's own computation on all 1500 frames with the
    # English-only prompt fix (plain vLLM 0.32 answers tiny.en's transcriptions with a 500, or with
    # the multilingual prompt's ' to', see adapters/whisper.py)
    for label, aff in (("stock", '{"input": {"keep_ratio": 1.0}}'), ("plugin", spec)):
        log = CACHE / "demo" / f"whisper-{label}.log"
        print(f"\n[demo] Whisper tiny.en: vllm-affinity serve {model} --affinity '{aff}' ... (log: {log})", flush=True)
        with ServerProcess(model, ["--affinity", aff, *WHISPER_ARGS], log_path=log, served_model_name="whisper") as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=300)
            with audio.open("rb") as f:
                text = client.audio.transcriptions.create(model="whisper", file=f, temperature=0).text
            metrics = requests.get(srv.base_url.removesuffix("/v1") + "/metrics", timeout=30).text
        kept = int(metric_value(metrics, "vllm_affinity:audio_tokens_after_input_total")) or 1500
        sw = bool(label == "plugin" and cfg.input is not None and cfg.input.size_weighted)
        out[label] = (text, kept, cross_attention_kv_bytes(model, kept, sw))
    (t0, k0, b0), (t1, k1, b1) = out["stock"], out["plugin"]
    print()
    print(f"Whisper tiny.en (real weights) on {audio}:")
    print(f"  stock (keep 1.0) transcript: {t0!r}")
    print(f"  plugin           transcript: {t1!r}")
    print(f"  encoder frames to the decoder: {k0} -> {k1} per request ({spec})")
    print(f"  cross-attention KV per request: {b0 / 2**10:.0f} KiB -> {b1 / 2**10:.0f} KiB "
          f"(saved {100 * (1 - b1 / b0):.1f}%, padded heads included)")


if __name__ == "__main__":
    sys.exit(main())
