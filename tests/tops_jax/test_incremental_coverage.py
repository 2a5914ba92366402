"""The incremental coverage engine of TOPS and SCOPE against exact sums and against the dense engine.

Axes: B batch, N visual tokens, D width, K kept.

The incremental gain must be the float32 rounding of the exact sum of the very terms max(0, F[i, j] - m_j) the dense
engine adds (checked with math.fsum), and both engines must pick the same tokens over a corpus of random cases run the
way `prune` runs them (jit, vmap over a batch of 3). A case where the picks part is accepted only as a float near-tie:
at the first differing step both picks score within a tiny relative gap (NumPy, float64, from the same float32 F).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selection_helpers import np_normalize
from tops_jax import greedy
from tops_jax import prune
from tops_jax import similarity
from tops_jax import tops

ALL = tops.CRITERIA
NEAR_TIE = 1e-6  # relative score gap that float32 rounding of the dense sums and of the score can invert
SEEDS = 9  # batches of 3 examples per configuration: 8 configurations, 216 cases


def _exact_gain(sim, floor, counted):
  """float32 rounding of the exact sum over counted j of the float32 terms max(0, F[i, j] - floor_j)."""
  terms = np.maximum(sim - floor[None, :], np.float32(0))
  return np.array([np.float32(math.fsum(terms[i, counted].astype(np.float64))) for i in range(len(sim))])


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_updates_keep_the_rounded_exact_sum(chunk):
  # A TOPS-like history: each step raises the floor to the picked row and drops the pick (and, now and then, a
  # random extra column) from the counted set, so both kinds of change are exercised, with padding tokens throughout.
  rng = np.random.default_rng(chunk)
  n = 131
  centres = rng.normal(size=(9, 16))
  x = centres[rng.integers(0, 9, size=n)] + 0.3 * rng.normal(size=(n, 16))
  x[5] = x[4] + 1e-6  # near-duplicates: F above 1 by rounding, m_j of a chosen j below F[i, j]
  sim = np.asarray(jax.jit(similarity.cosine_similarity)(x.astype(np.float32)))
  counted = rng.random(n) > 0.2
  floor = np.zeros(n, np.float32)
  update = jax.jit(greedy.update_coverage_gain, static_argnames="chunk")
  gain = jax.jit(greedy.start_coverage_gain, static_argnames="chunk")(sim, floor, counted, chunk=chunk)
  np.testing.assert_array_equal(np.asarray(gain.hi), _exact_gain(sim, floor, counted))
  for step in range(25):
    p = int(rng.integers(n))
    new_floor = np.maximum(floor, sim[p])
    new_counted = counted.copy()
    new_counted[p] = False
    if step % 5 == 4:
      new_counted[rng.integers(n)] = False
    gain = update(sim, gain, floor, new_floor, counted, new_counted, chunk=chunk)
    floor, counted = new_floor, new_counted
    hi, lo = np.asarray(gain.hi), np.asarray(gain.lo)
    np.testing.assert_array_equal(hi, _exact_gain(sim, floor, counted), err_msg=f"step {step}")
    assert np.all(np.abs(lo) <= np.spacing(np.abs(hi)) / 2), step


# --- engine agreement over a corpus ---------------------------------------------------------------------------------

def _corpus(seed, b, n, d, dtype, keep):
  """Clustered features with exact and near duplicates, uniform relevance, up to a fifth of the tokens invalid."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(b, max(2, n // 8), d))
  x = np.stack([centres[k][rng.integers(0, centres.shape[1], size=n)] for k in range(b)])
  x += rng.uniform(0.05, 0.6) * rng.normal(size=x.shape)
  dup = rng.choice(n, size=(2, n // 6), replace=False)
  x[:, dup[1]] = x[:, dup[0]] + rng.choice([0.0, 1e-6, 1e-3]) * rng.normal(size=(b, n // 6, d))
  relevance = rng.uniform(size=(b, n)).astype(np.float32)
  valid = np.ones((b, n), bool)
  for row in valid:
    row[rng.choice(n, size=min(n // 5, n - keep), replace=False)] = False
  return jnp.asarray(x, dtype), relevance, valid


def _np_gain(sim, floor, counted):
  terms = np.maximum(sim - floor[None, :].astype(np.float32), np.float32(0)).astype(np.float64)
  return np.where(counted[None, :], terms, 0.0).sum(1)


def _tops_scores(sim, relevance, valid, prefix, normalize, criteria, alpha=0.5, lam=0.5):
  """TOPS scores (float64) of every token after the picks `prefix` (Algorithm 1 written out)."""
  chosen = np.zeros(len(sim), bool)
  chosen[prefix] = True
  best = sim[prefix].max(0) if len(prefix) else np.zeros(len(sim), np.float32)
  cand = valid & ~chosen
  total = np.zeros(len(sim))
  if "relevance" in criteria:
    total += np_normalize(relevance.astype(np.float64), cand, normalize)
  if "diversity" in criteria:
    total += alpha * np_normalize(1.0 - best.astype(np.float64), cand, normalize)
  if "coverage" in criteria:
    total += lam * np_normalize(_np_gain(sim, best, cand), cand, normalize)
  return total


def _scope_scores(sim, relevance, valid, prefix, combine, alpha=1.0):
  cover = np.maximum(sim[prefix].max(0), 0) if len(prefix) else np.zeros(len(sim), np.float32)
  gain = _np_gain(sim, cover, valid)
  saliency = np.maximum(relevance.astype(np.float64), 0.0) ** alpha
  return gain * saliency if combine == "multiply" else gain + saliency


def _same_or_near_tie(dense, incremental, features, scores):
  """Per example: the same order, or a near-tie at the first differing step."""
  dense, incremental = np.asarray(dense), np.asarray(incremental)
  for row in np.nonzero((dense != incremental).any(axis=1))[0]:
    a, b = dense[row], incremental[row]
    t = int(np.argmax(a != b))
    sim = np.asarray(similarity.cosine_similarity(features[row]))
    s = scores(sim, row, a[:t])
    gap = abs(s[a[t]] - s[b[t]]) / max(abs(s[a[t]]), abs(s[b[t]]), 1e-30)
    assert gap <= NEAR_TIE, (row, t, a[t], b[t], s[a[t]], s[b[t]])


# One compilation per configuration (shapes and the static hyperparameters), then SEEDS batches of 3 through it:
# every normalisation, every criteria subset with coverage (without it both engines run the same code), bf16 inputs,
# budgets up to N, the relevance-free seed.
TOPS_CASES = [  # (n, keep, d, dtype, normalize, criteria)
    (16, 16, 4, jnp.float32, "mean", ALL),
    (64, 40, 16, jnp.bfloat16, "minmax", ("relevance", "coverage")),
    (150, 150, 8, jnp.float32, "none", ("coverage",)),
    (333, 120, 16, jnp.bfloat16, "mean", ("diversity", "coverage")),
    (600, 240, 32, jnp.float32, "minmax", ALL),
]


@pytest.mark.slow
@pytest.mark.parametrize("n,keep,d,dtype,normalize,criteria", TOPS_CASES)
def test_tops_engines_pick_the_same_tokens(n, keep, d, dtype, normalize, criteria):
  for seed in range(SEEDS):
    features, relevance, valid = _corpus(seed + 100 * n, 3, n, d, dtype, keep)
    # Without the relevance criterion, every other batch also goes without a relevance vector (coverage-led seed).
    rel = None if "relevance" not in criteria and seed % 2 else relevance
    run = lambda engine: prune.select_order("tops", features, keep=keep, relevance=rel, valid=valid,
                                            normalize=normalize, criteria=criteria, engine=engine)
    relevance_of = (lambda row: relevance[row]) if rel is not None else (lambda row: np.zeros(n, np.float32))
    _same_or_near_tie(run("dense"), run("incremental"), features, lambda sim, row, prefix: _tops_scores(
        sim, relevance_of(row), valid[row], prefix, normalize, criteria))


SCOPE_CASES = [  # (n, keep, d, dtype, combine)
    (40, 40, 8, jnp.bfloat16, "add"),
    (200, 100, 16, jnp.float32, "multiply"),
    (576, 192, 32, jnp.bfloat16, "multiply"),
]


@pytest.mark.slow
@pytest.mark.parametrize("n,keep,d,dtype,combine", SCOPE_CASES)
def test_scope_engines_pick_the_same_tokens(n, keep, d, dtype, combine):
  for seed in range(SEEDS):
    features, relevance, valid = _corpus(seed + 100 * n + 7, 3, n, d, dtype, keep)
    run = lambda engine: prune.select_order("scope", features, keep=keep, relevance=relevance, valid=valid,
                                            combine=combine, engine=engine)
    _same_or_near_tie(run("dense"), run("incremental"), features, lambda sim, row, prefix: _scope_scores(
        sim, relevance[row], valid[row], prefix, combine))


@pytest.mark.slow
def test_chunk_size_does_not_change_the_picks():
  # The carried gain is the exact sum rounded once, whatever the grouping of columns into chunks.
  features, relevance, valid = _corpus(5, 3, 80, 16, jnp.float32, 60)
  orders = [np.asarray(prune.select_order("tops", features, keep=60, relevance=relevance, valid=valid, chunk=c))
            for c in (1, 7, 512)]
  for other in orders[1:]:
    np.testing.assert_array_equal(other, orders[0])
