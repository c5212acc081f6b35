"""The encoder on the real audio length (``encoder_real_length``): same real-frame
outputs as the stock 30 s window, in the reference and in the vLLM engine."""

from __future__ import annotations

import pytest

from vllm_affinity import encoder as E

from .conftest import MAX_NEW, PROMPT, load_audio, run_engine_subprocess
from .parity import json_compare


TOL = 1e-5  # measured ~2.5e-7 on the tiny model (fp32)


def _both(reference, path):
    audio = [load_audio(path)]
    return (reference.audio_embeddings(audio)[0],
            reference.audio_embeddings(audio, encoder_real_length=True)[0])


def test_real_length_outputs_equal_the_30s_window(reference, clips):
    worst = 0.0
    for path in clips:
        full, trimmed = _both(reference, path)
        assert trimmed.shape == full.shape
        worst = max(worst, float((full - trimmed).abs().max()))
    print(f"\nencoder on the real length vs 30 s window: max |diff| = {worst:.2e} over {len(clips)} clips")
    assert worst <= TOL


def test_margin_is_needed(reference, clips, monkeypatch):
    """Without the convolutions' margin the last real tokens change: the check is sensitive."""
    monkeypatch.setattr(E, "MARGIN", 0)
    full, trimmed = _both(reference, clips[1])
    assert float((full - trimmed).abs().max()) > 100 * TOL


def test_output_lengths_match_the_stock_formula():
    for frames in (1, 2, 10, 11, 399, 400, 1999, 3000):
        feat = (frames - 1) // 2 + 1
        assert E.encoder_output_lengths(frames) == (feat, (feat - 2) // 2 + 1)


@pytest.mark.engine
def test_engine_with_real_length_encoder_matches_reference(tiny_model, clips, reference, tmp_path):
    spec = {"input": {"keep_ratio": 0.5}, "encoder_real_length": True}
    job = {"model": str(tiny_model), "hf_overrides": {"affinity": spec}, "prompt": PROMPT,
           "max_tokens": MAX_NEW, "logprobs": 20, "requests": [{"audios": [str(c)]} for c in clips[:3]]}
    run = run_engine_subprocess(job, tmp_path, env={"VLLM_LOGGING_LEVEL": "DEBUG"})
    for res, clip in zip(run["results"], clips[:3]):
        ref = reference.generate(PROMPT, [load_audio(clip)], max_new_tokens=MAX_NEW, keep_ratio=0.5,
                                 encoder_real_length=True)
        par = json_compare(res, ref)
        assert par.ok, str(par)
    assert "vllm-affinity: encoder on 200 of 3000 mel frames" in run["log"]  # the 2 s clip
