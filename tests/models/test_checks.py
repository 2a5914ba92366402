"""Bad inputs at the models' public entry points (model calls, generate.greedy, pruning.forward / greedy): one
ValueError naming the argument, raised on the host before anything is traced (`models.checks`)."""

import re

import numpy as np
import pytest

import model_factories as mf
from models import generate
from models import loading
from models import pruning

IMAGE = mf.IMAGE_TOKEN_ID
STAGE1 = pruning.PruningConfig.flat(method="divprune", stage1_budget=4, stage1_relevance="none")
STAGE2_ONLY = pruning.PruningConfig.flat(method="divprune", stage2=((1, 4),), stage2_relevance="none")

# Every entry point that takes a LLaVA batch, called with (model, input_ids, pixel_values).
ENTRY_POINTS = {
    "call": lambda m, ids, px: m(ids, px),
    "generate.greedy": lambda m, ids, px: generate.greedy(m, ids, pixel_values=px, max_new_tokens=2),
    "pruning.forward": lambda m, ids, px: pruning.forward(m, STAGE1, ids, None, px),
    "pruning.greedy": lambda m, ids, px: pruning.greedy(m, STAGE1, ids, pixel_values=px, max_new_tokens=2),
}
# The models llava and llava_next come from tests/models/conftest.py.


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  """A text-only decoder with 32 positions, so that the position limit is cheap to reach."""
  _, path = mf.tiny_causal_lm(tmp_path_factory.mktemp("lm"), "llama", max_position_embeddings=32)
  return loading.load_pretrained(path)


def _batch(rows=2, seed=0):
  """Rows of 24 tokens, 16 of them one image run: (input_ids int64[B, 24], pixel_values float32[B, 3, 28, 28])."""
  ids = np.full((rows, 24), 7)
  ids[:, 2:2 + mf.NUM_PATCHES] = IMAGE
  return ids, np.random.RandomState(seed).randn(rows, 3, 28, 28).astype(np.float32)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_pixels(llava, entry, value):
  """Today a NaN pixel gives NaN logits, and pruning keeps [0, -1, -1, -1] for its row."""
  ids, px = _batch(rows=3)
  px[1, 2, 5, 6] = value
  px[2, 0, 0, 0] = -value
  with pytest.raises(ValueError, match=re.escape("pixel_values contain NaN/inf in image(s) [1, 2] (index along "
                                                 "axis 0")):
    ENTRY_POINTS[entry](llava, ids, px)


def test_non_finite_pixels_llava_next_names_the_image(llava_next):
  ids = np.full((2, 40), 7)
  px = np.zeros((2, 5, 3, 28, 28), np.float32)
  px[1, 3, 0, 10, 10] = np.nan                         # a grid crop of image 1
  with pytest.raises(ValueError, match=re.escape("pixel_values contain NaN/inf in image(s) [1]")):
    llava_next(ids, px, image_sizes=np.array([[50, 70], [100, 20]]))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("token, at", [(256, (0, 20)), (10 ** 6, (1, 23)), (-1, (1, 0))])
def test_token_ids_outside_the_vocabulary(llava, entry, token, at):
  """Today an id >= V is embedded as NaN (jnp.take fills) and a negative one wraps around: no error."""
  ids, px = _batch()
  ids[at] = token
  with pytest.raises(ValueError, match=re.escape(f"input_ids hold 1 token id(s) outside the vocabulary [0, 256), the "
                                                 f"first {token} at row {at[0]}, position {at[1]}")):
    ENTRY_POINTS[entry](llava, ids, px)


def test_token_ids_outside_the_vocabulary_text_only(lm):
  ids = np.array([[5, 6, 7, 300, 301]])
  for call in (lambda: lm(ids), lambda: generate.greedy(lm, ids, max_new_tokens=2)):
    with pytest.raises(ValueError, match=re.escape("input_ids hold 2 token id(s) outside the vocabulary [0, 256), the "
                                                   "first 300 at row 0, position 3")):
      call()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_empty_batch(llava, entry):
  ids, px = _batch()
  with pytest.raises(ValueError, match=re.escape("input_ids is an empty batch (shape (0, 24)); pass at least one row")):
    ENTRY_POINTS[entry](llava, ids[:0], px[:0])


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_no_images(llava, entry):
  ids, px = _batch()
  with pytest.raises(ValueError, match=re.escape("pixel_values holds no image (shape (0, 3, 28, 28))")):
    ENTRY_POINTS[entry](llava, ids, px[:0])


def test_empty_text_only_inputs(lm):
  with pytest.raises(ValueError, match=re.escape("input_ids is an empty batch (shape (0, 5))")):
    lm(np.zeros((0, 5), np.int32))
  with pytest.raises(ValueError, match=re.escape("input_ids has no tokens (shape (2, 0))")):
    generate.greedy(lm, np.zeros((2, 0), np.int32), max_new_tokens=2)
  with pytest.raises(ValueError, match="input_ids must hold integer token ids, got dtype float32"):
    generate.greedy(lm, np.ones((1, 5), np.float32), max_new_tokens=2)


BAD_MAX_NEW_TOKENS = [
    (True, "max_new_tokens must be a positive int, got True (bool)"),
    (2.0, "max_new_tokens must be a positive int, got 2.0 (float)"),
    (np.float32(2), "max_new_tokens must be a positive int, got np.float32(2.0) (float32)"),
    ("3", "max_new_tokens must be a positive int, got '3' (str)"),
    (None, "max_new_tokens must be a positive int, got None (NoneType)"),
    (0, "max_new_tokens must be >= 1, got 0"),
    (-2, "max_new_tokens must be >= 1, got -2"),
]


@pytest.mark.parametrize("value, message", BAD_MAX_NEW_TOKENS)
def test_bad_max_new_tokens(lm, llava, value, message):
  with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
    generate.greedy(lm, np.ones((1, 5), np.int32), max_new_tokens=value)
  ids, px = _batch()
  with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
    pruning.greedy(llava, STAGE1, ids, pixel_values=px, max_new_tokens=value)


@pytest.mark.slow
def test_max_new_tokens_within_max_position_embeddings(lm):
  """The longest real prompt (6 tokens; rows left-padded to 10) plus max_new_tokens may fill the 32 positions."""
  ids = np.full((2, 10), 9)
  mask = np.ones_like(ids)
  mask[0, :4] = 0
  mask[1, :6] = 0
  out = generate.greedy(lm, ids, mask, max_new_tokens=np.int64(26))
  assert np.asarray(out.tokens).shape == (2, 26)
  with pytest.raises(ValueError, match=re.escape("max_new_tokens=27 runs past max_position_embeddings=32: the prompt "
                                                 "holds 6 tokens and 6 + 27 = 33 > 32")):
    generate.greedy(lm, ids, mask, max_new_tokens=27)


@pytest.mark.slow
@pytest.mark.parametrize("config, prompt", [(STAGE1, 12), (STAGE2_ONLY, 24)])
def test_pruned_generation_past_max_position_embeddings(llava, config, prompt):
  """Stage I re-indexes positions over text_len + budget = 8 + 4 tokens; without it the prompt keeps all 24."""
  ids, px = _batch()
  m = 1025 - prompt
  with pytest.raises(ValueError, match=re.escape(f"max_new_tokens={m} runs past max_position_embeddings=1024: the "
                                                 f"prompt holds {prompt} tokens and {prompt} + {m} = 1025 > 1024")):
    pruning.greedy(llava, config, ids, pixel_values=px, max_new_tokens=m)
