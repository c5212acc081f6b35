"""Real recorded English speech (``vllm_affinity_tools.asr.human_corpus``: the 10 clips of the
Debian package ``pocketsphinx-testdata``) and Whisper tiny.en on it, through the transformers
reference (no vLLM).

The package is installed by ``scripts/setup_env.sh``, so these tests FAIL (not skip) when it
is missing: a machine without it was not set up.
"""

from __future__ import annotations

import shutil

import pytest

from vllm_affinity_tools import asr

# durations (s) in the package, in human_corpus() order (librivox fileids, then cards)
SECONDS = {
    "human:librivox/sense_and_sensibility_01_austen_64kb-0870": 7.1,
    "human:librivox/sense_and_sensibility_01_austen_64kb-0880": 2.99,
    "human:librivox/sense_and_sensibility_01_austen_64kb-0890": 5.3,
    "human:librivox/sense_and_sensibility_01_austen_64kb-0920": 6.05,
    "human:librivox/sense_and_sensibility_01_austen_64kb-0930": 3.29,
    "human:cards/001": 1.095,
    "human:cards/002": 1.960,
    "human:cards/003": 1.538,
    "human:cards/004": 1.554,
    "human:cards/005": 3.503,
}
MAX_NEW = 128
# corpus WER of tiny.en's greedy transcripts (normalised as everywhere: asr.normalise):
# measured 0.055 (5 / 91 words: "mister" -> "Mr.", "ill disposed" -> "old-sposed",
# "clubs" -> "Clothes", "clubs" -> "close"); the wrong clips' transcripts give ~1.0
WER_MAX = 0.15


@pytest.fixture(scope="module")
def clips() -> list[asr.Clip]:
    if not (asr.POCKETSPHINX_DATA / "librivox" / "transcription").is_file():
        pytest.fail(f"{asr.POCKETSPHINX_DATA} is missing: {asr.POCKETSPHINX_HINT}", pytrace=False)
    return asr.human_corpus()


def test_corpus_has_ten_transcribed_16k_clips(clips):
    import soundfile as sf

    assert [c.voice for c in clips] == list(SECONDS)
    for c in clips:
        info = sf.info(c.path)
        assert (info.format, info.samplerate, info.channels) == ("WAV", 16000, 1), c.path
        assert c.speed == 0 and c.text.strip() and c.text == c.text.strip(), c
        assert "<s>" not in c.text and "(" not in c.text, c.text
        assert c.seconds == pytest.approx(SECONDS[c.voice], abs=0.01), c
    assert sum(c.seconds for c in clips) == pytest.approx(34.4, abs=0.1)
    assert len({c.path for c in clips}) == 10
    texts = {c.voice.split("/")[-1]: c.text for c in clips}
    assert texts["001"] == "ten of clubs"
    assert texts["sense_and_sensibility_01_austen_64kb-0920"] == (
        "had he married a more amiable woman he might have been made still more respectable than he was"
    )


def test_known_typo_is_fixed_from_the_package_text(clips):
    """The package still has the typo the fix table names (a stale fix would raise)."""
    (sub, uid), (wrong, right) = next(iter(asr.HUMAN_FIXES.items()))
    raw = asr._sphinx_transcripts(asr.POCKETSPHINX_DATA / sub / "transcription")[uid]
    assert wrong in raw and right not in raw


def test_other_formats_are_resampled(tmp_path, clips):
    """A 22.05 kHz stereo recording comes back as 16 kHz mono wav under out_dir."""
    import numpy as np
    import soundfile as sf

    root = tmp_path / "data"
    for sub, _, _ in asr.HUMAN_SETS:
        shutil.copytree(asr.POCKETSPHINX_DATA / sub, root / sub)
    src = clips[1].path
    wave, sr = sf.read(src, dtype="float32")
    t = np.arange(round(len(wave) * 22050 / sr)) * sr / 22050
    up = np.interp(t, np.arange(len(wave)), wave).astype(np.float32)
    sf.write(root / "librivox" / src.name, np.stack([up, 0.5 * up], axis=1), 22050)
    out = asr.human_corpus(tmp_path / "out", root=root)
    c = out[1]
    assert c.path == tmp_path / "out" / f"librivox-{src.stem}.wav"
    info = sf.info(c.path)
    assert (info.samplerate, info.channels) == (16000, 1)
    assert c.seconds == pytest.approx(clips[1].seconds, abs=0.01)
    # the others are 16 kHz mono wav already: used in place
    assert [o.path for o in out[2:]] == [root / p.path.parent.name / p.path.name for p in clips[2:]]
    assert [(o.text, o.voice) for o in out] == [(p.text, p.voice) for p in clips]


def test_whisper_tiny_en_transcribes_human_speech(clips):
    import soundfile as sf

    from vllm_affinity_tools.checkpoints.ct2_whisper import ensure_checkpoint
    from vllm_affinity_tools.reference.whisper import ReferenceWhisper

    ref = ReferenceWhisper(str(ensure_checkpoint()))
    hyps = []
    for c in clips:
        out = ref.generate(sf.read(c.path, dtype="float32"), max_new_tokens=MAX_NEW)
        assert out.token_ids and out.token_ids[-1] == ref.model.config.eos_token_id, c.voice  # not cut off
        hyps.append(out.text.strip())
        e, n = asr.errors(c.text, hyps[-1])
        print(f"[{c.voice}] {e}/{n}\n  REF: {c.text}\n  HYP: {hyps[-1]}")
    wer = asr.corpus_wer([c.text for c in clips], hyps)
    words = sum(len(asr.normalise(c.text)) for c in clips)
    print(f"tiny.en corpus WER on {len(clips)} human clips: {wer:.3f} over {words} words (bound {WER_MAX})")
    assert wer < WER_MAX
    # sensitivity: the same transcripts against the wrong clips blow the bound
    assert asr.corpus_wer([c.text for c in clips], hyps[1:] + hyps[:1]) > 2 * WER_MAX
