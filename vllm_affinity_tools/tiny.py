"""Build a tiny random-weight Qwen2-Audio checkpoint, fully offline.

    python -m vllm_affinity_tools.tiny OUT_DIR [--layers N] [--hidden H] [--heads A]
                                         [--kv-heads K] [--seed S] [--sharpen F]

The checkpoint loads in both Hugging Face transformers and vLLM:
byte-level BPE tokenizer (trained here with `tokenizers`) carrying the Qwen2-Audio
special tokens, a 128-bin Whisper feature extractor, `Qwen2AudioProcessor`, a chat
template that renders audio parts, and weights saved under the hub's names
(`audio_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.*`) which vLLM expects.

The steps every tiny builder shares are :class:`~.tiny_base.TinyBuilder`'s; this module
says what is Qwen2-Audio's (``--sharpen``, default 8, scales the text layers' q/k
projections). The shared helpers are re-exported here for builders written against them.
"""

from __future__ import annotations

from .tiny_base import (  # noqa: F401 - re-exported: the helpers used to live here
    TinyBuilder,
    amplify_audio_frontend,
    audio_encoder_config,
    build_tokenizer,
    build_tokenizer_with_roles,
    builder_args,
    check_reload,
    decoder_config,
    init_model,
    part_test,
    prepare_out,
    qwen2_text_config,
    run_builder,
    shape_kwargs,
    sharpen_and_save,
    special_ids,
    whisper_processor,
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_bos|>",
    "<|AUDIO|>",
    "<|audio_eos|>",
]

# Renders string content, and list content with audio parts in the shapes both vLLM
# (`{"type": "audio"}`) and transformers (`{"type": "audio", "audio_url": ...}`) use.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if " + part_test("audio", "content") + " %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen2Audio(TinyBuilder):
    name = "Qwen2-Audio"
    defaults = dict(
        layers=4, hidden=128, heads=4, kv_heads=2, seed=0, sharpen=8.0, audio_layers=2, audio_d_model=64, vocab_size=512
    )
    special_tokens, chat_template, audio_token = SPECIAL_TOKENS, CHAT_TEMPLATE, "<|AUDIO|>"
    model_class, processor_class = "Qwen2AudioForConditionalGeneration", "Qwen2AudioProcessor"

    def config(self, s, tokenizer, ids):
        from transformers import Qwen2AudioConfig

        return Qwen2AudioConfig(
            audio_config=audio_encoder_config("qwen2_audio_encoder", s.audio_layers, s.audio_d_model, heads=2),
            text_config=qwen2_text_config(ids.vocab, s.hidden, s.layers, s.heads, s.kv_heads, eot=ids.eot, im_end=ids.eos),
            audio_token_index=ids.audio,
        )


build, _, main = Qwen2Audio().api()  # no reload check: build() takes no ``verify``

if __name__ == "__main__":
    main()
