"""Kimi-Audio without an engine: the tiny builder, the reference's audio path against vLLM's
definition of it, and the chat template through vLLM's own tokenizer.

The engine evidence (parity with the reference, `off` = stock, wrong poolings rejected, KV
blocks, `vllm serve`) is tests/test_adapters.py[kimi]. The reference is written from the
model's definition with transformers' blocks (vllm_affinity_tools/reference/kimi_audio.py);
here its count and features are checked against vLLM's processor and formula, and its
source against importing vLLM. The chat template: every message of a multi-turn
conversation is rendered (vllm_affinity/patches/kimi_chat_template.py); without the patch
only the first message reaches the template (the stock bug the patch fixes)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from .conftest import CACHE


@pytest.fixture(scope="module")
def tokenizer():
    from vllm_affinity_tools import tiny_kimi

    path = CACHE / "tiny-kimi"
    if not (path / "model.safetensors").exists():
        tiny_kimi.build(path)
    from vllm.tokenizers.kimi_audio import KimiAudioTokenizer

    return KimiAudioTokenizer.from_pretrained(str(path)), (path / "chat_template.jinja").read_text()


CONVERSATION = [
    {"role": "user", "content": "<|im_media_begin|><|im_kimia_text_blank|><|im_media_end|>\ntranscribe the speech"},
    {"role": "assistant", "content": "hello world"},
    {"role": "user", "content": "summarize it"},
]
EXPECTED = ("<|im_kimia_user_msg_start|><|im_media_begin|><|im_kimia_text_blank|><|im_media_end|>\ntranscribe the "
            "speech<|im_msg_end|><|im_kimia_assistant_msg_start|>hello world<|im_msg_end|>"
            "<|im_kimia_user_msg_start|>summarize it<|im_msg_end|><|im_kimia_assistant_msg_start|>")


def test_every_turn_is_rendered(tokenizer):
    import vllm_affinity

    vllm_affinity.register()
    tok, template = tokenizer
    for kw in ({"messages": CONVERSATION}, {"conversation": CONVERSATION}):
        assert tok.apply_chat_template(chat_template=template, add_generation_prompt=True, **kw) == EXPECTED
    ids = tok.apply_chat_template(messages=CONVERSATION, chat_template=template, add_generation_prompt=True,
                                  tokenize=True)
    assert ids.count(151666) == 1 and ids[0] == 151670 and ids[-1] == 151671


def test_stock_method_loses_the_messages(tokenizer):
    """The bug is real: vLLM's unpatched method renders none of the conversation."""
    import vllm_affinity

    vllm_affinity.register()
    from vllm.tokenizers.kimi_audio import KimiAudioTokenizer

    tok, template = tokenizer
    stock = KimiAudioTokenizer.apply_chat_template.__wrapped__
    assert stock(tok, messages=CONVERSATION, chat_template=template,
                 add_generation_prompt=True) == "<|im_kimia_assistant_msg_start|>"


# -- the builder and the reference -----------------------------------------------------------
def _digest(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def test_builder_is_deterministic_and_has_the_hub_layout(tmp_path):
    import json

    from vllm_affinity_tools import tiny_kimi

    a, b = tiny_kimi.build(tmp_path / "a", verify=False), tiny_kimi.build(tmp_path / "b")
    assert _digest(a) == _digest(b)
    assert set(_digest(a)) == {
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tiktoken.model",
        "tokenizer_config.json", "whisper-large-v3/config.json", "whisper-large-v3/model.safetensors",
        "whisper-large-v3/preprocessor_config.json"}
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["architectures"] == ["MoonshotKimiaForCausalLM"] and cfg["kimia_adaptor_input_dim"] == 4 * 64
    from safetensors import safe_open

    with safe_open(str(a / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.vq_adaptor.layers.4.bias"} <= keys
    assert not any(k.startswith("lm_head.") for k in keys)  # tied
    with safe_open(str(a / "whisper-large-v3" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("model.encoder.") for k in f.keys())


def test_counts_equal_vllms():
    """The reference's and the adapter's placeholder count are vLLM's formula, frame by frame."""
    import torch
    from vllm.model_executor.models.kimi_audio import _get_feat_extract_output_lengths

    from vllm_affinity.adapters.kimi_audio import placeholder_count as adapter_count
    from vllm_affinity_tools.reference.kimi_audio import placeholder_count as reference_count

    frames = torch.arange(1, 3001)
    want = _get_feat_extract_output_lengths(frames).tolist()
    assert [reference_count(f) for f in range(1, 3001)] == want == [adapter_count(f) for f in range(1, 3001)]
    assert reference_count(3000) == 390 and reference_count(1200) == 156


@pytest.fixture(scope="module")
def ref():
    from vllm_affinity_tools import tiny_kimi
    from vllm_affinity_tools.reference.kimi_audio import ReferenceKimiAudio

    path = CACHE / "tiny-kimi"
    if not (path / "model.safetensors").exists():
        tiny_kimi.build(path)
    return ReferenceKimiAudio(str(path))


@pytest.mark.parametrize("samples", [16000 * 5, 16000 * 12 + 37, 16000 * 45])
def test_reference_features_and_count_equal_vllms_processor(ref, samples):
    """Features as vLLM's Kimi processor makes them (hop padding, no 30 s padding, truncation at
    30 s); one placeholder row per count, fused where the encoder has a row, the bare blank past it."""
    import math

    import torch
    from vllm.transformers_utils.processors.kimi_audio import KimiAudioProcessor

    wave = np.random.default_rng(samples).standard_normal(samples).astype(np.float32) * 0.1
    out = KimiAudioProcessor(feature_extractor=ref.feature_extractor, tokenizer=None)(audio=[wave])
    frames = int(out["feature_attention_mask"].sum())
    assert frames == min(math.ceil(samples / 160), 3000)
    torch.testing.assert_close(ref.features(wave), out["whisper_input_features"][0, :, :frames], rtol=0, atol=0)
    n = ref.num_audio_tokens(samples)
    rows = ref.audio_embeddings([(wave, 16000)])[0]
    assert rows.shape[0] == n
    m = ref.encode(ref.features(wave)).shape[0]
    assert m == math.ceil(math.ceil(frames / 2) / 4)
    blank = ref.language_model.get_input_embeddings()(torch.tensor([151666]))[0]
    if n > m:  # 30 s: 390 placeholders for 375 encoder rows
        torch.testing.assert_close(rows[m:], blank.expand(n - m, -1))
    assert not torch.allclose(rows[0], blank)


def test_reference_imports_no_vllm():
    """Independent of the code it checks: the reference's source names no vLLM module."""
    import vllm_affinity_tools.reference.kimi_audio as module

    source = Path(module.__file__).read_text()
    assert "import vllm" not in source and "from vllm" not in source and "vllm_affinity.adapters" not in source
