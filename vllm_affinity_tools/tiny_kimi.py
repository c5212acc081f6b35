"""Build a tiny random-weight Kimi-Audio checkpoint (``MoonshotKimiaForCausalLM``), fully offline.

    python -m vllm_affinity_tools.tiny_kimi OUT_DIR [--layers N] [--hidden H] [--heads A]
                                              [--kv-heads K] [--seed S] [--sharpen F]

The layout vLLM's ``kimi_audio`` module loads (vLLM 0.32):

* ``config.json``: a Qwen2 text config (``model_type: qwen2`` — the hub's ``kimi_audio``
  model type needs remote code, vLLM reads only the Qwen2 keys and
  ``kimia_adaptor_input_dim``) with ``architectures: [MoonshotKimiaForCausalLM]``;
* ``model.safetensors``: the decoder under the hub's names (``model.layers.*``,
  ``model.embed_tokens.*``, ``model.norm.*``; embeddings tied, no ``lm_head``) and the
  VQ adaptor (``model.vq_adaptor.layers.{0,3,4}.*``: Linear(4·d_whisper → H), GELU,
  Linear(H → H), LayerNorm);
* ``whisper-large-v3/``: a Whisper config, a 128-bin ``WhisperFeatureExtractor`` and the
  encoder's weights as ``model.encoder.*`` (vLLM loads this sub-folder as secondary weights);
* ``tiktoken.model`` + ``tokenizer_config.json``: vLLM's ``KimiAudioTokenizer`` (tokenizer
  mode ``kimi_audio``, chosen by the architecture) reads a local tiktoken vocabulary before
  it would try the hub. The special tokens sit at Kimi-Audio's ids (151643–151671;
  vLLM's processor hard-codes ``<|im_kimia_text_blank|>`` = 151666 as the audio
  placeholder), so the vocabulary has 151672 entries: 256 bytes, then distinct
  byte strings up to 151642 (every id the random model can emit decodes), then the
  specials. Hence the small hidden size (64): the embedding is most of the weights;
* ``chat_template.jinja``: Kimi-Audio's turn layout. vLLM's Kimi tokenizer has no template
  of its own: pass ``--chat-template <dir>/chat_template.jinja`` to ``vllm serve``.

Random init makes attention nearly uniform, which hides position and pooling bugs;
``--sharpen`` (default 8) scales the decoder's q/k projections so they show.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

WHISPER_SUBFOLDER = "whisper-large-v3"
AUDIO_BEGIN, AUDIO_BLANK, AUDIO_END = "<|im_media_begin|>", "<|im_kimia_text_blank|>", "<|im_media_end|>"
USER_START, MSG_END, ASSISTANT_START = "<|im_kimia_user_msg_start|>", "<|im_msg_end|>", "<|im_kimia_assistant_msg_start|>"
AUDIO_PART = f"{AUDIO_BEGIN}{AUDIO_BLANK}{AUDIO_END}"
#: Kimi-Audio's special tokens at their ids (vLLM's tokenizer and processor hard-code these)
SPECIALS = {
    151643: "<|im_kimia_bos|>",
    151644: "<|im_end|>",  # the tokenizer's default eos id
    151645: MSG_END,
    151661: AUDIO_BEGIN,
    151663: AUDIO_END,
    151666: AUDIO_BLANK,
    151670: USER_START,
    151671: ASSISTANT_START,
}
FIRST_SPECIAL, VOCAB_SIZE = 151643, 151672

# vLLM renders a "string"-format template: it puts the audio's placeholder text before the
# user's words ("<|im_media_begin|><|im_kimia_text_blank|><|im_media_end|>\nQUESTION")
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER_START + "{{ m['content'] }}" + MSG_END +
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT_START + "{{ m['content'] }}" + MSG_END +
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_START + "{% endif %}"
)


def prompt(question: str) -> str:
    """The rendered prompt of one user turn [audio, text] (what the chat template gives)."""
    return f"{USER_START}{AUDIO_PART}\n{question}{MSG_END}{ASSISTANT_START}"


def special_name(token_id: int) -> str:
    return SPECIALS.get(token_id, f"<|reserved_special_{token_id}|>")


_CORPUS = """
the quick brown fox jumps over the lazy dog. what does the speaker say? please transcribe
the speech. a speech language model listens to audio and answers questions about it.
hello world, how are you today? describe the sound. summarize it. what is said in the audio?
"""


def vocabulary() -> list[bytes]:
    """The tokens by rank: the 256 bytes; every prefix (2+ characters) of the corpus's words,
    with and without a leading space (BPE then merges a known word into one token by its
    prefix chain); then distinct filler tokens up to the first special id. Digits are split
    one per piece by the pattern, so encoding never produces a filler, and any id the
    random model emits decodes."""
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    for word in dict.fromkeys(w.strip(".,?") for w in _CORPUS.split()):
        for w in (word, " " + word):
            for end in range(2, len(w) + 1):
                t = w[:end].encode()
                if t not in seen:
                    seen.add(t)
                    tokens.append(t)
    tokens += [f" t{i}".encode() for i in range(len(tokens), FIRST_SPECIAL)]
    return tokens


def write_tokenizer(out: Path) -> None:
    """``tiktoken.model`` (base64 token, rank) and the specials in ``tokenizer_config.json``."""
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(vocabulary())]
    (out / "tiktoken.model").write_text("\n".join(lines) + "\n")
    added = {
        str(i): {"content": special_name(i), "special": True, "single_word": False, "lstrip": False,
                 "rstrip": False, "normalized": False}
        for i in range(FIRST_SPECIAL, VOCAB_SIZE)
    }
    cfg = {"added_tokens_decoder": added, "tokenizer_class": "TikTokenTokenizer", "model_max_length": 4096}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def build(
    out_dir: str | Path,
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 2,
    kv_heads: int = 1,
    seed: int = 0,
    sharpen: float = 8.0,
    audio_layers: int = 2,
    audio_d_model: int = 64,
    audio_heads: int = 2,
    verify: bool = True,
) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    out = Path(out_dir)
    if hidden % heads or heads % kv_heads or hidden // heads < 32:
        raise ValueError(f"hidden={hidden}, heads={heads}, kv_heads={kv_heads}: need head_dim >= 32 and heads % kv_heads == 0")
    (out / WHISPER_SUBFOLDER).mkdir(parents=True, exist_ok=True)
    write_tokenizer(out)

    wcfg = WhisperConfig(
        num_mel_bins=128, encoder_layers=audio_layers, encoder_attention_heads=audio_heads,
        encoder_ffn_dim=2 * audio_d_model, d_model=audio_d_model, max_source_positions=1500,
        decoder_layers=1, decoder_attention_heads=audio_heads, decoder_ffn_dim=2 * audio_d_model,
        vocab_size=64, max_target_positions=64,  # the decoder is not saved: Kimi-Audio has none
        pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=2,
        begin_suppress_tokens=None, suppress_tokens=None,
    )
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=FIRST_SPECIAL, eos_token_id=151645,
    )
    config.architectures = ["MoonshotKimiaForCausalLM"]
    config.kimia_adaptor_input_dim = 4 * audio_d_model
    config.kimia_media_begin, config.kimia_media_end = 151661, 151663

    torch.manual_seed(seed)
    lm = Qwen2ForCausalLM(config).eval()
    encoder = WhisperEncoder(wcfg).eval()
    adaptor = {
        "0": torch.nn.Linear(4 * audio_d_model, hidden),
        "3": torch.nn.Linear(hidden, hidden),
        "4": torch.nn.LayerNorm(hidden),
    }
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
        # a LayerNorm at its init (1, 0) would hide a wrong scale or shift
        adaptor["4"].weight.uniform_(0.5, 1.5)
        adaptor["4"].bias.normal_(0.0, 0.1)
    # transformers' Qwen2 names are the hub's (model.layers.*, ...); the lm_head is tied
    state = {k: v.contiguous() for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
    for idx, mod in adaptor.items():
        for name, p in mod.state_dict().items():
            state[f"model.vq_adaptor.layers.{idx}.{name}"] = p.contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    gen = {"eos_token_id": 151645, "pad_token_id": 151644, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))

    sub = out / WHISPER_SUBFOLDER
    enc_state = {f"model.encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    save_file(enc_state, str(sub / "model.safetensors"), metadata={"format": "pt"})
    wcfg.save_pretrained(sub)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(sub)
    if verify:
        check_reload(out)
    return out


def check_reload(model_dir: str | Path) -> None:
    """The reference loads the checkpoint with no missing tensor."""
    from .reference.kimi_audio import ReferenceKimiAudio

    ReferenceKimiAudio(str(model_dir))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vllm_affinity_tools.tiny_kimi", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sharpen", type=float, default=8.0)
    a = ap.parse_args(argv)
    out = build(a.out_dir, layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, seed=a.seed,
                sharpen=a.sharpen)
    print(f"[tiny_kimi] built a tiny Kimi-Audio checkpoint in {out}")


if __name__ == "__main__":
    main()
