"""Transcription accuracy: text normalisation, WER, paired bootstrap, and the espeak-ng corpus.

Pure python (+ numpy); no vLLM import. Shared by the accuracy benchmark
(``benchmarks/bench_accuracy.py``) and the tests, so every WER in this project is
computed the same way.

Normalisation (a small stand-in for Whisper's English normaliser, which needs files from
the hub): lower case, hyphens to spaces, punctuation dropped, apostrophes removed,
numbers 0..20 written as words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_NUM = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()


def normalise(text: str) -> list[str]:
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9' ]", " ", text).replace("'", "")
    return [_NUM[int(w)] if w.isdigit() and int(w) <= 20 else w for w in text.split()]


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Word-level Levenshtein distance (substitutions + insertions + deletions)."""
    row = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        prev, row[0] = row[0], i
        for j in range(1, len(b) + 1):
            cur = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] != b[j - 1]))
            prev = cur
    return row[-1]


def errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word errors, reference words) of one utterance, after normalisation."""
    ref, hyp = normalise(reference), normalise(hypothesis)
    return edit_distance(ref, hyp), len(ref)


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: total word errors over total reference words."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")
    e = [errors(r, h) for r, h in zip(references, hypotheses)]
    return sum(x for x, _ in e) / max(1, sum(n for _, n in e))


def paired_bootstrap(
    references: Sequence[str],
    baseline: Sequence[str],
    system: Sequence[str],
    *,
    samples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap over utterances of ΔWER = WER(system) - WER(baseline).

    Resamples utterances with replacement (the same draw for both systems), returns the
    observed Δ, its 95% interval and the fraction of resamples where the system is worse."""
    import numpy as np

    base = np.array([errors(r, h) for r, h in zip(references, baseline)], dtype=float)
    sys_ = np.array([errors(r, h) for r, h in zip(references, system)], dtype=float)
    n = len(references)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n))
    words = base[:, 1][idx].sum(1)
    delta = (sys_[:, 0][idx].sum(1) - base[:, 0][idx].sum(1)) / np.maximum(words, 1)
    observed = (sys_[:, 0].sum() - base[:, 0].sum()) / max(1.0, base[:, 1].sum())
    lo, hi = np.percentile(delta, [2.5, 97.5])
    return {"delta": float(observed), "ci_low": float(lo), "ci_high": float(hi),
            "p_worse": float((delta > 0).mean())}


# -- the espeak-ng corpus ----------------------------------------------------------------
# Harvard sentences (IEEE 1969 "Recommended Practice for Speech Quality Measurements",
# lists 1-4; public domain): phonetically balanced, the usual ASR test material.
HARVARD = [
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.", "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.", "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.", "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.", "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.", "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.", "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.", "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.", "Read verse out loud for pleasure.",
    "Hoist the load to your left shoulder.", "Take the winding path to reach the lake.",
    "Note closely the size of the gas tank.", "Wipe the grease off his dirty face.",
    "Mend the coat before you go out.", "The wrist was badly strained and hung limp.",
    "The stray cat gave birth to kittens.", "The young girl gave no clear response.",
    "The meal was cooked before the bell rang.", "What joy there is in living.",
]
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+m2", "en-gb+f2", "en-us+f4",
          "en-gb-scotland", "en-us+m7", "en-gb-x-rp"]


@dataclass(frozen=True)
class Clip:
    path: Path
    text: str
    voice: str
    speed: int
    seconds: float


def corpus(out_dir: str | Path, n: int = 40) -> list[Clip]:
    """``n`` clips of 1-5 Harvard sentences (about 2-20 s), 10 voices, 120-190 words/min, some
    with pauses of 0.3-1.5 s between sentences; 16 kHz wav, deterministic, cached."""
    import soundfile as sf

    from . import speech

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = []
    cursor = 0
    for i in range(n):
        count = 1 + (i * 7) % 5  # 1..5 sentences
        sentences = [HARVARD[(cursor + j) % len(HARVARD)] for j in range(count)]
        cursor += count
        voice, speed = VOICES[i % len(VOICES)], 120 + (i * 13) % 71
        pause_ms = [0, 300, 800, 1500][i % 4]
        path = out_dir / f"c{i:02d}.wav"
        if not path.exists():
            if pause_ms:  # SSML breaks between sentences
                text = f' <break time="{pause_ms}ms"/> '.join(sentences)
                speech.say(f"<speak>{text}</speak>", path, voice=voice, speed=speed, sample_rate=16000,
                           ssml=True)
            else:
                speech.say(" ".join(sentences), path, voice=voice, speed=speed, sample_rate=16000)
        info = sf.info(path)
        clips.append(Clip(path, " ".join(sentences), voice, speed, info.frames / info.samplerate))
    return clips


# -- human speech: the pocketsphinx test recordings -------------------------------------
# Debian package ``pocketsphinx-testdata`` (BSD-2; ``scripts/setup_env.sh`` installs it):
# real recorded English, 16 kHz mono wav, transcripts in Sphinx format, one utterance a
# line: ``<s> words </s> (utterance id)``, utterance ids listed in a ``fileids`` file.
#   librivox/: 5 utterances (3-7 s) of Sense and Sensibility ch. 1 (LibriVox reading)
#   cards/: 5 short spoken commands (1-3.5 s), "ten of clubs", ...
POCKETSPHINX_DATA = Path("/usr/share/pocketsphinx/test/data")
POCKETSPHINX_HINT = "apt-get install pocketsphinx-testdata  (scripts/setup_env.sh installs it)"
# (directory, fileids file, transcription file)
HUMAN_SETS = (
    ("librivox", "fileids", "transcription"),
    ("cards", "cards.fileids", "cards.transcription"),
)
# Known transcript errors: (directory, utterance id) -> (text in the package, corrected text).
# librivox 0920: the package has "had he married a more a amiable woman", a doubled "a"
# (a typo: Austen wrote "Had he married a more amiable woman, he might have been made
# still more respectable than he was", and the reader says just that); left in, it would
# count as a deletion error against every correct transcript.
HUMAN_FIXES = {
    ("librivox", "sense_and_sensibility_01_austen_64kb-0920"): ("a more a amiable", "a more amiable"),
}
_SPHINX_LINE = re.compile(r"^\s*(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\(([^()\s]+)\)\s*$")


def _sphinx_transcripts(path: Path) -> dict[str, str]:
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = _SPHINX_LINE.match(line)
        if not m:
            raise ValueError(f"{path}:{n}: not a Sphinx transcript line: {line!r}")
        out[m.group(2)] = " ".join(m.group(1).split())
    return out


def human_corpus(out_dir: str | Path | None = None, root: str | Path = POCKETSPHINX_DATA) -> list[Clip]:
    """The 10 human recordings of ``pocketsphinx-testdata`` (5 LibriVox, 5 card commands)
    as :class:`Clip` (``voice="human:<dir>/<utterance id>"``, ``speed=0``), transcripts from
    the package's files with :data:`HUMAN_FIXES` applied.

    The package's files are used as they are when they are 16 kHz mono wav (they are);
    anything else is resampled (soxr) to 16 kHz mono wav under ``out_dir`` (default
    ``<repo>/.cache/human-clips``). Raises FileNotFoundError if the package is missing."""
    import numpy as np
    import soundfile as sf

    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else Path(__file__).resolve().parents[1] / ".cache" / "human-clips"
    clips = []
    fixes = dict(HUMAN_FIXES)
    for sub, fileids, transcription in HUMAN_SETS:
        d = root / sub
        if not (d / fileids).is_file() or not (d / transcription).is_file():
            raise FileNotFoundError(f"{d / fileids} / {transcription} not found: {POCKETSPHINX_HINT}")
        texts = _sphinx_transcripts(d / transcription)
        ids = [line.strip() for line in (d / fileids).read_text(encoding="utf-8").splitlines() if line.strip()]
        for uid in ids:
            if uid not in texts:
                raise ValueError(f"{d / transcription} has no transcript for {uid}")
            text = texts[uid]
            if (sub, uid) in fixes:
                wrong, right = fixes.pop((sub, uid))
                if wrong not in text:
                    raise ValueError(f"{sub}/{uid}: HUMAN_FIXES expects {wrong!r} in {text!r} (package changed?)")
                text = text.replace(wrong, right)
            src = d / f"{uid}.wav"
            if not src.is_file():
                raise FileNotFoundError(f"{src} not found: {POCKETSPHINX_HINT}")
            info = sf.info(src)
            path = src
            if (info.format, info.samplerate, info.channels) != ("WAV", 16000, 1):
                import soxr

                path = out_dir / f"{sub}-{uid}.wav"
                if not path.exists():
                    wave, sr = sf.read(src, dtype="float32", always_2d=True)
                    wave = soxr.resample(wave.mean(axis=1), sr, 16000).astype(np.float32)
                    out_dir.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".tmp.wav")
                    sf.write(tmp, wave, 16000, subtype="PCM_16")
                    tmp.replace(path)
                info = sf.info(path)
            clips.append(Clip(path, text, f"human:{sub}/{uid}", 0, info.frames / info.samplerate))
    if fixes:
        raise ValueError(f"HUMAN_FIXES for utterances the package does not list: {sorted(fixes)}")
    return clips
