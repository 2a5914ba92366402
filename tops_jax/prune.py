"""The public selection API: `prune.select(method, features, keep=...)` -> kept indices.

Axes: B batch, N visual tokens, D width, K kept (= `keep`).

    from tops_jax import prune
    idx = prune.select("tops", feats, keep=128, relevance=cls_attn)            # int32[K] or int32[B, K]
    order = prune.select_order("tops", feats, keep=128, relevance=cls_attn)    # greedy order, for analysis
    tokens, idx = prune.merge("visionzip", feats, keep=64, relevance=cls_attn)  # merging methods

Contract
- `features: float[N, D]` or `float[B, N, D]` (float32 or bfloat16; similarities accumulate in float32).
- `keep` is static (it fixes the output shape); 1 <= keep <= N.
- `relevance: float[..., N]` where the method reads one (see `NEEDS_RELEVANCE`); `valid: bool[..., N]` masks
  padding, which is never selected; `key` is an explicit PRNG key for random methods (batched rows use
  `fold_in(key, row)`).
- Returns `int32[..., K]` original token indices in ascending order (spatial order kept).
- Deterministic: equal scores go to the lowest index.
- Hyperparameters are keyword arguments of the method (documented in its module). Python floats are traced (a sweep
  over alpha does not recompile); ints, bools, strings and tuples are static; arrays with a leading batch axis are
  split per row when `features` is batched.

Errors and non-finite values
Bad shapes, ranks, dtypes, `keep` out of range, unknown methods and missing relevance/key raise `ValueError` at trace
time. NaN/inf in `features` or `relevance`, and fewer valid tokens than `keep`, raise on eager calls (concrete
arrays). Under an outer `jax.jit` those value checks cannot raise: NaN gains are then ranked below every finite gain
(a token with non-finite features is picked only when nothing else is left), and when fewer than `keep` tokens are
valid the remaining slots are filled with the lowest-index invalid positions.
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
from tops_jax import scope
from tops_jax import simple
from tops_jax import tops
from tops_jax import trimtokenator
from tops_jax import visionzip

__all__ = ["METHODS", "Method", "NEEDS_RELEVANCE", "MERGE_METHODS", "select", "select_order", "merge"]


class Method(NamedTuple):
  """How a method plugs into `select`.

  order: (features float[N, D], relevance float32[N] | None, valid bool[N], key | None, *, keep, **hp) ->
    int32[K] selection order (greedy order for greedy methods, best score first otherwise).
  needs_relevance: whether `relevance` is required.
  needs_key: whether an explicit PRNG key is required.
  merge: same arguments -> (tokens float[K, D] aligned with the sorted indices, indices int32[K] ascending), or None.
  """
  order: Callable[..., jax.Array]
  needs_relevance: bool = False
  needs_key: bool = False
  merge: Callable[..., tuple[jax.Array, jax.Array]] | None = None


METHODS: dict[str, Method] = {
    "tops": Method(tops.order, needs_relevance=False),
    "trimtokenator": Method(trimtokenator.order, needs_relevance=False),
    "fastv": Method(fastv.order, needs_relevance=True),
    "divprune": Method(divprune.order),
    "cdpruner": Method(cdpruner.order, needs_relevance=True),
    "scope": Method(scope.order, needs_relevance=True),
    "visionzip": Method(visionzip.order, needs_relevance=True, merge=visionzip.merge),
    "dart": Method(dart.order),
    "random": Method(simple.random_order, needs_key=True),
    "pooling": Method(simple.pooling_order, merge=simple.pooling_merge),
}
NEEDS_RELEVANCE = tuple(name for name, m in METHODS.items() if m.needs_relevance)
MERGE_METHODS = tuple(name for name, m in METHODS.items() if m.merge is not None)


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


@functools.partial(jax.jit, static_argnames=("method", "keep", "static_hp", "want", "batched"))
def _run(features, relevance, valid, key, dynamic_hp, *, method, keep, static_hp, want, batched):
  spec = METHODS[method]
  fn = spec.order if want == "order" else spec.merge
  fn = functools.partial(fn, keep=keep, **dict(static_hp))
  if valid is None:
    valid = jnp.ones(features.shape[:-1], dtype=bool)
  if relevance is not None:
    relevance = relevance.astype(jnp.float32)

  def one(f, r, v, k, hp):
    return fn(f, r, v, k, **hp)

  if not batched:
    return one(features, relevance, valid, key, dynamic_hp)
  b = features.shape[0]
  keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))
  hp_axes = {k: (0 if jnp.ndim(v) >= 1 else None) for k, v in dynamic_hp.items()}
  return jax.vmap(one, in_axes=(0, None if relevance is None else 0, 0, None if keys is None else 0, hp_axes))(
      features, relevance, valid, keys, dynamic_hp)


def _call(method, features, keep, relevance, valid, key, hparams, want):
  spec = _lookup(method)
  if want == "merge" and spec.merge is None:
    raise ValueError(f"{method} does not merge tokens; merging methods: {', '.join(MERGE_METHODS)}")
  _check_hparams(method, spec.order if want == "order" else spec.merge, hparams)
  keep = _checks.check_select_args(method, features, keep, relevance, valid, key,
                                   needs_relevance=spec.needs_relevance, needs_key=spec.needs_key)
  features = jnp.asarray(features)
  batched = features.ndim == 3
  if batched:
    for name, value in hparams.items():
      if hasattr(value, "shape") and jnp.ndim(value) >= 1 and value.shape[0] != features.shape[0]:
        raise ValueError(f"{method}: array hyperparameter {name} has leading axis {value.shape[0]}, "
                         f"expected the batch size {features.shape[0]}")
  static_hp, dynamic_hp = _split_hparams(hparams)
  return _run(features, relevance, valid, key, dynamic_hp, method=method, keep=keep, static_hp=static_hp,
              want=want, batched=batched)


def select_order(method: str, features: jax.Array, *, keep: int, relevance: jax.Array | None = None,
                 valid: jax.Array | None = None, key: jax.Array | None = None, **hparams) -> jax.Array:
  """Kept indices in selection order: int32[..., K] (greedy pick order; best score first for top-k methods)."""
  return _call(method, features, keep, relevance, valid, key, hparams, "order")


def select(method: str, features: jax.Array, *, keep: int, relevance: jax.Array | None = None,
           valid: jax.Array | None = None, key: jax.Array | None = None, **hparams) -> jax.Array:
  """Kept indices in ascending order: int32[..., K]. See the module docstring for the contract."""
  return jnp.sort(select_order(method, features, keep=keep, relevance=relevance, valid=valid, key=key, **hparams),
                  axis=-1)


def merge(method: str, features: jax.Array, *, keep: int, relevance: jax.Array | None = None,
          valid: jax.Array | None = None, key: jax.Array | None = None, **hparams) -> tuple[jax.Array, jax.Array]:
  """Merging methods: (tokens float[..., K, D], indices int32[..., K] ascending), tokens aligned with indices."""
  return _call(method, features, keep, relevance, valid, key, hparams, "merge")
