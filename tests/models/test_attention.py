"""Attention schedules (`models.attention`): the blocked causal prefill against a NumPy loop and the one-call path,
inside the decoder against transformers, and the empty-cache prefill against the general cached path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import model_factories as mf
import models
from models import attention
from models import llama
from models import sharding


def _reference(q, k, v, valid, window):
  """Per row, head and query: softmax over the real keys at or before it (within the window), own slot always."""
  b, s, h, dh = q.shape
  g = h // k.shape[2]
  out = np.zeros(q.shape, np.float64)
  for r in range(b):
    for head in range(h):
      for i in range(s):
        keys = [j for j in range(s)
                if j == i or (valid[r, j] and j <= i and (window is None or i - j < window))]
        logits = np.array([q[r, i, head] @ k[r, j, head // g] for j in keys]) / np.sqrt(dh)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[r, i, head] = p @ v[r, keys, head // g]
  return out


@pytest.mark.parametrize("window,block", [(None, 8), (None, 5), (6, 8), (6, 29)])
def test_blocked_causal_matches_loop_and_one_call(window, block):
  """GQA 4/2, a left-padded and a right-padded row, 29 tokens in blocks of 5 or 8 (partial last block)."""
  rng = np.random.default_rng(0)
  b, s, h, hkv, dh = 2, 29, 4, 2, 8
  q = rng.standard_normal((b, s, h, dh)).astype(np.float32)
  k = rng.standard_normal((b, s, hkv, dh)).astype(np.float32)
  v = rng.standard_normal((b, s, hkv, dh)).astype(np.float32)
  valid = np.ones((b, s), bool)
  valid[0, :7] = False
  valid[1, 25:] = False
  blocked = jax.jit(lambda *a: attention.causal(*a, sliding_window=window, implementation="blocked",
                                                block=block))(q, k, v, valid)
  one_call = attention.causal(q, k, v, valid, sliding_window=window, implementation="xla")
  want = _reference(q, k, v, valid, window)
  np.testing.assert_allclose(np.asarray(blocked), want, rtol=0, atol=2e-6)
  np.testing.assert_allclose(np.asarray(one_call), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("spec", ["fsdp:8", "data:2,fsdp:4"])
def test_blocked_schedules_keep_each_row_on_its_device(spec):
  """Under a mesh splitting the rows, the blocked schedules (a lax.map over (row, head) pairs) run on each device's
  own rows: the same bits as without a mesh, and the partitioned program gathers nothing."""
  rng = np.random.default_rng(2)
  b, s, h, hkv, dh = 8, 29, 4, 2, 8
  q = rng.standard_normal((b, s, h, dh)).astype(np.float32)
  k, v = (rng.standard_normal((b, s, hkv, dh)).astype(np.float32) for _ in range(2))
  valid = np.ones((b, s), bool)
  valid[0, :7] = False
  kh, vh = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
  causal = jax.jit(lambda *a: attention.causal(*a, implementation="blocked", block=8))
  both = jax.jit(lambda *a: attention.bidirectional(*a, implementation="blocked"))
  want = causal(q, k, v, valid), both(q, kh, vh)
  mesh = sharding.make_mesh(spec)
  with jax.set_mesh(mesh):
    placed = [sharding.put_batch(x, mesh) for x in (q, k, v, valid, kh, vh)]
    got = causal(*placed[:4]), both(placed[0], *placed[4:])
    hlo = causal.lower(*placed[:4]).compile().as_text() + both.lower(placed[0], *placed[4:]).compile().as_text()
  for a, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(w))
  assert "all-gather" not in hlo


@pytest.mark.slow
def test_blocked_causal_bfloat16_matches_one_call():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 40, 2, 16)), jnp.bfloat16) for _ in range(3))
  valid = jnp.ones((1, 40), bool)
  a = attention.causal(q, k, v, valid, implementation="blocked", block=16)
  want = attention.causal(q, k, v, valid, implementation="xla")
  assert a.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(want, np.float32), rtol=0, atol=2e-2)


def test_implementation_names_are_checked():
  assert attention.resolve("auto") == ("blocked" if jax.default_backend() == "cpu" else "xla")
  with pytest.raises(ValueError, match="flash"):
    attention.resolve("flash")
  cfg = llama.TextConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=4)
  from flax import nnx  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="attention implementation"):
    llama.LlamaModel(cfg, rngs=nnx.Rngs(0), attention_impl="flash")


@pytest.mark.slow
@pytest.mark.parametrize("text,overrides", [("llama", {}), ("mistral", dict(sliding_window=40))])
def test_blocked_decoder_matches_transformers(tmp_path, monkeypatch, text, overrides):
  """The blocked schedule over 4 blocks of 64 (260 tokens, left padding) gives transformers' logits at every real
  position, and its cached prefill writes the same cache as the general cached path."""
  hf, path = mf.tiny_causal_lm(tmp_path, text, **overrides)
  model = models.load_pretrained(path)
  monkeypatch.setattr(attention, "BLOCK", 64)
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 250, size=(2, 260))
  mask = np.ones((2, 260), np.int64)
  mask[1, :53], ids[1, :53] = 0, 0
  pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
  model.model.attention_impl = "blocked"
  with jax.default_matmul_precision("float32"):
    out = jax.jit(lambda m, i, k: m(i, k, all_logits=True))(model, ids, mask)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
  valid = mask.astype(bool)
  # 4e-5: the blocks sum the same terms in another order than one call (the suite-wide parity bound is 2e-5).
  np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], rtol=0, atol=4e-5)

  lm = model.model
  x = lm.embed(jnp.asarray(ids))
  positions = llama.position_ids_from_mask(mask)
  cache = llama.init_cache(lm.config, 2, 300)

  def cached(m, empty):
    return m.run_layers(x, positions, jnp.asarray(mask), cache=cache, cache_empty=empty)

  with jax.default_matmul_precision("float32"):
    fresh = jax.jit(lambda m: cached(m, True))(lm)
    general = jax.jit(lambda m: cached(m, False))(lm)
  np.testing.assert_allclose(np.asarray(fresh.hidden)[valid], np.asarray(general.hidden)[valid], rtol=0, atol=2e-5)
  np.testing.assert_allclose(np.asarray(fresh.cache.k), np.asarray(general.cache.k), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(fresh.cache.valid), np.asarray(general.cache.valid))
  np.testing.assert_array_equal(np.asarray(fresh.cache.end), np.asarray(general.cache.end))
  assert int(fresh.cache.end[0]) == 260


@pytest.mark.slow
def test_with_cache_merges_to_one_softmax_over_both_parts():
  """Cached slots + new tokens through two calls merged by their logsumexps == one call over the concatenated keys;
  row 1 sees no cached slot at all (its cache part gets weight 0)."""
  rng = np.random.default_rng(2)
  b, w, s, h, hkv, dh = 2, 11, 3, 4, 2, 8
  q = rng.standard_normal((b, s, h, dh)).astype(np.float32)
  k_old, v_old = (rng.standard_normal((b, w, hkv, dh)).astype(np.float32) for _ in range(2))
  k_new, v_new = (rng.standard_normal((b, s, hkv, dh)).astype(np.float32) for _ in range(2))
  old_visible = np.zeros((b, 1, s, w), bool)
  old_visible[0, 0, :, :7] = True
  old_visible[0, 0, 2, 0] = False                       # a per-query difference (a sliding window's edge)
  new_visible = np.asarray(attention.visible(jnp.arange(s), jnp.arange(s), jnp.ones((b, s), bool), None))
  got = attention.with_cache(q, k_old, v_old, old_visible, k_new, v_new, new_visible)
  want = jax.nn.dot_product_attention(q, np.concatenate([k_old, k_new], 1), np.concatenate([v_old, v_new], 1),
                                      mask=np.concatenate([old_visible, new_visible], -1))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6)
