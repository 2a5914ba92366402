"""Input helpers shared by the selector tests."""

import numpy as np


def valid_mask(rng: np.random.Generator, n: int, keep: int, frac: float = 0.75) -> np.ndarray:
  """bool[n] with about `frac` valid positions, topped up so at least `keep` are valid."""
  valid = rng.random(n) < frac
  missing = keep - int(valid.sum())
  if missing > 0:
    valid[np.flatnonzero(~valid)[:missing]] = True
  return valid


def np_normalize(x: np.ndarray, cand: np.ndarray, how: str) -> np.ndarray:
  """TOPS' per-criterion rescaling over the candidates, in NumPy (the references' form of `greedy.normalize_over`)."""
  if how == "mean":
    mean = x[cand].mean()
    return x / mean if mean > 1e-12 else x
  if how == "minmax":
    lo, hi = x[cand].min(), x[cand].max()
    return (x - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(x)
  return x
