"""The varied evaluation corpus (vllm_affinity_tools/corpus.py): the split rule holds (no text and
no voice in both parts), the clips are deterministic 16 kHz speech of the planned conditions,
and a real ASR model hears the words (Whisper tiny.en, transformers, real weights)."""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path

import numpy as np
import pytest

from vllm_affinity_tools import asr, corpus


def test_split_shares_no_text_and_no_voice():
    plan = corpus.plan()
    assert len(plan) == 240 and len(corpus.texts()) == 48 and len(set(corpus.SENTENCES)) == 120
    by_split = collections.defaultdict(lambda: (set(), set()))
    for t, voice, _ in plan:
        assert corpus.split_of_text(t) == voice.split  # a text is read only by voices of its part
        by_split[voice.split][0].add(t)
        by_split[voice.split][1].add(voice.name)
    (t1, v1), (t2, v2) = by_split["tune"], by_split["heldout"]
    assert not t1 & t2 and not v1 & v2
    assert len(t1) == len(t2) == 24 and len(v1) == len(v2) == 6
    # each part has both synthetic families, each text five readings by five different voices
    for split in corpus.SPLITS:
        assert {v.family for v in corpus.VOICES if v.split == split} == {"espeak", "flite"}
    readers = collections.defaultdict(set)
    for t, voice, _ in plan:
        readers[t].add(voice.name)
    assert all(len(v) == corpus.RENDERINGS_PER_TEXT for v in readers.values())
    # every condition factor occurs in both parts
    for split in corpus.SPLITS:
        conds = [c for _, v, c in plan if v.split == split]
        assert {c.rate for c in conds} == set(corpus.RATES)
        assert {c.pause_s for c in conds} == set(corpus.PAUSES_S)
        assert {c.noise for c in conds} == {None, "white@20dB", "white@10dB", "brown@10dB"}
        assert {c.reverb for c in conds} == {True, False}


def test_noise_is_mixed_at_the_asked_snr():
    rng = np.random.default_rng(1)
    wave = (0.3 * np.sin(np.arange(32000) / 7.0) + 0.01 * rng.standard_normal(32000)).astype(np.float32)
    for kind in ("white", "brown"):
        for snr in (20.0, 10.0):
            noisy = corpus.add_noise(wave, kind, snr, seed=3)
            noise = noisy.astype(np.float64) - wave
            got = 10 * np.log10(np.mean(wave.astype(np.float64) ** 2) / np.mean(noise**2))
            assert abs(got - snr) < 0.05, (kind, snr, got)
    with pytest.raises(ValueError, match="white or brown"):
        corpus.add_noise(wave, "pink", 10.0, seed=0)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The first 5 clips of each part (one text, five voices) (espeak and Flite voices, several conditions)."""
    out = tmp_path_factory.mktemp("corpus")
    clips = corpus.build(out, split="tune", limit=5, human=False)
    clips += corpus.build(out, split="heldout", limit=5, human=False)
    return out, clips


def test_clips_are_16k_speech_and_deterministic(sample, tmp_path):
    import soundfile as sf

    out, clips = sample
    assert {c.family for c in clips} == {"espeak", "flite"} and {c.split for c in clips} == set(corpus.SPLITS)
    for c in clips:
        info = sf.info(c.path)
        assert (info.samplerate, info.channels) == (16000, 1)
        words = len(c.text.split())
        assert 0.15 * words < c.seconds < 1.0 * words + 4, c  # speech of about the text's length
        wave, _ = sf.read(c.path, dtype="float32")
        assert np.abs(wave).max() > 0.1
    again = corpus.build(tmp_path, split="tune", limit=5, human=False)
    for a, b in zip(clips, again):
        digest = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (a.path, b.path)]
        assert digest[0] == digest[1], (a.path, b.path)
    lines = (tmp_path / "manifest-tune.jsonl").read_text().splitlines()
    assert len(lines) == 5
    # the split's references, in the form `vllm-affinity calibrate --references` reads
    from vllm_affinity_tools.calibrate import read_references

    refs = tmp_path / "tune" / "references.json"
    assert read_references(refs, [Path(c.path) for c in again]) == [c.text for c in again]


def test_whisper_hears_the_words(sample):
    """Real speech, not noise: Whisper tiny.en (real weights) transcribes the sample with a
    corpus WER under 35% (noise, reverb and accents included: 25% when written), and the
    transcripts against the wrong texts are far worse."""
    import soundfile as sf

    from vllm_affinity_tools.checkpoints.ct2_whisper import ensure_checkpoint
    from vllm_affinity_tools.reference.whisper import ReferenceWhisper

    _, clips = sample
    ref = ReferenceWhisper(str(ensure_checkpoint()))
    hyps = [ref.generate(sf.read(c.path, dtype="float32"), max_new_tokens=96).text.strip() for c in clips]
    texts = [c.text for c in clips]
    for c, h in zip(clips, hyps):
        e, n = asr.errors(c.text, h)
        print(f"[{c.voice}, {c.condition}] {e}/{n}\n  REF: {c.text}\n  HYP: {h}")
    wer = asr.corpus_wer(texts, hyps)
    print(f"tiny.en WER on {len(clips)} varied-corpus clips: {wer:.3f}")
    assert wer < 0.35
    # against the other text of the sample (its first five clips read one text, the last five another)
    assert asr.corpus_wer(texts, hyps[5:] + hyps[:5]) > 0.8
