"""FastV: keep the visual tokens the last token attends to most.

Axes: N visual tokens, D width, K kept.

Source: FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024) and its official code. At LLM
layer l (FastV's K, default 2) the visual tokens are ranked by the attention that the last token pays them in layer
l - 1, mean over heads, and the top ones are kept; kept tokens keep their original position ids (the model hook's
job). The signal is `tops_jax.relevance.last_token_attention`; this module only ranks it.

Choices: ties go to the lowest index (the official `torch.topk` leaves them unspecified). Padding is never kept;
if an outer jit hides that fewer than K tokens are valid, the last slots hold the lowest-index padding positions.
"""

import jax
import jax.numpy as jnp

from tops_jax import greedy

__all__ = ["order"]


def order(features: jax.Array, relevance: jax.Array, valid: jax.Array, key: jax.Array | None = None, *,
          keep: int) -> jax.Array:
  """Top-`keep` valid tokens by last-token attention, best first.

  Args:
    features: float[N, D] (unused; part of the common method signature).
    relevance: float32[N] last-token attention to each visual token (`relevance.last_token_attention`).
    valid: bool[N] padding False.
    key: unused.
    keep: static number of tokens to keep.

  Returns:
    int32[K] indices, highest attention first.
  """
  del features, key
  if relevance is None:
    raise ValueError("fastv: needs relevance=float[N] (last-token attention, see tops_jax.relevance)")
  # Invalid scores are flattened so padding fills any leftover slots in index order.
  score = jnp.where(valid, relevance.astype(jnp.float32), -jnp.inf)
  return greedy.topk_order(score, valid, keep)
