"""A varied English evaluation corpus built from Debian packages, split by a fixed rule.

    python -m vllm_affinity_tools.corpus [OUT_DIR] [--split tune|heldout|all] [--limit N]

Why: the accuracy figures of issue 13 rested on 40 espeak-ng clips of one engine, and an
independent check on other synthetic speech did not reproduce them (issue 22). Settings must
be chosen on one part of a varied corpus and reported on another part that shares neither a
voice nor a text with it.

What is in it (every clip 16 kHz mono wav, deterministic, cached under OUT_DIR):

* texts: :data:`SENTENCES` (120 plain English sentences written for this corpus, American spelling as Whisper writes it, no digits),
  grouped into 48 texts of 1-4 sentences (3-20 s of speech);
* voices, three families: ``espeak`` (espeak-ng formant synthesis, eight accents with
  different voice variants), ``flite`` (Flite 2.2: the diphone voices kal / kal16 and the
  clustergen voices awb, rms, slt: a different engine), ``human`` (the 10 recordings of
  ``pocketsphinx-testdata``, :func:`vllm_affinity_tools.asr.human_corpus`);
* conditions, cycled over the renderings: speaking rate (slow, normal, fast), pauses between
  sentences (none, 0.4 s, 1.2 s), background noise (white or brown, SNR 20 or 10 dB, seeded) and
  room reverb (``sox reverb``), so every family sees every condition.

The split (:func:`split_of_text`, :data:`VOICES`): texts with an even index are ``tune``, odd
ones ``heldout``; each voice belongs to one split (listed in :data:`VOICES`, both splits get
both synthetic families); a text is rendered only by voices of its own split, five times. The
human recordings are all ``heldout`` (real speech is the final check, never tuned on). So no
text and no voice is in both parts: 120 + 120 synthetic clips, + 10 human in ``heldout``.

No vLLM import. Needs espeak-ng, flite and sox (``scripts/setup_env.sh`` installs them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
SPLITS = ("tune", "heldout")
RENDERINGS_PER_TEXT = 5

SENTENCES = [
    "The library opens at nine on weekdays and closes early on Sunday.",
    "She left her umbrella on the train and had to walk home in the rain.",
    "Our neighbors planted a row of apple trees along the fence.",
    "The meeting was moved to Thursday because the manager was traveling.",
    "A warm breeze carried the smell of fresh bread down the street.",
    "He forgot the password again and called the help desk for a new one.",
    "The children built a small boat from wood and painted it bright red.",
    "Please turn off the lights when you leave the conference room.",
    "The river flooded the lower fields after three days of heavy rain.",
    "My grandmother still writes letters by hand to all of her friends.",
    "The new bridge will shorten the drive to the airport by twenty minutes.",
    "Every morning the baker wakes up before the sun to light the oven.",
    "The museum has a famous collection of old maps and sailing charts.",
    "We should check the weather before we decide to climb the mountain.",
    "The doctor told him to rest for a week and drink plenty of water.",
    "A flock of geese flew south over the village in the early evening.",
    "The package arrived damaged, so the store sent a replacement.",
    "Students gathered in the hall to hear the results of the election.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Traffic was slow on the highway because of construction work.",
    "The cat sleeps on the windowsill whenever the sun is shining.",
    "Our flight was delayed, so we had dinner at the airport.",
    "The old clock in the tower stopped working many years ago.",
    "He practiced the piano for an hour before the concert began.",
    "The garden looks beautiful now that the roses are in bloom.",
    "She asked the waiter for a glass of water and the menu.",
    "The team celebrated their victory with a long dinner together.",
    "Remember to bring your passport and a copy of your ticket.",
    "The fisherman repaired his nets on the beach after the storm.",
    "A strong wind knocked down several branches in the park.",
    "The teacher explained the lesson slowly so that everyone could follow.",
    "We watched the stars from the roof until it was almost midnight.",
    "The shop on the corner sells newspapers, coffee and fresh fruit.",
    "His favorite book is a long novel about a family of sailors.",
    "The nurse checked the patient's temperature every four hours.",
    "Heavy snow closed the mountain pass for most of the winter.",
    "The engineer found a small crack in the main water pipe.",
    "They painted the kitchen a pale shade of yellow last spring.",
    "The orchestra tuned their instruments while the audience took their seats.",
    "My brother is learning to drive and practices every weekend.",
    "The farmer sold eggs and honey at the market on Saturday.",
    "A quiet voice on the radio read the evening news.",
    "The hotel room had a small balcony with a view of the harbor.",
    "Please send me the report before the end of the day.",
    "The puppy chased its tail around the living room.",
    "The scientists collected samples of ice from the frozen lake.",
    "We lost our way in the forest and followed the stream back.",
    "The lecture on ancient history lasted almost two hours.",
    "Her coat was too thin for the cold wind on the coast.",
    "The pilot announced that we would land in thirty minutes.",
    "A group of tourists waited outside the cathedral for their guide.",
    "The price of vegetables went up after the dry summer.",
    "He wrapped the gift in blue paper and tied it with a ribbon.",
    "The printer on the second floor is out of paper again.",
    "Our street is quiet at night except for the occasional bus.",
    "The climbers reached the summit just before the clouds rolled in.",
    "She keeps a notebook by her bed to write down her dreams.",
    "The company hired three new engineers for the research team.",
    "The lamp in the hallway flickers whenever the heater is on.",
    "We bought a second hand bicycle with a basket on the front.",
    "The ship sailed out of the harbor at dawn with a full crew.",
    "Most of the guests left the party before eleven o'clock.",
    "The tailor measured his shoulders and the length of his arms.",
    "The little girl counted the ducks swimming in the pond.",
    "Rain is expected tomorrow, so the picnic has been cancelled.",
    "The judge listened carefully to both sides of the argument.",
    "A thin layer of dust covered the books on the top shelf.",
    "The chef added fresh herbs to the soup just before serving.",
    "They moved to a larger house when their second child was born.",
    "The radio station plays old jazz records late at night.",
    "The path along the cliffs is closed after dark for safety.",
    "He signed the contract and shook hands with the new owner.",
    "The wind turned the pages of the open book on the table.",
    "She finished the marathon in just under four hours.",
    "The bakery gives away the unsold bread at the end of the day.",
    "Our teacher asked us to read the first three chapters by Monday.",
    "The mechanic said the brakes needed to be replaced soon.",
    "A small boat drifted slowly towards the middle of the lake.",
    "The city council voted to build a new public swimming pool.",
    "He always drinks a cup of tea before he goes to bed.",
    "The hikers filled their bottles at a spring near the trail.",
    "The office will be closed on Monday for the national holiday.",
    "The painter mixed blue and white to match the color of the sky.",
    "My phone battery died in the middle of an important call.",
    "The students planted trees along the road to the school.",
    "Thick fog covered the valley until the late morning.",
    "The waiter brought the soup first and then the main course.",
    "She learned to speak French while living in a small village.",
    "The train to the coast leaves from platform number six.",
    "An old man was feeding the pigeons in the town square.",
    "The workers finished the new roof before the winter storms.",
    "The film was so long that some people fell asleep.",
    "Please write your name clearly at the top of the form.",
    "The kettle whistled loudly in the empty kitchen.",
    "The farmers hoped for rain after weeks of hot, dry weather.",
    "The museum guide told us the story of the old castle.",
    "He parked the car in the shade of a large oak tree.",
    "The baby laughed every time the dog barked at the window.",
    "Our team needs one more player for the match on Sunday.",
    "The bus driver waited for the last passenger to sit down.",
    "The gardener cut the grass and trimmed the hedges.",
    "A bright full moon rose slowly over the quiet hills.",
    "She sent a postcard to her parents from every city she visited.",
    "The factory produces parts for bicycles and small motors.",
    "They walked along the beach collecting shells and smooth stones.",
    "The professor answered every question after the lecture.",
    "The heavy door creaked as it slowly swung open.",
    "We need to buy milk, bread and a dozen eggs.",
    "The sailors tied the boat to the dock with thick ropes.",
    "The concert hall was full long before the music started.",
    "His handwriting is so small that it is hard to read.",
    "The apples in the bowl were red, green and yellow.",
    "A young fox crossed the road in front of our car.",
    "The firefighters arrived within minutes of the call.",
    "She borrowed three books from the library about birds.",
    "The wooden bench in the park was freshly painted green.",
    "The storm knocked out the power for most of the night.",
    "He fixed the leaking tap with a new rubber washer.",
    "The market is busiest on the first Saturday of the month.",
    "The old photographs showed the town as it was long ago.",
]
#: sentences per text, cycled (48 texts from the 120 sentences)
TEXT_LENGTHS = (1, 2, 3, 4, 4, 3, 2, 1)  # even and odd positions both sum to 10: the parts get equal speech


@dataclass(frozen=True)
class Voice:
    name: str  # as written in the manifest, e.g. "espeak:en-us+m3", "flite:slt"
    family: str  # espeak | flite | human
    split: str


#: every synthetic voice and its split (fixed: changing it changes what "held-out" means)
VOICES = [
    Voice("espeak:en-us+m3", "espeak", "tune"), Voice("espeak:en-gb+f2", "espeak", "tune"),
    Voice("espeak:en-gb-scotland+m1", "espeak", "tune"), Voice("espeak:en-029+f4", "espeak", "tune"),
    Voice("flite:kal", "flite", "tune"), Voice("flite:awb", "flite", "tune"),
    Voice("espeak:en-gb-x-rp+m7", "espeak", "heldout"), Voice("espeak:en-us-nyc+f3", "espeak", "heldout"),
    Voice("espeak:en-gb-x-gbclan+m2", "espeak", "heldout"), Voice("espeak:en-gb-x-gbcwmd+f1", "espeak", "heldout"),
    Voice("flite:rms", "flite", "heldout"), Voice("flite:slt", "flite", "heldout"),
]
RATES = {"slow": 0.8, "normal": 1.0, "fast": 1.25}
PAUSES_S = (0.0, 0.4, 1.2)
#: (kind, SNR dB) or None; reverb is a separate switch
NOISES = (None, ("white", 20.0), None, ("brown", 10.0), None, ("white", 10.0))


@dataclass(frozen=True)
class Condition:
    rate: str
    pause_s: float
    noise: str | None  # "white@20dB" ...
    reverb: bool

    @property
    def label(self) -> str:
        parts = [self.rate, f"pause {self.pause_s:g}s" if self.pause_s else "no pause"]
        parts += [self.noise] if self.noise else []
        parts += ["reverb"] if self.reverb else []
        return ", ".join(parts)


@dataclass(frozen=True)
class CorpusClip:
    path: str
    text: str
    voice: str
    family: str
    split: str
    condition: str
    seconds: float
    text_id: int


def text_sentences() -> list[list[str]]:
    """The 48 texts as sentence lists: consecutive runs of :data:`SENTENCES`, lengths cycling
    :data:`TEXT_LENGTHS`."""
    out, i, j = [], 0, 0
    while i < len(SENTENCES):
        n = TEXT_LENGTHS[j % len(TEXT_LENGTHS)]
        out.append(SENTENCES[i : i + n])
        i, j = i + n, j + 1
    return out


def texts() -> list[str]:
    """The 48 texts (the references)."""
    return [" ".join(s) for s in text_sentences()]


def split_of_text(text_id: int) -> str:
    return SPLITS[text_id % 2]


def condition(k: int) -> Condition:
    """The k-th rendering's condition: each factor drawn from a hash of (k, factor), so rate,
    pause, noise, reverb and the voice (which rotates with k) are not confounded."""
    noise = NOISES[_seed(k, "noise") % len(NOISES)]
    return Condition(rate=list(RATES)[_seed(k, "rate") % len(RATES)], pause_s=PAUSES_S[_seed(k, "pause") % len(PAUSES_S)],
                     noise=f"{noise[0]}@{noise[1]:g}dB" if noise else None, reverb=_seed(k, "reverb") % 4 == 0)


def plan() -> list[tuple[int, Voice, Condition]]:
    """(text id, voice, condition) of every synthetic clip: each text rendered
    :data:`RENDERINGS_PER_TEXT` times by voices of its own split, rotating, so every voice
    reads about the same number of texts."""
    out, k = [], 0
    for split in SPLITS:
        voices = [v for v in VOICES if v.split == split]
        ids = [t for t in range(len(texts())) if split_of_text(t) == split]
        for n, t in enumerate(ids):
            for r in range(RENDERINGS_PER_TEXT):
                out.append((t, voices[(n * RENDERINGS_PER_TEXT + r) % len(voices)], condition(k)))
                k += 1
    return out


# -- synthesis --------------------------------------------------------------------------------
def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} not found: run `make setup` (scripts/setup_env.sh installs espeak-ng, flite, sox)")
    return path


def _read16k(path: Path) -> np.ndarray:
    import soundfile as sf
    import soxr

    wave, sr = sf.read(path, dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    return soxr.resample(wave, sr, SAMPLE_RATE).astype(np.float32) if sr != SAMPLE_RATE else wave


def synthesize(sentence: str, voice: str, rate: float, tmp: Path) -> np.ndarray:
    """One sentence by one synthetic voice at a relative speaking rate, 16 kHz float32."""
    engine, name = voice.split(":", 1)
    out = tmp / "s.wav"
    if engine == "espeak":
        cmd = [_need("espeak-ng"), "-v", name, "-s", str(round(160 * rate)), "-w", str(out), sentence]
    elif engine == "flite":
        cmd = [_need("flite"), "-voice", name, "--setf", f"duration_stretch={1 / rate:.3f}", "-t", sentence,
               "-o", str(out)]
    else:
        raise ValueError(f"unknown engine in voice {voice!r}")
    subprocess.run(cmd, check=True, capture_output=True)
    return _read16k(out)


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def add_noise(wave: np.ndarray, kind: str, snr_db: float, seed: int) -> np.ndarray:
    """Mix seeded white or brown noise at ``snr_db`` (signal power over the whole clip)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(wave.shape[0])
    if kind == "brown":
        noise = np.cumsum(noise)
        noise -= np.convolve(noise, np.ones(801) / 801, mode="same")  # remove the drift
    elif kind != "white":
        raise ValueError(f"noise kind must be white or brown, got {kind!r}")
    p_signal = float(np.mean(wave.astype(np.float64) ** 2)) or 1e-12
    p_noise = float(np.mean(noise**2)) or 1e-12
    noise *= np.sqrt(p_signal / (p_noise * 10 ** (snr_db / 10)))
    return (wave + noise).astype(np.float32)


def add_reverb(wave: np.ndarray, tmp: Path) -> np.ndarray:
    """sox's reverb (50% reverberance, 50% damping, room scale 70%), wet and dry mixed."""
    import soundfile as sf

    src, dst = tmp / "dry.wav", tmp / "wet.wav"
    sf.write(src, wave, SAMPLE_RATE, subtype="FLOAT")
    subprocess.run([_need("sox"), str(src), str(dst), "reverb", "50", "50", "70"], check=True, capture_output=True)
    wet = _read16k(dst)
    return wet[: wave.shape[0]] if wet.shape[0] >= wave.shape[0] else np.pad(wet, (0, wave.shape[0] - wet.shape[0]))


def render(text_id: int, voice: Voice, cond: Condition, path: Path) -> float:
    """Write one clip; returns its duration in seconds."""
    import soundfile as sf

    sentences = text_sentences()[text_id]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pause = np.zeros(int(cond.pause_s * SAMPLE_RATE), dtype=np.float32)
        parts = []
        for i, s in enumerate(sentences):
            if i:
                parts.append(pause)
            parts.append(synthesize(s, voice.name, RATES[cond.rate], tmp))
        wave = np.concatenate(parts)
        wave = wave / max(1e-6, float(np.abs(wave).max())) * 0.5
        if cond.reverb:
            wave = add_reverb(wave, tmp)
        if cond.noise:
            kind, snr = cond.noise.split("@")
            wave = add_noise(wave, kind, float(snr.removesuffix("dB")), _seed(text_id, voice.name, cond.label))
        wave = np.clip(wave, -1.0, 1.0)
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wave, SAMPLE_RATE, subtype="PCM_16")
    return wave.shape[0] / SAMPLE_RATE


def build(out_dir: str | Path, *, split: str = "all", limit: int | None = None,
          human: bool = True) -> list[CorpusClip]:
    """The corpus (or one split of it; ``limit``: the first N synthetic clips of the plan, for
    quick checks), building missing files. Written next to them: ``manifest.jsonl`` (the whole
    corpus) or ``manifest-<split>.jsonl``, and in each split's folder ``references.json``
    ({file name: text}, the form ``vllm-affinity calibrate --references`` reads)."""
    from . import asr

    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
    out_dir = Path(out_dir)
    all_texts = texts()
    clips: list[CorpusClip] = []
    items = [p for p in plan() if split in ("all", p[1].split)]
    for t, voice, cond in items[:limit]:
        tag = f"{voice.name.replace(':', '-').replace('+', '_')}-t{t:02d}-{_seed(cond.label) % 10**6:06d}"
        path = out_dir / voice.split / f"{tag}.wav"
        if path.exists():
            import soundfile as sf

            info = sf.info(path)
            seconds = info.frames / info.samplerate
        else:
            seconds = render(t, voice, cond, path)
        clips.append(CorpusClip(str(path), all_texts[t], voice.name, voice.family, voice.split, cond.label,
                                round(seconds, 3), t))
    if human and split in ("all", "heldout"):
        for c in asr.human_corpus():
            clips.append(CorpusClip(str(c.path), c.text, c.voice, "human", "heldout", "recorded",
                                    round(c.seconds, 3), -1))
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ("manifest.jsonl" if split == "all" else f"manifest-{split}.jsonl"), "w") as f:
        for c in clips:
            f.write(json.dumps(asdict(c)) + "\n")
    for part in {c.split for c in clips}:
        local = {Path(c.path).name: c.text for c in clips if c.split == part and Path(c.path).parent == out_dir / part}
        if local:
            (out_dir / part / "references.json").write_text(json.dumps(local, indent=0))
    return clips


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_affinity_tools.corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", default=str(Path(__file__).resolve().parents[1] / ".cache" / "corpus"))
    p.add_argument("--split", default="all", choices=[*SPLITS, "all"])
    p.add_argument("--limit", type=int, default=None, help="only the first N synthetic clips of the plan")
    a = p.parse_args(argv)
    clips = build(a.out_dir, split=a.split, limit=a.limit)
    by = {}
    for c in clips:
        by.setdefault((c.split, c.family), []).append(c.seconds)
    for (s, fam), secs in sorted(by.items()):
        print(f"{s:8s} {fam:7s} {len(secs):4d} clips, {sum(secs) / 60:5.1f} min")
    print(f"{len(clips)} clips; manifest {Path(a.out_dir) / 'manifest.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
