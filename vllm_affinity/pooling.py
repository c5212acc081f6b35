"""Affinity Pooling: choose groups of adjacent tokens, then mean-pool them.

Pure torch, no vLLM import. Every implementation in this project (the vLLM
model, the Hugging Face reference, the benchmarks) calls these functions, so the
semantics below are the single definition of the method:

* affinity of token t to its look-back window of size w::

      a_t = max_{j=1..min(w, t)} cos(x_t, x_{t-j})          (t >= 1)

  cosine in fp32; a zero vector has similarity 0 (never NaN).
* threshold mode (the paper's scan): token t joins the current group iff its max
  cosine to the last w members *of the current group* is > tau.
* exact-count mode (what vLLM needs, the count must be known before the encoder
  runs): given K, cut before the K-1 tokens with the lowest a_t (t >= 1, ties:
  lower t first); groups are the runs between cuts.
* uniform mode (the paper's fixed-budget baseline): K contiguous bins whose sizes
  differ by at most one, larger bins first.
* a group becomes the plain mean of its members (fp32 accumulation).

Choosing groups is separate from applying them: the choosers return ``sizes``
(a 1-D LongTensor of contiguous run lengths, summing to n); :func:`merge` and
:func:`merge_positions` apply them to any tensor.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Method = Literal["affinity", "uniform"]
METHODS: tuple[str, ...] = ("affinity", "uniform")


def num_kept(n: int, keep_ratio: float) -> int:
    """K = clamp(ceil(n * keep_ratio), 1, n), n * keep_ratio rounded to 6 decimals first.

    The rounding makes 100 * 0.07 (= 7.000000000000001 in floating point) give 7.
    An empty span keeps nothing.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if n == 0:
        return 0
    return min(max(math.ceil(round(n * keep_ratio, 6)), 1), n)


#: how :func:`block_aligned_count` rounds the number of dropped rows
BlockAlign = Literal["off", "keep_more", "keep_fewer"]
BLOCK_ALIGNS: tuple[str, ...] = ("off", "keep_more", "keep_fewer")


def block_aligned_count(n: int, k: int, block_size: int, align: BlockAlign, *, most: int | None = None) -> int:
    """K' for a span of ``n`` rows that pooling reduces to ``k``, such that the rows dropped
    (``n - K'``) are a multiple of ``block_size``.

    Why: vLLM's prefix cache hits whole KV blocks. A chat's next turn repeats this turn's
    prompt, so it recomputes ``(prompt + answer) mod block_size`` tokens plus its own. When
    every audio drops a multiple of the block size, that remainder is stock's, so the next
    turn recomputes exactly what stock recomputes (and attends over a shorter context).

    * ``keep_more``: round the drop down (the issue-21 formula ``n - bs*floor((n-k)/bs)``):
      at most ``block_size - 1`` more rows than ``k``, the same number of KV blocks saved;
    * ``keep_fewer``: round the drop up: at most ``block_size - 1`` rows fewer than ``k``;
    * ``off``: ``k``.

    ``most``: the rows that exist to keep (what an earlier merge, e.g. the encoder stage,
    left; default ``n``). Where the rounding cannot hold (``keep_more`` above ``most``,
    ``keep_fewer`` below 1 row) the count stays ``k``: a cache miss costs less than rows
    the user did not ask to lose or cannot get back.
    """
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n={n}], got {k}")
    if align not in BLOCK_ALIGNS:
        raise ValueError(f"align must be one of {BLOCK_ALIGNS}, got {align!r}")
    if align == "off" or k == 0:
        return k
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    most = n if most is None else min(most, n)
    if align == "keep_more":
        aligned = n - (n - k) // block_size * block_size
        return aligned if aligned <= most else k
    aligned = n - -(-(n - k) // block_size) * block_size
    return aligned if aligned >= 1 else k


def neighbour_cosines(x: torch.Tensor, window: int) -> torch.Tensor:
    """``C[t, j-1] = cos(x_t, x_{t-j})`` for j = 1..window, fp32, shape (n, window).

    Entries with t - j < 0 are -inf (no such neighbour). Zero vectors give 0.
    """
    if x.dim() != 2:
        raise ValueError(f"expected a (tokens, hidden) tensor, got shape {tuple(x.shape)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    xf = x.detach().float()
    n = xf.shape[0]
    norms = xf.norm(dim=-1)
    out = torch.full((n, window), float("-inf"), dtype=torch.float32, device=x.device)
    for j in range(1, min(window, n - 1) + 1):
        dots = (xf[j:] * xf[:-j]).sum(-1)
        denom = norms[j:] * norms[:-j]
        cos = torch.where(denom > 0, dots / denom.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        out[j:, j - 1] = cos
    return out


def affinity_scores(x: torch.Tensor, window: int = 1) -> torch.Tensor:
    """``a_t`` for every token, shape (n,); ``a_0`` is -inf (the first token opens a group)."""
    return neighbour_cosines(x, window).max(dim=-1).values


def sizes_from_cuts(n: int, cuts: torch.Tensor) -> torch.Tensor:
    """Run lengths of the groups when the span is cut before each token index in ``cuts``."""
    bounds = torch.cat(
        [
            torch.zeros(1, dtype=torch.long),
            torch.sort(cuts.to(torch.long).cpu()).values,
            torch.tensor([n], dtype=torch.long),
        ]
    )
    return bounds.diff()


def exact_count_sizes(x: torch.Tensor, k: int, window: int = 1) -> torch.Tensor:
    """Exact-count affinity grouping of ``x`` (n, d) into exactly ``k`` contiguous groups."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if k == n:
        return torch.ones(n, dtype=torch.long)
    scores = affinity_scores(x, window)[1:].cpu()
    # stable ascending sort: ties keep index order, so the lower t is cut first
    order = torch.sort(scores, stable=True).indices
    cuts = order[: k - 1] + 1
    return sizes_from_cuts(n, cuts)


def cut_margin(x: torch.Tensor, k: int, window: int = 1) -> float:
    """How far exact-count affinity grouping of ``x`` into ``k`` groups is from a tie: the
    gap between the highest score that is cut and the lowest that joins (``inf`` when there
    is no choice, k == 1 or k == n).

    Two implementations of the same model agree on the groups only when their affinity
    scores differ by less than this; a margin near fp32 rounding (~1e-7) means the groups
    are chosen by rounding, not by the audio. Tests check their fixture checkpoints with it.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if k in (1, n):
        return math.inf
    ordered = torch.sort(affinity_scores(x, window)[1:].cpu()).values
    return float(ordered[k - 1] - ordered[k - 2])


def threshold_sizes(x: torch.Tensor, tau: float, window: int = 1) -> torch.Tensor:
    """The paper's left-to-right scan: join the current group iff max cos to its last
    ``window`` members is > ``tau``. Returns data-dependent group sizes."""
    n = x.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    cos = neighbour_cosines(x, window).cpu().tolist()
    sizes = []
    start = 0
    for t in range(1, n):
        # members of the current group among the last `window` tokens: t-j >= start
        reach = min(window, t - start)
        if max(cos[t][:reach]) > tau:
            continue
        sizes.append(t - start)
        start = t
    sizes.append(n - start)
    return torch.tensor(sizes, dtype=torch.long)


def uniform_sizes(n: int, k: int) -> torch.Tensor:
    """K contiguous bins, sizes differing by at most one, larger bins first."""
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    q, r = divmod(n, k)
    return torch.tensor([q + 1] * r + [q] * (k - r), dtype=torch.long)


def group_sizes(x: torch.Tensor, k: int, method: Method = "affinity", window: int = 1) -> torch.Tensor:
    """Exact-count grouping by ``method``."""
    if method == "affinity":
        return exact_count_sizes(x, k, window)
    if method == "uniform":
        return uniform_sizes(x.shape[0], k)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def group_index(sizes: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Group id of every member token, shape (n,)."""
    sizes = sizes.to(device=device, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(sizes.numel(), device=sizes.device), sizes)


def merge(x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Mean of each contiguous group along dim 0 (fp32 accumulation, result in x.dtype)."""
    if int(sizes.sum()) != x.shape[0]:
        raise ValueError(f"group sizes sum to {int(sizes.sum())}, tensor has {x.shape[0]} rows")
    if sizes.numel() == x.shape[0]:
        return x
    idx = group_index(sizes, x.device)
    acc = torch.zeros((sizes.numel(),) + tuple(x.shape[1:]), dtype=torch.float32, device=x.device)
    acc.index_add_(0, idx, x.float())
    counts = sizes.to(device=x.device, dtype=torch.float32).view(-1, *([1] * (x.dim() - 1)))
    return (acc / counts).to(x.dtype)


def merge_positions(positions: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Floor of the mean position of each group (integer tensor, strictly increasing
    when the input is)."""
    idx = group_index(sizes, positions.device)
    sums = torch.zeros(sizes.numel(), dtype=torch.long, device=positions.device)
    sums.index_add_(0, idx, positions.to(torch.long))
    return torch.div(sums, sizes.to(positions.device), rounding_mode="floor").to(positions.dtype)


def pool(
    x: torch.Tensor, keep_ratio: float, method: Method = "affinity", window: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one span to ``num_kept(n, keep_ratio)`` rows. Returns (merged, sizes)."""
    k = num_kept(x.shape[0], keep_ratio)
    sizes = group_sizes(x, k, method, window)
    return merge(x, sizes), sizes
