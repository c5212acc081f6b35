"""Build a tiny random-weight Qwen3-Omni-MoE (thinker) checkpoint, fully offline.

    python -m vllm_affinity_tools.tiny_qwen3omni OUT_DIR [--layers N] [--hidden H] [--heads A]
                                                  [--kv-heads K] [--seed S] [--sharpen F]

The Qwen3-Omni sibling of :mod:`vllm_affinity_tools.tiny_qwen3asr` (whose audio encoder
is the same family; the steps are :class:`~.tiny_base.TinyBuilder`'s): a top-level
``Qwen3OmniMoeConfig`` (architecture ``Qwen3OmniMoeForConditionalGeneration``, what vLLM's registry maps to its
``Qwen3OmniMoeThinkerForConditionalGeneration``) with ``enable_audio_output=False``, so
only the thinker exists and is saved; ``talker_config`` / ``code2wav_config`` stay at
their defaults, config only (vLLM drops ``talker.*`` / ``code2wav.*`` weights and builds
neither; transformers builds neither without ``enable_audio_output``).

* Tokenizer: byte-level BPE (:func:`~.tiny_base.build_tokenizer`) with Qwen's role tokens and
  Qwen3-Omni's multimodal tokens (``<|audio_start|>``, the placeholder ``<|audio_pad|>``,
  ``<|audio_end|>``, ``<|vision_start|>``, ``<|image_pad|>``, ``<|video_pad|>``,
  ``<|vision_end|>``) as special tokens, registered as the tokenizer's ``audio_token`` /
  ``audio_bos_token`` / ``audio_eos_token`` / ``image_token`` / ``video_token`` /
  ``vision_bos_token`` / ``vision_eos_token`` (``extra_special_tokens``, which
  ``Qwen3OmniMoeProcessor`` reads); their ids go into ``thinker_config``
  (``audio_token_id``, ``audio_start_token_id``, ``image_token_id``, ``video_token_id``,
  and, as in the hub's config though the config class does not declare them,
  ``audio_end_token_id`` / ``vision_start_token_id`` / ``vision_end_token_id``: transformers'
  ``get_rope_index`` reads ``vision_start_token_id`` even for an audio-only prompt) and
  the role ids into the top-level config.
* ``Qwen3OmniMoeProcessor``: a 128-bin ``WhisperFeatureExtractor`` (``chunk_length`` 300
  as the hub's; the processor pads to the longest clip, no 30 s window, no truncation),
  a ``Qwen2VLImageProcessor`` and ``Qwen2VLVideoProcessor`` with the hub's patch 16 /
  temporal 2 / merge 2 but at most 16 merged tokens per image and 16 per video frame
  pair, so vLLM's vision profiling stays tiny.
* Chat template in the hub's layout (no default system turn; an audio part renders as
  the audio brackets with one placeholder, directly followed by the text), written as an
  explicit loop over ``message['content']`` so vLLM detects the "openai" content format.
* Weights saved under the hub's names (``thinker.audio_tower.*``, ``thinker.visual.*``,
  ``thinker.model.*``, ``thinker.lm_head.*``), which vLLM's mapper strips to its own
  (``thinker.model.`` -> ``language_model.model.``); the experts as transformers keeps
  them, fused 3-D tensors ``mlp.experts.gate_up_proj`` (E, 2I, H) / ``down_proj``
  (E, H, I), which vLLM's MoE loader takes (``is_3d_moe_weight``). The embeddings are
  untied, as in the hub's model. The build reloads the checkpoint in transformers (as
  ``Qwen3OmniMoeForConditionalGeneration``, tensors compared, and as the
  ``Qwen3OmniMoeThinkerForConditionalGeneration`` the reference uses) and fails on
  missing, unexpected or mismatched keys.

Shapes: the text model is Qwen3-MoE, hidden 256, 4 layers, 4 heads / 2 kv heads,
head_dim 64 (vLLM's CPU attention needs >= 32), every layer sparse with 4 experts of
``moe_intermediate_size`` 128, top-2, normalised top-k weights. RoPE is the hub's
interleaved M-RoPE (``mrope_section`` [24, 20, 20] of head_dim 128 scaled to
[12, 10, 10] of 64, ``mrope_interleaved``; theta 1e6): an audio-only prompt has the same
temporal/height/width position per token, so the three sections rotate alike. The audio
encoder (3 stride-2 conv2d over 100-frame chunks -> 13 rows per chunk, windowed
attention over ``n_window_infer`` 800 frames) has d_model 128, 2 heads (head_dim 64),
``output_dim`` = the text hidden size. The vision tower is 2 blocks of width 64
(2 heads), deepstack after block 1, ``out_hidden_size`` = the text hidden size.
Qwen3 has per-head q/k RMSNorm: scaling ``q_proj`` would be normalised away, so
``--sharpen`` scales the ``q_norm`` / ``k_norm`` weights instead (x F each,
:func:`~.tiny_base.sharpen_qk` with ``norms``). Default x4, not
the other builders' x8: each norm scale multiplies the attention logits, and at x8 (logits
x64) vLLM's and transformers' float paths already differ by up to 1.2e-3 in log-prob on a
425-token text prompt (x4: 5e-5), while x4 still moves log-probs by ~0.9 when the audio is
pooled to 0.74.
"""

from __future__ import annotations

from . import tiny_qwen3asr
from .tiny_base import (
    QWEN_TOKENS,
    SHAPE,
    OmniThinker,
    decoder_config,
    qwen_chat_template,
    qwen_prompt,
    token_roles,
    whisper_processor,
)

# the audio encoder is Qwen3-ASR's, so are its front-end gains (cut margin here 6e-8 -> 5e-4)
FRONTEND_GAIN = tiny_qwen3asr.FRONTEND_GAIN
SHARPEN = 4.0  # see the module docstring
AUDIO_TOKEN = "<|audio_pad|>"
AUDIO_BEGIN, AUDIO_END = "<|audio_start|>", "<|audio_end|>"
IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
VISION_BEGIN, VISION_END = "<|vision_start|>", "<|vision_end|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [*QWEN_TOKENS, AUDIO_BEGIN, AUDIO_TOKEN, AUDIO_END, VISION_BEGIN, IMAGE_TOKEN, VIDEO_TOKEN, VISION_END]
AUDIO_PART = f"{AUDIO_BEGIN}{AUDIO_TOKEN}{AUDIO_END}"  # vLLM's get_placeholder_str
IMAGE_PART = f"{VISION_BEGIN}{IMAGE_TOKEN}{VISION_END}"
VIDEO_PART = f"{VISION_BEGIN}{VIDEO_TOKEN}{VISION_END}"

# The hub template's layout: Qwen chat roles, no default system turn, each media part
# as its brackets with one placeholder, the text directly after.
CHAT_TEMPLATE = qwen_chat_template({"audio": AUDIO_PART, "image": IMAGE_PART, "video": VIDEO_PART})

# hub: patch 16, temporal 2, merge 2, CLIP-style 0.5 mean/std; tiny pixel budgets
# (one merged token = (16 * 2) ** 2 = 1024 pixels): 1..16 tokens per image / frame pair
_PATCH, _MERGE, _TEMPORAL = 16, 2, 2
_VISION_KW = {
    "patch_size": _PATCH, "temporal_patch_size": _TEMPORAL, "merge_size": _MERGE,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}
_MIN_PIXELS, _MAX_PIXELS = 1024, 16 * 1024


def prompt(question: str) -> str:
    """The rendered Qwen3-Omni prompt for one user turn of [audio, text]."""
    return qwen_prompt(AUDIO_PART + question)


def encoder_config(layers: int, d_model: int, heads: int, output_dim: int) -> dict:
    """A tiny Qwen3-Omni audio encoder: Qwen3-ASR's (128 mel bins, 100-frame chunks,
    n_window 50), 1500 positions."""
    return {
        **tiny_qwen3asr.encoder_config(layers, d_model, heads, output_dim),
        "model_type": "qwen3_omni_moe_audio_encoder",
        "max_source_positions": 1500,
    }


def vision_config(out_hidden: int) -> dict:
    """A tiny Qwen3-Omni vision tower (2 blocks, width 64, deepstack after block 1)."""
    return {
        "model_type": "qwen3_omni_moe_vision_encoder",
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "patch_size": _PATCH,
        "spatial_merge_size": _MERGE,
        "temporal_patch_size": _TEMPORAL,
        "out_hidden_size": out_hidden,
        "num_position_embeddings": 256,  # a 16 x 16 grid, interpolated
        # not declared by the config class but in the hub's config and read by vLLM's
        # tower (grid side = image_size // patch_size, learned absolute positions)
        "image_size": 16 * _PATCH,
        "apply_vit_abs_pos_embed": True,
        "deepstack_visual_indexes": [1],
    }


def text_config(
    vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, *, eot: int, eos: int,
    experts: int, top_k: int, moe_intermediate: int,
) -> dict:
    """A tiny Qwen3-MoE decoder (head_dim 64, every layer sparse, interleaved M-RoPE)."""
    head_dim = hidden // heads
    # the hub's [24, 20, 20] of head_dim 128 (64 rotary frequencies), scaled to head_dim
    scale = head_dim / 128
    h = w = round(20 * scale)
    section = [head_dim // 2 - h - w, h, w]
    return decoder_config(
        "qwen3_omni_moe_text", vocab, hidden, layers, heads, kv_heads, eot=eot, eos=eos,
        head_dim=head_dim, rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=eot,
        rope_parameters={
            "rope_type": "default", "rope_theta": 1000000.0,
            "mrope_section": section, "mrope_interleaved": True, "interleaved": True,
        },
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=moe_intermediate,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    )


class Qwen3Omni(OmniThinker):
    name = "Qwen3-Omni"
    defaults = {**SHAPE, "sharpen": SHARPEN, "experts": 4, "top_k": 2, "moe_intermediate": 128, "verify": True}
    special_tokens, chat_template, audio_token, eos_token = SPECIAL_TOKENS, CHAT_TEMPLATE, AUDIO_TOKEN, EOS_TOKEN
    roles = token_roles(AUDIO_TOKEN, AUDIO_BEGIN, AUDIO_END, IMAGE_TOKEN, VIDEO_TOKEN, VISION_BEGIN, VISION_END)
    model_class = "Qwen3OmniMoeForConditionalGeneration"
    frontend_gain = FRONTEND_GAIN
    qk_norm = True  # q/k RMSNorm would undo a q_proj/k_proj scale
    # the full model (the very same tensors), then the thinker the reference loads
    reload = (
        ("Qwen3OmniMoeForConditionalGeneration", ""),
        ("Qwen3OmniMoeThinkerForConditionalGeneration", "thinker."),
    )

    def processor(self, tokenizer, s):
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3OmniMoeProcessor

        size = {"shortest_edge": _MIN_PIXELS, "longest_edge": _MAX_PIXELS}
        return whisper_processor(
            Qwen3OmniMoeProcessor, tokenizer, CHAT_TEMPLATE, attention_mask=True, chunk_length=300,
            image_processor=Qwen2VLImageProcessor(size=size, **_VISION_KW),
            video_processor=Qwen2VLVideoProcessor(size=size, min_frames=2, max_frames=8, **_VISION_KW),
        )

    def config(self, s, tokenizer, ids):
        from transformers import Qwen3OmniMoeConfig

        tid = tokenizer.convert_tokens_to_ids
        thinker = {
            "audio_config": encoder_config(s.audio_layers, s.audio_d_model, s.audio_heads, s.hidden),
            "vision_config": vision_config(s.hidden),
            "text_config": text_config(
                ids.vocab, s.hidden, s.layers, s.heads, s.kv_heads, eot=ids.eot, eos=ids.eos,
                experts=s.experts, top_k=s.top_k, moe_intermediate=s.moe_intermediate,
            ),
            "audio_token_id": ids.audio,
            "audio_start_token_id": tid(AUDIO_BEGIN),
            # not declared by Qwen3OmniMoeThinkerConfig but in the hub's config and read:
            # transformers' get_rope_index (vision start), vLLM's audio-in-video (audio end)
            "audio_end_token_id": tid(AUDIO_END),
            "vision_start_token_id": tid(VISION_BEGIN),
            "vision_end_token_id": tid(VISION_END),
            "image_token_id": tid(IMAGE_TOKEN),
            "video_token_id": tid(VIDEO_TOKEN),
            "user_token_id": tokenizer("user", add_special_tokens=False)["input_ids"][0],
            "position_id_per_seconds": 25,
            "tie_word_embeddings": False,
            "pad_token_id": ids.eot,
            "eos_token_id": ids.eos,
        }
        return Qwen3OmniMoeConfig(
            thinker_config=thinker,
            enable_audio_output=False,
            im_start_token_id=tid("<|im_start|>"),
            im_end_token_id=ids.eos,
            pad_token_id=ids.eot,
            eos_token_id=ids.eos,
            tie_word_embeddings=False,
        )


build, check_reload, main = Qwen3Omni().api()

if __name__ == "__main__":
    main()
