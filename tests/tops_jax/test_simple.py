"""Random subsets and spatial pooling: determinism per key, validity, windows and window means."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tops_jax import prune
from tops_jax import simple

# ---------------------------------------------------------------------------------------------------- random


def test_random_same_key_same_indices_different_keys_differ():
  f = np.zeros((64, 3), np.float32)
  a = prune.select_order("random", f, keep=8, key=jax.random.key(0))
  np.testing.assert_array_equal(a, prune.select_order("random", f, keep=8, key=jax.random.key(0)))
  others = [prune.select("random", f, keep=8, key=jax.random.key(s)) for s in range(1, 4)]
  assert all(not np.array_equal(np.sort(a), o) for o in others)


def test_random_never_invalid_and_distinct():
  rng = np.random.default_rng(0)
  v = rng.random((4, 30)) < 0.5
  v[:, :10] = True
  f = np.zeros((4, 30, 2), np.float32)
  got = np.asarray(prune.select("random", f, keep=10, valid=v, key=jax.random.key(1)))
  for b in range(4):
    assert v[b, got[b]].all() and len(set(got[b].tolist())) == 10


def test_random_batched_rows_use_fold_in_and_jit_equals_eager():
  key = jax.random.key(2)
  f = np.zeros((3, 20, 2), np.float32)
  v = np.ones((3, 20), bool)
  batched = prune.select_order("random", f, keep=5, valid=v, key=key)
  for b in range(3):
    eager = simple.random_order(jnp.asarray(f[b]), None, jnp.asarray(v[b]), jax.random.fold_in(key, b), keep=5)
    np.testing.assert_array_equal(batched[b], eager)
    u = np.asarray(jax.random.uniform(jax.random.fold_in(key, b), (20,), dtype=jnp.float32))
    np.testing.assert_array_equal(eager, np.argsort(-u, kind="stable")[:5])     # the K largest uniform scores


def test_random_is_roughly_uniform_over_valid_tokens():
  v = jnp.asarray(np.arange(12) % 3 != 0)                  # 8 valid tokens
  keys = jax.random.split(jax.random.key(3), 4000)
  fn = jax.jit(jax.vmap(functools.partial(simple.random_order, keep=2), in_axes=(None, None, None, 0)))
  picks = np.asarray(fn(jnp.zeros((12, 1)), None, v, keys))
  counts = np.bincount(picks.reshape(-1), minlength=12)
  assert counts[~np.asarray(v)].sum() == 0
  expected = 4000 * 2 / 8
  assert np.all(np.abs(counts[np.asarray(v)] - expected) < 5 * math.sqrt(expected))


def test_random_needs_key():
  with pytest.raises(ValueError, match="key"):
    prune.select("random", np.zeros((4, 2), np.float32), keep=2)


# ---------------------------------------------------------------------------------------------------- pooling


def np_block_means(x, gh, gw, bh, bw):
  """Means of non-overlapping bh x bw blocks of a gh x gw grid of tokens x float[N, D], raster order."""
  d = x.shape[-1]
  blocks = x.reshape(gh // bh, bh, gw // bw, bw, d).astype(np.float64)
  return blocks.mean(axis=(1, 3)).reshape(-1, d)


@pytest.mark.parametrize("side,keep", [(4, 4), (6, 4), (6, 9), (24, 64), (24, 144), (8, 16)])
def test_pooling_equals_block_pooling_when_blocks_fit(side, keep):
  rng = np.random.default_rng(side + keep)
  f = rng.normal(size=(side * side, 5)).astype(np.float32)
  p = math.isqrt(keep)
  b = side // p
  tokens, idx = prune.merge("pooling", f, keep=keep)
  np.testing.assert_allclose(tokens, np_block_means(f, side, side, b, b), rtol=0, atol=1e-5)
  # Representative: the token at the block centre (top-left of the central 2 x 2 for even blocks).
  centre = [(i * b + (b - 1) // 2) * side + j * b + (b - 1) // 2 for i in range(p) for j in range(p)]
  np.testing.assert_array_equal(idx, centre)
  np.testing.assert_array_equal(prune.select_order("pooling", f, keep=keep), centre)


def test_pooling_rectangular_grid():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(2, 6 * 9, 3)).astype(np.float32)
  tokens, idx = prune.merge("pooling", f, keep=6, grid=(6, 9))                  # 2 x 3 windows of 3 x 3
  for b in range(2):
    np.testing.assert_allclose(tokens[b], np_block_means(f[b], 6, 9, 3, 3), rtol=0, atol=1e-5)
  np.testing.assert_array_equal(idx[0], [1 * 9 + 1, 1 * 9 + 4, 1 * 9 + 7, 4 * 9 + 1, 4 * 9 + 4, 4 * 9 + 7])


@pytest.mark.parametrize("grid,keep", [((24, 24), 128), ((24, 24), 32), ((5, 7), 11), ((3, 3), 2), ((4, 6), 24),
                                       ((1, 10), 3), ((12, 4), 7)])
def test_pooling_windows_partition_the_grid(grid, keep):
  windows = simple.pooling_windows(grid, keep)
  assert len(windows) == keep
  cover = np.zeros(grid, int)
  for r0, r1, c0, c1 in windows:
    assert 0 <= r0 < r1 <= grid[0] and 0 <= c0 < c1 <= grid[1]
    cover[r0:r1, c0:c1] += 1
  np.testing.assert_array_equal(cover, 1)
  areas = [(r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in windows]
  assert max(areas) <= 3 * min(areas)                      # no degenerate slivers next to huge windows


def np_pooling(f, valid, grid, keep):
  """Representatives and means from the window list, one window at a time."""
  gh, gw = grid
  reps, means = [], []
  for r0, r1, c0, c1 in simple.pooling_windows(grid, keep):
    cr, cc = (r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2
    members = [r * gw + c for r in range(r0, r1) for c in range(c0, c1) if valid[r * gw + c]]
    if members:
      reps.append(min(members, key=lambda i: ((i // gw - cr) ** 2 + (i % gw - cc) ** 2, i)))
      means.append(f[members].astype(np.float64).mean(0))
    else:
      reps.append(None)
      means.append(None)
  spare = iter(i for i in range(gh * gw) if valid[i] and i not in reps)
  for w, r in enumerate(reps):
    if r is None:
      reps[w] = next(spare)
      means[w] = f[reps[w]].astype(np.float64)
  order = np.array(reps)
  perm = np.argsort(order)
  return order, np.stack(means)[perm], order[perm]


@pytest.mark.parametrize("grid,keep,seed", [((6, 6), 9, 0), ((24, 24), 128, 1), ((5, 7), 11, 2), ((8, 8), 6, 3)])
def test_pooling_with_padding_matches_reference(grid, keep, seed):
  rng = np.random.default_rng(seed)
  n = grid[0] * grid[1]
  f = rng.normal(size=(n, 4)).astype(np.float32)
  v = rng.random(n) < 0.7
  v[: grid[1] * (grid[0] // 2)] = False                    # the whole top half is padding: some windows are empty
  want_order, want_tokens, want_idx = np_pooling(f, v, grid, keep)
  np.testing.assert_array_equal(prune.select_order("pooling", f, keep=keep, valid=v, grid=grid), want_order)
  tokens, idx = prune.merge("pooling", f, keep=keep, valid=v, grid=grid)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(tokens, want_tokens, rtol=0, atol=1e-5)
  assert v[np.asarray(idx)].all()


def test_pooling_batched_equals_per_row_and_jit_equals_eager():
  rng = np.random.default_rng(4)
  f = rng.normal(size=(3, 36, 4)).astype(np.float32)
  v = rng.random((3, 36)) < 0.8
  v[:, :10] = True
  tokens, idx = prune.merge("pooling", f, keep=7, valid=v)
  for b in range(3):
    row_tokens, row_idx = prune.merge("pooling", f[b], keep=7, valid=v[b])
    np.testing.assert_array_equal(idx[b], row_idx)
    np.testing.assert_allclose(tokens[b], row_tokens, rtol=0, atol=1e-6)
  eager_tokens, eager_idx = simple.pooling_merge(jnp.asarray(f[0]), None, jnp.asarray(v[0]), None, keep=7)
  np.testing.assert_array_equal(idx[0], eager_idx)
  np.testing.assert_allclose(tokens[0], eager_tokens, rtol=0, atol=1e-6)


def test_pooling_bfloat16_keeps_dtype():
  f = jnp.asarray(np.random.default_rng(5).normal(size=(16, 3)), jnp.bfloat16)
  tokens, _ = prune.merge("pooling", f, keep=4)
  assert tokens.dtype == jnp.bfloat16
  want = np_block_means(np.asarray(f, np.float32), 4, 4, 2, 2)
  np.testing.assert_allclose(np.asarray(tokens, np.float32), want, rtol=1e-2, atol=1e-2)


def test_pooling_too_few_valid_under_jit_fills_unused_padding():
  v = jnp.zeros(16, bool).at[jnp.asarray([5, 6])].set(True)
  got = np.asarray(jax.jit(functools.partial(simple.pooling_order, keep=4))(jnp.zeros((16, 1)), None, v, None))
  assert sorted(got.tolist()) == [0, 1, 5, 6]                # both valid tokens, then the lowest unused padding


def test_pooling_bad_grids():
  with pytest.raises(ValueError, match="perfect square"):
    prune.select("pooling", np.zeros((12, 2), np.float32), keep=4)
  with pytest.raises(ValueError, match="holds"):
    prune.select("pooling", np.zeros((12, 2), np.float32), keep=4, grid=(3, 5))
  with pytest.raises(ValueError, match="tuple"):
    prune.select("pooling", np.zeros((12, 2), np.float32), keep=4, grid=(3, 4.0))
