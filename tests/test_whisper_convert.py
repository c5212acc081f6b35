"""Whisper tiny.en converted from CTranslate2 (vllm_affinity_tools.checkpoints.ct2_whisper) equals
CTranslate2's own runtime on the same weights.

Both sides run float32 from the same float16 values (exactly up-cast), on the same
log-mel features (the converted dir's WhisperFeatureExtractor), on espeak-ng speech:
  * encoder outputs agree to ENC_TOL (measured max |diff| 2.0e-4 on these clips, 2e-5..4e-4
    on other espeak clips, against outputs of magnitude ~13: fp32 summation-order noise);
  * greedy transcripts (prompt <|startoftranscript|><|notimestamps|>) are the same ids;
  * they are the spoken text, up to tiny.en's errors on synthetic speech (WER bound);
  * a deliberately wrong q/k/v split fails the encoder comparison by orders of magnitude.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pytest

from vllm_affinity_tools.asr import edit_distance, normalise
from vllm_affinity_tools.checkpoints import ct2_whisper

ROOT = Path(__file__).resolve().parents[1]
CLIP_DIR = ROOT / ".cache" / "clips"

# max |HF - CT2| over encoder outputs; measured 5.9e-5, 2.3e-5, 2.0e-4, 1.9e-4 on CLIPS
# (3.6e-4 the worst seen on other espeak clips); a wrong q/k/v split gives ~16
ENC_TOL = 2e-3
# corpus WER of the greedy transcripts vs the synthesised text (normalised: case,
# punctuation, hyphens, numbers <= 20 as words); measured 0.175 (10 / 57 words) on CLIPS
# (tiny.en on espeak-ng voices mishears a few words: "brown fox" -> "round fire", ...)
WER_MAX = 0.30
MAX_NEW = 64

# (text, espeak-ng voice, words per minute): several voices and speeds, one ~11 s clip
CLIPS = [
    ("The quick brown fox jumps over the lazy dog.", "en-us", 130),
    ("Please transcribe this sentence and tell me what the speaker wants.", "en-gb", 140),
    ("One two three four five six seven eight nine ten eleven twelve.", "en-us+f3", 150),
    (
        "Long audio prompts cost time to first token and key value cache memory. "
        "A speech language model listens to audio and answers questions about it.",
        "en-gb+m3",
        130,
    ),
]
SOT, NO_TIMESTAMPS, EOT = 50257, 50362, 50256


# -------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def whisper_dir() -> Path:
    t = time.perf_counter()
    out = ct2_whisper.ensure_checkpoint(log=print)
    print(f"checkpoint ready in {time.perf_counter() - t:.1f}s: {out}")
    return out


@pytest.fixture(scope="module")
def ct2_source() -> ct2_whisper.CT2Model:
    return ct2_whisper.read_ct2_model(ct2_whisper.source_dir() / "model.bin")


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
def ct2_model():
    import ctranslate2

    return ctranslate2.models.Whisper(
        str(ct2_whisper.source_dir()), device="cpu", compute_type="float32", intra_threads=2
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
def test_reader_and_checkpoint_files(whisper_dir, ct2_source, hf_model):
    from transformers import AutoProcessor, GenerationConfig, WhisperConfig

    assert (ct2_source.spec, ct2_source.revision) == ("WhisperSpec", 3)
    assert ct2_source.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
    assert ct2_source["decoder/embeddings/weight"].dtype == np.float16

    for f in ("model.safetensors", "config.json", "generation_config.json", "preprocessor_config.json",
              "tokenizer.json", "tokenizer_config.json", ct2_whisper.STAMP):
        assert (whisper_dir / f).is_file(), f
    cfg = WhisperConfig.from_pretrained(whisper_dir)
    assert cfg.architectures == ["WhisperForConditionalGeneration"]
    for k, v in ct2_whisper.TINY_EN.items():
        assert getattr(cfg, k) == v, k
    gen = GenerationConfig.from_pretrained(whisper_dir)
    assert gen.decoder_start_token_id == SOT and gen.no_timestamps_token_id == NO_TIMESTAMPS
    assert gen.is_multilingual is False
    assert gen.forced_decoder_ids == [[1, NO_TIMESTAMPS]] and gen.max_length == 448
    assert gen.begin_suppress_tokens == [220, EOT] and EOT not in gen.suppress_tokens and SOT in gen.suppress_tokens

    proc = AutoProcessor.from_pretrained(whisper_dir)  # what vLLM loads
    fe, tok = proc.feature_extractor, proc.tokenizer
    assert (fe.feature_size, fe.sampling_rate, fe.hop_length, fe.chunk_length, fe.n_fft) == (80, 16000, 160, 30, 400)
    assert len(tok) == cfg.vocab_size == hf_model.get_output_embeddings().weight.shape[0]
    named = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|0.00|>", "<|30.00|>"]
    assert tok.convert_tokens_to_ids(named) == [EOT, SOT, NO_TIMESTAMPS, 50363, 51863]
    assert tok.prefix_tokens == [SOT, NO_TIMESTAMPS]
    assert tok.decode([SOT, NO_TIMESTAMPS, 15496, 995, 13, EOT], skip_special_tokens=True) == "Hello world."
    assert tok.decode([50363, 50413], decode_with_timestamps=True) == "<|0.00|><|1.00|>"
    # tied output projection
    assert hf_model.proj_out.weight.data_ptr() == hf_model.model.decoder.embed_tokens.weight.data_ptr()


def test_encoder_matches_ct2(hf_encoded, ct2_encoded):
    diffs = []
    for out, ref in zip(hf_encoded, ct2_encoded):
        assert out.shape == ref.shape == (1, 1500, 384)
        diffs.append(float(np.abs(out - ref).max()))
    print(f"encoder max |HF - CT2| per clip: {[f'{d:.2e}' for d in diffs]} (tol {ENC_TOL:g}, "
          f"|CT2| max {max(float(np.abs(r).max()) for r in ct2_encoded):.1f})")
    assert max(diffs) < ENC_TOL


def test_greedy_transcripts_match_ct2_and_text(
    whisper_dir, hf_model, ct2_model, clip_features, hf_encoded, ct2_encoded_sv
):
    """Each runtime decodes from its own encoder output (computed once, compared above)."""
    import torch
    from transformers import WhisperTokenizer
    from transformers.modeling_outputs import BaseModelOutput

    tok = WhisperTokenizer.from_pretrained(whisper_dir)
    errors = words = 0
    for (text, voice, _), f, h, c in zip(CLIPS, clip_features, hf_encoded, ct2_encoded_sv):
        with torch.no_grad():
            hf_ids = hf_model.generate(  # prompt from generation_config: <|startoftranscript|><|notimestamps|>
                torch.from_numpy(f),
                encoder_outputs=BaseModelOutput(last_hidden_state=torch.from_numpy(h)),
                max_new_tokens=MAX_NEW,
            )[0].tolist()
        res = ct2_model.generate(c, [[SOT, NO_TIMESTAMPS]], beam_size=1, max_length=MAX_NEW)[0]
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
    print(f"corpus WER {errors / words:.3f} over {words} words (bound {WER_MAX})")
    assert errors / words < WER_MAX


@pytest.mark.parametrize("qkv_order", ["kqv", "qvk", "vkq"], ids=["swap-q-k", "swap-k-v", "swap-q-v"])
def test_wrong_qkv_split_fails_encoder_check(hf_model, ct2_source, clip_features, ct2_encoded, qkv_order):
    """Sensitivity: the encoder comparison above catches a mis-split fused qkv."""
    import torch

    sd = ct2_whisper.ct2_to_hf_state_dict(ct2_source, qkv_order=qkv_order)
    prefix = "model.encoder."
    enc = copy.deepcopy(hf_model.model.encoder)
    enc.load_state_dict(
        {k[len(prefix):]: torch.from_numpy(v) for k, v in sd.items() if k.startswith(prefix)}, strict=True
    )
    diff = float(np.abs(hf_encode(enc, clip_features[0]) - ct2_encoded[0]).max())
    print(f"{qkv_order}: encoder max |diff| {diff:.3g}")
    assert diff > 100 * ENC_TOL
