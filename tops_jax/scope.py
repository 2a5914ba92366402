"""SCOPE: saliency-coverage oriented token pruning (Deng et al., NeurIPS 2025, arXiv 2510.24214; official code
kinredon/SCOPE).

Axes: N visual tokens, D width, K kept.

With F the cosine similarity of the token features (CLIP layer -2 patch features in the paper) and
m_j = max_{k in S} F[j, k] the coverage of token j by the kept set S (m = 0 before the first pick, as in the
official code, so negative similarities never count):

    gain_i  = sum_{j valid} max(0, F[i, j] - m_j)        facility-location coverage gain
    score_i = saliency_i ** alpha * gain_i               saliency = relevance (CLS attention of layer -2)
    S += argmax over candidates of score;  m = max(m, F[pick])

Facts from the official code: `alpha` defaults to 1.0 (the `ALPHA` environment variable, set to 1.0 in the released
run scripts); the saliency is the CLS-to-patch attention summed over heads (a constant factor here, since
the score is a product); an additive variant score = gain + saliency ** alpha exists behind `COMBINED=add`
(`combine="add"` here); the coverage sum runs over every token, kept ones included. Kept tokens contribute
max(0, F[i, j] - m_j) = 0 up to rounding because m_j >= F[j, j] = 1, so summing over all valid tokens is the
official rule, with padding excluded.

On LLaVA-NeXT the official code (kinredon/SCOPE @6bf7306, `scope/clip_encoder.py`, `scope/llava_arch.py`) selects
int(T / crops) per crop over the padded crop (base crop counted) and hands the picks to the LLM on the padded canvas,
without unpadding or newlines: `models.pruning.method_config("scope", ...)` runs that layout.

Choices where the paper is silent: negative relevance is clamped to 0 before the power, so a fractional alpha
cannot produce NaN; invalid tokens are neither candidates nor counted in the coverage sum; ties go to the lowest
index.

Coverage engines (`engine`), as in `tops` (whose docstring has the details and the numbers):
- "dense": each step recomputes the gain of every row, one fused subtract-clamp-mask-sum over F: O(K N^2).
- "incremental" (default): the gain is carried; a pick changes only the columns j where m_j rose (here the counted
  set never changes, kept tokens stay in the sum), and those are swapped old term out, new term in, `chunk` columns
  at a time: O(N * changed columns). The first step from m = 0 changes every column with F[j, pick] > 0 (about half
  on Gaussian features), then 13-15 per step on average at N=2880, K=1280.
- Exactness: the incremental gain is the exact sum of the dense engine's float32 terms rounded once (error-free
  TwoSum accumulation), the dense one a float32 reduction of them; the picks agree except at near-ties within the
  dense sum's rounding, from where the orders part (tests/tops_jax/test_incremental_coverage.py).
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
      all of F every step); the same picks up to float near-ties, see the module docstring.
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
