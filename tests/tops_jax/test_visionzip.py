"""VisionZip against a NumPy reference of the official dominant + contextual rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tops_jax import prune
from tops_jax import visionzip


def np_visionzip(features, relevance, valid, keep, dominant=None, keys=None):
  """Returns (order, merged tokens aligned with sorted(order), sorted(order)), one loop at a time."""
  dom_n = round(keep * 54 / 64) if dominant is None else dominant
  ctx_n = keep - dom_n
  n = len(relevance)
  dom = sorted((i for i in range(n) if valid[i]), key=lambda i: (-relevance[i], i))[:dom_n]
  remaining = [i for i in range(n) if valid[i] and i not in dom]
  f = features.astype(np.float64)
  merged = {i: f[i] for i in dom}
  targets = []
  if ctx_n:
    step = max(1, len(remaining) // ctx_n)
    targets = [remaining[p] for p in range(0, len(remaining), step)[:ctx_n]]
    space = (features if keys is None else keys).astype(np.float64)
    unit = space / np.maximum(np.linalg.norm(space, axis=1, keepdims=True), 1e-12)
    assigned = {t: [] for t in targets}
    for j in remaining:
      if j in targets:
        continue
      sims = [unit[j] @ unit[t] for t in targets]
      assigned[targets[int(np.argmax(sims))]].append(j)   # np.argmax: first maximum
    for t in targets:
      merged[t] = f[t] + (np.mean(f[assigned[t]], axis=0) if assigned[t] else 0.0)
  order = np.array(dom + targets)
  idx = np.sort(order)
  return order, np.stack([merged[i] for i in idx]), idx


def _case(rng, n, d=6, dk=4, p_valid=0.85, tied_keys=False):
  features = rng.normal(size=(n, d)).astype(np.float32)
  relevance = (rng.integers(0, 6, size=n) / 5).astype(np.float32)          # many ties
  valid = rng.random(n) < p_valid
  valid[: n // 2] = True
  if tied_keys:
    # One-hot keys scaled by powers of two: every cosine is exactly 0 or 1, so ties are exact in any precision.
    keys = np.eye(dk, dtype=np.float32)[rng.integers(0, dk, size=n)] * rng.choice([0.5, 1.0, 2.0, 4.0], size=(n, 1))
    keys = keys.astype(np.float32)
  else:
    keys = rng.normal(size=(n, dk)).astype(np.float32)
  return features, relevance, valid, keys


@pytest.mark.parametrize("n,keep,dominant,seed", [
    (16, 6, None, 0), (30, 10, 7, 1), (40, 12, None, 2), (64, 16, 16, 3), (25, 9, 0, 4), (36, 20, 3, 5)])
@pytest.mark.parametrize("tied_keys", [False, True])
def test_matches_reference(n, keep, dominant, seed, tied_keys):
  rng = np.random.default_rng(seed)
  f, r, v, keys = _case(rng, n, tied_keys=tied_keys)
  hp = {} if dominant is None else {"dominant": dominant}
  want_order, want_tokens, want_idx = np_visionzip(f, r, v, keep, dominant, keys)
  np.testing.assert_array_equal(prune.select_order("visionzip", f, keep=keep, relevance=r, valid=v, keys=keys, **hp),
                                want_order)
  tokens, idx = prune.merge("visionzip", f, keep=keep, relevance=r, valid=v, keys=keys, **hp)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(tokens, want_tokens, rtol=0, atol=1e-5)
  # Without keys the features are the similarity space.
  _, want_tokens, want_idx = np_visionzip(f, r, v, keep, dominant)
  tokens, idx = prune.merge("visionzip", f, keep=keep, relevance=r, valid=v, **hp)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(tokens, want_tokens, rtol=0, atol=1e-5)


def test_dominant_default_is_the_official_ratio():
  assert [visionzip.default_dominant(k) for k in (64, 128, 192)] == [54, 108, 162]


def test_targets_add_the_mean_of_their_tokens():
  # One contextual target (the first remaining token, 1) collects tokens 2 and 3; dominant token 0 is unchanged.
  f = np.array([[1.0, 0.0], [2.0, 0.0], [4.0, 2.0], [0.0, 6.0]], np.float32)
  r = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
  tokens, idx = prune.merge("visionzip", f, keep=2, relevance=r, dominant=1)
  np.testing.assert_array_equal(idx, [0, 1])
  np.testing.assert_allclose(tokens, [f[0], f[1] + (f[2] + f[3]) / 2], rtol=0, atol=1e-6)


def test_batched_equals_per_row_and_jit_equals_eager():
  rng = np.random.default_rng(7)
  cases = [_case(rng, 20) for _ in range(3)]
  f, r, v, keys = (np.stack(x) for x in zip(*cases))
  tokens, idx = prune.merge("visionzip", f, keep=8, relevance=r, valid=v, keys=keys, dominant=5)
  order = prune.select_order("visionzip", f, keep=8, relevance=r, valid=v, keys=keys, dominant=5)
  for b in range(3):
    row_tokens, row_idx = prune.merge("visionzip", f[b], keep=8, relevance=r[b], valid=v[b], keys=keys[b], dominant=5)
    np.testing.assert_array_equal(idx[b], row_idx)
    np.testing.assert_allclose(tokens[b], row_tokens, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(order[b], np_visionzip(f[b], r[b], v[b], 8, 5, keys[b])[0])
  args = (jnp.asarray(f[0]), jnp.asarray(r[0]), jnp.asarray(v[0]), None)
  eager_tokens, eager_idx = visionzip.merge(*args, keep=8, dominant=5, keys=jnp.asarray(keys[0]))
  np.testing.assert_array_equal(idx[0], eager_idx)
  np.testing.assert_allclose(tokens[0], eager_tokens, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(order[0], visionzip.order(*args, keep=8, dominant=5))


def test_bfloat16_features_merge_in_float32():
  rng = np.random.default_rng(8)
  f, r, v, keys = _case(rng, 24)
  fb = jnp.asarray(f, jnp.bfloat16)
  tokens, idx = prune.merge("visionzip", fb, keep=8, relevance=r, valid=v, keys=keys)
  _, want_tokens, want_idx = np_visionzip(np.asarray(fb, np.float32), r, v, 8, None, keys)
  assert tokens.dtype == jnp.bfloat16
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(np.asarray(tokens, np.float32), want_tokens, rtol=1e-2, atol=1e-2)


def test_padding_is_never_kept_or_merged():
  rng = np.random.default_rng(9)
  f, r, v, keys = _case(rng, 30, p_valid=0.5)
  f[~v] = 1e6                                        # any padding that leaks into a mean would show
  r[~v] = 10.0                                       # and padding would be dominant if it were ranked
  tokens, idx = prune.merge("visionzip", f, keep=10, relevance=r, valid=v, keys=keys)
  assert v[np.asarray(idx)].all()
  assert np.abs(np.asarray(tokens)).max() < 1e3


def test_too_few_valid_under_jit_fills_unused_padding():
  f = jnp.asarray(np.random.default_rng(10).normal(size=(8, 3)), jnp.float32)
  r = jnp.arange(8, dtype=jnp.float32)
  v = jnp.asarray([True, False, True, False, True, False, False, False])
  got = np.asarray(jax.jit(functools.partial(visionzip.order, keep=6, dominant=2))(f, r, v, None))
  np.testing.assert_array_equal(got[:2], [4, 2])     # best valid tokens first
  np.testing.assert_array_equal(got[2:], [0, 1, 3, 5])   # the one remaining valid target, then unused padding


def test_bad_hyperparameters():
  f = np.zeros((8, 3), np.float32)
  r = np.ones(8, np.float32)
  with pytest.raises(ValueError, match="dominant"):
    prune.select("visionzip", f, keep=4, relevance=r, dominant=5)
  with pytest.raises(ValueError, match="keys"):
    prune.select("visionzip", f, keep=4, relevance=r, keys=np.zeros((7, 2), np.float32))
  with pytest.raises(ValueError, match="relevance"):
    prune.select("visionzip", f, keep=4)
