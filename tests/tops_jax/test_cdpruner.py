"""CDPruner against a NumPy reference: greedy DPP MAP by explicit conditional variances (Schur complements), float64.

The reference never builds Cholesky rows: at each step it scores every candidate j by the conditional variance
L[j, j] - L[j, S] L[S, S]^-1 L[S, j], which is the factor det(L[S + j]) / det(L[S]) the greedy MAP maximises.
"""

import jax
import jax.numpy as jnp
import numpy as np
from selection_helpers import assert_bfloat16_matches_float32, assert_order, assert_rows_match_unbatched
from selection_helpers import jit_select_order, valid_mask
import pytest

from tops_jax import cdpruner
from tops_jax import prune


def _kernel(features, relevance, valid, theta=None):
  x = np.asarray(features, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  rel = np.asarray(relevance, np.float64)
  lo, hi = rel[valid].min(), rel[valid].max()
  r = (rel - lo + 1e-6) / (hi - lo) if hi - lo > 1e-12 else np.ones_like(rel)
  if theta is not None:
    r = np.exp(theta / (2 * (1 - theta)) * r)
  r = np.where(valid, r, 0.0)
  return r[:, None] * (x @ x.T) * r[None, :]


def _reference(features, relevance, valid, keep, theta=None, eps=1e-5):
  kern = _kernel(features, relevance, valid, theta)
  n = len(kern)
  picks, basis = [], []  # basis: picks made by the DPP (the fallback ones do not condition later picks)
  degenerate = False
  while len(picks) < keep:
    free = [i for i in range(n) if valid[i] and i not in picks]
    if not free:
      picks.append(next(i for i in range(n) if i not in picks))
      continue
    cond = np.full(n, -np.inf)
    for j in free:
      if basis:
        lss, lsj = kern[np.ix_(basis, basis)], kern[basis, j]
        cond[j] = kern[j, j] - lsj @ np.linalg.solve(lss, lsj)
      else:
        cond[j] = kern[j, j]
    j = int(np.argmax(cond))
    degenerate = degenerate or cond[j] <= eps
    if degenerate:
      picks.append(free[0])
    else:
      picks.append(j)
      basis.append(j)
  return np.array(picks)


@pytest.mark.parametrize("n,d,keep,seed", [(16, 8, 5, 0), (40, 12, 10, 1), (64, 16, 14, 2), (64, 16, 14, 3),
                                           (32, 16, 12, 4)])
def test_matches_reference(n, d, keep, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  rel = rng.normal(size=n).astype(np.float32)
  valid = valid_mask(rng, n, keep)
  with jax.default_matmul_precision("float32"):
    got = prune.select_order("cdpruner", x, keep=keep, relevance=rel, valid=valid)
  assert_order(got, _reference(x, rel, valid, keep), valid)


def test_theta_sharpening_matches_reference():
  rng = np.random.default_rng(21)
  x = rng.normal(size=(48, 16)).astype(np.float32)
  rel = rng.normal(size=48).astype(np.float32)
  valid = valid_mask(rng, 48, 12)
  got = prune.select_order("cdpruner", x, keep=12, relevance=rel, valid=valid, theta=0.7)
  np.testing.assert_array_equal(np.asarray(got), _reference(x, rel, valid, 12, theta=0.7))
  plain = prune.select_order("cdpruner", x, keep=12, relevance=rel, valid=valid)
  assert not np.array_equal(np.asarray(got), np.asarray(plain))  # the knob changes the selection


def test_rank_exhausted_falls_back_to_index_order():
  # D = 4: after 4 DPP picks every remaining conditional variance is ~0, so the rest come in index order.
  rng = np.random.default_rng(3)
  x = rng.normal(size=(20, 4)).astype(np.float32)
  rel = rng.uniform(0.5, 1.0, size=20).astype(np.float32)
  valid = np.ones(20, bool)
  valid[[0, 2]] = False
  got = np.asarray(prune.select_order("cdpruner", x, keep=9, relevance=rel, valid=valid))
  want = _reference(x, rel, valid, 9)
  np.testing.assert_array_equal(got, want)
  rest = [i for i in range(20) if valid[i] and i not in want[:4]][:5]
  np.testing.assert_array_equal(got[4:], rest)


def test_ties_go_to_lowest_index():
  # One-hot rows and equal relevance: the kernel is exactly 0/1, every d2 starts at 1, and a duplicate of a kept
  # token drops to d2 = 0 exactly.
  basis = np.eye(5, dtype=np.float32)
  x = basis[[1, 0, 1, 2, 0, 3, 4, 3]]
  rel = np.ones(8, np.float32)
  valid = np.array([False, True, True, True, True, True, True, True])
  got = np.asarray(prune.select_order("cdpruner", x, keep=7, relevance=rel, valid=valid))
  np.testing.assert_array_equal(got, _reference(x, rel, valid, 7))
  # Distinct directions by index (1, 2, 3, 5, 6), then the duplicates of kept tokens (4, 7) by index.
  np.testing.assert_array_equal(got, [1, 2, 3, 5, 6, 4, 7])


def test_kernel_relevance_rescales_over_valid_tokens():
  rel = np.array([5.0, 1.0, 3.0, -9.0], np.float32)
  valid = np.array([True, True, True, False])
  got = np.asarray(cdpruner.kernel_relevance(jnp.asarray(rel), jnp.asarray(valid)))
  np.testing.assert_allclose(got, [(4 + 1e-6) / 4, 1e-6 / 4, (2 + 1e-6) / 4, 0.0], rtol=1e-6, atol=0)


def test_batched_rows_match_unbatched():
  rng = np.random.default_rng(8)
  b, n, d, keep = 3, 32, 16, 10
  x = rng.normal(size=(b, n, d)).astype(np.float32)
  rel = rng.normal(size=(b, n)).astype(np.float32)
  valid = np.stack([valid_mask(rng, n, keep, frac) for frac in (1.0, 0.6, 0.4)])
  want = lambda r: _reference(x[r], rel[r], valid[r], keep)
  assert_rows_match_unbatched("cdpruner", x, keep, want, relevance=rel, valid=valid)


@pytest.mark.slow
def test_bfloat16_matches_float32_of_same_values():
  rng = np.random.default_rng(12)
  x16 = jnp.asarray(rng.normal(size=(48, 16)), jnp.bfloat16)
  rel = rng.normal(size=48).astype(np.float32)
  want = _reference(np.asarray(x16, np.float32), rel, np.ones(48, bool), 12)
  assert_bfloat16_matches_float32("cdpruner", x16, 12, want, relevance=rel)


def test_fewer_valid_than_keep_under_jit_fills_lowest_invalid():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(20, 8)).astype(np.float32)
  rel = rng.normal(size=20).astype(np.float32)
  valid = np.zeros(20, bool)
  valid[[2, 9, 13, 16]] = True
  got = jit_select_order("cdpruner", x, 7, relevance=rel, valid=valid)
  np.testing.assert_array_equal(got, _reference(x, rel, valid, 7))
  np.testing.assert_array_equal(got[4:], [0, 1, 3])


def test_missing_relevance_raises():
  with pytest.raises(ValueError, match="relevance"):
    prune.select("cdpruner", np.ones((8, 4), np.float32), keep=2)
