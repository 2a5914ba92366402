"""Input helpers and shared checks for the selector tests (a helper module, not a test)."""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tops_jax import prune


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


def greedy_picks(n: int, candidates, keep: int, score: Callable[[int, list[int]], float], picks=()) -> np.ndarray:
  """The references' greedy loop: after the `picks` given, each step takes the argmax (lowest index on ties) of
  score(i, picks) over the candidates not yet picked; once none is left, the lowest-index positions not yet taken.
  Returns int[keep] in pick order."""
  picks = list(picks)
  while len(picks) < keep:
    free = [i for i in candidates if i not in picks]
    if not free:
      picks.append(next(i for i in range(n) if i not in picks))
      continue
    scores = np.full(n, -np.inf)
    for i in free:
      scores[i] = score(i, picks)
    picks.append(int(np.argmax(scores)))
  return np.array(picks)


def assert_order(got, want, valid: np.ndarray) -> None:
  """`select_order`'s int[K] equals the reference order and keeps valid tokens only."""
  np.testing.assert_array_equal(np.asarray(got), want)
  assert np.all(valid[np.asarray(got)])


def assert_rows_match_unbatched(method: str, x: np.ndarray, keep: int, want_order: Callable[[int], np.ndarray],
                                **per_row) -> None:
  """`prune.select` on a batch x [B, N, D] equals it on each row alone (the `per_row` arrays [B, ...] cut alike),
  and row r equals the sorted reference order `want_order(r)`."""
  got = np.asarray(prune.select(method, x, keep=keep, **per_row))
  for row in range(x.shape[0]):
    one = np.asarray(prune.select(method, x[row], keep=keep, **{k: v[row] for k, v in per_row.items()}))
    np.testing.assert_array_equal(got[row], one)
    np.testing.assert_array_equal(got[row], np.sort(want_order(row)))


def assert_bfloat16_matches_float32(method: str, x16: jax.Array, keep: int, want: np.ndarray, **kw) -> None:
  """`select_order` on bfloat16 features (and bfloat16 `kw` arrays) equals it on their float32 values, and the
  reference order `want` of those values."""
  f32 = lambda v: v.astype(jnp.float32) if getattr(v, "dtype", None) == jnp.bfloat16 else v
  got16 = prune.select_order(method, x16, keep=keep, **kw)
  got32 = prune.select_order(method, f32(x16), keep=keep, **{k: f32(v) for k, v in kw.items()})
  np.testing.assert_array_equal(np.asarray(got16), np.asarray(got32))
  np.testing.assert_array_equal(np.asarray(got16), want)


def jit_select_order(method: str, x: np.ndarray, keep: int, **arrays) -> np.ndarray:
  """`prune.select_order` under jax.jit, the features and `arrays` traced (keep static): int[K]."""
  return np.asarray(jax.jit(lambda f, kw: prune.select_order(method, f, keep=keep, **kw))(x, arrays))
