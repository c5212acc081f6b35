"""Whisper tiny.en and base converted from CTranslate2 (vllm_affinity_tools.checkpoints.ct2_whisper)
equal CTranslate2's own runtime on the same weights (every test runs for each checkpoint).

Both sides run float32 from the same float16 values (exactly up-cast), on the same
log-mel features (the converted dir's WhisperFeatureExtractor), on espeak-ng speech:
  * encoder outputs agree to a per-model tolerance (Expect.enc_tol; tiny.en: measured max
    |diff| 2.0e-4 on these clips, 2e-5..4e-4 on other espeak clips, against outputs of
    magnitude ~13; base: 1.1e-3 against ~24; fp32 summation-order noise);
  * greedy transcripts are the same ids (prompt <|startoftranscript|><|notimestamps|>;
    base, multilingual: <|startoftranscript|><|en|><|transcribe|><|notimestamps|>);
  * they are the spoken text, up to the models' errors on synthetic speech (WER bound);
  * a deliberately wrong q/k/v split fails the encoder comparison by orders of magnitude.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from vllm_affinity_tools.asr import edit_distance, normalise
from vllm_affinity_tools.checkpoints import ct2_whisper

ROOT = Path(__file__).resolve().parents[1]
CLIP_DIR = ROOT / ".cache" / "clips"

# max |HF - CT2| over encoder outputs: Expect.enc_tol (a wrong q/k/v split gives 16..28)
# corpus WER of the greedy transcripts vs the synthesised text (normalised: case,
# punctuation, hyphens, numbers <= 20 as words)
WER_MAX = 0.30
MAX_NEW = 64


@dataclass(frozen=True)
class Expect:
    """What each converted checkpoint must look like (ids from openai/whisper-<name>)."""

    eot: int
    sot: int
    no_timestamps: int
    prompt: tuple[str, ...]  # decoder prompt after <|startoftranscript|>
    hello_ids: tuple[int, ...] | None  # "Hello world." (tiny.en: GPT-2 ids)
    enc_tol: float  # max |HF - CT2| over the encoder outputs of CLIPS
    generate_kw: dict = field(default_factory=dict)  # HF generate: the same prompt as CT2's

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1


MODELS = {
    # tiny.en: encoder max |diff| 5.9e-5, 2.3e-5, 2.0e-4, 1.9e-4 on CLIPS (3.6e-4 the worst
    # seen on other espeak clips; |CT2| max ~13); corpus WER 0.175 (10 / 57 words): tiny.en
    # on espeak-ng voices mishears a few words ("brown fox" -> "round fire", ...)
    "tiny.en": Expect(50256, 50257, 50362, ("<|notimestamps|>",), (15496, 995, 13), 2e-3),
    # base (multilingual, 6+6 layers, d=512): encoder max |diff| 5.8e-4, 8.2e-4, 7.5e-4,
    # 1.1e-3 on CLIPS (|CT2| max 24; deeper and larger activations, so more fp32 noise);
    # corpus WER 0.158 (9 / 57 words: "The quick" -> "A quick", "transcribe" -> "try to
    # describe", ...)
    "base": Expect(50257, 50258, 50363, ("<|en|>", "<|transcribe|>", "<|notimestamps|>"), None, 4e-3,
                   {"language": "en", "task": "transcribe"}),
}

# (text, espeak-ng voice, words per minute): several voices and speeds, one ~11 s clip
CLIPS = [
    ("The quick brown fox jumps over the lazy dog.", "en-us", 130),
    ("Please transcribe this sentence and tell me what the speaker wants.", "en-gb", 140),
    ("One two three four five six seven eight nine ten eleven twelve.", "en-us+f3", 150),
    (
        (
            "Long audio prompts cost time to first token and key value cache memory. "
            "A speech language model listens to audio and answers questions about it."
        ),
        "en-gb+m3",
        130,
    ),
]


# -------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", params=list(MODELS))
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def expect(name) -> Expect:
    return MODELS[name]


@pytest.fixture(scope="module")
def whisper_dir(name) -> Path:
    t = time.perf_counter()
    out = ct2_whisper.ensure_checkpoint(name=name, log=print)
    print(f"checkpoint ready in {time.perf_counter() - t:.1f}s: {out}")
    return out


@pytest.fixture(scope="module")
def ct2_source(name) -> ct2_whisper.CT2Model:
    return ct2_whisper.read_ct2_model(ct2_whisper.source_dir(name) / "model.bin")


@pytest.fixture(scope="module")
def hf_model(whisper_dir):
    import torch
    from transformers import WhisperForConditionalGeneration

    model, info = WhisperForConditionalGeneration.from_pretrained(
        whisper_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.fixture(scope="module")
def ct2_model(name):
    import ctranslate2

    return ctranslate2.models.Whisper(
        str(ct2_whisper.source_dir(name)), device="cpu", compute_type="float32", intra_threads=2
    )


@pytest.fixture(scope="module")
def clip_features(whisper_dir) -> list[np.ndarray]:
    """(1, 80, 3000) float32 log-mels per clip, from the converted dir's feature extractor."""
    import soundfile as sf
    from transformers import WhisperFeatureExtractor

    from vllm_affinity_tools import speech

    fe = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    feats = []
    for i, (text, voice, wpm) in enumerate(CLIPS):
        path = CLIP_DIR / f"whisper-{i}-{voice}-{wpm}.wav"
        if not path.exists():
            speech.say(text, path, voice=voice, speed=wpm, sample_rate=16000)
        wave, sr = sf.read(path, dtype="float32")
        assert sr == 16000 and 1.0 < len(wave) / sr < 30.0
        f = fe(wave, sampling_rate=sr, return_tensors="np").input_features
        assert f.shape == (1, 80, 3000) and f.dtype == np.float32
        feats.append(np.ascontiguousarray(f))
    return feats


@pytest.fixture(scope="module")
def ct2_encoded_sv(ct2_model, clip_features) -> list:
    """CT2 encoder outputs as StorageViews (generate() accepts them instead of features)."""
    import ctranslate2

    return [ct2_model.encode(ctranslate2.StorageView.from_array(f), to_cpu=True) for f in clip_features]


@pytest.fixture(scope="module")
def ct2_encoded(ct2_encoded_sv) -> list[np.ndarray]:
    return [np.array(sv, copy=True) for sv in ct2_encoded_sv]


@pytest.fixture(scope="module")
def hf_encoded(hf_model, clip_features) -> list[np.ndarray]:
    return [hf_encode(hf_model.model.encoder, f) for f in clip_features]


def hf_encode(encoder, features: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return encoder(torch.from_numpy(features)).last_hidden_state.numpy()


# ----------------------------------------------------------------------------------- tests
def test_reader_and_checkpoint_files(name, expect, whisper_dir, ct2_source, hf_model):
    from transformers import AutoProcessor, GenerationConfig, WhisperConfig

    ck = ct2_whisper.CHECKPOINTS[name]
    EOT, SOT, NO_TIMESTAMPS, TS = expect.eot, expect.sot, expect.no_timestamps, expect.timestamp_begin

    assert (ct2_source.spec, ct2_source.revision) == ("WhisperSpec", 3)
    assert ct2_source.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
    assert ct2_source["decoder/embeddings/weight"].dtype == np.float16

    for f in ("model.safetensors", "config.json", "generation_config.json", "preprocessor_config.json",
              "tokenizer.json", "tokenizer_config.json", ct2_whisper.STAMP):
        assert (whisper_dir / f).is_file(), f
    stamp = json.loads((whisper_dir / ct2_whisper.STAMP).read_text())
    assert stamp["source_sha256"] == ck.model_sha256 and stamp["source_bytes"] == ct2_whisper.source_bytes(name)
    assert stamp.get("model", "tiny.en") == name
    cfg = WhisperConfig.from_pretrained(whisper_dir)
    assert cfg.architectures == ["WhisperForConditionalGeneration"]
    for k, v in ck.hp.items():
        assert getattr(cfg, k) == v, k
    assert cfg.vocab_size == (51865 if ck.multilingual else 51864)
    gen = GenerationConfig.from_pretrained(whisper_dir)
    assert gen.decoder_start_token_id == SOT and gen.no_timestamps_token_id == NO_TIMESTAMPS
    assert gen.eos_token_id == EOT and gen.max_length == 448
    assert gen.is_multilingual is ck.multilingual
    if ck.multilingual:  # as openai/whisper-base: language detected (or given), then transcribe
        assert gen.forced_decoder_ids == [[1, None], [2, 50359]]
        assert len(gen.lang_to_id) == 99 and gen.lang_to_id["<|en|>"] == SOT + 1
        assert gen.task_to_id == {"transcribe": 50359, "translate": 50358}
    else:
        assert gen.forced_decoder_ids == [[1, NO_TIMESTAMPS]]
    assert gen.begin_suppress_tokens == [220, EOT] and EOT not in gen.suppress_tokens and SOT in gen.suppress_tokens

    proc = AutoProcessor.from_pretrained(whisper_dir)  # what vLLM loads
    fe, tok = proc.feature_extractor, proc.tokenizer
    assert (fe.feature_size, fe.sampling_rate, fe.hop_length, fe.chunk_length, fe.n_fft) == (80, 16000, 160, 30, 400)
    assert len(tok) == cfg.vocab_size == hf_model.get_output_embeddings().weight.shape[0]
    named = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|0.00|>", "<|30.00|>"]
    assert tok.convert_tokens_to_ids(named) == [EOT, SOT, NO_TIMESTAMPS, TS, TS + 1500]
    assert tok.prefix_tokens == [SOT, NO_TIMESTAMPS]
    hello = list(expect.hello_ids or tok.encode("Hello world.", add_special_tokens=False))
    assert tok.encode("Hello world.", add_special_tokens=False) == hello and all(t < EOT for t in hello)
    assert tok.decode([SOT, *tok.convert_tokens_to_ids(expect.prompt), *hello, EOT],
                      skip_special_tokens=True) == "Hello world."
    assert tok.decode([TS, TS + 50], decode_with_timestamps=True) == "<|0.00|><|1.00|>"
    # tied output projection
    assert hf_model.proj_out.weight.data_ptr() == hf_model.model.decoder.embed_tokens.weight.data_ptr()


def test_encoder_matches_ct2(name, expect, hf_encoded, ct2_encoded):
    diffs = []
    for out, ref in zip(hf_encoded, ct2_encoded):
        assert out.shape == ref.shape == (1, 1500, ct2_whisper.CHECKPOINTS[name].hp["d_model"])
        diffs.append(float(np.abs(out - ref).max()))
    print(f"{name}: encoder max |HF - CT2| per clip: {[f'{d:.2e}' for d in diffs]} (tol {expect.enc_tol:g}, "
          f"|CT2| max {max(float(np.abs(r).max()) for r in ct2_encoded):.1f})")
    assert max(diffs) < expect.enc_tol


def test_greedy_transcripts_match_ct2_and_text(
    name, expect, whisper_dir, hf_model, ct2_model, clip_features, hf_encoded, ct2_encoded_sv
):
    """Each runtime decodes from its own encoder output (computed once, compared above)."""
    import torch
    from transformers import WhisperTokenizer
    from transformers.modeling_outputs import BaseModelOutput

    tok = WhisperTokenizer.from_pretrained(whisper_dir)
    EOT = expect.eot
    prompt = [expect.sot, *tok.convert_tokens_to_ids(expect.prompt)]
    errors = words = 0
    for (text, voice, _), f, h, c in zip(CLIPS, clip_features, hf_encoded, ct2_encoded_sv):
        with torch.no_grad():
            hf_ids = hf_model.generate(  # prompt from generation_config (+ language/task for base) = `prompt`
                torch.from_numpy(f),
                encoder_outputs=BaseModelOutput(last_hidden_state=torch.from_numpy(h)),
                max_new_tokens=MAX_NEW,
                **expect.generate_kw,
            )[0].tolist()
        res = ct2_model.generate(c, [prompt], beam_size=1, max_length=MAX_NEW)[0]
        ct2_ids = list(res.sequences_ids[0])
        hf_ids = [t for t in hf_ids if t != EOT]  # HF strips the prompt and stops at <|endoftext|>
        hyp = tok.decode(hf_ids, skip_special_tokens=True).strip()
        e = edit_distance(normalise(text), normalise(hyp))
        errors, words = errors + e, words + len(normalise(text))
        print(f"[{voice}] REF: {text}\n  HF : {hyp}\n  CT2: {tok.decode(ct2_ids, skip_special_tokens=True).strip()}"
              f"\n  ids equal: {hf_ids == ct2_ids}, WER {e / len(normalise(text)):.2f}")
        assert hf_ids == ct2_ids
        assert 0 < len(ct2_ids) < MAX_NEW - 4  # finished with <|endoftext|>, not cut off
        assert all(t < EOT for t in ct2_ids)  # plain text tokens only (no timestamps / specials)
    print(f"{name}: corpus WER {errors / words:.3f} over {words} words (bound {WER_MAX})")
    assert errors / words < WER_MAX


@pytest.mark.parametrize("qkv_order", ["kqv", "qvk", "vkq"], ids=["swap-q-k", "swap-k-v", "swap-q-v"])
def test_wrong_qkv_split_fails_encoder_check(name, expect, hf_model, ct2_source, clip_features, ct2_encoded, qkv_order):
    """Sensitivity: the encoder comparison above catches a mis-split fused qkv."""
    import torch

    sd = ct2_whisper.ct2_to_hf_state_dict(ct2_source, qkv_order=qkv_order, hp=ct2_whisper.CHECKPOINTS[name].hp)
    prefix = "model.encoder."
    enc = copy.deepcopy(hf_model.model.encoder)
    enc.load_state_dict(
        {k[len(prefix):]: torch.from_numpy(v) for k, v in sd.items() if k.startswith(prefix)}, strict=True
    )
    diff = float(np.abs(hf_encode(enc, clip_features[0]) - ct2_encoded[0]).max())
    print(f"{name} {qkv_order}: encoder max |diff| {diff:.3g}")
    assert diff > 100 * expect.enc_tol


def test_split_model_bin_is_joined_and_sha256_checked(tmp_path, monkeypatch):
    """base's model.bin is two package files: joined in order, checked against the table's
    sha256 (a wrong one leaves nothing behind), then reused."""
    parts = [tmp_path / "p1", tmp_path / "p2"]
    parts[0].write_bytes(b"first half|")
    parts[1].write_bytes(b"second half")
    (tmp_path / "config.json").write_text("{}")
    files = {"model.bin": parts, "config.json": [tmp_path / "config.json"]}
    sha = hashlib.sha256(b"first half|second half").hexdigest()
    monkeypatch.setattr(ct2_whisper, "cache_root", lambda: tmp_path / "cache")
    base = ct2_whisper.CHECKPOINTS["base"]

    bad = ct2_whisper.Checkpoint(**{**base.__dict__, "name": "fake", "model_sha256": "0" * 64})
    with pytest.raises(ct2_whisper.ConversionError, match="sha256"):
        ct2_whisper._assemble(bad, files)
    assert not (tmp_path / "cache" / "ct2-whisper-fake").exists()

    good = ct2_whisper.Checkpoint(**{**base.__dict__, "name": "fake", "model_sha256": sha})
    out = ct2_whisper._assemble(good, files)
    assert out == tmp_path / "cache" / "ct2-whisper-fake"
    assert (out / "model.bin").read_bytes() == b"first half|second half" and (out / "config.json").is_file()
    mtime = (out / "model.bin").stat().st_mtime_ns
    assert ct2_whisper._assemble(good, files) == out and (out / "model.bin").stat().st_mtime_ns == mtime
    parts[1].write_bytes(b"second half, changed")  # a reinstalled package: joined again, and checked
    with pytest.raises(ct2_whisper.ConversionError, match="sha256"):
        ct2_whisper._assemble(good, files)


def test_checkpoint_table():
    """Every known checkpoint is pinned in the `whisper` extra and has its own output dir."""
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["whisper"]
    cks = ct2_whisper.CHECKPOINTS.values()
    assert {r for c in cks for r in c.requirements} <= set(extra)
    assert len({c.out_name for c in cks}) == len({c.env for c in cks}) == len(cks)
    if ct2_whisper.ENV_DIR not in os.environ:
        assert ct2_whisper.default_out() == ct2_whisper.default_out("tiny.en") == ROOT / ".cache" / "whisper-tiny.en-hf"
    assert {c.name: c.hp["vocab_size"] for c in cks} == {"tiny.en": 51864, "base": 51865}
