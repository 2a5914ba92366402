"""`relevance.clip_text_relevance` against CDPruner's formula written as the official code runs it (llava_arch.py,
`encode_images`: per-chunk cosines, negated mean, min-max over the whole image), a hand-checked case, masks, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tops_jax import relevance


def np_official(image_embeds, text_chunks):
  """One image: image_embeds float[P crops, N, E], text_chunks float[M, E] -> float64[P, N]."""
  image = np.asarray(image_embeds, np.float64)
  text = np.asarray(text_chunks, np.float64)
  image = image / np.linalg.norm(image, axis=-1, keepdims=True)
  text = text / np.linalg.norm(text, axis=-1, keepdims=True)
  rel = np.einsum("pne,me->pnm", image, text)
  rel = (-rel).mean(axis=-1)
  return (rel - rel.min() + 1e-6) / (rel.max() - rel.min())


def text_vector(text_chunks):
  """What ClipTextRelevance.encode returns: the mean of the unit chunk embeddings (not renormalised)."""
  t = np.asarray(text_chunks, np.float64)
  return (t / np.linalg.norm(t, axis=-1, keepdims=True)).mean(0)


def test_hand_checked():
  image = jnp.asarray([[[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]]])       # cosines with (1, 0): 1, 0, 1/sqrt(2)
  got = relevance.clip_text_relevance(image, jnp.asarray([[1.0, 0.0]]))
  want = [1e-6, 1.0 + 1e-6, 1.0 - 0.5 ** 0.5 + 1e-6]                 # s = -cos: lo -1, hi 0, span 1
  np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-6)
  raw = relevance.clip_text_relevance(image, jnp.asarray([[1.0, 0.0]]), normalize=False)
  np.testing.assert_allclose(raw[0], [-1.0, 0.0, -(0.5 ** 0.5)], rtol=0, atol=1e-6)


@pytest.mark.parametrize("crops,n,e,chunks,seed", [(1, 24, 8, 1, 0), (3, 16, 6, 3, 1), (5, 9, 12, 2, 2)])
def test_matches_official_over_all_crops(crops, n, e, chunks, seed):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(crops, n, e)) * rng.uniform(0.5, 3.0, size=(crops, n, 1))
  text = rng.normal(size=(chunks, e))
  want = np_official(image, text)
  fn = jax.jit(relevance.clip_text_relevance)
  got = fn(jnp.asarray(image.reshape(1, crops * n, e), jnp.float32), jnp.asarray(text_vector(text)[None], jnp.float32),
           jnp.ones((1, crops * n), bool))
  assert got.dtype == jnp.float32 and got.shape == (1, crops * n)
  np.testing.assert_allclose(np.asarray(got).reshape(crops, n), want, rtol=1e-5, atol=1e-5)


def test_rows_are_independent_and_padding_is_ignored():
  rng = np.random.default_rng(3)
  e, n = 5, 12
  image = rng.normal(size=(2, 3 * n, e))
  image[1, 2 * n:] = 1e6 * rng.normal(size=(n, e))                     # row 1 has 2 crops; its third is padding
  text = [rng.normal(size=(2, e)), rng.normal(size=(1, e))]
  valid = np.ones((2, 3 * n), bool)
  valid[1, 2 * n:] = False
  got = relevance.clip_text_relevance(jnp.asarray(image, jnp.float32),
                                      jnp.asarray(np.stack([text_vector(t) for t in text]), jnp.float32),
                                      jnp.asarray(valid))
  np.testing.assert_allclose(got[0], np_official(image[0].reshape(3, n, e), text[0]).reshape(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1, :2 * n], np_official(image[1, :2 * n].reshape(2, n, e), text[1]).reshape(-1),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[1, 2 * n:], 0.0)


def test_constant_and_empty_rows():
  image = jnp.ones((2, 4, 3))
  valid = jnp.asarray([[True, True, False, True], [False] * 4])
  got = relevance.clip_text_relevance(image, jnp.asarray([[1.0, 2.0, 0.5], [0.0, 1.0, 0.0]]), valid)
  np.testing.assert_array_equal(got, [[1.0, 1.0, 0.0, 1.0], [0.0] * 4])     # official: 0 / 0
  raw = relevance.clip_text_relevance(image, jnp.ones((2, 3)), valid, normalize=False)
  np.testing.assert_array_equal(raw[1], 0.0)


def test_bad_inputs_name_the_argument():
  image, text = jnp.ones((2, 4, 3)), jnp.ones((2, 3))
  with pytest.raises(ValueError, match="image_embeds float"):
    relevance.clip_text_relevance(image, jnp.ones((2, 5)))
  with pytest.raises(ValueError, match="image_embeds float"):
    relevance.clip_text_relevance(image, jnp.ones((1, 3)))
  with pytest.raises(ValueError, match="valid must have shape"):
    relevance.clip_text_relevance(image, text, jnp.ones((2, 5), bool))
  with pytest.raises(ValueError, match="valid must be a bool mask"):
    relevance.clip_text_relevance(image, text, jnp.ones((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="text_embeds must be floating point"):
    relevance.clip_text_relevance(image, jnp.ones((2, 3), jnp.int32))
