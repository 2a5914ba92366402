"""Sanity floors every comparison table needs: a uniformly random subset and spatial pooling on the token grid.

Axes: N visual tokens (a gh x gw grid in raster order), D width, K kept (= number of windows).

Random: K distinct valid tokens, uniformly at random from an explicit PRNG key (the K largest of N uniform scores,
i.e. a uniformly random K-subset; the order is the score order).

Pooling: the grid is partitioned into exactly K rectangular windows; `pooling_order` returns one representative
token per window and `pooling_merge` the mean of each window's valid tokens. Peers pool with a fixed stride (2 x 2
average pooling, 576 -> 144), which reaches only a few K; the partition below reaches every K <= N and equals
the stride pooling whenever that fits (24 x 24 grid: K = 144 -> 2 x 2 windows, K = 64 -> 3 x 3; K = 32 -> 4 x 8
windows of 6 x 3 tokens).
Choices (static, computed in Python from `grid` and K):
- Pooled grid: ph x pw windows with ph <= gh, pw <= gw, ph * pw <= K; among the grids whose aspect ratio ph / pw is
  within a factor 2 of gh / gw (or, when none is, the least distorted), the one with the most windows, then the
  closest aspect ratio, then fewer rows.
  Window i of a side of length g split into p covers [floor(i g / p), floor((i + 1) g / p)) (sizes differ by <= 1).
- When ph * pw < K (K has no factor pair of a suitable shape, e.g. K = 127 on a 24 x 24 grid: 9 x 14 = 126), the
  largest window is split in two along its longer side (rows on ties; the first half takes floor(len / 2)), the
  earliest such window on ties, until there are K windows. Windows are numbered in raster order of their top-left
  corner.
- Representative of a window: its valid token nearest the window centre (Euclidean, in grid units), ties to the
  lowest index, i.e. the top-left token of the central block for even sizes.
- Padding (valid False) is never a representative and never enters a mean. A window without any valid token takes
  the lowest-index valid token that is not already a representative, and its merged value is that token's own
  features. If an outer jit hides that fewer than K tokens are valid, unused padding positions fill the last slots.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tops_jax import greedy

__all__ = ["random_order", "pooling_order", "pooling_merge", "pooling_windows"]

_ASPECT_TOLERANCE = math.log(2.0)


def random_order(features: jax.Array, relevance: jax.Array | None, valid: jax.Array, key: jax.Array, *,
                 keep: int) -> jax.Array:
  """A uniformly random subset of `keep` valid tokens.

  features: float[N, D] (only its shape is read), valid: bool[N], key: PRNG key (required) -> int32[K].
  """
  del relevance
  if key is None:
    raise ValueError("random: needs an explicit PRNG key (key=jax.random.key(seed))")
  u = jax.random.uniform(key, (features.shape[0],), dtype=jnp.float32)
  return greedy.topk_order(jnp.where(valid, u, -jnp.inf), valid, keep)


def _grid(n: int, grid) -> tuple[int, int]:
  if grid is None:
    side = math.isqrt(n)
    if side * side != n:
      raise ValueError(f"pooling: N={n} tokens is not a perfect square; pass grid=(rows, cols) with rows * cols = N")
    return side, side
  if (not isinstance(grid, tuple) or len(grid) != 2
      or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
    raise ValueError(f"pooling: grid must be a tuple of two positive ints (rows, cols), got {grid!r}")
  if grid[0] * grid[1] != n:
    raise ValueError(f"pooling: grid {grid} holds {grid[0] * grid[1]} tokens, but there are N={n}")
  return grid


def _pooled_shape(gh: int, gw: int, keep: int) -> tuple[int, int]:
  aspect = math.log(gh / gw)

  def cost(shape):
    ph, pw = shape
    err = round(abs(math.log(ph / pw) - aspect), 9)   # rounded: 2 x 3 and 3 x 2 must tie exactly
    return (max(0.0, err - round(_ASPECT_TOLERANCE, 9)), -ph * pw, err, ph)

  shapes = [(ph, pw) for ph in range(1, gh + 1) for pw in range(1, gw + 1) if ph * pw <= keep]
  return min(shapes, key=cost)


@functools.lru_cache(maxsize=256)
def pooling_windows(grid: tuple[int, int], keep: int) -> tuple[tuple[int, int, int, int], ...]:
  """The K windows (row_start, row_stop, col_start, col_stop) partitioning a gh x gw grid, raster order."""
  gh, gw = grid
  if not 1 <= keep <= gh * gw:
    raise ValueError(f"pooling: keep={keep} must lie in [1, {gh * gw}]")
  ph, pw = _pooled_shape(gh, gw, keep)
  rows = [(i * gh) // ph for i in range(ph + 1)]
  cols = [(j * gw) // pw for j in range(pw + 1)]
  windows = [(rows[i], rows[i + 1], cols[j], cols[j + 1]) for i in range(ph) for j in range(pw)]
  while len(windows) < keep:
    area = [(r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in windows]
    w = area.index(max(area))
    r0, r1, c0, c1 = windows[w]
    if r1 - r0 >= c1 - c0:
      mid = r0 + (r1 - r0) // 2
      halves = [(r0, mid, c0, c1), (mid, r1, c0, c1)]
    else:
      mid = c0 + (c1 - c0) // 2
      halves = [(r0, r1, c0, mid), (r0, r1, mid, c1)]
    windows[w:w + 1] = halves
  return tuple(sorted(windows, key=lambda b: (b[0], b[2])))


@functools.lru_cache(maxsize=256)
def _layout(grid: tuple[int, int], keep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(window of each token int32[N], rank of each token by distance to its window centre int32[N],
  token of each rank int32[N])."""
  gh, gw = grid
  window = np.zeros((gh, gw), np.int32)
  dist = np.zeros((gh, gw), np.float64)
  r, c = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  for w, (r0, r1, c0, c1) in enumerate(pooling_windows(grid, keep)):
    window[r0:r1, c0:c1] = w
    cr, cc = (r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2
    dist[r0:r1, c0:c1] = (r[r0:r1, c0:c1] - cr) ** 2 + (c[r0:r1, c0:c1] - cc) ** 2
  by_rank = np.lexsort((np.arange(gh * gw), dist.reshape(-1))).astype(np.int32)
  rank = np.empty_like(by_rank)
  rank[by_rank] = np.arange(gh * gw, dtype=np.int32)
  return window.reshape(-1), rank, by_rank


def _representatives(valid: jax.Array, keep: int, grid) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(int32[K] one token per window, bool[K] window has a valid token, int32[N] window of each token)."""
  n = valid.shape[0]
  window, rank, by_rank = (jnp.asarray(a) for a in _layout(_grid(n, grid), keep))
  best = jax.ops.segment_min(jnp.where(valid, rank, n), window, num_segments=keep)
  filled = best < n
  rep = by_rank[jnp.minimum(best, n - 1)]
  is_rep = jnp.zeros(n, dtype=bool).at[rep].max(filled)
  # Empty windows take unused tokens: valid ones first, then padding, never a representative; lowest index first.
  spare = jnp.argsort(jnp.where(is_rep, 2, jnp.where(valid, 0, 1)), stable=True)[:keep]
  nth_empty = jnp.cumsum(~filled) - 1
  rep = jnp.where(filled, rep, spare[jnp.maximum(nth_empty, 0)])
  return rep.astype(jnp.int32), filled, window


def pooling_order(features: jax.Array, relevance: jax.Array | None, valid: jax.Array, key: jax.Array | None = None,
                  *, keep: int, grid: tuple[int, int] | None = None) -> jax.Array:
  """One representative token per pooling window, windows in raster order.

  features: float[N, D] (only its shape is read), valid: bool[N], keep: static K, grid: static (gh, gw) with
  gh * gw = N (default square) -> int32[K].
  """
  del relevance, key
  rep, _, _ = _representatives(valid, keep, grid)
  return rep


def pooling_merge(features: jax.Array, relevance: jax.Array | None, valid: jax.Array, key: jax.Array | None = None,
                  *, keep: int, grid: tuple[int, int] | None = None) -> tuple[jax.Array, jax.Array]:
  """Window means over valid tokens, aligned with the representatives in ascending order.

  Returns (tokens float[K, D] in the dtype of `features`, indices int32[K] ascending).
  """
  del relevance, key
  rep, filled, window = _representatives(valid, keep, grid)
  x = features.astype(jnp.float32)
  w = valid.astype(jnp.float32)
  sums = jax.ops.segment_sum(x * w[:, None], window, num_segments=keep)
  counts = jax.ops.segment_sum(w, window, num_segments=keep)
  tokens = jnp.where(filled[:, None], sums / jnp.maximum(counts, 1.0)[:, None], x[rep])
  perm = jnp.argsort(rep)
  return tokens[perm].astype(features.dtype), rep[perm]
