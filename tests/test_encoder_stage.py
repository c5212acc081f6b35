"""The encoder stage on Qwen2-Audio (``encoder: {merge_layer, keep_ratio, window, method}``).

After encoder layer E each 30 s window's real positions are merged into ``2 K`` groups,
``K = num_kept(window tokens, keep_ratio)``; the encoder's stride-2 pool then gives exactly
K tokens, which the input and deep stages pool further (the processor's counts compose).

Ground truth: the reference's :meth:`ReferenceQwen2Audio.encode_merged`, written from
transformers' encoder forward (stock 30 s window with its padding mask up to layer E), not
from the plugin's real-length path. The tiny model's encoder has 2 layers, so E = 0 (E = 1
leaves no layer after the merge and is refused at start-up); "one layer later" below is the
reference merging after the last layer, a variant the test must reject.
"""

from __future__ import annotations

import pytest
import torch

from vllm_affinity import encoder as E
from vllm_affinity import pooling as P
from vllm_affinity_tools.reference.base import to_16k_mono

from .conftest import MAX_NEW, PROMPT, load_audio, run_engine_subprocess
from .parity import json_compare

TOL = 1e-5  # plugin function vs reference on transformers' encoder; measured <= 1.1e-6

COMPOSED = {  # all three stages
    "encoder": {"merge_layer": 0, "keep_ratio": 0.5},
    "input": {"keep_ratio": 0.74},
    "deep": {"merge_layer": 2, "keep_ratio": 0.2, "window": 3},
}
WINDOWED = {  # the encoder stage alone, equal-size bins, audio over 30 s in windows
    "encoder": {"merge_layer": -2, "keep_ratio": 0.25, "method": "uniform"},
    "long_audio": "windows",
    "max_audio_seconds": 70,
}


def _ref_kwargs(spec: dict, **wrong) -> dict:
    enc = dict(spec["encoder"])
    enc["merge_layer"] = enc["merge_layer"] % 2  # tiny encoder: 2 layers
    kw = {"encoder_stage": {**enc, **wrong.pop("encoder", {})}}
    if "input" in spec:
        kw["keep_ratio"] = spec["input"]["keep_ratio"]
    if "deep" in spec:
        d = spec["deep"]
        kw.update(deep_merge_layer=d["merge_layer"], deep_keep_ratio=d["keep_ratio"], deep_window=d["window"])
    if spec.get("long_audio") == "windows":
        kw["long_audio"] = "windows"
    kw.update(wrong)
    return kw


def test_plugin_merge_equals_reference_on_the_transformers_encoder(reference, clips):
    tower = reference.model.model.audio_tower
    worst = 0.0
    for path in clips:
        feats, fmask = reference.features([to_16k_mono(*load_audio(path))])
        frames = int(fmask[0].sum())
        for ratio in (0.5, 0.25):
            with torch.no_grad():
                got, sizes = E.encode_merged(tower, feats[0], frames, 0, ratio)
            ref = reference.encode_merged(feats, fmask, merge_layer=0, keep_ratio=ratio)[0]
            assert got.shape[0] == E.encoder_stage_tokens(frames, ratio) == ref.shape[0]
            assert int(sizes.sum()) == E.encoder_output_lengths(frames)[0] and sizes.numel() == 2 * got.shape[0]
            worst = max(worst, float((got - ref).abs().max()))
    print(f"\nencoder stage, plugin vs reference: max |diff| = {worst:.2e} over {len(clips)} clips x 2 ratios")
    assert worst <= TOL


@pytest.fixture(scope="module")
def composed_run(tiny_model, clips, tmp_path_factory):
    job = {"model": str(tiny_model), "hf_overrides": {"affinity": COMPOSED}, "prompt": PROMPT,
           "max_tokens": MAX_NEW, "logprobs": 20, "requests": [{"audios": [str(c)]} for c in clips]}
    return run_engine_subprocess(job, tmp_path_factory.mktemp("enc-composed"), env={"VLLM_LOGGING_LEVEL": "DEBUG"})


@pytest.fixture(scope="module")
def windowed_run(tiny_model, clips, long_clips, tmp_path_factory):
    job = {"model": str(tiny_model), "hf_overrides": {"affinity": WINDOWED}, "prompt": PROMPT,
           "max_tokens": MAX_NEW, "logprobs": 20, "engine_kw_extra": {"max_model_len": 4096},
           "requests": [{"audios": [str(long_clips[0])]}, {"audios": [str(clips[2])]}]}
    return run_engine_subprocess(job, tmp_path_factory.mktemp("enc-windowed"))


@pytest.mark.engine
def test_composed_stages_match_reference(composed_run, reference, clips):
    """Encoder stage + input stage + deep stage: same prompt ids (hence the same composed
    counts), same greedy tokens, log-probs within tolerance, every clip."""
    audio_id = reference.audio_token_id
    for res, path in zip(composed_run["results"], clips):
        ref = reference.generate(PROMPT, [load_audio(path)], max_new_tokens=MAX_NEW, **_ref_kwargs(COMPOSED))
        enc_tokens = ref.audio_tokens_in[0]
        assert res["prompt_token_ids"].count(audio_id) == P.num_kept(enc_tokens, 0.74)
        assert ref.deep_tokens_kept == [P.num_kept(P.num_kept(enc_tokens, 0.74), 0.2)]
        par = json_compare(res, ref)
        print(f"\n{path.name}: encoder stage -> {enc_tokens} tokens -> {P.num_kept(enc_tokens, 0.74)} -> "
              f"{ref.deep_tokens_kept[0]}; {par}")
        assert par.ok, f"{path.name}: {par}"
    assert "vllm-affinity: encoder stage: 200 mel frames, 100 positions -> 50 after encoder layer 0, 25 tokens" \
        in composed_run["log"]  # the 2 s clip


def _first_member(x, sizes):
    return x[sizes.cumsum(0) - sizes]


WRONG = {
    "one layer later": {"encoder": {"merge_layer": 1}},
    "merge after the pool": {"encoder": {"after_pool": True}},
    "first member, not the mean": {"encoder": {"merge_fn": _first_member}},
    "uniform bins": {"encoder": {"method": "uniform"}},
    "no encoder stage": {"encoder_stage": None, "keep_ratio": 0.74 * 0.5},
}


@pytest.mark.engine
@pytest.mark.parametrize("name", list(WRONG))
def test_wrong_encoder_stages_are_rejected(name, composed_run, reference, clips):
    res = composed_run["results"][2]  # the 11 s clip
    kw = _ref_kwargs(COMPOSED, **{k: (dict(v) if isinstance(v, dict) else v) for k, v in WRONG[name].items()})
    bad = json_compare(res, reference.generate(PROMPT, [load_audio(clips[2])], max_new_tokens=MAX_NEW, **kw))
    print(f"\n{name}: {bad}")
    assert not bad.ok, f"parity cannot tell '{name}' apart: {bad}"


@pytest.mark.engine
def test_windowed_encoder_stage_matches_reference(windowed_run, reference, clips, long_clips):
    """45 s = two windows, each merged on its own (750 -> 188, 375 -> 94), then concatenated."""
    audio_id = reference.audio_token_id
    for res, path, n in zip(windowed_run["results"], [long_clips[0], clips[2]], [188 + 94, 69]):
        ref = reference.generate(PROMPT, [load_audio(path)], max_new_tokens=MAX_NEW, **_ref_kwargs(WINDOWED))
        assert ref.audio_tokens_in == [n] and res["prompt_token_ids"].count(audio_id) == n
        par = json_compare(res, ref)
        print(f"\n{path.name}: {n} tokens after the encoder stage; {par}")
        assert par.ok, f"{path.name}: {par}"


@pytest.mark.engine
def test_encoder_merge_layer_out_of_range_stops_start_up(tiny_model, tmp_path):
    spec = {"encoder": {"merge_layer": 1, "keep_ratio": 0.5}}
    job = {"model": str(tiny_model), "hf_overrides": {"affinity": spec}, "prompt": PROMPT,
           "max_tokens": 1, "logprobs": 0, "requests": []}
    with pytest.raises(AssertionError, match=r"encoder\.merge_layer=1 resolves to layer 1, but this model's "
                                             r"audio encoder has 2 layers"):
        run_engine_subprocess(job, tmp_path)


# -- proportional (size-weighted) attention in the encoder layers after the merge -------------
SW_SPEC = {"encoder": {"merge_layer": 0, "keep_ratio": 0.5, "size_weighted": True}, "input": {"keep_ratio": 0.74}}


def test_size_weighted_encoder_equals_the_broadcast_mean_reference(reference, clips):
    """The plugin's log-size bias equals proportional attention by definition (the reference:
    every position replaced by its group's mean, stock layers on the full length, one row per
    group); the bias is not a no-op on this model (plain attention and reversed sizes differ)."""
    tower = reference.model.model.audio_tower
    worst, plain, reversed_ = 0.0, float("inf"), float("inf")
    for path in clips:
        feats, fmask = reference.features([to_16k_mono(*load_audio(path))])
        frames = int(fmask[0].sum())
        with torch.no_grad():
            got, sizes = E.encode_merged(tower, feats[0], frames, 0, 0.5, size_weighted=True)
        kw = dict(merge_layer=0, keep_ratio=0.5)
        ref = reference.encode_merged(feats, fmask, size_weighted=True, **kw)[0]
        worst = max(worst, float((got - ref).abs().max()))
        if bool((sizes > 1).any()):
            plain = min(plain, float((got - reference.encode_merged(feats, fmask, **kw)[0]).abs().max()))
            rev = reference.encode_merged(feats, fmask, size_weighted=True, repeat_fn=lambda s: s.flip(0), **kw)[0]
            reversed_ = min(reversed_, float((got - rev).abs().max()))
    print(f"\nsize-weighted encoder: plugin vs broadcast-mean reference max |diff| {worst:.2e}; "
          f"vs plain attention >= {plain:.2e}; vs reversed sizes >= {reversed_:.2e}")
    assert worst <= TOL
    assert plain > 100 * TOL and reversed_ > 100 * TOL


@pytest.fixture(scope="module")
def sw_run(tiny_model, clips, tmp_path_factory):
    job = {"model": str(tiny_model), "hf_overrides": {"affinity": SW_SPEC}, "prompt": PROMPT,
           "max_tokens": MAX_NEW, "logprobs": 20, "requests": [{"audios": [str(c)]} for c in clips]}
    return run_engine_subprocess(job, tmp_path_factory.mktemp("enc-sw"), env={"VLLM_LOGGING_LEVEL": "DEBUG"})


@pytest.mark.engine
def test_size_weighted_encoder_stage_matches_reference(sw_run, reference, clips):
    for res, path in zip(sw_run["results"], clips):
        ref = reference.generate(PROMPT, [load_audio(path)], max_new_tokens=MAX_NEW, **_ref_kwargs(SW_SPEC))
        par = json_compare(res, ref)
        print(f"\n{path.name}: size-weighted encoder stage; {par}")
        assert par.ok, f"{path.name}: {par}"
    assert "size-weighted (proportional) attention after the merge" in sw_run["log"]


@pytest.mark.engine
@pytest.mark.parametrize("name, wrong", [("plain attention after the merge", {"size_weighted": False}),
                                         ("sizes reversed", {"repeat_fn": lambda s: s.flip(0)})])
def test_wrong_size_weighted_encoders_are_rejected(name, wrong, sw_run, reference, clips):
    res = sw_run["results"][2]  # the 11 s clip
    bad = json_compare(res, reference.generate(PROMPT, [load_audio(clips[2])], max_new_tokens=MAX_NEW,
                                               **_ref_kwargs(SW_SPEC, encoder=wrong)))
    print(f"\n{name}: {bad}")
    assert not bad.ok, f"parity cannot tell '{name}' apart: {bad}"
