"""TOPS against a NumPy reference loop, the facility-location guarantee, and brute force on small N."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selection_helpers import np_normalize
from tops_jax import prune
from tops_jax import tops

ALL_SUBSETS = [c for r in (1, 2, 3) for c in itertools.combinations(tops.CRITERIA, r)]


def np_tops(features, relevance, valid, keep, alpha=0.5, lam=0.5, normalize="mean", criteria=tops.CRITERIA,
            follow=None, tol=1e-5):
  """The paper's Algorithm 1, one step at a time, as plainly as possible.

  With `follow` (an order to check), each step asserts that the followed pick is the reference's pick, or scores
  within `tol` of it (an arithmetic tie: two sums equal in exact arithmetic that float32 rounding orders either way,
  e.g. min-max normalisation over the last few candidates), and continues from the followed pick. Exact ties in the
  data (duplicate tokens) are compared exactly by the tie tests.
  """
  f = features.astype(np.float32)
  f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
  sim = f @ f.T
  n = len(f)
  chosen = []

  def scores(best):
    cand = valid.copy()
    cand[chosen] = False
    total = np.zeros(n, np.float32)
    if "relevance" in criteria:
      total += np_normalize(relevance.astype(np.float32), cand, normalize)
    if "diversity" in criteria:
      total += alpha * np_normalize(1.0 - best, cand, normalize)
    if "coverage" in criteria:
      gain = np.array([sum(max(0.0, sim[i, j] - best[j]) for j in range(n) if cand[j]) for i in range(n)],
                      np.float32)
      total += lam * np_normalize(gain, cand, normalize)
    total[~cand] = -np.inf
    return total

  if relevance is not None:
    chosen.append(int(np.argmax(np.where(valid, relevance, -np.inf))))
  else:
    chosen.append(int(np.argmax(scores(np.zeros(n, np.float32)))))
  best = sim[chosen[0]].copy()
  while len(chosen) < keep:
    step = scores(best)
    i = int(np.argmax(step))
    if follow is not None:
      j = int(follow[len(chosen)])
      assert j == i or step[j] >= step[i] - tol * max(1.0, abs(step[i])), (len(chosen), j, i, step[j], step[i])
      i = j
    chosen.append(i)
    best = np.maximum(best, sim[i])
  return np.array(chosen)


def check_greedy_rule(got, features, relevance, valid, keep, **kwargs):
  """`got` is the reference's order up to arithmetic near-ties; the seed is exact."""
  got = np.asarray(got)
  assert got.shape == (keep,)
  np_tops(features, relevance, valid, keep, follow=got, **kwargs)
  want = np_tops(features, relevance, valid, 1, **kwargs)
  assert got[0] == want[0]


def _inputs(seed, n, d, masked=False):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(n, d)).astype(np.float32)
  relevance = rng.uniform(size=n).astype(np.float32)
  valid = np.ones(n, bool)
  if masked:
    valid[rng.choice(n, size=n // 4, replace=False)] = False
  return features, relevance, valid


@pytest.mark.parametrize("seed,n,d,keep", [(0, 12, 4, 5), (1, 33, 8, 10), (2, 64, 16, 20), (4, 40, 16, 36)])
@pytest.mark.parametrize("normalize", ["mean", "minmax"])
def test_matches_numpy_reference(seed, n, d, keep, normalize):
  features, relevance, valid = _inputs(seed, n, d)
  got = prune.select_order("tops", features, keep=keep, relevance=relevance, normalize=normalize)
  check_greedy_rule(got, features, relevance, valid, keep, normalize=normalize)


@pytest.mark.parametrize("normalize", ["mean", "minmax", "none"])
def test_dense_engine_matches_numpy_reference(normalize):
  # The default engine carries the coverage gain; the dense one, kept for comparisons, recomputes it every step.
  features, relevance, valid = _inputs(8, 45, 8, masked=True)
  got = prune.select_order("tops", features, keep=20, relevance=relevance, valid=valid, normalize=normalize,
                           engine="dense")
  check_greedy_rule(got, features, relevance, valid, 20, normalize=normalize)


@pytest.mark.parametrize("normalize", ["mean", "minmax"])
def test_run_to_exhaustion_follows_the_greedy_rule(normalize):
  features, relevance, valid = _inputs(3, 48, 3)
  got = np.asarray(prune.select_order("tops", features, keep=48, relevance=relevance, normalize=normalize))
  np.testing.assert_array_equal(np.sort(got), np.arange(48))
  np_tops(features, relevance, valid, 48, normalize=normalize, follow=got)


@pytest.mark.parametrize("criteria", ALL_SUBSETS, ids=["+".join(c) for c in ALL_SUBSETS])
def test_every_criteria_subset_matches_reference(criteria):
  features, relevance, valid = _inputs(7, 40, 6, masked=True)
  got = prune.select_order("tops", features, keep=12, relevance=relevance, valid=valid, criteria=criteria,
                           alpha=0.7, lam=1.3)
  check_greedy_rule(got, features, relevance, valid, 12, alpha=0.7, lam=1.3, criteria=criteria)


@pytest.mark.parametrize("criteria", [("diversity", "coverage"), ("coverage",)])
def test_relevance_free_seed(criteria):
  features, _, valid = _inputs(11, 30, 5, masked=True)
  got = prune.select_order("tops", features, keep=8, valid=valid, criteria=criteria)
  check_greedy_rule(got, features, None, valid, 8, criteria=criteria)


def test_masked_tokens_never_selected_and_reference_agrees():
  features, relevance, valid = _inputs(5, 50, 8, masked=True)
  relevance[~valid] = 10.0  # the most relevant tokens are padding: they must still be ignored
  got = np.asarray(prune.select_order("tops", features, keep=30, relevance=relevance, valid=valid))
  assert valid[got].all()
  check_greedy_rule(got, features, relevance, valid, 30)


def test_ties_go_to_lowest_index():
  rng = np.random.default_rng(3)
  base = rng.normal(size=(6, 4)).astype(np.float32)
  features = np.concatenate([base, base, base])  # every token has two exact duplicates
  relevance = np.tile(rng.uniform(size=6).astype(np.float32), 3)
  # While unchosen tokens have unchosen copies, every copy scores exactly the same: the first copy must win each time.
  got = np.asarray(prune.select_order("tops", features, keep=5, relevance=relevance))
  np.testing.assert_array_equal(got, np_tops(features, relevance, np.ones(18, bool), 5))
  assert (got < 6).all(), got


def test_batched_rows_with_different_masks_equal_per_row_calls():
  rng = np.random.default_rng(9)
  features = rng.normal(size=(3, 40, 8)).astype(np.float32)
  relevance = rng.uniform(size=(3, 40)).astype(np.float32)
  valid = np.ones((3, 40), bool)
  valid[0, 30:] = False
  valid[2, ::3] = False
  batched = np.asarray(prune.select("tops", features, keep=10, relevance=relevance, valid=valid))
  for b in range(3):
    row = prune.select("tops", features[b], keep=10, relevance=relevance[b], valid=valid[b])
    np.testing.assert_array_equal(batched[b], np.asarray(row))


def test_coverage_only_greedy_meets_the_submodular_bound():
  # With non-negative features F >= 0, coverage-only TOPS from the empty set is the greedy algorithm for facility
  # location, a monotone submodular function: it must reach (1 - 1/e) of the best subset of the same size.
  rng = np.random.default_rng(0)
  for trial in range(5):
    n, keep = 11, 3
    features = np.abs(rng.normal(size=(n, 3))).astype(np.float32) ** 3
    got = np.asarray(prune.select("tops", features, keep=keep, criteria=("coverage",), normalize="none"))
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    sim = f @ f.T
    value = lambda s: sim[:, list(s)].max(1).sum()
    best = max(value(s) for s in itertools.combinations(range(n), keep))
    assert value(got) >= (1 - 1 / np.e) * best - 1e-5, trial


@pytest.mark.slow
def test_brute_force_objective_greedy_is_near_optimal_but_below_optimum():
  # Greedy is a heuristic for the TOPS objective: it can never beat the exhaustive optimum, and on these small
  # instances it stays within a constant factor (the approximation report in experiments prints the ratios).
  rng = np.random.default_rng(1)
  ratios = []
  for _ in range(4):
    n, keep = 10, 4
    features = rng.normal(size=(n, 4)).astype(np.float32)
    relevance = rng.uniform(size=n).astype(np.float32)
    obj = jax.jit(lambda s: tops.objective(features, relevance, s))
    masks = np.zeros((0, n), bool)
    subsets = list(itertools.combinations(range(n), keep))
    masks = np.zeros((len(subsets), n), bool)
    for row, s in enumerate(subsets):
      masks[row, list(s)] = True
    values = np.asarray(jax.vmap(obj)(masks))
    got = np.asarray(prune.select("tops", features, keep=keep, relevance=relevance, normalize="none"))
    mask = np.zeros(n, bool)
    mask[got] = True
    greedy_value = float(obj(mask))
    assert greedy_value <= values.max() + 1e-5
    ratios.append(greedy_value / values.max())
  assert min(ratios) > 0.5, ratios


def test_bad_criteria_and_missing_relevance():
  features, relevance, _ = _inputs(0, 10, 4)
  with pytest.raises(ValueError, match="criteria must be a non-empty subset"):
    prune.select("tops", features, keep=3, relevance=relevance, criteria=("relevance", "novelty"))
  with pytest.raises(ValueError, match=r"tops: this method needs a relevance vector.*relevance criterion needs it, "
                                       r"drop it with criteria=\('diversity', 'coverage'\)"):
    prune.select("tops", features, keep=3)
  with pytest.raises(ValueError, match="normalize must be"):
    prune.select("tops", features, keep=3, relevance=relevance, normalize="zscore")
  with pytest.raises(ValueError, match="engine must be one of"):
    prune.select("tops", features, keep=3, relevance=relevance, engine="sparse")
  with pytest.raises(ValueError, match="chunk must be a positive int"):
    prune.select("tops", features, keep=3, relevance=relevance, chunk=0)


def test_alpha_sweep_does_not_recompile():
  features, relevance, _ = _inputs(0, 20, 4)
  prune.select("tops", features, keep=5, relevance=relevance, alpha=0.1)
  before = prune._run._cache_size()
  for alpha in (0.2, 0.9, 2.0):
    prune.select("tops", features, keep=5, relevance=relevance, alpha=alpha)
  assert prune._run._cache_size() == before
