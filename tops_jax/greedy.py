"""Shared pieces of the greedy selection engines.

Axes: N visual tokens, K kept.

Every greedy selector in this package is a `jax.lax.scan` over `keep` steps whose carry holds a boolean `chosen`
mask plus the method's running statistics; a step ends with one `masked_argmax`. `jnp.argmax` returns the first
maximum, so ties go to the lowest index, and NaN gains are treated as -inf so they can never be picked ahead of a
finite one.
"""

import jax
import jax.numpy as jnp

__all__ = ["masked_argmax", "mean_over", "minmax_over", "normalize_over", "pick", "topk_order"]

_TINY = 1e-12


def masked_argmax(gain: jax.Array, blocked: jax.Array) -> jax.Array:
  """Index of the largest `gain` among positions not `blocked`; lowest index wins ties.

  gain: float[N], blocked: bool[N] -> int32[]. When every position is blocked the result is the lowest blocked index
  with the largest gain (callers guarantee at least one free position).
  """
  g = jnp.where(jnp.isnan(gain), -jnp.inf, gain.astype(jnp.float32))
  g = jnp.where(blocked, -jnp.inf, g)
  return jnp.argmax(g).astype(jnp.int32)


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

  score: float[N], valid: bool[N] -> int32[keep]. A stable lexicographic sort keeps index order among equal scores, and invalid
  positions sink below every valid one.
  """
  s = jnp.where(jnp.isnan(score) | ~valid, -jnp.inf, score.astype(jnp.float32))
  # Primary key: valid first; then score descending (invalid positions all tie, so they follow in index order);
  # a stable sort keeps index order among equals.
  order = jnp.lexsort((-s, ~valid))
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
