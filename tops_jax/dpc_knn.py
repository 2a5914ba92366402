"""DPC-KNN clustering and mean merge of tokens, as SparseVLM's `cluster_and_merge` computes it (one row).

Axes: M tokens (a static bound; `valid` marks the real ones), D width, C clusters (static bound).

Source: Gumpest/SparseVLMs, llava/model/language_model/utils.py `cluster_and_merge` (read at commit 91fb6d9,
"init sparsevlm"; identical in every version, v1.5 at 535f8ba included). With k = the number of clusters:
- d(i, j) = ||x_i - x_j||_2 / sqrt(D);
- density_i = exp(-mean of d^2 over the k nearest tokens, self included), plus torch.rand * 1e-6 noise;
- delta_i = min d(i, j) over the j of strictly higher density, or the largest d of the matrix when there is none;
- centers = top-k tokens by delta * density (best first); every token joins its nearest center (`argmin`, first
  center on ties), and each center is then assigned to its own cluster;
- merged token of a cluster = sum of its members * 1 / (member count + 1e-6), clusters in center order.
The caller (`tops_jax.sparsevlm`) maps `cluster_row` over batched rows, checks the arguments and draws the noise.

Deviations (the official code runs float16 on CUDA, batch size 1, every token real):
- Padding: invalid tokens are never neighbours, centers or members; the number of clusters is cut to the valid
  tokens and to `max_clusters`; invalid cluster slots hold zeros.
- Arithmetic in float32 (the merge eps 1e-6 vanishes in float16 and is kept here). Distances use the Gram form
  (||a||^2 + ||b||^2 - 2 a.b, clamped at 0, diagonal exactly 0, vectors shifted by one valid token first) instead of
  the official M x M x D difference tensor, which does not fit in memory for thousands of tokens; the two agree to
  float32 rounding.
- Ties: torch.topk leaves the order of equal scores unspecified; here equal scores go to the lowest index.
- Noise: `noise` is added to the density as given (None adds nothing: equal densities then stay equal and neither
  is the other's higher-density neighbour).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tops_jax import greedy

__all__ = ["MERGE_EPS", "Clusters", "distances", "cluster_row"]

MERGE_EPS = 1e-6         # merged = sum(members) / (count + 1e-6)
_HIGHEST = jax.lax.Precision.HIGHEST


class Clusters(NamedTuple):
  """DPC-KNN output over M tokens: C cluster slots, valid ones first, in the official center order."""
  tokens: jax.Array      # float[..., C, D] merged tokens (zeros in invalid slots)
  valid: jax.Array       # bool[..., C]
  centers: jax.Array     # int32[..., C] index (into M) of each cluster's center; M in invalid slots
  assignment: jax.Array  # int32[..., M] cluster slot of each token; -1 for invalid tokens


def distances(x: jax.Array, valid: jax.Array) -> jax.Array:
  """||x_i - x_j|| / sqrt(D) from Gram products: float32[M, D], bool[M] -> float32[M, M], diagonal exactly 0.

  The vectors are first shifted by one valid token (distances do not change): hidden states share large offsets
  (a few massive channels), which the Gram form would otherwise cancel badly. Small-integer inputs stay exact.
  """
  m, d = x.shape
  origin = x[jnp.argmax(valid)]
  xc = jnp.where(valid[:, None], x - origin, 0.0)
  gram = jnp.matmul(xc, xc.T, precision=_HIGHEST)
  sq = jnp.diagonal(gram)
  dist = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)) / np.sqrt(d)
  return jnp.where(jnp.eye(m, dtype=bool), 0.0, dist)


def cluster_row(x: jax.Array, num_clusters: jax.Array, valid: jax.Array | None, noise: jax.Array | None, *,
                max_clusters: int) -> Clusters:
  """`cluster_and_merge` on one row: x float[M, D], num_clusters int32[] (cut to the valid tokens and to the static
  max_clusters C <= M), valid bool[M] or None (all valid), noise float[M] or None -> `Clusters` of C slots."""
  m_max = x.shape[0]
  valid = jnp.ones((m_max,), bool) if valid is None else valid
  xf = x.astype(jnp.float32)
  k = jnp.clip(num_clusters, 0, jnp.minimum(jnp.sum(valid), max_clusters))
  dist = distances(xf, valid)
  # Local density: mean squared distance to the k nearest valid tokens (self included at distance 0).
  nearest = jnp.sort(jnp.where(valid[None, :], dist, jnp.inf), axis=-1)
  take = jnp.arange(m_max)[None, :] < k
  density = jnp.exp(-jnp.sum(jnp.where(take, nearest * nearest, 0.0), axis=-1) / jnp.maximum(k, 1))
  if noise is not None:
    density = density + noise
  # Distance to the nearest token of higher density; the largest distance when none is denser.
  pair = valid[:, None] & valid[None, :]
  dist_max = jnp.max(jnp.where(pair, dist, -jnp.inf))
  dist_max = jnp.where(jnp.isfinite(dist_max), dist_max, 0.0)
  denser = valid[None, :] & (density[None, :] > density[:, None])
  delta = jnp.min(jnp.where(denser, dist, dist_max), axis=-1)
  score = delta * density
  centers = greedy.topk_order(jnp.where(valid, score, -jnp.inf), valid, max_clusters)
  center_ok = jnp.arange(max_clusters) < k
  to_center = jnp.where(center_ok[:, None], dist[centers], jnp.inf)          # [C, M]
  assign = jnp.argmin(to_center, axis=0).astype(jnp.int32)                  # first nearest center
  slots = jnp.arange(max_clusters, dtype=jnp.int32)
  assign = assign.at[centers].set(jnp.where(center_ok, slots, assign[centers]))
  assign = jnp.where(valid & (k > 0), assign, -1)
  onehot = (assign[:, None] == slots[None, :]).astype(jnp.float32)          # [M, C]
  weight = 1.0 / (jnp.sum(onehot, axis=0) + MERGE_EPS)
  tokens = jnp.einsum("mc,md->cd", onehot * weight[None, :], xf, precision=_HIGHEST)
  tokens = jnp.where(center_ok[:, None], tokens, 0.0).astype(x.dtype)
  return Clusters(tokens, center_ok, jnp.where(center_ok, centers, m_max).astype(jnp.int32), assign)
