"""Input validation shared by the public entry points: clear ValueErrors that name the argument.

Shape, rank, dtype, type and `keep` checks run at trace time (they read only static shapes and Python values).
Checks that need values (non-finite inputs, non-finite hyperparameters, fewer valid tokens than `keep`) run on
arguments that hold values (numpy arrays, committed jax Arrays, Python numbers), with numpy, so they also work on
concrete arrays closed over inside an outer `jax.jit`; on tracers they cannot run and `tops_jax.prune` ranks
non-finite values last instead. Value checks read only what the method reads: padding (`valid` False) is never
checked, and relevance only for methods that read it.
"""

import functools
import inspect
import operator
import types
import typing

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_select_args", "check_hparams", "check_finite", "is_concrete"]

_MAX_LISTED = 8


def is_concrete(x) -> bool:
  """True when `x` holds values (numpy, a committed jax.Array, a Python number), False for a tracer."""
  return not isinstance(x, jax.core.Tracer)


def _shape(x):
  return tuple(np.shape(x))


def _check_array(method: str, name: str, x):
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    raise ValueError(f"{method}: {name} must be an array (numpy.ndarray or jax.Array), got {type(x).__name__}")


def _positions(bad: np.ndarray) -> str:
  where = np.argwhere(bad)
  listed = where[:_MAX_LISTED, 0].tolist() if bad.ndim == 1 else where[:_MAX_LISTED].tolist()
  return f"{listed}{' ...' if len(where) > _MAX_LISTED else ''} ({len(where)} in all)"


def check_finite(method: str, name: str, x, mask=None, *, width: bool = False, what: str = "token positions"):
  """Raises when concrete `x` holds NaN/inf at positions where `mask` is True (default: everywhere).

  x: float[..., N] or, with `width`, float[..., N, W] (reported per token); mask: bool[..., N] or None (a trailing
  width of `x` beyond the mask's rank is reduced). A tracer, or a traced mask, is not checked. A jax Array is
  reduced where it lives (only the per-token flags reach the host), under `ensure_compile_time_eval` so that a
  concrete array closed over inside an outer jit is evaluated, not staged.
  """
  if not is_concrete(x) or (mask is not None and not is_concrete(mask)):
    return
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    return
  if mask is not None:
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or _shape(x)[:mask.ndim] != mask.shape:
      return  # a malformed mask: the method's own check names it
  xp = jnp if isinstance(x, jax.Array) else np
  with jax.ensure_compile_time_eval():
    bad = ~xp.isfinite(x if xp is jnp else np.asarray(x, dtype=np.float32))
    if mask is not None:
      while bad.ndim > mask.ndim:
        bad = bad.any(-1)
      bad = bad & mask
    elif width:
      bad = bad.any(-1)
    if not bool(bad.any()):
      return
  raise ValueError(f"{method}: {name} has NaN or inf at {what} {_positions(np.asarray(bad))}")


def check_select_args(method: str, features, keep, relevance, valid, key, *, needs_relevance: bool,
                      needs_key: bool, reads_features: bool, reads_relevance: bool, relevance_hint: str = "") -> int:
  """Validates `prune.select` arguments; returns `keep` as a Python int."""
  _check_array(method, "features", features)
  shape = _shape(features)
  if len(shape) not in (2, 3):
    raise ValueError(f"{method}: features must be float[N, D] or float[B, N, D], got shape {shape}")
  if not jnp.issubdtype(jnp.result_type(features), jnp.floating):
    raise ValueError(f"{method}: features must be floating point, got dtype {jnp.result_type(features)}")
  n = shape[-2]
  if isinstance(keep, (bool, np.bool_)):
    raise ValueError(f"{method}: keep must be a static Python int (it fixes the output shape), got {keep!r}")
  try:
    keep = operator.index(keep)
  except TypeError:
    raise ValueError(f"{method}: keep must be a static Python int (it fixes the output shape), got {keep!r}") from None
  if keep <= 0:
    raise ValueError(f"{method}: keep must be >= 1, got {keep}")
  if keep > n:
    raise ValueError(f"{method}: keep={keep} exceeds the number of tokens N={n}")
  lead = shape[:-1]
  if relevance is not None:
    _check_array(method, "relevance", relevance)
    if _shape(relevance) != lead:
      raise ValueError(f"{method}: relevance must have shape {lead} (features.shape[:-1]), got {_shape(relevance)}")
    if not jnp.issubdtype(jnp.result_type(relevance), jnp.number) or jnp.result_type(relevance) == jnp.bool_:
      raise ValueError(f"{method}: relevance must be a real-valued array, got dtype {jnp.result_type(relevance)}")
  if valid is not None:
    _check_array(method, "valid", valid)
    if _shape(valid) != lead:
      raise ValueError(f"{method}: valid must have shape {lead} (features.shape[:-1]), got {_shape(valid)}")
    if jnp.result_type(valid) != jnp.bool_:
      raise ValueError(f"{method}: valid must be a bool mask, got dtype {jnp.result_type(valid)}")
  if needs_relevance and relevance is None:
    raise ValueError(f"{method}: this method needs a relevance vector (relevance=float[..., N]); see tops_jax.relevance"
                     f"{relevance_hint}")
  if needs_key and key is None:
    raise ValueError(f"{method}: this method is random and needs an explicit PRNG key (key=jax.random.key(seed))")

  mask = None if valid is None else valid
  if reads_features:
    check_finite(method, "features", features, mask, width=True)
  if relevance is not None and reads_relevance:
    check_finite(method, "relevance", relevance, mask)
  if valid is not None and is_concrete(valid):
    counts = np.asarray(valid).reshape(-1, n).sum(-1)
    if counts.min() < keep:
      row = int(counts.argmin())
      raise ValueError(f"{method}: keep={keep} exceeds the number of valid tokens ({int(counts[row])} in row {row})")
  return keep


def _kinds(annotation) -> set:
  """The kinds a keyword's annotation admits: a subset of {float, int, bool, str, tuple, "array", None}."""
  if annotation is inspect.Parameter.empty:
    return set()
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
  if annotation is type(None) or annotation is None:
    return {None}
  if annotation is jax.Array:
    return {"array"}
  if annotation is tuple or origin is tuple:
    return {tuple}
  if annotation in (float, int, bool, str):
    return {annotation}
  return set()


def _describe(kinds: set) -> str:
  words = {float: "a finite real number (or an array of them)", int: "a Python int", bool: "a bool", str: "a string",
           tuple: "a tuple", "array": "an array"}
  text = " or ".join(words[k] for k in (float, int, bool, str, tuple, "array") if k in kinds)
  return text + (" or None" if None in kinds else "")


@functools.lru_cache(maxsize=None)
def _keyword_kinds(fn) -> dict[str, set]:
  return {name: _kinds(p.annotation) for name, p in inspect.signature(fn).parameters.items()}


def check_hparams(method: str, fn, hparams: dict, masks: dict) -> dict:
  """Checks each hyperparameter against the type its keyword is annotated with; returns them, Python ints given
  for float keywords turned into floats (so they are traced, not static).

  Non-finite values of float hyperparameters and of floating array hyperparameters (at the positions `masks[name]`
  marks, when given) raise when concrete. Unannotated keywords pass as they are.
  """
  kinds_of = _keyword_kinds(fn)
  out = {}
  for name, value in hparams.items():
    kinds = kinds_of.get(name, set())
    if not kinds:
      out[name] = value
      continue

    def bad():  # built only on failure: the repr of an array hyperparameter can be large (and on a device)
      return ValueError(f"{method}: {name} must be {_describe(kinds)}, got {value!r}")

    if value is None:
      if None not in kinds:
        raise bad()
    elif float in kinds and not isinstance(value, (str, bool, np.bool_)) and (
        isinstance(value, (int, float, np.number)) or hasattr(value, "dtype")):
      if hasattr(value, "dtype") and not (jnp.issubdtype(value.dtype, jnp.number) and value.dtype != jnp.bool_):
        raise bad()
      if isinstance(value, int):
        value = float(value)
      if np.ndim(value) == 0:
        if is_concrete(value) and not np.isfinite(np.asarray(value, dtype=np.float64)):
          raise ValueError(f"{method}: {name} must be finite, got {value!r}")
      else:
        check_finite(method, name, value, what="positions")
    elif int in kinds and isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
      value = operator.index(value)
    elif bool in kinds and isinstance(value, (bool, np.bool_)):
      value = bool(value)
    elif str in kinds and isinstance(value, str):
      pass
    elif tuple in kinds and isinstance(value, (tuple, list, str)):
      pass  # the method validates the elements (e.g. tops criteria, pooling grid)
    elif "array" in kinds and hasattr(value, "shape") and hasattr(value, "dtype"):
      check_finite(method, name, value, masks.get(name),
                   what="token positions" if masks.get(name) is not None else "positions")
    else:
      raise bad()
    out[name] = value
  return out
