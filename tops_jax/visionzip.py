"""VisionZip: dominant tokens by CLS attention plus contextual tokens merged by key similarity.

Axes: N visual tokens (patches; the CLS token is not one of them), D width, Dk key width, K kept, C contextual.

Source: VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR
2025), official code `dvlab-research/VisionZip` and the llmc port. Facts read from that code:
- Dominant tokens: the top patches by CLS attention of vision layer -2, heads summed (`relevance`; a head mean, as
  `tops_jax.relevance.cls_attention` returns, ranks identically). The CLS token is kept as well.
- Contextual tokens: the remaining patches (neither CLS nor dominant), in ascending index order, are split into C
  uniformly strided targets, positions `range(0, R, max(1, R // C))[:C]` among the R remaining, and the rest. Each
  non-target is assigned to the target with the highest cosine similarity of layer -2 keys (keys averaged over
  heads), first target on ties. A target becomes `target + mean(assigned)`: the mean of its assigned tokens is
  ADDED to the target, not averaged with it; a target with nothing assigned is unchanged. The merge acts on the
  layer -2 hidden states, before the projector.
- Budget split: the official `dominant` counts the CLS token (`dominant_num = dominant - 1` patches); the LLaVA-1.5
  settings are (dominant, contextual) = (54, 10), (108, 20), (162, 30) for 64, 128, 192 tokens, i.e. 54/64 dominant.

Here the N tokens are patches only and the model hook keeps the CLS token itself. `dominant` counts patch tokens,
default round(keep * 54 / 64); to reproduce the official 64-token setting exactly (CLS + 53 + 10) call with keep=63,
dominant=53 and let the hook prepend the CLS. `keys` (float[N, Dk]) is the similarity space of the merge; without it
the features are used. `features` are whatever the merged tokens should be (the layer -2 hidden states to match
the official code).

Choices where the code is silent: ties in CLS attention go to the lowest index; padding (valid False) is never
dominant, never a target and never merged; R counts valid remaining tokens only. If an outer jit hides that fewer
than K tokens are valid, missing slots hold the lowest-index unused padding positions.
"""

import jax
import jax.numpy as jnp
import numpy as np

from tops_jax import greedy
from tops_jax import similarity

__all__ = ["order", "merge", "default_dominant"]

DOMINANT_RATIO = 54 / 64


def default_dominant(keep: int) -> int:
  """Number of dominant tokens for a budget of `keep`: round(keep * 54 / 64), the official LLaVA-1.5 ratio."""
  return int(round(keep * DOMINANT_RATIO))


def _split(keep: int, dominant: int | None) -> tuple[int, int]:
  dom = default_dominant(keep) if dominant is None else dominant
  if isinstance(dom, bool) or not isinstance(dom, (int, np.integer)):
    raise ValueError(f"visionzip: dominant must be a static int or None, got {dominant!r}")
  if not 0 <= dom <= keep:
    raise ValueError(f"visionzip: dominant={dom} must lie in [0, keep={keep}]")
  return int(dom), keep - int(dom)


def _check_keys(keys, n: int):
  if keys is None:
    return
  if jnp.ndim(keys) != 2 or keys.shape[0] != n:
    raise ValueError(f"visionzip: keys must be float[N={n}, Dk], got shape {tuple(jnp.shape(keys))}")


def _first(priority: jax.Array, count: int) -> jax.Array:
  """Positions of the `count` smallest integer priorities, ties to the lowest index: int32[count]."""
  return jnp.argsort(priority, stable=True)[:count].astype(jnp.int32)


def _select(relevance, valid, keep, dominant):
  """(dominant int32[K - C] best first, targets int32[C] ascending, members bool[N] tokens merged into targets)."""
  n = valid.shape[0]
  dom_n, ctx_n = _split(keep, dominant)
  score = jnp.where(valid, relevance.astype(jnp.float32), -jnp.inf)
  dom = greedy.topk_order(score, valid, dom_n)
  is_dom = jnp.zeros(n, dtype=bool).at[dom].set(True)
  remaining = valid & ~is_dom
  if ctx_n == 0:
    return dom, jnp.zeros((0,), jnp.int32), jnp.zeros(n, dtype=bool)
  rank = jnp.cumsum(remaining) - 1                           # position among the remaining tokens, ascending index
  step = jnp.maximum(1, jnp.sum(remaining) // ctx_n)
  is_target = remaining & (rank % step == 0) & (rank < ctx_n * step)
  # Targets in index order, then (only when too few tokens are valid) unused padding, never a dominant token twice.
  priority = jnp.where(is_target, 0, jnp.where(~valid & ~is_dom, 1, 2))
  targets = _first(priority, ctx_n)
  return dom, targets, remaining & ~is_target


def order(features: jax.Array, relevance: jax.Array, valid: jax.Array, key: jax.Array | None = None, *,
          keep: int, dominant: int | None = None, keys: jax.Array | None = None) -> jax.Array:
  """VisionZip's kept token positions: dominant (best CLS attention first), then contextual targets (ascending).

  Args:
    features: float[N, D] (unused by the order; see `merge`).
    relevance: float32[N] CLS attention to each patch (vision layer -2).
    valid: bool[N] padding False.
    key: unused.
    keep: static budget K.
    dominant: static number of dominant tokens (default round(K * 54 / 64)); C = K - dominant contextual tokens.
    keys: float[N, Dk] merge similarity space (accepted for a uniform call; the order does not read it).

  Returns:
    int32[K].
  """
  del key
  _check_keys(keys, features.shape[0])
  if relevance is None:
    raise ValueError("visionzip: needs relevance=float[N] (CLS attention, see tops_jax.relevance.cls_attention)")
  dom, targets, _ = _select(relevance, valid, keep, dominant)
  return jnp.concatenate([dom, targets])


def merge(features: jax.Array, relevance: jax.Array, valid: jax.Array, key: jax.Array | None = None, *,
          keep: int, dominant: int | None = None, keys: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """VisionZip's output tokens: dominant tokens unchanged, each target plus the mean of the tokens assigned to it.

  Args: as `order`; `keys` float[N, Dk] defaults to `features`.

  Returns:
    (tokens float[K, D] in the dtype of `features`, indices int32[K] ascending); tokens[i] belongs to indices[i].
  """
  del key
  _check_keys(keys, features.shape[0])
  if relevance is None:
    raise ValueError("visionzip: needs relevance=float[N] (CLS attention, see tops_jax.relevance.cls_attention)")
  dom, targets, members = _select(relevance, valid, keep, dominant)
  x = features.astype(jnp.float32)
  tokens = x[dom]
  if targets.shape[0]:
    space = features if keys is None else keys
    sim = similarity.cosine_similarity(space, space[targets])                  # float32[N, C]
    assign = jnp.argmax(sim, axis=-1)
    onehot = (assign[:, None] == jnp.arange(targets.shape[0])[None, :]) & members[:, None]
    onehot = onehot.astype(jnp.float32)
    summed = jnp.einsum("nc,nd->cd", onehot, x, precision=jax.lax.Precision.HIGHEST)
    counts = jnp.maximum(jnp.sum(onehot, axis=0), 1.0)[:, None]
    tokens = jnp.concatenate([tokens, x[targets] + summed / counts])
  idx = jnp.concatenate([dom, targets])
  perm = jnp.argsort(idx)
  return tokens[perm].astype(features.dtype), idx[perm]
