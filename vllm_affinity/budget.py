"""How many groups an audio gets: the input stage's budget policies. Pure numpy, no vLLM.

The count must be fixed before the encoder runs (it is the placeholder count of the prompt),
but the processor holds the waveform, so a policy may look at it:

* ``fixed``  — ``K = ceil(keep_ratio * n)`` of the ``n`` stock tokens (today's exact-count mode);
* ``voiced`` — ``keep_ratio`` of the *voiced* tokens plus at most ``silence_groups`` more for
  everything else: ``K = ceil(keep_ratio * v) + min(silence_groups, n - v)``, where ``v`` counts
  the tokens whose stretch of waveform is within ``voiced_db`` of the audio's loudest stretch
  (a frame-energy VAD). Whisper encodes a zero-padded 30 s window: its padding and pauses are
  not voiced, so a 3 s utterance keeps about ``keep_ratio * 150`` groups instead of
  ``keep_ratio * 1500``, and a 30 s one about as many as ``fixed``; affinity grouping then
  puts the silence groups where the frames are alike (the padding, the pauses).

``keep_ratio`` 1.0 is stock under every policy (no merge).
"""

from __future__ import annotations

import numpy as np

from .pooling import num_kept

POLICIES = ("fixed", "voiced")


def voiced_tokens(wave: np.ndarray, n_tokens: int, samples_per_token: float, voiced_db: float) -> int:
    """Tokens (of ``n_tokens``, token i covering samples ``[i*spt, (i+1)*spt)``; past the
    waveform: silence) whose RMS is within ``voiced_db`` dB of the loudest token's."""
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    edges = np.minimum(np.round(np.arange(n_tokens + 1) * samples_per_token).astype(np.int64), wave.size)
    sq = np.concatenate([[0.0], np.cumsum(wave * wave)])
    counts = np.maximum(edges[1:] - edges[:-1], 1)
    rms = np.sqrt((sq[edges[1:]] - sq[edges[:-1]]) / counts)
    peak = float(rms.max()) if rms.size else 0.0
    if peak <= 0.0:
        return 0
    return int((rms >= peak * 10.0 ** (-voiced_db / 20.0)).sum())


def kept_count(n: int, keep_ratio: float, *, policy: str = "fixed", wave: np.ndarray | None = None,
               samples_per_token: float | None = None, silence_groups: int = 8, voiced_db: float = 40.0) -> int:
    """The group count of one audio of ``n`` stock tokens under ``policy``."""
    if policy == "fixed" or keep_ratio >= 1.0 or n <= 1:
        return num_kept(n, keep_ratio)
    if policy != "voiced":
        raise ValueError(f"unknown budget policy {policy!r}; policies: {', '.join(POLICIES)}")
    if wave is None or samples_per_token is None:
        raise ValueError("the voiced budget needs the waveform and the samples per token")
    v = voiced_tokens(wave, n, samples_per_token, voiced_db)
    k = (num_kept(v, keep_ratio) if v else 0) + min(silence_groups, n - v)
    return max(1, min(n, k))
