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
:func:`~.tiny.sharpen_and_save` then runs with 1.0, an exact no-op).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .tiny import build_tokenizer, builder_args, shape_kwargs, sharpen_and_save

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
    return {
        "model_type": "qwen3",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eos,
        "pad_token_id": eot,
    }


def _saved_name(name: str) -> str | None:
    """transformers' own names; the tied lm_head is left out."""
    return None if name == "lm_head.weight" else name


def _tokenizer(vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    tok = build_tokenizer(vocab_size, special_tokens=SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE, eos_token=EOS_TOKEN)
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return PreTrainedTokenizerFast.from_pretrained(
            d,
            extra_special_tokens={
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
    sharpen: float = 8.0,
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

    if hidden % heads or heads % kv_heads:
        raise ValueError("--hidden must be divisible by --heads, --heads by --kv-heads")
    if hidden // heads < 32:
        raise ValueError(f"head_dim = hidden / heads = {hidden // heads}; vLLM's CPU attention needs >= 32")
    if audio_d_model % audio_heads or audio_d_model // audio_heads < 32:
        raise ValueError("audio head_dim = audio_d_model / audio_heads must be an integer >= 32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _tokenizer(vocab_size)
    fe = Qwen3ASRFeatureExtractor(feature_size=128, sampling_rate=16000, n_window=50, min_length=8000)
    processor = Qwen3ASRProcessor(feature_extractor=fe, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    vocab = len(tokenizer)

    config = Qwen3ASRConfig(
        audio_config=encoder_config(audio_layers, audio_d_model, audio_heads, hidden),
        text_config=qwen3_text_config(vocab, hidden, layers, heads, kv_heads, eot=eot, eos=eos),
        audio_token_id=audio_id,
        pad_token_id=eot,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    config.architectures = ["Qwen3ASRForConditionalGeneration"]
    config.dtype = "float32"

    torch.manual_seed(seed)
    model = Qwen3ASRForConditionalGeneration(config).float().eval()
    with torch.no_grad():  # q/k RMSNorm would undo a q_proj/k_proj scale
        for layer in model.model.language_model.layers:
            layer.self_attn.q_norm.weight.mul_(sharpen)
            layer.self_attn.k_norm.weight.mul_(sharpen)
    sharpen_and_save(model, config, processor, out, sharpen=1.0, eot=eot, im_end=eos, hub_name=_saved_name)
    if verify:
        check_reload(out, model.state_dict())
    return out


def check_reload(model_dir: str | Path, expected: dict | None = None) -> None:
    """transformers reloads ``model_dir`` with no missing, unexpected or mismatched
    keys (and, given ``expected``, the very same tensors; lm_head tied to the embeddings)."""
    import torch
    from transformers import Qwen3ASRForConditionalGeneration

    model, info = Qwen3ASRForConditionalGeneration.from_pretrained(
        str(model_dir), dtype=torch.float32, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"transformers reload of {model_dir} is not clean: {bad}")
    got = model.state_dict()
    if not torch.equal(got["lm_head.weight"], got["model.language_model.embed_tokens.weight"]):
        raise RuntimeError("lm_head is not tied to the embeddings after reload")
    if expected is not None:
        if set(got) != set(expected):
            raise RuntimeError(f"reloaded keys differ: {sorted(set(got) ^ set(expected))[:10]}")
        for k, v in expected.items():
            if not torch.equal(got[k], v):
                raise RuntimeError(f"reloaded tensor {k} differs from the saved one")


def main(argv: list[str] | None = None) -> None:
    p = builder_args("python -m vllm_affinity_tools.tiny_qwen3asr", __doc__.split("\n\n")[0], hidden=256)
    a = p.parse_args(argv)
    out = build(a.out_dir, **shape_kwargs(a))
    print(f"tiny Qwen3-ASR written to {out}")


if __name__ == "__main__":
    main()
