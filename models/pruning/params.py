"""Typed hyperparameters of each method: one frozen dataclass per method, validated once when it is built.

A method's parameter class (`params_class`) has one field per keyword of its `tops_jax` selection function (`keep`
and the per-token arrays the stages fill in excluded), each `UNSET` unless given: only the given values reach the
method, so an unset field means the method's own default. `Params.of(method, mapping)` builds and checks one (unknown
names, types, non-finite values: `tops_jax.prune.check_hparams`). Float values are traced inputs of the jitted
programs (`traced`), everything else is static structure (`static_key`), so a sweep over alpha compiles once.

A method without a `tops_jax.prune` entry declares its own class (SparseVLM's, `methods.sparsevlm`); VisionZip's
official per-crop split has one here.
"""

import dataclasses
import inspect
from typing import Any

from tops_jax import prune

__all__ = ["UNSET", "Params", "VisionZipSplit", "PARAMS", "of", "is_traced"]


class _Unset:
  def __repr__(self):
    return "UNSET"

  def __reduce__(self):
    return "UNSET"


UNSET = _Unset()
# Keywords the stages fill with per-token arrays (never configuration).
_RUNTIME = {"keep", "keys", "text", "text_valid", "text_features", "text_keys", "positions", "text_positions"}


def is_traced(value) -> bool:
  """Float hyperparameters are traced; ints, strings, bools and tuples shape the program and stay static."""
  return isinstance(value, float)


class Params:
  """Base of the parameter classes: the given (name, value) pairs, sorted; a mapping (`dict(params)`)."""

  def __repr__(self):
    return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.items())})"

  def items(self) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                        if getattr(self, f.name) is not UNSET))

  def keys(self):
    return [k for k, _ in self.items()]

  def __getitem__(self, name):
    return dict(self.items())[name]

  def traced(self) -> dict[str, float]:
    return {k: v for k, v in self.items() if is_traced(v)}

  def static_key(self) -> tuple:
    """The hashable structure: the values, floats held out."""
    return (type(self).__name__,) + tuple((k, "<traced>" if is_traced(v) else v) for k, v in self.items())

  def static(self) -> dict[str, Any]:
    return {k: v for k, v in self.items() if not is_traced(v)}


@dataclasses.dataclass(frozen=True)
class VisionZipSplit(Params):
  """VisionZip's official per-crop counts (`visionzip_cls` layout), CLS counted in dominant."""
  dominant: int
  contextual: int

  def __post_init__(self):
    for name, low in (("dominant", 1), ("contextual", 0)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"visionzip_cls: {name} must be an int >= {low}, got {value!r}")


def _make(method: str, fn) -> type:
  fields = [(name, Any, dataclasses.field(default=UNSET)) for name, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _RUNTIME]
  name = "".join(part.capitalize() for part in method.split("_")) + "Params"
  return dataclasses.make_dataclass(name, fields, bases=(Params,), frozen=True, repr=False,
                                    namespace={"__module__": __name__})


# One class per `tops_jax.prune` method, from its selection function's keywords (merge for the merging methods).
PARAMS: dict[str, type] = {name: _make(name, m.merge or m.order) for name, m in prune.METHODS.items()}


def _pairs(name: str, value) -> dict[str, Any]:
  """A dict, (name, value) pairs or a Params -> a dict, lists made tuples, arrays refused (the config is static)."""
  if isinstance(value, Params):
    return dict(value.items())
  try:
    items = list(dict(value).items())
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a dict or (name, value) pairs, got {value!r}") from None
  out = {}
  for k, v in items:
    if isinstance(v, list):
      v = tuple(v)
    if hasattr(v, "shape"):
      raise ValueError(f"{name}: hyperparameter {k} is an array; the config is static (hashable), pass Python values")
    out[str(k)] = v
  return out


def of(method: str, value, *, cls: type | None = None, name: str = "hparams", split: bool = False,
       merge: bool = False) -> Params:
  """`method`'s parameters from a dict, pairs or Params, checked once: `cls` a method's own class (None: from its
  `tops_jax` keywords, checked by `tops_jax.prune.check_hparams`), `split` VisionZip's official split."""
  hp = _pairs(name, value)
  if split:
    if set(hp) != {"dominant", "contextual"}:
      raise ValueError(f"visionzip_cls takes the per-crop hyperparameters dominant and contextual (the official "
                       f"counts, CLS included in dominant), got {sorted(hp)}")
    return VisionZipSplit(**hp)
  if cls is not None:
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(hp) - set(known))
    if unknown:
      raise ValueError(f"{method}: unknown hyperparameter(s) {', '.join(unknown)}; {method} takes: "
                       f"{', '.join(known)}")
    return cls(**hp)
  prune.check_hparams(method, want="merge" if merge else "order", **hp)
  return PARAMS[method](**hp)           # as given: an int for a float keyword stays static, as `select` takes it
