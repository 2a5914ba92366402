"""The stages' calls into `tops_jax.prune` (`select`, `select_order`, `merge`, same arguments), placed on the mesh.

Under a device mesh (`jax.set_mesh`) whose batch axes (`models.sharding.BATCH_AXES`: data, fsdp) split the B rows,
a call runs in a `jax.shard_map` over those axes: each device selects for its own rows, with the per-row keys
(`prune.row_keys`) and picks of one device. Otherwise it is the `tops_jax.prune` call itself. Axes: B rows, N tokens,
D width, K kept.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from models import sharding
from tops_jax import prune

__all__ = ["select", "select_order", "merge"]


def _on_mesh(fn, method: str, features: jax.Array, *, keep: int, relevance=None, valid=None, key=None, **hp):
  b = features.shape[0]
  axes = sharding.row_axes(b) if features.ndim == 3 else ()
  if not axes:
    return fn(method, features, keep=keep, relevance=relevance, valid=valid, key=key, **hp)
  keys = None if key is None else prune.row_keys(key, b)
  per_row = {k: v for k, v in hp.items() if hasattr(v, "shape") and jnp.ndim(v) >= 1}
  traced = {k: v for k, v in hp.items() if k not in per_row and (isinstance(v, float) or hasattr(v, "shape"))}
  static = {k: v for k, v in hp.items() if k not in per_row and k not in traced}

  def rows(features, relevance, valid, keys, per_row, traced):
    return fn(method, features, keep=keep, relevance=relevance, valid=valid, key=keys, **per_row, **traced, **static)

  spec = P(axes)
  return jax.shard_map(rows, in_specs=(spec,) * 5 + (P(),), out_specs=spec, axis_names=frozenset(axes),
                       check_vma=False)(features, relevance, valid, keys, per_row, traced)   # (searchsorted: vma)


select = functools.partial(_on_mesh, prune.select)
select_order = functools.partial(_on_mesh, prune.select_order)
merge = functools.partial(_on_mesh, prune.merge)
