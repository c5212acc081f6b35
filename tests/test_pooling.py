"""Unit and property tests of the pure-torch algorithm (vllm_affinity.pooling)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_affinity import pooling as P

settings.register_profile("ci", max_examples=60, deadline=None)
settings.load_profile("ci")


@st.composite
def spans(draw, min_n=1, max_n=40):
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    # make runs of near-duplicates, as real audio has
    if draw(st.booleans()):
        reps = torch.randint(1, 4, (n,), generator=g)
        x = torch.repeat_interleave(x, reps, dim=0)[:n] + 0.01 * torch.randn(n, d, generator=g)
    return x


# -- K rule -----------------------------------------------------------------------------
def test_num_kept_rounds_before_ceiling():
    assert 100 * 0.07 > 7  # the float trap the rule exists for
    assert P.num_kept(100, 0.07) == 7
    assert P.num_kept(750, 0.7432) == math.ceil(750 * 0.7432)
    assert P.num_kept(3, 0.01) == 1  # clamp low
    assert P.num_kept(5, 1.0) == 5
    assert P.num_kept(0, 0.5) == 0


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.0001, float("nan")])
def test_num_kept_rejects_bad_ratio(bad):
    with pytest.raises(ValueError, match="keep_ratio"):
        P.num_kept(10, bad)


# -- affinity scores --------------------------------------------------------------------
def test_zero_vectors_have_similarity_zero_not_nan():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    a = P.affinity_scores(x, window=1)
    assert torch.isinf(a[0]) and a[0] < 0
    assert torch.equal(a[1:], torch.zeros(3))


def test_affinity_is_max_over_window():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01]])
    a1 = P.affinity_scores(x, 1)
    a2 = P.affinity_scores(x, 2)
    assert a1[2] < 0.1 and a2[2] > 0.99  # token 2 matches token 0, two steps back


def test_cosine_computed_in_fp32_for_bf16():
    x = torch.randn(20, 16).to(torch.bfloat16)
    assert P.affinity_scores(x, 2).dtype == torch.float32


# -- exact-count mode -------------------------------------------------------------------
@given(spans(), st.floats(0.01, 1.0), st.integers(1, 4), st.sampled_from(P.METHODS))
def test_groups_contiguous_covering_exact_k(x, ratio, window, method):
    n = x.shape[0]
    k = P.num_kept(n, ratio)
    sizes = P.group_sizes(x, k, method, window)
    assert sizes.numel() == k
    assert int(sizes.sum()) == n
    assert bool((sizes >= 1).all())
    idx = P.group_index(sizes)
    assert bool((idx.diff() >= 0).all()) and bool((idx.diff() <= 1).all())  # contiguous runs


@given(spans(), st.floats(0.01, 1.0), st.integers(1, 4))
def test_outputs_are_member_means(x, ratio, window):
    merged, sizes = P.pool(x, ratio, "affinity", window)
    assert merged.shape == (sizes.numel(), x.shape[1])
    start = 0
    for g, s in enumerate(sizes.tolist()):
        torch.testing.assert_close(merged[g], x[start : start + s].mean(0), rtol=1e-5, atol=1e-6)
        start += s


@given(spans(min_n=2))
def test_window1_exact_count_equals_threshold_at_matching_tau(x):
    a = P.affinity_scores(x, 1)[1:]
    tau = float(a.median())  # a threshold that sits on real score values (ties included)
    thr = P.threshold_sizes(x, tau, window=1)
    exact = P.exact_count_sizes(x, thr.numel(), window=1)
    assert torch.equal(thr, exact)


def test_exact_count_cuts_lowest_affinity_ties_lower_index_first():
    # a = [-, 1, 0, 1, 0, 1]: two equal minima at t=2 and t=4
    x = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [1, 0], [1, 0]])
    assert P.exact_count_sizes(x, 2, 1).tolist() == [2, 4]  # cut at t=2 only
    assert P.exact_count_sizes(x, 3, 1).tolist() == [2, 2, 2]


def test_cut_margin_is_the_gap_between_last_cut_and_first_join():
    # unit vectors at angles 0, 0.1, 0.5, 0.6, 1.6 rad: scores cos(0.1), cos(0.4), cos(0.1), cos(1.0)
    ang = torch.tensor([0.0, 0.1, 0.5, 0.6, 1.6])
    x = torch.stack([ang.cos(), ang.sin()], dim=1)
    scores = sorted([math.cos(0.1), math.cos(0.4), math.cos(0.1), math.cos(1.0)])
    for k in (2, 3, 4):
        assert P.cut_margin(x, k) == pytest.approx(scores[k - 1] - scores[k - 2], abs=1e-6)
    assert P.cut_margin(x, 3) > 0.05  # cuts before 1.6 and 0.5: far from a tie
    assert P.cut_margin(x, 4) < 1e-6  # the two cos(0.1) joins tie: one must be cut
    assert P.cut_margin(x, 1) == P.cut_margin(x, 5) == math.inf
    with pytest.raises(ValueError, match="k must be in"):
        P.cut_margin(x, 0)


def test_k_equals_n_is_identity():
    x = torch.randn(7, 3)
    merged, sizes = P.pool(x, 1.0)
    assert merged is x and sizes.tolist() == [1] * 7


# -- threshold mode (the paper's scan) --------------------------------------------------
def test_threshold_compares_with_current_group_members_only():
    # tokens: A A' B A'' ; with window 3, A'' is similar to A/A' but they are in a
    # closed group, so A'' must start a new group (only B is in the current group)
    A = torch.tensor([1.0, 0.0])
    B = torch.tensor([0.0, 1.0])
    x = torch.stack([A, A * 1.01, B, A * 0.99])
    assert P.threshold_sizes(x, 0.9, window=3).tolist() == [2, 1, 1]
    z = torch.stack([A, A + 0.4 * B, A])  # cos(z1,z0)=0.93 joins; z2 joins via max over window
    assert P.threshold_sizes(z, 0.92, window=2).tolist() == [3]


# -- uniform ----------------------------------------------------------------------------
@given(st.integers(1, 200), st.data())
def test_uniform_bins_larger_first_differ_by_one(n, data):
    k = data.draw(st.integers(1, n))
    s = P.uniform_sizes(n, k).tolist()
    assert len(s) == k and sum(s) == n
    assert max(s) - min(s) <= 1
    assert s == sorted(s, reverse=True)


# -- merge ------------------------------------------------------------------------------
def test_merge_accumulates_in_fp32_and_keeps_dtype():
    x = torch.full((4096, 2), 1.001, dtype=torch.bfloat16)
    m = P.merge(x, torch.tensor([4096]))
    assert m.dtype == torch.bfloat16
    assert torch.equal(m, x[:1])  # a bf16 running sum would drift far from the value


def test_merge_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="sum to"):
        P.merge(torch.zeros(5, 2), torch.tensor([2, 2]))


def test_merge_positions_floor_mean_strictly_increasing():
    pos = torch.arange(10, 20)
    out = P.merge_positions(pos, torch.tensor([3, 1, 4, 2]))
    assert out.tolist() == [11, 13, 15, 18]
    assert bool((out.diff() > 0).all())


def test_pooling_has_no_vllm_import():
    import subprocess
    import sys

    code = "import sys, vllm_affinity.pooling; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
