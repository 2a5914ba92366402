"""Relevance signals against NumPy references that build the full S x S attention map and read the rows they need."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tops_jax import relevance

ATOL = 1e-5


def np_full_attention(q, k, *, kv_valid=None, positions=None, scale=None):
  """Every row of every head: q float[H, S, Dh], k float[Hkv, S, Dh] -> float64[H, S, S] (masked rows are zeros)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  h, s, dh = q.shape
  g = h // k.shape[0]
  scale = dh ** -0.5 if scale is None else scale
  mask = np.ones((s, s), bool)
  if kv_valid is not None:
    mask &= np.asarray(kv_valid)[None, :]
  if positions is not None:
    pos = np.asarray(positions)
    mask &= pos[None, :] <= pos[:, None]
  out = np.zeros((h, s, s))
  for head in range(h):
    logits = q[head] @ k[head // g].T * scale
    for i in range(s):
      if mask[i].any():
        row = np.where(mask[i], logits[i], -np.inf)
        e = np.exp(row - row.max())
        out[head, i] = e / e.sum()
  return out


def np_raters(scores, text_valid):
  mean = scores[text_valid].mean()
  raters = text_valid & (scores > mean)
  return raters if raters.any() else text_valid.copy()


def _qk(rng, h, hkv, s, dh, dtype=np.float32):
  q = rng.normal(size=(h, s, dh)) * 1.5
  k = rng.normal(size=(hkv, s, dh)) * 1.5
  q, k = jnp.asarray(q, dtype), jnp.asarray(k, dtype)
  return q, k


# ---------------------------------------------------------------------------------------------------- CLS attention


@pytest.mark.parametrize("h,hkv,n,dh,seed", [(4, 4, 9, 8, 0), (6, 2, 16, 4, 1), (1, 1, 5, 16, 2)])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_cls_attention_matches_full_map(h, hkv, n, dh, seed, dtype):
  rng = np.random.default_rng(seed)
  q, k = _qk(rng, h, hkv, n + 1, dh, dtype)
  kv_valid = rng.random(n + 1) > 0.2
  kv_valid[0] = True
  for mask in (None, kv_valid):
    full = np_full_attention(np.asarray(q, np.float32), np.asarray(k, np.float32), kv_valid=mask)
    want = full[:, 0, 1:].mean(0)
    got = relevance.cls_attention(q[:, 0], k, kv_valid=None if mask is None else jnp.asarray(mask))
    assert got.dtype == jnp.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
  # Without a CLS column to drop, all S columns come back.
  full = np_full_attention(np.asarray(q, np.float32), np.asarray(k, np.float32))
  np.testing.assert_allclose(relevance.cls_attention(q[:, 0], k, cls_index=None), full[:, 0].mean(0), rtol=0,
                             atol=ATOL)


def test_cls_attention_custom_scale_and_cls_position():
  rng = np.random.default_rng(3)
  q, k = _qk(rng, 2, 2, 7, 4)
  full = np_full_attention(q, k, scale=0.3)
  want = np.delete(full[:, 6].mean(0), 6)
  np.testing.assert_allclose(relevance.cls_attention(q[:, 6], k, scale=0.3, cls_index=6), want, rtol=0, atol=ATOL)
  np.testing.assert_allclose(relevance.cls_attention(q[:, 6], k, scale=0.3, cls_index=-1), want, rtol=0, atol=ATOL)


def test_cls_attention_batched_jit_equals_per_row():
  rng = np.random.default_rng(4)
  qs, ks = zip(*[_qk(rng, 4, 2, 10, 8) for _ in range(3)])
  q = jnp.stack([x[:, 0] for x in qs])                    # [B, H, Dh]
  k = jnp.stack(ks)                                        # [B, Hkv, S, Dh]
  valid = jnp.asarray(rng.random((3, 10)) > 0.3).at[:, 0].set(True)
  batched = jax.jit(relevance.cls_attention)(q, k, kv_valid=valid)
  for b in range(3):
    np.testing.assert_allclose(batched[b], relevance.cls_attention(q[b], k[b], kv_valid=valid[b]), rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- last token


@pytest.mark.parametrize("h,hkv,seed", [(4, 4, 0), (8, 2, 1)])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_last_token_attention_matches_full_map(h, hkv, seed, dtype):
  rng = np.random.default_rng(seed)
  s, dh = 20, 8
  q, k = _qk(rng, h, hkv, s, dh, dtype)
  kv_valid = np.ones(s, bool)
  kv_valid[-3:] = False                                    # right padding: the last real token is s - 4
  last = s - 4
  visual = np.arange(2, 12)
  qf, kf = np.asarray(q, np.float32), np.asarray(k, np.float32)
  want = np_full_attention(qf, kf, kv_valid=kv_valid, positions=np.arange(s))[:, last, visual].mean(0)
  got = relevance.last_token_attention(q[:, last], k, visual=jnp.asarray(visual), kv_valid=jnp.asarray(kv_valid))
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
  # Causality from positions alone masks the same keys.
  got = relevance.last_token_attention(q[:, last], k, visual=jnp.asarray(visual), q_position=jnp.int32(last),
                                       k_positions=jnp.arange(s))
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_last_token_attention_batched_jit_equals_per_row():
  rng = np.random.default_rng(5)
  qs, ks = zip(*[_qk(rng, 4, 1, 12, 4) for _ in range(2)])
  q = jnp.stack([x[:, -1] for x in qs])
  k = jnp.stack(ks)
  visual = jnp.asarray([[1, 2, 3, 4, 5], [3, 4, 5, 6, 7]])
  fn = jax.jit(functools.partial(relevance.last_token_attention))
  batched = fn(q, k, visual=visual)
  for b in range(2):
    want = np_full_attention(np.asarray(qs[b]), np.asarray(ks[b]), positions=np.arange(12))[:, -1,
                                                                                           np.asarray(visual[b])]
    np.testing.assert_allclose(batched[b], want.mean(0), rtol=0, atol=ATOL)
    np.testing.assert_allclose(batched[b], relevance.last_token_attention(q[b], k[b], visual=visual[b]), rtol=0,
                               atol=1e-7)


# ---------------------------------------------------------------------------------------------------- text raters


def _rater_case(rng, h, hkv, dh, n_sys, n, t, pad, dtype=np.float32):
  """A [system; visual; text; padding] sequence with left offsets in the positions."""
  s = n_sys + n + t + pad
  q, k = _qk(rng, h, hkv, s, dh, dtype)
  kv_valid = np.ones(s, bool)
  kv_valid[s - pad:] = False
  visual = np.arange(n_sys, n_sys + n)
  text = np.arange(n_sys + n, s)                           # queries include the padded tail, flagged invalid
  text_valid = kv_valid[text]
  positions = np.arange(s) + 3
  return q, k, kv_valid, visual, text, text_valid, positions


def np_text_rater_attention(q, k, kv_valid, visual, text, text_valid, positions, visual_valid=None,
                            rater_scores=None):
  full = np_full_attention(np.asarray(q, np.float32), np.asarray(k, np.float32), kv_valid=kv_valid,
                           positions=positions).mean(0)
  a = full[text][:, visual]                                # [T, N]
  if visual_valid is not None:
    a = a * visual_valid[None, :]
  scores = a.sum(1) if rater_scores is None else np.asarray(rater_scores, np.float64)
  raters = np_raters(scores, text_valid)
  return a[raters].mean(0), raters


@pytest.mark.parametrize("h,hkv,n,t,seed", [(4, 4, 12, 9, 0), (8, 2, 16, 13, 1), (6, 3, 7, 20, 2)])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_text_rater_attention_matches_full_map(h, hkv, n, t, seed, dtype):
  rng = np.random.default_rng(seed)
  q, k, kv_valid, visual, text, text_valid, positions = _rater_case(rng, h, hkv, 8, 3, n, t, 2, dtype)
  want, raters = np_text_rater_attention(q, k, kv_valid, visual, text, text_valid, positions)
  assert 0 < raters.sum() < text_valid.sum()               # the dynamic rater set actually filters
  got = relevance.text_rater_attention(
      q[:, text], k, visual=jnp.asarray(visual), kv_valid=jnp.asarray(kv_valid), text_valid=jnp.asarray(text_valid),
      q_positions=jnp.asarray(positions[text]), k_positions=jnp.asarray(positions))
  assert got.dtype == jnp.float32 and got.shape == (n,)
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_text_rater_attention_visual_valid_and_given_scores():
  rng = np.random.default_rng(7)
  q, k, kv_valid, visual, text, text_valid, positions = _rater_case(rng, 4, 2, 8, 2, 10, 8, 0)
  visual_valid = rng.random(10) > 0.3
  kwargs = dict(visual=jnp.asarray(visual), kv_valid=jnp.asarray(kv_valid), text_valid=jnp.asarray(text_valid),
                q_positions=jnp.asarray(positions[text]), k_positions=jnp.asarray(positions))
  want, _ = np_text_rater_attention(q, k, kv_valid, visual, text, text_valid, positions, visual_valid=visual_valid)
  got = relevance.text_rater_attention(q[:, text], k, visual_valid=jnp.asarray(visual_valid), **kwargs)
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
  assert np.all(np.asarray(got)[~visual_valid] == 0)
  scores = rng.random(len(text)).astype(np.float32)
  want, raters = np_text_rater_attention(q, k, kv_valid, visual, text, text_valid, positions, rater_scores=scores)
  assert 0 < raters.sum() < len(text)
  got = relevance.text_rater_attention(q[:, text], k, rater_scores=jnp.asarray(scores), **kwargs)
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
  # Equal scores: nobody is above the mean, so every valid text token rates.
  want, raters = np_text_rater_attention(q, k, kv_valid, visual, text, text_valid, positions,
                                         rater_scores=np.ones(len(text)))
  assert raters.sum() == text_valid.sum()
  got = relevance.text_rater_attention(q[:, text], k, rater_scores=jnp.ones(len(text)), **kwargs)
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_text_rater_attention_batched_jit_equals_per_row():
  rng = np.random.default_rng(8)
  cases = [_rater_case(rng, 4, 2, 8, 2, 6, 7 - pad, pad) for pad in (0, 3)]   # same S = 15
  stack = lambda i: jnp.stack([jnp.asarray(c[i]) for c in cases])
  q = jnp.stack([c[0][:, c[4]] for c in cases])
  k, kv_valid, visual, text_valid = stack(1), stack(2), stack(3), stack(5)
  q_pos = jnp.stack([jnp.asarray(c[6][c[4]]) for c in cases])
  k_pos = stack(6)
  batched = jax.jit(relevance.text_rater_attention)(q, k, visual=visual, kv_valid=kv_valid, text_valid=text_valid,
                                                    q_positions=q_pos, k_positions=k_pos)
  for b, c in enumerate(cases):
    want, _ = np_text_rater_attention(*c)
    np.testing.assert_allclose(batched[b], want, rtol=0, atol=ATOL)
    eager = relevance.text_rater_attention(q[b], k[b], visual=visual[b], kv_valid=kv_valid[b],
                                           text_valid=text_valid[b], q_positions=q_pos[b], k_positions=k_pos[b])
    np.testing.assert_allclose(batched[b], eager, rtol=0, atol=1e-7)


def test_select_raters():
  scores = jnp.asarray([[0.1, 0.5, 0.2, 0.9], [1.0, 1.0, 1.0, 1.0]])
  valid = jnp.asarray([[True, True, True, False], [True, True, False, True]])
  got = np.asarray(relevance.select_raters(scores, valid))
  for b in range(2):
    np.testing.assert_array_equal(got[b], np_raters(np.asarray(scores[b]), np.asarray(valid[b])))


def test_fully_masked_query_gives_zeros_not_nan():
  rng = np.random.default_rng(9)
  q, k = _qk(rng, 2, 2, 5, 4)
  got = relevance.cls_attention(q[:, 0], k, kv_valid=jnp.zeros(5, bool))
  np.testing.assert_array_equal(got, np.zeros(4))


# ---------------------------------------------------------------------------------------------------- embeddings


def np_sparsevlm_scores(v, t, v_valid, t_valid):
  v, t = np.asarray(v, np.float64), np.asarray(t, np.float64)
  logits = v @ t.T
  logits = np.where(t_valid[None, :], logits, -np.inf)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  return p[v_valid].mean(0)


def test_sparsevlm_rater_scores():
  rng = np.random.default_rng(10)
  v = rng.normal(size=(2, 9, 6)).astype(np.float32)
  t = rng.normal(size=(2, 5, 6)).astype(np.float32)
  vv = rng.random((2, 9)) > 0.3
  tv = rng.random((2, 5)) > 0.3
  tv[:, 0] = True
  vv[:, 0] = True
  got = jax.jit(relevance.sparsevlm_rater_scores)(v, t, visual_valid=vv, text_valid=tv)
  for b in range(2):
    np.testing.assert_allclose(got[b], np_sparsevlm_scores(v[b], t[b], vv[b], tv[b]), rtol=0, atol=ATOL)
  np.testing.assert_allclose(relevance.sparsevlm_rater_scores(v[0], t[0]),
                             np_sparsevlm_scores(v[0], t[0], np.ones(9, bool), np.ones(5, bool)), rtol=0, atol=ATOL)


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_text_embedding_cosine(reduce, dtype):
  rng = np.random.default_rng(11)
  v = jnp.asarray(rng.normal(size=(3, 8, 5)), dtype)
  t = jnp.asarray(rng.normal(size=(3, 4, 5)), dtype)
  tv = np.array([[True, True, False, True], [False, True, False, False], [True] * 4])
  got = jax.jit(functools.partial(relevance.text_embedding_cosine, reduce=reduce))(v, t, jnp.asarray(tv))
  vf, tf = np.asarray(v, np.float64), np.asarray(t, np.float64)
  for b in range(3):
    vn = vf[b] / np.linalg.norm(vf[b], axis=1, keepdims=True)
    tn = tf[b] / np.linalg.norm(tf[b], axis=1, keepdims=True)
    cos = (vn @ tn.T)[:, tv[b]]
    want = cos.mean(1) if reduce == "mean" else cos.max(1)
    np.testing.assert_allclose(got[b], want, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_value_errors():
  rng = np.random.default_rng(12)
  q, k = _qk(rng, 6, 4, 8, 4)
  with pytest.raises(ValueError, match="must divide"):
    relevance.cls_attention(q[:, 0], k)
  q, k = _qk(rng, 4, 2, 8, 4)
  with pytest.raises(ValueError, match="head width"):
    relevance.cls_attention(q[:, 0, :3], k)
  with pytest.raises(ValueError, match="kv_valid"):
    relevance.cls_attention(q[:, 0], k, kv_valid=jnp.ones(7, bool))
  with pytest.raises(ValueError, match="both"):
    relevance.text_rater_attention(q, k, visual=jnp.arange(3), q_positions=jnp.arange(8))
  with pytest.raises(ValueError, match="visual positions"):
    relevance.last_token_attention(q[:, -1], k, visual=jnp.asarray([0, 8]))
  with pytest.raises(ValueError, match="leading"):
    relevance.text_rater_attention(q[None], k, visual=jnp.arange(3)[None])
  with pytest.raises(ValueError, match="reduce"):
    relevance.text_embedding_cosine(jnp.ones((3, 2)), jnp.ones((2, 2)), reduce="sum")
