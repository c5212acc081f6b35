"""Build a tiny random-weight Qwen2-Audio checkpoint, fully offline.

    python -m vllm_affinity_tools.tiny OUT_DIR [--layers N] [--hidden H] [--heads A]
                                         [--kv-heads K] [--seed S] [--sharpen F]

The checkpoint loads in both Hugging Face transformers and vLLM:
byte-level BPE tokenizer (trained here with `tokenizers`) carrying the Qwen2-Audio
special tokens, a 128-bin Whisper feature extractor, `Qwen2AudioProcessor`, a chat
template that renders audio parts, and weights saved under the hub's names
(`audio_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.*`) which vLLM expects.

Random init makes attention nearly uniform, which hides position and pooling bugs
(logits move by 1e-5). ``--sharpen`` (default 8) scales the text layers' q/k
projections so attention is sharp and such bugs move logits by >= 1e-3.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    "{% if content['type'] in ['audio', 'audio_url', 'input_audio'] or 'audio' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """
the quick brown fox jumps over the lazy dog. what is said in the audio? please transcribe
the speech. a speech language model listens to audio and answers questions about it.
affinity pooling merges adjacent audio tokens whose hidden states are nearly identical.
one two three four five six seven eight nine ten. hello world, how are you today?
you are a helpful assistant. system user assistant. describe the sound. 0123456789
"""


def build_tokenizer(
    vocab_size: int,
    special_tokens: list[str] | None = None,
    chat_template: str | None = None,
    eos_token: str = "<|im_end|>",
):
    """Byte-level BPE over ``_CORPUS`` with ``special_tokens`` (default: Qwen2-Audio's;
    the first is the pad token, ``eos_token`` (default ``<|im_end|>``) must be among them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = SPECIAL_TOKENS if special_tokens is None else list(special_tokens)
    chat_template = CHAT_TEMPLATE if chat_template is None else chat_template

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special_tokens),
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.add_special_tokens(special_tokens)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token=special_tokens[0],
        unk_token=None,
        bos_token=None,
        additional_special_tokens=special_tokens[1:],
    )
    fast.chat_template = chat_template
    return fast



def build_tokenizer_with_roles(vocab_size: int, *, special_tokens, chat_template: str, eos_token: str,
                               roles: dict[str, str]):
    """:func:`build_tokenizer`, reloaded with ``roles`` (e.g. ``{"audio_token": "<|AUDIO|>"}``)
    registered as ``extra_special_tokens``: the named attributes transformers' processors read
    (Qwen3-ASR, the Omni thinkers)."""
    import tempfile

    from transformers import PreTrainedTokenizerFast

    tok = build_tokenizer(vocab_size, special_tokens=special_tokens, chat_template=chat_template, eos_token=eos_token)
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return PreTrainedTokenizerFast.from_pretrained(d, extra_special_tokens=roles)

def _hub_name(name: str) -> str:
    """Map transformers-5 parameter names to the hub layout that vLLM loads."""
    for old, new in (
        ("model.audio_tower.", "audio_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    raise ValueError(f"unexpected parameter name {name!r}")


def audio_encoder_config(model_type: str, layers: int, d_model: int, heads: int) -> dict:
    """A tiny Whisper-style audio encoder (128 mel bins, 1500 positions)."""
    return {
        "model_type": model_type,
        "num_mel_bins": 128,
        "encoder_layers": layers,
        "encoder_attention_heads": heads,
        "encoder_ffn_dim": d_model * 2,
        "d_model": d_model,
        "max_source_positions": 1500,
    }


def decoder_config(
    model_type: str, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, *, eot: int, eos: int, **extra
) -> dict:
    """A tiny decoder text config: the keys every builder's shares (FFN 2 x hidden, 4096
    positions, ``<|endoftext|>`` as bos), plus ``extra``."""
    return {
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "bos_token_id": eot,
        "eos_token_id": eos,
        **extra,
    }


def qwen2_text_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, *, eot: int, im_end: int) -> dict:
    """A tiny Qwen2 decoder."""
    return decoder_config(
        "qwen2", vocab, hidden, layers, heads, kv_heads, eot=eot, eos=im_end,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    )


def sharpen_and_save(
    model, config, processor, out: Path, *, sharpen: float, eot: int, im_end: int, hub_name=None
) -> None:
    """Scale the text layers' q/k projections (sharp attention makes small errors show in
    logits), then write the weights under the hub names vLLM expects, the config, the
    processor and a greedy generation config.

    ``hub_name`` (default :func:`_hub_name`) maps a transformers parameter name to its
    saved name, or to None to leave the tensor out (e.g. a tied ``lm_head``)."""
    import torch
    from safetensors.torch import save_file

    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    rename = _hub_name if hub_name is None else hub_name
    state = {rename(k): v.contiguous() for k, v in model.state_dict().items()}
    state.pop(None, None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    processor.save_pretrained(out)
    gen = {"eos_token_id": im_end, "pad_token_id": eot, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


# -- steps every builder shares -----------------------------------------------------------
def prepare_out(
    out_dir: str | Path,
    hidden: int,
    heads: int,
    kv_heads: int,
    *,
    audio_d_model: int | None = None,
    audio_heads: int | None = None,
    max_audio_len: int | None = None,
) -> Path:
    """Validate the shapes (text head_dim, and the audio head_dim / ``max_audio_len``
    where given) and create ``out_dir``."""
    if hidden % heads or heads % kv_heads:
        raise ValueError("--hidden must be divisible by --heads, --heads by --kv-heads")
    if hidden // heads < 32:
        raise ValueError(f"head_dim = hidden / heads = {hidden // heads}; vLLM's CPU attention needs >= 32")
    if audio_heads is not None and (audio_d_model % audio_heads or audio_d_model // audio_heads < 32):
        raise ValueError("audio head_dim = audio_d_model / audio_heads must be an integer >= 32")
    if max_audio_len is not None and max_audio_len < 30:
        raise ValueError("max_audio_len must be >= 30 s (one window)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def whisper_processor(processor_cls, tokenizer, chat_template: str, *, attention_mask: bool = False, **kwargs):
    """``processor_cls`` over a 128-bin, 30 s Whisper feature extractor (with the frame
    mask if ``attention_mask``); ``kwargs`` go to the processor."""
    from transformers import WhisperFeatureExtractor

    fe_kwargs = {"return_attention_mask": True} if attention_mask else {}
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=30, **fe_kwargs)
    return processor_cls(feature_extractor=fe, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def special_ids(tokenizer, audio_token: str, eos_token: str = "<|im_end|>") -> tuple[int, int, int, int]:
    """(audio placeholder id, eos id, ``<|endoftext|>`` id, vocab size)."""
    return (
        tokenizer.convert_tokens_to_ids(audio_token),
        tokenizer.convert_tokens_to_ids(eos_token),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        len(tokenizer),
    )


def init_model(model_cls, config, seed: int):
    """``model_cls(config)`` in float32 eval mode, seeded; the config names the architecture."""
    import torch

    config.architectures = [model_cls.__name__]
    config.dtype = "float32"
    torch.manual_seed(seed)
    return model_cls(config).float().eval()


def amplify_audio_frontend(model, gains: dict[str, float]) -> None:
    """Multiply the weights of the audio encoder's convolution front end (``gains``: child
    module name of the ``audio_tower`` -> factor).

    Why: at random init (std 0.02) three or four stacked convolutions leave the audio
    content about 1e-3 of the encoder's sinusoidal positions, so every frame looks alike
    (adjacent cosines 0.94-0.96 on the tiny Qwen3-ASR) and the exact-count cut points are
    fp32 ties (:func:`vllm_affinity.pooling.cut_margin` 2e-7): vLLM and the reference then
    pick different groups by rounding, on one CPU and not another. With the gain the
    audio sets the frames (median cosine ~0.7) and the margins of the test clips are
    >= 1e-4 (``tests/test_adapters.py::test_checkpoint_cut_points_are_not_ties``)."""
    import torch

    towers = [m for name, m in model.named_modules() if name.endswith("audio_tower")]
    if len(towers) != 1:
        raise RuntimeError(f"expected one audio_tower in {type(model).__name__}, found {len(towers)}")
    with torch.no_grad():
        for name, gain in gains.items():
            getattr(towers[0], name).weight.mul_(gain)


def check_reload(model_cls, model_dir: str | Path, expected: dict | None = None, *, tied: tuple[str, str] | None = None) -> None:
    """transformers reloads ``model_dir`` as ``model_cls`` with no missing, unexpected or
    mismatched keys (and, given ``expected``, the very same tensors; given ``tied``, a
    pair of names whose reloaded tensors must be equal, e.g. lm_head and embeddings)."""
    import torch

    model, info = model_cls.from_pretrained(str(model_dir), dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"transformers reload of {model_dir} is not clean: {bad}")
    got = model.state_dict()
    if tied is not None and not torch.equal(got[tied[0]], got[tied[1]]):
        raise RuntimeError("lm_head is not tied to the embeddings after reload")
    if expected is not None:
        if set(got) != set(expected):
            raise RuntimeError(f"reloaded keys differ: {sorted(set(got) ^ set(expected))[:10]}")
        for k, v in expected.items():
            if not torch.equal(got[k], v):
                raise RuntimeError(f"reloaded tensor {k} differs from the saved one")


def build(
    out_dir: str | Path,
    *,
    layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    sharpen: float = 8.0,
    audio_layers: int = 2,
    audio_d_model: int = 64,
    vocab_size: int = 512,
) -> Path:
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
    )

    out = prepare_out(out_dir, hidden, heads, kv_heads)
    tokenizer = build_tokenizer(vocab_size)
    processor = whisper_processor(Qwen2AudioProcessor, tokenizer, CHAT_TEMPLATE)
    audio_id, im_end, eot, vocab = special_ids(tokenizer, "<|AUDIO|>")

    config = Qwen2AudioConfig(
        audio_config=audio_encoder_config("qwen2_audio_encoder", audio_layers, audio_d_model, heads=2),
        text_config=qwen2_text_config(vocab, hidden, layers, heads, kv_heads, eot=eot, im_end=im_end),
        audio_token_index=audio_id,
    )
    model = init_model(Qwen2AudioForConditionalGeneration, config, seed)
    sharpen_and_save(model, config, processor, out, sharpen=sharpen, eot=eot, im_end=im_end)
    return out


def builder_args(prog: str, description: str, hidden: int, max_audio_len: bool = False,
                 sharpen: float = 8.0) -> argparse.ArgumentParser:
    """The command line every tiny builder shares (``--max-audio-len`` where asked)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("out_dir")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sharpen", type=float, default=sharpen, help=f"scale of text q/k weights (default {sharpen:g})")
    if max_audio_len:
        p.add_argument("--max-audio-len", type=int, default=60, help="seconds per audio, multiple of 30 (default 60)")
    return p


def shape_kwargs(a: argparse.Namespace) -> dict:
    return dict(layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, seed=a.seed, sharpen=a.sharpen)


def run_builder(
    build, name: str, prog: str, doc: str, *, hidden: int, max_audio_len: bool = False, argv: list[str] | None = None,
    sharpen: float = 8.0,
) -> None:
    """A tiny builder's command line: parse :func:`builder_args`, ``build``, say where."""
    a = builder_args(prog, doc.split("\n\n")[0], hidden=hidden, max_audio_len=max_audio_len,
                     sharpen=sharpen).parse_args(argv)
    extra = {"max_audio_len": a.max_audio_len} if max_audio_len else {}
    out = build(a.out_dir, **shape_kwargs(a), **extra)
    print(f"tiny {name} written to {out}")


def main(argv: list[str] | None = None) -> None:
    run_builder(build, "Qwen2-Audio", "python -m vllm_affinity_tools.tiny", __doc__, hidden=128, argv=argv)

if __name__ == "__main__":
    main()
