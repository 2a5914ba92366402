"""VisionZip: dominant tokens by CLS attention plus contextual tokens merged by key similarity.

Axes: B batch, N visual tokens (patches; the CLS token is not one of them), Dv vision width, Dk key width, K kept,
C contextual, P crops.

API: `compress` (the official computation, CLS included, tokens in the official order), `order` / `merge` (registered
as "visionzip" in `tops_jax.prune`: `keep` patches, indices ascending, no CLS; our view, not the official output),
`split(tokens)` (the official (dominant, contextual) for a keep), `next_order` (the official LLaVA-NeXT order).

Official code: dvlab-research/VisionZip @3151f6df4fca36a4cd1c985e5956e725b1f9ad02, visionzip/main.py, utils.py,
clip_encoder.py, llava_arch.py. Facts read from that code, the settings, the API in full and the deviations:
tops_jax/METHODS.md#visionzip.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tops_jax import greedy
from tops_jax import similarity

__all__ = ["order", "merge", "compress", "next_order", "split", "default_dominant", "KIND_CLS", "KIND_DOMINANT",
           "KIND_CONTEXTUAL"]

DOMINANT_RATIO = 54 / 64
KIND_CLS, KIND_DOMINANT, KIND_CONTEXTUAL = 0, 1, 2


def default_dominant(keep: int) -> int:
  """round(keep * 54 / 64): the official 64-token ratio (also the official `dominant`, CLS included, for `keep`)."""
  return int(round(keep * DOMINANT_RATIO))


def split(tokens: int) -> tuple[int, int]:
  """Official (dominant, contextual) for `tokens` per image (LLaVA-1.5) or per crop (LLaVA-NeXT), CLS in dominant."""
  if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 2:
    raise ValueError(f"visionzip: tokens must be a Python int >= 2, got {tokens!r}")
  dom = default_dominant(tokens)
  return dom, int(tokens) - dom


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


def _select(relevance, valid, dom_n: int, ctx_n: int):
  """(dominant int32[dom_n] best first, centers int32[ctx_n] ascending, members bool[N] tokens merged into centers).

  The centers are the official code's `target_indices` (called centers here: a target is the papers' token count)."""
  n = valid.shape[0]
  score = jnp.where(valid, relevance.astype(jnp.float32), -jnp.inf)
  dom = greedy.topk_order(score, valid, dom_n)
  is_dom = jnp.zeros(n, dtype=bool).at[dom].set(True)
  remaining = valid & ~is_dom
  if ctx_n == 0:
    return dom, jnp.zeros((0,), jnp.int32), jnp.zeros(n, dtype=bool)
  rank = jnp.cumsum(remaining) - 1                           # position among the remaining tokens, ascending index
  step = jnp.maximum(1, jnp.sum(remaining) // ctx_n)
  is_center = remaining & (rank % step == 0) & (rank < ctx_n * step)
  # Targets in index order, then (only when too few tokens are valid) unused padding, never a dominant token twice.
  priority = jnp.where(is_center, 0, jnp.where(~valid & ~is_dom, 1, 2))
  centers = _first(priority, ctx_n)
  return dom, centers, remaining & ~is_center


def _contextual(x, space, centers, members):
  """float32[C, Dv]: each center plus the mean of the members whose key is most similar to it."""
  sim = similarity.cosine_similarity(space, space[centers])                    # float32[N, C]
  assign = jnp.argmax(sim, axis=-1)                                            # first center on ties
  onehot = (assign[:, None] == jnp.arange(centers.shape[0])[None, :]) & members[:, None]
  onehot = onehot.astype(jnp.float32)
  summed = jnp.einsum("nc,nd->cd", onehot, x, precision=jax.lax.Precision.HIGHEST)
  counts = jnp.maximum(jnp.sum(onehot, axis=0), 1.0)[:, None]
  return x[centers] + summed / counts


def order(features: jax.Array, relevance: jax.Array, valid: jax.Array, key: jax.Array | None = None, *,
          keep: int, dominant: int | None = None, keys: jax.Array | None = None) -> jax.Array:
  """Patch-only view: dominant (best CLS attention first), then contextual centers (ascending).

  Args:
    features: float[N, Dv] (unused by the order; see `merge`).
    relevance: float32[N] CLS attention to each patch (vision layer -2).
    valid: bool[N] padding False.
    key: unused.
    keep: static number K of patch tokens.
    dominant: static number of dominant PATCHES (default round(K * 54 / 64)); C = K - dominant contextual tokens.
    keys: float[N, Dk] merge similarity space (accepted for a uniform call; the order does not read it).

  Returns:
    int32[K].
  """
  del key
  _check_keys(keys, features.shape[0])
  if relevance is None:
    raise ValueError("visionzip: needs relevance=float[N] (CLS attention, see tops_jax.relevance.cls_attention)")
  dom, centers, _ = _select(relevance, valid, *_split(keep, dominant))
  return jnp.concatenate([dom, centers])


def merge(features: jax.Array, relevance: jax.Array, valid: jax.Array, key: jax.Array | None = None, *,
          keep: int, dominant: int | None = None, keys: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Patch-only view: dominant patches unchanged, each center plus the mean of the tokens assigned to it.

  Args: as `order`; `keys` float[N, Dk] defaults to `features`.

  Returns:
    (tokens float[K, Dv] in the dtype of `features`, indices int32[K] ascending); tokens[i] belongs to indices[i].
  """
  del key
  _check_keys(keys, features.shape[0])
  if relevance is None:
    raise ValueError("visionzip: needs relevance=float[N] (CLS attention, see tops_jax.relevance.cls_attention)")
  dom, centers, members = _select(relevance, valid, *_split(keep, dominant))
  x = features.astype(jnp.float32)
  tokens = x[dom]
  if centers.shape[0]:
    space = features if keys is None else keys
    tokens = jnp.concatenate([tokens, _contextual(x, space, centers, members)])
  idx = jnp.concatenate([dom, centers])
  perm = jnp.argsort(idx)
  return tokens[perm].astype(features.dtype), idx[perm]


def _static_count(name: str, value, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"visionzip: {name} must be a static Python int >= {low}, got {value!r}")
  return int(value)


def _compress_one(features, relevance, keys, cls_feature, valid, dominant, contextual):
  dom, centers, members = _select(relevance, valid, dominant - 1, contextual)
  x = features.astype(jnp.float32)
  dom = jnp.sort(dom)                                               # masked_select keeps the spatial order
  parts = [cls_feature.astype(jnp.float32)[None], x[dom]]
  if contextual:
    parts.append(_contextual(x, keys, centers, members))
  tokens = jnp.concatenate(parts).astype(features.dtype)
  source = jnp.concatenate([jnp.full((1,), -1, jnp.int32), dom, centers])
  kind = np.repeat(np.array([KIND_CLS, KIND_DOMINANT, KIND_CONTEXTUAL], np.int8), [1, dominant - 1, contextual])
  return tokens, source, jnp.asarray(kind)


@functools.partial(jax.jit, static_argnames=("dominant", "contextual"))
def _compress(features, relevance, keys, cls_feature, valid, *, dominant, contextual):
  fn = lambda f, r, k, c, v: _compress_one(f, r, k, c, v, dominant, contextual)
  return (jax.vmap(fn) if features.ndim == 3 else fn)(features, relevance, keys, cls_feature, valid)


def compress(features: jax.Array, relevance: jax.Array, keys: jax.Array, cls_feature: jax.Array,
             valid: jax.Array | None = None, *, dominant: int, contextual: int
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The official VisionZip output of one image or crop (or a batch of them), CLS included, in the official order.

  Args:
    features: float[N, Dv] or float[B, N, Dv] the patches' hidden states of vision layer -2 (CLS excluded).
    relevance: float[N] / float[B, N] CLS attention of that layer to each patch (head sum for the official ranking).
    keys: float[N, Dk] / float[B, N, Dk] that layer's keys of the patches, mean over heads.
    cls_feature: float[Dv] / float[B, Dv] the CLS token's hidden state of that layer.
    valid: bool[N] / bool[B, N] padding False (default all valid).
    dominant: static official `dominant` (CLS included: dominant - 1 patches), >= 1.
    contextual: static number C of contextual tokens, >= 0.

  Returns:
    tokens float[..., K, Dv] (dtype of `features`), K = dominant + contextual, ordered
      [CLS, dominant patches ascending, contextual centers ascending];
    source int32[..., K] patch index of each token (-1 for the CLS; the center's index for a contextual token);
    kind int8[..., K] KIND_CLS (0), KIND_DOMINANT (1) or KIND_CONTEXTUAL (2).
  """
  dominant = _static_count("dominant", dominant, 1)
  contextual = _static_count("contextual", contextual, 0)
  shape = tuple(jnp.shape(features))
  if len(shape) not in (2, 3) or not jnp.issubdtype(jnp.result_type(features), jnp.floating):
    raise ValueError(f"visionzip: features must be float[N, Dv] or float[B, N, Dv], got "
                     f"{jnp.result_type(features)}{shape}")
  lead, n = shape[:-1], shape[-2]
  if dominant - 1 + contextual > n:
    raise ValueError(f"visionzip: dominant - 1 + contextual = {dominant - 1 + contextual} exceeds the N={n} patches")
  if tuple(jnp.shape(relevance)) != lead:
    raise ValueError(f"visionzip: relevance must have shape {lead}, got {tuple(jnp.shape(relevance))}")
  if jnp.ndim(keys) != len(shape) or tuple(jnp.shape(keys))[:-1] != lead:
    raise ValueError(f"visionzip: keys must have shape {lead + ('Dk',)}, got {tuple(jnp.shape(keys))}")
  if tuple(jnp.shape(cls_feature)) != shape[:-2] + shape[-1:]:
    raise ValueError(f"visionzip: cls_feature must have shape {shape[:-2] + shape[-1:]}, "
                     f"got {tuple(jnp.shape(cls_feature))}")
  if valid is None:
    valid = jnp.ones(lead, bool)
  if tuple(jnp.shape(valid)) != lead or jnp.result_type(valid) != jnp.bool_:
    raise ValueError(f"visionzip: valid must be bool{lead}, got {jnp.result_type(valid)}{tuple(jnp.shape(valid))}")
  return _compress(jnp.asarray(features), jnp.asarray(relevance), jnp.asarray(keys), jnp.asarray(cls_feature),
                   jnp.asarray(valid), dominant=dominant, contextual=contextual)


def next_order(kind: jax.Array, source: jax.Array, grid: jax.Array, crop_valid: jax.Array | None = None, *,
               side: int) -> tuple[jax.Array, jax.Array]:
  """The official LLaVA-NeXT order of the per-crop `compress` outputs of one image.

  Args:
    kind: int[P, K] and source: int[P, K] from `compress` on the P crops (crop 0 the base crop, then the grid crops
      row-major over the grid).
    grid: int[2] (rows, cols) of grid crops; rows * cols <= P - 1.
    crop_valid: bool[P] real crops (default all); tokens of other crops go last.
    side: static patches per crop side (24 for CLIP-L/14 at 336 px).

  Returns:
    (perm int32[P * K] indices into the flattened [P * K] tokens, valid bool[P * K]): base crop [CLS, dominant,
    contextual]; grid dominant patches in row-major order over the (rows * side) x (cols * side) canvas; grid CLS
    tokens; grid contextual tokens (crop order, then center order). The caller appends `image_newline` when the
    image has only the base crop, as the official code does.
  """
  side = _static_count("side", side, 1)
  if jnp.ndim(kind) != 2 or jnp.shape(source) != jnp.shape(kind):
    raise ValueError(f"visionzip: kind and source must be int[P, K] of one shape, got {tuple(jnp.shape(kind))} and "
                     f"{tuple(jnp.shape(source))}")
  p, k = kind.shape
  crop_valid = jnp.ones((p,), bool) if crop_valid is None else jnp.asarray(crop_valid)
  if crop_valid.shape != (p,) or crop_valid.dtype != jnp.bool_:
    raise ValueError(f"visionzip: crop_valid must be bool[P={p}], got {crop_valid.dtype}{crop_valid.shape}")
  return _next_order(jnp.asarray(kind), jnp.asarray(source), jnp.asarray(grid).astype(jnp.int32), crop_valid,
                     side=side)


@functools.partial(jax.jit, static_argnames=("side",))
def _next_order(kind, source, grid, crop_valid, *, side):
  p, k = kind.shape
  crop = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[:, None], (p, k))
  slot = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None, :], (p, k))
  cols = grid[1]
  cell_row, cell_col = (crop - 1) // jnp.maximum(cols, 1), (crop - 1) % jnp.maximum(cols, 1)
  y, x = source // side, source % side
  canvas = (cell_row * side + y) * (cols * side) + cell_col * side + x
  kind = kind.astype(jnp.int32)
  group = jnp.where(crop == 0, 0, jnp.where(kind == KIND_DOMINANT, 1, jnp.where(kind == KIND_CLS, 2, 3)))
  group = jnp.where(crop_valid[:, None], group, 4)
  rank = jnp.where(group == 1, canvas, jnp.where(group == 2, crop, crop * k + slot))
  perm = jnp.lexsort((rank.reshape(-1), group.reshape(-1))).astype(jnp.int32)
  return perm, (group.reshape(-1) < 4)[perm]
