"""DivPrune: diversity-based visual token pruning (Alvar et al., CVPR 2025; official code vbdi/divprune).

Axes: N visual tokens, D width, K kept.

Max-min diversity greedy on the cosine distance d = 1 - F of the token features (the projector outputs in the paper,
one global budget over the whole LLaVA-NeXT sequence: the official code (vbdi/divprune @799e2d9,
`LLaVA/llava/model/llava_arch.py`, `DivPrune`) takes every packed image token, newlines included, as candidates and
keeps int(round(r x length)); `models.pruning.method_config("divprune", ...)` runs that layout):

    seed   the token whose nearest other valid token is farthest:   argmax_i min_{j valid, j != i} d[i, j]
    step   argmax over candidates i of min_{k in S} d[i, k]         (the running minimum is updated with one row of d)

Relevance is not used. How the official code seeds: at step 0 it takes, per column of d, the second smallest
entry (`topk(2, largest=False)[1]`) and picks its argmax; every later step picks the argmax of the column-wise
minimum over the kept rows. The second smallest entry of column i is the distance to i's nearest neighbour, since
the smallest is the self-distance 0. Differences here, all deliberate:
- "Nearest neighbour" excludes i by index rather than by rank, so rounding that makes 1 - F[i, i] slightly
  positive cannot let a near-duplicate stand in for the self-distance. With exact duplicates both rules give 0.
- Kept tokens are excluded from the later argmax explicitly. The official code relies on their self-distance 0,
  which can re-select a kept token when every remaining token duplicates a kept one.
- Invalid (padding) tokens are neither candidates nor neighbours. A token with no valid neighbour has
  nearest-neighbour distance +inf, so a lone valid token is the seed.
Ties go to the lowest index (torch.argmax and jnp.argmax both return the first maximum).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tops_jax import greedy
from tops_jax import similarity

__all__ = ["order"]


class _Carry(NamedTuple):
  chosen: jax.Array  # bool[N]
  min_dist: jax.Array  # float32[N], min_{k in S} d[i, k]


def order(features: jax.Array, relevance: jax.Array | None, valid: jax.Array, key=None, *, keep: int) -> jax.Array:
  """DivPrune greedy order for one example.

  Args:
    features: float[N, D] token features.
    relevance: unused (DivPrune is relevance-free); accepted for the common signature.
    valid: bool[N]; invalid tokens are never candidates nor neighbours.
    key: unused (deterministic).
    keep: K.
  Returns:
    int32[K] indices in greedy pick order (seed first).
  """
  del relevance, key
  sim = similarity.cosine_similarity(features)
  n = sim.shape[0]
  no_one = jnp.zeros((n,), bool)

  # One fused pass over F for the seed: the distance of every token to its nearest other valid token.
  neighbour = valid[None, :] & ~jnp.eye(n, dtype=bool)
  nearest = jnp.min(jnp.where(neighbour, 1.0 - sim, jnp.inf), axis=1)
  seed = greedy.pick(nearest, valid, no_one)
  start = _Carry(chosen=no_one.at[seed].set(True), min_dist=1.0 - sim[seed])

  def step(carry: _Carry, _) -> tuple[_Carry, jax.Array]:
    i = greedy.pick(carry.min_dist, valid & ~carry.chosen, carry.chosen)
    # F is symmetric: row i is the column the official code reads.
    return _Carry(chosen=carry.chosen.at[i].set(True), min_dist=jnp.minimum(carry.min_dist, 1.0 - sim[i])), i

  _, rest = jax.lax.scan(step, start, None, length=keep - 1)
  return jnp.concatenate([seed[None], rest]).astype(jnp.int32)
