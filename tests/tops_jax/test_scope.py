"""SCOPE against a NumPy reference that scores candidates with the facility-location set function itself, float64."""

import jax
import jax.numpy as jnp
import numpy as np
from selection_helpers import assert_bfloat16_matches_float32, assert_order, assert_rows_match_unbatched
from selection_helpers import jit_select_order, valid_mask
import pytest

from tops_jax import prune


def _reference(features, relevance, valid, keep, alpha=1.0, combine="multiply"):
  x = np.asarray(features, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  sim = x @ x.T
  n = len(x)
  members = [j for j in range(n) if valid[j]]
  saliency = np.maximum(np.asarray(relevance, np.float64), 0.0) ** alpha

  def coverage(kept):  # f(S) = sum over valid j of max(0, max_{k in S} F[j, k])
    if not kept:
      return 0.0
    return sum(max(0.0, max(sim[j, k] for k in kept)) for j in members)

  picks = []
  while len(picks) < keep:
    free = [i for i in members if i not in picks]
    if not free:
      picks.append(next(i for i in range(n) if i not in picks))
      continue
    base = coverage(picks)
    score = np.full(n, -np.inf)
    for i in free:
      gain = coverage(picks + [i]) - base
      score[i] = saliency[i] * gain if combine == "multiply" else saliency[i] + gain
    picks.append(int(np.argmax(score)))
  return np.array(picks)


@pytest.mark.parametrize("n,d,keep,seed", [(16, 4, 5, 0), (40, 8, 12, 1), (64, 16, 16, 2), (64, 16, 16, 3)])
def test_matches_reference(n, d, keep, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  rel = rng.uniform(0.05, 1.0, size=n).astype(np.float32)
  valid = valid_mask(rng, n, keep)
  with jax.default_matmul_precision("float32"):
    got = prune.select_order("scope", x, keep=keep, relevance=rel, valid=valid)
  assert_order(got, _reference(x, rel, valid, keep), valid)


@pytest.mark.parametrize("combine", ["multiply", "add"])
def test_dense_engine_matches_reference(combine):
  # The default engine carries the coverage gain; the dense one, kept for comparisons, recomputes it every step.
  rng = np.random.default_rng(17)
  x = rng.normal(size=(50, 8)).astype(np.float32)
  rel = rng.uniform(0.05, 1.0, size=50).astype(np.float32)
  valid = valid_mask(rng, 50, 15)
  got = prune.select_order("scope", x, keep=15, relevance=rel, valid=valid, combine=combine, engine="dense")
  np.testing.assert_array_equal(np.asarray(got), _reference(x, rel, valid, 15, combine=combine))


@pytest.mark.parametrize("alpha,combine", [(0.5, "multiply"), (2.0, "multiply"), (1.0, "add")])
def test_alpha_and_combine_match_reference(alpha, combine):
  rng = np.random.default_rng(31)
  x = rng.normal(size=(40, 8)).astype(np.float32)
  rel = rng.uniform(0.0, 1.0, size=40).astype(np.float32)
  valid = valid_mask(rng, 40, 10)
  got = prune.select_order("scope", x, keep=10, relevance=rel, valid=valid, alpha=alpha, combine=combine)
  np.testing.assert_array_equal(np.asarray(got), _reference(x, rel, valid, 10, alpha, combine))


def test_ties_go_to_lowest_index():
  # One-hot rows: every similarity is exactly 0 or 1, so the gain of a token is the number of uncovered valid
  # tokens sharing its direction, and equal saliency makes equal counts tie exactly.
  basis = np.eye(5, dtype=np.float32)
  x = basis[[0, 1, 1, 2, 0, 1, 3, 2, 4]]
  rel = np.ones(9, np.float32)
  valid = np.array([True, False, True, True, True, True, True, True, True])
  got = np.asarray(prune.select_order("scope", x, keep=6, relevance=rel, valid=valid))
  np.testing.assert_array_equal(got, _reference(x, rel, valid, 6))
  # Gains: e0 {0, 4} = 2, e1 {2, 5} = 2 (1 is padding), e2 {3, 7} = 2, e3 {6} = 1, e4 {8} = 1; then duplicates add 0.
  np.testing.assert_array_equal(got, [0, 2, 3, 6, 8, 4])


def test_batched_rows_match_unbatched():
  rng = np.random.default_rng(9)
  b, n, d, keep = 3, 32, 8, 9
  x = rng.normal(size=(b, n, d)).astype(np.float32)
  rel = rng.uniform(0.05, 1.0, size=(b, n)).astype(np.float32)
  valid = np.stack([valid_mask(rng, n, keep, frac) for frac in (1.0, 0.6, 0.4)])
  want = lambda r: _reference(x[r], rel[r], valid[r], keep)
  assert_rows_match_unbatched("scope", x, keep, want, relevance=rel, valid=valid)


@pytest.mark.slow
def test_bfloat16_matches_float32_of_same_values():
  rng = np.random.default_rng(13)
  x16 = jnp.asarray(rng.normal(size=(48, 12)), jnp.bfloat16)
  rel = rng.uniform(0.05, 1.0, size=48).astype(np.float32)
  want = _reference(np.asarray(x16, np.float32), rel, np.ones(48, bool), 12)
  assert_bfloat16_matches_float32("scope", x16, 12, want, relevance=rel)


def test_fewer_valid_than_keep_under_jit_fills_lowest_invalid():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(20, 6)).astype(np.float32)
  rel = rng.uniform(0.05, 1.0, size=20).astype(np.float32)
  valid = np.zeros(20, bool)
  valid[[1, 7, 12, 19]] = True
  got = jit_select_order("scope", x, 7, relevance=rel, valid=valid)
  np.testing.assert_array_equal(got, _reference(x, rel, valid, 7))
  np.testing.assert_array_equal(got[4:], [0, 2, 3])


def test_bad_arguments_raise():
  x = np.ones((8, 4), np.float32)
  with pytest.raises(ValueError, match="relevance"):
    prune.select("scope", x, keep=2)
  with pytest.raises(ValueError, match="combine"):
    prune.select("scope", x, keep=2, relevance=np.ones(8, np.float32), combine="max")
  with pytest.raises(ValueError, match="engine must be one of"):
    prune.select("scope", x, keep=2, relevance=np.ones(8, np.float32), engine="sparse")
  with pytest.raises(ValueError, match="chunk must be a positive int"):
    prune.select("scope", x, keep=2, relevance=np.ones(8, np.float32), chunk=-4)
