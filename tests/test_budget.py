"""Budget policies (vllm_affinity/budget.py): how many groups an audio gets."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_affinity import budget as B
from vllm_affinity.config import AffinityConfigError, load_spec
from vllm_affinity.pooling import num_kept

SPT = 320  # Whisper: 480000 samples / 1500 tokens


def _speech(seconds_on, seconds_off, sr=16000, seed=0):
    """Alternating noise bursts (voiced) and digital silence."""
    rng = np.random.default_rng(seed)
    parts = []
    for on, off in zip(seconds_on, seconds_off):
        parts += [0.3 * rng.standard_normal(int(on * sr)), np.zeros(int(off * sr))]
    return np.concatenate(parts).astype(np.float32)


def test_voiced_tokens_count_the_loud_stretches():
    wave = _speech([1.0, 2.0], [0.5, 0.5])  # 3 s voiced, 1 s silent, then padding to 30 s
    assert B.voiced_tokens(wave, 1500, SPT, 40.0) == 150
    quiet = wave.copy()
    quiet[:16000] *= 0.001  # -60 dB: below a 40 dB range, above an 80 dB one
    assert B.voiced_tokens(quiet, 1500, SPT, 40.0) == 100
    assert B.voiced_tokens(quiet, 1500, SPT, 80.0) == 150
    assert B.voiced_tokens(np.zeros(16000), 1500, SPT, 40.0) == 0


def test_voiced_budget():
    wave = _speech([1.0, 2.0], [0.5, 0.5])
    k = B.kept_count(1500, 0.5, policy="voiced", wave=wave, samples_per_token=SPT, silence_groups=8)
    assert k == num_kept(150, 0.5) + 8 == 83
    assert B.kept_count(1500, 0.5, wave=wave, samples_per_token=SPT) == 750  # fixed
    assert B.kept_count(1500, 1.0, policy="voiced", wave=wave, samples_per_token=SPT) == 1500  # stock
    # nothing voiced: the silence groups alone, at least one group
    assert B.kept_count(1500, 0.5, policy="voiced", wave=np.zeros(100), samples_per_token=SPT) == 8
    assert B.kept_count(1500, 0.5, policy="voiced", wave=np.zeros(100), samples_per_token=SPT,
                        silence_groups=0) == 1
    # all voiced: like fixed
    loud = _speech([30.0], [0.0])
    assert B.kept_count(1500, 0.25, policy="voiced", wave=loud, samples_per_token=SPT) == num_kept(1500, 0.25)
    # never more than n
    assert B.kept_count(10, 0.9, policy="voiced", wave=_speech([0.1], [0.1]), samples_per_token=SPT,
                        silence_groups=100) == 10


def test_voiced_budget_needs_the_waveform():
    with pytest.raises(ValueError, match="needs the waveform"):
        B.kept_count(1500, 0.5, policy="voiced")
    with pytest.raises(ValueError, match="unknown budget policy 'vad'"):
        B.kept_count(1500, 0.5, policy="vad", wave=np.ones(10), samples_per_token=SPT)


def test_config_fields_validated():
    cfg = load_spec({"input": {"keep_ratio": 0.5, "budget": "voiced", "silence_groups": 4}})
    assert cfg.input.budget == "voiced" and cfg.input.silence_groups == 4 and cfg.input.voiced_db == 40.0
    assert "budget voiced (+4 silence groups, 40 dB)" in cfg.describe()
    with pytest.raises(AffinityConfigError, match=r"affinity\.input\.budget"):
        load_spec({"input": {"keep_ratio": 0.5, "budget": "vad"}})
    with pytest.raises(AffinityConfigError, match=r"affinity\.input\.silence_groups"):
        load_spec({"input": {"keep_ratio": 0.5, "silence_groups": -1}})
    with pytest.raises(AffinityConfigError, match=r"affinity\.input\.voiced_db"):
        load_spec({"input": {"keep_ratio": 0.5, "voiced_db": 0}})
