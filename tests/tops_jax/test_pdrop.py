"""tops_jax.pdrop: PyramidDrop's rank & drop order against the official top-k written out in NumPy."""

import numpy as np
import pytest

from tops_jax import pdrop
from tops_jax import prune


def _official(attention, keep):
  """`attention_avg_text.topk(keep_length).indices` then `.sort()`, ties to the lowest index."""
  return np.sort(np.argsort(-attention, kind="stable")[:keep])


@pytest.mark.parametrize("keep", [1, 5, 12])
def test_topk_matches_the_official_rule(keep):
  rng = np.random.default_rng(keep)
  attention = rng.uniform(size=12).astype(np.float32)
  attention[[2, 7]] = attention[4]                       # ties go to the lowest index
  got = prune.select("pdrop", np.zeros((12, 3), np.float32), keep=keep, relevance=attention)
  np.testing.assert_array_equal(np.asarray(got), _official(attention, keep))
  order = np.asarray(pdrop.order(np.zeros((12, 3)), attention, np.ones(12, bool), keep=keep))
  np.testing.assert_array_equal(order, np.argsort(-attention, kind="stable")[:keep])   # best first


def test_padding_is_never_kept_and_relevance_is_required():
  attention = np.array([0.9, 0.1, 0.8, 0.7, 0.2], np.float32)
  valid = np.array([False, True, True, False, True])
  got = prune.select("pdrop", np.zeros((5, 2), np.float32), keep=3, relevance=attention, valid=valid)
  np.testing.assert_array_equal(np.asarray(got), [1, 2, 4])
  with pytest.raises(ValueError, match="pdrop"):
    prune.select("pdrop", np.zeros((5, 2), np.float32), keep=2)
