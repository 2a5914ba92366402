"""PruMerge+ against a NumPy transcription of the official `token_prune_merge_advanced_plus` (42Shawn/LLaVA-PruMerge)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tops_jax import prumerge
from tops_jax import prune


_sequence = jax.jit(prumerge.merge_sequence, static_argnames=("keep", "mode", "dedup", "neighbors"))


def _topk(values, k):
  """torch.topk(largest=True, sorted=True) positions, ties to the earlier position."""
  return np.argsort(-np.asarray(values, np.float64), kind="stable")[:k]


def np_complement_idx(idx, dim):
  """The official `complement_idx(idx, dim)`, op for op: scatter 0 into arange(dim) at idx, sort, drop len(idx).

  With a repeated index the result is dim - len(idx) long: the d smallest indices not in idx are dropped with the
  zeros (d = len(idx) - distinct indices; index 0, when not in idx, is one of them)."""
  masked = np.arange(dim)
  masked[np.asarray(idx, np.int64)] = 0                               # torch.scatter(a, -1, idx, 0)
  return np.sort(masked, kind="stable")[len(idx):]                    # torch.sort(...)[n_idx:]


def np_prumerge_plus(features, cls_attn, keys, valid, mode="adaptive", keep=None, neighbors=32, dedup=False):
  """The official function, one torch op at a time, on the valid tokens of one image (batch 1).

  Returns (merged kept tokens in the official order followed by the extra token, kept ids in the official order).
  The documented deviations are the marked lines only (no-outlier rule; fixed mode: a strided sequence of another
  length than K - K // 2, and the `dedup` option).
  """
  ids = np.flatnonzero(valid)
  image_features = features[ids].astype(np.float64)
  attn = cls_attn[ids].astype(np.float32)
  key_wo_cls = keys[ids].astype(np.float64)
  n = len(ids)
  if mode == "adaptive":
    attn_np = attn.astype(np.float32).flatten()                      # outlier_dectection
    q1 = np.percentile(attn_np, 25)
    q3 = np.percentile(attn_np, 75)
    iqr = q3 - q1
    upper_bound = q3 + 1.5 * iqr
    outlier_indices = np.where(attn_np > upper_bound)[0]
    reduction_ratio = len(outlier_indices) / len(attn_np)
    if reduction_ratio == 0:
      reduction_ratio = 1 / n                                          # deviation: no outlier -> the top token
    idx = _topk(attn, int(n * reduction_ratio)).tolist()
    step_length = int(1 / reduction_ratio)
    arithmetic_sequence = range(0, n - 1, max(int(step_length / 3), 1))  # 575 = N - 1
    filtered_sequence = [x for x in arithmetic_sequence if x not in idx]
    idx = idx + filtered_sequence
  else:
    reduction_ratio = (keep // 2) / n
    idx = _topk(attn, int(n * reduction_ratio)).tolist()
    step_length = int(1 / reduction_ratio) if keep // 2 else n
    arithmetic_sequence = list(range(int(step_length / 2), n - 1, int(step_length)))
    arithmetic_sequence = arithmetic_sequence[:keep - keep // 2]      # deviation: cut a longer sequence
    if dedup:
      arithmetic_sequence = [x for x in arithmetic_sequence if x not in idx]   # option: no duplicate
    idx = idx + arithmetic_sequence                                   # torch.cat, duplicates kept
    for x in _topk(attn, n):                                          # deviation: fill a short sequence
      if len(idx) == keep:
        break
      if x not in idx:
        idx.append(int(x))
  x_others = image_features[idx]
  x_others_attn = attn[idx].astype(np.float64)
  compl = np_complement_idx(idx, n)
  non_topk = image_features[compl]
  non_topk_key = key_wo_cls[compl]
  non_topk_attn = attn[compl].astype(np.float64)

  def normalize(k):                                                   # F.normalize(p=2, eps=1e-12)
    return k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)

  key_others_norm = normalize(key_wo_cls[idx])
  non_topk_key_norm = normalize(non_topk_key)
  left_tokens = len(idx)
  updated_x_others = np.zeros_like(x_others)
  for i in range(left_tokens):
    rest_x_others = np.concatenate([x_others[:i], x_others[i + 1:], non_topk])
    rest_x_others_attn = np.concatenate([x_others_attn[:i], x_others_attn[i + 1:], non_topk_attn])
    rest_keys = np.concatenate([key_others_norm[:i], key_others_norm[i + 1:], non_topk_key_norm])
    cos_sim = rest_keys @ key_others_norm[i]
    cluster_indices = _topk(cos_sim, min(neighbors, len(cos_sim)))    # deviation: k <= tokens available
    weighted_avg = np.sum(rest_x_others[cluster_indices] * rest_x_others_attn[cluster_indices][:, None], axis=0)
    updated_x_others[i] = x_others[i] + weighted_avg
  extra_one_token = np.sum(non_topk * non_topk_attn[:, None], axis=0)
  return np.concatenate([updated_x_others, extra_one_token[None]]), ids[idx]


def _case(rng, n, d=6, dk=5, p_valid=1.0, tied_keys=False):
  features = rng.normal(size=(n, d)).astype(np.float32)
  # Heavy-tailed attention-like weights: a few IQR outliers.
  relevance = rng.lognormal(0.0, 1.0, size=n).astype(np.float32) / n
  valid = rng.random(n) < p_valid
  valid[: n // 2] = True
  if tied_keys:
    # One-hot keys scaled by powers of two: every cosine is exactly 0 or 1, so neighbour ties are exact.
    keys = np.eye(dk, dtype=np.float32)[rng.integers(0, dk, size=n)] * rng.choice([0.5, 1.0, 2.0], size=(n, 1))
  else:
    keys = rng.normal(size=(n, dk))
  return features, relevance, valid, keys.astype(np.float32)


def _check_sequence(out, want_tokens, want_ids, keep):
  count = len(want_ids)
  assert int(out.count) == count
  packed = min(count, keep)
  np.testing.assert_array_equal(np.asarray(out.mask), np.arange(keep + 1) <= packed)
  np.testing.assert_array_equal(np.asarray(out.indices)[:packed], want_ids[:packed])
  tokens = np.asarray(out.tokens)
  np.testing.assert_allclose(tokens[:packed], want_tokens[:packed], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tokens[packed + 1:], 0.0)
  if packed == count:
    np.testing.assert_allclose(tokens[packed], want_tokens[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("n,seed,p_valid,neighbors,tied_keys", [
    (40, 0, 1.0, 32, False), (64, 1, 1.0, 32, True), (50, 2, 0.7, 8, False), (90, 3, 0.8, 32, True),
    (36, 4, 1.0, 5, True)])
def test_adaptive_matches_reference(n, seed, p_valid, neighbors, tied_keys):
  rng = np.random.default_rng(seed)
  f, r, v, keys = _case(rng, n, p_valid=p_valid, tied_keys=tied_keys)
  want_tokens, want_ids = np_prumerge_plus(f, r, keys, v, "adaptive", neighbors=neighbors)
  assert 1 <= len(want_ids) < v.sum()
  assert int(prumerge.adaptive_count(jnp.asarray(r), jnp.asarray(v))) == len(want_ids)
  out = _sequence(jnp.asarray(f), jnp.asarray(r), jnp.asarray(v), keep=n, mode="adaptive",
                                keys=jnp.asarray(keys), neighbors=neighbors)
  _check_sequence(out, want_tokens, want_ids, n)
  # Through the registry with keep = the official count: the same tokens, sorted by index, no extra token.
  k = len(want_ids)
  tokens, idx = prune.merge("prumerge_plus", f, keep=k, relevance=r, valid=v, keys=keys, mode="adaptive",
                            neighbors=neighbors)
  perm = np.argsort(want_ids)
  np.testing.assert_array_equal(np.asarray(idx), want_ids[perm])
  np.testing.assert_allclose(np.asarray(tokens), want_tokens[:-1][perm], rtol=1e-5, atol=1e-6)
  order = prune.select_order("prumerge_plus", f, keep=k, relevance=r, valid=v, mode="adaptive")
  np.testing.assert_array_equal(np.asarray(order), want_ids)


def _check_merge(tokens, idx, want_tokens, want_ids):
  """prune.merge: distinct indices, ascending; each official token carries its official merged row."""
  idx, tokens = np.asarray(idx), np.asarray(tokens)
  assert len(set(idx.tolist())) == len(idx) and (np.diff(idx) > 0).all()
  official = {int(t): want_tokens[i] for i, t in enumerate(want_ids)}
  assert set(official) <= set(idx.tolist())
  for j, t in enumerate(idx.tolist()):
    if t in official:
      np.testing.assert_allclose(tokens[j], official[t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dedup", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("n,keep,seed,p_valid,tied_keys", [
    (40, 10, 0, 1.0, False), (64, 16, 1, 1.0, True), (50, 9, 2, 0.7, False), (36, 36, 3, 1.0, True),
    (72, 1, 4, 1.0, False), (60, 25, 5, 0.8, True)])
def test_fixed_matches_reference(n, keep, seed, p_valid, tied_keys, dedup):
  rng = np.random.default_rng(seed)
  f, r, v, keys = _case(rng, n, p_valid=p_valid, tied_keys=tied_keys)
  want_tokens, want_ids = np_prumerge_plus(f, r, keys, v, "fixed", keep=keep, dedup=dedup)
  assert len(want_ids) == keep
  out = _sequence(jnp.asarray(f), jnp.asarray(r), jnp.asarray(v), keep=keep, mode="fixed", dedup=dedup,
                  keys=jnp.asarray(keys))
  _check_sequence(out, want_tokens, want_ids, keep)
  # The order is the dedup list either way: K distinct tokens, the duplicates' slots refilled by attention.
  distinct = np_prumerge_plus(f, r, keys, v, "fixed", keep=keep, dedup=True)[1]
  np.testing.assert_array_equal(
      np.asarray(prune.select_order("prumerge_plus", f, keep=keep, relevance=r, valid=v, dedup=dedup)), distinct)
  tokens, idx = prune.merge("prumerge_plus", f, keep=keep, relevance=r, valid=v, keys=keys, dedup=dedup)
  np.testing.assert_array_equal(np.asarray(idx), np.sort(distinct))
  _check_merge(tokens, idx, want_tokens, want_ids)


@pytest.mark.parametrize("keep,seed,top_zero", [(64, 0, False), pytest.param(128, 1, False, marks=pytest.mark.slow), (64, 2, True),
                                                  pytest.param(192, 3, False, marks=pytest.mark.slow)])
def test_fixed_duplicates_and_complement_idx_on_576_tokens(keep, seed, top_zero):
  # The official fixed branch on LLaVA-1.5's 576 tokens: a strided position that is also a top token is kept twice
  # (two identical merged rows), and complement_idx then drops the d smallest non-kept tokens (token 0 among them
  # unless it is kept), which are neither neighbours nor in the extra token.
  rng = np.random.default_rng(seed)
  f, r, _, keys = _case(rng, 576)
  v = np.ones(576, bool)
  half = keep // 2
  strided = list(range(int((576 // half) / 2), 575, 576 // half))
  r[strided[: 3 + seed]] *= 50.0                                     # strided positions among the top tokens
  if top_zero:
    r[0] = r.max() * 2
  want_tokens, want_ids = np_prumerge_plus(f, r, keys, v, "fixed", keep=keep)
  top = _topk(r, half).tolist()
  np.testing.assert_array_equal(want_ids, top + strided)
  dups = len(want_ids) - len(set(want_ids.tolist()))
  assert dups >= 3 and (0 in top) == top_zero
  dropped = sorted(set(range(576)) - set(want_ids.tolist()))[:dups]
  assert set(dropped).isdisjoint(np_complement_idx(want_ids, 576)) and (0 in dropped) != top_zero
  out = _sequence(jnp.asarray(f), jnp.asarray(r), keep=keep, mode="fixed", keys=jnp.asarray(keys))
  _check_sequence(out, want_tokens, want_ids, keep)
  rows = np.asarray(out.tokens)
  for t in set(top) & set(strided):
    np.testing.assert_array_equal(rows[top.index(t)], rows[half + strided.index(t)])
  # dedup=True: each token once, the freed slots refilled by attention, the full complement.
  want_tokens, want_ids = np_prumerge_plus(f, r, keys, v, "fixed", keep=keep, dedup=True)
  assert len(set(want_ids.tolist())) == keep
  _check_sequence(_sequence(jnp.asarray(f), jnp.asarray(r), keep=keep, mode="fixed", dedup=True,
                            keys=jnp.asarray(keys)), want_tokens, want_ids, keep)


@pytest.mark.parametrize("keep", [32, 64, 128, 192])
def test_fixed_budgets_on_576_tokens_are_the_official_branch(keep):
  # With N = 576 the official non-adaptive branch (ratio = keep / 2 / 576) yields exactly keep // 2 strided
  # positions: the merged sequence's indices are exactly [top; strided], duplicates included.
  n, half = 576, keep // 2
  ratio = half / n
  step = int(1 / ratio)
  strided = list(range(int(step / 2), 575, step))
  assert int(n * ratio) == half and len(strided) == half
  r = np.random.default_rng(keep).lognormal(size=n).astype(np.float32)
  top = _topk(r, half).tolist()
  got = np.asarray(prune.select_order("prumerge_plus", np.zeros((n, 2), np.float32), keep=keep, relevance=r))
  np.testing.assert_array_equal(got[:half], top)
  fresh = [x for x in strided if x not in top]
  np.testing.assert_array_equal(got[half:half + len(fresh)], fresh)
  seq = _sequence(jnp.zeros((n, 2)), jnp.asarray(r), keep=keep, mode="fixed")
  np.testing.assert_array_equal(np.asarray(seq.indices), top + strided)


def test_integer_arithmetic_equals_the_official_floats_for_576_tokens():
  n = 576
  for c in range(1, n + 1):
    assert int(n * (c / n)) == c
    assert int(1 / (c / n)) == n // c
    assert int(int(1 / (c / n)) / 3) == (n // c) // 3


def test_merge_weights_are_raw_attention_of_the_nearest_keys():
  # Token 0 is the only outlier; its 2 nearest keys are tokens 1 and 2 (weights = their attention, not normalised).
  n = 12
  f = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
  r = np.full(n, 0.01, np.float32)
  r[0] = 0.9
  r[1], r[2] = 0.02, 0.03
  keys = np.tile(np.array([[0.0, 1.0]], np.float32), (n, 1))
  keys[0] = [1.0, 0.0]
  keys[1] = [1.0, 0.1]
  keys[2] = [1.0, 0.2]
  out = _sequence(jnp.asarray(f), jnp.asarray(r), keep=n, mode="adaptive", keys=jnp.asarray(keys),
                                neighbors=2)
  assert int(out.count) == len(np_prumerge_plus(f, r, keys, np.ones(n, bool))[1])
  assert int(out.indices[0]) == 0
  np.testing.assert_allclose(np.asarray(out.tokens[0]), f[0] + 0.02 * f[1] + 0.03 * f[2], rtol=1e-6)


def test_no_outlier_keeps_the_top_token():
  # Uniform attention has no IQR outlier (the official code then divides by zero): the top token stands in.
  n = 30
  r = (1.0 + (np.arange(n) * 7 % n) / n).astype(np.float32)         # evenly spread values, maximum at 17
  assert not np.asarray(prumerge.iqr_outliers(jnp.asarray(r), jnp.ones(n, bool))).any()
  order = np.asarray(prune.select_order("prumerge_plus", np.zeros((n, 2), np.float32), keep=n, relevance=r,
                                        mode="adaptive"))
  count = int(prumerge.adaptive_count(jnp.asarray(r)))
  # step = 30 // 1 = 30, sample step 10: positions 0, 10, 20.
  assert count == 4
  np.testing.assert_array_equal(order[:count], [17, 0, 10, 20])


@pytest.mark.parametrize("seed,p_valid", [(0, 1.0), (1, 0.6), (2, 0.9)])
def test_iqr_outliers_match_numpy_percentile(seed, p_valid):
  rng = np.random.default_rng(seed)
  r = rng.lognormal(size=101).astype(np.float32)
  v = rng.random(101) < p_valid
  v[:10] = True
  vals = r[v]
  upper = np.percentile(vals, 75) + 1.5 * (np.percentile(vals, 75) - np.percentile(vals, 25))
  want = v & (r > upper)
  assert want.any()
  np.testing.assert_array_equal(np.asarray(prumerge.iqr_outliers(jnp.asarray(r), jnp.asarray(v))), want)


def test_cls_attention_is_a_full_width_softmax():
  rng = np.random.default_rng(5)
  q = rng.normal(size=(2, 8)).astype(np.float32)
  k = rng.normal(size=(2, 7, 8)).astype(np.float32)
  logits = np.einsum("bc,bnc->bn", q.astype(np.float64), k) * 8 ** -0.5
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(prumerge.cls_attention(q, k)), probs[:, 1:], rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="cls_query"):
    prumerge.cls_attention(q, k[:, :, :4])


@pytest.mark.slow
def test_batch_with_padding_and_jit_equal_per_row_reference():
  rng = np.random.default_rng(9)
  cases = [_case(rng, 40, p_valid=p) for p in (1.0, 0.7, 0.8)]
  f, r, v, keys = (np.stack(x) for x in zip(*cases))
  for mode in ("fixed", "adaptive"):
    tokens, idx = prune.merge("prumerge_plus", f, keep=12, relevance=r, valid=v, keys=keys, mode=mode)
    seq = jax.jit(jax.vmap(functools.partial(prumerge.merge_sequence, keep=12, mode=mode)))(f, r, v, keys=keys)
    for b in range(3):
      want_tokens, want_ids = np_prumerge_plus(f[b], r[b], keys[b], v[b], mode, keep=12)
      assert v[b][np.asarray(idx[b])].all()
      _check_sequence(jax.tree.map(lambda x: x[b], seq), want_tokens, want_ids, 12)
      if mode == "fixed":
        _check_merge(tokens[b], idx[b], want_tokens, want_ids)


def test_padding_never_kept_merged_or_in_the_extra_token():
  rng = np.random.default_rng(10)
  f, r, v, keys = _case(rng, 40, p_valid=0.5)
  f[~v] = 1e6
  r[~v] = 10.0
  for mode in ("fixed", "adaptive"):
    out = _sequence(jnp.asarray(f), jnp.asarray(r), jnp.asarray(v), keep=10, mode=mode,
                                  keys=jnp.asarray(keys))
    assert v[np.asarray(out.indices)].all()
    assert np.abs(np.asarray(out.tokens)).max() < 1e3


def test_bad_input():
  f = np.zeros((8, 3), np.float32)
  r = np.ones(8, np.float32)
  with pytest.raises(ValueError, match="prumerge: mode must be one of"):
    prune.select("prumerge_plus", f, keep=4, relevance=r, mode="adaptiv")
  with pytest.raises(ValueError, match=r"prumerge: keys must be float\[N=8, Dk\]"):
    prune.merge("prumerge_plus", f, keep=4, relevance=r, keys=np.zeros((7, 2), np.float32))
  with pytest.raises(ValueError, match="prumerge: neighbors must be a static int >= 1"):
    prune.merge("prumerge_plus", f, keep=4, relevance=r, neighbors=0)
  with pytest.raises(ValueError, match="prumerge_plus: this method needs a relevance vector"):
    prune.select("prumerge_plus", f, keep=4)
  keys = np.ones((8, 2), np.float32)
  keys[2, 1] = np.nan
  with pytest.raises(ValueError, match=r"prumerge_plus: keys has NaN or inf at token positions \[2\]"):
    prune.merge("prumerge_plus", f, keep=4, relevance=r, valid=np.ones(8, bool), keys=keys)
  valid = np.ones(8, bool)
  valid[2] = False                                                    # a padding row is never read
  prune.merge("prumerge_plus", f, keep=4, relevance=r, valid=valid, keys=keys)
