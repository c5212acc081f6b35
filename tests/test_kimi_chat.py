"""Kimi-Audio's chat template through vLLM's own tokenizer (vllm_affinity/patches/kimi_chat_template.py):
every message of a multi-turn conversation is rendered, and without the patch only the first
message reaches the template (the stock bug the patch fixes). The served path is
tests/test_adapters.py[kimi] (`vllm serve` + openai client, an audio chat answered)."""

from __future__ import annotations

import pytest

from .conftest import CACHE


@pytest.fixture(scope="module")
def tokenizer():
    from vllm_affinity_tools import tiny_kimi

    path = CACHE / "tiny-kimi"
    if not (path / "model.safetensors").exists():
        tiny_kimi.build(path)
    from vllm.tokenizers.kimi_audio import KimiAudioTokenizer

    return KimiAudioTokenizer.from_pretrained(str(path)), (path / "chat_template.jinja").read_text()


CONVERSATION = [
    {"role": "user", "content": "<|im_media_begin|><|im_kimia_text_blank|><|im_media_end|>\ntranscribe the speech"},
    {"role": "assistant", "content": "hello world"},
    {"role": "user", "content": "summarize it"},
]
EXPECTED = ("<|im_kimia_user_msg_start|><|im_media_begin|><|im_kimia_text_blank|><|im_media_end|>\ntranscribe the "
            "speech<|im_msg_end|><|im_kimia_assistant_msg_start|>hello world<|im_msg_end|>"
            "<|im_kimia_user_msg_start|>summarize it<|im_msg_end|><|im_kimia_assistant_msg_start|>")


def test_every_turn_is_rendered(tokenizer):
    import vllm_affinity

    vllm_affinity.register()
    tok, template = tokenizer
    for kw in ({"messages": CONVERSATION}, {"conversation": CONVERSATION}):
        assert tok.apply_chat_template(chat_template=template, add_generation_prompt=True, **kw) == EXPECTED
    ids = tok.apply_chat_template(messages=CONVERSATION, chat_template=template, add_generation_prompt=True,
                                  tokenize=True)
    assert ids.count(151666) == 1 and ids[0] == 151670 and ids[-1] == 151671


def test_stock_method_loses_the_messages(tokenizer):
    """The bug is real: vLLM's unpatched method renders none of the conversation."""
    import vllm_affinity

    vllm_affinity.register()
    from vllm.tokenizers.kimi_audio import KimiAudioTokenizer

    tok, template = tokenizer
    stock = KimiAudioTokenizer.apply_chat_template.__wrapped__
    assert stock(tok, messages=CONVERSATION, chat_template=template,
                 add_generation_prompt=True) == "<|im_kimia_assistant_msg_start|>"
