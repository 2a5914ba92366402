"""Decoder port: text-only parity with transformers, attention rows, segments + per-layer KV cache, config parsing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import model_factories as mf
import models
from models import llama

ATOL = 2e-5


def _prompts(seed=0, b=2, s=260, pad=53):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, 250, size=(b, s))
  mask = np.ones((b, s), np.int64)
  mask[1, :pad], ids[1, :pad] = 0, 0
  return ids, mask


def test_text_model_matches_transformers_with_attention_rows(tmp_path):
  """LlamaForCausalLM (GQA 4/2, rope_theta 300, left padding, 260 tokens): hidden states, logits, attention rows."""
  hf, path = mf.tiny_causal_lm(tmp_path, "llama", rope_parameters=dict(rope_type="default", rope_theta=300.0))
  model = models.load_pretrained(path)
  assert isinstance(model, llama.LlamaForCausalLM)
  ids, mask = _prompts()
  pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
  layer = 1
  queries = np.array([[259, 100, 7], [259, 200, 60]])           # real tokens of each row

  def fn(m, ids, mask):
    out = m(ids, mask, output_hidden_states=True, all_logits=True)
    probs = m.model.attention_probs(layer, out.hidden_states[layer], llama.position_ids_from_mask(mask), mask, queries)
    return out, probs

  with jax.default_matmul_precision("float32"):
    out, probs = jax.jit(fn)(model, ids, mask)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
             output_hidden_states=True, output_attentions=True)
  valid = mask.astype(bool)
  for l in range(len(ref.hidden_states) - 1):
    np.testing.assert_allclose(np.asarray(out.hidden_states[l])[valid], ref.hidden_states[l].numpy()[valid], rtol=0,
                               atol=ATOL, err_msg=f"hidden state {l}")
  np.testing.assert_allclose(np.asarray(out.last_hidden_state)[valid], ref.hidden_states[-1].numpy()[valid], rtol=0,
                             atol=ATOL)
  np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], rtol=0, atol=ATOL)
  want = np.stack([ref.attentions[layer].numpy()[b][:, queries[b]] for b in range(2)])    # [B, H, Q, S]
  assert probs.shape == want.shape == (2, 4, 3, 260)
  np.testing.assert_allclose(probs, want, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_segments_and_per_layer_cache(tmp_path):
  """Prefill with a pruned second segment leaves per-layer cache lengths; chunked prefill and a decode step then
  agree with cache-free segment runs on the equivalent sequences (Mistral, sliding window 40)."""
  _, path = mf.tiny_causal_lm(tmp_path, "mistral", sliding_window=40)
  model = models.load_pretrained(path)
  lm = model.model
  ids, mask = _prompts(seed=1, s=90, pad=11)
  b, s = ids.shape
  pos = llama.position_ids_from_mask(mask)
  keep = np.sort(np.random.RandomState(2).choice(np.arange(20, s), size=50, replace=False))   # rows kept after layer 1
  new_id, new_pos = jnp.array([[5], [9]]), pos[:, -1:] + 1

  def cached(m):
    lm = m.model
    cache = llama.init_cache(m.config, b, 128)
    x = lm.embed(ids)
    first = lm.run_layers(x[:, :60], pos[:, :60], mask[:, :60], start=0, stop=1, cache=cache)       # chunk 1
    second = lm.run_layers(x[:, 60:], pos[:, 60:], mask[:, 60:], start=0, stop=1, cache=first.cache)  # chunk 2
    h = jnp.concatenate([first.hidden, second.hidden], axis=1)[:, keep]
    rest = lm.run_layers(h, pos[:, keep], mask[:, keep], start=1, cache=second.cache)
    step = lm.run_layers(lm.embed(new_id), new_pos, None, cache=rest.cache)
    return m.head(rest.hidden), m.head(step.hidden), step.cache

  def reference(m):
    lm = m.model
    x = jnp.concatenate([lm.embed(ids), lm.embed(new_id)], axis=1)
    p = jnp.concatenate([pos, new_pos], axis=1)
    v = jnp.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
    h = lm.run_layers(x, p, v, start=0, stop=1).hidden
    rows = np.concatenate([keep, [s]])
    h = lm.run_layers(h[:, rows], p[:, rows], v[:, rows], start=1).hidden
    return m.head(h[:, :-1]), m.head(h[:, -1:])

  with jax.default_matmul_precision("float32"):
    prefill, step, cache = jax.jit(cached)(model)
    want_prefill, want_step = jax.jit(reference)(model)
  np.testing.assert_array_equal(cache.end, [s + 1, len(keep) + 1, len(keep) + 1])
  np.testing.assert_array_equal(cache.valid[0, :, :s + 1], np.concatenate([mask, np.ones((b, 1))], 1) > 0)
  np.testing.assert_array_equal(cache.valid[1:, :, len(keep) + 1:], False)
  valid = mask[:, keep].astype(bool)
  np.testing.assert_allclose(np.asarray(prefill)[valid], np.asarray(want_prefill)[valid], rtol=0, atol=1e-5)
  np.testing.assert_allclose(step, want_step, rtol=0, atol=1e-5)


def test_config_parsing():
  cfg = llama.TextConfig.from_hf(dict(model_type="llama", rope_theta=5e5,
                                      rope_scaling=dict(type="linear", factor=4.0), hidden_size=64,
                                      num_attention_heads=4))
  assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta) == ("linear", 4.0, 5e5)
  assert (cfg.head_dim, cfg.num_key_value_heads, cfg.intermediate_size) == (16, 4, 11008)
  cfg = llama.TextConfig.from_hf(dict(model_type="mistral"))
  assert (cfg.sliding_window, cfg.num_key_value_heads, cfg.intermediate_size) == (4096, 8, 14336)
  assert llama.TextConfig.from_hf(dict(model_type="mistral", sliding_window=None)).sliding_window is None
  for bad, match in [
      (dict(rope_parameters=dict(rope_type="yarn", factor=2.0)), "unsupported rope type 'yarn'"),
      (dict(rope_scaling=dict(type="dynamic", factor=2.0)), "unsupported rope type 'dynamic'"),
      (dict(rope_parameters=dict(rope_type="linear")), "needs a `factor`"),
      (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
      (dict(hidden_act="swiglu_oai"), "hidden_act"),
      (dict(num_attention_heads=32, num_key_value_heads=5), "not a multiple"),
      (dict(model_type="gemma"), "model_type='gemma'"),
      (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
  ]:
    with pytest.raises(ValueError, match=match):
      llama.TextConfig.from_hf({"model_type": "llama", **bad})


def test_position_ids_and_mask_helpers():
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(llama.position_ids_from_mask(mask), [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
  m = np.asarray(llama.make_attention_mask(jnp.arange(5), jnp.asarray(mask, bool), sliding_window=2))[:, 0]
  want = np.zeros((2, 5, 5), bool)
  for b in range(2):
    for q in range(5):
      for k in range(5):
        want[b, q, k] = (bool(mask[b, k]) and 0 <= q - k < 2) or q == k
  np.testing.assert_array_equal(m, want)


def test_segment_bounds_are_checked(tmp_path):
  _, path = mf.tiny_causal_lm(tmp_path, "llama")
  lm = models.load_pretrained(path).model
  x, pos = jnp.zeros((1, 4, 64)), jnp.zeros((1, 4), jnp.int32)
  for start, stop in [(2, 2), (0, 4), (-1, 2)]:
    with pytest.raises(ValueError, match="layer segment"):
      lm.run_layers(x, pos, start=start, stop=stop)
