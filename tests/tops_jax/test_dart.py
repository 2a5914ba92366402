"""DART against a NumPy translation of the official `get_retained_image_token` (ZichenWen1/DART; llmc's port is the
same loop): Python sets and lists as the official code builds them, numpy for the torch ops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tops_jax import dart
from tops_jax import prune


def _topk(x, k):
  """torch.topk(x, k).indices of a 1-D array: largest first; ties to the lowest index (unspecified in torch)."""
  return np.argsort(-x, kind="stable")[:k]


def _cosine(a, b):
  """torch.nn.functional.cosine_similarity(a[D], b[M, D], dim=-1)."""
  return (b @ a) / (np.linalg.norm(a) * np.linalg.norm(b, axis=-1))


def np_official(last_layer_state, k_states, start, length, max_num_trunction, pivot_image_token=4,
                pivot_text_token=4):
  """last_layer_state float[S, D] (normed layer-K input), k_states float[S, Dk] (layer K-1 keys, heads
  concatenated) of one unpadded sequence; the image occupies [start, start + length). -> sorted kept positions."""
  token_topk = int(max_num_trunction // (pivot_image_token + pivot_text_token))
  k_image = k_states[start:start + length]
  k_query = k_states[start + length:]
  image_indices = (_topk(np.abs(k_image).sum(-1), pivot_image_token) + start).tolist()
  query_indices = (_topk(np.abs(k_query).sum(-1), pivot_text_token) + start + length).tolist()
  indices_set = set(image_indices + query_indices)
  tmp_set = indices_set.copy()
  valid_indices = set(range(start, start + length))
  valid_indices.difference_update(image_indices)
  for item in list(tmp_set):
    valid_indices_list = list(valid_indices)
    cos_sim = -_cosine(last_layer_state[item], last_layer_state[valid_indices_list])
    top_k_real_indices = [valid_indices_list[i] for i in _topk(cos_sim, token_topk).tolist()]
    indices_set.update(top_k_real_indices)
    valid_indices.difference_update(top_k_real_indices)
  indices_set.difference_update(query_indices)
  return np.array(sorted(indices_set))


def _sequence(rng, start, length, text, d=8, dk=6):
  s = start + length + text
  return rng.normal(size=(s, d)).astype(np.float32), rng.normal(size=(s, dk)).astype(np.float32)


def _ours(states, keys, start, length, budget, **hp):
  img, txt = slice(start, start + length), slice(start + length, None)
  t = states.shape[0] - start - length
  kept = prune.select("dart", states[img], keep=dart.kept_count(budget), keys=keys[img], text_features=states[txt],
                      text_keys=keys[txt], positions=np.arange(start, start + length),
                      text_positions=np.arange(start + length, start + length + t), **hp)
  return np.asarray(kept) + start


@pytest.mark.parametrize("start,length,text,budget,seed", [
    (35, 64, 12, 16, 0), (35, 64, 12, 24, 1), pytest.param(0, 48, 6, 16, 2, marks=pytest.mark.slow), (7, 60, 20, 32, 3),
    pytest.param(100, 40, 9, 8, 4, marks=pytest.mark.slow), pytest.param(3, 64, 5, 40, 5, marks=pytest.mark.slow)])
def test_matches_official(start, length, text, budget, seed):
  rng = np.random.default_rng(seed)
  states, keys = _sequence(rng, start, length, text)
  want = np_official(states.astype(np.float64), keys.astype(np.float64), start, length, budget)
  assert len(want) == dart.kept_count(budget)
  np.testing.assert_array_equal(_ours(states, keys, start, length, budget), want)


def test_the_official_visiting_order_matters():
  # The same inputs visited in the other order keep other tokens, so the order test above can fail.
  differs = 0
  for seed in range(6):
    rng = np.random.default_rng(100 + seed)
    states, keys = _sequence(rng, 35, 64, 12)
    want = np_official(states.astype(np.float64), keys.astype(np.float64), 35, 64, 24)
    differs += not np.array_equal(_ours(states, keys, 35, 64, 24, pivot_order="norm"), want)
  assert differs >= 3


def test_batch_with_padding_matches_official_per_row():
  rng = np.random.default_rng(7)
  n, t, budget = 40, 10, 16
  rows = [(35, 40, 10), (12, 33, 6), (50, 37, 4)]   # (image start, real image tokens, real text tokens)
  feats, keys, valid = np.zeros((3, n, 8), np.float32), np.zeros((3, n, 6), np.float32), np.zeros((3, n), bool)
  tf, tk, tv = np.zeros((3, t, 8), np.float32), np.zeros((3, t, 6), np.float32), np.zeros((3, t), bool)
  pos, tpos = np.zeros((3, n), np.int32), np.zeros((3, t), np.int32)
  wants = []
  for b, (start, length, text) in enumerate(rows):
    states, k = _sequence(rng, start, length, text)
    wants.append(np_official(states.astype(np.float64), k.astype(np.float64), start, length, budget) - start)
    feats[b, :length], keys[b, :length], valid[b, :length] = states[start:start + length], k[start:start + length], 1
    tf[b, :text], tk[b, :text], tv[b, :text] = states[start + length:], k[start + length:], True
    pos[b] = start + np.arange(n)
    tpos[b] = start + length + np.arange(t)
  feats[~valid], keys[~valid] = 50.0, 1e3           # padding with huge norms: it would be a pivot if ranked
  tf[~tv], tk[~tv] = -50.0, 1e3
  kept = prune.select("dart", feats, keep=dart.kept_count(budget), valid=valid, keys=keys, text_features=tf,
                      text_keys=tk, text_valid=tv, positions=pos, text_positions=tpos)
  for b in range(3):
    np.testing.assert_array_equal(kept[b], wants[b])


@pytest.mark.slow
def test_jit_equals_prune():
  rng = np.random.default_rng(8)
  states, keys = _sequence(rng, 35, 40, 8)
  img, txt = slice(35, 75), slice(75, None)
  hp = dict(keys=keys[img], text_features=states[txt], text_keys=keys[txt], positions=np.arange(35, 75),
            text_positions=np.arange(75, 83))
  fn = jax.jit(functools.partial(dart.order, keep=20))
  got = fn(jnp.asarray(states[img]), None, jnp.ones(40, bool), None, **{k: jnp.asarray(v) for k, v in hp.items()})
  np.testing.assert_array_equal(got, prune.select_order("dart", states[img], keep=20, **hp))
  np.testing.assert_array_equal(np.sort(got), np_official(states.astype(np.float64), keys.astype(np.float64),
                                                          35, 40, 16) - 35)


# --- kept count -------------------------------------------------------------------------------------------------

def test_kept_count():
  assert [dart.kept_count(b) for b in (64, 128, 192)] == [68, 132, 196]
  assert [dart.kept_count(b, count="exact") for b in (64, 128, 192)] == [64, 128, 192]
  assert [dart.kept_count(b, num_tokens=2928) for b in (640, 320, 160)] == [644, 324, 164]
  assert dart.kept_count(640, num_tokens=500) == 4 + 8 * (496 // 8)     # min(retain, L - pivots)
  assert dart.kept_count(20, pivots=2, text_pivots=0) == 2 + 2 * 10
  for bad, match in (({"count": "round"}, "count"), ({"pivots": 0}, "pivots"), ({"num_tokens": 4}, "num_tokens")):
    with pytest.raises(ValueError, match=match):
      dart.kept_count(64, **bad)
  with pytest.raises(ValueError, match="budget"):
    dart.kept_count(True)


# --- CPython set order ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_set_iteration_order_is_cpython():
  rng = np.random.default_rng(9)
  fn = jax.jit(jax.vmap(dart.set_iteration_order))
  for m in (8, 5):
    values = np.stack([rng.choice(rng.choice([40, 97, 700, 4000]), m, replace=False) for _ in range(64)])
    values[:8] = np.arange(8)[:, None] * 32 + np.arange(m) * 32 * 8 + 35    # equal residues mod 32: collisions
    valid = rng.random((64, m)) < 0.85
    got = np.asarray(fn(values, valid))
    for v, ok, row in zip(values.tolist(), valid, got.tolist()):
      s = set(x for x, keep in zip(v, ok) if keep)
      want = [v.index(x) for x in s.copy()]
      assert row == want + [-1] * (m - len(want)), (v, ok)
  v = [35, 67, 99, 3, 131, 40, 8, 72]
  assert dart.set_iteration_order(np.array(v), copy=False).tolist() == [v.index(x) for x in set(v)]


# --- the exact-count, norm-order variant (this module's behaviour before it followed the official code) -----------

def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _top(norm, valid, count):
  return sorted((i for i in range(len(norm)) if valid[i]), key=lambda i: (-norm[i], i))[:count]


def np_norm_order(features, valid, keep, pivots=4, keys=None, text=None, text_keys=None, text_valid=None,
                  text_pivots=4):
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


@pytest.mark.parametrize("n,keep,pivots,seed", [(16, 6, 4, 0), pytest.param(40, 11, 3, 2, marks=pytest.mark.slow), (24, 3, 4, 3),
                                                  pytest.param(50, 25, 1, 4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("ties", [False, True])
def test_norm_order_matches_reference(n, keep, pivots, seed, ties):
  rng = np.random.default_rng(seed)
  f, keys, v = _case(rng, n, ties=ties)
  got = prune.select_order("dart", f, keep=keep, valid=v, keys=keys, pivots=pivots, pivot_order="norm")
  np.testing.assert_array_equal(got, np_norm_order(f, v, keep, pivots, keys))
  text = rng.normal(size=(6, f.shape[1])).astype(np.float32)
  tv = np.array([True, False, True, True, False, True])
  got = prune.select_order("dart", f, keep=keep, valid=v, keys=keys, pivots=pivots, text_features=text,
                           text_valid=tv, pivot_order="norm")
  np.testing.assert_array_equal(got, np_norm_order(f, v, keep, pivots, keys, text, None, tv))


@pytest.mark.slow
def test_exact_budget_and_distinct_valid_tokens():
  rng = np.random.default_rng(6)
  f, keys, v = _case(rng, 40, p_valid=0.6)
  text = rng.normal(size=(5, f.shape[1])).astype(np.float32)
  for keep in (1, 5, 17, int(v.sum())):
    got = np.asarray(prune.select_order("dart", f, keep=keep, valid=v, keys=keys, text_features=text))
    assert len(got) == keep and len(set(got.tolist())) == keep and v[got].all()


def test_bfloat16_features():
  rng = np.random.default_rng(8)
  f, keys, v = _case(rng, 24)
  fb = jnp.asarray(f, jnp.bfloat16)
  got = prune.select_order("dart", fb, keep=10, valid=v, keys=keys, pivot_order="norm")
  np.testing.assert_array_equal(got, np_norm_order(np.asarray(fb, np.float32), v, 10, 4, keys))


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
  with pytest.raises(ValueError, match="need text_features"):
    prune.select("dart", f, keep=4, text_positions=np.arange(3))
  with pytest.raises(ValueError, match="pivot_order"):
    prune.select("dart", f, keep=4, pivot_order="set")
  with pytest.raises(ValueError, match="positions must be int"):
    prune.select("dart", f, keep=4, positions=np.arange(7))
  with pytest.raises(ValueError, match="positions must be int"):
    prune.select("dart", f, keep=4, positions=np.zeros(8, np.float32))
