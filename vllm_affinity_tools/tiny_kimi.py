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

import base64
import json
from pathlib import Path

from .tiny_base import Ids, TinyBuilder

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


class KimiAudio(TinyBuilder):
    """No transformers model: the checkpoint is a Qwen2 decoder, a Whisper encoder and the VQ
    adaptor, each built here; the tokenizer is a tiktoken file, not a ``tokenizers`` BPE."""

    name = "Kimi-Audio"
    defaults = dict(layers=4, hidden=64, heads=2, kv_heads=1, seed=0, sharpen=8.0, audio_layers=2,
                    audio_d_model=64, audio_heads=2, verify=True)
    text_model = "lm.model"

    def tokenizer(self, s):
        return None  # written by save(): tiktoken.model + tokenizer_config.json

    def processor(self, tokenizer, s):
        return None  # vLLM's KimiAudioProcessor is assembled from the files at load time

    def ids(self, tokenizer) -> Ids:
        return Ids(audio=151666, eos=151645, eot=151644, vocab=VOCAB_SIZE)

    def config(self, s, tokenizer, ids):
        from transformers import Qwen2Config, WhisperConfig

        whisper = WhisperConfig(
            num_mel_bins=128, encoder_layers=s.audio_layers, encoder_attention_heads=s.audio_heads,
            encoder_ffn_dim=2 * s.audio_d_model, d_model=s.audio_d_model, max_source_positions=1500,
            decoder_layers=1, decoder_attention_heads=s.audio_heads, decoder_ffn_dim=2 * s.audio_d_model,
            vocab_size=64, max_target_positions=64,  # the decoder is not saved: Kimi-Audio has none
            pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=2,
            begin_suppress_tokens=None, suppress_tokens=None,
        )
        config = Qwen2Config(
            vocab_size=ids.vocab, hidden_size=s.hidden, intermediate_size=2 * s.hidden, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, max_position_embeddings=4096,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
            bos_token_id=FIRST_SPECIAL, eos_token_id=ids.eos,
        )
        config.architectures = ["MoonshotKimiaForCausalLM"]
        config.kimia_adaptor_input_dim = 4 * s.audio_d_model
        config.kimia_media_begin, config.kimia_media_end = 151661, 151663
        config.whisper = whisper  # saved in the sub-folder, not in config.json (see save)
        return config

    def model(self, config, s):
        import torch
        from transformers import Qwen2ForCausalLM
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        whisper = config.whisper
        del config.whisper
        torch.manual_seed(s.seed)
        lm = Qwen2ForCausalLM(config).eval()
        encoder = WhisperEncoder(whisper).eval()
        adaptor = {
            "0": torch.nn.Linear(4 * s.audio_d_model, s.hidden),
            "3": torch.nn.Linear(s.hidden, s.hidden),
            "4": torch.nn.LayerNorm(s.hidden),
        }
        with torch.no_grad():  # a LayerNorm at its init (1, 0) would hide a wrong scale or shift
            adaptor["4"].weight.uniform_(0.5, 1.5)
            adaptor["4"].bias.normal_(0.0, 0.1)
        parts = torch.nn.Module()  # one module: the base sharpens parts.lm.model
        parts.lm, parts.encoder, parts.adaptor, parts.whisper = lm, encoder, torch.nn.ModuleDict(adaptor), whisper
        return parts

    def save(self, out: Path, model, config, processor, ids: Ids) -> None:
        from safetensors.torch import save_file
        from transformers import WhisperFeatureExtractor

        write_tokenizer(out)
        # transformers' Qwen2 names are the hub's (model.layers.*, ...); the lm_head is tied
        state = {k: v.contiguous() for k, v in model.lm.state_dict().items() if not k.startswith("lm_head.")}
        for idx, mod in model.adaptor.items():
            for name, p in mod.state_dict().items():
                state[f"model.vq_adaptor.layers.{idx}.{name}"] = p.contiguous()
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(out)
        gen = {"eos_token_id": ids.eos, "pad_token_id": ids.eot, "do_sample": False}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
        sub = out / WHISPER_SUBFOLDER
        sub.mkdir(exist_ok=True)
        enc_state = {f"model.encoder.{k}": v.contiguous() for k, v in model.encoder.state_dict().items()}
        save_file(enc_state, str(sub / "model.safetensors"), metadata={"format": "pt"})
        model.whisper.save_pretrained(sub)
        WhisperFeatureExtractor(feature_size=128).save_pretrained(sub)

    def check_reload(self, model_dir, expected=None) -> None:
        """The reference loads the checkpoint with no tensor missing or unexpected."""
        from .reference.kimi_audio import ReferenceKimiAudio

        ReferenceKimiAudio(str(model_dir))


build, check_reload, main = KimiAudio().api()

if __name__ == "__main__":
    main()
