"""The shared greedy pieces against NumPy references written as plain loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tops_jax import greedy
from tops_jax import similarity


def _masked_argmax_reference(gain, blocked):
  best, best_gain = None, None
  for i in range(len(gain)):                     # finite free gains first, ties to the lowest index
    if not blocked[i] and np.isfinite(gain[i]) and (best is None or gain[i] > best_gain):
      best, best_gain = i, gain[i]
  if best is None:                               # else the lowest free index
    free = [i for i in range(len(gain)) if not blocked[i]]
    best = free[0] if free else 0
  return best


@pytest.mark.parametrize("seed", range(30))
def test_masked_argmax_matches_a_loop(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 12))
  gain = rng.integers(-2, 3, size=n).astype(np.float32)       # small integers: many exact ties
  specials = rng.random(n)
  gain[specials < 0.2] = np.nan
  gain[(specials >= 0.2) & (specials < 0.3)] = np.inf
  gain[(specials >= 0.3) & (specials < 0.4)] = -np.inf
  blocked = rng.random(n) < 0.4
  assert int(jax.jit(greedy.masked_argmax)(gain, blocked)) == _masked_argmax_reference(gain, blocked)


def test_masked_argmax_never_returns_a_blocked_position_when_gains_are_all_non_finite():
  blocked = np.array([True, True, False, True, False])
  for fill in (np.nan, -np.inf, np.inf):
    assert int(greedy.masked_argmax(np.full(5, fill, np.float32), blocked)) == 2


def _complete_order_reference(order, ok, valid):
  out, seen = [], set()
  for i in order:                                # usable picks keep their place, first occurrence only
    if ok[i] and i not in seen:
      out.append(int(i))
      seen.add(int(i))
  for tier in (ok, valid & ~ok, ~valid):         # then the rest, tier by tier, in index order
    for i in np.flatnonzero(tier):
      if len(out) < len(order) and int(i) not in seen:
        out.append(int(i))
        seen.add(int(i))
  return out


@pytest.mark.parametrize("seed", range(30))
def test_complete_order_matches_a_loop(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 14))
  k = int(rng.integers(1, n + 1))
  order = rng.integers(0, n, size=k).astype(np.int32)          # repeats and unusable picks on purpose
  valid = rng.random(n) < 0.7
  ok = valid & (rng.random(n) < 0.7)
  got = np.asarray(jax.jit(greedy.complete_order)(order, ok, valid)).tolist()
  assert got == _complete_order_reference(order, ok, valid)
  assert len(set(got)) == k


def test_complete_order_is_the_identity_on_distinct_usable_picks():
  ok = np.array([True, False, True, True, True, False])
  order = np.array([4, 0 + 2, 3], np.int32)
  np.testing.assert_array_equal(np.asarray(greedy.complete_order(order, ok, np.ones(6, bool))), order)


def test_topk_order_ranks_non_finite_scores_after_finite_ones_and_invalid_last():
  score = np.array([np.nan, 3.0, np.inf, 1.0, 5.0, -np.inf, 2.0], np.float32)
  valid = np.array([True, True, True, True, False, True, True])
  np.testing.assert_array_equal(np.asarray(greedy.topk_order(score, valid, 7)), [1, 6, 3, 0, 2, 5, 4])


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1.0, 1e20, 1e30])
def test_cosine_similarity_is_scale_free(scale):
  x = np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(similarity.cosine_similarity(x * np.float32(scale))),
                             np.asarray(similarity.cosine_similarity(x)), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(similarity.l2_normalize(x * np.float32(scale))), axis=-1),
                             1.0, rtol=0, atol=1e-6)


def test_l2_normalize_keeps_zero_rows_zero():
  x = np.zeros((2, 4), np.float32)
  x[1] = [3.0, 0.0, 4.0, 0.0]
  np.testing.assert_allclose(np.asarray(similarity.l2_normalize(jnp.asarray(x))), [[0, 0, 0, 0], [0.6, 0, 0.8, 0]],
                             rtol=0, atol=1e-7)
