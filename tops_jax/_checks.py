"""Input validation shared by the public entry points: clear ValueErrors that name the problem.

Shape, rank, dtype and `keep` checks run at trace time (they read only static shapes). Checks that need values
(non-finite features, fewer valid tokens than `keep`) run when the arrays are concrete, i.e. on eager calls; under
an outer `jax.jit` they cannot raise and the documented fallbacks apply (see `tops_jax.prune`).
"""

import operator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_select_args", "is_concrete"]


def is_concrete(x) -> bool:
  """True when `x` holds values (numpy or a committed jax.Array), False for a tracer."""
  return not isinstance(x, jax.core.Tracer)


def _shape(x):
  return tuple(np.shape(x))


def check_select_args(method: str, features, keep, relevance, valid, key, *, needs_relevance: bool,
                      needs_key: bool) -> int:
  """Validates `prune.select` arguments; returns `keep` as a Python int."""
  shape = _shape(features)
  if len(shape) not in (2, 3):
    raise ValueError(f"{method}: features must be float[N, D] or float[B, N, D], got shape {shape}")
  if not jnp.issubdtype(jnp.result_type(features), jnp.floating):
    raise ValueError(f"{method}: features must be floating point, got dtype {jnp.result_type(features)}")
  n = shape[-2]
  try:
    keep = operator.index(keep)
  except TypeError:
    raise ValueError(f"{method}: keep must be a static Python int (it fixes the output shape), got {keep!r}") from None
  if keep <= 0:
    raise ValueError(f"{method}: keep must be >= 1, got {keep}")
  if keep > n:
    raise ValueError(f"{method}: keep={keep} exceeds the number of tokens N={n}")
  lead = shape[:-1]
  if relevance is not None and _shape(relevance) != lead:
    raise ValueError(f"{method}: relevance must have shape {lead} (features.shape[:-1]), got {_shape(relevance)}")
  if valid is not None:
    if _shape(valid) != lead:
      raise ValueError(f"{method}: valid must have shape {lead} (features.shape[:-1]), got {_shape(valid)}")
    if jnp.result_type(valid) != jnp.bool_:
      raise ValueError(f"{method}: valid must be a bool mask, got dtype {jnp.result_type(valid)}")
  if needs_relevance and relevance is None:
    raise ValueError(f"{method}: this method needs a relevance vector (relevance=float[..., N]); see tops_jax.relevance")
  if needs_key and key is None:
    raise ValueError(f"{method}: this method is random and needs an explicit PRNG key (key=jax.random.key(seed))")

  if is_concrete(features) and not bool(jnp.all(jnp.isfinite(features))):
    bad = np.argwhere(~np.isfinite(np.asarray(features, dtype=np.float32)).all(-1))
    raise ValueError(f"{method}: features contain NaN or inf at token positions {bad[:8].tolist()}"
                     f"{' ...' if len(bad) > 8 else ''}")
  if relevance is not None and is_concrete(relevance) and not bool(jnp.all(jnp.isfinite(relevance))):
    raise ValueError(f"{method}: relevance contains NaN or inf")
  if valid is not None and is_concrete(valid):
    counts = np.asarray(valid).reshape(-1, n).sum(-1)
    if counts.min() < keep:
      row = int(counts.argmin())
      raise ValueError(f"{method}: keep={keep} exceeds the number of valid tokens ({int(counts[row])} in row {row})")
  return keep
