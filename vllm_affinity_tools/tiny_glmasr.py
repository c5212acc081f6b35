"""Build a tiny random-weight GLM-ASR checkpoint, fully offline.

    python -m vllm_affinity_tools.tiny_glmasr OUT_DIR [--layers N] [--hidden H] [--heads A]
                                                [--kv-heads K] [--seed S] [--sharpen F]
                                                [--max-audio-len SECONDS]

The GLM-ASR sibling of :mod:`vllm_affinity_tools.tiny_af3` (the steps are
:class:`~.tiny_base.TinyBuilder`'s: same tokenizer builder, same weight-name rewrite, same
sharpening, same reload check): byte-level BPE tokenizer with GLM-4's role tokens and
GLM-ASR's audio tokens (``<|begin_of_audio|>``, the placeholder ``<|pad|>``,
``<|end_of_audio|>``) as special tokens, a 128-bin Whisper feature extractor with frame
mask, ``GlmAsrProcessor`` (``audio_token="<|pad|>"``, ``max_audio_len``), a chat template
in the hub's layout
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

from .tiny_base import SHAPE, TinyBuilder, decoder_config, part_test

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
CHAT_TEMPLATE = (
    "{% for m in messages if m['content'] is not none %}"
    "{% if m['content'] is string %}{% set body = m['content'] %}"
    "{% else %}{% set buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if " + part_test("audio") + " %}"
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
    return decoder_config(
        "llama", vocab, hidden, layers, heads, kv_heads, eot=eot, eos=eos,
        head_dim=hidden // heads, rms_norm_eps=1e-5, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        tie_word_embeddings=False, pad_token_id=eot,
    )


class GlmAsr(TinyBuilder):
    name = "GLM-ASR"
    defaults = {**SHAPE, "max_audio_len": 60, "verify": True}
    special_tokens, chat_template, audio_token, eos_token = SPECIAL_TOKENS, CHAT_TEMPLATE, AUDIO_TOKEN, EOS_TOKEN
    model_class, processor_class = "GlmAsrForConditionalGeneration", "GlmAsrProcessor"

    def config(self, s, tokenizer, ids):
        from transformers import GlmAsrConfig

        return GlmAsrConfig(
            audio_config=encoder_config(s.audio_layers, s.audio_d_model, s.audio_heads),
            text_config=llama_text_config(ids.vocab, s.hidden, s.layers, s.heads, s.kv_heads, eot=ids.eot, eos=ids.eos),
            audio_token_id=ids.audio,
            tie_word_embeddings=False,
        )


build, check_reload, main = GlmAsr().api()

if __name__ == "__main__":
    main()
