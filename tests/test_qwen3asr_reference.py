"""The tiny Qwen3-ASR checkpoint and the Hugging Face reference on it (no vLLM).

The builder is deterministic and its checkpoint reloads cleanly in transformers; the
reference at keep_ratio 1.0 is transformers' own Qwen3-ASR (processor + ``generate``);
its count is the processor's (no window, no cap); its pooling and deep merge keep
exactly the counts of :mod:`vllm_affinity.pooling`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_affinity import pooling

MAX_NEW = 6
WEIGHT_PREFIXES = ("model.audio_tower.", "model.multi_modal_projector.", "model.language_model.")


@pytest.fixture(scope="module")
def q3_dir(tmp_path_factory) -> Path:
    from vllm_affinity_tools.tiny_qwen3asr import build

    return build(tmp_path_factory.mktemp("tiny-qwen3asr") / "a")


@pytest.fixture(scope="module")
def ref(q3_dir):
    from vllm_affinity_tools.reference import ReferenceQwen3Asr

    return ReferenceQwen3Asr(str(q3_dir))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[int, tuple[np.ndarray, int]]:
    """16 kHz speech: 5 s (one attention window) and 40 s (several, partial chunk count)."""
    import soundfile as sf

    from vllm_affinity_tools import speech

    d = tmp_path_factory.mktemp("qwen3asr-clips")
    out = {}
    for i, secs in enumerate((5, 40)):
        path = speech.utterance(float(secs), d / f"u{secs}.wav", seed=i, sample_rate=16000)
        out[secs] = sf.read(path, dtype="float32")
    return out


@pytest.fixture(scope="module")
def prompt():
    from vllm_affinity_tools.tiny_qwen3asr import prompt

    return prompt("What does the speaker say?")


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.logprobs, b.logprobs))


# -- the checkpoint ---------------------------------------------------------------------------
def test_builder_is_deterministic(q3_dir, tmp_path):
    from vllm_affinity_tools.tiny_qwen3asr import build

    again = build(tmp_path / "b", verify=False)
    names = sorted(p.name for p in q3_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json"} <= set(names)
    for n in names:
        assert (q3_dir / n).read_bytes() == (again / n).read_bytes(), n


def test_checkpoint_layout(q3_dir):
    import json

    from safetensors import safe_open
    from transformers import AutoProcessor

    from vllm_affinity_tools.tiny_qwen3asr import AUDIO_PART, prompt

    cfg = json.loads((q3_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ASRForConditionalGeneration"]
    proc = AutoProcessor.from_pretrained(str(q3_dir))
    assert type(proc).__name__ == "Qwen3ASRProcessor"
    assert type(proc.feature_extractor).__name__ == "Qwen3ASRFeatureExtractor"
    assert (proc.audio_token, proc.audio_bos_token, proc.audio_eos_token) == (
        "<|audio_pad|>", "<|audio_start|>", "<|audio_end|>"
    )
    assert cfg["audio_token_id"] == proc.audio_token_id == proc.tokenizer.convert_tokens_to_ids("<|audio_pad|>")
    ids = proc.tokenizer(prompt("What?"), add_special_tokens=False)["input_ids"]
    assert ids.count(cfg["audio_token_id"]) == 1
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
    with safe_open(str(q3_dir / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(WEIGHT_PREFIXES) for k in keys)
    assert not any("lm_head" in k for k in keys)
    assert any(k.endswith("self_attn.q_norm.weight") for k in keys)
    # the chat template renders the hub's layout, in both content shapes
    for audio_part in ({"type": "audio"}, {"type": "audio", "audio": "x.wav"}):
        msgs = [{"role": "user", "content": [audio_part, {"type": "text", "text": "What?"}]}]
        assert proc.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == prompt("What?")
    assert AUDIO_PART in prompt("What?")


def test_hf_reload_is_clean(q3_dir):
    from transformers import Qwen3ASRForConditionalGeneration

    model, info = Qwen3ASRForConditionalGeneration.from_pretrained(str(q3_dir), output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info.get("mismatched_keys")
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_sharpened_qk_norms(q3_dir):
    """Qwen3's q/k RMSNorm would undo a q_proj scale: the builder scales the norms."""
    from safetensors import safe_open

    with safe_open(str(q3_dir / "model.safetensors"), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
            if k.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")) and "language_model" in k:
                assert torch.all(f.get_tensor(k) == 8.0), k


# -- keep_ratio 1.0 is transformers' own Qwen3-ASR --------------------------------------------
@pytest.mark.parametrize("secs", [5, 40])
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
    """13 rows per full 100-frame chunk, three stride-2 halvings of the remainder."""
    from vllm_affinity_tools.reference import ReferenceQwen3Asr

    f = ReferenceQwen3Asr.tokens_from_frames
    assert [f(100), f(200), f(50), f(1), f(0), f(99), f(101), f(500), f(2000), f(3000)] == [
        13, 26, 7, 1, 0, 13, 14, 65, 260, 390
    ]


def test_num_audio_tokens_matches_processor(ref):
    """``T = max(n, 8000) // 160`` frames, no window, no cap: equal to the processor's
    placeholder count, short clips included (zero-padded to 0.5 s)."""
    for n in (1, 1000, 7999, 8000, 8159, 16000, 16160, 80000, 320000, 480000, 1_000_000):
        ids = ref.processor(text=[ref.processor.audio_token], audio=[np.zeros(n, dtype=np.float32)])["input_ids"]
        assert int((ids == ref.audio_token_id).sum()) == ref.num_audio_tokens(n), n
    assert [ref.num_audio_tokens(16000 * s) for s in (5, 20, 30, 60)] == [65, 260, 390, 780]


def test_embeddings_match_transformers(ref, clips):
    wave, sr = clips[40]
    emb = ref.audio_embeddings([(wave, sr)])[0]
    inputs = ref.processor(text=[ref.processor.audio_token], audio=[wave])
    with torch.no_grad():
        hf = ref.model.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
    torch.testing.assert_close(emb, hf, atol=1e-6, rtol=0)
    assert emb.shape[0] == ref.num_audio_tokens(len(wave))


# -- the input stage: K placeholders ----------------------------------------------------------
@pytest.mark.parametrize("secs,ratio", [(5, 0.5), (40, 0.3)])
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


@pytest.mark.parametrize("secs,input_ratio,layer,deep_ratio", [(5, 1.0, 1, 0.5), (40, 0.6, 2, 0.4)])
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
    assert out.deep_kv_len == len(base.prompt_token_ids) - m + k + MAX_NEW - 1
    assert _max_diff(out, base) > 1e-3


def test_deep_layer_validated(ref, clips, prompt):
    n_layers = ref.language_model.config.num_hidden_layers
    for bad in (-1, n_layers - 1, True):
        with pytest.raises(ValueError, match="deep_merge_layer"):
            ref.generate(prompt, [clips[5]], max_new_tokens=1, deep_merge_layer=bad)
