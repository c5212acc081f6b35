"""Build a tiny random-weight Qwen2.5-Omni (thinker) checkpoint, fully offline.

    python -m vllm_affinity_tools.tiny_qwen25omni OUT_DIR [--layers N] [--hidden H] [--heads A]
                                                   [--kv-heads K] [--seed S] [--sharpen F]

The Qwen2.5-Omni sibling of :mod:`vllm_affinity_tools.tiny_qwen3asr` (the steps are
:class:`~.tiny_base.TinyBuilder`'s): byte-level BPE tokenizer
(:func:`~.tiny_base.build_tokenizer`) with Qwen's role tokens and Qwen2.5-Omni's
audio / vision tokens (``<|audio_bos|>``, the placeholder ``<|AUDIO|>``,
``<|audio_eos|>``, ``<|vision_start|>``, ``<|IMAGE|>``, ``<|VIDEO|>``,
``<|vision_end|>``) as special tokens, registered as the tokenizer's ``audio_token`` /
``audio_bos_token`` / ``audio_eos_token`` / ``image_token`` / ``video_token`` /
``vision_bos_token`` / ``vision_eos_token`` (``extra_special_tokens``, which
``Qwen2_5OmniProcessor`` reads), a 128-bin 30 s ``WhisperFeatureExtractor``, tiny
Qwen2-VL image and video processors (``Qwen2_5OmniProcessor`` needs both; their
``max_pixels`` of 16 merged patches keeps any image / video dummy small), a chat template in
the hub's layout (``<|im_start|>user\\n<|audio_bos|><|AUDIO|><|audio_eos|>QUESTION
<|im_end|>\\n<|im_start|>assistant\\n`` after the default system turn) and the weights of
``Qwen2_5OmniForConditionalGeneration`` under transformers' own names, i.e. the hub's
(``thinker.audio_tower.*``, ``thinker.visual.*``, ``thinker.model.*``,
``thinker.lm_head.*``), which vLLM's ``Qwen2_5OmniThinkerForConditionalGeneration``
maps (``thinker.model.`` -> ``language_model.model.``, ``thinker.lm_head.`` ->
``language_model.lm_head.``, ``thinker.`` -> ``""``; ``talker.`` / ``token2wav.``
dropped).

Config: the top-level ``Qwen2_5OmniConfig`` (architecture
``Qwen2_5OmniForConditionalGeneration``, which vLLM's registry maps to its thinker)
with ``enable_audio_output=False``, so neither transformers nor vLLM builds a talker or
token2wav; their (tiny) configs are present because the config class always writes
them. vLLM reads ``hf_config.thinker_config``; transformers' thinker reads the same.
The embeddings are untied everywhere (top level, thinker and ``text_config``, which
vLLM's Qwen2 reads), so ``thinker.lm_head.weight`` is saved. The build reloads the
checkpoint in transformers and fails on missing, unexpected or mismatched keys.

Shapes: the audio encoder (Whisper-style conv stem over 100-frame chunks
(``n_window`` 50 x 2), chunk-local attention, stride-2 average pool, ``proj`` to
``output_dim`` = the text hidden size) has d_model 128, 2 heads (head_dim 64). The text
model is Qwen2 with head_dim 64 and M-RoPE (``rope_parameters`` with ``mrope_section``
[8, 12, 12], the real model's [16, 24, 24] scaled to head_dim 64; rope_theta 1e6). The
vision tower is one block of hidden 64, 1 head (head_dim 64), ``out_hidden_size`` = the
text hidden size; images / videos are capped at 16 merged patches. ``--sharpen`` scales
the text layers' q/k projections (Qwen2 has no q/k norm), :func:`~.tiny_base.sharpen_qk`.
"""

from __future__ import annotations

from .tiny_base import (
    QWEN_TOKENS,
    SHAPE,
    OmniThinker,
    audio_encoder_config,
    decoder_config,
    qwen_chat_template,
    qwen_prompt,
    token_roles,
    whisper_processor,
)

# conv1/conv2 gains so the audio, not the positions, sets the frames: see
# tiny_base.amplify_audio_frontend (cut margin of the test clips 0 (a deep-stage tie) -> 1.7e-4)
FRONTEND_GAIN = {"conv1": 10.0, "conv2": 10.0}
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BEGIN, AUDIO_END = "<|audio_bos|>", "<|audio_eos|>"
IMAGE_TOKEN, VIDEO_TOKEN = "<|IMAGE|>", "<|VIDEO|>"
VISION_BEGIN, VISION_END = "<|vision_start|>", "<|vision_end|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [*QWEN_TOKENS, AUDIO_BEGIN, AUDIO_TOKEN, AUDIO_END, VISION_BEGIN, IMAGE_TOKEN, VIDEO_TOKEN, VISION_END]
AUDIO_PART = f"{AUDIO_BEGIN}{AUDIO_TOKEN}{AUDIO_END}"  # the hub template's audio part (no add_audio_id)
SYSTEM = "You are a helpful assistant."

# The hub template's layout: default system turn; per content part: image / video in the
# vision brackets, audio in the audio brackets, text as is.
CHAT_TEMPLATE = qwen_chat_template(
    {
        "image": VISION_BEGIN + IMAGE_TOKEN + VISION_END,
        "audio": AUDIO_PART,
        "video": VISION_BEGIN + VIDEO_TOKEN + VISION_END,
    },
    system=SYSTEM,
)

MROPE_SECTION = [8, 12, 12]  # sums to head_dim / 2 = 32 (the real model: [16, 24, 24], head_dim 128)
PATCH, MERGE, TEMPORAL = 14, 2, 2
MIN_PIXELS = (PATCH * MERGE) ** 2 * 4  # 4 merged patches
MAX_PIXELS = (PATCH * MERGE) ** 2 * 16  # 16 merged patches


def prompt(question: str, system: str = SYSTEM) -> str:
    """The rendered Qwen2.5-Omni prompt for one user turn of [audio, text]."""
    return qwen_prompt(AUDIO_PART + question, system)


def audio_config(layers: int, d_model: int, heads: int, output_dim: int) -> dict:
    """A tiny Qwen2.5-Omni audio encoder (128 mel bins, 100-frame chunks, 1500 positions)."""
    return {
        **audio_encoder_config("qwen2_5_omni_audio_encoder", layers, d_model, heads),
        "output_dim": output_dim,
        "n_window": 50,  # 2 * n_window = 100-frame chunks (the 7B: n_window 100); the count does not depend on it
    }


def vision_config(out_hidden: int) -> dict:
    """A one-block Qwen2.5-Omni vision tower (hidden 64, 1 head of 64)."""
    return {
        "depth": 1,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 1,
        "in_channels": 3,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": TEMPORAL,
        "window_size": 112,
        "fullatt_block_indexes": [0],
        "out_hidden_size": out_hidden,
    }


def text_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, *, eot: int, eos: int) -> dict:
    """A tiny Qwen2.5-Omni (Qwen2) decoder: head_dim 64, M-RoPE, untied embeddings."""
    return decoder_config(
        "qwen2_5_omni_text", vocab, hidden, layers, heads, kv_heads, eot=eot, eos=eos,
        rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=eot,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(MROPE_SECTION)},
    )


def talker_config(vocab: int, text_hidden: int, ids: dict) -> dict:
    """A tiny talker config (never built: ``enable_audio_output`` is off); its vocabulary
    is the text one so the token ids it names are in range."""
    return {
        "vocab_size": vocab, "embedding_size": text_hidden, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(MROPE_SECTION)},
        "tts_text_start_token_id": vocab - 1, "tts_text_end_token_id": vocab - 1, "tts_text_pad_token_id": vocab - 1,
        "tts_codec_start_token_id": 61, "tts_codec_end_token_id": 62, "tts_codec_pad_token_id": 60,
        "tts_codec_mask_token_id": 63,
        **ids,
    }


def token2wav_config() -> dict:
    """A tiny token2wav config (never built)."""
    return {
        "dit_config": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1, "head_dim": 64,
                       "emb_dim": 64, "num_embeds": 64, "enc_emb_dim": 32, "enc_dim": 32,
                       "enc_channels": [32, 32, 32, 32, 96], "enc_attention_channels": 16, "enc_se_channels": 16,
                       "look_ahead_layers": [0], "look_backward_layers": [0]},
        "bigvgan_config": {"upsample_initial_channel": 32},
    }


class Qwen25Omni(OmniThinker):
    name = "Qwen2.5-Omni"
    defaults = {**SHAPE, "verify": True}
    special_tokens, chat_template, audio_token, eos_token = SPECIAL_TOKENS, CHAT_TEMPLATE, AUDIO_TOKEN, EOS_TOKEN
    roles = token_roles(AUDIO_TOKEN, AUDIO_BEGIN, AUDIO_END, IMAGE_TOKEN, VIDEO_TOKEN, VISION_BEGIN, VISION_END)
    model_class = "Qwen2_5OmniForConditionalGeneration"
    frontend_gain = FRONTEND_GAIN
    # the thinker, the part vLLM serves (it reads thinker_config and the thinker.* tensors of
    # the top-level checkpoint). The top-level class is not used: its from_pretrained insists
    # on a speaker file (spk_dict.pt) even with audio output off.
    reload = (("Qwen2_5OmniThinkerForConditionalGeneration", "thinker."),)

    def check_shape(self, s):
        if 2 * sum(MROPE_SECTION) != s.hidden // s.heads:
            raise ValueError(
                f"mrope_section {MROPE_SECTION} needs head_dim {2 * sum(MROPE_SECTION)}, got {s.hidden // s.heads}"
            )

    def processor(self, tokenizer, s):
        from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        vision = {
            "patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": TEMPORAL,
            "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
            "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        }
        return whisper_processor(
            Qwen2_5OmniProcessor, tokenizer, CHAT_TEMPLATE,
            image_processor=Qwen2VLImageProcessor(**vision), video_processor=Qwen2VLVideoProcessor(**vision),
        )

    def config(self, s, tokenizer, ids):
        from transformers import Qwen2_5OmniConfig

        tid = tokenizer.convert_tokens_to_ids
        token_ids = {
            "audio_token_index": ids.audio,
            "image_token_index": tid(IMAGE_TOKEN),
            "video_token_index": tid(VIDEO_TOKEN),
            "audio_start_token_id": tid(AUDIO_BEGIN),
            "audio_end_token_id": tid(AUDIO_END),
            "vision_start_token_id": tid(VISION_BEGIN),
            "vision_end_token_id": tid(VISION_END),
        }
        thinker = {
            "audio_config": audio_config(s.audio_layers, s.audio_d_model, s.audio_heads, s.hidden),
            "vision_config": vision_config(s.hidden),
            "text_config": text_config(ids.vocab, s.hidden, s.layers, s.heads, s.kv_heads, eot=ids.eot, eos=ids.eos),
            "user_token_id": tokenizer("user", add_special_tokens=False)["input_ids"][0],
            "tie_word_embeddings": False,
            "pad_token_id": ids.eot,
            "eos_token_id": ids.eos,
            **token_ids,
        }
        return Qwen2_5OmniConfig(
            thinker_config=thinker,
            talker_config=talker_config(ids.vocab, s.hidden, token_ids),
            token2wav_config=token2wav_config(),
            enable_audio_output=False,
            tie_word_embeddings=False,
        )


build, check_reload, main = Qwen25Omni().api()

if __name__ == "__main__":
    main()
