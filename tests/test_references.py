"""The tiny AudioFlamingo3, GLM-ASR and Qwen3-ASR checkpoints and the Hugging Face
references on them (no vLLM).

Each builder is deterministic and its checkpoint reloads cleanly in transformers; the
reference at keep_ratio 1.0 is transformers' own model (processor + ``generate``); its
count is the processor's (AF3 and GLM-ASR: 30 s windows capped at ``max_audio_len``;
Qwen3-ASR: no window, no cap); its pooling and deep merge keep exactly the counts of
:mod:`vllm_affinity.pooling`.

Every test takes the architecture as an indirect ``arch`` parameter (the per-architecture
facts are in :data:`ARCHS`); a test that only one or two architectures have is
parametrized over those only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
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
    assert cfg["audio_token_id"] == proc.audio_token_id == proc.tokenizer.convert_tokens_to_ids(arch.audio_token)
    # the placeholder is one token in any prompt
    ids = proc.tokenizer(arch.probe(tiny), add_special_tokens=False)["input_ids"]
    assert ids.count(cfg["audio_token_id"]) == 1
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

    model, info = getattr(transformers, arch.model).from_pretrained(str(ckpt_dir), output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info.get("mismatched_keys")
    if arch.tied:
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


@archs("qwen3asr")
def test_sharpened_qk_norms(ckpt_dir):
    """Qwen3's q/k RMSNorm would undo a q_proj scale: the builder scales the norms."""
    from safetensors import safe_open

    with safe_open(str(ckpt_dir / "model.safetensors"), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
            if k.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")) and "language_model" in k:
                assert torch.all(f.get_tensor(k) == 8.0), k


# -- keep_ratio 1.0 is transformers' own model ------------------------------------------------
@archs()
@CLIP
def test_keep1_equals_hf_generate(ref, clips, prompt, clip):
    wave, sr = clips[clip]
    out = ref.generate(prompt, [(wave, sr)], max_new_tokens=MAX_NEW)
    inputs = ref.processor(text=[prompt], audio=[wave])
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


@archs("qwen3asr")
def test_num_audio_tokens_matches_processor(ref):
    """``T = max(n, 8000) // 160`` frames, no window, no cap: equal to the processor's
    placeholder count, short clips included (zero-padded to 0.5 s)."""
    for n in (1, 1000, 7999, 8000, 8159, 16000, 16160, 80000, 320000, 480000, 1_000_000):
        ids = ref.processor(text=[ref.processor.audio_token], audio=[np.zeros(n, dtype=np.float32)])["input_ids"]
        assert int((ids == ref.audio_token_id).sum()) == ref.num_audio_tokens(n), n
    assert [ref.num_audio_tokens(16000 * s) for s in (5, 20, 30, 60)] == [65, 260, 390, 780]


@archs()
def test_embeddings_match_transformers(arch, ref, clips):
    """The long clip's audio embeddings equal HF's ``get_audio_features``. Windowed
    architectures: the windows' rows concatenated in time order, and audio beyond
    ``max_audio_len`` is dropped as HF drops it."""
    wave, sr = clips[1]
    if arch.window_rows is not None:
        per_window = ref.window_embeddings([(wave, sr)])[0]
        assert [w.shape[0] for w in per_window] == list(arch.window_rows)
    emb = ref.audio_embeddings([(wave, sr)])[0]
    inputs = ref.processor(text=[ref.processor.audio_token], audio=[wave])
    if arch.features is not None:
        shape, mask_sums = arch.features
        assert inputs["input_features"].shape == shape
        assert inputs["input_features_mask"].sum(-1).tolist() == mask_sums
    with torch.no_grad():
        hf = ref.model.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
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
