"""The deterministic deep-merge plan shared by scheduler and worker (pure Python)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_affinity.plan import DeepPlan, Span
from vllm_affinity.pooling import num_kept


def _plans():
    """A request's spans (gaps and lengths) and a deep keep ratio."""
    return st.tuples(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 40)), max_size=4), st.floats(0.01, 1.0))


def _plan_of(gaps, ratio):
    ranges, pos = [], 0
    for gap, n in gaps:
        pos += gap
        ranges.append((pos, n))
        pos += n
    return DeepPlan.from_ranges(ranges, ratio), pos + 5


def test_compacted_counts_whole_spans_only():
    plan = DeepPlan.from_ranges([(10, 100), (200, 50)], 0.1)  # K = 10 and 5
    assert [s.kept for s in plan.spans] == [10, 5]
    assert plan.compacted(10) == 10
    assert plan.compacted(109) == 109  # span 1 not finished: counted unmerged
    assert plan.compacted(110) == 20
    assert plan.compacted(300) == 300 - 90 - 45
    assert plan.total_removed == 135


def test_slot_indices_of_a_full_prefill_are_contiguous():
    plan = DeepPlan.from_ranges([(3, 20), (30, 7)], 0.5)
    rows = plan.rows(0, 50)
    assert rows.slot_index.tolist() == list(range(plan.compacted(50)))
    assert rows.seq_len == plan.compacted(50) == rows.num_rows
    assert rows.spans == plan.spans
    assert plan.slot_index(50) == plan.compacted(50)  # the first decode token


@given(_plans(), st.data())
def test_step_rows_of_any_chunking_tile_the_compacted_sequence(plan_args, data):
    """However the scheduler cuts the prompt into steps (never inside a span), the rows of
    the steps, concatenated, are the compacted indices 0..C-1 once each, in order; each
    step's row count is its tokens minus what its spans merge away, and its seq_len is
    the compacted length at its end. Decode steps add one row each."""
    plan, end = _plan_of(*plan_args)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, end), max_size=6))) | {0, end})
    cuts = [c for c in cuts if all(not (s.offset < c < s.end) for s in plan.spans)]
    rows = []
    for a, b in zip(cuts, cuts[1:]):
        step = plan.rows(a, b)
        assert step.num_rows == (b - a) - sum(s.removed for s in step.spans)
        assert step.seq_len == plan.compacted(b)
        assert all(a <= s.offset and s.end <= b for s in step.spans)
        rows += step.slot_index.tolist()
    assert rows == list(range(plan.compacted(end)))
    decode = plan.rows(end, end + 1)
    assert decode.slot_index.tolist() == [plan.compacted(end)] and decode.spans == []


@given(_plans())
def test_plan_from_features_reads_only_audio(plan_args):
    from types import SimpleNamespace as NS

    plan, _ = _plan_of(*plan_args)
    ratio = plan_args[1]
    feats = [NS(modality="audio", mm_position=NS(offset=s.offset, length=s.length)) for s in plan.spans]
    feats.append(NS(modality="image", mm_position=NS(offset=10_000, length=50)))
    again = DeepPlan.from_features(feats, ratio)
    assert again.spans == plan.spans
    assert DeepPlan.from_features(None, ratio).spans == []


def test_split_span_is_refused():
    plan = DeepPlan.from_ranges([(10, 100)], 0.5)
    with pytest.raises(RuntimeError, match="disable_chunked_mm_input"):
        plan.spans_in(0, 50)
    assert plan.spans_in(0, 110) == [Span(10, 100, 50)]
    assert plan.spans_in(110, 200) == []


def test_overlapping_spans_are_refused():
    with pytest.raises(ValueError, match="overlapping"):
        DeepPlan([Span(0, 10, 5), Span(5, 10, 5)])


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 40)), max_size=4), st.floats(0.01, 1.0))
def test_compacted_is_monotone_and_matches_kept(gaps, ratio):
    plan, end = _plan_of(gaps, ratio)
    ranges = [(sp.offset, sp.length) for sp in plan.spans]
    values = [plan.compacted(t) for t in range(end + 1)]
    removed_at = {o + n: n - num_kept(n, ratio) for o, n in ranges}
    for t in range(end):  # +1 per token, minus what a span finishing at t+1 merges away
        assert values[t + 1] - values[t] == 1 - removed_at.get(t + 1, 0)
    assert values[-1] == end - sum(n - num_kept(n, ratio) for _, n in ranges)


def test_schedulable_end_never_splits_a_span():
    plan = DeepPlan.from_ranges([(24, 555), (700, 50)], 0.3)
    assert plan.schedulable_end(24, 456) == 24  # starts AT the span: schedule nothing (vLLM 0.32 would split)
    assert plan.schedulable_end(0, 456) == 24  # stop before the span
    assert plan.schedulable_end(24, 579) == 579  # the whole span fits
    assert plan.schedulable_end(0, 720) == 700  # second span cut: stop before it
    assert plan.schedulable_end(579, 650) == 650  # text only
    assert plan.schedulable_end(0, 2000) == 2000


# -- prefix caching of the deep layers' blocks (deep.kv_block_align) ----------------------------
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 300)), min_size=0, max_size=4),
       st.floats(0.05, 1.0), st.sampled_from([16, 32, 128]), st.sampled_from(["off", "keep_more", "keep_fewer"]))
def test_rows_map_back_to_their_token_prefix(gaps_lengths, ratio, bs, align):
    ranges, pos = [], 5
    for gap, n in gaps_lengths:
        pos += gap
        ranges.append((pos, n))
        pos += n
    plan = DeepPlan.from_ranges(ranges, ratio, block_size=bs, align=align)
    total = pos + 20
    inside = {p for s in plan.spans for p in range(s.offset + 1, s.end)}
    for h in range(total + 1):
        if h not in inside:  # a boundary outside every span maps to its rows and back
            assert plan.tokens_at(plan.compacted(h)) == h
    for s in plan.spans:
        c0 = plan.span_compact_start(s)
        assert [plan.row_determined_at(r) for r in range(c0, c0 + s.kept)] == [s.end] * s.kept
        assert all(plan.tokens_at(r) is None for r in range(c0 + 1, c0 + s.kept))
        if align == "keep_more":  # past the span, prompt and deep layers are congruent mod bs
            assert (plan.compacted(s.end) - s.end) % bs == 0
    text = [p for p in range(total) if p not in inside and all(not (s.offset <= p < s.end) for s in plan.spans)]
    assert all(plan.row_determined_at(plan.slot_index(p)) == p + 1 for p in text)


def test_aligned_spans_keep_the_issue_formula():
    # 372 rows at 0.2006 keep 75; dropping 297 rounds down to 256 (2 blocks of 128): 116 kept
    plan = DeepPlan.from_ranges([(10, 372)], 0.2006, block_size=128, align="keep_more")
    assert plan.spans[0].kept == 372 - 128 * ((372 - 75) // 128) == 116
    assert DeepPlan.from_ranges([(10, 372)], 0.2006, block_size=128).spans[0].kept == 75
