"""Build a tiny random-weight AudioFlamingo3 checkpoint, fully offline.

    python -m vllm_affinity_tools.tiny_af3 OUT_DIR [--layers N] [--hidden H] [--heads A]
                                             [--kv-heads K] [--seed S] [--sharpen F]
                                             [--max-audio-len SECONDS]

The AudioFlamingo3 sibling of :mod:`vllm_affinity_tools.tiny` (same tokenizer
builder, same weight-name rewrite, same sharpening): byte-level BPE tokenizer with
AF3's ``<sound>`` placeholder as a special token, a 128-bin Whisper feature
extractor, ``AudioFlamingo3Processor`` (``audio_token="<sound>"``, ``max_audio_len``),
a chat template that renders ``<sound>`` per audio part before the text (AF3's
layout: ``<|im_start|>user\\n<sound>QUESTION<|im_end|>``), and weights saved under the
hub's names (``audio_tower.*``, ``multi_modal_projector.*``,
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

from pathlib import Path

from . import tiny
from .tiny import (
    audio_encoder_config,
    build_tokenizer,
    qwen2_text_config,
    sharpen_and_save,
)

# conv1/conv2 gains so the audio, not the positions, sets the frames: see
# tiny.amplify_audio_frontend (cut margin of the test clips 3e-6 -> 2e-4)
FRONTEND_GAIN = {"conv1": 10.0, "conv2": 10.0}
AUDIO_TOKEN = "<sound>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", AUDIO_TOKEN]

# AF3 renders the audio placeholder first, then the message's text. One <sound> per
# audio part (the hub template emits at most one per message; vLLM accepts one audio
# per prompt for AF3, where both agree). Audio parts in vLLM's (`{"type": "audio"}`)
# and transformers' (`{"type": "audio", "audio": ...}`) shapes.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c['type'] in ['audio', 'audio_url', 'input_audio'] or 'audio' in c %}<sound>"
    "{% elif 'text' in c %}{% set text_buf.v = text_buf.v + c['text'] %}{% endif %}"
    "{% endfor %}{{ text_buf.v }}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prompt(question: str, n_audios: int = 1, system: str = "You are a helpful assistant.") -> str:
    """The rendered AF3 prompt (what the chat template produces for one user turn)."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{AUDIO_TOKEN * n_audios}{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def build(
    out_dir: str | Path,
    *,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    sharpen: float = 8.0,
    audio_layers: int = 2,
    audio_d_model: int = 128,
    audio_heads: int = 2,
    vocab_size: int = 512,
    max_audio_len: int = 60,
    verify: bool = True,
) -> Path:
    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3ForConditionalGeneration,
        AudioFlamingo3Processor,
    )

    out = tiny.prepare_out(
        out_dir, hidden, heads, kv_heads, audio_d_model=audio_d_model, audio_heads=audio_heads, max_audio_len=max_audio_len
    )
    tokenizer = build_tokenizer(vocab_size, special_tokens=SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE)
    processor = tiny.whisper_processor(
        AudioFlamingo3Processor, tokenizer, CHAT_TEMPLATE,
        attention_mask=True, audio_token=AUDIO_TOKEN, max_audio_len=max_audio_len,
    )
    audio_id, im_end, eot, vocab = tiny.special_ids(tokenizer, AUDIO_TOKEN)

    config = AudioFlamingo3Config(
        audio_config=audio_encoder_config("audioflamingo3_encoder", audio_layers, audio_d_model, heads=audio_heads),
        text_config=qwen2_text_config(vocab, hidden, layers, heads, kv_heads, eot=eot, im_end=im_end),
        audio_token_id=audio_id,
    )
    model = tiny.init_model(AudioFlamingo3ForConditionalGeneration, config, seed)
    tiny.amplify_audio_frontend(model, FRONTEND_GAIN)
    sharpen_and_save(model, config, processor, out, sharpen=sharpen, eot=eot, im_end=im_end)
    if verify:
        check_reload(out, model.state_dict())
    return out


def check_reload(model_dir: str | Path, expected: dict | None = None) -> None:
    """:func:`~.tiny.check_reload` as ``AudioFlamingo3ForConditionalGeneration``."""
    from transformers import AudioFlamingo3ForConditionalGeneration

    tiny.check_reload(AudioFlamingo3ForConditionalGeneration, model_dir, expected)


def main(argv: list[str] | None = None) -> None:
    tiny.run_builder(
        build, "AudioFlamingo3", "python -m vllm_affinity_tools.tiny_af3", __doc__, hidden=256, max_audio_len=True, argv=argv
    )

if __name__ == "__main__":
    main()
