"""CDPruner: conditional-diversity token pruning via a DPP (Zhang et al. 2025, arXiv 2506.10967; official code
Theia-4869/CDPruner).

Axes: N visual tokens, D width, K kept.

Kernel L = diag(r) F diag(r), with F the cosine similarity of the token features and r the relevance rescaled over
the valid tokens as the official code does; the kept set is the greedy MAP of the DPP (incremental Cholesky rows,
Chen, Zhang and Zhou, NeurIPS 2018). Pass `relevance` already oriented so larger = more relevant.

The kernel and the greedy step, the relevance orientation and the choices where the paper and code are silent
(`theta`, `eps`, constant relevance, per-example rescaling): tops_jax/METHODS.md#cdpruner.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tops_jax import greedy
from tops_jax import relevance as relevance_lib
from tops_jax import similarity

__all__ = ["order", "kernel_relevance"]



class _Carry(NamedTuple):
  chosen: jax.Array  # bool[N]
  rows: jax.Array  # float32[K, N], Cholesky rows; rows not yet built are zero
  d2: jax.Array  # float32[N], residual variances


def kernel_relevance(relevance: jax.Array, valid: jax.Array, theta: float | None = None, *,
                     rescale: bool = True) -> jax.Array:
  """The per-token factor r of the kernel diag(r) F diag(r): float32[N] relevance, bool[N] -> float32[N].

  Min-max rescaled over the valid tokens with the official 1e-6 offset (`relevance.cdpruner_rescale`; rescale=False:
  taken as given, already rescaled over a larger set), optionally sharpened by exp(theta / (2 (1 - theta)) r); 0 at
  invalid positions.
  """
  r = relevance_lib.cdpruner_rescale(relevance, valid) if rescale else relevance.astype(jnp.float32)
  if theta is not None:
    r = jnp.exp(theta / (2.0 * (1.0 - theta)) * r)
  return jnp.where(valid, r, 0.0)


def order(features: jax.Array, relevance: jax.Array, valid: jax.Array, key=None, *, keep: int,
          theta: float | None = None, eps: float = 1e-5, rescale: bool = True) -> jax.Array:
  """CDPruner greedy DPP MAP order for one example.

  Args:
    features: float[N, D] token features.
    relevance: float32[N], larger = more relevant (see tops_jax/METHODS.md#cdpruner for the official negation).
    valid: bool[N]; invalid tokens are never candidates.
    key: unused (deterministic).
    keep: K.
    theta: None (released code) or the trade-off in (0, 1) of the optional exponential relevance sharpening.
    eps: once every candidate has d2 <= eps the rest are taken in index order.
    rescale: min-max rescale `relevance` over the valid tokens (the official code, which rescales over everything it
      is given at once); False when the caller has rescaled it over a larger set already, e.g. all crops of a
      LLaVA-NeXT image before selecting per crop (`kernel_relevance` over the image).
  Returns:
    int32[K] indices in greedy pick order.
  """
  del key
  if relevance is None:
    raise ValueError("cdpruner: the DPP kernel needs a relevance vector (relevance=float[..., N], larger = more "
                     "relevant; the official code uses the negated mean CLIP image-text similarity)")
  r = kernel_relevance(relevance, valid, theta, rescale=rescale)
  kernel = r[:, None] * similarity.cosine_similarity(features) * r[None, :]
  n = kernel.shape[0]

  def step(carry: _Carry, t: jax.Array) -> tuple[_Carry, jax.Array]:
    candidate = valid & ~carry.chosen
    best = greedy.pick(carry.d2, candidate, carry.chosen)
    informative = candidate[best] & (carry.d2[best] > eps)  # False for NaN too
    fallback = greedy.pick(jnp.zeros((n,), jnp.float32), candidate, carry.chosen)
    j = jnp.where(informative, best, fallback)
    proj = jnp.einsum("k,kn->n", carry.rows[:, j], carry.rows, precision=jax.lax.Precision.HIGHEST)
    e = (kernel[j] - proj) / jnp.sqrt(jnp.where(informative, carry.d2[j], 1.0))
    e = jnp.where(informative, e, 0.0)  # a fallback pick leaves the Cholesky state as it is
    new = _Carry(chosen=carry.chosen.at[j].set(True), rows=carry.rows.at[t].set(e), d2=carry.d2 - e * e)
    return new, j

  start = _Carry(chosen=jnp.zeros((n,), bool), rows=jnp.zeros((keep, n), jnp.float32), d2=jnp.diagonal(kernel))
  _, picks = jax.lax.scan(step, start, jnp.arange(keep))
  return picks.astype(jnp.int32)
