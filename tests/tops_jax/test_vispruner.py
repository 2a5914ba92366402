"""VisPruner against a NumPy transcription of the official `encode_images` loop (Theia-4869/VisPruner)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tops_jax import prune
from tops_jax import vispruner


def np_vispruner(features, relevance, valid, keep, important=None, removals=8):
  """The official selection, one torch op at a time (batch 1, padding removed first); returns the order."""
  n = len(relevance)
  imp = int(keep * 0.5) if important is None else important
  diverse = keep - imp
  tokens = [i for i in range(n) if valid[i]]
  token_indices = sorted(tokens, key=lambda i: (-relevance[i], i))          # argsort(descending=True), stable
  important_indices = token_indices[:imp]
  residual = np.array(token_indices[imp:])
  x = features.astype(np.float64)
  normalized = x / np.linalg.norm(x, axis=-1, keepdims=True)
  while diverse > 0:
    big_r = len(residual)
    r = min(removals, big_r - diverse)
    if r <= 0:
      break
    residual_tokens = normalized[residual]
    a, b = residual_tokens[::2], residual_tokens[1::2]
    scores = (a @ b.T).max(axis=-1)
    distinct = np.argsort(-scores, kind="stable")[r:]
    residual = np.concatenate([residual[::2][distinct], residual[1::2]])
  selected = important_indices + (residual.tolist() if diverse > 0 else [])
  return np.array(selected, dtype=np.int64)


def _case(rng, n, d=6, p_valid=0.85, tied=False):
  if tied:
    # One-hot features scaled by powers of two: every cosine is exactly 0 or 1, so duplicate scores tie exactly.
    features = np.eye(d, dtype=np.float32)[rng.integers(0, d, size=n)] * rng.choice([0.5, 1.0, 2.0], size=(n, 1))
  else:
    features = rng.normal(size=(n, d))
  relevance = rng.integers(0, 7, size=n) / 6                                 # many ties
  valid = rng.random(n) < p_valid
  valid[: n // 2] = True
  return features.astype(np.float32), relevance.astype(np.float32), valid


@pytest.mark.parametrize("n,keep,important,seed", [
    (16, 6, None, 0), (30, 10, 7, 1), (64, 16, 8, 3), (64, 9, 1, 4), (36, 20, 0, 5), (50, 14, 14, 6),
    (80, 6, 3, 7)])
@pytest.mark.parametrize("tied", [False, True])
def test_matches_reference(n, keep, important, seed, tied):
  rng = np.random.default_rng(seed)
  f, r, v = _case(rng, n, tied=tied)
  hp = {} if important is None else {"important": important}
  want = np_vispruner(f, r, v, keep, important)
  got = np.asarray(prune.select_order("vispruner", f, keep=keep, relevance=r, valid=v, **hp))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.asarray(prune.select("vispruner", f, keep=keep, relevance=r, valid=v, **hp)),
                                np.sort(want))


@pytest.mark.parametrize("removals", [1, 3, 5])
def test_removals_per_iteration_match_reference(removals):
  rng = np.random.default_rng(11)
  f, r, v = _case(rng, 48)
  got = prune.select_order("vispruner", f, keep=10, relevance=r, valid=v, removals=removals)
  np.testing.assert_array_equal(np.asarray(got), np_vispruner(f, r, v, 10, removals=removals))


def test_official_sizes_576_tokens():
  # The LLaVA-1.5 shapes: 576 patches, (T, ratio) = (64, 0.75) (the README's MME example) and (192, 0.5).
  # Exactly tied cosines (0 or 1): over ~50 iterations of 240 max-scores, random features would meet float32 vs
  # float64 near-ties (1e-7 apart) that reorder the residual; exact ties test the stable tie-breaking instead.
  rng = np.random.default_rng(12)
  f, _, _ = _case(rng, 576, d=24, tied=True)
  r = rng.random(576).astype(np.float32)
  v = np.ones(576, bool)
  for keep, ratio in ((64, 0.75), (192, 0.5)):
    imp = vispruner.default_important(keep, ratio)
    got = prune.select_order("vispruner", f, keep=keep, relevance=r, important=imp)
    np.testing.assert_array_equal(np.asarray(got), np_vispruner(f, r, v, keep, imp))


def test_hand_checked_small_case():
  # Relevance ranks tokens 0 > 1 > ... > 8; important=1 keeps [0] and leaves the residual [1..8] (R = 8):
  # a = [1, 3, 5, 7], b = [2, 4, 6, 8]. Tokens 1, 3, 7 duplicate a b token (score 1), 5 duplicates none (score 0),
  # so the a tokens sorted by score descending (stable) are [1, 3, 7, 5].
  e = np.eye(4, dtype=np.float32)
  f = e[[3, 1, 1, 2, 2, 3, 0, 0, 0]]
  r = np.arange(9, 0, -1).astype(np.float32)

  def got(keep):
    return np.asarray(prune.select_order("vispruner", f, keep=keep, relevance=r, important=1)).tolist()
  # keep 6 (D = 5): r = 3 drops [1, 3, 7]; residual [5, 2, 4, 6, 8] has D tokens: done.
  assert got(6) == [0, 5, 2, 4, 6, 8]
  # keep 5 (D = 4): r = 4 drops every a token; residual = b = [2, 4, 6, 8]: done.
  assert got(5) == [0, 2, 4, 6, 8]
  # keep 4 (D = 3): r = 5 > 4 a tokens: all dropped (torch's R // 2 - r = -1 case), residual [2, 4, 6, 8];
  # then r = 1 with a = [2, 6], b = [4, 8]: 6 duplicates 8, so 6 goes; residual [2, 4, 8].
  assert got(4) == [0, 2, 4, 8]
  for keep in (4, 5, 6):
    assert got(keep) == np_vispruner(f, r, np.ones(9, bool), keep, 1).tolist()


def test_residual_order_is_relevance_order_not_index_order():
  # Two identical tokens 0 and 3: they pair only if they land on different parities of the relevance order.
  f = np.array([[1, 0], [0, 1], [1, 1], [1, 0], [-1, 1], [1, -1]], np.float32)
  r = np.array([0.1, 0.5, 0.4, 0.3, 0.2, 0.6], np.float32)       # order 5, 1, 2, 3, 4, 0
  got = np.asarray(prune.select_order("vispruner", f, keep=4, relevance=r, important=1))
  np.testing.assert_array_equal(got, np_vispruner(f, r, np.ones(6, bool), 4, 1))
  assert got[0] == 5


def test_default_important_is_the_official_expression():
  assert vispruner.default_important(64) == 32
  assert vispruner.default_important(64, 0.75) == 48
  assert vispruner.default_important(128) == 64
  assert vispruner.default_important(192, 0.5) == 96
  assert vispruner.default_important(10, 0.33) == 3                  # int() truncates


def test_batch_with_padding_and_jit_equal_per_row_reference():
  rng = np.random.default_rng(13)
  cases = [_case(rng, 40, p_valid=p) for p in (1.0, 0.7, 0.5)]
  f, r, v = (np.stack(x) for x in zip(*cases))
  got = np.asarray(prune.select_order("vispruner", f, keep=12, relevance=r, valid=v, important=5))
  for b in range(3):
    np.testing.assert_array_equal(got[b], np_vispruner(f[b], r[b], v[b], 12, 5))
    assert v[b][got[b]].all()
  fn = jax.jit(functools.partial(vispruner.order, keep=12, important=5))
  for b in range(3):
    np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(f[b]), jnp.asarray(r[b]), jnp.asarray(v[b]))), got[b])


def test_padding_is_never_kept():
  rng = np.random.default_rng(14)
  f, r, v = _case(rng, 40, p_valid=0.5)
  r[~v] = 10.0                                     # padding would be important if it were ranked
  got = np.asarray(prune.select("vispruner", f, keep=int(v.sum()) - 2, relevance=r, valid=v))
  assert v[got].all()


def test_bad_input():
  f = np.zeros((8, 3), np.float32)
  r = np.ones(8, np.float32)
  with pytest.raises(ValueError, match=r"vispruner: important=5 must lie in \[0, 4\]"):
    prune.select("vispruner", f, keep=4, relevance=r, important=5)
  with pytest.raises(ValueError, match="vispruner: important must be a Python int"):
    prune.select("vispruner", f, keep=4, relevance=r, important=2.0)
  with pytest.raises(ValueError, match="vispruner: removals=0 must be >= 1"):
    prune.select("vispruner", f, keep=4, relevance=r, removals=0)
  with pytest.raises(ValueError, match="vispruner: this method needs a relevance vector"):
    prune.select("vispruner", f, keep=4)
