"""LLaVA-PruMerge+: IQR-outlier CLS-attention tokens plus spatial samples, each merged with its nearest neighbours.

Axes: N visual tokens (patches; the CLS token is not one of them), D width, Dk key width, K kept (static bound),
k neighbours.

`order` / `merge` follow `tops_jax.prune` (static `keep`; `mode="fixed"` by default, `mode="adaptive"` for the
released inference path with `keep` an upper bound); `merge_sequence` returns what the official code hands to the
projector (merged tokens in the official order, a strided token that is also a top token twice as the official
concatenation keeps it unless `dedup=True`, plus the extra token over `complement_idx`'s complement);
`adaptive_count` and `cls_attention` give the official count and the layer-23 CLS relevance.

Official code: 42Shawn/LLaVA-PruMerge @097c041, llava/model/multimodal_encoder/clip_encoder.py
(`CLIPVisionTower.token_prune_merge_advanced_plus`, `outlier_dectection`, `complement_idx`); LLaVA-1.5 only. Facts
read from that code, the API in full, its scope and the deviations: tops_jax/METHODS.md#prumerge.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tops_jax import greedy
from tops_jax import similarity

__all__ = ["order", "merge", "merge_sequence", "MergedSequence", "cls_attention", "iqr_outliers",
           "adaptive_count", "MODES", "NEIGHBORS"]

MODES = ("fixed", "adaptive")
NEIGHBORS = 32  # official topk k of the merge


class MergedSequence(NamedTuple):
  """The official token sequence. tokens: float[K + 1, D] merged kept tokens in official order, then the extra
  token, then zeros; mask: bool[K + 1] True on the kept tokens and the extra token (a prefix); indices: int32[K]
  token ids of the first K slots (slots >= `count` are fill, not official); count: int32[] official number of kept
  tokens before truncation to K (adaptive mode; K in fixed mode)."""
  tokens: jax.Array
  mask: jax.Array
  indices: jax.Array
  count: jax.Array


def cls_attention(cls_query: jax.Array, keys: jax.Array, *, scale: float | None = None) -> jax.Array:
  """PruMerge's CLS attention: softmax over all N + 1 keys of (q_CLS . k) * scale, CLS column dropped.

  Args:
    cls_query: float[..., C] layer-23 `q_proj` output of the CLS position (full width, bias included).
    keys: float[..., N + 1, C] layer-23 `k_proj` outputs of every position, CLS first.
    scale: default C ** -0.5 (the official code scales by the feature width C = 1024, not the head width).

  Returns:
    float32[..., N].
  """
  q, k = jnp.asarray(cls_query), jnp.asarray(keys)
  if k.ndim < 2 or q.shape[:-1] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
    raise ValueError(f"prumerge.cls_attention: cls_query float[..., C] and keys float[..., N + 1, C] must agree, "
                     f"got {q.shape} and {k.shape}")
  if k.shape[-2] < 2:
    raise ValueError(f"prumerge.cls_attention: keys need the CLS row and at least one patch, got {k.shape}")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("...c,...nc->...n", q.astype(jnp.float32), k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * scale
  return jax.nn.softmax(logits, axis=-1)[..., 1:]


def _percentile(sorted_values: jax.Array, n: jax.Array, q: float) -> jax.Array:
  """np.percentile(..., method="linear") of the first n entries of an ascending float32 array, in float32."""
  virtual = (n - 1).astype(jnp.float32) * q
  lo = jnp.floor(virtual)
  gamma = virtual - lo
  lo = jnp.clip(lo.astype(jnp.int32), 0, sorted_values.shape[0] - 1)
  hi = jnp.clip(lo + 1, 0, jnp.maximum(n - 1, 0))
  a, b = sorted_values[lo], sorted_values[hi]
  diff = b - a
  return jnp.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)   # numpy's _lerp


def iqr_outliers(relevance: jax.Array, valid: jax.Array) -> jax.Array:
  """bool[N]: valid tokens whose relevance is strictly above Q3 + 1.5 * IQR of the valid relevances."""
  x = relevance.astype(jnp.float32)
  n = jnp.sum(valid).astype(jnp.int32)
  ascending = jnp.sort(jnp.where(valid, x, jnp.inf))
  q1, q3 = _percentile(ascending, n, 0.25), _percentile(ascending, n, 0.75)
  upper = q3 + jnp.float32(1.5) * (q3 - q1)
  return valid & (x > upper)


def adaptive_count(relevance: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Official PruMerge+ token count (outliers plus samples, without the extra token): int32[] for float[N]."""
  if valid is None:
    valid = jnp.ones(relevance.shape, bool)
  return _plan(relevance, valid, relevance.shape[0], "adaptive", False).count


class _Plan(NamedTuple):
  order: jax.Array    # int32[K] distinct tokens: the official ones in official order, then fill by attention
  slots: jax.Array    # int32[K] the official index list (fixed mode without dedup: duplicates kept), then fill
  count: jax.Array    # int32[] official count before truncation to K (fixed mode: K)


def _plan(relevance, valid, keep: int, mode: str, dedup: bool) -> _Plan:
  if mode not in MODES:
    raise ValueError(f"prumerge: mode must be one of {MODES}, got {mode!r}")
  if not isinstance(dedup, (bool, np.bool_)):
    raise ValueError(f"prumerge: dedup must be a static bool, got {dedup!r}")
  n_tok = relevance.shape[0]
  ids = jnp.arange(n_tok)
  score = jnp.where(valid, relevance.astype(jnp.float32), -jnp.inf)
  by_attention = greedy.topk_order(score, valid, n_tok)            # valid first, attention descending
  attention_rank = jnp.zeros(n_tok, jnp.int32).at[by_attention].set(jnp.arange(n_tok, dtype=jnp.int32))
  n = jnp.sum(valid).astype(jnp.int32)
  by_index = jnp.argsort(~valid, stable=True)                      # the r-th valid token in index order
  if mode == "adaptive":
    n_top = jnp.maximum(jnp.sum(iqr_outliers(relevance, valid)), 1)
    step = jnp.maximum((n // n_top) // 3, 1)
    offset = jnp.int32(0)
    n_samples = n_tok                                              # every position of the arange
  else:
    n_top = jnp.int32(keep // 2)
    step = n // max(keep // 2, 1)
    offset = step // 2
    n_samples = keep - keep // 2
  is_top = valid & (attention_rank < n_top)
  position = offset + jnp.arange(n_samples) * step                 # ranks among valid tokens
  live = position < n - 1
  strided = by_index[jnp.clip(position, 0, n_tok - 1)]
  sampled = jnp.zeros(n_tok, bool).at[strided].max(live)
  sampled = sampled & valid & ~is_top
  # Fixed mode: the fill tokens are kept like the others (they stand in where the strided sequence is short, and
  # with dedup for the official duplicates).
  count = (n_top + jnp.sum(sampled)).astype(jnp.int32) if mode == "adaptive" else jnp.int32(keep)
  tier = jnp.where(is_top, 0, jnp.where(sampled, 1, jnp.where(valid, 2, 3)))
  within = jnp.where(tier == 1, ids, attention_rank)
  order = jnp.lexsort((within, tier))[:keep].astype(jnp.int32)
  if mode == "adaptive" or dedup:
    return _Plan(order=order, slots=order, count=count)
  # The official concatenation [top; strided]: a strided position that is a top token is there twice. Strided slots
  # past the valid tokens take the fill tokens, the next by attention (they follow the distinct official ones).
  distinct = n_top + jnp.sum(sampled)
  fill = order[jnp.clip(distinct + jnp.arange(n_samples) - jnp.sum(live), 0, keep - 1)]
  slots = jnp.concatenate([order[:keep // 2], jnp.where(live, strided, fill).astype(jnp.int32)])
  return _Plan(order=order, slots=slots, count=count)


def _check_keys(keys, n: int):
  if keys is not None and (jnp.ndim(keys) != 2 or keys.shape[0] != n):
    raise ValueError(f"prumerge: keys must be float[N={n}, Dk], got shape {tuple(jnp.shape(keys))}")


def _check_neighbors(neighbors):
  if isinstance(neighbors, bool) or not isinstance(neighbors, (int, np.integer)) or neighbors < 1:
    raise ValueError(f"prumerge: neighbors must be a static int >= 1, got {neighbors!r}")


def _merged(features, relevance, valid, keys, slots, official, targets, neighbors: int):
  """Official merge of the tokens `targets` (int32[T]) around the kept list `slots` (int32[K], possibly with
  duplicates); `official` bool[K] marks the official kept slots (the others are fill, not kept).

  The rest of a target kept at slot i is the official loop's: every other official slot in slot order (a duplicate
  of the target included), then the complement of `complement_idx` (non-kept valid tokens ascending, less the d
  smallest, d = official slots - distinct official tokens). A target that is no official slot has every official
  slot and the complement less itself. Returns (tokens float32[T, D], extra float32[D]).
  """
  n_tok = features.shape[0]
  _check_neighbors(neighbors)
  x = features.astype(jnp.float32)
  weight = jnp.where(valid, relevance.astype(jnp.float32), 0.0)
  k_slots = slots.shape[0]
  is_kept = jnp.zeros(n_tok, bool).at[slots].max(official)
  duplicates = jnp.sum(official) - jnp.sum(is_kept)
  outside = valid & ~is_kept
  complement = outside & (jnp.cumsum(outside) > duplicates)       # complement_idx drops the d smallest
  first_slot = jnp.full(n_tok, k_slots, jnp.int32).at[slots].min(
      jnp.where(official, jnp.arange(k_slots, dtype=jnp.int32), k_slots))[targets]
  space = features if keys is None else keys
  finite = jnp.all(jnp.isfinite(space), axis=-1)
  space = jnp.where(finite[:, None], space, jnp.zeros((), space.dtype))
  columns = jnp.concatenate([slots, jnp.arange(n_tok, dtype=slots.dtype)])         # kept part, then by index
  sim = similarity.cosine_similarity(space[targets], space[columns])               # float32[T, K + N]
  kept_part = (official & finite[slots])[None, :] & (jnp.arange(k_slots)[None, :] != first_slot[:, None])
  rest_part = (complement & finite)[None, :] & (jnp.arange(n_tok)[None, :] != targets[:, None])
  usable = jnp.concatenate([kept_part, rest_part], axis=1) & finite[targets][:, None]
  sim = jnp.where(usable, sim, -jnp.inf)
  k = min(neighbors, max(n_tok - 1, 1))
  top, cols = jax.lax.top_k(sim, k)                                                  # ties: earlier rest position
  neighbour = columns[cols]                                                          # int32[T, k]
  w = jnp.where(jnp.isfinite(top), weight[neighbour], 0.0)
  summed = jnp.einsum("kj,kjd->kd", w, x[neighbour], precision=jax.lax.Precision.HIGHEST)
  tokens = x[targets] + summed
  extra = jnp.einsum("n,nd->d", jnp.where(complement, weight, 0.0), x, precision=jax.lax.Precision.HIGHEST)
  return tokens, extra


def order(features: jax.Array, relevance: jax.Array, valid: jax.Array, key: jax.Array | None = None, *,
          keep: int, mode: str = "fixed", dedup: bool = False, keys: jax.Array | None = None,
          neighbors: int = NEIGHBORS) -> jax.Array:
  """PruMerge+'s kept tokens in the official order (top/outlier tokens by attention, then samples by index).

  Args:
    features: float[N, D] (unused by the order; see `merge`).
    relevance: float32[N] `cls_attention` (layer-23 full-width CLS attention probabilities).
    valid: bool[N] padding False.
    key: unused (deterministic).
    keep: static K: the kept count ("fixed") or the upper bound of the official count ("adaptive").
    mode: "fixed" (the official `if_adaptive=False` branch, K // 2 top + strided) or "adaptive" (official inference).
    dedup: fixed mode: False (official) keeps a strided position that is also a top token twice in the merged
      sequence; True keeps it once and gives the freed slot to the next token by attention. The order is the same
      either way (K distinct tokens; without dedup the slots after the distinct official tokens are fill).
    keys: float[N, Dk] merge similarity space (accepted for a uniform call; the order does not read it).
    neighbors: merge neighbours (official 32; unused by the order).

  Returns:
    int32[K] distinct; in adaptive mode the slots from `adaptive_count` on are fill (next tokens by attention).
  """
  del key
  _check_neighbors(neighbors)
  if relevance is None:
    raise ValueError("prumerge: needs relevance=float[N] (CLS attention, see tops_jax.prumerge.cls_attention)")
  _check_keys(keys, features.shape[0])
  return _plan(relevance, valid, keep, mode, dedup).order


def merge_sequence(features: jax.Array, relevance: jax.Array, valid: jax.Array | None = None, *, keep: int,
                   mode: str = "fixed", dedup: bool = False, keys: jax.Array | None = None,
                   neighbors: int = NEIGHBORS) -> MergedSequence:
  """The sequence the official code hands to the projector, for one image (vmap for a batch).

  Args: as `order`; `valid` defaults to all True; `keys` float[N, Dk] defaults to `features`.

  Returns:
    MergedSequence (tokens float[K + 1, D] in the dtype of `features`; without dedup, `indices` and the merged rows
    hold a token twice where the official code does).
  """
  if relevance is None:
    raise ValueError("prumerge: needs relevance=float[N] (CLS attention, see tops_jax.prumerge.cls_attention)")
  _check_keys(keys, features.shape[0])
  if valid is None:
    valid = jnp.ones(features.shape[0], bool)
  plan = _plan(relevance, valid, keep, mode, dedup)
  packed = jnp.minimum(plan.count, keep)
  official = jnp.arange(keep) < packed
  tokens, extra = _merged(features, relevance, valid, keys, plan.slots, official, plan.slots, neighbors)
  slot = jnp.arange(keep + 1)
  body = jnp.concatenate([tokens, jnp.zeros_like(extra)[None]])
  seq = jnp.where((slot < packed)[:, None], body, jnp.where((slot == packed)[:, None], extra[None], 0.0))
  return MergedSequence(tokens=seq.astype(features.dtype), mask=slot <= packed, indices=plan.slots,
                        count=plan.count)


def merge(features: jax.Array, relevance: jax.Array, valid: jax.Array, key: jax.Array | None = None, *,
          keep: int, mode: str = "fixed", dedup: bool = False, keys: jax.Array | None = None,
          neighbors: int = NEIGHBORS) -> tuple[jax.Array, jax.Array]:
  """Merged kept tokens aligned with ascending indices (the `prune.merge` contract; no extra token).

  Args: as `order`; `keys` float[N, Dk] defaults to `features`.

  Returns:
    (tokens float[K, D] in the dtype of `features`, indices int32[K] ascending and distinct). Each official token
    has its official merged row; fill tokens (adaptive slots past the count; fixed mode without dedup, the slots of
    the duplicates) are merged by the same rule but are no part of the official output.
  """
  del key
  if relevance is None:
    raise ValueError("prumerge: needs relevance=float[N] (CLS attention, see tops_jax.prumerge.cls_attention)")
  _check_keys(keys, features.shape[0])
  plan = _plan(relevance, valid, keep, mode, dedup)
  official = jnp.arange(keep) < jnp.minimum(plan.count, keep)
  tokens, _ = _merged(features, relevance, valid, keys, plan.slots, official, plan.order, neighbors)
  perm = jnp.argsort(plan.order)
  return tokens[perm].astype(features.dtype), plan.order[perm]
