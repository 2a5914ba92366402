"""Shared pieces of the greedy selection engines.

Axes: N visual tokens, K kept.

Every greedy selector in this package is a `jax.lax.scan` over `keep` steps whose carry holds a boolean `chosen`
mask plus the method's running statistics; a step ends with one `masked_argmax`. `jnp.argmax` returns the first
maximum, so ties go to the lowest index, and non-finite gains rank below every finite one. `complete_order` is the
last line of defence of the public API: whatever the values, an order of `keep` distinct indices, valid ones first.
Deviation from the official PyTorch loops, which have no such rule: there a NaN gain reaches `torch.argmax`, which
returns the NaN's index (and one NaN token poisons every gain), so a step can re-pick a kept token. On finite inputs
both pick the same tokens.

The facility-location coverage gain of TOPS and SCOPE has a dense form (`coverage_gain`: all of F, float32[N, N], per
step) and an incremental one (`start_coverage_gain`, `update_coverage_gain`: only the columns a step changed, the
exact sum rounded once), see the section below.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["COVERAGE_CHUNK", "COVERAGE_ENGINES", "CoverageGain", "check_coverage_engine", "complete_order",
           "coverage_gain", "masked_argmax", "mean_over", "minmax_over", "normalize_over", "pick",
           "start_coverage_gain", "topk_order", "update_coverage_gain"]

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
  n, keep = ok.shape[0], order.shape[0]
  slot = jnp.arange(keep)
  first = jnp.full((n,), keep, jnp.int32).at[order].min(slot.astype(jnp.int32))
  good = ok[order] & (first[order] == slot)
  kept = order[jnp.argsort(~good, stable=True)]
  n_good = jnp.sum(good)
  picked = jnp.zeros((n,), jnp.int32).at[order].max(good.astype(jnp.int32)) > 0
  tier = jnp.where(picked, 3, jnp.where(ok, 0, jnp.where(valid, 1, 2)))
  fill = jnp.argsort(tier, stable=True)
  return jnp.where(slot < n_good, kept, fill[jnp.clip(slot - n_good, 0, n - 1)]).astype(jnp.int32)


# --- Facility-location coverage gain, dense and incremental ----------------------------------------------------------
#
# gain_i = sum_j counted_j * max(0, F[i, j] - floor_j) over an N x N similarity F (TOPS: floor = m, counted = the
# candidates; SCOPE: floor = m, counted = the valid tokens). The dense form reads all of F. The incremental form
# carries the gain as an unevaluated float32 pair (hi, lo) and, after a greedy step changed `floor` or `counted` at a
# few columns, swaps only those columns' terms, read as rows of F (F symmetric). Every change is accumulated with
# error-free transformations (TwoSum), so hi + lo is the sum of the very float32 terms the dense form adds, to
# O(eps^2) of the magnitudes summed, and `hi` (renormalised) is that sum rounded once, independent of the chunking
# and of the history. The dense float32 reduction rounds along its way, so the two agree to its rounding error.


COVERAGE_ENGINES = ("incremental", "dense")
COVERAGE_CHUNK = 16


def check_coverage_engine(method: str, engine: str, chunk: int):
  """Raises on an unknown coverage engine or a `chunk` that is not a positive int."""
  if engine not in COVERAGE_ENGINES:
    raise ValueError(f"{method}: engine must be one of {COVERAGE_ENGINES}, got {engine!r}")
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"{method}: chunk must be a positive int, got {chunk!r}")


class CoverageGain(NamedTuple):
  """gain = hi + lo, with |lo| <= ulp(hi) / 2 after every update, so `hi` is the gain rounded to float32."""
  hi: jax.Array  # float32[N]
  lo: jax.Array  # float32[N]


def coverage_gain(sim: jax.Array, floor: jax.Array, counted: jax.Array) -> jax.Array:
  """Dense facility-location gain: float32[N, N] F, float32[N] floor, bool[N] counted -> float32[N].

  One fused subtract-clamp-mask-sum over the rows of F; no N x N temporary.
  """
  return jnp.sum(jnp.where(counted[None, :], jnp.maximum(sim - floor[None, :], 0.0), 0.0), axis=1)


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Knuth's TwoSum: s = fl(a + b) and e with s + e = a + b exactly (round-to-nearest, no reassociation)."""
  s = a + b
  b_virtual = s - a
  e = (a - (s - b_virtual)) + (b - b_virtual)
  return s, e


def _two_sum_pairs(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Reducer over (sum, error) pairs: error-free in any order, so XLA may associate the reduction as it likes."""
  s, e = _two_sum(a[0], b[0])
  return s, (a[1] + b[1]) + e


def _compensated_sum(terms: jax.Array, errors: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(float32[C, N] terms, their float32[C, N] errors) -> (s, e) float32[N], s + e = the column sums to O(eps^2).

  Reduces groups of 4 rows at a time: XLA's CPU emitter vectorises a variadic reduction over 4 rows along N but not
  one over 8 or more (several times slower per element).
  """
  zero = jnp.float32(0)
  while terms.shape[0] > 1:
    pad = -terms.shape[0] % 4
    terms, errors = (jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, 4, x.shape[1]) for x in (terms, errors))
    terms, errors = jax.lax.reduce((terms, errors), (zero, zero), _two_sum_pairs, (1,))
  return terms[0], errors[0]


def _running_count(mask: jax.Array) -> jax.Array:
  """Inclusive running count of a bool[N] mask -> int32[N].

  Written as two small triangular matmuls over blocks of 64 (exact: 0/1 products summed in float32 stay integers far
  below 2^24) because XLA's CPU cumsum of a few thousand elements costs several times more, once per greedy step.
  """
  n = mask.shape[0]
  width = 64
  blocks = -(-n // width)
  x = jnp.pad(mask.astype(jnp.float32), (0, blocks * width - n)).reshape(blocks, width)
  within = jnp.dot(x, jnp.triu(jnp.ones((width, width), jnp.float32)), precision=jax.lax.Precision.HIGHEST)
  before = jnp.dot(jnp.triu(jnp.ones((blocks, blocks), jnp.float32), 1).T, within[:, -1],
                   precision=jax.lax.Precision.HIGHEST)
  return (within + before[:, None]).reshape(-1)[:n].astype(jnp.int32)


def start_coverage_gain(sim: jax.Array, floor: jax.Array, counted: jax.Array, *, chunk: int) -> CoverageGain:
  """The incremental gain's starting point: every counted column added, `chunk` at a time, with the same TwoSum
  accumulation as the updates (a dense float32 start would carry its rounding, O(eps * gain), into every later step,
  where the gains are orders of magnitude smaller)."""
  zeros = jnp.zeros(floor.shape, jnp.float32)
  return update_coverage_gain(sim, CoverageGain(hi=zeros, lo=zeros), floor, floor, jnp.zeros_like(counted), counted,
                              chunk=chunk)


def update_coverage_gain(sim: jax.Array, gain: CoverageGain, floor_old: jax.Array, floor_new: jax.Array,
                         counted_old: jax.Array, counted_new: jax.Array, *, chunk: int) -> CoverageGain:
  """The gain after `floor` and `counted` changed, reading only the columns that changed.

  sim: float32[N, N] symmetric F; gain: the gain for (floor_old, counted_old); floor_*: float32[N]; counted_*:
  bool[N] -> the gain for (floor_new, counted_new). A column j is touched when it is counted before or after and its
  floor or its counted flag changed; each touched column's contribution is swapped, old out and new in. The touched
  columns are visited `chunk` at a time (rows F[cols], float32[chunk, N]) in a `lax.while_loop`, so a step costs
  O(N * chunk * ceil(touched / chunk)) instead of O(N^2); under `vmap` the loop runs the batch's largest count.
  Chunk k finds its columns by binary search in the running count of the touched mask (no per-step compaction).
  """
  n = sim.shape[0]
  touched = (counted_old | counted_new) & ((floor_new != floor_old) | (counted_new != counted_old))
  running = _running_count(touched)
  count = running[-1]
  lane = jnp.arange(chunk, dtype=jnp.int32)

  def contribution(rows, cols, live, floor, counted):
    summed = live & counted[cols]
    return jnp.where(summed[:, None], jnp.maximum(rows - floor[cols][:, None], 0.0), 0.0)

  def body(state):
    k, acc, err = state
    rank = k * chunk + lane
    live = rank < count
    # The column holding touched rank r is the first one whose running count reaches r + 1.
    cols = jnp.minimum(jnp.searchsorted(running, rank + 1), n - 1).astype(jnp.int32)
    rows = sim[cols]  # F[c, i] = F[i, c]: the touched columns, read as contiguous rows
    new = contribution(rows, cols, live, floor_new, counted_new)
    old = contribution(rows, cols, live, floor_old, counted_old)
    diff, e_diff = _two_sum(new, -old)
    part, e_part = _compensated_sum(diff, e_diff)
    acc, e_acc = _two_sum(acc, part)
    err = err + (e_part + e_acc)
    return k + 1, acc, err

  zeros = jnp.zeros((n,), jnp.float32)
  _, acc, err = jax.lax.while_loop(lambda s: s[0] * chunk < count, body, (jnp.int32(0), zeros, zeros))
  hi, e = _two_sum(gain.hi, acc)
  lo = gain.lo + (e + err)
  hi, lo = _two_sum(hi, lo)  # renormalise: |lo| <= ulp(hi) / 2, so hi is the rounded gain
  return CoverageGain(hi=hi, lo=lo)
