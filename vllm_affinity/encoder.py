"""Run Qwen2-Audio's Whisper-style encoder on the real audio length, not the 30 s window.

Stock Qwen2-Audio (transformers and vLLM alike) always encodes 3000 mel frames (30 s)
and masks the padded frames out of attention; a 10 s clip pays for 30 s of encoder.
The outputs at real frames depend only on real frames plus the convolutions'
receptive field, so we encode ``real mel frames + MARGIN`` instead:

* conv1 (k=3, s=1, p=1) and conv2 (k=3, s=2, p=1) make encoder position j depend on mel
  frames up to 2j + 2; the last real position needs at most frame L + 1 (L real frames);
* the learned positions are absolute (the first T' of them are the same);
* padded positions are masked out of attention as keys, exactly as in the stock path;
* the stride-2 average pool of the real positions reads real positions only.

So real outputs equal the stock ones up to float summation order (tests measure it).

The encoder stage (:func:`encode_merged`) runs on the same real-length front: it merges
the real positions after encoder layer E, so the padded ones never reach its later layers.
Pure torch over the transformers encoder module; no vLLM import.
"""

from __future__ import annotations

import torch

from . import pooling

# mel frames kept after the real ones: >= 2 for the convolutions; even keeps conv2 aligned
MARGIN = 4


def encoder_output_lengths(mel_frames: int) -> tuple[int, int]:
    """(positions after conv2, tokens after the average pool) for L real mel frames."""
    feat = (mel_frames - 1) // 2 + 1
    return feat, (feat - 2) // 2 + 1


def _front(tower, features: torch.Tensor, mel_frames: int):
    """Convolutions and learned positions on the real frames (+ margin) of ONE window, and
    the stock key-padding mask: (x (1, P, d), mask (1, 1, P, P), real positions, tokens)."""
    total = features.shape[-1]
    keep = min(total, mel_frames + MARGIN + (mel_frames + MARGIN) % 2)
    x = features[None, :, :keep].to(dtype=tower.conv1.weight.dtype, device=tower.conv1.weight.device)
    x = torch.nn.functional.gelu(tower.conv1(x))
    x = torch.nn.functional.gelu(tower.conv2(x)).permute(0, 2, 1)
    positions = x.shape[1]
    x = x + tower.embed_positions.weight[:positions]
    feat_len, out_len = encoder_output_lengths(mel_frames)
    # key-padding mask as in the stock path: -inf on padded key positions
    mask = torch.zeros(1, 1, positions, positions, dtype=x.dtype, device=x.device)
    mask[..., feat_len:] = float("-inf")
    return x, mask, feat_len, out_len


def _layers(x: torch.Tensor, layers, mask) -> torch.Tensor:
    for layer in layers:
        out = layer(x, mask)
        x = out[0] if isinstance(out, tuple) else out
    return x


def _tail(tower, x: torch.Tensor) -> torch.Tensor:
    """The stride-2 average pool and the final norm: (1, P, d) -> (P // 2, d)."""
    x = tower.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
    return tower.layer_norm(x)[0]


def encode_real_length(tower, features: torch.Tensor, mel_frames: int) -> torch.Tensor:
    """Encode ONE audio. ``features``: (num_mel_bins, 3000) log-mel of the 30 s window;
    ``mel_frames``: its real frames (the feature attention mask's sum). Returns the
    encoder's last hidden state for the real tokens only: (tokens, d_model)."""
    x, mask, _, out_len = _front(tower, features, mel_frames)
    return _tail(tower, _layers(x, tower.layers, mask))[:out_len]


# -- the encoder stage (``encoder: {merge_layer, keep_ratio, ...}``) ------------------------
def encoder_stage_tokens(mel_frames: int, keep_ratio: float) -> int:
    """Tokens one encoder window leaves with the encoder stage: ``num_kept(stock tokens,
    keep_ratio)`` (the processor's placeholder count; the input stage pools these)."""
    return pooling.num_kept(encoder_output_lengths(mel_frames)[1], keep_ratio)


def size_bias(sizes: torch.Tensor, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Proportional attention's additive mask for ``K`` merged rows: (1, 1, K, K), column j
    = log(sizes[j]). softmax(q.k + log s) weighs a key as s identical keys would, so a layer
    on the merged rows equals, group by group, the layer on the full-length sequence in which
    every frame is replaced by its group's mean (the reference computes it that way)."""
    k = sizes.numel()
    return sizes.to(device=device, dtype=torch.float32).log().to(dtype).expand(1, 1, k, k)


def encode_merged(tower, features: torch.Tensor, mel_frames: int, merge_layer: int, keep_ratio: float,
                  method: str = "affinity", window: int = 1,
                  size_weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder stage on ONE window of a Whisper-style encoder with a stride-2 pool
    (Qwen2-Audio): layers 0..E on the real frames (as :func:`encode_real_length`), then the
    ``feat_len`` real positions merged into ``2 K`` groups (group means; the margin's padded
    positions are dropped: no real position ever attended to them), layers E+1.. on those
    (``size_weighted``: with :func:`size_bias`), the stride-2 pool and the norm: exactly
    ``K = encoder_stage_tokens(mel_frames, keep_ratio)`` tokens. Returns ((K, d_model), group
    sizes in encoder positions)."""
    x, mask, feat_len, _ = _front(tower, features, mel_frames)
    x = _layers(x, tower.layers[: merge_layer + 1], mask)[0, :feat_len]
    k = encoder_stage_tokens(mel_frames, keep_ratio)
    sizes = pooling.group_sizes(x, 2 * k, method, window)
    bias = size_bias(sizes, x.dtype, x.device) if size_weighted else None
    x = _layers(pooling.merge(x, sizes)[None], tower.layers[merge_layer + 1 :], bias)
    return _tail(tower, x), sizes


# -- audio longer than the encoder's 30 s window (``long_audio: windows``) ---------------
#: a last window shorter than this (0.1 s at 16 kHz) is dropped: it would give the encoder
#: at most one or two frames (possibly zero tokens) and carries no speech worth a token
MIN_TAIL_SAMPLES = 1600


def window_bounds(num_samples: int, window_samples: int) -> list[tuple[int, int]]:
    """[start, end) sample ranges of consecutive encoder windows covering an audio.

    Every window but the last is exactly ``window_samples`` long; a last window shorter
    than :data:`MIN_TAIL_SAMPLES` is dropped unless it is the only one. The plugin and the
    reference both split with this function, so they encode the same windows."""
    if window_samples <= 0:
        raise ValueError(f"window_samples must be > 0, got {window_samples}")
    bounds = [(a, min(a + window_samples, num_samples)) for a in range(0, max(num_samples, 1), window_samples)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_TAIL_SAMPLES:
        bounds.pop()
    return bounds


def window_mel_frames(num_samples: int, *, windows: bool, window_samples: int = 480000,
                      hop: int = 160) -> list[int]:
    """Real mel frames of each encoder window of an audio: ceil(samples / hop) per window
    (the feature extractor's attention mask). Without ``windows`` only the first window
    is encoded (stock Qwen2-Audio truncates to 30 s)."""
    bounds = window_bounds(num_samples, window_samples) if windows else [(0, min(num_samples, window_samples))]
    return [-(-(b - a) // hop) for a, b in bounds]


def split_windows(wave, window_samples: int) -> list:
    """The audio's encoder windows (views of ``wave``, a 1-D array or tensor)."""
    return [wave[a:b] for a, b in window_bounds(len(wave), window_samples)]
