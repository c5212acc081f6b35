"""Chat with both stages on the other decoder-only architectures (issue 21): under vLLM's prefix
caching (the default; ``kv_block_align`` left at ``auto``) turn 2 of a chat (turn 1's prompt, its
answer token for token, a question; the audio sent again) hits the cache in every KV group past
the whole of turn 1's prompt, audio included, and answers what the same turn computed from
scratch answers.

Qwen2-Audio is in tests/test_chat_cache.py (against stock's exact tail, with the wrong variant).
Here one architecture per position scheme and LM input the deep stage handles differently:
Qwen3-ASR (M-RoPE, chunked encoder), Qwen2.5-Omni (M-RoPE thinker), Kimi-Audio (fused LM input,
its own chat format). AudioFlamingo3 and GLM-ASR use Qwen2-Audio's 1-D RoPE path.
"""

from __future__ import annotations

import importlib

import pytest

from .conftest import CACHE, run_engine_subprocess
from .test_adapters import ARCHS, BLOCK

SPEC = {"input": {"keep_ratio": 0.74}, "deep": {"merge_layer": 1, "keep_ratio": 0.3}}
CHATML_FOLLOW_UP = "<|im_end|>\n<|im_start|>user\nSummarize it in one sentence.<|im_end|>\n<|im_start|>assistant\n"
SECONDS = (5.0, 12.0)


def _follow_up(arch_key: str) -> str:
    if arch_key == "kimi":
        from vllm_affinity_tools import tiny_kimi as K

        return f"{K.MSG_END}{K.USER_START}Summarize it in one sentence.{K.MSG_END}{K.ASSISTANT_START}"
    return CHATML_FOLLOW_UP


@pytest.mark.engine
@pytest.mark.parametrize("arch_key", ["qwen3asr", "qwen25omni", "kimi"])
def test_follow_up_turn_hits_every_kv_group_past_the_audio(arch_key, tmp_path):
    from vllm_affinity_tools import speech

    arch = ARCHS[arch_key]
    builder = importlib.import_module(f"vllm_affinity_tools.{arch.builder}")
    model = CACHE / f"tiny-{arch.builder.removeprefix('tiny_')}"
    if not (model / "model.safetensors").exists():
        builder.build(model)
    clips = []
    for i, s in enumerate(SECONDS):
        path = CACHE / "clips-chat" / f"c{i}-{s:g}s.wav"
        if not path.exists():
            speech.utterance(s, path, seed=20 + i, sample_rate=16000)
        clips.append(path)
    job = {"task": "chat", "model": str(model), "hf_overrides": {"affinity": SPEC},
           "prompt": builder.prompt("What does the speaker say?"), "follow_up": _follow_up(arch_key),
           "replay_answer": True, "max_tokens": 160, "chats": [{"audio": str(c)} for c in clips],
           # vLLM's default prefix caching (ENGINE_KW turns it off for the parity tests)
           "engine_kw_extra": {**dict(arch.engine_kw), "block_size": BLOCK, "enable_prefix_caching": True}}
    run = run_engine_subprocess(job, tmp_path)
    assert "input.kv_block_align=keep_more, deep.kv_block_align=keep_more (prefix caching on)" in run["log"]
    for secs, chat in zip(SECONDS, run["chats"]):
        t1, t2 = chat["turn1"], chat["turn2"]
        print(f"\n{arch.name} {secs:g} s: turn 1 prompt {t1['prompt_tokens']}, turn 2 prompt "
              f"{t2['prompt_tokens']}, cached {t2['cached']}")
        # the hit every KV group agrees on covers all of turn 1's prompt (the audio inside it), so
        # the deep group was hit past the audio: a span is never split, so without its deep blocks
        # the hit would stop before the audio
        assert t2["cached"] >= t1["prompt_tokens"], (secs, chat)
        assert chat["turn2_uncached"]["cached"] == 0
        assert t2["token_ids"] == chat["turn2_uncached"]["token_ids"]
