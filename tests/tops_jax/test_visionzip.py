"""VisionZip against NumPy translations of the official code (dvlab-research/VisionZip, commit 3151f6d).

`np_official` follows `CLIPVisionTower_VisionZip.forward` (visionzip/clip_encoder.py) torch op by torch op on a
batch [CLS, patches]; `np_restore_next` follows `restore_image_features_sorted` and the spatial_unpad branch of
`prepare_inputs_labels_for_multimodal_visionzip` (visionzip/llava_arch.py). `np_patch_view` is the reference of our
patch-only registry view (`merge` / `order`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tops_jax import prune
from tops_jax import visionzip


def _topk(x, k):
  """torch.topk(x, k, dim=-1).indices on a 2-D array, ties to the lowest index (torch leaves them unspecified)."""
  return np.argsort(-x, axis=-1, kind="stable")[:, :k]


def np_official(hidden, attn, metric, dominant, contextual):
  """hidden float[B, 1 + N, Dv] (CLS first), attn float[B, H, 1 + N, 1 + N], metric float[B, 1 + N, Dk].

  Returns (hidden_states_save float[B, K, Dv], all_indices int[B, dominant], target patch index int[B, C]).
  """
  b, s, d = hidden.shape
  dominant_num = dominant - 1                                   # visionzip(): apply_info(dominant_num=dominant - 1)
  cls_attention = attn[:, :, 0, 1:]
  cls_attention_sum = cls_attention.sum(axis=1)
  topk_indices = _topk(cls_attention_sum, dominant_num) + 1
  all_indices = np.concatenate([np.zeros((b, 1), int), topk_indices], axis=1)
  mask = np.ones((b, s), bool)
  np.put_along_axis(mask, all_indices, False, axis=1)
  dominant_tokens = hidden[~mask].reshape(b, dominant_num + 1, d)              # masked_select: spatial order
  metric_filtered = metric[mask].reshape(b, s - (dominant_num + 1), metric.shape[2])
  hidden_states_filtered = hidden[mask].reshape(b, s - (dominant_num + 1), d)
  metric_normalized = metric_filtered / np.linalg.norm(metric_filtered, axis=-1, keepdims=True)
  step = max(1, metric_normalized.shape[1] // contextual)
  target_indices = np.arange(0, metric_normalized.shape[1], step)[:contextual]
  target_tokens = metric_normalized[:, target_indices, :]
  not_target = ~np.isin(np.arange(metric_normalized.shape[1]), target_indices)
  tokens_to_merge = metric_normalized[:, not_target, :]
  similarity = tokens_to_merge @ target_tokens.transpose(0, 2, 1)
  assign_one_hot = np.zeros((b, tokens_to_merge.shape[1], contextual))
  np.put_along_axis(assign_one_hot, similarity.argmax(axis=2)[..., None], 1, axis=2)
  counts = np.maximum(assign_one_hot.sum(axis=1), 1)[..., None]
  hidden_to_merge = hidden_states_filtered[:, not_target, :]
  aggregated_hidden = assign_one_hot.transpose(0, 2, 1) @ hidden_to_merge / counts
  target_hidden = hidden_states_filtered[:, target_indices, :]
  contextual_tokens = target_hidden + aggregated_hidden
  hidden_states_save = np.concatenate([dominant_tokens, contextual_tokens], axis=1)
  target_patch = np.stack([np.nonzero(mask[i])[0][target_indices] - 1 for i in range(b)])
  return hidden_states_save, all_indices, target_patch


def _tower(rng, b, n, dv=6, dk=5, heads=3):
  """A fake layer -2 output: hidden [B, 1 + N, Dv], attention [B, H, 1 + N, 1 + N] (softmax rows), keys."""
  hidden = rng.normal(size=(b, n + 1, dv))
  logits = rng.normal(size=(b, heads, n + 1, n + 1)) * 2
  attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  metric = rng.normal(size=(b, n + 1, dk))
  return hidden.astype(np.float32), attn.astype(np.float32), metric.astype(np.float32)


def _ours(hidden, attn, metric, **kw):
  rel = attn[:, :, 0, 1:].sum(axis=1)
  return visionzip.compress(hidden[:, 1:], rel, metric[:, 1:], hidden[:, 0], **kw)


@pytest.mark.parametrize("n,dominant,contextual,seed", [
    (36, 10, 4, 0), (49, 14, 3, 1), (25, 1, 5, 2), (30, 20, 1, 3), (64, 54, 10, 4), (20, 3, 11, 5)])
def test_compress_matches_official(n, dominant, contextual, seed):
  rng = np.random.default_rng(seed)
  hidden, attn, metric = _tower(rng, 3, n)
  want, all_indices, target_patch = np_official(hidden.astype(np.float64), attn.astype(np.float64),
                                                metric.astype(np.float64), dominant, contextual)
  tokens, source, kind = _ours(hidden, attn, metric, dominant=dominant, contextual=contextual)
  np.testing.assert_allclose(tokens, want, rtol=0, atol=1e-5)
  want_source = np.concatenate([np.sort(all_indices, axis=1) - 1, target_patch], axis=1)
  np.testing.assert_array_equal(source, want_source)                           # CLS -> -1
  np.testing.assert_array_equal(kind, np.repeat([[0, 1, 2]], 3, 0).repeat([1, dominant - 1, contextual], 1))
  assert tokens.shape == (3, dominant + contextual, hidden.shape[-1]) and kind.dtype == np.int8


def test_compress_hand_checked():
  # CLS attention ranks patches 1 and 3 first; R = 4 remaining (0, 2, 4, 5), step 2: targets 0 and 4.
  # Keys send 2 and 5 to target 4 (cosine 1) rather than to target 0 (cosine 0).
  f = np.arange(12, dtype=np.float32).reshape(6, 2)
  cls = np.array([-1.0, -2.0], np.float32)
  rel = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.05], np.float32)
  keys = np.array([[1, 0], [5, 5], [0, 2], [3, 3], [0, 1], [0, 7]], np.float32)
  tokens, source, kind = visionzip.compress(f, rel, keys, cls, dominant=3, contextual=2)
  np.testing.assert_array_equal(source, [-1, 1, 3, 0, 4])
  np.testing.assert_array_equal(kind, [0, 1, 1, 2, 2])
  np.testing.assert_allclose(tokens, [cls, f[1], f[3], f[0], f[4] + (f[2] + f[5]) / 2], rtol=0, atol=1e-6)


def test_compress_batch_with_padding_matches_official_on_the_real_tokens():
  rng = np.random.default_rng(6)
  n, dominant, contextual = 30, 8, 4
  hidden, attn, metric = _tower(rng, 3, n)
  valid = np.ones((3, n), bool)
  valid[1, 20:] = False                              # a short crop
  valid[2, rng.choice(n, 9, replace=False)] = False  # holes anywhere
  f, k, rel = hidden[:, 1:].copy(), metric[:, 1:].copy(), attn[:, :, 0, 1:].sum(1)
  f[~valid], k[~valid], rel[~valid] = 1e6, 1e6, 1e3  # padding that leaked into a token, a merge or a rank would show
  tokens, source, kind = visionzip.compress(f, rel, k, hidden[:, 0], valid, dominant=dominant, contextual=contextual)
  for b in range(3):
    real = np.nonzero(valid[b])[0]
    keep = np.concatenate([[0], real + 1])           # the official code sees CLS + the real patches only
    want, all_indices, target_patch = np_official(hidden[b:b + 1, keep].astype(np.float64),
                                                  attn[b:b + 1][:, :, keep][:, :, :, keep].astype(np.float64),
                                                  metric[b:b + 1, keep].astype(np.float64), dominant, contextual)
    np.testing.assert_allclose(tokens[b], want[0], rtol=0, atol=1e-5)
    want_source = np.concatenate([[-1], real[np.sort(all_indices[0])[1:] - 1], real[target_patch[0]]])
    np.testing.assert_array_equal(source[b], want_source)
  np.testing.assert_array_equal(kind[0], kind[2])


def test_compress_jit_equals_eager_and_single_equals_batched():
  rng = np.random.default_rng(7)
  hidden, attn, metric = _tower(rng, 2, 24)
  rel = attn[:, :, 0, 1:].sum(1)
  args = (hidden[:, 1:], rel, metric[:, 1:], hidden[:, 0])
  fn = jax.jit(functools.partial(visionzip.compress, dominant=6, contextual=3))
  eager = visionzip.compress(*args, dominant=6, contextual=3)
  single = visionzip.compress(*(a[1] for a in args), dominant=6, contextual=3)
  for got, row, want in zip(fn(*args), single, eager):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)                 # exact up to float32 summation order
    np.testing.assert_allclose(row, want[1], rtol=0, atol=1e-6)


def test_compress_bfloat16_keeps_the_dtype():
  rng = np.random.default_rng(8)
  hidden, attn, metric = _tower(rng, 1, 20)
  hb = jnp.asarray(hidden, jnp.bfloat16)
  tokens, _, _ = _ours(hb, attn, metric, dominant=5, contextual=2)
  want, _, _ = np_official(np.asarray(hb, np.float64), attn.astype(np.float64), metric.astype(np.float64), 5, 2)
  assert tokens.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(tokens, np.float32), want, rtol=1e-2, atol=1e-2)


def test_compress_bad_arguments():
  f, r, k, c = np.zeros((8, 3), np.float32), np.ones(8, np.float32), np.ones((8, 2), np.float32), np.zeros(3)
  with pytest.raises(ValueError, match="dominant must be a static Python int >= 1"):
    visionzip.compress(f, r, k, c, dominant=0, contextual=2)
  with pytest.raises(ValueError, match="contextual"):
    visionzip.compress(f, r, k, c, dominant=2, contextual=-1)
  with pytest.raises(ValueError, match="exceeds the N=8 patches"):
    visionzip.compress(f, r, k, c, dominant=6, contextual=4)
  with pytest.raises(ValueError, match="relevance"):
    visionzip.compress(f, r[:7], k, c, dominant=2, contextual=2)
  with pytest.raises(ValueError, match="keys"):
    visionzip.compress(f, r, k[:7], c, dominant=2, contextual=2)
  with pytest.raises(ValueError, match="cls_feature"):
    visionzip.compress(f, r, k, c[:2], dominant=2, contextual=2)
  with pytest.raises(ValueError, match="valid"):
    visionzip.compress(f, r, k, c, np.ones(8, np.int32), dominant=2, contextual=2)


def test_official_splits():
  assert [visionzip.split(t) for t in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
  assert [visionzip.default_dominant(k) for k in (64, 128, 192)] == [54, 108, 162]
  with pytest.raises(ValueError, match="tokens"):
    visionzip.split(1)


# --- LLaVA-NeXT layout ------------------------------------------------------------------------------------------

def np_restore_next(image_feature, keep_idx, width, height, side):
  """image_feature float[P, K, D] per-crop official outputs, keep_idx int[P, dominant] (all_indices) ->
  the image's features as prepare_inputs_labels_for_multimodal_visionzip builds them (spatial_unpad)."""
  base_image_feature, image_feature, cur_keep_idx = image_feature[0], image_feature[1:], keep_idx[1:]
  num_img, total_patches, feature_dim = image_feature.shape
  num_keep = cur_keep_idx.shape[1]
  num_extra = total_patches - num_keep
  cur_keep_idx_sorted = np.sort(cur_keep_idx, axis=1)
  restore = cur_keep_idx_sorted[:, 1:] - 1
  restored = np.zeros((num_img, side * side, feature_dim))
  mask = np.zeros((num_img, side * side), bool)
  np.put_along_axis(mask, restore, True, axis=1)
  restored[mask] = image_feature[:, 1:num_keep, :].reshape(-1, feature_dim)
  assert width * height == num_img
  restored = restored.reshape(height, width, side, side, feature_dim).transpose(0, 2, 1, 3, 4)
  restored = restored.reshape(height * side, width * side, feature_dim)
  mask = mask.reshape(height, width, side, side).transpose(0, 2, 1, 3).reshape(height * side, width * side)
  select = restored[mask]
  raw = image_feature[:, -num_extra:].reshape(-1, feature_dim)
  grid = np.concatenate([select, image_feature[:, 0], raw])
  return np.concatenate([base_image_feature, grid])


@pytest.mark.parametrize("rows,cols,seed", [(2, 2, 0), (1, 3, 1), (3, 1, 2), (1, 2, 3)])
def test_next_order_matches_official_restore(rows, cols, seed):
  rng = np.random.default_rng(seed)
  side, dominant, contextual = 4, 6, 3
  p = 1 + rows * cols
  hidden, attn, metric = _tower(rng, p, side * side)
  tokens, source, kind = _ours(hidden, attn, metric, dominant=dominant, contextual=contextual)
  keep_idx = np.concatenate([np.zeros((p, 1), int), np.asarray(source)[:, 1:dominant] + 1], axis=1)
  want = np_restore_next(np.asarray(tokens, np.float64), keep_idx, cols, rows, side)
  perm, valid = visionzip.next_order(kind, source, np.array([rows, cols]), side=side)
  assert valid.all()
  np.testing.assert_array_equal(np.asarray(tokens).reshape(p * (dominant + contextual), -1)[np.asarray(perm)], want)


def test_next_order_puts_padding_crops_last():
  rng = np.random.default_rng(4)
  side, p = 3, 6                                     # a 1 x 3 grid padded to 5 grid crops
  hidden, attn, metric = _tower(rng, p, side * side)
  tokens, source, kind = _ours(hidden, attn, metric, dominant=4, contextual=2)
  crop_valid = np.array([True, True, True, True, False, False])
  perm, valid = visionzip.next_order(kind, source, np.array([1, 3]), crop_valid, side=side)
  keep_idx = np.concatenate([np.zeros((4, 1), int), np.asarray(source)[:4, 1:4] + 1], axis=1)
  want = np_restore_next(np.asarray(tokens[:4], np.float64), keep_idx, 3, 1, side)
  flat = np.asarray(tokens).reshape(p * 6, -1)[np.asarray(perm)]
  np.testing.assert_array_equal(flat[:24], want)
  np.testing.assert_array_equal(valid, np.arange(36) < 24)


# --- the patch-only registry view (ours) --------------------------------------------------------------------------

def np_patch_view(features, relevance, valid, keep, dominant=None, keys=None):
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


@pytest.mark.parametrize("n,keep,dominant,seed", [(16, 6, None, 0), (30, 10, 7, 1), (25, 9, 0, 4), (36, 20, 3, 5)])
@pytest.mark.parametrize("tied_keys", [False, True])
def test_patch_view_matches_reference(n, keep, dominant, seed, tied_keys):
  rng = np.random.default_rng(seed)
  f, r, v, keys = _case(rng, n, tied_keys=tied_keys)
  hp = {} if dominant is None else {"dominant": dominant}
  want_order, want_tokens, want_idx = np_patch_view(f, r, v, keep, dominant, keys)
  np.testing.assert_array_equal(prune.select_order("visionzip", f, keep=keep, relevance=r, valid=v, keys=keys, **hp),
                                want_order)
  tokens, idx = prune.merge("visionzip", f, keep=keep, relevance=r, valid=v, keys=keys, **hp)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(tokens, want_tokens, rtol=0, atol=1e-5)
  _, want_tokens, want_idx = np_patch_view(f, r, v, keep, dominant)             # keys default to the features
  tokens, idx = prune.merge("visionzip", f, keep=keep, relevance=r, valid=v, **hp)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(tokens, want_tokens, rtol=0, atol=1e-5)


def test_patch_view_equals_compress_without_its_cls():
  rng = np.random.default_rng(11)
  hidden, attn, metric = _tower(rng, 1, 30)
  rel = attn[0, :, 0, 1:].sum(0)
  tokens, source, _ = visionzip.compress(hidden[0, 1:], rel, metric[0, 1:], hidden[0, 0], dominant=9, contextual=4)
  merged, idx = prune.merge("visionzip", hidden[0, 1:], keep=12, relevance=rel, keys=metric[0, 1:], dominant=8)
  perm = np.argsort(np.asarray(source)[1:])
  np.testing.assert_array_equal(idx, np.asarray(source)[1:][perm])
  np.testing.assert_allclose(merged, np.asarray(tokens)[1:][perm], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_patch_view_batched_equals_per_row_and_jit_equals_eager():
  rng = np.random.default_rng(7)
  cases = [_case(rng, 20) for _ in range(3)]
  f, r, v, keys = (np.stack(x) for x in zip(*cases))
  tokens, idx = prune.merge("visionzip", f, keep=8, relevance=r, valid=v, keys=keys, dominant=5)
  order = prune.select_order("visionzip", f, keep=8, relevance=r, valid=v, keys=keys, dominant=5)
  for b in range(3):
    row_tokens, row_idx = prune.merge("visionzip", f[b], keep=8, relevance=r[b], valid=v[b], keys=keys[b], dominant=5)
    np.testing.assert_array_equal(idx[b], row_idx)
    np.testing.assert_allclose(tokens[b], row_tokens, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(order[b], np_patch_view(f[b], r[b], v[b], 8, 5, keys[b])[0])
  args = (jnp.asarray(f[0]), jnp.asarray(r[0]), jnp.asarray(v[0]), None)
  eager_tokens, eager_idx = visionzip.merge(*args, keep=8, dominant=5, keys=jnp.asarray(keys[0]))
  np.testing.assert_array_equal(idx[0], eager_idx)
  np.testing.assert_allclose(tokens[0], eager_tokens, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(order[0], visionzip.order(*args, keep=8, dominant=5))


def test_patch_view_padding_is_never_kept_or_merged():
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
