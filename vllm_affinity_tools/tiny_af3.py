"""Build a tiny random-weight AudioFlamingo3 checkpoint, fully offline.

    python -m vllm_affinity_tools.tiny_af3 OUT_DIR [--layers N] [--hidden H] [--heads A]
                                             [--kv-heads K] [--seed S] [--sharpen F]
                                             [--max-audio-len SECONDS]

The AudioFlamingo3 sibling of :mod:`vllm_affinity_tools.tiny` (the steps are
:class:`~.tiny_base.TinyBuilder`'s: same tokenizer builder, same weight-name rewrite, same
sharpening): byte-level BPE tokenizer with AF3's ``<sound>`` placeholder as a special
token, a 128-bin Whisper feature extractor, ``AudioFlamingo3Processor``
(``audio_token="<sound>"``, ``max_audio_len``), a chat template that renders ``<sound>``
per audio part before the text (AF3's layout: ``<|im_start|>user\\n<sound>QUESTION<|im_end|>``),
and weights saved under the hub's names (``audio_tower.*``, ``multi_modal_projector.*``,
``language_model.model.*``, ``language_model.lm_head.*``) which vLLM's AF3 loader
expects. The build reloads the checkpoint in transformers and fails on missing,
unexpected or mismatched keys.

Shapes: the audio encoder keeps Whisper's 1500 positions (transformers' AF3 encoder
adds all 1500 position rows, so inputs must be 3000 mel frames = 30 s windows);
d_model 128 with 2 heads (head_dim 64); the Qwen2 text model has head_dim 64.

``max_audio_len`` (seconds, default 60) caps the windows per audio
(``max_audio_len // 30``). vLLM's AF3 profiling feeds a dummy audio of exactly
``max_audio_len`` seconds, i.e. ``750 * max_audio_len / 30`` audio tokens; AF3's own
600 s would be 15000 tokens, far above the test engines' ``max_model_len`` 2048.
"""

from __future__ import annotations

from .tiny_base import (
    QWEN_TOKENS,
    SHAPE,
    TinyBuilder,
    audio_encoder_config,
    part_test,
    qwen2_text_config,
    qwen_prompt,
)

# conv1/conv2 gains so the audio, not the positions, sets the frames: see
# tiny_base.amplify_audio_frontend (cut margin of the test clips 3e-6 -> 2e-4)
FRONTEND_GAIN = {"conv1": 10.0, "conv2": 10.0}
AUDIO_TOKEN = "<sound>"
SPECIAL_TOKENS = [*QWEN_TOKENS, AUDIO_TOKEN]

# AF3 renders the audio placeholder first, then the message's text. One <sound> per
# audio part (the hub template emits at most one per message; vLLM accepts one audio
# per prompt for AF3, where both agree).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if " + part_test("audio") + " %}<sound>"
    "{% elif 'text' in c %}{% set text_buf.v = text_buf.v + c['text'] %}{% endif %}"
    "{% endfor %}{{ text_buf.v }}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prompt(question: str, n_audios: int = 1, system: str = "You are a helpful assistant.") -> str:
    """The rendered AF3 prompt (what the chat template produces for one user turn)."""
    return qwen_prompt(AUDIO_TOKEN * n_audios + question, system)


class AudioFlamingo3(TinyBuilder):
    name = "AudioFlamingo3"
    defaults = {**SHAPE, "max_audio_len": 60, "verify": True}
    special_tokens, chat_template, audio_token = SPECIAL_TOKENS, CHAT_TEMPLATE, AUDIO_TOKEN
    model_class, processor_class = "AudioFlamingo3ForConditionalGeneration", "AudioFlamingo3Processor"
    frontend_gain = FRONTEND_GAIN

    def config(self, s, tokenizer, ids):
        from transformers import AudioFlamingo3Config

        return AudioFlamingo3Config(
            audio_config=audio_encoder_config("audioflamingo3_encoder", s.audio_layers, s.audio_d_model, s.audio_heads),
            text_config=qwen2_text_config(ids.vocab, s.hidden, s.layers, s.heads, s.kv_heads, eot=ids.eot, im_end=ids.eos),
            audio_token_id=ids.audio,
        )


build, check_reload, main = AudioFlamingo3().api()

if __name__ == "__main__":
    main()
