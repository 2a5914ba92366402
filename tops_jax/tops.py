"""TOPS: Token Optimal Preservation Sets (arXiv 2606.27161, Algorithms 1 and 2).

Axes: N visual tokens, D width, K kept.

One TOPS pass builds the kept set greedily: seed S = {argmax_i r_i}, then at each step the candidate with the best
score_i = r~_i + alpha * div~_i + lam * cov~_i (relevance, semantic diversity 1 - m_i, facility-location coverage
gain; ~: normalised over the candidates, `normalize`) joins S. `criteria` switches criteria off for the ablation;
`engine` is "incremental" (default, coverage carried from step to step, exact TwoSum sums) or "dense".

The algorithm, the choices where the paper is silent, the coverage engines' costs and their exactness:
tops_jax/METHODS.md#tops.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tops_jax import greedy
from tops_jax import similarity

__all__ = ["CRITERIA", "check_criteria", "order", "objective"]

CRITERIA = ("relevance", "diversity", "coverage")


class _Carry(NamedTuple):
  chosen: jax.Array  # bool[N]
  best_sim: jax.Array  # float32[N], m_j = max_{k in S} F[j, k]
  gain: greedy.CoverageGain | None  # coverage gain of every row (incremental engine with coverage, else None)


def check_criteria(criteria) -> tuple[str, ...]:
  """`criteria` as `order` reads it (one name or several) -> a tuple; ValueError unless a non-empty subset of
  `CRITERIA`."""
  if isinstance(criteria, str):
    criteria = (criteria,)
  criteria = tuple(criteria)
  unknown = [c for c in criteria if c not in CRITERIA]
  if unknown or not criteria:
    raise ValueError(f"tops: criteria must be a non-empty subset of {CRITERIA}, got {criteria}")
  return criteria


def order(features: jax.Array, relevance: jax.Array | None, valid: jax.Array, key=None, *, keep: int,
          alpha: float = 0.5, lam: float = 0.5, normalize: str = "mean",
          criteria: tuple[str, ...] = CRITERIA, engine: str = "incremental",
          chunk: int = greedy.COVERAGE_CHUNK) -> jax.Array:
  """One TOPS pass over one example.

  Args:
    features: float[N, D] token features (projector outputs in Stage I, layer hidden states in Stage II).
    relevance: float32[N] task relevance r (required when "relevance" is among `criteria`).
    valid: bool[N]; invalid tokens are never candidates and never counted in the coverage sum.
    key: unused (deterministic).
    keep: K (the paper's budget M).
    alpha: diversity weight. lam: coverage weight (the paper's lambda).
    normalize: "mean" | "minmax" | "none" rescaling of each criterion over the candidates.
    criteria: the criteria in the per-step score.
    engine: "incremental" (coverage gain carried and updated at the changed columns) or "dense" (recomputed from
      all of F every step); the same picks up to float near-ties, see tops_jax/METHODS.md#tops.
    chunk: changed columns read per iteration by the incremental engine.
  Returns:
    int32[K] indices in greedy pick order.
  """
  del key
  criteria = check_criteria(criteria)
  if "relevance" in criteria and relevance is None:
    raise ValueError("tops: the relevance criterion needs a relevance vector (relevance=float[..., N]); "
                     "drop it with criteria=('diversity', 'coverage') for the relevance-free ablation")
  if normalize not in ("mean", "minmax", "none"):
    raise ValueError(f"tops: normalize must be 'mean', 'minmax' or 'none', got {normalize!r}")
  greedy.check_coverage_engine("tops", engine, chunk)
  sim = similarity.cosine_similarity(features)
  n = sim.shape[0]
  use_r, use_d, use_c = (c in criteria for c in CRITERIA)
  carried = use_c and engine == "incremental"

  def score(carry: _Carry) -> jax.Array:
    candidate = valid & ~carry.chosen
    total = jnp.zeros((n,), jnp.float32)
    if use_r:
      total += greedy.normalize_over(relevance, candidate, normalize)
    if use_d:
      total += alpha * greedy.normalize_over(1.0 - carry.best_sim, candidate, normalize)
    if use_c:
      # Rows are candidates i, columns the tokens j still to be covered.
      gain = carry.gain.hi if carried else greedy.coverage_gain(sim, carry.best_sim, candidate)
      total += lam * greedy.normalize_over(gain, candidate, normalize)
    return total

  def add(carry: _Carry, i: jax.Array) -> _Carry:
    chosen = carry.chosen.at[i].set(True)
    best_sim = jnp.maximum(carry.best_sim, sim[i])
    gain = None
    if carried:
      # Column i leaves U (its whole contribution goes) and the columns whose m rose are re-counted.
      gain = greedy.update_coverage_gain(sim, carry.gain, carry.best_sim, best_sim, valid & ~carry.chosen,
                                         valid & ~chosen, chunk=chunk)
    return _Carry(chosen=chosen, best_sim=best_sim, gain=gain)

  def started(chosen: jax.Array, best_sim: jax.Array) -> _Carry:
    gain = greedy.start_coverage_gain(sim, best_sim, valid & ~chosen, chunk=chunk) if carried else None
    return _Carry(chosen=chosen, best_sim=best_sim, gain=gain)

  none_chosen = jnp.zeros((n,), bool)
  if relevance is not None:
    seed = greedy.pick(relevance, valid, none_chosen)
  else:
    seed = greedy.pick(score(started(none_chosen, jnp.zeros((n,), jnp.float32))), valid, none_chosen)
  # F is symmetric, so the row sim[i] is the column F[:, i] the paper's update reads.
  start = started(none_chosen.at[seed].set(True), sim[seed])

  def step(carry: _Carry, _) -> tuple[_Carry, jax.Array]:
    i = greedy.pick(score(carry), valid & ~carry.chosen, carry.chosen)
    return add(carry, i), i

  _, rest = jax.lax.scan(step, start, None, length=keep - 1)
  return jnp.concatenate([seed[None], rest]).astype(jnp.int32)


def objective(features: jax.Array, relevance: jax.Array, selected: jax.Array, *, alpha: float = 0.5,
              lam: float = 0.5, valid: jax.Array | None = None) -> jax.Array:
  """A set function whose greedy marginal gains are the unnormalised TOPS criteria, for brute-force comparisons.

  J(S) = sum_{i in S} r_i + alpha * sum_{i in S} (1 - max_{k in S, k != i} F[i, k]) + lam * sum_{j valid} max(0,
  max_{k in S} F[j, k]). The coverage term is facility location (monotone submodular); the diversity term scores each
  kept token by its distance to its nearest kept neighbour. TOPS greedy (normalize="none") is a heuristic for it.

  features: float[N, D], relevance: float[N], selected: bool[N] -> float32[].
  """
  sim = similarity.cosine_similarity(features)
  n = sim.shape[0]
  valid = jnp.ones((n,), bool) if valid is None else valid
  rel = jnp.sum(jnp.where(selected, relevance, 0.0))
  others = jnp.where(selected[None, :] & ~jnp.eye(n, dtype=bool), sim, -jnp.inf)
  nearest = jnp.max(others, axis=1)
  nearest = jnp.where(jnp.isfinite(nearest), nearest, 0.0)  # a lone token has no neighbour: distance 1
  div = jnp.sum(jnp.where(selected, 1.0 - nearest, 0.0))
  cover = jnp.max(jnp.where(selected[None, :], sim, 0.0), axis=1)
  cov = jnp.sum(jnp.where(valid, jnp.maximum(cover, 0.0), 0.0))
  return rel + alpha * div + lam * cov
