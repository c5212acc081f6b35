"""Patch: Kimi-Audio's chat template renders the whole conversation, not its first message.

Why: in vLLM 0.32.0, 0.33.0 and 0.34.0 ``KimiAudioTokenizer.apply_chat_template``
(``vllm/tokenizers/kimi_audio.py``) hands ONE conversation (a list of messages) to
transformers' ``render_jinja_template``, which takes a LIST of conversations, and keeps the
first rendering: the template sees the first message (a dict) as ``messages``, so a chat
request renders without its messages; with audio, vLLM then fails with "Failed to apply
prompt replacement for mm_items['audio'][0]" (HTTP 500) whether the plugin is loaded or not.
Found serving the tiny Kimi-Audio checkpoint (tests/test_adapters.py[kimi]).

What upstream would need: ``render_jinja_template([conversation], ...)`` in that method.

When to remove: once vLLM passes a list of conversations there; the version guard below
makes this patch refuse any vLLM it was not checked against (the method is the same in
0.32.0, 0.33.0 and 0.34.0).
"""

from __future__ import annotations

from collections.abc import Mapping


def apply() -> None:
    from . import wrap_once

    def make(original):
        def apply_chat_template(self, messages=None, tools=None, chat_template=None, tokenize=False, **kwargs):
            conversation = messages if messages is not None else kwargs.pop("conversation", None)
            if conversation and isinstance(conversation[0], Mapping):  # one conversation: a batch of one
                conversation = [conversation]
            return original(self, conversation, tools, chat_template, tokenize, **kwargs)

        return apply_chat_template

    wrap_once("kimi_chat_template", "vllm.tokenizers.kimi_audio:KimiAudioTokenizer.apply_chat_template", make)
