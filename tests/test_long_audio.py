"""Audio longer than Qwen2-Audio's 30 s encoder window (``long_audio: windows``).

Each 30 s window is encoded as an audio of its own, the windows' embeddings are
concatenated, then both pooling stages run on the whole audio. The engine must match
the reference doing the same thing, count exactly, and size vLLM's encoder cache for
the longest audio the server accepts.
"""

from __future__ import annotations

import numpy as np
import pytest

from vllm_affinity import encoder as E
from vllm_affinity import pooling as P

from .conftest import MAX_NEW, PROMPT, load_audio, run_engine_subprocess
from .parity import json_compare

SR = 16000
WIN = 30 * SR


@pytest.mark.parametrize(
    "samples, expected",
    [
        (WIN, [(0, WIN)]),
        (WIN + 1, [(0, WIN)]),  # a 1-sample tail is dropped
        (WIN + E.MIN_TAIL_SAMPLES, [(0, WIN), (WIN, WIN + E.MIN_TAIL_SAMPLES)]),
        (45 * SR, [(0, WIN), (WIN, 45 * SR)]),
        (800, [(0, 800)]),  # a short audio is its own (only) window
        (0, [(0, 0)]),
    ],
)
def test_window_bounds(samples, expected):
    assert E.window_bounds(samples, WIN) == expected


def test_window_bounds_cover_the_audio_contiguously():
    for samples in range(WIN - 3, 4 * WIN + 5000, 7919):
        b = E.window_bounds(samples, WIN)
        assert b[0][0] == 0 and all(x[1] == y[0] for x, y in zip(b, b[1:]))
        assert samples - b[-1][1] < E.MIN_TAIL_SAMPLES


def test_reference_windows_concatenate_encoder_outputs(reference, long_clips, clips):
    audio = load_audio(long_clips[0])
    whole = reference.audio_embeddings([audio], long_audio="windows")[0]
    first, rest = (reference.audio_embeddings([(audio[0][a:b], SR)])[0] for a, b in ((0, WIN), (WIN, None)))
    assert whole.shape[0] == 750 + rest.shape[0] == 750 + 375
    assert torch_equal(whole, np.concatenate([first, rest]))
    # audio within one window: windows mode is the stock path
    short = load_audio(clips[1])
    assert torch_equal(reference.audio_embeddings([short], long_audio="windows")[0],
                       reference.audio_embeddings([short])[0])


def torch_equal(a, b) -> bool:
    # windows are batched differently than single audios: equal up to float rounding
    return np.allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


SPEC = {
    "input": {"keep_ratio": 0.5},
    "deep": {"merge_layer": 1, "keep_ratio": 0.5},
    "encoder_real_length": True,
    "long_audio": "windows",
    "max_audio_seconds": 70,
}


@pytest.fixture(scope="module")
def windowed_run(tiny_model, long_clips, clips, tmp_path_factory):
    requests = [{"audios": [str(long_clips[0])]}, {"audios": [str(long_clips[1])]},
                {"audios": [str(clips[1])]}]
    job = {"model": str(tiny_model), "hf_overrides": {"affinity": SPEC}, "prompt": PROMPT,
           "max_tokens": MAX_NEW, "logprobs": 20, "requests": requests,
           "engine_kw_extra": {"max_model_len": 4096}}
    return run_engine_subprocess(job, tmp_path_factory.mktemp("long"), env={"VLLM_LOGGING_LEVEL": "DEBUG"})


@pytest.mark.engine
def test_engine_windows_match_reference(windowed_run, reference, long_clips, clips):
    paths = [long_clips[0], long_clips[1], clips[1]]
    n_in = [750 + 375, 750 + 750 + 125, 125]
    for res, path, n in zip(windowed_run["results"], paths, n_in):
        ref = reference.generate(PROMPT, [load_audio(path)], max_new_tokens=MAX_NEW, keep_ratio=0.5,
                                 encoder_real_length=True, long_audio="windows",
                                 deep_merge_layer=1, deep_keep_ratio=0.5, deep_window=3)
        assert ref.audio_tokens_in == [n]
        audio_id = reference.audio_token_id
        assert res["prompt_token_ids"].count(audio_id) == P.num_kept(n, 0.5)
        par = json_compare(res, ref)
        print(f"\n{path.name}: {n} audio tokens -> {P.num_kept(n, 0.5)}; {par}")
        assert par.ok, f"{path.name}: {par}"


@pytest.mark.parametrize("spec, tokens", [
    ({"long_audio": "windows", "max_audio_seconds": 70}, 3 * 750),
    ({"long_audio": "windows"}, 4 * 750),  # default limit: 120 s
    ({"long_audio": "truncate", "max_audio_seconds": 70}, 750),
    ("off", 750),
])
def test_encoder_budget_is_sized_for_the_longest_accepted_audio(tiny_model, spec, tokens):
    """vLLM sizes its encoder cache and compute budget from the largest item the model
    reports; with windows that is max_audio_seconds' windows x 750 tokens."""
    import vllm_affinity
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    vllm_affinity.register()
    info = MULTIMODAL_REGISTRY.create_processor(
        ModelConfig(str(tiny_model), hf_overrides={"affinity": spec})).info
    assert info.get_mm_max_tokens_per_item(4096, {"audio": 1}) == {"audio": tokens}


@pytest.mark.engine
def test_engine_encoder_cache_holds_the_longest_accepted_audio(windowed_run):
    assert windowed_run["encoder_cache_size"] >= 3 * 750
    assert windowed_run["max_num_encoder_input_tokens"] >= 3 * 750


@pytest.mark.engine
def test_engine_log_states_the_windows(windowed_run):
    assert "encoded in 30 s windows (up to 70 s)" in windowed_run["log"]
    assert "is 45.0 s; Qwen2-Audio's encoder sees the first" not in windowed_run["log"]


@pytest.mark.engine
def test_engine_without_windows_is_rejected_by_the_reference_comparison(windowed_run, reference, long_clips):
    """Sensitivity: the 45 s answer is NOT the truncated-to-30 s reference."""
    ref = reference.generate(PROMPT, [load_audio(long_clips[0])], max_new_tokens=MAX_NEW, keep_ratio=0.5,
                             encoder_real_length=True, deep_merge_layer=1, deep_keep_ratio=0.5, deep_window=3)
    assert not json_compare(windowed_run["results"][0], ref).ok
