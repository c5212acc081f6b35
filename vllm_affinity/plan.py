"""The deterministic deep-merge plan of one request, shared by scheduler and worker.

A request's audio placeholder ranges (offset, length) and the server's deep
keep ratio fix, before anything runs, how many positions each audio span keeps
above the merge layer (K = num_kept(length, keep_ratio)). WHICH tokens merge is
decided later, on the hidden states; HOW MANY is known here. From that:

* ``compacted(n)``: the deep layers' sequence length (= KV slots) once the first n
  prompt/output tokens are computed. The KV-cache manager allocates exactly
  ``ceil(compacted(n) / block_size)`` blocks for the deep group.
* ``slot_index(p)``: the compacted KV index of a non-audio token at position p
  (``p - removed_before(p)``); audio span s writes its K merged rows at
  ``span_compact_start(s) + g``.

Spans must be processed whole (vLLM's ``disable_chunked_mm_input``); a token count
that ends inside a span counts that span as not yet merged (only used as an upper
bound by the scheduler). :meth:`DeepPlan.rows` gives the rows one step computes in
the layers above the merge (the runner calls it; the tests test it). Pure Python and
numpy, no vLLM or torch import.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .pooling import block_aligned_count, num_kept


def deep_kept_count(n: int, keep_ratio: float, block_size: int | None = None, align: str = "off") -> int:
    """Rows a span of ``n`` keeps above the merge: ``num_kept(n, keep_ratio)``, its drop
    rounded to a multiple of ``block_size`` where ``align`` (``deep.kv_block_align``) says."""
    k = num_kept(n, keep_ratio)
    return k if align == "off" or not block_size else block_aligned_count(n, k, block_size, align)


@dataclass(frozen=True)
class Span:
    offset: int  # position of the span's first token
    length: int  # tokens entering the deep stage (placeholders of one audio)
    kept: int  # rows above the merge layer

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def removed(self) -> int:
        return self.length - self.kept


@dataclass(frozen=True)
class StepRows:
    """The rows of one request's scheduled range [start, end) above the merge layer."""

    slot_index: np.ndarray  # (rows,) int64: compacted KV index of each row, ascending
    spans: list[Span]  # the audio spans merged in this range (each whole)
    seq_len: int  # the deep layers' sequence length once the range is computed

    @property
    def num_rows(self) -> int:
        return int(self.slot_index.size)


class DeepPlan:
    """Plan of one request: spans sorted by offset, with prefix sums of removed tokens."""

    __slots__ = ("spans", "_ends", "_removed_prefix")

    def __init__(self, spans: list[Span]) -> None:
        self.spans = sorted(spans, key=lambda s: s.offset)
        for a, b in zip(self.spans, self.spans[1:]):
            if b.offset < a.end:
                raise ValueError(f"overlapping audio spans {a} and {b}")
        self._ends = [s.end for s in self.spans]
        self._removed_prefix = [0]
        for s in self.spans:
            self._removed_prefix.append(self._removed_prefix[-1] + s.removed)

    @classmethod
    def from_ranges(cls, ranges: list[tuple[int, int]], keep_ratio: float, *, block_size: int | None = None,
                    align: str = "off") -> "DeepPlan":
        """``align`` (``deep.kv_block_align``) with ``block_size``: each span drops a multiple of
        the block size (:func:`~vllm_affinity.pooling.block_aligned_count`)."""
        return cls([Span(o, n, deep_kept_count(n, keep_ratio, block_size, align)) for o, n in ranges if n > 0])

    @classmethod
    def from_features(cls, mm_features: Iterable[Any] | None, keep_ratio: float, *, block_size: int | None = None,
                      align: str = "off") -> "DeepPlan":
        """Plan of a request from its multimodal features (vLLM's ``MultiModalFeatureSpec``:
        ``modality`` and ``mm_position.offset/length``), as the scheduler's Request and the
        worker's cached request state both carry them."""
        ranges = [(f.mm_position.offset, f.mm_position.length) for f in (mm_features or []) if f.modality == "audio"]
        return cls.from_ranges(ranges, keep_ratio, block_size=block_size, align=align) if ranges else EMPTY_PLAN

    @classmethod
    def of_request(cls, mm_features: Iterable[Any] | None, deep: Any, block_size: int | None) -> "DeepPlan":
        """The plan the server's deep stage (``config.DeepStage``) gives a request: the one
        constructor scheduler, KV manager, worker and processor share."""
        return cls.from_features(mm_features, deep.keep_ratio, block_size=block_size, align=deep.kv_block_align)

    def rows(self, start: int, end: int) -> StepRows:
        """Rows of the range [start, end) in the layers above the merge: text tokens keep
        their place (index = position minus the tokens merged away before it); a span
        inside the range becomes its K rows at the span's compacted start."""
        pieces, cursor = [], start
        spans = self.spans_in(start, end)
        for s in spans:
            pieces.append(np.arange(cursor, s.offset) - self.removed_before(cursor))
            c0 = self.span_compact_start(s)
            pieces.append(np.arange(c0, c0 + s.kept))
            cursor = s.end
        pieces.append(np.arange(cursor, end) - self.removed_before(cursor))
        return StepRows(np.concatenate(pieces).astype(np.int64), spans, self.compacted(end))

    @property
    def total_removed(self) -> int:
        return self._removed_prefix[-1]

    def removed_before(self, n: int) -> int:
        """Tokens merged away among positions < n (spans that END at or before n)."""
        return self._removed_prefix[bisect.bisect_right(self._ends, n)]

    def compacted(self, n: int) -> int:
        """Deep-layer sequence length when the first ``n`` tokens are computed."""
        return n - self.removed_before(n)

    def slot_index(self, position: int) -> int:
        """Compacted KV index of a NON-audio token at ``position``."""
        return position - self.removed_before(position)

    def span_compact_start(self, span: Span) -> int:
        return span.offset - self.removed_before(span.offset)

    # -- prefix caching of the deep layers' blocks -------------------------------------------
    def row_determined_at(self, row: int) -> int:
        """The token count that determines compacted row ``row`` of the deep layers: a text
        row at position p is fixed once p + 1 tokens are (causal layers below the merge); a
        merged row once its whole span is (the groups are chosen on all of the span's rows)."""
        removed = 0
        for s in self.spans:
            start = s.offset - removed  # compacted index of the span's first row
            if row < start:
                return row + removed + 1
            if row < start + s.kept:
                return s.end
            removed += s.removed
        return row + removed + 1

    def tokens_at(self, rows: int) -> int | None:
        """The token count ``h`` whose compacted length is ``rows``, with ``h`` not strictly
        inside a span; None where ``rows`` ends among a span's merged rows (no token prefix
        holds exactly those rows)."""
        removed = 0
        for s in self.spans:
            start = s.offset - removed
            if rows <= start:
                return rows + removed
            if rows < start + s.kept:
                return None
            if rows == start + s.kept:
                return s.end
            removed += s.removed
        return rows + removed

    def schedulable_end(self, start: int, end: int) -> int:
        """The largest end' <= ``end`` such that [start, end') splits no span: a chunk
        that would stop inside a span stops before it instead (possibly at ``start``)."""
        for s in self.spans:
            if start <= s.offset < end < s.end:
                return s.offset
        return end

    def spans_in(self, start: int, end: int) -> list[Span]:
        """Spans inside [start, end); raises if one is cut by the range (chunked audio)."""
        out = []
        for s in self.spans:
            if s.end <= start or s.offset >= end:
                continue
            if s.offset < start or s.end > end:
                raise RuntimeError(
                    f"vllm-affinity: audio span [{s.offset}, {s.end}) is split by the scheduled "
                    f"range [{start}, {end}); the deep stage needs disable_chunked_mm_input=True"
                )
            out.append(s)
        return out


EMPTY_PLAN = DeepPlan([])
