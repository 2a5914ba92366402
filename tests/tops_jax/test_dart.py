"""DART against a NumPy reference of the pivot / least-duplicate rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tops_jax import dart
from tops_jax import prune


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _top(norm, valid, count):
  return sorted((i for i in range(len(norm)) if valid[i]), key=lambda i: (-norm[i], i))[:count]


def np_dart(features, valid, keep, pivots=4, keys=None, text=None, text_keys=None, text_valid=None, text_pivots=4):
  """Pivots by key L1 norm; then pivot after pivot, its quota of least similar candidates (lowest index on ties)."""
  n = len(features)
  p = min(pivots, keep)
  piv = _top(np.abs(features if keys is None else keys).sum(1), valid, p)
  rows = [_unit(features[piv]) @ _unit(features).T]
  if text is not None:
    tv = np.ones(len(text), bool) if text_valid is None else text_valid
    tp = _top(np.abs(text if text_keys is None else text_keys).sum(1), tv, text_pivots)
    rows.append(_unit(text[tp]) @ _unit(features).T)
  sim = np.concatenate(rows)
  picks, active = keep - p, len(sim)
  quota = [picks // active + (j < picks % active) for j in range(active)]
  chosen = list(piv)
  for j in range(active):
    cands = sorted((i for i in range(n) if valid[i] and i not in chosen), key=lambda i: (sim[j, i], i))
    chosen += cands[:quota[j]]
  return np.array(chosen)


def _case(rng, n, d=8, dk=5, p_valid=0.8, ties=False):
  if ties:
    # Rows with four entries of +-1 have norm 2, so every cosine is a multiple of 1/4 and integer keys have integer
    # L1 norms: ties are exact in any summation order (a matmul need not round equal columns equally otherwise).
    features = np.zeros((n, d), np.float32)
    for row in features:
      row[rng.choice(d, size=4, replace=False)] = rng.choice([-1.0, 1.0], size=4)
    keys = rng.integers(-2, 3, size=(n, dk)).astype(np.float32)
  else:
    features = rng.normal(size=(n, d)).astype(np.float32)
    keys = rng.normal(size=(n, dk)).astype(np.float32)
  valid = rng.random(n) < p_valid
  valid[: n // 2] = True
  return features, keys, valid


@pytest.mark.parametrize("n,keep,pivots,seed", [(16, 6, 4, 0), (30, 12, 4, 1), (40, 11, 3, 2), (24, 3, 4, 3),
                                               (50, 25, 1, 4), (20, 4, 4, 5)])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_reference_visual_pivots(n, keep, pivots, seed, ties):
  rng = np.random.default_rng(seed)
  f, keys, v = _case(rng, n, ties=ties)
  got = prune.select_order("dart", f, keep=keep, valid=v, keys=keys, pivots=pivots)
  np.testing.assert_array_equal(got, np_dart(f, v, keep, pivots, keys))
  got = prune.select_order("dart", f, keep=keep, valid=v, pivots=pivots)           # keys default to features
  np.testing.assert_array_equal(got, np_dart(f, v, keep, pivots))


@pytest.mark.parametrize("t,text_pivots,seed", [(6, 4, 0), (3, 4, 1), (10, 2, 2)])
def test_matches_reference_with_text_pivots(t, text_pivots, seed):
  rng = np.random.default_rng(seed)
  f, keys, v = _case(rng, 30)
  text = rng.normal(size=(t, f.shape[1])).astype(np.float32)
  text_keys = rng.normal(size=(t, keys.shape[1])).astype(np.float32)
  text_valid = rng.random(t) < 0.7
  text_valid[0] = True
  want = np_dart(f, v, 14, 4, keys, text, text_keys, text_valid, text_pivots)
  got = prune.select_order("dart", f, keep=14, valid=v, keys=keys, text_features=text, text_keys=text_keys,
                           text_valid=text_valid, text_pivots=text_pivots)
  np.testing.assert_array_equal(got, want)


def test_exact_budget_and_distinct_valid_tokens():
  rng = np.random.default_rng(6)
  f, keys, v = _case(rng, 40, p_valid=0.6)
  for keep in (1, 4, 5, 9, 17, int(v.sum())):
    got = np.asarray(prune.select_order("dart", f, keep=keep, valid=v, keys=keys))
    assert len(got) == keep and len(set(got.tolist())) == keep and v[got].all()


def test_batched_equals_per_row_and_jit_equals_eager():
  rng = np.random.default_rng(7)
  cases = [_case(rng, 20) for _ in range(3)]
  f, keys, v = (np.stack(x) for x in zip(*cases))
  text = rng.normal(size=(3, 5, f.shape[-1])).astype(np.float32)
  tv = rng.random((3, 5)) < 0.6
  batched = prune.select_order("dart", f, keep=9, valid=v, keys=keys, text_features=text, text_valid=tv)
  for b in range(3):
    row = prune.select_order("dart", f[b], keep=9, valid=v[b], keys=keys[b], text_features=text[b], text_valid=tv[b])
    np.testing.assert_array_equal(batched[b], row)
    np.testing.assert_array_equal(row, np_dart(f[b], v[b], 9, 4, keys[b], text[b], None, tv[b]))
  eager = dart.order(jnp.asarray(f[0]), None, jnp.asarray(v[0]), None, keep=9, keys=jnp.asarray(keys[0]),
                     text_features=jnp.asarray(text[0]), text_valid=jnp.asarray(tv[0]))
  np.testing.assert_array_equal(batched[0], eager)


def test_bfloat16_features():
  rng = np.random.default_rng(8)
  f, keys, v = _case(rng, 24)
  fb = jnp.asarray(f, jnp.bfloat16)
  got = prune.select_order("dart", fb, keep=10, valid=v, keys=keys)
  np.testing.assert_array_equal(got, np_dart(np.asarray(fb, np.float32), v, 10, 4, keys))


def test_too_few_valid_under_jit_fills_lowest_unused_padding():
  rng = np.random.default_rng(9)
  f = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  v = jnp.asarray([False, True, False, True, True, False, False, True])
  got = np.asarray(jax.jit(functools.partial(dart.order, keep=6, pivots=2))(f, None, v, None))
  assert sorted(got[:4].tolist()) == [1, 3, 4, 7]
  np.testing.assert_array_equal(got[4:], [0, 2])


def test_bad_hyperparameters():
  f = np.zeros((8, 3), np.float32)
  with pytest.raises(ValueError, match="pivots"):
    prune.select("dart", f, keep=4, pivots=0)
  with pytest.raises(ValueError, match="keys"):
    prune.select("dart", f, keep=4, keys=np.zeros((7, 2), np.float32))
  with pytest.raises(ValueError, match="text_features"):
    prune.select("dart", f, keep=4, text_features=np.zeros((3, 2), np.float32))
  with pytest.raises(ValueError, match="need text_features"):
    prune.select("dart", f, keep=4, text_valid=np.ones(3, bool))
