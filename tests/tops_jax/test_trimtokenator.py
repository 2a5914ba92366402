"""TrimTokenator against a NumPy reference loop (stage-1 MI estimate, top-P cut, Greedy RepMax), float64."""

import jax
import jax.numpy as jnp
import numpy as np
from selection_helpers import assert_bfloat16_matches_float32, assert_order, assert_rows_match_unbatched
from selection_helpers import greedy_picks, jit_select_order, valid_mask
import pytest

from tops_jax import prune
from tops_jax import trimtokenator


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _scores(features, text, text_valid, estimator="l2", sigma=0.5, normalize=True):
  v = _unit(features) if normalize else np.asarray(features, np.float64)
  t = _unit(text) if normalize else np.asarray(text, np.float64)
  t = t[np.asarray(text_valid, bool)]
  out = np.zeros(len(v))
  for i in range(len(v)):
    sq = np.array([np.sum((v[i] - tk) ** 2) for tk in t])
    out[i] = -sq.mean() if estimator == "l2" else np.log(np.mean(np.exp(-sq / (2 * sigma**2))))
  return out


def _reference(features, score, valid, keep, stage1_keep=None):
  n = len(features)
  p = min(n, 2 * keep) if stage1_keep is None else stage1_keep
  ranked = sorted((i for i in range(n) if valid[i]), key=lambda i: (-score[i], i))
  survivors = ranked[:p]
  x = _unit(features)
  dist = 1.0 - x @ x.T
  seed = [survivors[0]] if survivors else [0]
  return greedy_picks(n, survivors, keep, lambda i, picks: sum(dist[i, k] for k in picks), seed)


@pytest.mark.parametrize("estimator", ["l2", "gaussian"])
@pytest.mark.parametrize("normalize", [True, False])
def test_alignment_scores_match_reference(estimator, normalize):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(24, 8)).astype(np.float32)
  text = rng.normal(size=(6, 8)).astype(np.float32)
  text_valid = np.array([True, True, False, True, True, False])
  sigma = 0.7 if normalize else 3.0
  got = trimtokenator.alignment_scores(jnp.asarray(x), jnp.asarray(text), jnp.asarray(text_valid),
                                       mi_estimator=estimator, sigma=sigma, normalize=normalize)
  want = _scores(x, text, text_valid, estimator, sigma, normalize)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,d,t,keep,stage1_keep,seed", [(16, 4, 3, 5, None, 0), (40, 8, 5, 10, None, 1),
                                                         (64, 16, 7, 16, 24, 2), (64, 16, 7, 16, None, 3),
                                                         (32, 8, 4, 8, 8, 4)])
def test_matches_reference_with_text(n, d, t, keep, stage1_keep, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  text = rng.normal(size=(t, d)).astype(np.float32)
  text_valid = np.ones(t, bool)
  text_valid[-1] = False
  valid = valid_mask(rng, n, keep)
  hp = {} if stage1_keep is None else {"stage1_keep": stage1_keep}
  with jax.default_matmul_precision("float32"):
    got = prune.select_order("trimtokenator", x, keep=keep, valid=valid, text=text, text_valid=text_valid, **hp)
  assert_order(got, _reference(x, _scores(x, text, text_valid), valid, keep, stage1_keep), valid)


def test_gaussian_estimator_matches_reference():
  rng = np.random.default_rng(17)
  x = rng.normal(size=(48, 8)).astype(np.float32)
  text = rng.normal(size=(5, 8)).astype(np.float32)
  valid = valid_mask(rng, 48, 10)
  got = prune.select_order("trimtokenator", x, keep=10, valid=valid, text=text, mi_estimator="gaussian", sigma=0.4,
                           stage1_keep=16)
  want = _reference(x, _scores(x, text, np.ones(5, bool), "gaussian", 0.4), valid, 10, 16)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_relevance_fallback_matches_reference():
  rng = np.random.default_rng(18)
  x = rng.normal(size=(40, 8)).astype(np.float32)
  rel = rng.normal(size=40).astype(np.float32)
  valid = valid_mask(rng, 40, 9)
  got = prune.select_order("trimtokenator", x, keep=9, relevance=rel, valid=valid, stage1_keep=20)
  np.testing.assert_array_equal(np.asarray(got), _reference(x, rel, valid, 9, 20))


def test_ties_go_to_lowest_index():
  # Equal relevance: stage 1 keeps the lowest-index valid tokens; one-hot rows make every distance exactly 0 or 1.
  basis = np.eye(4, dtype=np.float32)
  x = basis[[0, 1, 0, 2, 1, 3, 2, 3, 0, 1]]
  rel = np.ones(10, np.float32)
  valid = np.array([False, True, True, True, True, True, True, True, True, True])
  got = np.asarray(prune.select_order("trimtokenator", x, keep=5, relevance=rel, valid=valid, stage1_keep=7))
  np.testing.assert_array_equal(got, _reference(x, rel, valid, 5, 7))
  # Survivors 1..7; seed 1 (e1); then e0 (2), e2 (3), e3 (5) by index; then 4 (e1) beats 6 and 7 on index
  # (each duplicates one kept direction: distance sum 3).
  np.testing.assert_array_equal(got, [1, 2, 3, 5, 4])


def test_batched_rows_match_unbatched():
  rng = np.random.default_rng(10)
  b, n, d, t, keep = 3, 32, 8, 5, 8
  x = rng.normal(size=(b, n, d)).astype(np.float32)
  text = rng.normal(size=(b, t, d)).astype(np.float32)
  text_valid = np.array([[True] * 5, [True, True, True, False, False], [True, False, False, False, False]])
  valid = np.stack([valid_mask(rng, n, keep, frac) for frac in (1.0, 0.6, 0.4)])
  want = lambda r: _reference(x[r], _scores(x[r], text[r], text_valid[r]), valid[r], keep)
  assert_rows_match_unbatched("trimtokenator", x, keep, want, valid=valid, text=text, text_valid=text_valid)


@pytest.mark.slow
def test_bfloat16_matches_float32_of_same_values():
  rng = np.random.default_rng(14)
  x16 = jnp.asarray(rng.normal(size=(48, 12)), jnp.bfloat16)
  t16 = jnp.asarray(rng.normal(size=(6, 12)), jnp.bfloat16)
  x32, t32 = np.asarray(x16, np.float32), np.asarray(t16, np.float32)
  want = _reference(x32, _scores(x32, t32, np.ones(6, bool)), np.ones(48, bool), 12)
  assert_bfloat16_matches_float32("trimtokenator", x16, 12, want, text=t16)


def test_fewer_valid_than_keep_under_jit_fills_lowest_invalid():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(20, 6)).astype(np.float32)
  text = rng.normal(size=(4, 6)).astype(np.float32)
  valid = np.zeros(20, bool)
  valid[[0, 5, 6, 18]] = True
  got = jit_select_order("trimtokenator", x, 7, valid=valid, text=text)
  np.testing.assert_array_equal(got, _reference(x, _scores(x, text, np.ones(4, bool)), valid, 7))
  np.testing.assert_array_equal(got[4:], [1, 2, 3])


def test_bad_arguments_raise():
  x = np.ones((8, 4), np.float32)
  with pytest.raises(ValueError, match="text"):
    prune.select("trimtokenator", x, keep=2)
  with pytest.raises(ValueError, match="text must be"):
    prune.select("trimtokenator", x, keep=2, text=np.ones((3, 5), np.float32))
  with pytest.raises(ValueError, match="text_valid"):
    prune.select("trimtokenator", x, keep=2, text=np.ones((3, 4), np.float32), text_valid=np.ones(4, bool))
  with pytest.raises(ValueError, match="stage1_keep"):
    prune.select("trimtokenator", x, keep=4, text=np.ones((3, 4), np.float32), stage1_keep=3)
  with pytest.raises(ValueError, match="stage1_keep"):
    prune.select("trimtokenator", x, keep=4, text=np.ones((3, 4), np.float32), stage1_keep=9)
  with pytest.raises(ValueError, match="mi_estimator"):
    prune.select("trimtokenator", x, keep=2, text=np.ones((3, 4), np.float32), mi_estimator="knn")
