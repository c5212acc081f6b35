"""Real speech for tests, the demo and benchmarks: espeak-ng (+ sox) from Debian.

No vLLM import. Every function writes a file and returns its path; synthesis is
deterministic for a given text, voice, speed and sample rate.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Affinity pooling merges adjacent audio tokens that are nearly identical.",
    "Please transcribe this sentence and tell me what the speaker wants.",
    "Long audio prompts cost time to first token and key value cache memory.",
    "One two three four five six seven eight nine ten eleven twelve.",
    "A speech language model listens to audio and answers questions about it.",
]


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} not found: run `make setup` (installs espeak-ng and sox)")
    return path


def say(
    text: str,
    out: str | Path,
    *,
    voice: str = "en-us",
    speed: int = 160,
    sample_rate: int | None = None,
    fmt: str | None = None,
    ssml: bool = False,
) -> Path:
    """Synthesize ``text``; optionally resample and convert (wav, flac, mp3 by suffix).
    ``ssml``: ``text`` is SSML (e.g. ``<break time="500ms"/>`` for pauses)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".espeak.wav")
    subprocess.run(
        [_need("espeak-ng"), "-v", voice, "-s", str(speed), *(["-m"] if ssml else []), "-w", str(raw), text],
        check=True,
        capture_output=True,
    )
    fmt = fmt or out.suffix.lstrip(".")
    if sample_rate is None and fmt == "wav":
        raw.replace(out)
        return out
    cmd = [_need("sox"), "-D", str(raw)]
    cmd += [str(out)] if sample_rate is None else [str(out), "rate", str(sample_rate)]
    subprocess.run(cmd, check=True, capture_output=True)
    raw.unlink()
    return out


def utterance(seconds: float, out: str | Path, *, seed: int = 0, **kw) -> Path:
    """Speech of about ``seconds`` (sentences repeated, then trimmed/padded with sox)."""
    out = Path(out)
    words_per_s = 2.6  # espeak-ng at 160 wpm
    n_words = max(1, int(seconds * words_per_s))
    words: list[str] = []
    i = seed
    while len(words) < n_words:
        words += SENTENCES[i % len(SENTENCES)].split()
        i += 1
    tmp = say(" ".join(words[:n_words]), out.with_suffix(".untrimmed.wav"), **kw)
    subprocess.run(
        [_need("sox"), "-D", str(tmp), str(out), "trim", "0", f"{seconds}", "pad", "0", "0"],
        check=True,
        capture_output=True,
    )
    tmp.unlink()
    # pad to the exact length if the speech ran short
    got = float(subprocess.run([_need("soxi"), "-D", str(out)], check=True, capture_output=True, text=True).stdout)
    if got < seconds - 1e-3:
        padded = out.with_suffix(".pad" + out.suffix)
        subprocess.run(
            [_need("sox"), "-D", str(out), str(padded), "pad", "0", f"{seconds - got:.4f}"],
            check=True,
            capture_output=True,
        )
        padded.replace(out)
    return out
