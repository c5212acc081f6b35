"""The tiny GLM-ASR checkpoint and the Hugging Face reference on it (no vLLM).

The builder is deterministic and its checkpoint reloads cleanly in transformers; the
reference at keep_ratio 1.0 is transformers' own GLM-ASR (processor + ``generate``); its
pooling and deep merge keep exactly the counts of :mod:`vllm_affinity.pooling`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_affinity import pooling

MAX_NEW = 6
WEIGHT_PREFIXES = ("audio_tower.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head.")


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory) -> Path:
    from vllm_affinity_tools.tiny_glmasr import build

    return build(tmp_path_factory.mktemp("tiny-glmasr") / "a")


@pytest.fixture(scope="module")
def ref(glm_dir):
    from vllm_affinity_tools.reference import ReferenceGlmAsr

    return ReferenceGlmAsr(str(glm_dir))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[int, tuple[np.ndarray, int]]:
    """16 kHz speech: 5 s (one window) and 45 s (two windows: 30 s + 15 s)."""
    import soundfile as sf

    from vllm_affinity_tools import speech

    d = tmp_path_factory.mktemp("glmasr-clips")
    out = {}
    for i, secs in enumerate((5, 45)):
        path = speech.utterance(float(secs), d / f"u{secs}.wav", seed=i, sample_rate=16000)
        out[secs] = sf.read(path, dtype="float32")
    return out


@pytest.fixture(scope="module")
def prompt():
    from vllm_affinity_tools.tiny_glmasr import prompt

    return prompt("What does the speaker say?")


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.logprobs, b.logprobs))


# -- the checkpoint ---------------------------------------------------------------------------
def test_builder_is_deterministic(glm_dir, tmp_path):
    from vllm_affinity_tools.tiny_glmasr import build

    again = build(tmp_path / "b", verify=False)
    names = sorted(p.name for p in glm_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json"} <= set(names)
    for n in names:
        assert (glm_dir / n).read_bytes() == (again / n).read_bytes(), n


def test_checkpoint_layout(glm_dir):
    import json

    from safetensors import safe_open
    from transformers import AutoProcessor

    from vllm_affinity_tools.tiny_glmasr import AUDIO_PART, prompt

    cfg = json.loads((glm_dir / "config.json").read_text())
    assert cfg["architectures"] == ["GlmAsrForConditionalGeneration"]
    proc = AutoProcessor.from_pretrained(str(glm_dir))
    assert type(proc).__name__ == "GlmAsrProcessor"
    assert proc.audio_token == "<|pad|>"
    assert proc.max_audio_len == 60
    assert cfg["audio_token_id"] == proc.audio_token_id == proc.tokenizer.convert_tokens_to_ids("<|pad|>")
    # the audio brackets and the placeholder are one token each in any prompt
    ids = proc.tokenizer(f"<|user|>\n{AUDIO_PART}<|user|>\nWhat?", add_special_tokens=False)["input_ids"]
    assert ids.count(cfg["audio_token_id"]) == 1
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
    with safe_open(str(glm_dir / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(WEIGHT_PREFIXES) for k in keys)
    assert "language_model.lm_head.weight" in keys
    assert not any(k.endswith("k_proj.bias") for k in keys)  # GLM-ASR has none (vLLM fakes it)
    # the chat template renders the hub's layout, in both content shapes
    for audio_part in ({"type": "audio"}, {"type": "audio", "audio": "x.wav"}):
        msgs = [{"role": "user", "content": [audio_part, {"type": "text", "text": "What?"}]}]
        assert proc.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == prompt("What?")


def test_hf_reload_is_clean(glm_dir):
    from transformers import GlmAsrForConditionalGeneration

    _, info = GlmAsrForConditionalGeneration.from_pretrained(str(glm_dir), output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info.get("mismatched_keys")


# -- keep_ratio 1.0 is transformers' own GLM-ASR ----------------------------------------------
@pytest.mark.parametrize("secs", [5, 45])
def test_keep1_equals_hf_generate(ref, clips, prompt, secs):
    wave, sr = clips[secs]
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


def test_token_counts():
    """375 tokens per full 30 s window, (ceil(ceil(samples / 160) / 2)) // 4 for a part."""
    from vllm_affinity_tools.reference import ReferenceGlmAsr

    f = ReferenceGlmAsr.tokens_from_frames
    assert [f(3000), f(1500), f(500), f(7), f(6), f(1)] == [375, 187, 62, 1, 0, 0]


def test_windows_match_transformers(ref, clips):
    """45 s: two windows (375 + 187 rows) concatenated in time order, equal to HF's
    ``get_audio_features``; audio beyond ``max_audio_len`` is dropped as HF drops it."""
    wave, sr = clips[45]
    per_window = ref.window_embeddings([(wave, sr)])[0]
    assert [w.shape[0] for w in per_window] == [375, 187]
    emb = ref.audio_embeddings([(wave, sr)])[0]
    inputs = ref.processor(text=[ref.processor.audio_token], audio=[wave])
    assert inputs["input_features"].shape == (2, 128, 3000)
    assert inputs["input_features_mask"].sum(-1).tolist() == [3000, 1500]
    with torch.no_grad():
        hf = ref.model.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
    torch.testing.assert_close(emb, hf, atol=1e-6, rtol=0)
    long = np.concatenate([wave, wave])  # 90 s > max_audio_len (60 s of the tiny checkpoint)
    n_cap = int(ref.processor.max_audio_len // 30) * 375
    assert ref.audio_embeddings([(long, sr)])[0].shape[0] == ref.num_audio_tokens(len(long)) == n_cap
    hf_ids = ref.processor(text=[ref.processor.audio_token], audio=[long])["input_ids"]
    assert int((hf_ids == ref.audio_token_id).sum()) == n_cap


# -- the input stage: K placeholders ----------------------------------------------------------
@pytest.mark.parametrize("secs,ratio", [(5, 0.5), (45, 0.3)])
def test_pooling_sets_k_placeholders(ref, clips, prompt, secs, ratio):
    base = ref.generate(prompt, [clips[secs]], max_new_tokens=MAX_NEW)
    out = ref.generate(prompt, [clips[secs]], max_new_tokens=MAX_NEW, keep_ratio=ratio)
    n = base.audio_tokens_in[0]
    k = pooling.num_kept(n, ratio)
    assert out.audio_tokens_in == [n] and out.audio_tokens_kept == [k]
    assert out.prompt_token_ids.count(ref.audio_token_id) == k
    assert len(out.prompt_token_ids) == len(base.prompt_token_ids) - n + k
    assert len(out.token_ids) == len(out.logprobs) == MAX_NEW
    assert _max_diff(out, base) > 1e-3  # sharpened attention: pooling shows in the logits


def test_pool_fn_hook_and_placeholder_check(ref, clips, prompt):
    def uniform(e):
        return pooling.merge(e, pooling.uniform_sizes(e.shape[0], pooling.num_kept(e.shape[0], 0.5)))

    via_hook = ref.generate(prompt, [clips[5]], max_new_tokens=MAX_NEW, pool_fn=uniform)
    via_method = ref.generate(prompt, [clips[5]], max_new_tokens=MAX_NEW, keep_ratio=0.5, method="uniform")
    assert via_hook.token_ids == via_method.token_ids
    assert all(torch.equal(a, b) for a, b in zip(via_hook.logprobs, via_method.logprobs))
    with pytest.raises(ValueError, match="placeholders"):
        ref.generate(prompt, [clips[5], clips[5]], max_new_tokens=1)


# -- the deep stage -------------------------------------------------------------------------
def test_deep_identity_equals_plain(ref, clips, prompt):
    off = ref.generate(prompt, [clips[5]], max_new_tokens=MAX_NEW)
    out = ref.generate(prompt, [clips[5]], max_new_tokens=MAX_NEW, deep_merge_layer=1, deep_keep_ratio=1.0)
    assert out.token_ids == off.token_ids
    for a, b in zip(out.logprobs, off.logprobs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert out.deep_tokens_kept == off.audio_tokens_kept
    assert out.deep_kv_len == len(off.prompt_token_ids) + MAX_NEW - 1


@pytest.mark.parametrize("secs,input_ratio,layer,deep_ratio", [(5, 1.0, 1, 0.5), (45, 0.6, 2, 0.4)])
def test_deep_keeps_num_kept_rows(ref, clips, prompt, secs, input_ratio, layer, deep_ratio):
    base = ref.generate(prompt, [clips[secs]], max_new_tokens=MAX_NEW, keep_ratio=input_ratio)
    out = ref.generate(
        prompt, [clips[secs]], max_new_tokens=MAX_NEW, keep_ratio=input_ratio,
        deep_merge_layer=layer, deep_keep_ratio=deep_ratio,
    )
    m = base.audio_tokens_kept[0]
    k = pooling.num_kept(m, deep_ratio)
    assert out.prompt_token_ids == base.prompt_token_ids  # the input stage is unchanged
    assert out.deep_tokens_kept == [k]
    # layers above L hold the compacted prompt plus every fed-back token
    assert out.deep_kv_len == len(base.prompt_token_ids) - m + k + MAX_NEW - 1
    assert _max_diff(out, base) > 1e-3


def test_deep_layer_validated(ref, clips, prompt):
    n_layers = ref.language_model.config.num_hidden_layers
    for bad in (-1, n_layers - 1, True):
        with pytest.raises(ValueError, match="deep_merge_layer"):
            ref.generate(prompt, [clips[5]], max_new_tokens=1, deep_merge_layer=bad)
