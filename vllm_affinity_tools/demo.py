"""The main job on an embedded default: serve a model with the plugin and answer an
audio chat request, showing the audio tokens saved.

    python -m vllm_affinity_tools.demo [--model DIR] [--affinity SPEC] [--seconds S] [--audio FILE]

Default: the tiny random-weight Qwen2-Audio (built on first use into
.cache/tiny-qwen2-audio), 20 s of espeak-ng speech, preset paper-aggressive, the
CPU build of vLLM. Random weights answer gibberish; the point is the token counts.
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
    a = p.parse_args(argv)

    import openai

    from . import speech
    from .serving import ServerProcess

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
        pooled = ask(None)  # the server's SPEC
    text_tokens = full.usage.prompt_tokens - n_audio
    kept = pooled.usage.prompt_tokens - text_tokens
    from vllm_affinity.config import load_spec
    from vllm_affinity.pooling import num_kept

    deep = load_spec(json.loads(a.affinity) if a.affinity.lstrip().startswith("{") else a.affinity).deep
    print()
    print(f"audio: {audio} ({a.seconds:g} s)" if not a.audio else f"audio: {audio}")
    print(f"answer: {pooled.choices[0].message.content!r}")
    print(f"audio tokens before: {n_audio}   after ({a.affinity}): {kept}   saved: {n_audio - kept} "
          f"({100 * (n_audio - kept) / max(n_audio, 1):.1f}%)")
    print(f"prompt tokens (usage.prompt_tokens): {full.usage.prompt_tokens} -> {pooled.usage.prompt_tokens}")
    if deep is not None and kept:
        k_deep = num_kept(kept, deep.keep_ratio)
        t = pooled.usage.prompt_tokens
        n_layers = json.loads((Path(model) / "config.json").read_text())["text_config"]["num_hidden_layers"]
        layer = deep.resolve_layer(n_layers)
        print(f"deep stage (after decoder layer {layer} of {n_layers}): audio positions {kept} -> {k_deep}; "
              f"the layers above hold KV for {t - kept + k_deep} of the prompt's {t} positions "
              f"(stock: {full.usage.prompt_tokens})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
