"""DivPrune against a NumPy reference loop: identical pick order, lowest-index ties, batching, bf16, padding fill."""

import jax
import jax.numpy as jnp
import numpy as np
from selection_helpers import assert_bfloat16_matches_float32, assert_order, assert_rows_match_unbatched
from selection_helpers import greedy_picks, jit_select_order, valid_mask
import pytest

from tops_jax import prune


def _reference(features, valid, keep):
  """Max-min diversity greedy written out directly, in float64."""
  x = np.asarray(features, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  dist = 1.0 - x @ x.T
  n = len(x)
  members = [i for i in range(n) if valid[i]]
  seed_score = np.full(n, -np.inf)
  for i in members:
    others = [dist[i, j] for j in members if j != i]
    seed_score[i] = min(others) if others else np.inf
  seed = [int(np.argmax(seed_score))] if members else [0]
  return greedy_picks(n, members, keep, lambda i, picks: min(dist[i, k] for k in picks), seed)


@pytest.mark.parametrize("n,d,keep,seed", [(16, 4, 5, 0), (40, 8, 12, 1), (64, 16, 20, 2), (64, 16, 20, 3),
                                           (24, 3, 24, 4)])
def test_matches_reference(n, d, keep, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  valid = valid_mask(rng, n, keep) if keep < n else np.ones(n, bool)
  with jax.default_matmul_precision("float32"):
    got = prune.select_order("divprune", x, keep=keep, valid=valid)
  assert_order(got, _reference(x, valid, keep), valid)


def test_ties_go_to_lowest_index():
  # One-hot rows make every cosine exactly 0 or 1: tokens 2, 5 duplicate 0 and 7 duplicates 3, so their nearest
  # neighbour distance is 0 while the others tie at 1.
  basis = np.eye(6, dtype=np.float32)
  x = basis[[0, 1, 0, 3, 4, 0, 2, 3, 5, 4]]
  valid = np.array([True, False, True, True, True, True, True, True, True, True])
  got = np.asarray(prune.select_order("divprune", x, keep=8, valid=valid))
  np.testing.assert_array_equal(got, _reference(x, valid, 8))
  # Seed: lowest valid index with a unique direction (3 and 4 have duplicates 7 and 9; 6 and 8 are unique).
  assert got[0] == 6
  # Seed 6, then the remaining distinct directions in index order, then duplicates (min distance 0) by index.
  np.testing.assert_array_equal(got, [6, 0, 3, 4, 8, 2, 5, 7])


def test_batched_rows_match_unbatched():
  rng = np.random.default_rng(7)
  b, n, d, keep = 3, 32, 8, 9
  x = rng.normal(size=(b, n, d)).astype(np.float32)
  valid = np.stack([valid_mask(rng, n, keep, frac) for frac in (1.0, 0.6, 0.4)])
  assert_rows_match_unbatched("divprune", x, keep, lambda r: _reference(x[r], valid[r], keep), valid=valid)


@pytest.mark.slow
def test_bfloat16_matches_float32_of_same_values():
  rng = np.random.default_rng(11)
  x16 = jnp.asarray(rng.normal(size=(48, 12)), jnp.bfloat16)
  want = _reference(np.asarray(x16, np.float32), np.ones(48, bool), 14)
  assert_bfloat16_matches_float32("divprune", x16, 14, want)


def test_fewer_valid_than_keep_under_jit_fills_lowest_invalid():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(20, 6)).astype(np.float32)
  valid = np.zeros(20, bool)
  valid[[3, 8, 11, 17]] = True
  got = jit_select_order("divprune", x, 7, valid=valid)
  np.testing.assert_array_equal(got, _reference(x, valid, 7))
  np.testing.assert_array_equal(got[4:], [0, 1, 2])
  assert len(set(got.tolist())) == 7
