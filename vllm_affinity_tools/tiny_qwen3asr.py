"""Build a tiny random-weight Qwen3-ASR checkpoint, fully offline.

    python -m vllm_affinity_tools.tiny_qwen3asr OUT_DIR [--layers N] [--hidden H] [--heads A]
                                                 [--kv-heads K] [--seed S] [--sharpen F]

The Qwen3-ASR sibling of :mod:`vllm_affinity_tools.tiny_glmasr`: byte-level BPE
tokenizer (:func:`~.tiny.build_tokenizer`) with Qwen's role tokens and Qwen3-ASR's audio
tokens (``<|audio_start|>``, the placeholder ``<|audio_pad|>``, ``<|audio_end|>``) as
special tokens, registered as the tokenizer's ``audio_token`` / ``audio_bos_token`` /
``audio_eos_token`` (``extra_special_tokens``, which ``Qwen3ASRProcessor`` reads), a
``Qwen3ASRFeatureExtractor`` (128 bins, ``n_window`` 50, ``min_length`` 8000 samples),
a chat template in the hub's layout
(``<|im_start|>user\\n<|audio_start|><|audio_pad|><|audio_end|>QUESTION<|im_end|>\\n
<|im_start|>assistant\\n``) and weights saved under transformers' own names
(``model.audio_tower.*``, ``model.multi_modal_projector.*``, ``model.language_model.*``),
the "HF format" vLLM's Qwen3-ASR loader maps (projector -> ``audio_tower.proj1/2``).
The embeddings are tied (top level, which transformers reads, and ``text_config``,
which vLLM's Qwen3 reads), so no ``lm_head`` is saved: vLLM has no mapping rule for a
top-level ``lm_head.weight``. The build reloads the checkpoint in transformers and
fails on missing, unexpected or mismatched keys.

Shapes: the encoder (3 stride-2 conv2d over 100-frame chunks -> 13 rows per chunk,
windowed attention over ``n_window_infer`` 800 frames) has d_model 128, 2 heads
(head_dim 64), ``output_dim`` = the text hidden size. The Qwen3 text model has head_dim
64 and per-head q/k RMSNorm: scaling ``q_proj`` would be normalised away, so
``--sharpen`` scales the ``q_norm`` / ``k_norm`` weights instead (x F each; the shared
:func:`~.tiny.sharpen_and_save` then runs with 1.0, an exact no-op). Default x4, as for
Qwen3-Omni (:mod:`~.tiny_qwen3omni`): each norm scale multiplies the attention logits, and at x8
(logits x64) stock vLLM and transformers already differ by up to 9e-4 in log-prob on this model.
"""

from __future__ import annotations

from pathlib import Path

from . import tiny
from .tiny import sharpen_and_save

SHARPEN = 4.0  # see the module docstring
# gains of the conv2d stack and conv_out so the audio, not the per-chunk positions, sets
# the frames: see tiny.amplify_audio_frontend (cut margin of the test clips 2.4e-7 -> 3e-4;
# at 2.4e-7 vLLM and the reference chose different groups for the 45 s clip on some CPUs)
FRONTEND_GAIN = {"conv2d1": 50.0, "conv2d2": 5.0, "conv2d3": 5.0, "conv_out": 5.0}
AUDIO_TOKEN = "<|audio_pad|>"
AUDIO_BEGIN, AUDIO_END = "<|audio_start|>", "<|audio_end|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    AUDIO_BEGIN,
    AUDIO_TOKEN,
    AUDIO_END,
]
AUDIO_PART = f"{AUDIO_BEGIN}{AUDIO_TOKEN}{AUDIO_END}"  # vLLM's get_placeholder_str

# The hub template's layout (Qwen chat roles; an audio part renders as the audio
# brackets with one placeholder, directly followed by the text), written as an explicit
# loop over message['content'] so vLLM detects the "openai" content format. Audio parts
# in vLLM's (`{"type": "audio"}`) and transformers' (`{"type": "audio", "audio": ...}`)
# shapes.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] in ['audio', 'audio_url', 'input_audio'] or 'audio' in c %}"
    "" + AUDIO_PART + ""
    "{% elif 'text' in c %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prompt(question: str) -> str:
    """The rendered Qwen3-ASR prompt for one user turn of [audio, text]."""
    return f"<|im_start|>user\n{AUDIO_PART}{question}<|im_end|>\n<|im_start|>assistant\n"


def encoder_config(layers: int, d_model: int, heads: int, output_dim: int) -> dict:
    """A tiny Qwen3-ASR audio encoder (128 mel bins, 100-frame chunks, n_window 50)."""
    return {
        "model_type": "qwen3_asr_encoder",
        "num_mel_bins": 128,
        "encoder_layers": layers,
        "encoder_attention_heads": heads,
        "encoder_ffn_dim": 2 * d_model,
        "d_model": d_model,
        "output_dim": output_dim,
        "downsample_hidden_size": 32,
        "n_window": 50,  # vLLM's counting hard-codes 100-frame chunks
        "n_window_infer": 800,
    }


def qwen3_text_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, *, eot: int, eos: int) -> dict:
    """A tiny Qwen3 decoder (head_dim 64, 1-D RoPE, tied embeddings)."""
    return tiny.decoder_config(
        "qwen3", vocab, hidden, layers, heads, kv_heads, eot=eot, eos=eos,
        head_dim=hidden // heads, rms_norm_eps=1e-6, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        tie_word_embeddings=True, pad_token_id=eot,
    )


def _saved_name(name: str) -> str | None:
    """transformers' own names; the tied lm_head is left out."""
    return None if name == "lm_head.weight" else name


def _tokenizer(vocab_size: int):
    return tiny.build_tokenizer_with_roles(
        vocab_size, special_tokens=SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE, eos_token=EOS_TOKEN,
        roles={
            "audio_token": AUDIO_TOKEN,
            "audio_bos_token": AUDIO_BEGIN,
            "audio_eos_token": AUDIO_END,
        },
    )


def build(
    out_dir: str | Path,
    *,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    sharpen: float = SHARPEN,
    audio_layers: int = 2,
    audio_d_model: int = 128,
    audio_heads: int = 2,
    vocab_size: int = 512,
    verify: bool = True,
) -> Path:
    import torch
    from transformers import (
        Qwen3ASRConfig,
        Qwen3ASRFeatureExtractor,
        Qwen3ASRForConditionalGeneration,
        Qwen3ASRProcessor,
    )

    out = tiny.prepare_out(out_dir, hidden, heads, kv_heads, audio_d_model=audio_d_model, audio_heads=audio_heads)
    tokenizer = _tokenizer(vocab_size)
    fe = Qwen3ASRFeatureExtractor(feature_size=128, sampling_rate=16000, n_window=50, min_length=8000)
    processor = Qwen3ASRProcessor(feature_extractor=fe, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    audio_id, eos, eot, vocab = tiny.special_ids(tokenizer, AUDIO_TOKEN, EOS_TOKEN)

    config = Qwen3ASRConfig(
        audio_config=encoder_config(audio_layers, audio_d_model, audio_heads, hidden),
        text_config=qwen3_text_config(vocab, hidden, layers, heads, kv_heads, eot=eot, eos=eos),
        audio_token_id=audio_id,
        pad_token_id=eot,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    model = tiny.init_model(Qwen3ASRForConditionalGeneration, config, seed)
    tiny.amplify_audio_frontend(model, FRONTEND_GAIN)
    with torch.no_grad():  # q/k RMSNorm would undo a q_proj/k_proj scale
        for layer in model.model.language_model.layers:
            layer.self_attn.q_norm.weight.mul_(sharpen)
            layer.self_attn.k_norm.weight.mul_(sharpen)
    sharpen_and_save(model, config, processor, out, sharpen=1.0, eot=eot, im_end=eos, hub_name=_saved_name)
    if verify:
        check_reload(out, model.state_dict())
    return out


def check_reload(model_dir: str | Path, expected: dict | None = None) -> None:
    """:func:`~.tiny.check_reload` as ``Qwen3ASRForConditionalGeneration``, lm_head tied
    to the embeddings after reload."""
    from transformers import Qwen3ASRForConditionalGeneration

    tiny.check_reload(
        Qwen3ASRForConditionalGeneration, model_dir, expected,
        tied=("lm_head.weight", "model.language_model.embed_tokens.weight"),
    )


def main(argv: list[str] | None = None) -> None:
    tiny.run_builder(
        build, "Qwen3-ASR", "python -m vllm_affinity_tools.tiny_qwen3asr", __doc__, hidden=256, argv=argv,
        sharpen=SHARPEN,
    )

if __name__ == "__main__":
    main()
