"""FastV against a NumPy reference: top-k of last-token attention among valid tokens, ties to the lowest index."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tops_jax import fastv
from tops_jax import prune


def np_fastv(relevance, valid, keep):
  ranked = sorted((i for i in range(len(relevance)) if valid[i]), key=lambda i: (-relevance[i], i))
  return np.array(ranked[:keep])


def _case(rng, n, d=6, ties=True, p_valid=0.8):
  features = rng.normal(size=(n, d)).astype(np.float32)
  relevance = (rng.integers(0, 5, size=n) / 4 if ties else rng.random(n)).astype(np.float32)
  valid = rng.random(n) < p_valid
  valid[rng.choice(n, size=max(1, n // 2), replace=False)] = True
  return features, relevance, valid


@pytest.mark.parametrize("n,keep,seed", [(8, 3, 0), (20, 5, 1), (33, 16, 2), (64, 64 // 2, 3), (10, 1, 4)])
def test_matches_reference_with_ties_and_padding(n, keep, seed):
  rng = np.random.default_rng(seed)
  f, r, v = _case(rng, n)
  keep = min(keep, int(v.sum()))
  got = prune.select_order("fastv", f, keep=keep, relevance=r, valid=v)
  np.testing.assert_array_equal(got, np_fastv(r, v, keep))
  np.testing.assert_array_equal(prune.select("fastv", f, keep=keep, relevance=r, valid=v),
                                np.sort(np_fastv(r, v, keep)))


def test_batched_equals_per_row_and_jit_equals_eager():
  rng = np.random.default_rng(5)
  cases = [_case(rng, 24) for _ in range(3)]
  f, r, v = (np.stack(x) for x in zip(*cases))
  keep = int(v.sum(1).min())
  batched = prune.select_order("fastv", f, keep=keep, relevance=r, valid=v)
  for b in range(3):
    eager = fastv.order(jnp.asarray(f[b]), jnp.asarray(r[b]), jnp.asarray(v[b]), None, keep=keep)
    np.testing.assert_array_equal(batched[b], eager)
    np.testing.assert_array_equal(eager, np_fastv(r[b], v[b], keep))


def test_bfloat16_features_do_not_change_the_ranking():
  rng = np.random.default_rng(6)
  f, r, v = _case(rng, 30, ties=False)
  got = prune.select_order("fastv", jnp.asarray(f, jnp.bfloat16), keep=10, relevance=r, valid=v)
  np.testing.assert_array_equal(got, np_fastv(r, v, 10))


def test_too_few_valid_under_jit_fills_lowest_index_padding():
  r = jnp.asarray([0.1, 0.9, 0.5, 0.7, 0.2, 0.3], jnp.float32)
  v = jnp.asarray([False, True, False, True, False, True])
  got = jax.jit(functools.partial(fastv.order, keep=5))(jnp.zeros((6, 2)), r, v, None)
  np.testing.assert_array_equal(got, np.concatenate([np_fastv(np.asarray(r), np.asarray(v), 3), [0, 2]]))


def test_needs_relevance():
  with pytest.raises(ValueError, match="relevance"):
    prune.select("fastv", np.zeros((4, 2), np.float32), keep=2)
