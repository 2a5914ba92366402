"""Shared pieces of the greedy selection engines.

Axes: N visual tokens, K kept.

Every greedy selector in this package is a `jax.lax.scan` over `keep` steps whose carry holds a boolean `chosen`
mask plus the method's running statistics; a step ends with one `masked_argmax`. `jnp.argmax` returns the first
maximum, so ties go to the lowest index, and non-finite gains rank below every finite one. `complete_order` is the
last line of defence of the public API: whatever the values, an order of `keep` distinct indices, valid ones first.
Deviation from the official PyTorch loops, which have no such rule: there a NaN gain reaches `torch.argmax`, which
returns the NaN's index (and one NaN token poisons every gain), so a step can re-pick a kept token. On finite inputs
both pick the same tokens.
"""

import jax
import jax.numpy as jnp

__all__ = ["complete_order", "masked_argmax", "mean_over", "minmax_over", "normalize_over", "pick", "topk_order"]

_TINY = 1e-12


def masked_argmax(gain: jax.Array, blocked: jax.Array) -> jax.Array:
  """Index of the largest finite `gain` among positions not `blocked`; lowest index wins ties.

  gain: float[N], blocked: bool[N] -> int32[]. Non-finite gains (NaN, +-inf) rank below every finite one: when no
  free position has a finite gain the lowest free index is returned, so a NaN anywhere (a poisoned similarity row,
  a NaN hyperparameter under jit) can never send the pick to a blocked position. When every position is blocked
  the result is 0 (callers guarantee at least one free position, or handle that case as `pick` does).
  """
  g = gain.astype(jnp.float32)
  free = ~blocked
  finite = free & jnp.isfinite(g)
  best = jnp.argmax(jnp.where(finite, g, -jnp.inf))
  return jnp.where(jnp.any(finite), best, jnp.argmax(free)).astype(jnp.int32)


def mean_over(x: jax.Array, where: jax.Array) -> jax.Array:
  """Mean of float[N] over the positions in bool[N] `where` (0 when empty)."""
  count = jnp.sum(where)
  return jnp.sum(jnp.where(where, x, 0.0)) / jnp.maximum(count, 1)


def minmax_over(x: jax.Array, where: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(min, max) of float[N] over the positions in bool[N] `where`."""
  lo = jnp.min(jnp.where(where, x, jnp.inf))
  hi = jnp.max(jnp.where(where, x, -jnp.inf))
  return lo, hi


def normalize_over(x: jax.Array, where: jax.Array, how: str) -> jax.Array:
  """Rescales a criterion over the candidate set so criteria of different units can be added.

  how="mean": x / mean(x over candidates); a zero or negative mean leaves x unscaled (a criterion that is zero
  everywhere contributes nothing instead of dividing by zero).
  how="minmax": (x - min) / (max - min) over candidates; a constant criterion becomes 0.
  how="none": x unchanged.
  """
  if how == "mean":
    mean = mean_over(x, where)
    return jnp.where(mean > _TINY, x / jnp.where(mean > _TINY, mean, 1.0), x)
  if how == "minmax":
    lo, hi = minmax_over(x, where)
    span = hi - lo
    return jnp.where(span > _TINY, (x - lo) / jnp.where(span > _TINY, span, 1.0), 0.0)
  if how == "none":
    return x
  raise ValueError(f"normalize must be 'mean', 'minmax' or 'none', got {how!r}")


def topk_order(score: jax.Array, valid: jax.Array, keep: int) -> jax.Array:
  """Indices of the `keep` highest scores among valid positions, best first; ties to the lowest index.

  score: float[N], valid: bool[N] -> int32[keep]. Valid positions with a finite score come first (score
  descending), then valid positions with a non-finite score, then invalid ones, each group in index order (a
  stable lexicographic sort).
  """
  s = score.astype(jnp.float32)
  finite = jnp.isfinite(s)
  tier = jnp.where(valid, jnp.where(finite, 0, 1), 2)
  order = jnp.lexsort((-jnp.where(finite & valid, s, 0.0), tier))
  return order[:keep].astype(jnp.int32)


def pick(gain: jax.Array, candidate: jax.Array, chosen: jax.Array) -> jax.Array:
  """One greedy pick: argmax of `gain` over `candidate` positions (ties -> lowest index).

  gain: float[N], candidate: bool[N] (valid and not yet chosen), chosen: bool[N] -> int32[].
  When no candidate is left (more picks than valid tokens, possible only under an outer jit where the count cannot be
  checked) the lowest-index position not yet chosen is returned, so the output never repeats an index.
  """
  best = masked_argmax(gain, ~candidate)
  first_free = jnp.argmax(~chosen).astype(jnp.int32)
  return jnp.where(jnp.any(candidate), best, first_free)


def complete_order(order: jax.Array, ok: jax.Array, valid: jax.Array) -> jax.Array:
  """Repairs a selection order so it holds `K` distinct indices, usable tokens first, whatever the input values.

  order: int32[K] a method's order, ok: bool[N] tokens the method may pick (valid, with finite inputs), valid:
  bool[N] -> int32[K]. The first occurrence of each `ok` index keeps its place in the order; the remaining slots
  take, in index order, `ok` tokens not yet picked, then valid tokens that are not `ok` (non-finite features or
  relevance), then invalid positions. For an order of distinct `ok` indices (every method here, whenever at least
  K tokens are ok) this is the identity.
  """
  n, k = ok.shape[0], order.shape[0]
  slot = jnp.arange(k)
  first = jnp.full((n,), k, jnp.int32).at[order].min(slot.astype(jnp.int32))
  good = ok[order] & (first[order] == slot)
  kept = order[jnp.argsort(~good, stable=True)]
  n_good = jnp.sum(good)
  picked = jnp.zeros((n,), jnp.int32).at[order].max(good.astype(jnp.int32)) > 0
  tier = jnp.where(picked, 3, jnp.where(ok, 0, jnp.where(valid, 1, 2)))
  fill = jnp.argsort(tier, stable=True)
  return jnp.where(slot < n_good, kept, fill[jnp.clip(slot - n_good, 0, n - 1)]).astype(jnp.int32)
