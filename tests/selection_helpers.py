"""Input helpers shared by the selector tests."""

import numpy as np


def valid_mask(rng: np.random.Generator, n: int, keep: int, frac: float = 0.75) -> np.ndarray:
  """bool[n] with about `frac` valid positions, topped up so at least `keep` are valid."""
  valid = rng.random(n) < frac
  missing = keep - int(valid.sum())
  if missing > 0:
    valid[np.flatnonzero(~valid)[:missing]] = True
  return valid
