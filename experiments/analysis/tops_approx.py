r"""How close greedy TOPS gets to the exhaustive optimum of its objective on small instances.

    python -m experiments.analysis.tops_approx --n=12 --keep=4 --trials=50

For each random instance (clustered features, uniform relevance) this enumerates every subset of size `keep` and
compares `tops.objective` of the TOPS greedy set (normalize="none", so greedy and objective use the same units) with
the optimum, and, as a floor, with the mean over all subsets. Greedy is not optimal; this reports by how much.
"""

import itertools

from absl import app
from absl import flags
import jax
import numpy as np

from tops_jax import prune
from tops_jax import tops

_N = flags.DEFINE_integer("n", 12, "Tokens per instance (2^n subsets are enumerated; keep it <= 16).")
_KEEP = flags.DEFINE_integer("keep", 4, "Budget.")
_D = flags.DEFINE_integer("d", 8, "Feature width.")
_TRIALS = flags.DEFINE_integer("trials", 50, "Random instances.")
_ALPHA = flags.DEFINE_float("alpha", 0.5, "Diversity weight.")
_LAM = flags.DEFINE_float("lam", 0.5, "Coverage weight.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")


def approximation_ratios(n, keep, d, trials, alpha, lam, seed):
  """Per instance: (greedy / optimum, mean subset / optimum)."""
  rng = np.random.default_rng(seed)
  subsets = list(itertools.combinations(range(n), keep))
  masks = np.zeros((len(subsets), n), bool)
  for row, s in enumerate(subsets):
    masks[row, list(s)] = True
  objective = jax.jit(jax.vmap(lambda f, r, s: tops.objective(f, r, s, alpha=alpha, lam=lam), (None, None, 0)))
  out = []
  for _ in range(trials):
    centres = rng.normal(size=(3, d))
    features = (centres[rng.integers(0, 3, size=n)] + 0.7 * rng.normal(size=(n, d))).astype(np.float32)
    relevance = rng.uniform(size=n).astype(np.float32)
    values = np.asarray(objective(features, relevance, masks))
    picked = np.asarray(prune.select("tops", features, keep=keep, relevance=relevance, normalize="none",
                                     alpha=alpha, lam=lam))
    mask = np.zeros((1, n), bool)
    mask[0, picked] = True
    greedy = float(np.asarray(objective(features, relevance, mask))[0])
    out.append((greedy / values.max(), values.mean() / values.max()))
  return np.array(out)


def main(argv):
  del argv
  ratios = approximation_ratios(_N.value, _KEEP.value, _D.value, _TRIALS.value, _ALPHA.value, _LAM.value,
                                _SEED.value)
  greedy, average = ratios[:, 0], ratios[:, 1]
  print(f"TOPS greedy vs exhaustive optimum, N={_N.value}, keep={_KEEP.value}, alpha={_ALPHA.value}, "
        f"lam={_LAM.value}, {_TRIALS.value} instances")
  print(f"  greedy / optimum: mean {greedy.mean():.4f}  min {greedy.min():.4f}  optimal in "
        f"{np.mean(greedy > 1 - 1e-6):.0%} of instances")
  print(f"  random subset / optimum (mean over all subsets): {average.mean():.4f}")


if __name__ == "__main__":
  app.run(main)
