"""Deep-layer merging in the real vLLM CPU engine against the HF reference.

Each server configuration runs in its own engine process (tests/helpers). Parity:
same prompt ids, same 32 greedy tokens, per-step log-probs within LOGPROB_TOL of the
reference with the same deep merge; deliberately wrong deep merges must be rejected.
Plus: mixed batches equal requests alone, KV blocks read from the engine's KV-cache
managers, cancellation and preemption, edge audio.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from vllm_affinity import accounting
from vllm_affinity import pooling as P
from vllm_affinity.plan import DeepPlan

from .conftest import CACHE, ENGINE_KW, PROMPT, load_audio, run_engine_subprocess
from .parity import json_compare

pytestmark = pytest.mark.engine

MAX_NEW = 32
BLOCK = 32  # smallest block the CPU attention kernel takes; fine-grained KV accounting
N_LAYERS = 4
TWO_AUDIO_PROMPT = PROMPT.replace(
    "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n",
    "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\n",
)
TEXT_PROMPT = "<|im_start|>user\nhello there, how are you today?<|im_end|>\n<|im_start|>assistant\n"

# (merge_layer, deep keep_ratio, input keep_ratio or None): L in {1, layers-2}, r in {0.5, 0.1}
CONFIGS = {
    "L1-r0.5-in0.74": (1, 0.5, 0.74),
    "L1-r0.1": (1, 0.1, None),
    "L2-r0.5": (2, 0.5, None),
    "L2-r0.1-in0.74": (2, 0.1, 0.74),
}


def spec_of(layer, ratio, input_ratio):
    spec = {"deep": {"merge_layer": layer, "keep_ratio": ratio, "window": 3}}
    if input_ratio is not None:
        spec["input"] = {"keep_ratio": input_ratio}
    return spec


@pytest.fixture(scope="session")
def edge_clips(clips):
    """0.1 s of speech, 5 s of silence, 5 s of white noise, 45 s of speech (> 30 s)."""
    import soundfile as sf

    d = CACHE / "edge"
    d.mkdir(parents=True, exist_ok=True)
    wave, sr = load_audio(clips[1])
    rng = np.random.default_rng(0)
    out = {
        "speech-0.1s": wave[: sr // 10],
        "silence-5s": np.zeros(5 * sr, dtype=np.float32),
        "noise-5s": (0.1 * rng.standard_normal(5 * sr)).astype(np.float32),
        "speech-45s": np.concatenate([load_audio(c)[0] for c in clips[:4]] * 2)[: 45 * sr],
    }
    paths = {}
    for name, w in out.items():
        paths[name] = d / f"{name}.wav"
        if not paths[name].exists():
            sf.write(paths[name], w, sr)
    return paths


def _requests(clips, edge_clips, name):
    reqs = [{"audios": [str(c)]} for c in clips]
    if name == "L1-r0.5-in0.74":  # the mixed batch: 6 requests
        reqs += [
            {"prompt": TEXT_PROMPT},
            {"prompt": TWO_AUDIO_PROMPT, "audios": [str(clips[1]), str(clips[3])]},
        ]
    if name == "L2-r0.1-in0.74":
        reqs += [{"audios": [str(p)]} for p in edge_clips.values()]
    return reqs


@pytest.fixture(scope="session")
def deep_runs(tiny_model, clips, edge_clips, tmp_path_factory):
    """One engine process per configuration, all requests in one batch."""
    runs = {}
    for name, (layer, ratio, input_ratio) in CONFIGS.items():
        job = {
            "model": str(tiny_model), "hf_overrides": {"affinity": spec_of(layer, ratio, input_ratio)},
            "prompt": PROMPT, "max_tokens": MAX_NEW, "logprobs": 20,
            "requests": _requests(clips, edge_clips, name),
            "engine_kw_extra": {"block_size": BLOCK},
            "alone": name == "L1-r0.5-in0.74",
        }
        runs[name] = (job, run_engine_subprocess(job, tmp_path_factory.mktemp(name)))
    return runs


def _reference(reference, req, layer, ratio, input_ratio, **wrong):
    audios = [load_audio(p) for p in req.get("audios", [])]
    kw = dict(keep_ratio=input_ratio or 1.0, deep_merge_layer=layer, deep_keep_ratio=ratio, deep_window=3)
    kw.update(wrong)
    return reference.generate(req.get("prompt", PROMPT), audios, max_new_tokens=MAX_NEW, **kw)


WRONG = {
    "one layer later": lambda L: {"deep_merge_layer": L + 1 if L + 1 <= N_LAYERS - 2 else L - 1},
    "window 1": lambda L: {"deep_window": 1},
    "uniform bins": lambda L: {"deep_method": "uniform"},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_deep_parity_with_reference(deep_runs, reference, name):
    layer, ratio, input_ratio = CONFIGS[name]
    job, run = deep_runs[name]
    for i, (req, res) in enumerate(zip(job["requests"], run["results"])):
        ref = _reference(reference, req, layer, ratio, input_ratio)
        par = json_compare(res, ref)
        assert par.ok, f"{name} request {i} ({req}): {par}"
        assert len(res["token_ids"]) == MAX_NEW
        if ref.deep_tokens_kept:
            assert ref.deep_tokens_kept == [P.num_kept(m, ratio) for m in ref.audio_tokens_kept]
        if i == 2:  # sensitivity, on the 11 s clip
            for what, make in WRONG.items():
                bad = json_compare(res, _reference(reference, req, layer, ratio, input_ratio, **make(layer)))
                assert not bad.ok, f"{name}: parity cannot tell a deep merge with {what} apart: {bad}"


def test_mixed_batch_equals_requests_alone(deep_runs):
    job, run = deep_runs["L1-r0.5-in0.74"]
    assert len(job["requests"]) >= 6
    kinds = {("text" if not r.get("audios") else f"{len(r['audios'])} audio") for r in job["requests"]}
    assert kinds == {"text", "1 audio", "2 audio"}
    for i, (together, alone) in enumerate(zip(run["results"], run["alone"])):
        assert together["prompt_token_ids"] == alone["prompt_token_ids"], i
        assert together["token_ids"] == alone["token_ids"], f"request {i} differs in a batch"
        for a, b in zip(together["logprobs"], alone["logprobs"]):
            for t, v in a.items():
                assert abs(v - b[t]) <= 1e-4


def test_edge_audio_runs_and_matches(deep_runs, edge_clips):
    """0.1 s, silence, white noise, 45 s (truncated to the 30 s the encoder accepts)."""
    job, run = deep_runs["L2-r0.1-in0.74"]
    names = list(edge_clips)
    res = dict(zip(names, run["results"][-len(names):]))
    audio_id = max(set(res["speech-45s"]["prompt_token_ids"]), key=res["speech-45s"]["prompt_token_ids"].count)
    assert res["speech-45s"]["prompt_token_ids"].count(audio_id) == P.num_kept(750, 0.74)
    assert res["speech-0.1s"]["prompt_token_ids"].count(audio_id) == 2  # 0.1 s: 10 mel frames -> 2 tokens, kept
    # parity of these requests is covered by test_deep_parity_with_reference


# -- KV accounting -------------------------------------------------------------------------
def _probe(tiny_model, spec, audio, tmp_path, budget):
    # a long text prefix: the first step computes part of the prompt, the audio waits
    long_prompt = PROMPT.replace("Audio 1:", "hello " * 400 + "Audio 1:")
    job = {"model": str(tiny_model), "hf_overrides": {"affinity": spec}, "prompt": PROMPT,
           "long_prompt": long_prompt, "audio": str(audio), "max_tokens": 8,
           "engine_kw": ENGINE_KW,
           "engine_kw_extra": {"block_size": BLOCK, "max_num_batched_tokens": budget,
                                             "enable_chunked_prefill": True}, "out": str(tmp_path / "o.json")}
    return run_engine_subprocess({**job, "task": "kv_probe"}, tmp_path)


@pytest.fixture(scope="module")
def kv_on(tiny_model, clips, tmp_path_factory):
    return _probe(tiny_model, spec_of(1, 0.1, None), clips[4], tmp_path_factory.mktemp("kv-on"),
                  budget=1024)  # >= one audio item (750), which the deep stage never splits


@pytest.fixture(scope="module")
def kv_off(tiny_model, clips, tmp_path_factory):
    return _probe(tiny_model, "off", clips[4], tmp_path_factory.mktemp("kv-off"), budget=512)


def test_kv_layout_stock_when_deep_off(kv_off):
    assert kv_off["groups"] == ["FullAttentionSpec"]
    n = kv_off["num_computed_tokens"]
    assert kv_off["blocks"] == [math.ceil(n / BLOCK)]


def test_accounting_equals_engine_blocks(kv_on, kv_off):
    """vllm_affinity.accounting (used by the metrics and the benchmarks) predicts the
    blocks the engine's KV-cache managers hold, with and without the deep stage."""
    (offset, n_audio), = kv_on["audio_ranges"]
    n = kv_on["num_computed_tokens"]
    compacted = DeepPlan.from_ranges([(offset, n_audio)], 0.1).compacted(n)
    assert kv_on["blocks"] == accounting.KVLayout(N_LAYERS, 1).blocks_per_group(n, compacted, BLOCK)
    m = kv_off["num_computed_tokens"]
    assert kv_off["blocks"] == accounting.KVLayout(N_LAYERS).blocks_per_group(m, m, BLOCK)


def test_30s_utterance_holds_exactly_the_compacted_deep_blocks(kv_on, kv_off):
    assert kv_on["groups"] == ["FullAttentionSpec", "AffinityDeepAttentionSpec"]
    (offset, n_audio), = kv_on["audio_ranges"]
    assert n_audio == 750  # 30 s at 25 tokens/s
    n = kv_on["num_computed_tokens"]
    compacted = n - (n_audio - P.num_kept(n_audio, 0.1))
    shallow, deep = kv_on["blocks"]
    assert shallow == math.ceil(n / BLOCK) == kv_off["blocks"][0]
    assert deep == math.ceil(compacted / BLOCK)
    assert deep == math.ceil(DeepPlan.from_ranges([(offset, n_audio)], 0.1).compacted(n) / BLOCK)
    assert deep < shallow / 4
    print(f"\n30 s utterance, {n} tokens computed: deep-group blocks off={kv_off['blocks'][0]} "
          f"on={deep} (shallow group {shallow}); block_size={BLOCK}")


@pytest.mark.parametrize("which", ["on", "off"])
def test_blocks_return_after_finish_and_mid_prefill_cancel(kv_on, kv_off, which):
    kv = kv_on if which == "on" else kv_off
    assert kv["free_after_finish"] == kv["free_initial"]
    assert 0 < kv["cancel_computed"] < kv["cancel_prompt_len"], "the cancel was not mid-prefill"
    assert sum(kv["cancel_blocks_mid"]) > 0
    assert kv["free_after_cancel"] == kv["free_initial"]


# -- preemption ----------------------------------------------------------------------------
def test_forced_preemption_gives_the_same_outputs(deep_runs, tiny_model, tmp_path):
    job, run = deep_runs["L1-r0.5-in0.74"]
    order = [4, 2, 3]  # 30 s, 11 s, 19.5 s
    tight = dict(job, alone=False, requests=[job["requests"][i] for i in order])
    # max_model_len 640 needs 20 + 20 blocks of 32 tokens; give it 44. The 30 s and 11 s
    # requests are admitted with 42 blocks and need 46 after 32 new tokens: the scheduler
    # must preempt (and later recompute) one of them.
    page = 2 * 2 * 2 * 32 * BLOCK * 4  # (k, v) x kv_heads x layers per group x head_dim x block x fp32
    tight["engine_kw_extra"] = {"block_size": BLOCK, "max_model_len": 640, "kv_cache_memory_bytes": 44 * page}
    res = run_engine_subprocess(tight, tmp_path)
    assert res["preemptions"] > 0, "the KV budget did not force a preemption"
    for a, i in zip(res["results"], order):
        b = run["results"][i]
        assert a["prompt_token_ids"] == b["prompt_token_ids"]
        assert a["token_ids"] == b["token_ids"], f"request {i} changed after preemption"


def test_merge_layer_out_of_range_stops_start_up(tiny_model, tmp_path):
    job = {"model": str(tiny_model), "hf_overrides": {"affinity": spec_of(3, 0.5, None)}, "prompt": PROMPT,
           "max_tokens": 1, "logprobs": 0, "requests": []}
    with pytest.raises(AssertionError, match=r"deep.merge_layer=3 resolves to layer 3, but this model has 4"):
        run_engine_subprocess(job, tmp_path)


@pytest.mark.parametrize("spec, budget_after", [
    ("paper-aggressive", 3000),  # 30 s windows up to 120 s: 4 x 750 placeholders
    (spec_of(1, 0.3, 0.74), 750),  # one 30 s window
])
def test_small_step_budget_still_answers_a_30s_clip(tiny_model, clips, tmp_path, spec, budget_after):
    """As a new user would try it: max_num_batched_tokens=256 with a deep stage and a 30 s
    clip (750 placeholders, never split across steps). The config hook raises the step
    budget to the longest audio (logged); the request is answered, not left waiting."""
    job = {"model": str(tiny_model), "hf_overrides": {"affinity": spec}, "prompt": PROMPT, "max_tokens": 4,
           "logprobs": 0, "requests": [{"audios": [str(clips[4])]}], "engine_kw_extra": {"max_num_batched_tokens": 256}}
    out = run_engine_subprocess(job, tmp_path)
    assert len(out["results"][0]["token_ids"]) == 4
    assert f"max_num_batched_tokens 256 -> {budget_after}" in out["log"]


# -- size-weighted attention above the merge (deep.size_weighted) ---------------------------
SW_CONFIG = (1, 0.25, None)  # merge after layer 1 of 4, keep 25% of each span


@pytest.fixture(scope="module")
def sw_deep_run(tiny_model, clips, tmp_path_factory):
    layer, ratio, _ = SW_CONFIG
    spec = {"deep": {"merge_layer": layer, "keep_ratio": ratio, "window": 3, "size_weighted": True}}
    job = {"model": str(tiny_model), "hf_overrides": {"affinity": spec}, "prompt": PROMPT, "max_tokens": MAX_NEW,
           "logprobs": 20, "requests": [{"audios": [str(c)]} for c in clips[:4]] + [{"prompt": TEXT_PROMPT}],
           "engine_kw_extra": {"block_size": BLOCK}}
    return job, run_engine_subprocess(job, tmp_path_factory.mktemp("sw-deep"))


def _sw_reference(reference, req, **kw):
    layer, ratio, _ = SW_CONFIG
    audios = [load_audio(p) for p in req.get("audios", [])]
    return reference.generate(req.get("prompt", PROMPT), audios, max_new_tokens=MAX_NEW, deep_merge_layer=layer,
                              deep_keep_ratio=ratio, deep_window=3, deep_size_weighted=True, **kw)


#: deliberately wrong biases for the layers above the merge
SW_WRONG = {
    "plain attention": {"deep_size_weighted": False},
    "2x log size": {"deep_bias_fn": lambda s: 2 * s.double().log()},
    "log(size + 1)": {"deep_bias_fn": lambda s: (s + 1).double().log()},
    "sizes reversed": {"deep_bias_fn": lambda s: s.flip(0).double().log()},
}


def test_deep_size_weighted_parity_with_reference(sw_deep_run, reference):
    """Qwen2-Audio (tiny): the padded-head deep attention = the reference's
    softmax(qk/sqrt(d) + log size) in the layers above the merge, prefill and decode;
    a text-only request is unaffected; every wrong bias is rejected."""
    job, run = sw_deep_run
    for i, (req, res) in enumerate(zip(job["requests"], run["results"])):
        par = json_compare(res, _sw_reference(reference, req))
        assert par.ok, f"size-weighted deep request {i} ({req}): {par}"
        print(f"request {i}: {par}")
    req, res = job["requests"][2], run["results"][2]  # the 11 s clip
    for what, kw in SW_WRONG.items():
        kw = dict(kw)
        if kw.pop("deep_size_weighted", True) is False:
            layer, ratio, _ = SW_CONFIG
            ref = reference.generate(PROMPT, [load_audio(req["audios"][0])], max_new_tokens=MAX_NEW,
                                     deep_merge_layer=layer, deep_keep_ratio=ratio, deep_window=3)
        else:
            ref = _sw_reference(reference, req, **kw)
        bad = json_compare(res, ref)
        print(f"wrong variant {what!r}: {bad}")
        assert not bad.ok, f"parity cannot tell {what} apart: {bad}"


def test_deep_size_weighted_kv_layout(sw_deep_run):
    """The deep group's head is padded to the next size the backend supports above head_dim
    + 1 (tiny model, CPU: 32 -> 64); vLLM gives the shallow group the same page bytes (here by
    a larger block, the ratio being whole; else by padding the page)."""
    _, run = sw_deep_run
    groups = {g["spec"]: g for g in run["kv_groups"]}
    deep, shallow = groups["AffinityDeepAttentionSpec"], groups["FullAttentionSpec"]
    assert deep["head_size"] > shallow["head_size"] and deep["head_size"] % 8 == 0
    assert deep["page_bytes"] == shallow["page_bytes"]  # vLLM unifies page sizes
    assert shallow["layers"] == SW_CONFIG[0] + 1 and deep["layers"] == N_LAYERS - SW_CONFIG[0] - 1
    print(run["kv_groups"])


# -- deep.kv_block_align: each span drops a multiple of the KV block (prefix caching stays on) ----
# kv_block_align left out: 'auto', i.e. 'keep_more' under vLLM's default prefix caching
ALIGNED = {"deep": {"merge_layer": 1, "keep_ratio": 0.3, "window": 3}}


@pytest.fixture(scope="module")
def aligned_run(tiny_model, clips, tmp_path_factory):
    job = {"model": str(tiny_model), "hf_overrides": {"affinity": ALIGNED}, "prompt": PROMPT,
           "max_tokens": MAX_NEW, "logprobs": 20, "requests": [{"audios": [str(c)]} for c in clips],
           "engine_kw_extra": {"block_size": BLOCK, "enable_prefix_caching": True}}
    return job, run_engine_subprocess(job, tmp_path_factory.mktemp("aligned"))


def test_aligned_deep_stage_matches_reference_with_the_aligned_counts(aligned_run, reference):
    """The engine keeps K' = m - bs*floor((m - K)/bs) rows per span (bs = 32 here), and equals
    the reference told those counts; the reference with the unaligned K is rejected."""
    from vllm_affinity.plan import deep_kept_count

    job, run = aligned_run
    assert "prefix caching kept" in run["log"] and "deep.kv_block_align=keep_more (prefix caching on)" in run["log"]
    aligned_some = False
    for i, (req, res) in enumerate(zip(job["requests"], run["results"])):
        def pool(x, align="keep_more"):
            k = deep_kept_count(x.shape[0], 0.3, BLOCK, align)
            return P.group_sizes(x, k, "affinity", 3)

        ref = _reference(reference, req, 1, 0.3, None, deep_pool_fn=pool)
        par = json_compare(res, ref)
        assert par.ok, f"request {i}: {par}"
        m = ref.audio_tokens_kept[0]
        assert ref.deep_tokens_kept == [deep_kept_count(m, 0.3, BLOCK, "keep_more")]
        assert (m - ref.deep_tokens_kept[0]) % BLOCK == 0
        if deep_kept_count(m, 0.3, BLOCK, "keep_more") != P.num_kept(m, 0.3):
            aligned_some = True
            bad = json_compare(res, _reference(reference, req, 1, 0.3, None,
                                               deep_pool_fn=lambda x: pool(x, "off")))
            assert not bad.ok, f"request {i}: the unaligned count is not told apart: {bad}"
    assert aligned_some  # the clips exercise the rounding
