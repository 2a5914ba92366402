"""Greedy generation vs transformers' generate(do_sample=False): left-padded batches, stop tokens, one compile."""

import numpy as np
import pytest
import torch

import model_factories as mf
import models
from models import generate


def _hf_new_tokens(hf, prompt_len, **kw):
  with torch.no_grad():
    out = hf.generate(do_sample=False, pad_token_id=0, **kw)
  return out[:, prompt_len:].numpy()


def _check(ours, theirs, max_new_tokens, pad=0):
  """transformers stops at the longest row; ours is always max_new_tokens wide and pads the rest."""
  tokens = np.asarray(ours.tokens)
  assert tokens.shape[1] == max_new_tokens
  np.testing.assert_array_equal(tokens[:, :theirs.shape[1]], theirs)
  np.testing.assert_array_equal(tokens[:, theirs.shape[1]:], pad)


@pytest.mark.slow
def test_llava_greedy_matches_transformers(tmp_path):
  hf, path = mf.tiny_llava(tmp_path, "llama")
  model = models.load_pretrained(path)
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 250, size=(2, 70))
  mask = np.ones_like(ids)
  mask[1, :9], ids[1, :9] = 0, 0
  ids[0, 5:21] = mf.IMAGE_TOKEN_ID
  ids[1, 30:46] = mf.IMAGE_TOKEN_ID
  px = rng.randn(2, 3, 28, 28).astype(np.float32)
  inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px))

  # Stop tokens: one that row 0 emits at step 3 (found from a free run), plus one never emitted.
  free = _hf_new_tokens(hf, 70, max_new_tokens=12, **inputs)
  eos = [int(free[0, 3]), 254]
  theirs = _hf_new_tokens(hf, 70, max_new_tokens=12, eos_token_id=eos, **inputs)
  assert theirs.shape[1] > 4                 # row 1 goes on after row 0 stopped
  ours = generate.greedy(model, ids, mask, pixel_values=px, max_new_tokens=12, eos_token_ids=eos, pad_token_id=0)
  _check(ours, theirs, 12)
  assert ours.num_tokens[0] == 4
  # Same shapes and stop tokens, other prompt values: no new compile.
  compiled = generate.prefill._cache_size(), generate.decode._cache_size()
  generate.greedy(model, ids[:, ::-1].copy(), mask, pixel_values=px[::-1].copy(), max_new_tokens=12,
                  eos_token_ids=eos, pad_token_id=0)
  assert (generate.prefill._cache_size(), generate.decode._cache_size()) == compiled


@pytest.mark.slow
def test_text_greedy_with_sliding_window_matches_transformers(tmp_path):
  """Mistral with a 24-token window: decoding runs past the window, so stale slots must drop out of the mask."""
  hf, path = mf.tiny_causal_lm(tmp_path, "mistral", sliding_window=24)
  model = models.load_pretrained(path)
  rng = np.random.RandomState(3)
  ids = rng.randint(3, 250, size=(3, 30))
  mask = np.ones_like(ids)
  mask[0, :4], ids[0, :4] = 0, 0
  mask[2, :17], ids[2, :17] = 0, 0
  theirs = _hf_new_tokens(hf, 30, input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=20)
  ours = generate.greedy(model, ids, mask, max_new_tokens=20)
  _check(ours, theirs, 20)


def test_rejects_bad_arguments(tmp_path):
  _, path = mf.tiny_causal_lm(tmp_path, "llama")
  model = models.load_pretrained(path)
  ids = np.ones((1, 5), np.int32)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate.greedy(model, ids, max_new_tokens=0)
  with pytest.raises(ValueError, match="left padding"):
    generate.greedy(model, ids, np.array([[1, 1, 1, 1, 0]]), max_new_tokens=2)


@pytest.mark.slow
def test_score_tokens_equals_the_full_forward_over_prompt_and_continuation(tmp_path):
  """Teacher-forced log-probabilities from a prefill state equal log_softmax of one cache-free forward over the
  prompt followed by the continuation (transformers' way of scoring a continuation)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  _, path = mf.tiny_causal_lm(tmp_path, "llama")
  model = models.load_pretrained(path)
  rng = np.random.RandomState(5)
  ids = rng.randint(3, 250, size=(2, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :3], ids[1, :3] = 0, 0
  cont = rng.randint(3, 250, size=(2, 4)).astype(np.int32)
  with jax.default_matmul_precision("float32"):
    start = generate.prefill(model, dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask)),
                             capacity=16, cache_dtype=jnp.float32)
    got = np.asarray(generate.score_tokens(model, start, jnp.asarray(cont)))
    full_ids = np.concatenate([ids, cont], 1)
    full_mask = np.concatenate([mask, np.ones_like(cont)], 1)
    logits = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask), all_logits=True).logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)
  want = np.stack([logp[b, 11 + np.arange(4), cont[b]] for b in range(2)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
