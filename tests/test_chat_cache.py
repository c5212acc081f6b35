"""Chat with audio and prefix caching (issue 21), the input stage: a follow-up turn that
re-sends the audio recomputes exactly what stock recomputes when every audio drops a
multiple of the KV block size (``input.kv_block_align``), and a cached audio item is never
reused under another keep ratio.

Counts are exact (vLLM's ``num_cached_tokens``), so the assertions do not depend on the
machine. The wrong variant is the same SPEC without alignment: its follow-up turn
recomputes a different number of tokens than stock, which the test requires (else the
clips would not exercise the rounding at all).
"""

from __future__ import annotations

import pytest

from vllm_affinity import pooling as P

from vllm_affinity.engine.config_hook import ALIGNED_CPU_BLOCK_SIZE

from .conftest import PROMPT, run_engine_subprocess

FOLLOW_UP = ("The speaker reads a short passage.<|im_end|>\n<|im_start|>user\n"
             "Summarize it in one sentence.<|im_end|>\n<|im_start|>assistant\n")
RATIO = 0.74
CLIPS = (3, 4)  # 19.5 s and 30 s: 487 and 750 audio tokens; at 0.74 they drop 126 and 195


def _chat(tiny_model, clips, tmp_path, spec, *, env=None, extra_chats=(), replay: bool = False,
          block_size: int | None = None):
    """``block_size`` None: the engine's choice (the plugin's config hook picks 32 on the CPU build
    for an aligned stage; stock, 128); the runs compared with stock give stock the same size."""
    job = {"task": "chat", "model": str(tiny_model), "prompt": PROMPT, "follow_up": FOLLOW_UP,
           "max_tokens": 8, "chats": [{"audio": str(clips[i])} for i in CLIPS] + list(extra_chats),
           "engine_kw_extra": {"enable_prefix_caching": True}}  # vLLM's default (ENGINE_KW turns it off)
    if block_size is not None:
        job["engine_kw_extra"]["block_size"] = block_size
    if replay:  # turn 1 answers 160 tokens, which turn 2 holds: the audio's last block fills up
        job.update(replay_answer=True, max_tokens=160)
    if spec is not None:
        job["hf_overrides"] = {"affinity": spec}
    return run_engine_subprocess(job, tmp_path, env=env)


@pytest.fixture(scope="module")
def stock_chat(tiny_model, clips, tmp_path_factory):
    return _chat(tiny_model, clips, tmp_path_factory.mktemp("stock-chat"), None, env={"VLLM_PLUGINS": ""},
                 block_size=ALIGNED_CPU_BLOCK_SIZE)


def _uncached(chat: dict) -> int:
    """Tokens turn 2 computes (its prompt less the prefix-cache hit)."""
    return chat["turn2"]["prompt_tokens"] - chat["turn2"]["cached"]


@pytest.mark.engine
@pytest.mark.parametrize("align", ["auto", "keep_fewer"])
def test_aligned_follow_up_turn_recomputes_what_stock_does(align, stock_chat, tiny_model, clips, tmp_path):
    """'auto' (the field left out: the default) is 'keep_more' with prefix caching on."""
    spec = {"input": {"keep_ratio": RATIO} if align == "auto" else {"keep_ratio": RATIO, "kv_block_align": align}}
    other = {"audio": str(clips[CLIPS[1]]), "turn2_mm_processor_kwargs": {"affinity_keep_ratio": 0.5}}
    run = _chat(tiny_model, clips, tmp_path, spec, extra_chats=[other])
    if align == "auto":
        assert "kv_block_align auto -> input.kv_block_align=keep_more (prefix caching on)" in run["log"]
    # no --block-size given: the config hook's choice on the CPU build, the size stock ran at here
    assert "vllm-affinity: KV block size 32 (the CPU build's default is 128)" in run["log"]
    bs = run["block_size"]
    assert bs == stock_chat["block_size"] == ALIGNED_CPU_BLOCK_SIZE
    drops = []
    for chat, ref in zip(run["chats"], stock_chat["chats"]):
        assert ref["turn2"]["cached"] > 0  # stock hits: the test would prove nothing otherwise
        dropped = ref["turn1"]["prompt_tokens"] - chat["turn1"]["prompt_tokens"]
        drops.append(dropped)
        assert dropped >= 0 and dropped % bs == 0, (align, dropped, bs)
        assert _uncached(chat) == _uncached(ref), (align, chat, ref)
        # a hit computes what a fresh request computes
        assert chat["turn2"]["token_ids"] == chat["turn2_uncached"]["token_ids"]
        assert ref["turn2"]["token_ids"] == ref["turn2_uncached"]["token_ids"]
    assert all(drops), drops  # keep_more at 19.5 s drops 126 -> 96 tokens, at 30 s 195 -> 192
    # the same audio under another keep ratio never hits its blocks (the text before the
    # audio is under one block, so nothing at all may hit)
    assert run["chats"][-1]["turn2"]["cached"] == 0


@pytest.mark.engine
def test_unaligned_follow_up_turn_recomputes_another_tail(stock_chat, tiny_model, clips, tmp_path):
    """The wrong variant: without alignment the clips drop a non-multiple of the block and
    the follow-up recomputes a different tail than stock (what issue 21 measured)."""
    run = _chat(tiny_model, clips, tmp_path, {"input": {"keep_ratio": RATIO, "kv_block_align": "off"}},
                block_size=ALIGNED_CPU_BLOCK_SIZE)
    bs = run["block_size"]
    differs = [_uncached(c) != _uncached(r) for c, r in zip(run["chats"], stock_chat["chats"])]
    assert all(differs), (bs, run["chats"], stock_chat["chats"])
    for chat in run["chats"]:
        assert chat["turn2"]["cached"] > 0
        assert chat["turn2"]["token_ids"] == chat["turn2_uncached"]["token_ids"]


def test_block_aligned_count_rounds_the_drop():
    # issue 21's formula, both directions, and the bounds that keep it a pooling
    assert P.block_aligned_count(750, 555, 128, "keep_more") == 622
    assert P.block_aligned_count(750, 555, 128, "keep_fewer") == 494
    assert P.block_aligned_count(487, 361, 128, "keep_more") == 487  # drop 126 < one block: nothing dropped
    assert P.block_aligned_count(487, 361, 128, "keep_fewer") == 359
    assert P.block_aligned_count(750, 555, 128, "off") == 555
    assert P.block_aligned_count(750, 555, 16, "keep_more") == 558  # GPU-sized blocks: <= 15 rows more
    assert P.block_aligned_count(100, 10, 128, "keep_fewer") == 10  # rounding up would keep 0 rows
    assert P.block_aligned_count(750, 300, 128, "keep_more", most=375) == 366
    assert P.block_aligned_count(750, 375, 128, "keep_more", most=375) == 375  # cannot add rows back
    assert P.block_aligned_count(750, 375, 128, "keep_fewer", most=375) == 366
    assert P.block_aligned_count(5, 0, 128, "keep_more") == 0
    for bad in [dict(n=5, k=6), dict(n=5, k=-1)]:
        with pytest.raises(ValueError, match="k must be"):
            P.block_aligned_count(bad["n"], bad["k"], 16, "keep_more")
    with pytest.raises(ValueError, match="align must be"):
        P.block_aligned_count(10, 5, 16, "down")
    with pytest.raises(ValueError, match="block_size"):
        P.block_aligned_count(10, 5, 0, "keep_more")


@pytest.mark.parametrize("n", [1, 7, 128, 250, 487, 750, 1500])
@pytest.mark.parametrize("bs", [1, 16, 32, 128])
@pytest.mark.parametrize("align", ["keep_more", "keep_fewer"])
def test_block_aligned_count_properties(n, bs, align):
    for k in range(1, n + 1, max(1, n // 37)):
        a = P.block_aligned_count(n, k, bs, align)
        assert 1 <= a <= n
        if align == "keep_more":
            assert k <= a < k + bs and (n - a) % bs == 0
        elif a != k:  # rounded up
            assert k - bs < a < k and (n - a) % bs == 0
        else:  # already aligned, or rounding up would leave no row
            assert (n - k) % bs == 0 or n - k + bs - (n - k) % bs >= n


def test_kv_block_align_is_validated_and_refused_for_whisper():
    from vllm_affinity.architectures import facts_for
    from vllm_affinity.config import AffinityConfigError, load_spec

    with pytest.raises(AffinityConfigError, match=r"input\.kv_block_align"):
        load_spec({"input": {"keep_ratio": 0.5, "kv_block_align": "down"}})
    cfg = load_spec({"input": {"keep_ratio": 0.5, "kv_block_align": "keep_more"}})
    assert facts_for("Qwen2AudioForConditionalGeneration").validate(cfg) is cfg
    assert "aligned to the KV block (keep_more)" in cfg.describe()
    with pytest.raises(AffinityConfigError, match=r"input\.kv_block_align is for decoder-only"):
        facts_for("WhisperForConditionalGeneration").validate(cfg)


# -- the deep stage (deep.kv_block_align): its KV group cached and hit like the others ----------
# kv_block_align left out in both stages: 'auto', i.e. 'keep_more' under vLLM's default prefix caching
DEEP_ALIGNED = {"input": {"keep_ratio": RATIO}, "deep": {"merge_layer": 1, "keep_ratio": 0.3}}


@pytest.fixture(scope="module")
def stock_replay(tiny_model, clips, tmp_path_factory):
    return _chat(tiny_model, clips, tmp_path_factory.mktemp("stock-replay"), None, env={"VLLM_PLUGINS": ""},
                 replay=True, block_size=ALIGNED_CPU_BLOCK_SIZE)


@pytest.mark.engine
def test_deep_stage_follow_up_turn_hits_every_kv_group(stock_replay, tiny_model, clips, tmp_path):
    """vLLM's num_cached_tokens is the hit every KV group agrees on: the deep group's blocks
    must hit as far as the prompt's, so turn 2 (turn 1's prompt and answer, then a question)
    recomputes exactly stock's tail; a hit computes what a fresh request computes; another
    keep ratio never hits."""
    other = {"audio": str(clips[CLIPS[1]]), "turn2_mm_processor_kwargs": {"affinity_keep_ratio": 0.5}}
    run = _chat(tiny_model, clips, tmp_path, DEEP_ALIGNED, extra_chats=[other], replay=True)
    assert "prefix caching kept" in run["log"]
    assert "input.kv_block_align=keep_more, deep.kv_block_align=keep_more (prefix caching on)" in run["log"]
    assert run["block_size"] == stock_replay["block_size"] == ALIGNED_CPU_BLOCK_SIZE  # the hook's choice
    for chat, ref in zip(run["chats"], stock_replay["chats"]):
        assert chat["turn2"]["cached"] > 0 and ref["turn2"]["cached"] > 0
        # past the audio: the hit covers it in the deep group too (else it would stop before it)
        assert _uncached(chat) == _uncached(ref), (chat, ref)
        assert chat["turn2"]["token_ids"] == chat["turn2_uncached"]["token_ids"]
    assert run["chats"][-1]["turn2"]["cached"] == 0


@pytest.mark.parametrize("align, prefix_caching, resolved", [
    (None, None, "keep_more"),  # vLLM's default (prefix caching on): 'auto' aligns
    (None, False, "off"),  # the user turned prefix caching off: the exact keep ratio
    ("keep_fewer", None, "keep_fewer"),
    ("off", False, "off"),
    ("off", None, "refused"),  # unaligned rows under prefix caching: refused, never switched off
])
def test_config_hook_resolves_kv_block_align_and_never_turns_prefix_caching_off(
        align, prefix_caching, resolved, tiny_model):
    """The config hook (vLLM's own config build, no engine) resolves 'auto' once and writes the
    resolved SPEC on the HF config every process reads; prefix caching stays what the user set."""
    from vllm.engine.arg_utils import EngineArgs

    import vllm_affinity
    from vllm_affinity.config import server_config

    vllm_affinity.register()
    deep = {"merge_layer": 1, "keep_ratio": 0.3, **({"kv_block_align": align} if align else {})}
    kw = {} if prefix_caching is None else {"enable_prefix_caching": prefix_caching}
    args = EngineArgs(model=str(tiny_model), dtype="float32", hf_overrides={"affinity": {"deep": deep}}, **kw)
    if resolved == "refused":
        # vLLM's config build wraps the hook's AffinityConfigError in pydantic's (both ValueErrors)
        with pytest.raises(ValueError, match=r"deep\.kv_block_align='off' needs vLLM's prefix caching "
                           r"off .*--no-enable-prefix-caching"):
            args.create_engine_config()
        return
    cfg = args.create_engine_config()
    assert cfg.cache_config.enable_prefix_caching is (prefix_caching is not False)
    assert server_config(cfg.model_config.hf_config).deep.kv_block_align == resolved


def test_auto_alignment_resolves_per_architecture():
    """'auto' is 'keep_more' only where the prompt holds the audio and prefix caching is on;
    Whisper (cross-attention, no audio in the prompt) resolves it to 'off' and accepts it."""
    from vllm_affinity.architectures import facts_for
    from vllm_affinity.config import load_spec

    cfg = load_spec({"input": {"keep_ratio": 0.5}, "deep": {"merge_layer": 1, "keep_ratio": 0.3}})
    assert cfg.input.kv_block_align == cfg.deep.kv_block_align == "auto"
    assert "aligned to the KV block where prefix caching is on (auto)" in cfg.describe()
    on = cfg.with_block_align(prefix_caching=True, prompt_holds_audio=True)
    assert (on.input.kv_block_align, on.deep.kv_block_align) == ("keep_more", "keep_more")
    for pc, holds in [(False, True), (True, False)]:
        off = cfg.with_block_align(prefix_caching=pc, prompt_holds_audio=holds)
        assert (off.input.kv_block_align, off.deep.kv_block_align) == ("off", "off")
    explicit = load_spec({"input": {"keep_ratio": 0.5, "kv_block_align": "keep_fewer"}})
    assert explicit.with_block_align(prefix_caching=False, prompt_holds_audio=True) is explicit
    whisper = load_spec({"input": {"keep_ratio": 0.5}})
    assert facts_for("WhisperForConditionalGeneration").validate(whisper) is whisper
    assert load_spec("off").with_block_align(prefix_caching=True, prompt_holds_audio=True) == load_spec("off")


@pytest.mark.parametrize("spec, engine_kw, block_size", [
    ({"input": {"keep_ratio": 0.5}}, {}, 32),  # aligned ('auto' under prefix caching), no --block-size
    ({"input": {"keep_ratio": 0.5}, "deep": {"merge_layer": 1, "keep_ratio": 0.3}}, {}, 32),
    ({"input": {"keep_ratio": 0.5}}, {"block_size": 128}, 128),  # the user's size is kept
    ({"input": {"keep_ratio": 0.5}}, {"block_size": 64}, 64),
    ({"input": {"keep_ratio": 0.5}}, {"enable_prefix_caching": False}, 128),  # 'auto' is 'off': nothing aligned
    ({"input": {"keep_ratio": 0.5, "kv_block_align": "off"}}, {}, 128),
    ("off", {}, 128),
])
def test_config_hook_picks_32_token_blocks_on_cpu_for_an_aligned_stage(spec, engine_kw, block_size, tiny_model):
    """The CPU build's 128-token default leaves a short audio's aligned drop at 0 and a chat turn's
    hit short of the audio (measured in workloads_scaled_chat_bs32.md): the hook picks 32 there,
    and only there (a given --block-size, or no aligned stage, keeps vLLM's choice)."""
    from vllm.engine.arg_utils import EngineArgs

    import vllm_affinity

    vllm_affinity.register()
    args = EngineArgs(model=str(tiny_model), dtype="float32", hf_overrides={"affinity": spec}, **engine_kw)
    assert args.create_engine_config().cache_config.block_size == block_size
