"""`models.pruning.selection`: the stages' `tops_jax.prune` calls, split over a mesh's batch axes."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from models.pruning import selection
from tops_jax import prune


@pytest.mark.parametrize("method", ["tops", "divprune", "random"])
def test_under_a_mesh_each_device_selects_its_rows_as_one_device_would(method):
  """With a mesh set, a batched call splits its rows over the mesh's data x fsdp devices (a shard_map in the traced
  program) and picks what the unsharded call picks, per-row keys included."""
  rng = np.random.RandomState(0)
  feats = rng.randn(8, 40, 16).astype(np.float32)
  rel = rng.rand(8, 40).astype(np.float32)
  valid = rng.rand(8, 40) > 0.2
  kw = dict(keep=6, relevance=rel, valid=valid, key=jax.random.key(2) if method == "random" else None)
  want = prune.select(method, feats, **kw)
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(feats, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    got = selection.select(method, sharded, **kw)
    assert "shard_map" in str(jax.make_jaxpr(lambda f: selection.select(method, f, **kw))(sharded))
  assert "shard_map" not in str(jax.make_jaxpr(lambda f: selection.select(method, f, **kw))(feats))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_merge_and_order_under_a_mesh_match_one_device():
  rng = np.random.RandomState(1)
  feats = rng.randn(8, 30, 16).astype(np.float32)
  rel = rng.rand(8, 30).astype(np.float32)
  keys = rng.randn(8, 30, 16).astype(np.float32)
  kw = dict(keep=5, relevance=rel, keys=keys, dominant=3)
  want_tokens, want_idx = prune.merge("visionzip", feats, **kw)
  want_order = prune.select_order("tops", feats, keep=5, relevance=rel, alpha=0.7, lam=0.3)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    tokens, idx = jax.jit(lambda f: selection.merge("visionzip", f, **kw))(feats)
    order = jax.jit(lambda f, a: selection.select_order("tops", f, keep=5, relevance=rel, alpha=a, lam=0.3))(feats, 0.7)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))
  np.testing.assert_allclose(np.asarray(tokens), np.asarray(want_tokens), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(order), np.asarray(want_order))
