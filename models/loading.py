"""Load a local Hugging Face checkpoint directory into a Flax NNX model: `models.load_pretrained(path, dtype)`.

    model = models.load_pretrained("/ckpt/llava-1.5-7b-hf", dtype=jnp.bfloat16)
    out = jax.jit(lambda m, b: m(**b))(model, batch)            # NNX modules are pytrees (flax >= 0.12)

The directory holds `config.json` and `model.safetensors` or its shards; torch is never imported, and with `mesh=`
each parameter is created in its shards. Families come from `models.backbones.BACKBONES` (keyed by `model_type`).
What a family module exposes (config, model class, conversion table), checkpoint-name canonicalisation and the
validation of files and weights: models/MODELS.md#loading.
"""

import contextlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from models import backbones
from models import config_fields
from models import conversion
from models import sharding as sharding_lib

__all__ = ["family_of", "read_config", "load_pretrained"]


def _read_json_object(path: str, name: str) -> dict[str, Any]:
  """The JSON object in file `name` of the checkpoint directory `path`; ValueError naming the file otherwise."""
  with open(os.path.join(path, name)) as f:
    try:
      value = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{name} in {path!r} is not valid JSON: {e}") from None
  if not isinstance(value, dict):
    raise ValueError(f"{name} in {path!r} must hold a JSON object ({{...}}), got a JSON "
                     f"{config_fields.json_type(value)}")
  return value


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  """Parsed config.json of a checkpoint directory; ValueError when it is missing, unreadable or not an object."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint directory {path!r} does not exist")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise ValueError(f"missing config.json in checkpoint directory {path!r}")
  return _read_json_object(path, "config.json")


_INDEX = "model.safetensors.index.json"


def _index_weight_map(path: str) -> dict[str, str]:
  """The `weight_map` (tensor name -> shard file) of the index; ValueError naming the index when malformed."""
  index = _read_json_object(path, _INDEX)
  if "weight_map" not in index:
    raise ValueError(f"{_INDEX} in {path!r} has no `weight_map` (tensor name -> shard file); keys: {sorted(index)}")
  weight_map = index["weight_map"]
  if not isinstance(weight_map, dict) or not weight_map:
    what = "empty" if weight_map == {} else f"a JSON {config_fields.json_type(weight_map)}"
    raise ValueError(f"{_INDEX} in {path!r}: `weight_map` must be a non-empty object (tensor name -> shard file), "
                     f"got {what}")
  bad = [f"{k}: {v!r}" for k, v in weight_map.items() if not isinstance(v, str) or not v]
  if bad:
    raise ValueError(f"{_INDEX} in {path!r}: `weight_map` values must be shard file names:\n"
                     + _listing("bad entries", bad))
  return weight_map


def _weight_files(path: str) -> list[str]:
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(os.path.join(path, _INDEX)):
    weight_map = _index_weight_map(path)
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
      raise ValueError(f"model.safetensors.index.json in {path!r} lists shards that are not there: {missing}")
    return [os.path.join(path, f) for f in files]
  if os.path.isfile(single):
    return [single]
  raise ValueError(f"no weights in {path!r}: expected model.safetensors or model.safetensors.index.json "
                   "(only the safetensors format is read)")


_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


def _listing(title: str, items: list[str], limit: int = 25) -> str:
  more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
  title, _, note = title.partition(" (")
  note = f", {note[:-1]}" if note else ""
  return f"  {title} ({len(items)}{note}):\n" + "\n".join(f"    {s}" for s in items[:limit]) + more


def family_of(model_type: Any) -> backbones.Backbone:
  """The registry entry of a config.json `model_type` (exact: no alias); ValueError naming the supported ones."""
  if not isinstance(model_type, str) or model_type not in backbones.BACKBONES:
    raise ValueError(f"unknown model_type {model_type!r}; supported: {', '.join(backbones.BACKBONES)}")
  return backbones.BACKBONES[model_type]


def _parse_config(path: str, hf: dict[str, Any]) -> tuple[backbones.Backbone, Any]:
  """(family, parsed config); every config error names the file."""
  try:
    family = family_of(hf.get("model_type"))
    return family, family.config.from_hf(hf)
  except ValueError as e:
    raise ValueError(f"config.json in {path!r}: {e}") from None


def _floating_dtype(dtype) -> np.dtype:
  try:
    np_dtype = np.dtype(dtype)
  except TypeError:
    raise ValueError(f"dtype={dtype!r} is not a dtype; pass a floating dtype such as jnp.float32 or jnp.bfloat16") \
        from None
  if not jnp.issubdtype(np_dtype, jnp.floating):
    raise ValueError(f"dtype={np_dtype.name} is not a floating dtype; the parameters are cast to it (pass e.g. "
                     "jnp.float32, jnp.bfloat16 or jnp.float16)")
  return np_dtype


def _open_shard(file: str):
  """safe_open, with a ValueError naming the shard: a truncated or empty file already fails on its header."""
  try:
    return safe_open(file, framework="numpy")
  except (SafetensorError, OSError) as e:
    raise ValueError(f"safetensors shard {file!r} cannot be read (truncated, empty or not a safetensors file): "
                     f"{e}") from None


def _non_finite(name: str, file: str, raw: np.ndarray, array: np.ndarray) -> str | None:
  """None when `array` (the cast tensor) is finite, else a line for the error: tensor, shard and what is wrong."""
  if np.isfinite(array).all():
    return None
  where = f"{name} ({os.path.basename(file)})"
  if np.isfinite(raw).all():
    return f"{where}: finite in the checkpoint, overflows {array.dtype.name}"
  return f"{where}: {int(np.isnan(raw).sum())} NaN, {int(np.isinf(raw).sum())} inf of {raw.size} values"


def _shape_problem(name: str, shape: tuple[int, ...], rule: conversion.Rule, leaves: dict) -> str | None:
  """None when checkpoint tensor `name` of `shape`, transformed by `rule`, fits its parameter (one layer of it when
  the rule names a layer); else the line for the error, with the checkpoint shape that was expected."""
  want = tuple(leaves[rule.target].get_value().shape)
  if rule.layer is not None:
    want = want[1:]
  rank = conversion.TRANSFORM_RANK.get(rule.transform)
  got = conversion.transformed_shape(shape, rule.transform) if rank is None or len(shape) == rank else None
  if got == want:
    return None
  return f"{name}: shape {list(shape)}, expected {list(conversion.checkpoint_shape(want, rule.transform))}"


class _Reader:
  """Reads parameters from the open shards, one index (one device's shard) at a time.

  `get(target, index)` returns the slice `index` (a tuple of slices of the model-side shape) of the parameter at
  `target`: each checkpoint tensor behind it is read only over the matching checkpoint slice (`safe_open.get_slice`),
  transformed, cast; a stacked parameter reads the layers in `index[0]`. Tensors holding NaN/inf after the cast are
  noted in `non_finite` (one line per tensor; with a mesh the NaN/inf counts are those of the first slice found
  holding them), for the caller's one error.
  """

  def __init__(self, by_target: dict, handles: dict, np_dtype: np.dtype):
    self.by_target, self.handles, self.np_dtype = by_target, handles, np_dtype
    self.non_finite: dict[str, str] = {}

  def _tensor(self, file: str, name: str, rule: conversion.Rule, index: tuple) -> np.ndarray:
    axes = conversion.AXES[rule.transform]
    checkpoint_index = index if axes is None else tuple(index[i] for i in np.argsort(axes))
    raw = self.handles[file].get_slice(name)[checkpoint_index]
    with np.errstate(over="ignore"):            # an overflowing cast is reported by `_non_finite`, with the name
      array = conversion.TRANSFORMS[rule.transform](raw).astype(self.np_dtype)
    if name not in self.non_finite:
      problem = _non_finite(name, file, raw, array)
      if problem:
        self.non_finite[name] = problem
    return array

  def get(self, target: tuple[str, ...], shape: tuple[int, ...], index: tuple | None) -> np.ndarray:
    index = tuple(slice(None) for _ in shape) if index is None else tuple(index)
    reads = self.by_target[target]
    if None in reads:                            # one tensor for the whole parameter
      return self._tensor(*reads[None], index)
    layers = range(*index[0].indices(shape[0]))
    out = np.empty((len(layers),) + tuple(len(range(*s.indices(n))) for s, n in zip(index[1:], shape[1:])),
                   self.np_dtype)
    for row, layer in enumerate(layers):
      out[row] = self._tensor(*reads[layer], index[1:])
    return out


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, mesh=None):
  """Builds the NNX model for a local HF checkpoint directory and fills it with the checkpoint's weights.

  Args:
    path: directory with config.json and model.safetensors (or sharded with model.safetensors.index.json).
    dtype: parameter (and compute) dtype, a floating dtype such as jnp.float32 or jnp.bfloat16; weights are cast on
      the host.
    mesh: a `models.sharding.make_mesh` mesh: each parameter is created directly in its shards
      (`sharding.param_shardings`), every device's shard read from the checkpoint on its own (multi-host: each
      process reads only the shards of its devices). None: the default device.

  Returns:
    The model (e.g. `models.llava.LlavaForConditionalGeneration`), its parameters on the default device or sharded
    over `mesh`.

  Raises:
    ValueError: a non-floating dtype; missing directory/config.json/weights; config.json that is not an object, has
      an unknown model_type, unsupported fields or fields of the wrong type; a malformed index or an unreadable
      shard; one error listing every missing, unexpected, duplicated, mis-shaped or non-floating weight; one listing
      every tensor that holds NaN/inf after the cast.
  """
  np_dtype = _floating_dtype(dtype)
  path = os.fspath(path)
  hf = read_config(path)
  family, config = _parse_config(path, hf)
  abstract = nnx.eval_shape(lambda: family.model(config, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  leaves = {tuple(str(k) for k in key): var for key, var in nnx.to_flat_state(abstract_state)}
  table = family.conversion_table(config)

  # What the checkpoint holds: canonical name -> (file, original name, shape, dtype); nothing is read yet.
  found: dict[str, tuple[str, str, tuple[int, ...], str]] = {}
  duplicated, unexpected = [], []
  for file in _weight_files(path):
    with _open_shard(file) as f:
      for name in f.keys():
        if name.endswith(conversion.IGNORED_SUFFIXES):
          continue
        canon = conversion.canonical_name(name, family.legacy_prefixes)
        info = f.get_slice(name)
        if canon in found:
          duplicated.append(f"{name} (same as {found[canon][1]})")
        elif canon not in table:
          unexpected.append(name)
        found[canon] = (file, name, tuple(info.get_shape()), info.get_dtype())

  missing = sorted(name for name in table if name not in found)
  misshaped, mistyped = [], []
  for canon, rule in table.items():
    if canon not in found:
      continue
    _, name, shape, st_dtype = found[canon]
    if st_dtype not in _FLOAT_DTYPES:
      mistyped.append(f"{name}: dtype {st_dtype} (expected floating point)")
      continue
    if rule.target not in leaves:
      raise ValueError(f"conversion table bug: {canon} -> {rule.target}, which is not a parameter of the model")
    problem = _shape_problem(name, shape, rule, leaves)
    if problem:
      misshaped.append(problem)
  problems = [(t, items) for t, items in (("missing (transformers-5 names)", missing),
                                          ("unexpected", sorted(unexpected)), ("duplicated", duplicated),
                                          ("wrong shape", misshaped), ("wrong dtype", mistyped)) if items]
  if problems:
    raise ValueError(f"checkpoint {path!r} does not match the {hf.get('model_type')} model:\n"
                     + "\n".join(_listing(t, items) for t, items in problems))

  # Every model parameter (every layer of a stacked one) must be filled exactly once.
  filled: dict[tuple[str, ...], set] = {}
  for rule in table.values():
    filled.setdefault(rule.target, set()).add(rule.layer)
  for key, var in leaves.items():
    layers = filled.get(key)
    if layers is None:
      raise ValueError(f"conversion table bug: parameter {'/'.join(key)} is not filled by any checkpoint tensor")
    if None not in layers and layers != set(range(var.get_value().shape[0])):
      raise ValueError(f"conversion table bug: stacked parameter {'/'.join(key)} misses layers "
                       f"{sorted(set(range(var.get_value().shape[0])) - layers)}")

  by_target: dict[tuple[str, ...], dict[int | None, tuple[str, str, conversion.Rule]]] = {}
  for canon, rule in table.items():
    by_target.setdefault(rule.target, {})[rule.layer] = (found[canon][0], found[canon][1], rule)
  shardings = None if mesh is None else sharding_lib.param_shardings(abstract_state, mesh)
  non_finite = _fill(leaves, by_target, np_dtype, shardings)
  if non_finite:
    raise ValueError(f"checkpoint {path!r} holds weights that are not finite as {np_dtype.name}:\n"
                     + _listing("tensors with NaN/inf", non_finite))
  return nnx.merge(graphdef, abstract_state)


def _fill(leaves: dict, by_target: dict, np_dtype: np.dtype, shardings: dict | None = None) -> list[str]:
  """Sets every parameter in `leaves` (path -> abstract Variable) from the checkpoint tensors `by_target` names
  (path -> {layer or None: (file, tensor name, rule)}), one parameter at a time; with `shardings` (path ->
  NamedSharding) each is created in its shards, every device's shard read on its own (`_Reader`). Returns the
  sorted lines of the tensors that hold NaN/inf after the cast to `np_dtype`, for the caller's error."""
  files = sorted({file for reads in by_target.values() for file, _, _ in reads.values()})
  with contextlib.ExitStack() as stack:
    reader = _Reader(by_target, {file: stack.enter_context(_open_shard(file)) for file in files}, np_dtype)
    # One parameter at a time, and with a mesh one device's shard at a time: the host never holds the whole model.
    for key, var in leaves.items():
      shape = tuple(var.get_value().shape)
      if shardings is None:
        var.set_value(jax.device_put(reader.get(key, shape, None)))
        continue
      # Devices that hold the same shard (replicas along the axes a parameter is not split over) share one read:
      # make_array_from_callback asks once per device unless the sharding is fully replicated.
      read: dict[tuple, np.ndarray] = {}

      def shard(index, key=key, shape=shape, read=read):
        where = tuple((s.start, s.stop, s.step) for s in index)
        if where not in read:
          read[where] = reader.get(key, shape, index)
        return read[where]

      var.set_value(jax.make_array_from_callback(shape, shardings[key], shard))
  return sorted(reader.non_finite.values())
