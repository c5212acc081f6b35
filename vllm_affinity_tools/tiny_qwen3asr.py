"""Build a tiny random-weight Qwen3-ASR checkpoint, fully offline.

    python -m vllm_affinity_tools.tiny_qwen3asr OUT_DIR [--layers N] [--hidden H] [--heads A]
                                                 [--kv-heads K] [--seed S] [--sharpen F]

The Qwen3-ASR sibling of :mod:`vllm_affinity_tools.tiny_glmasr` (the steps are
:class:`~.tiny_base.TinyBuilder`'s): byte-level BPE tokenizer
(:func:`~.tiny_base.build_tokenizer`) with Qwen's role tokens and Qwen3-ASR's audio
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
``--sharpen`` scales the ``q_norm`` / ``k_norm`` weights instead (x F each,
:func:`~.tiny_base.sharpen_qk` with ``norms``). Default x4, as for
Qwen3-Omni (:mod:`~.tiny_qwen3omni`): each norm scale multiplies the attention logits, and at x8
(logits x64) stock vLLM and transformers already differ by up to 9e-4 in log-prob on this model.
"""

from __future__ import annotations

from .tiny_base import QWEN_TOKENS, SHAPE, TinyBuilder, decoder_config, qwen_chat_template, qwen_prompt, token_roles

SHARPEN = 4.0  # see the module docstring
# gains of the conv2d stack and conv_out so the audio, not the per-chunk positions, sets
# the frames: see tiny_base.amplify_audio_frontend (cut margin of the test clips 2.4e-7 -> 3e-4;
# at 2.4e-7 vLLM and the reference chose different groups for the 45 s clip on some CPUs)
FRONTEND_GAIN = {"conv2d1": 50.0, "conv2d2": 5.0, "conv2d3": 5.0, "conv_out": 5.0}
AUDIO_TOKEN = "<|audio_pad|>"
AUDIO_BEGIN, AUDIO_END = "<|audio_start|>", "<|audio_end|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [*QWEN_TOKENS, AUDIO_BEGIN, AUDIO_TOKEN, AUDIO_END]
AUDIO_PART = f"{AUDIO_BEGIN}{AUDIO_TOKEN}{AUDIO_END}"  # vLLM's get_placeholder_str

# The hub template's layout (Qwen chat roles, no default system turn; an audio part renders
# as the audio brackets with one placeholder, directly followed by the text).
CHAT_TEMPLATE = qwen_chat_template({"audio": AUDIO_PART})


def prompt(question: str) -> str:
    """The rendered Qwen3-ASR prompt for one user turn of [audio, text]."""
    return qwen_prompt(AUDIO_PART + question)


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
    return decoder_config(
        "qwen3", vocab, hidden, layers, heads, kv_heads, eot=eot, eos=eos,
        head_dim=hidden // heads, rms_norm_eps=1e-6, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        tie_word_embeddings=True, pad_token_id=eot,
    )


class Qwen3Asr(TinyBuilder):
    name = "Qwen3-ASR"
    defaults = {**SHAPE, "sharpen": SHARPEN, "verify": True}
    special_tokens, chat_template, audio_token, eos_token = SPECIAL_TOKENS, CHAT_TEMPLATE, AUDIO_TOKEN, EOS_TOKEN
    roles = token_roles(AUDIO_TOKEN, AUDIO_BEGIN, AUDIO_END)
    model_class = "Qwen3ASRForConditionalGeneration"
    frontend_gain = FRONTEND_GAIN
    qk_norm = True  # q/k RMSNorm would undo a q_proj/k_proj scale
    tied = ("lm_head.weight", "model.language_model.embed_tokens.weight")

    def processor(self, tokenizer, s):
        from transformers import Qwen3ASRFeatureExtractor, Qwen3ASRProcessor

        fe = Qwen3ASRFeatureExtractor(feature_size=128, sampling_rate=16000, n_window=50, min_length=8000)
        return Qwen3ASRProcessor(feature_extractor=fe, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)

    def config(self, s, tokenizer, ids):
        from transformers import Qwen3ASRConfig

        return Qwen3ASRConfig(
            audio_config=encoder_config(s.audio_layers, s.audio_d_model, s.audio_heads, s.hidden),
            text_config=qwen3_text_config(ids.vocab, s.hidden, s.layers, s.heads, s.kv_heads, eot=ids.eot, eos=ids.eos),
            audio_token_id=ids.audio,
            pad_token_id=ids.eot,
            eos_token_id=ids.eos,
            tie_word_embeddings=True,
        )

    def saved_name(self, name: str) -> str | None:
        """transformers' own names; the tied lm_head is left out."""
        return None if name == "lm_head.weight" else name


build, check_reload, main = Qwen3Asr().api()

if __name__ == "__main__":
    main()
