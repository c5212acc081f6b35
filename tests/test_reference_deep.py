"""The deep merge stage of the Hugging Face reference (``deep_merge_layer``).

Decoder layers 0..L run on the full prompt; each audio span of layer L's output is
merged again (group means, floor-mean positions); layers above L run on the
compacted sequence with a compacted KV cache; decode tokens keep their original
positions. These tests pin that definition on the tiny model.
"""

from __future__ import annotations

import pytest
import torch

from vllm_affinity import pooling


PROMPT_1 = (
    "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "What?<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_2 = (
    "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "Audio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "What?<|im_end|>\n<|im_start|>assistant\n"
)
MAX_NEW = 6
N_LAYERS = 4


@pytest.fixture(scope="session")
def deep_ref(reference):
    return reference


@pytest.fixture(scope="session")
def audios(tmp_path_factory):
    import soundfile as sf

    from vllm_affinity_tools import speech

    d = tmp_path_factory.mktemp("deep-clips")
    out = []
    for i, secs in enumerate((5.0, 3.0)):
        path = speech.utterance(secs, d / f"u{i}.wav", seed=i, sample_rate=16000)
        wave, sr = sf.read(path, dtype="float32")
        out.append((wave, sr))
    return out


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.logprobs, b.logprobs))


def _gen(ref, audios, prompt=PROMPT_1, **kw):
    return ref.generate(prompt, audios, max_new_tokens=MAX_NEW, **kw)


@pytest.fixture(scope="session")
def off(deep_ref, audios):
    return _gen(deep_ref, audios[:1])


# -- (a) identity grouping: the manual layer loop equals HF's own forward ----------------
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_deep_identity_equals_off(deep_ref, audios, off, layer):
    out = _gen(deep_ref, audios[:1], deep_merge_layer=layer, deep_keep_ratio=1.0)
    assert off.deep_tokens_kept == [] and off.deep_kv_len is None
    assert out.prompt_token_ids == off.prompt_token_ids
    assert out.token_ids == off.token_ids
    for a, b in zip(out.logprobs, off.logprobs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    m = off.audio_tokens_kept[0]
    assert out.deep_tokens_kept == [m]
    # nothing merged: deep layers hold the whole prompt plus every fed-back token
    assert out.deep_kv_len == len(off.prompt_token_ids) + MAX_NEW - 1


# -- (b) a real deep merge: changes the output, counts are exact -------------------------
@pytest.mark.parametrize("input_ratio", [1.0, 0.7])
def test_deep_merge_counts_and_effect(deep_ref, audios, input_ratio):
    base = _gen(deep_ref, audios[:1], keep_ratio=input_ratio)
    out = _gen(deep_ref, audios[:1], keep_ratio=input_ratio, deep_merge_layer=1, deep_keep_ratio=0.5)
    T = len(base.prompt_token_ids)
    m = base.audio_tokens_kept[0]
    K = pooling.num_kept(m, 0.5)
    assert out.prompt_token_ids == base.prompt_token_ids  # input stage unchanged
    assert out.audio_tokens_kept == [m]
    assert out.deep_tokens_kept == [K]
    C = T - m + K
    # prefill writes C entries above L; each of the MAX_NEW - 1 fed-back tokens adds one
    # (the last generated token is never fed back)
    assert out.deep_kv_len == C + MAX_NEW - 1
    assert len(out.token_ids) == len(out.logprobs) == MAX_NEW
    assert _max_diff(out, base) > 1e-3


def test_deep_two_audios_counts(deep_ref, audios):
    base = _gen(deep_ref, audios, prompt=PROMPT_2)
    out = _gen(deep_ref, audios, prompt=PROMPT_2, deep_merge_layer=2, deep_keep_ratio=0.4)
    ms = base.audio_tokens_kept
    ks = [pooling.num_kept(m, 0.4) for m in ms]
    assert out.deep_tokens_kept == ks
    assert out.deep_kv_len == len(base.prompt_token_ids) - sum(ms) + sum(ks) + MAX_NEW - 1
    assert _max_diff(out, base) > 1e-3


def test_deep_pool_fn_hook(deep_ref, audios):
    via_method = _gen(deep_ref, audios[:1], deep_merge_layer=1, deep_keep_ratio=0.5, deep_method="uniform")

    def uniform(x):
        return pooling.uniform_sizes(x.shape[0], pooling.num_kept(x.shape[0], 0.5))

    via_hook = _gen(deep_ref, audios[:1], deep_merge_layer=1, deep_pool_fn=uniform)
    assert via_hook.token_ids == via_method.token_ids
    for a, b in zip(via_hook.logprobs, via_method.logprobs):
        assert torch.equal(a, b)
    assert via_hook.deep_tokens_kept == via_method.deep_tokens_kept
    affinity = _gen(deep_ref, audios[:1], deep_merge_layer=1, deep_keep_ratio=0.5)
    assert _max_diff(affinity, via_method) > 1e-3  # the grouping matters


# -- (c) deliberately wrong variants are detectable ---------------------------------------
def test_wrong_layer_differs(deep_ref, audios):
    right = _gen(deep_ref, audios[:1], deep_merge_layer=1, deep_keep_ratio=0.5)
    wrong = _gen(deep_ref, audios[:1], deep_merge_layer=2, deep_keep_ratio=0.5)
    assert _max_diff(right, wrong) > 1e-3


def _first_member(positions, sizes):
    starts = torch.cumsum(sizes, 0) - sizes
    return positions[starts.to(positions.device)]


def _renumbered(positions, sizes):
    # compacted rows numbered consecutively from the span's first position
    return positions[0] + torch.arange(sizes.numel(), dtype=positions.dtype)


@pytest.mark.parametrize("wrong_positions", [_first_member, _renumbered])
def test_wrong_positions_differ(deep_ref, audios, monkeypatch, wrong_positions):
    right = _gen(deep_ref, audios[:1], deep_merge_layer=1, deep_keep_ratio=0.5)
    monkeypatch.setattr(pooling, "merge_positions", wrong_positions)
    wrong = _gen(deep_ref, audios[:1], deep_merge_layer=1, deep_keep_ratio=0.5)
    assert wrong.deep_tokens_kept == right.deep_tokens_kept
    assert _max_diff(right, wrong) > 1e-3


# -- (d) validation -------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, N_LAYERS - 1, N_LAYERS, 10])
def test_invalid_layer_raises(deep_ref, audios, bad):
    with pytest.raises(ValueError, match="deep_merge_layer"):
        _gen(deep_ref, audios[:1], deep_merge_layer=bad, deep_keep_ratio=0.5)


# -- cached decoding equals an uncached recompute of the same definition ------------------
def _recompute_logprobs(ref, prompt_embeds, spans, gen_ids, L, keep_ratio, window):
    """Definition without any KV cache: for each step, run the whole sequence again."""
    lm = ref.model.model.language_model
    layers = list(lm.layers)
    T = prompt_embeds.shape[1]
    out = []
    for s in range(len(gen_ids)):
        tok = lm.get_input_embeddings()(torch.tensor([gen_ids[:s]], dtype=torch.long))
        h = torch.cat([prompt_embeds, tok], dim=1)
        n = h.shape[1]
        pos = torch.arange(n)
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        pe = lm.rotary_emb(h, pos[None])
        for layer in layers[: L + 1]:
            h = layer(h, attention_mask=mask, position_embeddings=pe)
        x = h[0]
        rows, new_pos, cur = [], [], 0
        for start, m in spans:
            span = x[start : start + m]
            sizes = pooling.group_sizes(span, pooling.num_kept(m, keep_ratio), "affinity", window)
            rows += [x[cur:start], pooling.merge(span, sizes)]
            new_pos += [pos[cur:start], pooling.merge_positions(pos[start : start + m], sizes)]
            cur = start + m
        rows.append(x[cur:])
        new_pos.append(pos[cur:])
        h = torch.cat(rows)[None]
        pc = torch.cat(new_pos)
        assert int(pc[-1]) == n - 1 and pc.shape[0] == n - sum(m for _, m in spans) + sum(
            pooling.num_kept(m, keep_ratio) for _, m in spans
        )
        c = h.shape[1]
        mask = torch.full((c, c), float("-inf")).triu(1)[None, None]
        pe = lm.rotary_emb(h, pc[None])
        for layer in layers[L + 1 :]:
            h = layer(h, attention_mask=mask, position_embeddings=pe)
        logits = ref.model.lm_head(lm.norm(h)[0, -1]).float()
        out.append(torch.log_softmax(logits, dim=-1))
    return out


@torch.no_grad()
def test_cached_decode_matches_recompute(deep_ref, audios):
    L, r, w = 1, 0.5, 3
    out = _gen(deep_ref, audios, prompt=PROMPT_2, deep_merge_layer=L, deep_keep_ratio=r, deep_window=w)
    ids = torch.tensor([out.prompt_token_ids])
    lm = deep_ref.model.model.language_model
    embeds = lm.get_input_embeddings()(ids)
    raw = deep_ref.audio_embeddings(audios)
    is_audio = ids[0] == deep_ref.audio_token_id
    embeds[0, is_audio] = torch.cat(raw)
    # spans = runs of the placeholder (text separates the two audios in PROMPT_2)
    spans, t = [], 0
    flags = is_audio.tolist()
    while t < len(flags):
        if flags[t]:
            s = t
            while t < len(flags) and flags[t]:
                t += 1
            spans.append((s, t - s))
        else:
            t += 1
    assert [m for _, m in spans] == out.audio_tokens_in
    want = _recompute_logprobs(deep_ref, embeds, spans, out.token_ids, L, r, w)
    for s, (a, b) in enumerate(zip(out.logprobs, want)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"step {s}")
        assert int(torch.argmax(b)) == out.token_ids[s]
