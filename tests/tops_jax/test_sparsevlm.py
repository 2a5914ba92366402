"""SparseVLM against NumPy references written in the official code's loop form (Gumpest/SparseVLMs, v1 91fb6d9:
modelling_sparse_llama.py `LlamaDynamicvitModel.forward`, score.py `attn_postprocess_rank`, utils.py
`cluster_and_merge`; v1.5 535f8ba: score.py `attn_postprocess_topk`). torch ops are translated one by one; torch.topk
ties, which the official code leaves unspecified, go to the lowest index as in the module."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tops_jax import prune
from tops_jax import relevance
from tops_jax import sparsevlm as sv

ATOL = 1e-5


# ------------------------------------------------------------------------------------------------ references


def np_topk(values, k):
  """torch.topk(values, k)[1] (largest, sorted), ties to the lowest index."""
  return np.array(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k], dtype=np.int64)


def np_raters(v_t, t_t):
  """modelling_sparse_llama.py: m_v_t = v_t @ t_t^T; softmax(2).mean(1); where(m_v_t > m_v_t.mean())."""
  m_v_t = v_t.astype(np.float64) @ t_t.astype(np.float64).T
  e = np.exp(m_v_t - m_v_t.max(axis=1, keepdims=True))
  m_v_t = (e / e.sum(axis=1, keepdims=True)).mean(axis=0)
  return np.where(m_v_t > m_v_t.mean())[0]


def np_cluster_and_merge(x, cluster_num, noise=None):
  """utils.py cluster_and_merge for one row: x float[N, C] -> (merged [cluster_num, C], centers, idx_cluster)."""
  x = x.astype(np.float64)
  n, c = x.shape
  dist_matrix = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      dist_matrix[i, j] = np.linalg.norm(x[i] - x[j]) / c ** 0.5
  dist_nearest = np.sort(dist_matrix, axis=-1)[:, :cluster_num]          # topk(largest=False)
  density = np.exp(-(dist_nearest ** 2).mean(axis=-1))
  if noise is not None:
    density = density + noise
  mask = (density[None, :] > density[:, None]).astype(np.float64)
  dist_max = dist_matrix.max()
  dist = (dist_matrix * mask + dist_max * (1 - mask)).min(axis=-1)
  score = dist * density
  index_down = np_topk(score, cluster_num)
  idx_cluster = dist_matrix[index_down].argmin(axis=0)                   # first minimum
  idx_cluster[index_down] = np.arange(cluster_num)
  all_weight = np.zeros(cluster_num)
  for i in range(n):
    all_weight[idx_cluster[i]] += 1.0
  all_weight = all_weight + 1e-6
  norm_weight = 1.0 / all_weight[idx_cluster]
  merged = np.zeros((cluster_num, c))
  for i in range(n):
    merged[idx_cluster[i]] += x[i] * norm_weight[i]
  return merged, index_down, idx_cluster


def np_step(attn, t_idx, hidden, *, scale=None, bias=None, count=None, noise=None):
  """One official pruning step for one row without padding.

  attn float[T, N] head-averaged rows of the text after the image to the visual tokens; t_idx: rater indices.
  Returns dict(kept ascending, rank, scores, members in recycled order, merged, centers (visual indices)).
  """
  relation_vis_text = attn[t_idx].astype(np.float32)                     # B, L2, L1 with B = 1
  v_token_num = relation_vis_text.shape[1]
  rank = None
  if count is None:                                                       # v1 attn_postprocess_rank
    rank = np.linalg.matrix_rank(relation_vis_text.astype(np.float32))   # torch default tolerance
    scores = relation_vis_text.astype(np.float64).mean(axis=0)
    if v_token_num - rank != 0:
      mask = np.zeros(v_token_num, bool)
      mask[np_topk(scores, max(min(int(rank * scale + bias), v_token_num - 1), 0))] = True
      s_flag = True
    else:
      mask = np.ones(v_token_num, bool)
      s_flag = False
  else:                                                                   # v1.5 attn_postprocess_topk
    scores = relation_vis_text.astype(np.float64).mean(axis=0)
    if v_token_num != 0:
      mask = np.zeros(v_token_num, bool)
      mask[np_topk(scores, min(count, v_token_num - 1))] = True
      s_flag = True
    else:
      mask = np.ones(v_token_num, bool)
      s_flag = False
  out = dict(kept=np.where(mask)[0], rank=rank, scores=scores, members=np.zeros(0, np.int64),
             merged=np.zeros((0, hidden.shape[1])), centers=np.zeros(0, np.int64), assignment=np.zeros(0, np.int64))
  merge_token_idx_stage1 = np.where(~mask)[0]
  if s_flag and len(merge_token_idx_stage1) > 0:
    total_sparse_token = hidden[merge_token_idx_stage1]
    merge_token_stage1 = scores[merge_token_idx_stage1]
    merge_token_num_stage1 = int(merge_token_idx_stage1.shape[0] * 0.3) + 1
    merge_token_stage2_idx = np_topk(merge_token_stage1, merge_token_num_stage1)
    merge_token_stage2 = total_sparse_token[merge_token_stage2_idx]
    cluster_num = int(merge_token_stage2.shape[0] / 10) + 1
    if cluster_num == 0:
      cluster_num = merge_token_stage2.shape[0]
    z = None if noise is None else noise[:merge_token_num_stage1]
    merged, centers, assignment = np_cluster_and_merge(merge_token_stage2, cluster_num, z)
    members = merge_token_idx_stage1[merge_token_stage2_idx]
    out.update(members=members, merged=merged, centers=members[centers], assignment=assignment)
  return out


def np_attention_map(q, k, kv_valid, positions):
  """Eager attention of every head, causal + padding masked, mean over heads: float64[S, S] (official .mean(1))."""
  h, s, dh = q.shape
  g = h // k.shape[0]
  out = np.zeros((s, s))
  for head in range(h):
    logits = q[head].astype(np.float64) @ k[head // g].astype(np.float64).T / np.sqrt(dh)
    for i in range(s):
      allowed = kv_valid & (positions <= positions[i])
      if allowed.any():
        row = np.where(allowed, logits[i], -np.inf)
        e = np.exp(row - row.max())
        out[i] += e / e.sum() / h
  return out


# ------------------------------------------------------------------------------------------------ data


def _attn(rng, t, n, rank=None):
  """Positive rows (attention-like); with `rank`, rows are mixtures of `rank` profiles (rank exactly `rank`)."""
  if rank is None:
    a = rng.random((t, n))
  else:
    a = rng.integers(1, 5, size=(t, rank)).astype(np.float64) @ rng.integers(0, 4, size=(rank, n)).astype(np.float64)
  return (a / a.sum(axis=1, keepdims=True) * 0.5).astype(np.float32)


def _row(rng, t, n, d, rank=None):
  attn = _attn(rng, t, n, rank)
  t_idx = np.sort(rng.choice(t, size=max(1, t // 2), replace=False))
  hidden = rng.normal(size=(n, d)).astype(np.float32)
  return attn, t_idx, hidden


def _mask(t, idx):
  m = np.zeros(t, bool)
  m[idx] = True
  return m


def _check_step(got, ref, *, row=None, pos=None):
  """Compares one row of `Pruned` with `np_step` on the compact (unpadded) row; pos maps compact -> padded index."""
  pick = (lambda x: x) if row is None else (lambda x: x[row])
  pos = np.arange(len(ref["scores"])) if pos is None else pos
  kept, kept_ok = np.asarray(pick(got.kept)), np.asarray(pick(got.kept_valid))
  np.testing.assert_array_equal(kept[kept_ok], pos[ref["kept"]])
  assert int(pick(got.num_kept)) == len(ref["kept"])
  if ref["rank"] is not None:
    assert int(pick(got.rank)) == ref["rank"]
  np.testing.assert_allclose(np.asarray(pick(got.scores))[pos], ref["scores"], rtol=0, atol=1e-6)
  rec = got.recycled
  members, member_ok = np.asarray(pick(rec.members)), np.asarray(pick(rec.member_valid))
  np.testing.assert_array_equal(members[member_ok], pos[ref["members"]])
  np.testing.assert_array_equal(np.asarray(pick(rec.assignment))[member_ok], ref["assignment"])
  ok = np.asarray(pick(rec.valid))
  np.testing.assert_array_equal(np.asarray(pick(rec.centers))[ok], pos[ref["centers"]])
  np.testing.assert_allclose(np.asarray(pick(rec.tokens))[ok], ref["merged"], rtol=0, atol=ATOL)
  assert not np.asarray(pick(rec.tokens))[~ok].any()


# ------------------------------------------------------------------------------------------------ raters, attention


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_text_raters_match_official_lines(seed):
  rng = np.random.default_rng(seed)
  n, t, d = 12, 9, 6
  v, txt = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(t, d)).astype(np.float32)
  got = np.asarray(jax.jit(sv.text_raters)(v, txt))
  np.testing.assert_array_equal(np.where(got)[0], np_raters(v, txt))


def test_text_raters_batched_with_padding():
  rng = np.random.default_rng(3)
  b, n, t, d = 3, 10, 8, 5
  v, txt = rng.normal(size=(b, n, d)).astype(np.float32), rng.normal(size=(b, t, d)).astype(np.float32)
  vv = np.ones((b, n), bool)
  tv = np.ones((b, t), bool)
  vv[1, 7:], tv[1, 5:], vv[2, :2], tv[2, 6:] = False, False, False, False
  got = np.asarray(sv.text_raters(v, txt, visual_valid=vv, text_valid=tv))
  for r in range(b):
    ref = np_raters(v[r][vv[r]], txt[r][tv[r]])
    np.testing.assert_array_equal(np.where(got[r])[0], np.where(tv[r])[0][ref])


def test_rater_attention_is_the_head_mean_block_of_the_full_map():
  rng = np.random.default_rng(4)
  b, h, hkv, s, dh = 2, 4, 2, 14, 8
  q = rng.normal(size=(b, h, s, dh)).astype(np.float32)
  k = rng.normal(size=(b, hkv, s, dh)).astype(np.float32)
  kv_valid = np.ones((b, s), bool)
  kv_valid[1, :2] = False                                                  # left padding in row 1
  positions = np.tile(np.arange(s), (b, 1)).astype(np.int32)
  positions[1] = np.maximum(np.arange(s) - 2, 0)
  visual = np.array([[2, 3, 4, 5, 6, 7], [4, 5, 6, 7, 8, 0]], np.int32)
  visual_valid = np.array([[True] * 6, [True] * 5 + [False]])
  text = np.array([[8, 9, 10, 11, 12, 13], [9, 10, 11, 12, 13, 0]], np.int32)
  text_valid = np.array([[True] * 6, [True] * 5 + [False]])
  q_text = np.take_along_axis(q, text[:, None, :, None], axis=2)
  got = jax.jit(sv.rater_attention)(q_text, k, visual=visual, kv_valid=kv_valid, text_valid=text_valid,
                                    visual_valid=visual_valid, q_positions=np.take_along_axis(positions, text, 1),
                                    k_positions=positions)
  for r in range(b):
    full = np_attention_map(q[r], k[r], kv_valid[r], positions[r])
    ref = full[np.ix_(text[r], visual[r])] * text_valid[r][:, None] * visual_valid[r][None, :]
    np.testing.assert_allclose(np.asarray(got[r]), ref, rtol=0, atol=ATOL)
  # The mean over the raters is the signal `relevance.text_rater_attention` returns for the same raters.
  raters = np.array([[True, False, True, True, False, False], [False, True, True, False, True, False]])
  scores = raters.astype(np.float32)
  rel = relevance.text_rater_attention(q_text, k, visual=visual, kv_valid=kv_valid, text_valid=text_valid,
                                       visual_valid=visual_valid, q_positions=np.take_along_axis(positions, text, 1),
                                       k_positions=positions, rater_scores=scores)
  np.testing.assert_allclose(sv.visual_scores(got, raters, visual_valid), rel, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ rank and counts


@pytest.mark.parametrize("t,n,rank,seed", [(6, 15, 2, 0), (8, 20, 3, 1), (5, 12, None, 2), (9, 6, 4, 3),
                                           (7, 7, None, 4)])
def test_attention_rank_matches_matrix_rank(t, n, rank, seed):
  rng = np.random.default_rng(seed)
  attn = _attn(rng, t, n, rank)
  raters = rng.random(t) < 0.7
  raters[0] = True
  got = int(jax.jit(sv.attention_rank)(attn, raters))
  assert got == np.linalg.matrix_rank(attn[raters].astype(np.float32))
  if rank is not None:
    assert got == min(rank, int(raters.sum()))


def test_rank_tolerance_uses_the_real_rows_and_columns():
  # Singular values (1, 1, 3e-6) on a 4 x 20 block: torch's tolerance 1 * 20 * eps32 = 2.4e-6 counts three; with the
  # 20 padding columns of a 40-wide row a padded tolerance (4.8e-6) would count two.
  rng = np.random.default_rng(5)
  u, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  w, _ = np.linalg.qr(rng.normal(size=(20, 4)))
  block = (u[:, :3] * np.array([1.0, 1.0, 3e-6])) @ w[:, :3].T
  assert np.linalg.matrix_rank(block.astype(np.float32)) == 3
  attn = np.zeros((4, 40), np.float32)
  attn[:, ::2] = block
  valid = np.zeros(40, bool)
  valid[::2] = True
  assert int(sv.attention_rank(attn, np.ones(4, bool), valid)) == 3


def test_rank_keep_count_is_the_python_formula():
  for scale, bias in [(13.5, 0.0), (9.0, 6.0), (0.8, 0.0), (0.3, -1.0)]:
    rank = np.arange(0, 13, dtype=np.int32)
    for n in (0, 1, 5, 12, 40):
      r = np.minimum(rank, n)
      got = np.asarray(sv.rank_keep_count(r, np.full_like(r, n), scale=scale, bias=bias, max_rank=12))
      want = [n if ri == n else max(min(int(ri * scale + bias), n - 1), 0) for ri in r]
      np.testing.assert_array_equal(got, want)


def test_fixed_keep_count_and_recycle_counts():
  n = np.array([0, 1, 2, 50, 300, 576], np.int32)
  np.testing.assert_array_equal(sv.fixed_keep_count(n, count=300), [0, 0, 1, 49, 299, 300])
  d = np.arange(0, 100_000, dtype=np.int32)
  rec, clusters = (np.asarray(x) for x in sv.recycle_counts(d))
  want_rec = np.array([int(x * 0.3) + 1 if x else 0 for x in d.tolist()])
  np.testing.assert_array_equal(rec, want_rec)
  np.testing.assert_array_equal(clusters, [int(m / 10) + 1 if m else 0 for m in want_rec.tolist()])


# ------------------------------------------------------------------------------------------------ selection


def test_select_kept_ascending_with_ties_to_the_lowest_index():
  scores = np.array([0.2, 0.5, 0.5, 0.1, 0.5, 0.3], np.float32)
  kept, ok = sv.select_kept(scores, 3, max_keep=5)
  np.testing.assert_array_equal(kept, [1, 2, 4, 6, 6])
  np.testing.assert_array_equal(ok, [True, True, True, False, False])
  valid = np.array([True, False, True, True, True, True])
  kept, ok = sv.select_kept(scores, np.int32(2), valid, max_keep=2)
  np.testing.assert_array_equal(kept, [2, 4])


# ------------------------------------------------------------------------------------------------ clustering


@pytest.mark.parametrize("m,clusters,seed", [(1, 1, 0), (5, 1, 1), (12, 2, 2), (23, 3, 3), (40, 5, 4)])
def test_cluster_merge_matches_official(m, clusters, seed):
  # One padded shape (M = 40, C = 5) for every case: one compiled program, the counts are data.
  rng = np.random.default_rng(seed)
  x = np.zeros((40, 6), np.float32)
  x[:m] = rng.normal(size=(m, 6)) + 50.0                                # a shared offset, as hidden states have
  valid = np.arange(40) < m
  noise = (rng.random(40) * 1e-6).astype(np.float32)
  for z in (None, noise):
    got = sv.cluster_merge(x, clusters, valid, max_clusters=5, density_noise=z)
    merged, centers, assignment = np_cluster_and_merge(x[:m], clusters, None if z is None else z[:m])
    ok = np.asarray(got.valid)
    np.testing.assert_array_equal(ok, np.arange(5) < clusters)
    np.testing.assert_array_equal(np.asarray(got.centers)[ok], centers)
    np.testing.assert_array_equal(np.asarray(got.assignment)[:m], assignment)
    np.testing.assert_allclose(np.asarray(got.tokens)[ok], merged, rtol=0, atol=ATOL)


def test_cluster_merge_exact_ties_and_padding():
  # Small integers: every distance and density is exact, so duplicates tie exactly in both implementations.
  rng = np.random.default_rng(6)
  base = rng.integers(0, 3, size=(11, 4)).astype(np.float32)
  base[3], base[7] = base[1], base[1]
  merged, centers, assignment = np_cluster_and_merge(base, 2)
  x = np.zeros((16, 4), np.float32)
  slots = np.array([0, 1, 2, 4, 5, 6, 8, 9, 11, 13, 15])                # valid slots in order, padding between
  x[slots] = base
  x[~np.isin(np.arange(16), slots)] = 99.0
  valid = np.isin(np.arange(16), slots)
  got = sv.cluster_merge(x, 2, valid, max_clusters=3)
  np.testing.assert_array_equal(got.valid, [True, True, False])
  np.testing.assert_array_equal(np.asarray(got.centers)[:2], slots[centers])
  np.testing.assert_array_equal(np.asarray(got.assignment)[slots], assignment)
  assert (np.asarray(got.assignment)[~valid] == -1).all()
  np.testing.assert_allclose(np.asarray(got.tokens)[:2], merged, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------------ full step


@pytest.mark.parametrize("mode", [dict(scale=5.0, bias=1.0), dict(scale=0.8, bias=0.0), dict(count=9),
                                  dict(count=100)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prune_step_matches_official(mode, seed):
  rng = np.random.default_rng(seed)
  attn, t_idx, hidden = _row(rng, 10, 36, 6, rank=[None, 3, 1][seed])
  got = sv.prune_step(attn, _mask(10, t_idx), hidden, max_keep=36, **mode)
  _check_step(got, np_step(attn, t_idx, hidden, **mode))


def test_recycle_alone_equals_the_step():
  rng = np.random.default_rng(11)
  attn, t_idx, hidden = _row(rng, 10, 36, 6)
  got = sv.prune_step(attn, _mask(10, t_idx), hidden, max_keep=36, count=9)
  deleted = np.ones(36, bool)
  deleted[np.asarray(got.kept)[np.asarray(got.kept_valid)]] = False
  rec = sv.recycle(hidden, got.scores, deleted)
  for a, b in zip(rec, got.recycled):
    np.testing.assert_array_equal(a, b)


def test_prune_step_keeps_everything_when_full_rank():
  rng = np.random.default_rng(7)
  attn, _, hidden = _row(rng, 8, 5, 4)
  got = sv.prune_step(attn, np.ones(8, bool), hidden, max_keep=5, scale=0.5, bias=0.0)
  assert int(got.rank) == 5 and int(got.num_kept) == 5
  assert not np.asarray(got.recycled.valid).any() and not np.asarray(got.recycled.member_valid).any()
  seg = sv.assemble(hidden, got)
  np.testing.assert_array_equal(seg.origin, [0, 1, 2, 3, 4, -1])
  np.testing.assert_allclose(np.asarray(seg.tokens)[:5], hidden, rtol=0, atol=0)


@pytest.mark.parametrize("mode", [dict(scale=2.0, bias=1.0), dict(count=7)])
def test_batched_with_padding_equals_rows(mode):
  rng = np.random.default_rng(8)
  b, t, n, d = 3, 9, 30, 5
  attn = np.stack([_attn(rng, t, n, 3 if r == 1 else None) for r in range(b)])
  hidden = rng.normal(size=(b, n, d)).astype(np.float32)
  vv = np.ones((b, n), bool)
  vv[0, 24:] = False                                                      # right padding
  vv[2, ::4] = False                                                      # holes
  raters = rng.random((b, t)) < 0.5
  raters[:, 0] = True
  raters[1, 6:] = False                                                   # padded text never rates
  got = jax.jit(functools.partial(sv.prune_step, max_keep=n, max_deleted=n, **mode))(attn, raters, hidden, vv)
  for r in range(b):
    pos = np.where(vv[r])[0]
    ref = np_step(attn[r][:, pos], np.where(raters[r])[0], hidden[r][pos], **mode)
    _check_step(got, ref, row=r, pos=pos)
  # vmap over rows is the same program as the leading-axis form.
  fn = functools.partial(sv.prune_step, max_keep=n, max_deleted=n, **mode)
  mapped = jax.vmap(fn)(attn, raters, hidden, vv)
  np.testing.assert_array_equal(mapped.kept, got.kept)
  np.testing.assert_allclose(mapped.recycled.tokens, got.recycled.tokens, rtol=0, atol=1e-6)


def test_density_noise_from_the_key():
  rng = np.random.default_rng(9)
  attn, t_idx, hidden = _row(rng, 8, 40, 4)
  key = jax.random.key(3)
  got = sv.prune_step(attn, _mask(8, t_idx), hidden, max_keep=40, count=5, key=key)
  m_max = min((3 * 40) // 10 + 1, 40)
  noise = np.asarray(1e-6 * jax.random.uniform(key, (m_max,), jnp.float32))
  _check_step(got, np_step(attn, t_idx, hidden, count=5, noise=noise))
  batched = sv.prune_step(attn[None].repeat(2, 0), _mask(8, t_idx)[None].repeat(2, 0), hidden[None].repeat(2, 0),
                          max_keep=40, count=5, key=key)
  for r in range(2):
    z = np.asarray(1e-6 * jax.random.uniform(jax.random.fold_in(key, r), (m_max,), jnp.float32))
    _check_step(batched, np_step(attn, t_idx, hidden, count=5, noise=z), row=r)


def test_assemble_order_and_two_chained_steps():
  rng = np.random.default_rng(10)
  attn, t_idx, hidden = _row(rng, 6, 24, 4)
  raters = _mask(6, t_idx)
  got = sv.prune_step(attn, raters, hidden, max_keep=20, count=10)
  seg = sv.assemble(hidden, got)
  ref = np_step(attn, t_idx, hidden, count=10)
  k, c = len(ref["kept"]), len(ref["merged"])
  np.testing.assert_array_equal(seg.valid, np.arange(seg.valid.shape[0]) < k + c)
  np.testing.assert_array_equal(np.asarray(seg.origin)[:k], ref["kept"])
  np.testing.assert_array_equal(np.asarray(seg.origin)[k:k + c], 24 + np.arange(c))
  want = np.concatenate([hidden[ref["kept"]], ref["merged"]])            # official torch.cat order
  np.testing.assert_allclose(np.asarray(seg.tokens)[:k + c], want, rtol=0, atol=ATOL)
  # The merged tokens are ordinary visual tokens at the next step.
  attn2 = _attn(rng, 6, seg.valid.shape[0])
  got2 = sv.prune_step(attn2, raters, seg.tokens, seg.valid, max_keep=8, count=4)
  pos = np.where(np.asarray(seg.valid))[0]
  _check_step(got2, np_step(attn2[:, pos], t_idx, np.asarray(seg.tokens)[pos], count=4), pos=pos)


# ------------------------------------------------------------------------------------------------ schedules


def test_step_sizes_bound_every_reachable_case():
  for step in (sv.Step(2, count=7), sv.Step(2, scale=1.5, bias=2.0), sv.Step(2, scale=0.4, bias=-1.0)):
    nv, nt = 30, 6
    got = sv.step_sizes(step, nv, nt)
    worst = dict(keep=0, deleted=1, visual_out=0)
    for n in range(nv + 1):
      for r in (range(min(nt, n) + 1) if step.count is None else [None]):
        if step.count is None:
          kept = n if r == n else max(min(int(r * step.scale + step.bias), n - 1), 0)
        else:
          kept = n if n == 0 else min(step.count, n - 1)
        deleted = n - kept
        clusters = (int(deleted * 0.3) + 1) // 10 + 1 if deleted else 0
        worst = dict(keep=max(worst["keep"], kept), deleted=max(worst["deleted"], deleted),
                     visual_out=max(worst["visual_out"], kept + clusters))
    assert (got.keep, got.deleted, got.visual_out) == (worst["keep"], worst["deleted"], worst["visual_out"])
    assert got.recycled == int(got.deleted * 0.3) + 1 and got.clusters == got.recycled // 10 + 1
  chained = sv.sizes((sv.Step(2, count=300), sv.Step(6, count=200), sv.Step(15, count=110)), 576, 40)
  assert [s.keep for s in chained] == [300, 200, 110]
  assert chained[0] == sv.Sizes(300, 276, 83, 9, 309)


# ------------------------------------------------------------------------------------------------ errors, registry


def test_bad_inputs_name_the_argument():
  attn, raters, hidden = np.ones((4, 10), np.float32), np.ones(4, bool), np.ones((10, 3), np.float32)
  step = functools.partial(sv.prune_step, attn, raters, hidden)
  with pytest.raises(ValueError, match="max_keep"):
    step(max_keep=11, count=3)
  with pytest.raises(ValueError, match="max_keep"):
    step(max_keep=True, count=3)
  with pytest.raises(ValueError, match="count"):
    step(max_keep=5)
  with pytest.raises(ValueError, match="not both"):
    step(max_keep=5, count=3, scale=1.0, bias=0.0)
  with pytest.raises(ValueError, match="scale"):
    step(max_keep=5, scale="x", bias=0.0)
  with pytest.raises(ValueError, match="max_deleted"):
    step(max_keep=5, count=3, max_deleted=0)
  with pytest.raises(ValueError, match="raters"):
    sv.prune_step(attn, np.ones(5, bool), hidden, max_keep=5, count=3)
  with pytest.raises(ValueError, match="raters"):
    sv.prune_step(attn, np.ones(4, np.int32), hidden, max_keep=5, count=3)
  with pytest.raises(ValueError, match="hidden"):
    sv.prune_step(attn, raters, np.ones((9, 3), np.float32), max_keep=5, count=3)
  with pytest.raises(ValueError, match="visual_valid"):
    sv.prune_step(attn, raters, hidden, np.ones(9, bool), max_keep=5, count=3)
  with pytest.raises(ValueError, match="attn"):
    sv.prune_step(np.ones((4, 10), np.int32), raters, hidden, max_keep=5, count=3)
  with pytest.raises(ValueError, match="attn"):
    sv.visual_scores([[0.5]], np.ones(1, bool))
  with pytest.raises(ValueError, match="max_clusters"):
    sv.cluster_merge(hidden, 2, max_clusters=11)
  with pytest.raises(ValueError, match="density_noise"):
    sv.cluster_merge(hidden, 2, max_clusters=2, density_noise=np.ones(9, np.float32))
  with pytest.raises(ValueError, match="num_clusters"):
    sv.cluster_merge(hidden, np.ones(3, np.int32), max_clusters=2)
  with pytest.raises(ValueError, match="count"):
    sv.select_kept(np.ones(10, np.float32), 2.0, max_keep=3)
  with pytest.raises(ValueError, match="max_rank"):
    sv.rank_keep_count(np.int32(2), np.int32(5), scale=1.0, bias=0.0, max_rank=-1)
  with pytest.raises(ValueError, match="deleted"):
    sv.recycle(hidden, np.ones(10, np.float32), np.ones(10, np.float32))
  with pytest.raises(ValueError, match="visual"):
    sv.rater_attention(np.ones((2, 3, 4), np.float32), np.ones((2, 8, 4), np.float32), visual=np.array([0, 9]))


def test_not_a_prune_method():
  assert "sparsevlm" not in prune.METHODS
