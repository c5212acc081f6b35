"""The vLLM path (real CPU engine, tiny model) against the HF reference.

Same prompt token ids, same greedy tokens and per-step log-probabilities within
LOGPROB_TOL, for 5 utterances x keep ratios {1.0, 0.74, 0.5, 0.25}. Random tiny
models hide bugs, so every comparison also runs against deliberately wrong
poolings that it must reject.
"""

from __future__ import annotations

import pytest
import torch

from vllm_affinity import pooling as P

from .conftest import MAX_NEW, N_LOGPROBS, PROMPT, load_audio
from .parity import MIN_CUT_MARGIN, vllm_compare

pytestmark = pytest.mark.engine

RATIOS = (1.0, 0.74, 0.5, 0.25)


def test_checkpoint_cut_points_are_not_ties(reference, clips):
    """The input-stage choices the parity tests below make are far from a tie on the tiny
    Qwen2-Audio (see parity.MIN_CUT_MARGIN)."""
    margins = [(P.cut_margin(e, P.num_kept(e.shape[0], r)), f"{c.name} {r}")
               for c in clips for e in reference.audio_embeddings([load_audio(c)]) for r in RATIOS]
    worst = min(margins)
    print(f"\nsmallest cut margin {worst[0]:.2e} ({worst[1]}) of {len(margins)} choices")
    assert worst[0] >= MIN_CUT_MARGIN, f"exact-count cut margin {worst[0]:.2e} at {worst[1]} is a near-tie"


def _sampling():
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=N_LOGPROBS)


def _shifted_cuts(ratio):
    """Off-by-one: cut AFTER (not before) each lowest-affinity token."""
    def fn(e):
        n = e.shape[0]
        k = P.num_kept(n, ratio)
        s = P.exact_count_sizes(e, k, 1)
        cuts = torch.cumsum(s, 0)[:-1]
        cuts = torch.clamp(cuts + 1, max=n - 1).unique()
        cuts = torch.cat([cuts, torch.arange(1, n)[~torch.isin(torch.arange(1, n), cuts)]])[: k - 1]
        return P.merge(e, P.sizes_from_cuts(n, cuts))
    return fn


def _first_member(ratio):
    """Keep each group's first member instead of the mean (dropping, not merging)."""
    def fn(e):
        s = P.exact_count_sizes(e, P.num_kept(e.shape[0], ratio), 1)
        starts = torch.cumsum(s, 0) - s
        return e[starts]
    return fn


WRONG = {
    "uniform-bins": lambda r: (lambda e: P.pool(e, r, "uniform")[0]),
    "window-2": lambda r: (lambda e: P.pool(e, r, "affinity", 2)[0]),
    "cuts-shifted": _shifted_cuts,
    "first-member": _first_member,
}


@pytest.fixture(scope="module")
def vllm_runs(engine, clips):
    """Every (clip, ratio) through the engine in one batch."""
    prompts, keys = [], []
    for i, clip in enumerate(clips):
        for r in RATIOS:
            prompts.append({
                "prompt": PROMPT,
                "multi_modal_data": {"audio": load_audio(clip)},
                "mm_processor_kwargs": {"affinity_keep_ratio": r},
            })
            keys.append((i, r))
    outs = engine.generate(prompts, _sampling(), use_tqdm=False)
    return dict(zip(keys, outs))


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("clip_idx", range(5))
def test_vllm_matches_reference(vllm_runs, reference, clips, clip_idx, ratio):
    out = vllm_runs[(clip_idx, ratio)]
    ref = reference.generate(PROMPT, [load_audio(clips[clip_idx])], max_new_tokens=MAX_NEW, keep_ratio=ratio)
    n, k = ref.audio_tokens_in[0], ref.audio_tokens_kept[0]
    assert k == P.num_kept(n, ratio)
    par = vllm_compare(out, ref)
    assert par.ok, f"clip {clip_idx} ratio {ratio} (audio tokens {n}->{k}): {par}"
    assert len(out.outputs[0].token_ids) == MAX_NEW
    if ratio < 1.0:
        for name, make in WRONG.items():
            wrong = reference.generate(PROMPT, [load_audio(clips[clip_idx])], max_new_tokens=MAX_NEW,
                                       pool_fn=make(ratio))
            bad = vllm_compare(out, wrong)
            assert not bad.ok, f"parity check cannot tell the {name!r} pooling apart: {bad}"


def test_clip_lengths_cover_2_to_30_seconds(reference, clips):
    counts = [reference.audio_embeddings([load_audio(c)])[0].shape[0] for c in clips]
    assert counts[0] == 50 and counts[-1] == 750  # 25 tokens/s, 2 s and 30 s
    assert counts == sorted(counts)


def test_two_audios_in_one_prompt(engine, reference, clips):
    prompt = PROMPT.replace(
        "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n",
        "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\n",
    )
    audios = [load_audio(clips[1]), load_audio(clips[2])]
    out = engine.generate(
        [{"prompt": prompt, "multi_modal_data": {"audio": audios},
          "mm_processor_kwargs": {"affinity_keep_ratio": 0.5}}],
        _sampling(), use_tqdm=False,
    )[0]
    ref = reference.generate(prompt, audios, max_new_tokens=MAX_NEW, keep_ratio=0.5)
    par = vllm_compare(out, ref)
    assert par.ok, str(par)
    assert ref.audio_tokens_kept == [P.num_kept(n, 0.5) for n in ref.audio_tokens_in]


def test_mixed_batch_equals_requests_alone(engine, clips):
    """Audio of different lengths, per-request ratios and text-only in one batch."""
    reqs = [
        {"prompt": PROMPT, "multi_modal_data": {"audio": load_audio(clips[0])},
         "mm_processor_kwargs": {"affinity_keep_ratio": 0.25}},
        {"prompt": "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"},
        {"prompt": PROMPT, "multi_modal_data": {"audio": load_audio(clips[3])},
         "mm_processor_kwargs": {"affinity_keep_ratio": 0.74}},
    ]
    together = engine.generate(reqs, _sampling(), use_tqdm=False)
    for req, t in zip(reqs, together):
        alone = engine.generate([req], _sampling(), use_tqdm=False)[0]
        assert list(alone.prompt_token_ids) == list(t.prompt_token_ids)
        assert list(alone.outputs[0].token_ids) == list(t.outputs[0].token_ids)
