"""The public selection API: `prune.select(method, features, keep=...)` -> kept indices.

Axes: B batch, N visual tokens, D width, K kept (= `keep`).

    from tops_jax import prune
    idx = prune.select("tops", feats, keep=128, relevance=cls_attn)            # int32[K] or int32[B, K]
    order = prune.select_order("tops", feats, keep=128, relevance=cls_attn)    # greedy order, for analysis
    tokens, idx = prune.merge("visionzip", feats, keep=64, relevance=cls_attn)  # merging methods

`features: float[N, D]` or `float[B, N, D]`; `keep` is static (1 <= keep <= N); returns `int32[..., K]` original
token indices in ascending order; equal scores go to the lowest index. The full contract (relevance, `valid`, PRNG
keys, traced and static hyperparameters, device layout) and the handling of errors and non-finite values:
tops_jax/METHODS.md#prune.
"""

import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from tops_jax import _checks
from tops_jax import cdpruner
from tops_jax import dart
from tops_jax import divprune
from tops_jax import fastv
from tops_jax import greedy
from tops_jax import pdrop
from tops_jax import prumerge
from tops_jax import scope
from tops_jax import simple
from tops_jax import tops
from tops_jax import trimtokenator
from tops_jax import vispruner
from tops_jax import visionzip

__all__ = ["METHODS", "Method", "NEEDS_RELEVANCE", "MERGE_METHODS", "check_hparams", "needs_relevance",
           "relevance_role", "select", "select_order", "merge", "row_keys"]


class Method(NamedTuple):
  """How a method plugs into `select`.

  order: (features float[N, D], relevance float32[N] | None, valid bool[N], key | None, *, keep, **hp) ->
    int32[K] selection order (greedy order for greedy methods, best score first otherwise).
  relevance: how the method uses `relevance` (see `relevance_role`): "required", "read" (used when given) or
    "unused"; or a function of the hyperparameters returning one of those.
  needs_key: whether an explicit PRNG key is required.
  merge: same arguments -> (tokens float[K, D] aligned with the sorted indices, indices int32[K] ascending), or None.
  reads_features: whether the selection reads feature values (False: only their shape).
  token_masks: array hyperparameters holding one row per token, and the mask (`valid` or another hyperparameter)
    that says which rows are read, for the NaN checks.
  relevance_hint: appended to the missing-relevance error.
  """
  order: Callable[..., jax.Array]
  relevance: str | Callable[[dict[str, Any]], str] = "unused"
  needs_key: bool = False
  merge: Callable[..., tuple[jax.Array, jax.Array]] | None = None
  reads_features: bool = True
  token_masks: tuple[tuple[str, str], ...] = ()
  relevance_hint: str = ""

  def relevance_role(self, hparams: dict[str, Any] | None = None) -> str:
    return self.relevance(hparams or {}) if callable(self.relevance) else self.relevance

  @property
  def needs_relevance(self) -> bool:
    """Whether `relevance` is required with the default hyperparameters."""
    return self.relevance_role() == "required"


def _tops_relevance(hparams: dict[str, Any]) -> str:
  # The seed is argmax relevance whenever one is given, even in the relevance-free ablation.
  criteria = hparams.get("criteria", tops.CRITERIA)
  criteria = (criteria,) if isinstance(criteria, str) else tuple(criteria)
  return "required" if "relevance" in criteria else "read"


def _trimtokenator_relevance(hparams: dict[str, Any]) -> str:
  # Relevance stands in for the text alignment score; the method names both options when neither is given.
  return "unused" if hparams.get("text") is not None else "read"


_TEXT_MASKS = (("text", "text_valid"), ("text_features", "text_valid"), ("text_keys", "text_valid"))

METHODS: dict[str, Method] = {
    "tops": Method(tops.order, relevance=_tops_relevance,
                   relevance_hint="; the relevance criterion needs it, drop it with criteria=('diversity', 'coverage') "
                                  "for the relevance-free ablation"),
    "trimtokenator": Method(trimtokenator.order, relevance=_trimtokenator_relevance, token_masks=_TEXT_MASKS),
    "fastv": Method(fastv.order, relevance="required", reads_features=False),
    "divprune": Method(divprune.order),
    "cdpruner": Method(cdpruner.order, relevance="required"),
    "scope": Method(scope.order, relevance="required"),
    "visionzip": Method(visionzip.order, relevance="required", merge=visionzip.merge,
                        token_masks=(("keys", "valid"),)),
    "dart": Method(dart.order, token_masks=(("keys", "valid"),) + _TEXT_MASKS[1:]),
    "random": Method(simple.random_order, needs_key=True, reads_features=False),
    "pooling": Method(simple.pooling_order, merge=simple.pooling_merge, reads_features=False),
    "vispruner": Method(vispruner.order, relevance="required"),
    # The order reads only relevance; the merge reads features and keys (mode="fixed" default, see prumerge).
    "prumerge_plus": Method(prumerge.order, relevance="required", merge=prumerge.merge, reads_features=False,
                            token_masks=(("keys", "valid"),)),
    "pdrop": Method(pdrop.order, relevance="required", reads_features=False),
}
# Methods that need a relevance vector with their default hyperparameters (tops also without one when
# criteria leaves relevance out; `needs_relevance(method, **hparams)` answers for given hyperparameters).
NEEDS_RELEVANCE = tuple(name for name, m in METHODS.items() if m.needs_relevance)
MERGE_METHODS = tuple(name for name, m in METHODS.items() if m.merge is not None)


def relevance_role(method: str, **hparams) -> str:
  """How `method` with these hyperparameters uses `relevance`: "required", "read" (when given) or "unused"."""
  return _lookup(method).relevance_role(hparams)


def needs_relevance(method: str, **hparams) -> bool:
  """Whether `method` with these hyperparameters requires a relevance vector."""
  return relevance_role(method, **hparams) == "required"


def _lookup(method: str) -> Method:
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
  return METHODS[method]


def _check_hparams(method: str, fn: Callable, hparams: dict[str, Any]):
  params = inspect.signature(fn).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return
  known = [name for name, p in params.items()
           if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "keep"]
  unknown = sorted(set(hparams) - set(known))
  if unknown:
    raise ValueError(f"{method}: unknown hyperparameter(s) {', '.join(unknown)}; "
                     f"{method} takes: {', '.join(known) or 'none'}")


def _split_hparams(hparams: dict[str, Any]) -> tuple[tuple[tuple[str, Any], ...], dict[str, Any]]:
  """Static (shape/control-flow) hyperparameters vs traced ones (floats and arrays)."""
  static, dynamic = [], {}
  for name, value in sorted(hparams.items()):
    if isinstance(value, float) or hasattr(value, "shape"):
      dynamic[name] = value
    elif isinstance(value, list):
      static.append((name, tuple(value)))  # e.g. grid=[6, 6]: static values must be hashable
    else:
      static.append((name, value))
  return tuple(static), dynamic


def _usable(spec: Method, features, relevance, valid, reads_relevance: bool):
  """Zeroes non-finite inputs and drops the tokens whose read inputs were non-finite from the candidates.

  Returns (features, relevance, ok): ok = valid & finite read features & finite read relevance.
  """
  finite = jnp.all(jnp.isfinite(features), axis=-1)
  features = jnp.where(finite[..., None], features, jnp.zeros((), features.dtype))
  ok = valid & finite if spec.reads_features else valid
  if relevance is not None:
    rel_finite = jnp.isfinite(relevance)
    relevance = jnp.where(rel_finite, relevance, 0.0)
    if reads_relevance:
      ok = ok & rel_finite
  return features, relevance, ok


@functools.partial(jax.jit, static_argnames=("method", "keep", "static_hp", "want", "batched", "reads_relevance"))
def _run(features, relevance, valid, key, dynamic_hp, *, method, keep, static_hp, want, batched, reads_relevance):
  spec = METHODS[method]
  fn = spec.order if want == "order" else spec.merge
  fn = functools.partial(fn, keep=keep, **dict(static_hp))
  if valid is None:
    valid = jnp.ones(features.shape[:-1], dtype=bool)
  if relevance is not None:
    relevance = relevance.astype(jnp.float32)
  features, relevance, ok = _usable(spec, features, relevance, valid, reads_relevance)

  def one(f, r, v, o, k, hp):
    out = fn(f, r, o, k, **hp)
    return greedy.complete_order(out, o, v) if want == "order" else out

  if not batched:
    return one(features, relevance, valid, ok, key, dynamic_hp)
  b = features.shape[0]
  keys = None if key is None else key if _per_row(key) else row_keys(key, b)
  hp_axes = {k: (0 if jnp.ndim(v) >= 1 else None) for k, v in dynamic_hp.items()}
  per_row = {k: v for k, v in dynamic_hp.items() if hp_axes[k] == 0}
  shared = {k: v for k, v in dynamic_hp.items() if hp_axes[k] is None}

  def rows(features, relevance, valid, ok, keys, per_row, shared):
    if jax.default_backend() != "cpu":
      return jax.vmap(lambda f, r, v, o, k, hp: one(f, r, v, o, k, {**shared, **hp}),
                      in_axes=(0, None if relevance is None else 0, 0, 0, None if keys is None else 0, 0))(
                          features, relevance, valid, ok, keys, per_row)
    # On CPU the rows run one after the other (`lax.map`): the same compiled single-row program, where the vmapped
    # program is 1.8x (TOPS) to 3.5x (DivPrune) slower for 8 rows of 2,880 tokens (batched similarity GEMMs and
    # greedy loops that run the batch's longest row; BUILD.md "Speed"). The picks are the same.
    return jax.lax.map(lambda xs: one(*xs[:5], {**shared, **xs[5]}), (features, relevance, valid, ok, keys, per_row))

  return rows(features, relevance, valid, ok, keys, per_row, shared)


def row_keys(key: jax.Array, b: int) -> jax.Array:
  """The per-row keys of a batched call: fold_in(key, row) for rows 0..b-1, key[B]."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))


def _per_row(key) -> bool:
  """Whether `key` holds one key per row (key[B]; raw uint32 keys: uint32[B, 2])."""
  return jnp.ndim(key) == (1 if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else 2)


def _call(method, features, keep, relevance, valid, key, hparams, want):
  spec = _lookup(method)
  if want == "merge" and spec.merge is None:
    raise ValueError(f"{method} does not merge tokens; merging methods: {', '.join(MERGE_METHODS)}")
  fn = spec.order if want == "order" else spec.merge
  _check_hparams(method, fn, hparams)
  role = spec.relevance_role(hparams)
  keep = _checks.check_select_args(method, features, keep, relevance, valid, key,
                                   needs_relevance=role == "required", needs_key=spec.needs_key,
                                   reads_features=spec.reads_features or want == "merge",
                                   reads_relevance=role != "unused", relevance_hint=spec.relevance_hint)
  masks = {name: (valid if mask == "valid" else hparams.get(mask)) for name, mask in spec.token_masks}
  hparams = _checks.check_hparams(method, fn, hparams, masks)
  features = jnp.asarray(features)
  batched = features.ndim == 3
  if batched:
    for name, value in hparams.items():
      if hasattr(value, "shape") and jnp.ndim(value) >= 1 and value.shape[0] != features.shape[0]:
        raise ValueError(f"{method}: array hyperparameter {name} has leading axis {value.shape[0]}, "
                         f"expected the batch size {features.shape[0]}")
  static_hp, dynamic_hp = _split_hparams(hparams)
  return _run(features, relevance, valid, key, dynamic_hp, method=method, keep=keep, static_hp=static_hp,
              want=want, batched=batched, reads_relevance=role != "unused")


def check_hparams(method: str, *, want: str = "order", **hparams) -> dict[str, Any]:
  """Validates hyperparameters of `method` the way `select` does (unknown names, types, non-finite values) without
  selecting anything; returns them as `select` passes them on. For configs built before any features exist."""
  spec = _lookup(method)
  fn = spec.order if want == "order" or spec.merge is None else spec.merge
  _check_hparams(method, fn, hparams)
  return _checks.check_hparams(method, fn, hparams, {})


def select_order(method: str, features: jax.Array, *, keep: int, relevance: jax.Array | None = None,
                 valid: jax.Array | None = None, key: jax.Array | None = None, **hparams) -> jax.Array:
  """Kept indices in selection order: int32[..., K] (greedy pick order; best score first for top-k methods)."""
  return _call(method, features, keep, relevance, valid, key, hparams, "order")


def select(method: str, features: jax.Array, *, keep: int, relevance: jax.Array | None = None,
           valid: jax.Array | None = None, key: jax.Array | None = None, **hparams) -> jax.Array:
  """Kept indices in ascending order: int32[..., K]. See tops_jax/METHODS.md#prune for the contract."""
  return jnp.sort(select_order(method, features, keep=keep, relevance=relevance, valid=valid, key=key, **hparams),
                  axis=-1)


def merge(method: str, features: jax.Array, *, keep: int, relevance: jax.Array | None = None,
          valid: jax.Array | None = None, key: jax.Array | None = None, **hparams) -> tuple[jax.Array, jax.Array]:
  """Merging methods: (tokens float[..., K, D], indices int32[..., K] ascending), tokens aligned with indices."""
  return _call(method, features, keep, relevance, valid, key, hparams, "merge")
