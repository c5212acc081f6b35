"""The tiny AudioFlamingo3, GLM-ASR, Qwen3-ASR, Qwen2.5-Omni and Qwen3-Omni-MoE
checkpoints and the Hugging Face references on them (no vLLM).

Each builder is deterministic and its checkpoint reloads cleanly in transformers; the
reference at keep_ratio 1.0 is transformers' own model (processor + ``generate``); its
count is the processor's (AF3 and GLM-ASR: 30 s windows capped at ``max_audio_len``;
Qwen3-ASR: no window, no cap; the Omni thinkers: the processor called as vLLM calls it,
no cap); its pooling and deep merge keep exactly the counts of :mod:`vllm_affinity.pooling`.

The Omni checkpoints are the full models' (top-level ``Qwen2_5OmniConfig`` /
``Qwen3OmniMoeConfig`` holding ``thinker_config``, weights under ``thinker.*``, audio
output off); the references load only the thinker, whose text model uses M-RoPE: the
reference repeats the 1-D positions per component, and ``generate`` (which computes its
own M-RoPE positions) must agree.

Every test takes the architecture as an indirect ``arch`` parameter (the per-architecture
facts are in :data:`ARCHS`); a test that only one or two architectures have is
parametrized over those only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_affinity import pooling

MAX_NEW = 6
HUB_PREFIXES = ("audio_tower.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head.")


# -- per-architecture layout checks (on config.json, the processor and the saved keys) ------
def _af3_layout(cfg, proc, keys, tiny) -> None:
    text, audio = cfg["text_config"], cfg["audio_config"]
    assert text["hidden_size"] // text["num_attention_heads"] >= 32  # vLLM CPU attention
    assert audio["hidden_size"] // audio["num_attention_heads"] >= 32
    assert audio["max_source_positions"] == 1500  # HF's AF3 encoder adds all 1500 rows
    assert any(k.startswith("language_model.lm_head.") for k in keys)


def _glmasr_layout(cfg, proc, keys, tiny) -> None:
    assert proc.max_audio_len == 60
    # the audio brackets and the placeholder are one token each in any prompt
    ids = proc.tokenizer(f"<|user|>\n{tiny.AUDIO_PART}<|user|>\nWhat?", add_special_tokens=False)["input_ids"]
    assert proc.tokenizer.convert_ids_to_tokens(ids[:5]) == [
        "<|user|>", "Ċ", "<|begin_of_audio|>", "<|pad|>", "<|end_of_audio|>"
    ]
    text, audio = cfg["text_config"], cfg["audio_config"]
    assert text["model_type"] == "llama"
    assert text["hidden_size"] // text["num_attention_heads"] == text["head_dim"] >= 32  # vLLM CPU attention
    assert audio["hidden_size"] // audio["num_attention_heads"] >= 32
    assert audio["intermediate_size"] == 4 * audio["hidden_size"]  # 4 frames -> one projector row
    assert audio["max_position_embeddings"] == 1500
    # transformers ties on the top-level flag, vLLM's Llama on text_config's: both off
    assert cfg["tie_word_embeddings"] is False and text["tie_word_embeddings"] is False
    assert "language_model.lm_head.weight" in keys
    assert not any(k.endswith("k_proj.bias") for k in keys)  # GLM-ASR has none (vLLM fakes it)


def _qwen3asr_layout(cfg, proc, keys, tiny) -> None:
    assert type(proc.feature_extractor).__name__ == "Qwen3ASRFeatureExtractor"
    assert (proc.audio_token, proc.audio_bos_token, proc.audio_eos_token) == (
        "<|audio_pad|>", "<|audio_start|>", "<|audio_end|>"
    )
    ids = proc.tokenizer(tiny.prompt("What?"), add_special_tokens=False)["input_ids"]
    assert proc.tokenizer.convert_ids_to_tokens(ids[:6]) == [
        "<|im_start|>", "user", "Ċ", "<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"
    ]
    text, audio = cfg["text_config"], cfg["audio_config"]
    assert text["model_type"] == "qwen3"
    assert text["hidden_size"] // text["num_attention_heads"] == text["head_dim"] == 64  # vLLM CPU attention
    assert audio["d_model"] // audio["encoder_attention_heads"] >= 32
    assert audio["n_window"] == 50  # vLLM's count hard-codes 100-frame chunks
    assert audio["output_dim"] == text["hidden_size"]
    assert "mrope_section" not in (text.get("rope_parameters") or {})  # 1-D RoPE in vLLM
    # transformers ties on the top-level flag, vLLM's Qwen3 on text_config's: both on, no lm_head saved
    assert cfg["tie_word_embeddings"] is True and text["tie_word_embeddings"] is True
    assert not any("lm_head" in k for k in keys)
    assert any(k.endswith("self_attn.q_norm.weight") for k in keys)
    assert tiny.AUDIO_PART in tiny.prompt("What?")


def _omni_common(cfg, proc, keys, tiny) -> tuple[dict, dict, int]:
    """Checks both Omni thinkers share; returns (text_config, audio_config, head_dim)."""
    assert cfg["enable_audio_output"] is False  # no talker / token2wav built or saved
    thinker = cfg["thinker_config"]
    text, audio = thinker["text_config"], thinker["audio_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert head_dim >= 32  # vLLM CPU attention
    assert audio["d_model"] // audio["encoder_attention_heads"] >= 32
    assert audio["num_mel_bins"] == proc.feature_extractor.feature_size == 128
    assert audio["output_dim"] == text["hidden_size"]  # no separate projector
    # M-RoPE: mrope_section halves the rotary dims (sum = head_dim / 2)
    rope = text.get("rope_parameters") or {}
    assert sum(rope["mrope_section"]) == head_dim // 2
    # the brackets and the placeholder are one token each, in the prompt and on their own
    tok = proc.tokenizer
    assert (proc.audio_token, proc.audio_bos_token, proc.audio_eos_token) == (
        tiny.AUDIO_TOKEN, tiny.AUDIO_BEGIN, tiny.AUDIO_END
    )
    assert tiny.AUDIO_PART == tiny.AUDIO_BEGIN + tiny.AUDIO_TOKEN + tiny.AUDIO_END
    part = [tiny.AUDIO_BEGIN, tiny.AUDIO_TOKEN, tiny.AUDIO_END]
    assert tok.convert_ids_to_tokens(tok(tiny.AUDIO_PART, add_special_tokens=False)["input_ids"]) == part
    toks = tok.convert_ids_to_tokens(tok(tiny.prompt("What?"), add_special_tokens=False)["input_ids"])
    i = toks.index(tiny.AUDIO_BEGIN)
    assert toks[i - 3 : i + 3] == ["<|im_start|>", "user", "Ċ", *part]
    # the token ids live in the thinker config
    assert thinker["audio_start_token_id"] == tok.convert_tokens_to_ids(tiny.AUDIO_BEGIN)
    assert thinker["audio_end_token_id"] == tok.convert_tokens_to_ids(tiny.AUDIO_END)
    # untied everywhere (top level, thinker, text_config, which vLLM's text model reads): lm_head saved
    assert cfg["tie_word_embeddings"] is False and thinker["tie_word_embeddings"] is False
    assert text["tie_word_embeddings"] is False
    assert "thinker.lm_head.weight" in keys
    assert "thinker.model.embed_tokens.weight" in keys  # the text model is thinker.model (no language_model)
    assert not any(k.startswith("thinker.model.language_model.") for k in keys)
    assert any(k.startswith("thinker.audio_tower.") for k in keys)
    return text, audio, head_dim


def _qwen25omni_layout(cfg, proc, keys, tiny) -> None:
    assert type(proc.feature_extractor).__name__ == "WhisperFeatureExtractor"
    assert proc.feature_extractor.n_samples == 480000  # padded to 30 s (longer clips: see hf_kwargs)
    text, audio, _ = _omni_common(cfg, proc, keys, tiny)
    assert text["model_type"] == "qwen2_5_omni_text"
    assert "mrope_interleaved" not in text["rope_parameters"]
    assert audio["n_window"] == 50
    assert cfg["thinker_config"]["audio_token_index"] == proc.tokenizer.convert_tokens_to_ids(tiny.AUDIO_TOKEN)
    assert not any(k.endswith(("q_norm.weight", "k_norm.weight")) for k in keys)  # Qwen2: q_proj sharpened


def _qwen3omni_layout(cfg, proc, keys, tiny) -> None:
    assert type(proc.feature_extractor).__name__ == "WhisperFeatureExtractor"
    text, audio, head_dim = _omni_common(cfg, proc, keys, tiny)
    assert text["model_type"] == "qwen3_omni_moe_text"
    assert text["head_dim"] == head_dim
    assert text["rope_parameters"]["mrope_interleaved"] is True
    assert audio["n_window"] == 50  # vLLM's count hard-codes 100-frame chunks
    # MoE: every layer sparse, top-k of the experts, the experts fused as transformers keeps them
    assert text["num_experts"] > text["num_experts_per_tok"] >= 2
    assert text["decoder_sparse_step"] == 1 and text["mlp_only_layers"] == []
    n_layers = text["num_hidden_layers"]
    for suffix in ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
        assert sum(k.endswith(suffix) for k in keys) == n_layers, suffix
    assert any(k.endswith("self_attn.q_norm.weight") for k in keys)


@dataclass(frozen=True)
class Arch:
    builder: str  # module under vllm_affinity_tools
    reference: str  # class in vllm_affinity_tools.reference
    model: str  # transformers class
    processor: str  # transformers processor class name
    audio_token: str
    clips: tuple[int, int]  # seconds: (short, long)
    weight_prefixes: tuple[str, ...]
    probe: Callable  # tiny module -> a text holding one placeholder
    layout: Callable  # (cfg, processor, keys, tiny module) -> None: the architecture's own checks
    template_shapes: tuple[dict, ...]  # audio parts the chat template must render
    tied: bool = False  # lm_head shares the embeddings after reload
    window_rows: tuple[int, ...] | None = None  # rows per window of the long clip
    cap_rows_per_window: int | None = None  # rows per 30 s window under max_audio_len
    features: tuple[tuple[int, ...], list[int]] | None = None  # long clip: (input_features shape, mask sums)
    token_counts: tuple[tuple[int, int], ...] = ()  # (frames, tokens_from_frames)
    # config.json -> the config that holds the token ids and text_config (Omni: thinker_config)
    lm_config: Callable[[dict], dict] = lambda cfg: cfg
    audio_id_key: str = "audio_token_id"  # the placeholder id's key in lm_config
    processor_audio_id: bool = True  # the processor exposes audio_token_id
    reload_classes: tuple[str, ...] = ()  # transformers classes that reload cleanly (default: model)
    qk_norm_scale: float | None = None  # Qwen3 q/k RMSNorm weights after sharpening
    text_prefix: str = ""  # saved names of the text model's tensors
    # the HF processor call vLLM makes: extra kwargs, waves zero-padded to a multiple of hf_pad samples
    hf_kwargs: dict = field(default_factory=dict)
    hf_pad: int = 1
    mask_key: str = "input_features_mask"  # the processor's frame mask
    # (model, processor inputs) -> transformers' audio embeddings of those inputs
    hf_audio_features: Callable = lambda model, inputs: model.model.get_audio_features(
        inputs["input_features"], inputs["input_features_mask"]
    ).pooler_output
    processor_counts: tuple[int, ...] = ()  # sample counts whose processor count num_audio_tokens must match
    seconds_counts: tuple[tuple[int, int], ...] = ()  # (seconds, num_audio_tokens)


AUDIO = {"type": "audio"}
AUDIO_HF = {"type": "audio", "audio": "x.wav"}

ARCHS = {
    "af3": Arch(
        builder="tiny_af3",
        reference="ReferenceAudioFlamingo3",
        model="AudioFlamingo3ForConditionalGeneration",
        processor="AudioFlamingo3Processor",
        audio_token="<sound>",
        clips=(5, 45),  # one window; two windows (30 s + 15 s)
        weight_prefixes=HUB_PREFIXES,
        probe=lambda tiny: "user\n<sound>What?",
        layout=_af3_layout,
        template_shapes=(AUDIO,),  # AF3's layout: <sound> first, then the text
        window_rows=(750, 375),
        cap_rows_per_window=750,
    ),
    "glmasr": Arch(
        builder="tiny_glmasr",
        reference="ReferenceGlmAsr",
        model="GlmAsrForConditionalGeneration",
        processor="GlmAsrProcessor",
        audio_token="<|pad|>",
        clips=(5, 45),  # one window; two windows (30 s + 15 s)
        weight_prefixes=HUB_PREFIXES,
        probe=lambda tiny: f"<|user|>\n{tiny.AUDIO_PART}<|user|>\nWhat?",
        layout=_glmasr_layout,
        template_shapes=(AUDIO, AUDIO_HF),  # the hub's layout
        window_rows=(375, 187),
        cap_rows_per_window=375,
        features=((2, 128, 3000), [3000, 1500]),
        # 375 tokens per full 30 s window, (ceil(ceil(samples / 160) / 2)) // 4 for a part
        token_counts=((3000, 375), (1500, 187), (500, 62), (7, 1), (6, 0), (1, 0)),
    ),
    "qwen3asr": Arch(
        builder="tiny_qwen3asr",
        reference="ReferenceQwen3Asr",
        model="Qwen3ASRForConditionalGeneration",
        processor="Qwen3ASRProcessor",
        audio_token="<|audio_pad|>",
        clips=(5, 40),  # one attention window; several, partial chunk count
        weight_prefixes=("model.audio_tower.", "model.multi_modal_projector.", "model.language_model."),
        probe=lambda tiny: tiny.prompt("What?"),
        layout=_qwen3asr_layout,
        template_shapes=(AUDIO, AUDIO_HF),  # the hub's layout
        tied=True,
        # 13 rows per full 100-frame chunk, three stride-2 halvings of the remainder
        token_counts=(
            (100, 13), (200, 26), (50, 7), (1, 1), (0, 0), (99, 13), (101, 14), (500, 65), (2000, 260), (3000, 390)
        ),
        qk_norm_scale=4.0,  # x4: see tiny_qwen3asr
        text_prefix="model.language_model.",
        # ``T = max(n, 8000) // 160`` frames, no window, no cap: short clips zero-padded to 0.5 s
        processor_counts=(1, 1000, 7999, 8000, 8159, 16000, 16160, 80000, 320000, 480000, 1_000_000),
        seconds_counts=((5, 65), (20, 260), (30, 390), (60, 780)),
    ),
    "qwen25omni": Arch(
        builder="tiny_qwen25omni",
        reference="ReferenceQwen25Omni",
        model="Qwen2_5OmniForConditionalGeneration",
        processor="Qwen2_5OmniProcessor",
        audio_token="<|AUDIO|>",
        clips=(5, 45),  # padded to 30 s; longer than 30 s, encoded whole (vLLM's truncation=False)
        weight_prefixes=("thinker.audio_tower.", "thinker.visual.", "thinker.model.", "thinker.lm_head."),
        probe=lambda tiny: tiny.prompt("What?"),
        layout=_qwen25omni_layout,
        template_shapes=(AUDIO, AUDIO_HF),  # the hub's layout (default system turn)
        features=((1, 128, 4500), [4500]),  # 45 s whole, not cut to 3000 frames
        # ((f - 1) // 2 + 1 - 2) // 2 + 1: conv2 (stride 2), then the stride-2 pool
        token_counts=(
            (500, 125), (1200, 300), (3000, 750), (4500, 1125), (100, 25), (7, 2), (4, 1), (3, 1), (2, 0), (1, 0),
            (0, 0),
        ),
        lm_config=lambda cfg: cfg["thinker_config"],
        audio_id_key="audio_token_index",
        processor_audio_id=False,
        # the top-level class's from_pretrained insists on a speaker file (spk_dict.pt); vLLM serves the thinker
        reload_classes=("Qwen2_5OmniThinkerForConditionalGeneration",),
        text_prefix="thinker.model.",
        # vLLM passes truncation=False to every HF processor call; transformers' default
        # (truncation=True) would cut a 45 s clip to 30 s (750 tokens instead of 1125)
        hf_kwargs={"truncation": False, "return_tensors": "pt"},  # the Omni processors default to lists
        mask_key="feature_attention_mask",
        hf_audio_features=lambda model, inputs: model.get_audio_features(
            inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"]
        ).last_hidden_state,
        # ceil(n / 160) frames up to 30 s (padded to 480000 samples), n // 160 beyond; no cap
        processor_counts=(
            1, 1000, 8000, 8159, 16000, 16160, 80000, 479_999, 480_000, 480_001, 480_159, 480_160, 720_000,
            1_000_000,
        ),
        seconds_counts=((5, 125), (12, 300), (30, 750), (45, 1125), (60, 1500)),
    ),
    "qwen3omni": Arch(
        builder="tiny_qwen3omni",
        reference="ReferenceQwen3Omni",
        model="Qwen3OmniMoeForConditionalGeneration",
        processor="Qwen3OmniMoeProcessor",
        audio_token="<|audio_pad|>",
        clips=(5, 45),  # one attention window (104 rows); several, partial chunk count
        weight_prefixes=("thinker.audio_tower.", "thinker.visual.", "thinker.model.", "thinker.lm_head."),
        probe=lambda tiny: tiny.prompt("What?"),
        layout=_qwen3omni_layout,
        template_shapes=(AUDIO, AUDIO_HF),  # the hub's layout
        features=((1, 128, 4500), [4500]),
        # the same 13-per-100-frames count as Qwen3-ASR
        token_counts=(
            (100, 13), (200, 26), (50, 7), (1, 1), (0, 0), (99, 13), (101, 14), (500, 65), (1200, 156),
            (2000, 260), (3000, 390), (4500, 585),
        ),
        lm_config=lambda cfg: cfg["thinker_config"],
        processor_audio_id=False,
        # the full model (tensors as saved) and the thinker the reference loads
        reload_classes=("Qwen3OmniMoeForConditionalGeneration", "Qwen3OmniMoeThinkerForConditionalGeneration"),
        qk_norm_scale=4.0,  # x4, not x8: see tiny_qwen3omni
        text_prefix="thinker.model.",
        # vLLM zero-pads each wave to a multiple of the hop (160) before the processor
        # (whose mask would otherwise hold n // 160 frames, vLLM's count ceil(n / 160)),
        # and passes truncation=False (the processor's default here too)
        hf_kwargs={"truncation": False, "return_tensors": "pt"},  # the Omni processors default to lists
        hf_pad=160,
        mask_key="feature_attention_mask",
        hf_audio_features=lambda model, inputs: model.get_audio_features(
            inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"]
        ).last_hidden_state,
        # T = ceil(n / 160) frames (after the pre-padding), no window, no cap, no minimum; a
        # clip padded to <= 200 samples fails in the extractor's reflect-padded STFT (vLLM's too)
        processor_counts=(
            161, 320, 321, 1000, 8000, 8159, 8160, 8161, 16000, 16160, 80000, 480_000, 720_000, 1_000_000,
        ),
        seconds_counts=((5, 65), (12, 156), (30, 390), (45, 585), (60, 780)),
    ),
}


def archs(*names: str, where: Callable[[Arch], bool] = lambda a: True):
    """Parametrize a test over the named architectures (default all) that satisfy ``where``."""
    chosen = [n for n in (names or ARCHS) if where(ARCHS[n])]
    return pytest.mark.parametrize("arch", chosen, indirect=True)


CLIP = pytest.mark.parametrize("clip", [0, 1], ids=["short", "long"])


@pytest.fixture(scope="module")
def arch(request) -> Arch:
    return ARCHS[request.param]


@pytest.fixture(scope="module")
def tiny(arch):
    return importlib.import_module(f"vllm_affinity_tools.{arch.builder}")


@pytest.fixture(scope="module")
def ckpt_dir(arch, tiny, tmp_path_factory) -> Path:
    return tiny.build(tmp_path_factory.mktemp(f"tiny-{arch.builder[5:]}") / "a")


@pytest.fixture(scope="module")
def ref(arch, ckpt_dir):
    from vllm_affinity_tools import reference

    return getattr(reference, arch.reference)(str(ckpt_dir))


@pytest.fixture(scope="module")
def clips(arch, tmp_path_factory) -> list[tuple[np.ndarray, int]]:
    """16 kHz speech, the architecture's (short, long) clips."""
    import soundfile as sf

    from vllm_affinity_tools import speech

    d = tmp_path_factory.mktemp(f"{arch.builder[5:]}-clips")
    out = []
    for i, secs in enumerate(arch.clips):
        path = speech.utterance(float(secs), d / f"u{secs}.wav", seed=i, sample_rate=16000)
        out.append(sf.read(path, dtype="float32"))
    return out


@pytest.fixture(scope="module")
def prompt(tiny):
    return tiny.prompt("What does the speaker say?")


def _hf_inputs(arch: Arch, ref, text: str, wave: np.ndarray):
    """transformers' processor on one text and one 16 kHz wave, called the way vLLM calls
    it (``arch.hf_kwargs``; the wave zero-padded to a multiple of ``arch.hf_pad`` samples)."""
    if arch.hf_pad > 1:
        wave = np.pad(wave, (0, -len(wave) % arch.hf_pad))
    return ref.processor(text=[text], audio=[wave], **arch.hf_kwargs)


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.logprobs, b.logprobs))


# -- the checkpoint ---------------------------------------------------------------------------
@archs()
def test_builder_is_deterministic(ckpt_dir, tiny, tmp_path):
    again = tiny.build(tmp_path / "b", verify=False)
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json"} <= set(names)
    for n in names:
        assert (ckpt_dir / n).read_bytes() == (again / n).read_bytes(), n


@archs()
def test_checkpoint_layout(arch, tiny, ckpt_dir):
    import json

    from safetensors import safe_open
    from transformers import AutoProcessor

    cfg = json.loads((ckpt_dir / "config.json").read_text())
    assert cfg["architectures"] == [arch.model]
    proc = AutoProcessor.from_pretrained(str(ckpt_dir))
    assert type(proc).__name__ == arch.processor
    assert proc.audio_token == arch.audio_token
    audio_id = arch.lm_config(cfg)[arch.audio_id_key]
    assert audio_id == proc.tokenizer.convert_tokens_to_ids(arch.audio_token)
    if arch.processor_audio_id:
        assert proc.audio_token_id == audio_id
    # the placeholder is one token in any prompt
    ids = proc.tokenizer(arch.probe(tiny), add_special_tokens=False)["input_ids"]
    assert ids.count(audio_id) == 1
    with safe_open(str(ckpt_dir / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(arch.weight_prefixes) for k in keys)
    arch.layout(cfg, proc, keys, tiny)
    # the chat template renders the architecture's layout, in each content shape
    for audio_part in arch.template_shapes:
        msgs = [{"role": "user", "content": [audio_part, {"type": "text", "text": "What?"}]}]
        assert proc.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tiny.prompt(
            "What?"
        )


@archs()
def test_hf_reload_is_clean(arch, ckpt_dir):
    import transformers

    for name in arch.reload_classes or (arch.model,):
        model, info = getattr(transformers, name).from_pretrained(str(ckpt_dir), output_loading_info=True)
        assert not info["missing_keys"], name
        assert not info["unexpected_keys"], name
        assert not info.get("mismatched_keys"), name
    if arch.tied:
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


@archs(where=lambda a: a.qk_norm_scale is not None)
def test_sharpened_qk_norms(arch, ckpt_dir):
    """Qwen3's q/k RMSNorm would undo a q_proj scale: the builder scales the norms
    (Qwen3-ASR x8, Qwen3-Omni x4), in every text layer."""
    import json

    from safetensors import safe_open

    n_layers = arch.lm_config(json.loads((ckpt_dir / "config.json").read_text()))["text_config"]["num_hidden_layers"]
    seen = 0
    with safe_open(str(ckpt_dir / "model.safetensors"), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
            if k.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")) and k.startswith(arch.text_prefix):
                assert torch.all(f.get_tensor(k) == arch.qk_norm_scale), k
                seen += 1
    assert seen == 2 * n_layers


# -- keep_ratio 1.0 is transformers' own model ------------------------------------------------
@archs()
@CLIP
def test_keep1_equals_hf_generate(arch, ref, clips, prompt, clip):
    """The reference at keep_ratio 1.0 is the processor (called as vLLM calls it) plus
    ``generate``; for the M-RoPE models ``generate`` computes its own positions
    (``get_rope_index``), which must equal the reference's repeated 1-D positions."""
    wave, sr = clips[clip]
    out = ref.generate(prompt, [(wave, sr)], max_new_tokens=MAX_NEW)
    inputs = _hf_inputs(arch, ref, prompt, wave)
    n_in = inputs["input_ids"].shape[1]
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    n_audio = int((inputs["input_ids"] == ref.audio_token_id).sum())
    assert out.audio_tokens_in == out.audio_tokens_kept == [n_audio] == [ref.num_audio_tokens(len(wave))]
    with torch.no_grad():
        g = ref.model.generate(
            **inputs, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    hf = g.sequences[0, n_in:].tolist()
    if len(hf) < MAX_NEW:  # HF stops at eos; the reference does not
        assert hf[-1] == ref.model.generation_config.eos_token_id
    assert out.token_ids[: len(hf)] == hf
    for step, logits in enumerate(g.logits):
        torch.testing.assert_close(torch.log_softmax(logits[0].float(), -1), out.logprobs[step], atol=1e-5, rtol=0)


@archs(where=lambda a: bool(a.token_counts))
def test_token_counts(arch):
    from vllm_affinity_tools import reference

    f = getattr(reference, arch.reference).tokens_from_frames
    frames, tokens = zip(*arch.token_counts)
    assert [f(n) for n in frames] == list(tokens)


@archs(where=lambda a: bool(a.processor_counts))
def test_num_audio_tokens_matches_processor(arch, ref):
    """``num_audio_tokens`` equals the placeholder count of the processor called as vLLM
    calls it (``_hf_inputs``), short and long clips included (the arch's comment says how
    the frames are counted)."""
    for n in arch.processor_counts:
        ids = _hf_inputs(arch, ref, ref.processor.audio_token, np.zeros(n, dtype=np.float32))["input_ids"]
        assert int((ids == ref.audio_token_id).sum()) == ref.num_audio_tokens(n), n
    secs, tokens = zip(*arch.seconds_counts)
    assert [ref.num_audio_tokens(16000 * s) for s in secs] == list(tokens)


@archs()
def test_embeddings_match_transformers(arch, ref, clips):
    """The long clip's audio embeddings equal HF's ``get_audio_features`` on the
    processor's features (the processor called as vLLM calls it: the Omni thinkers' 45 s
    clip is featurised whole). Windowed architectures: the windows' rows concatenated in
    time order, and audio beyond ``max_audio_len`` is dropped as HF drops it."""
    wave, sr = clips[1]
    if arch.window_rows is not None:
        per_window = ref.window_embeddings([(wave, sr)])[0]
        assert [w.shape[0] for w in per_window] == list(arch.window_rows)
    emb = ref.audio_embeddings([(wave, sr)])[0]
    inputs = _hf_inputs(arch, ref, ref.processor.audio_token, wave)
    if arch.features is not None:
        shape, mask_sums = arch.features
        assert inputs["input_features"].shape == shape
        assert inputs[arch.mask_key].sum(-1).tolist() == mask_sums
    with torch.no_grad():
        hf = arch.hf_audio_features(ref.model, inputs)
    torch.testing.assert_close(emb, hf, atol=1e-6, rtol=0)
    assert emb.shape[0] == ref.num_audio_tokens(len(wave))
    if arch.cap_rows_per_window is not None:
        long = np.concatenate([wave, wave])  # 90 s > max_audio_len (60 s of the tiny checkpoint)
        n_cap = int(ref.processor.max_audio_len // 30) * arch.cap_rows_per_window
        assert ref.audio_embeddings([(long, sr)])[0].shape[0] == ref.num_audio_tokens(len(long)) == n_cap
        hf_ids = ref.processor(text=[ref.processor.audio_token], audio=[long])["input_ids"]
        assert int((hf_ids == ref.audio_token_id).sum()) == n_cap


# -- the input stage: K placeholders ----------------------------------------------------------
@archs()
@pytest.mark.parametrize("clip,ratio", [(0, 0.5), (1, 0.3)], ids=["short", "long"])
def test_pooling_sets_k_placeholders(ref, clips, prompt, clip, ratio):
    base = ref.generate(prompt, [clips[clip]], max_new_tokens=MAX_NEW)
    out = ref.generate(prompt, [clips[clip]], max_new_tokens=MAX_NEW, keep_ratio=ratio)
    n = base.audio_tokens_in[0]
    k = pooling.num_kept(n, ratio)
    assert out.audio_tokens_in == [n] and out.audio_tokens_kept == [k]
    assert out.prompt_token_ids.count(ref.audio_token_id) == k
    assert len(out.prompt_token_ids) == len(base.prompt_token_ids) - n + k
    assert len(out.token_ids) == len(out.logprobs) == MAX_NEW
    assert _max_diff(out, base) > 1e-3  # sharpened attention: pooling shows in the logits


@archs()
def test_pool_fn_hook_and_placeholder_check(ref, clips, prompt):
    def uniform(e):
        return pooling.merge(e, pooling.uniform_sizes(e.shape[0], pooling.num_kept(e.shape[0], 0.5)))

    via_hook = ref.generate(prompt, [clips[0]], max_new_tokens=MAX_NEW, pool_fn=uniform)
    via_method = ref.generate(prompt, [clips[0]], max_new_tokens=MAX_NEW, keep_ratio=0.5, method="uniform")
    assert via_hook.token_ids == via_method.token_ids
    assert all(torch.equal(a, b) for a, b in zip(via_hook.logprobs, via_method.logprobs))
    with pytest.raises(ValueError, match="placeholders"):
        ref.generate(prompt, [clips[0], clips[0]], max_new_tokens=1)


# -- the deep stage -------------------------------------------------------------------------
@archs()
def test_deep_identity_equals_plain(ref, clips, prompt):
    off = ref.generate(prompt, [clips[0]], max_new_tokens=MAX_NEW)
    out = ref.generate(prompt, [clips[0]], max_new_tokens=MAX_NEW, deep_merge_layer=1, deep_keep_ratio=1.0)
    assert out.token_ids == off.token_ids
    for a, b in zip(out.logprobs, off.logprobs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert out.deep_tokens_kept == off.audio_tokens_kept
    assert out.deep_kv_len == len(off.prompt_token_ids) + MAX_NEW - 1


@archs()
@pytest.mark.parametrize(
    "clip,input_ratio,layer,deep_ratio", [(0, 1.0, 1, 0.5), (1, 0.6, 2, 0.4)], ids=["short", "long"]
)
def test_deep_keeps_num_kept_rows(ref, clips, prompt, clip, input_ratio, layer, deep_ratio):
    base = ref.generate(prompt, [clips[clip]], max_new_tokens=MAX_NEW, keep_ratio=input_ratio)
    out = ref.generate(
        prompt, [clips[clip]], max_new_tokens=MAX_NEW, keep_ratio=input_ratio,
        deep_merge_layer=layer, deep_keep_ratio=deep_ratio,
    )
    m = base.audio_tokens_kept[0]
    k = pooling.num_kept(m, deep_ratio)
    assert out.prompt_token_ids == base.prompt_token_ids  # the input stage is unchanged
    assert out.deep_tokens_kept == [k]
    # layers above L hold the compacted prompt plus every fed-back token
    assert out.deep_kv_len == len(base.prompt_token_ids) - m + k + MAX_NEW - 1
    assert _max_diff(out, base) > 1e-3


@archs()
def test_deep_layer_validated(ref, clips, prompt):
    n_layers = ref.language_model.config.num_hidden_layers
    for bad in (-1, n_layers - 1, True):
        with pytest.raises(ValueError, match="deep_merge_layer"):
            ref.generate(prompt, [clips[0]], max_new_tokens=1, deep_merge_layer=bad)
