"""SCOPE: saliency-coverage oriented token pruning (Deng et al., NeurIPS 2025, arXiv 2510.24214; official code
kinredon/SCOPE).

Axes: N visual tokens, D width, K kept.

Greedy: score_i = saliency_i ** alpha * gain_i (facility-location coverage gain of token i over the valid tokens,
saliency = relevance), S += argmax score. `combine="add"` is the official additive variant; `engine` is
"incremental" (default) or "dense", as in `tops`.

Official code: kinredon/SCOPE @6bf7306, scope/clip_encoder.py, scope/llava_arch.py. The score, the facts from the
official code, its LLaVA-NeXT layout, the choices where the paper is silent and the coverage engines:
tops_jax/METHODS.md#scope.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tops_jax import greedy
from tops_jax import similarity

__all__ = ["order"]

_COMBINE = ("multiply", "add")


class _Carry(NamedTuple):
  chosen: jax.Array  # bool[N]
  cover: jax.Array  # float32[N], m_j = max(0, max_{k in S} F[j, k])
  gain: greedy.CoverageGain | None  # coverage gain of every row (incremental engine), else None


def order(features: jax.Array, relevance: jax.Array, valid: jax.Array, key=None, *, keep: int, alpha: float = 1.0,
          combine: str = "multiply", engine: str = "incremental", chunk: int = greedy.COVERAGE_CHUNK) -> jax.Array:
  """SCOPE greedy order for one example.

  Args:
    features: float[N, D] token features.
    relevance: float32[N] saliency (CLS attention); negative values count as 0.
    valid: bool[N]; invalid tokens are never candidates and never counted in the coverage gain.
    key: unused (deterministic).
    keep: K.
    alpha: saliency exponent (official default 1.0).
    combine: "multiply" (the paper's SCOPE score) or "add" (the official code's additive variant).
    engine: "incremental" (coverage gain carried and updated at the changed columns) or "dense" (recomputed from
      all of F every step); the same picks up to float near-ties, see tops_jax/METHODS.md#scope.
    chunk: changed columns read per iteration by the incremental engine.
  Returns:
    int32[K] indices in greedy pick order.
  """
  del key
  if relevance is None:
    raise ValueError("scope: the SCOPE score needs a saliency vector (relevance=float[..., N], CLS attention)")
  if combine not in _COMBINE:
    raise ValueError(f"scope: combine must be one of {_COMBINE}, got {combine!r}")
  greedy.check_coverage_engine("scope", engine, chunk)
  sim = similarity.cosine_similarity(features)
  n = sim.shape[0]
  saliency = jnp.maximum(relevance.astype(jnp.float32), 0.0) ** alpha
  carried = engine == "incremental"

  def step(carry: _Carry, _) -> tuple[_Carry, jax.Array]:
    # Rows are candidates i, columns the valid tokens j to cover.
    gain = carry.gain.hi if carried else greedy.coverage_gain(sim, carry.cover, valid)
    score = gain * saliency if combine == "multiply" else gain + saliency
    i = greedy.pick(score, valid & ~carry.chosen, carry.chosen)
    cover = jnp.maximum(carry.cover, sim[i])
    new_gain = greedy.update_coverage_gain(sim, carry.gain, carry.cover, cover, valid, valid,
                                           chunk=chunk) if carried else None
    return _Carry(chosen=carry.chosen.at[i].set(True), cover=cover, gain=new_gain), i

  cover = jnp.zeros((n,), jnp.float32)
  start = _Carry(chosen=jnp.zeros((n,), bool), cover=cover,
                 gain=greedy.start_coverage_gain(sim, cover, valid, chunk=chunk) if carried else None)
  _, picks = jax.lax.scan(step, start, None, length=keep)
  return picks.astype(jnp.int32)
