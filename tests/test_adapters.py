"""The architectures added on the adapter concept (AudioFlamingo3, GLM-ASR), every test
parametrized over them: both stages in the real vLLM CPU engine against the Hugging Face
reference (vllm_affinity_tools.reference), on tiny random-weight checkpoints with
sharpened attention (vllm_affinity_tools.tiny_af3, tiny_glmasr).

Parity: same prompt ids, same greedy tokens, per-step log-probs within LOGPROB_TOL;
deliberately wrong poolings are rejected; 'off' equals stock vLLM; the deep group's KV
blocks read from the engine equal the plan and the accounting module; a real
`vllm serve` answers an OpenAI audio chat request with the saving in usage."""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import openai
import pytest
import torch

from vllm_affinity import accounting
from vllm_affinity import pooling as P
from vllm_affinity.plan import DeepPlan

from .conftest import CACHE, ENGINE_KW, load_audio, run_engine_subprocess
from .parity import LOGPROB_TOL, MIN_CUT_MARGIN, json_compare

pytestmark = pytest.mark.engine

MAX_NEW = 16
SECONDS = (5.0, 12.0, 45.0)  # one window, one window, two windows (30 s + 15 s)
RATIOS = (1.0, 0.74, 0.5)
DEEP_SPEC = {"input": {"keep_ratio": 0.74}, "deep": {"merge_layer": 1, "keep_ratio": 0.3}}
DEEP_REF = dict(keep_ratio=0.74, deep_merge_layer=1, deep_keep_ratio=0.3)
BLOCK = 32


@dataclass(frozen=True)
class Arch:
    name: str  # as in the start-up log line
    builder: str  # vllm_affinity_tools module with build() and prompt()
    reference: str  # class in vllm_affinity_tools.reference
    audio_tag: str  # where the audio goes in the prompt (a long text prefix goes before it)
    tokens_45s: int  # stock placeholders of the 45 s clip
    step_budget: int  # max_num_batched_tokens the config hook sets with a deep stage (120 s of audio)
    stock_env: tuple = ()  # extra environment of the stock (plugin disabled) engine run
    #: log-prob tolerance against the reference (Qwen3-style q/k-norm models are sharpened x4, not
    #: x8: at x8 stock vLLM and transformers already differ by ~1e-3 on them)
    logprob_tol: float = LOGPROB_TOL
    transcription: bool = False  # vLLM's class implements SupportsTranscription
    omni: bool = False  # a Qwen Omni thinker (M-RoPE; use_audio_in_video refused)
    #: engine settings of every run (e.g. Kimi-Audio takes one audio per prompt)
    engine_kw: tuple = ()
    #: extra engine settings of the stock run only
    stock_engine_kw: tuple = ()
    #: `vllm serve` needs --chat-template <model>/chat_template.jinja (no template in the tokenizer)
    chat_template_file: bool = False
    #: bound of 'off' against stock: float noise only (a wrong 'off' moves log-probs by > 1)
    off_logprob_tol: float = LOGPROB_TOL / 10

    def ok(self, parity) -> bool:
        return parity.same_prompt and parity.same_tokens and parity.max_logprob_diff <= self.logprob_tol


ARCHS = {
    "af3": Arch("AudioFlamingo3", "tiny_af3", "ReferenceAudioFlamingo3", "<sound>", 750 + 375, 4 * 750),
    "glmasr": Arch("GLM-ASR", "tiny_glmasr", "ReferenceGlmAsr", "<|begin_of_audio|>", 375 + 187, 4 * 375,
                   transcription=True),
    # no windows: 13 tokens per second
    "qwen3asr": Arch("Qwen3-ASR", "tiny_qwen3asr", "ReferenceQwen3Asr", "<|audio_start|>", 45 * 13, 4 * 390,
                     transcription=True),
    # M-RoPE; vLLM encodes audio over 30 s whole (25 tokens per second)
    "qwen25omni": Arch("Qwen2.5-Omni", "tiny_qwen25omni", "ReferenceQwen25Omni", "<|audio_bos|>", 1125, 4 * 750,
                       omni=True),
    # MoE decoder, chunked encoder like Qwen3-ASR's (13 tokens per second, whole audio)
    "qwen3omni": Arch("Qwen3-Omni", "tiny_qwen3omni", "ReferenceQwen3Omni", "<|audio_start|>", 45 * 13, 4 * 390,
                      omni=True, transcription=True),
    # the fused LM input (audio + blank embedding) is pooled; the feature extractor keeps 30 s
    # (390 placeholders); one audio per prompt; stock vLLM's encoder stacks a batch's features
    # and fails on two lengths (torch.stack), so the stock run takes one request at a time
    "kimi": Arch("Kimi-Audio", "tiny_kimi", "ReferenceKimiAudio", "<|im_media_begin|>", 390, 390,
                 transcription=True, engine_kw=(("limit_mm_per_prompt", {"audio": 1}),),
                 stock_engine_kw=(("max_num_seqs", 1),), chat_template_file=True,
                 # a 151,672-entry log-softmax on a hidden-64 decoder: float noise is larger; stock
                 # against stock, same settings, differed by 2e-5 to 4e-5, 'off' against stock by
                 # 2e-5 to 2e-4 over three runs (the wrong poolings move >= 7.6e-2)
                 off_logprob_tol=LOGPROB_TOL),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request) -> Arch:
    return ARCHS[request.param]


@pytest.fixture(scope="module")
def model(arch):
    import importlib

    builder = importlib.import_module(f"vllm_affinity_tools.{arch.builder}")
    path = CACHE / f"tiny-{arch.builder.removeprefix('tiny_')}"
    if not (path / "model.safetensors").exists():
        builder.build(path)
    return path


@pytest.fixture(scope="session")
def clips3():
    from vllm_affinity_tools import speech

    out = []
    for i, s in enumerate(SECONDS):
        path = CACHE / "clips-af3" / f"a{i}-{s:g}s.wav"
        if not path.exists():
            speech.utterance(s, path, seed=10 + i, voice=["en-us", "en-gb", "en-us+f3"][i], sample_rate=16000)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def prompt(arch):
    import importlib

    return importlib.import_module(f"vllm_affinity_tools.{arch.builder}").prompt("What does the speaker say?")


@pytest.fixture(scope="module")
def hf_ref(arch, model):
    from vllm_affinity_tools import reference

    return getattr(reference, arch.reference)(str(model))


def _job(model, prompt, requests, spec):
    job = {"model": str(model), "prompt": prompt, "max_tokens": MAX_NEW, "logprobs": 20, "requests": requests}
    if spec is not None:
        job["hf_overrides"] = {"affinity": spec}
    return job


@pytest.fixture(scope="module")
def runs(model, clips3, prompt, tmp_path_factory, arch):
    """stock (plugin disabled); 'off' with per-request ratios; both stages."""
    per_ratio = [{"audios": [str(c)], "mm_processor_kwargs": {"affinity_keep_ratio": r}}
                 for r in RATIOS for c in clips3]
    plain = [{"audios": [str(c)]} for c in clips3]
    kw = dict(arch.engine_kw)
    return {
        "stock": run_engine_subprocess({**_job(model, prompt, plain, None),
                                        "engine_kw_extra": {**kw, **dict(arch.stock_engine_kw)}},
                                       tmp_path_factory.mktemp(f"{arch.builder}-stock"),
                                       env={"VLLM_PLUGINS": "", **dict(arch.stock_env)}),
        "off": run_engine_subprocess({**_job(model, prompt, plain + per_ratio, "off"), "engine_kw_extra": kw},
                                     tmp_path_factory.mktemp(f"{arch.builder}-off")),
        # the deep engine also runs the KV probe (test_deep_kv_blocks_equal_the_plan): block size
        # 32, chunked prefill, the 45 s clip behind a long text prefix
        "deep": run_engine_subprocess(
            {**_job(model, prompt, plain, DEEP_SPEC), "also": ["kv_probe"],
             "long_prompt": prompt.replace(arch.audio_tag, "hello " * 300 + arch.audio_tag),
             "audio": str(clips3[2]), "engine_kw_extra": {**kw, "block_size": BLOCK, "enable_chunked_prefill": True}},
            tmp_path_factory.mktemp(f"{arch.builder}-deep")),
    }


def _ref(reference, prompt, clip, **kw):
    return reference.generate(prompt, [load_audio(clip)], max_new_tokens=MAX_NEW, **kw)


def test_checkpoint_cut_points_are_not_ties(hf_ref, clips3, prompt, model):
    """Every exact-count choice the parity tests make (input stage at each ratio, the deep
    stage's spans) is far from a tie on this checkpoint, so the parity tests below test the
    implementation, not the rounding of a near-tie."""
    margins = []
    for clip in clips3:
        audio = load_audio(clip)
        for e in hf_ref.audio_embeddings([audio]):
            margins += [(P.cut_margin(e, P.num_kept(e.shape[0], r)), f"{clip.name} input {r}") for r in RATIOS]

        def deep_pool_fn(x, name=clip.name):
            k = P.num_kept(x.shape[0], DEEP_REF["deep_keep_ratio"])
            margins.append((P.cut_margin(x, k, 3), f"{name} deep"))
            return P.group_sizes(x, k, "affinity", 3)

        hf_ref.generate(prompt, [audio], max_new_tokens=1, deep_pool_fn=deep_pool_fn, **DEEP_REF)
    worst = min(margins)
    print(f"\n{model.name}: smallest cut margin {worst[0]:.2e} ({worst[1]}) of {len(margins)} choices")
    assert worst[0] >= MIN_CUT_MARGIN, (
        f"{model.name}: exact-count cut margin {worst[0]:.2e} at {worst[1]} is a near-tie; "
        f"a stale checkpoint? delete {model} and rerun (the builder amplifies the audio front end)")


def test_off_is_stock(runs, clips3, arch):
    stock, off = runs["stock"]["results"], runs["off"]["results"][: len(clips3)]
    assert "vllm-affinity" not in runs["stock"]["log"]
    for s, o in zip(stock, off):
        assert o["prompt_token_ids"] == s["prompt_token_ids"]
        assert o["token_ids"] == s["token_ids"]
        # the 'off' engine batches these with 9 more requests: float noise only (measured
        # 5e-7 to 1.2e-5; a wrong pooling moves log-probs by > 1, test_wrong_pooling_is_rejected)
        diff = max(abs(o["logprobs"][i][t] - v) for i, step in enumerate(s["logprobs"]) for t, v in step.items())
        assert diff < arch.off_logprob_tol


@pytest.mark.parametrize("ratio", RATIOS)
def test_input_stage_matches_reference(runs, clips3, hf_ref, prompt, ratio, arch):
    res = runs["off"]["results"][len(clips3) * (1 + RATIOS.index(ratio)):][: len(clips3)]
    for clip, r in zip(clips3, res):
        ref = _ref(hf_ref, prompt, clip, keep_ratio=ratio)
        n = hf_ref.num_audio_tokens(len(load_audio(clip)[0]))
        assert ref.audio_tokens_in == [n] and ref.audio_tokens_kept == [P.num_kept(n, ratio)]
        parity = json_compare(r, ref)
        print(f"\n{arch.name} input stage {clip.name} ratio {ratio}: audio {n} -> {ref.audio_tokens_kept[0]}; {parity}")
        assert arch.ok(parity), f"{clip.name} ratio {ratio}: {parity}"


def test_deep_stage_matches_reference(runs, clips3, hf_ref, prompt, arch):
    for clip, r in zip(clips3, runs["deep"]["results"]):
        ref = _ref(hf_ref, prompt, clip, **DEEP_REF)
        parity = json_compare(r, ref)
        print(f"\n{arch.name} both stages {clip.name}: audio {ref.audio_tokens_in[0]} -> {ref.audio_tokens_kept[0]} "
              f"-> {ref.deep_tokens_kept[0]} above layer 1; {parity}")
        assert arch.ok(parity), f"{clip.name}: {parity}"
        assert ref.deep_tokens_kept == [P.num_kept(ref.audio_tokens_kept[0], 0.3)]


def _first_member_pooling(e):
    """Input stage with the right groups but each group's first row instead of its mean."""
    sizes = P.group_sizes(e, P.num_kept(e.shape[0], 0.74), "affinity", 1)
    return e[torch.cumsum(sizes, 0) - sizes]


def _first_member_positions(pos, sizes):
    """Deep stage with each merged row at its first member's position instead of the floor of the mean."""
    return pos[torch.cumsum(sizes, 0) - sizes]


WRONG = {
    "input uniform bins": dict(DEEP_REF, method="uniform"),
    "input first member, not the mean": dict(DEEP_REF, pool_fn=_first_member_pooling),
    "deep window 1": dict(DEEP_REF, deep_window=1),
    "deep uniform bins": dict(DEEP_REF, deep_method="uniform"),
    "deep positions of the first member": dict(DEEP_REF, deep_position_fn=_first_member_positions),
    "merge one layer late": dict(DEEP_REF, deep_merge_layer=2),
}


@pytest.mark.parametrize("variant", list(WRONG))
def test_wrong_pooling_is_rejected(runs, clips3, hf_ref, prompt, variant, arch):
    """The parity check is sensitive: each deliberately wrong pooling fails it."""
    diffs = [json_compare(r, _ref(hf_ref, prompt, clip, **WRONG[variant]))
             for clip, r in zip(clips3, runs["deep"]["results"])]
    print(f"\n{arch.name} wrong pooling '{variant}': max |dlogprob| {max(p.max_logprob_diff for p in diffs):.2e}")
    assert not any(arch.ok(p) for p in diffs), [str(p) for p in diffs]
    assert max(p.max_logprob_diff for p in diffs) > 10 * arch.logprob_tol


def test_deep_kv_blocks_equal_the_plan(runs, arch):
    kv = runs["deep"]["kv_probe"]
    assert kv["groups"] == ["FullAttentionSpec", "AffinityDeepAttentionSpec"]
    (offset, k_in), = kv["audio_ranges"]
    assert k_in == P.num_kept(arch.tokens_45s, 0.74)  # 45 s: two windows before pooling
    n = kv["num_computed_tokens"]
    compacted = DeepPlan.from_ranges([(offset, k_in)], 0.3).compacted(n)
    assert compacted == n - (k_in - P.num_kept(k_in, 0.3))
    assert kv["blocks"] == accounting.KVLayout(4, 1).blocks_per_group(n, compacted, BLOCK)
    assert kv["blocks"] == [math.ceil(n / BLOCK), math.ceil(compacted / BLOCK)]
    assert kv["free_after_finish"] == kv["free_initial"] == kv["free_after_cancel"]
    print(f"\n{arch.name} 45 s clip, {n} tokens computed: blocks per group {kv['blocks']} (block {BLOCK}); "
          f"stock would hold {math.ceil((n + arch.tokens_45s - k_in) / BLOCK)} in every layer")


def _metric(text: str, name: str) -> float:
    """The value of one un-labelled sample of vLLM's /metrics text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not on /metrics")


@pytest.mark.server
def test_vllm_serve_answers_an_audio_chat_with_the_saving(model, clips3, hf_ref, tmp_path, arch):
    """A real `vllm serve` + the openai client: the chat usage shows the saving, /metrics
    counts both requests, and (ASR models) /v1/audio/transcriptions runs at the server's ratio."""
    import requests

    from vllm_affinity_tools.demo import CPU_ARGS
    from vllm_affinity_tools.serving import ServerProcess

    clip = clips3[1]
    n = hf_ref.num_audio_tokens(len(load_audio(clip)[0]))
    # vLLM's default prefix caching is on: kv_block_align 'auto' rounds each audio's drop down to
    # a multiple of the block (32 here, so these clips drop some: 128, the CPU default, exceeds it)
    k_in = P.block_aligned_count(n, P.num_kept(n, 0.7432), BLOCK, "keep_more")
    messages = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip.read_bytes()).decode(), "format": "wav"}},
        {"type": "text", "text": "What does the speaker say?"}]}]
    # a step budget of 256 (below the longest audio's placeholders, which are never split): the
    # config hook raises it to the longest audio the server accepts, and a 45 s clip is answered
    extra = ["--chat-template", str(model / "chat_template.jinja")] if arch.chat_template_file else []
    with ServerProcess(model, ["--plugin", "affinity", "--affinity", "paper-aggressive", *CPU_ARGS,
                               "--max-num-batched-tokens", "256", "--block-size", str(BLOCK), *extra],
                       log_path=tmp_path / "server.log", served_model_name="af3",
                       env={"VLLM_LOGGING_LEVEL": "DEBUG"}) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=120)
        pooled = client.chat.completions.create(model="af3", messages=messages, max_tokens=4, temperature=0)
        stock = client.chat.completions.create(model="af3", messages=messages, max_tokens=4, temperature=0,
                                               extra_body={"mm_processor_kwargs": {"affinity_keep_ratio": 1.0}})
        if arch.omni:  # audio interleaved with video has no span to pool: a 400 naming the key
            with pytest.raises(openai.BadRequestError, match="use_audio_in_video"):
                client.chat.completions.create(model="af3", messages=messages, max_tokens=4, temperature=0,
                                               extra_body={"mm_processor_kwargs": {"use_audio_in_video": True}})
        long_clip = [{"role": "user", "content": [
            {"type": "input_audio",
             "input_audio": {"data": base64.b64encode(clips3[2].read_bytes()).decode(), "format": "wav"}},
            {"type": "text", "text": "What does the speaker say?"}]}]
        long = client.chat.completions.create(model="af3", messages=long_clip, max_tokens=4, temperature=0)
        metrics = requests.get(srv.base_url.removesuffix("/v1") + "/metrics", timeout=30).text
        if arch.transcription:
            with clip.open("rb") as f:
                text = client.audio.transcriptions.create(model="af3", file=f, language="en", temperature=0)
            assert isinstance(text.text, str)
        log = srv.log()
    assert stock.usage.prompt_tokens - pooled.usage.prompt_tokens == n - k_in > 0
    assert pooled.choices[0].finish_reason == "length"
    assert f"vllm-affinity: audio tokens [{n}] -> [{k_in}] (keep_ratio=0.7432)" in log
    assert f"vllm-affinity: {arch.name} with Affinity Pooling, input stage: keep_ratio=0.7432" in log
    assert f"max_num_batched_tokens 256 -> {arch.step_budget}" in log
    assert long.choices[0].finish_reason == "length"
    # /metrics: the three chat requests (pooled, keep 1.0, the 45 s clip), counted once each
    n45 = arch.tokens_45s
    assert _metric(metrics, "vllm_affinity:requests_total") == 3
    assert _metric(metrics, "vllm_affinity:audio_tokens_in_total") == 2 * n + n45
    k45 = P.block_aligned_count(n45, P.num_kept(n45, 0.7432), BLOCK, "keep_more")
    assert _metric(metrics, "vllm_affinity:audio_tokens_after_input_total") == k_in + n + k45
    assert "kv_block_align auto -> input.kv_block_align=keep_more, deep.kv_block_align=keep_more" in log
    if arch.transcription:  # the transcription request: the server's ratio, same audio
        assert log.count(f"vllm-affinity: audio tokens [{n}] -> [{k_in}] (keep_ratio=0.7432)") == 2
    assert "Traceback" not in log
