"""Pairwise similarity between token features, accumulated in float32.

Axes: N visual tokens, D width.

Every greedy selector reads one N x N matrix per pass; it is computed here once, before the greedy loop, with
float32 accumulation whatever the input dtype (bfloat16 features give the same selections up to rounding).
"""

import jax
import jax.numpy as jnp

__all__ = ["l2_normalize", "cosine_similarity", "cosine_distance"]

_EPS = 1e-12


def l2_normalize(features: jax.Array) -> jax.Array:
  """float[..., N, D] -> float32[..., N, D] rows of unit L2 norm (zero rows stay zero).

  Each row is first divided by its largest magnitude, so squaring can neither overflow (features of 1e20) nor
  underflow (features of 1e-30): the result, like the cosine similarity built on it, does not depend on the scale.
  Against the usual PyTorch form (`torch.nn.functional.normalize`: x / max(||x||, eps)): the same values up to
  float32 rounding wherever ||x||^2 is representable in float32; at the extreme scales above that form turns rows
  into 0 or into x / eps and changes the selection, this one does not.
  """
  x = features.astype(jnp.float32)
  peak = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  x = x / jnp.where(peak > 0, peak, 1.0)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, _EPS)


def cosine_similarity(features: jax.Array, other: jax.Array | None = None) -> jax.Array:
  """Cosine similarity. features: float[..., N, D], other: float[..., M, D] (default features) -> float32[..., N, M]."""
  a = l2_normalize(features)
  b = a if other is None else l2_normalize(other)
  return jnp.einsum("...nd,...md->...nm", a, b, preferred_element_type=jnp.float32,
                    precision=jax.lax.Precision.HIGHEST)


def cosine_distance(features: jax.Array) -> jax.Array:
  """1 - cosine similarity: float[..., N, D] -> float32[..., N, N]."""
  return 1.0 - cosine_similarity(features)
