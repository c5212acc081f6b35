"""Build a tiny random-weight GLM-ASR checkpoint, fully offline.

    python -m vllm_affinity_tools.tiny_glmasr OUT_DIR [--layers N] [--hidden H] [--heads A]
                                                [--kv-heads K] [--seed S] [--sharpen F]
                                                [--max-audio-len SECONDS]

The GLM-ASR sibling of :mod:`vllm_affinity_tools.tiny_af3` (same tokenizer builder,
same weight-name rewrite, same sharpening, same reload check): byte-level BPE
tokenizer with GLM-4's role tokens and GLM-ASR's audio tokens
(``<|begin_of_audio|>``, the placeholder ``<|pad|>``, ``<|end_of_audio|>``) as special
tokens, a 128-bin Whisper feature extractor with frame mask, ``GlmAsrProcessor``
(``audio_token="<|pad|>"``, ``max_audio_len``), a chat template in the hub's layout
(``<|user|>\\n<|begin_of_audio|><|pad|><|end_of_audio|><|user|>\\nQUESTION<|assistant|>\\n``)
and weights saved under the hub's names (``audio_tower.*``,
``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``)
which both transformers (its ``qwen2_audio`` key mapping) and vLLM's GLM-ASR loader
expect. The build reloads the checkpoint in transformers and fails on missing,
unexpected or mismatched keys.

Shapes: the GLM-ASR encoder (conv1, conv2 stride 2, rotary self-attention over all
1500 positions with partial_rotary_factor 0.5, no padding mask) has d_model 128 with 2
heads (head_dim 64) and ``intermediate_size = 4 * d_model``: the model concatenates 4
consecutive encoder frames into one ``intermediate_size`` row for the projector
(375 rows per 30 s window). The Llama text model has head_dim 64, full rotary.
``tie_word_embeddings`` is False at the top level (what transformers reads) and in
``text_config`` (what vLLM's Llama reads), with a separate ``lm_head``.

``max_audio_len`` (seconds, default 60) caps the windows per audio
(``max_audio_len // 30``). vLLM's GLM-ASR profiling feeds a dummy audio of exactly
``max_audio_len`` seconds, i.e. ``375 * max_audio_len / 30`` audio tokens; the hub's
655 s would be 8187 tokens, far above the test engines' ``max_model_len`` 2048.
"""

from __future__ import annotations

from pathlib import Path

from . import tiny
from .tiny import build_tokenizer, sharpen_and_save

AUDIO_TOKEN = "<|pad|>"
AUDIO_BEGIN, AUDIO_END = "<|begin_of_audio|>", "<|end_of_audio|>"
EOS_TOKEN = "<|user|>"  # GLM-4 ends an assistant turn by opening the next user turn
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    AUDIO_BEGIN,
    AUDIO_TOKEN,
    AUDIO_END,
]
AUDIO_PART = f"{AUDIO_BEGIN}{AUDIO_TOKEN}{AUDIO_END}"

# The hub template's layout (GLM-4 roles, no separators between turns; each message's
# rendered content is trimmed; an audio part renders as <|begin_of_audio|><|pad|>
# <|end_of_audio|><|user|>\n), written as an explicit loop over message['content'] so
# vLLM detects the "openai" content format and leaves audio parts to the template.
# Audio parts in vLLM's (`{"type": "audio"}`) and transformers' (`{"type": "audio",
# "audio": ...}`) shapes.
CHAT_TEMPLATE = (
    "{% for m in messages if m['content'] is not none %}"
    "{% if m['content'] is string %}{% set body = m['content'] %}"
    "{% else %}{% set buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c['type'] in ['audio', 'audio_url', 'input_audio'] or 'audio' in c %}"
    "{% set buf.v = buf.v + '" + AUDIO_PART + "<|user|>\n' %}"
    "{% elif 'text' in c %}{% set buf.v = buf.v + c['text'] %}{% endif %}"
    "{% endfor %}{% set body = buf.v %}{% endif %}"
    "{% if m['role'] in ['system', 'user', 'assistant'] %}"
    "<|{{ m['role'] }}|>\n{{ body | trim }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def prompt(question: str) -> str:
    """The rendered GLM-ASR prompt for one user turn of [audio, text] (what the chat
    template produces; one audio per prompt, as transformers' processor requires)."""
    return f"<|user|>\n{AUDIO_PART}<|user|>\n{question}<|assistant|>\n"


def encoder_config(layers: int, d_model: int, heads: int) -> dict:
    """A tiny GLM-ASR audio encoder (128 mel bins, 1500 positions, intermediate 4 x d_model)."""
    return {
        "model_type": "glmasr_encoder",
        "hidden_size": d_model,
        "intermediate_size": 4 * d_model,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 1500,
        "num_mel_bins": 128,
    }


def llama_text_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, *, eot: int, eos: int) -> dict:
    """A tiny Llama decoder (every key GlmAsrConfig would otherwise fill from the hub's)."""
    return tiny.decoder_config(
        "llama", vocab, hidden, layers, heads, kv_heads, eot=eot, eos=eos,
        head_dim=hidden // heads, rms_norm_eps=1e-5, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        tie_word_embeddings=False, pad_token_id=eot,
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
        GlmAsrConfig,
        GlmAsrForConditionalGeneration,
        GlmAsrProcessor,
    )

    out = tiny.prepare_out(
        out_dir, hidden, heads, kv_heads, audio_d_model=audio_d_model, audio_heads=audio_heads, max_audio_len=max_audio_len
    )
    tokenizer = build_tokenizer(
        vocab_size, special_tokens=SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE, eos_token=EOS_TOKEN
    )
    processor = tiny.whisper_processor(
        GlmAsrProcessor, tokenizer, CHAT_TEMPLATE,
        attention_mask=True, audio_token=AUDIO_TOKEN, max_audio_len=max_audio_len,
    )
    audio_id, eos, eot, vocab = tiny.special_ids(tokenizer, AUDIO_TOKEN, EOS_TOKEN)

    config = GlmAsrConfig(
        audio_config=encoder_config(audio_layers, audio_d_model, audio_heads),
        text_config=llama_text_config(vocab, hidden, layers, heads, kv_heads, eot=eot, eos=eos),
        audio_token_id=audio_id,
        tie_word_embeddings=False,
    )
    model = tiny.init_model(GlmAsrForConditionalGeneration, config, seed)
    sharpen_and_save(model, config, processor, out, sharpen=sharpen, eot=eot, im_end=eos)
    if verify:
        check_reload(out, model.state_dict())
    return out


def check_reload(model_dir: str | Path, expected: dict | None = None) -> None:
    """:func:`~.tiny.check_reload` as ``GlmAsrForConditionalGeneration``."""
    from transformers import GlmAsrForConditionalGeneration

    tiny.check_reload(GlmAsrForConditionalGeneration, model_dir, expected)


def main(argv: list[str] | None = None) -> None:
    tiny.run_builder(
        build, "GLM-ASR", "python -m vllm_affinity_tools.tiny_glmasr", __doc__, hidden=256, max_audio_len=True, argv=argv
    )

if __name__ == "__main__":
    main()
