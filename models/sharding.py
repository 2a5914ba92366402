"""The SPMD layout of the ports: device meshes, parameter shardings by logical axis, activation constraints.

    mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")        # axes data, fsdp, tensor (any may be 1)
    jax.set_mesh(mesh)                                         # traced programs see it (constraints, selection)
    model = models.load_pretrained(path, dtype=jnp.bfloat16, mesh=mesh)      # each device reads its own shards
    model = sharding.shard_model(model, mesh)                  # or: an in-memory model, resharded

JAX's own SPMD machinery does the work (GSPMD, "auto" axis types): parameters are placed by `NamedSharding`s, inputs
are split over the batch, and XLA partitions every jitted program from those shardings and the few activation
constraints below. Nothing here is a parallel runtime of its own.

Mesh axes (MaxText's names and roles, `../shared/SCALE_PERF.md` C.2):
    data    the batch only; parameters are replicated along it (data-parallel evaluation)
    fsdp    the batch, and the parameters' `embed` dimension (fully sharded data parallel: each layer's weights
            are all-gathered one layer at a time, inside the layer scan, never a whole stacked weight)
    tensor  attention heads, MLP width and vocabulary (tensor parallel: activations are all-reduced)

Logical axes. The ports stay mesh-free: every parameter's logical axes come from `PARAM_AXES`, a table keyed by the
end of the parameter's path in `nnx.state(model)` (the same names as the conversion tables; the leading axis of a
layer stack is "layers"); `logical_specs` gives them by path (what `nnx.with_partitioning` would annotate; the
Variables themselves carry no annotation, which would make flax demand a mesh wherever one is created), and flax's
`nnx.logical_axis_rules` mapping turns them into PartitionSpecs with `RULES`, MaxText style: embed ->
fsdp; heads, kv_heads, mlp, vocab -> tensor; layers, norms and small vectors replicated. Activations: "batch" ->
(data, fsdp), the KV cache's heads -> tensor (`constrain`, a no-op without a mesh).

A mesh axis that does not divide the dimension it shards is an error naming the parameter, the dimension, the axis and
the sizes (`param_specs`): uneven shards would be padded by XLA, and a 13B plan should fail at start, not run slowly.
"""

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXES", "BATCH_AXES", "RULES", "PARAM_AXES", "parse_mesh", "make_mesh", "logical_axes", "logical_specs",
           "param_specs", "param_shardings", "shard_model", "create_sharded", "constrain", "batch_spec",
           "put_batch", "batch_divisor", "describe", "mesh_sizes", "axis_names", "shards", "row_axes"]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")          # MaxText's activation_batch: the rows split over both

# Logical axis -> mesh axis (or axes, or None: replicated). Every logical name of PARAM_AXES and `constrain` is here:
# flax would read an unknown logical name as a mesh axis name.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("cache_heads", "tensor"),
    ("layers", None),
    ("norm", None),
    ("seq", None),
    ("head_dim", None),
    ("conv", None),
    ("positions", None),
)
_RULE = dict(RULES)

# (pattern on the '/'-joined parameter path, logical axes of the parameter without its "layers" stack axis).
# The first match wins; a parameter no pattern matches is an error (a new parameter must be given a layout).
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"self_attn/q_proj/kernel$", ("embed", "heads")),
    (r"self_attn/(k|v)_proj/kernel$", ("embed", "kv_heads")),
    (r"self_attn/q_proj/bias$", ("heads",)),
    (r"self_attn/(k|v)_proj/bias$", ("kv_heads",)),
    (r"self_attn/(o|out)_proj/kernel$", ("heads", "embed")),
    (r"mlp/(gate_proj|up_proj|fc1)/kernel$", ("embed", "mlp")),
    (r"mlp/(gate_proj|up_proj|fc1)/bias$", ("mlp",)),
    (r"mlp/(down_proj|fc2)/kernel$", ("mlp", "embed")),
    (r"multi_modal_projector/linear_1/kernel$", ("embed", "mlp")),      # vision width -> text width
    (r"multi_modal_projector/linear_1/bias$", ("mlp",)),
    (r"multi_modal_projector/linear_2/kernel$", ("mlp", "embed")),
    (r"patch_embedding/kernel$", ("conv", "conv", "conv", "embed")),    # HWIO
    # Qwen2.5-VL's vision tower (`models.qwen2_5_vl_vision`): Conv3d kernel [C, T, P, P, Dv], fused qkv, merger.
    (r"visual/patch_embed$", ("conv", "conv", "conv", "conv", "embed")),
    (r"attn/qkv/kernel$", ("embed", "heads")),
    (r"attn/qkv/bias$", ("heads",)),
    (r"attn/proj/kernel$", ("heads", "embed")),
    (r"attn/proj/bias$", ("norm",)),
    (r"merger/fc1/kernel$", ("embed", "mlp")),
    (r"merger/fc1/bias$", ("mlp",)),
    (r"merger/fc2/kernel$", ("mlp", "embed")),
    (r"(norm1|norm2|ln_q)/scale$", ("norm",)),
    (r"position_embedding/embedding$", ("positions", "embed")),
    # Vectors of the model width: output biases, norms, the CLS and newline embeddings (replicated: small).
    (r"((o|out)_proj|down_proj|fc2|linear_2)/bias$", ("norm",)),
    (r"(norm|layernorm|layrnorm|layer_norm\d)/(scale|bias)$", ("norm",)),
    (r"(class_embedding|image_newline)$", ("norm",)),
)
_STACKS = ("layers", "blocks")     # a path component that marks a layer stack (leading axis, `nnx.vmap` at construction)


def parse_mesh(text: str) -> dict[str, int]:
  """"data:2,fsdp:2,tensor:2" -> {"data": 2, "fsdp": 2, "tensor": 2}; absent axes are 1, and one axis may be -1
  (the devices left over, as MaxText's -1). ValueError naming the entry for anything else."""
  sizes: dict[str, int] = {}
  for entry in (e.strip() for e in str(text).split(",")):
    name, sep, size = entry.partition(":")
    if not sep or not name:
      raise ValueError(f"--mesh entry {entry!r} must read axis:size (axes {', '.join(AXES)}), e.g. data:8")
    if name not in AXES:
      raise ValueError(f"--mesh: unknown axis {name!r} in {text!r}; the axes are {', '.join(AXES)}")
    if name in sizes:
      raise ValueError(f"--mesh: axis {name!r} is given twice in {text!r}")
    try:
      value = int(size)
    except ValueError:
      raise ValueError(f"--mesh: axis {name} has size {size!r}, not an integer") from None
    if value < 1 and value != -1:
      raise ValueError(f"--mesh: axis {name} has size {value}; sizes are positive (or -1: the devices left over)")
    sizes[name] = value
  if sum(v == -1 for v in sizes.values()) > 1:
    raise ValueError(f"--mesh: only one axis may be -1, got {text!r}")
  return {a: sizes.get(a, 1) for a in AXES}


def describe(sizes: Mapping[str, int]) -> str:
  return " x ".join(f"{a} {sizes[a]}" for a in AXES)


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process), axis types Auto (GSPMD
  partitions the programs; `jax.make_mesh` defaults to Explicit). ValueError when the sizes do not multiply to the
  device count, naming the axes and both numbers."""
  if isinstance(spec, str):
    sizes = parse_mesh(spec)
  else:
    sizes = parse_mesh(",".join(f"{a}:{v}" for a, v in spec.items()))
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if any(v == -1 for v in sizes.values()):
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    if n % known:
      raise ValueError(f"mesh {describe(sizes)}: the other axes ({known} devices) do not divide the {n} devices")
    sizes = {a: (n // known if v == -1 else v) for a, v in sizes.items()}
  total = int(np.prod(list(sizes.values())))
  if total != n:
    raise ValueError(f"mesh {describe(sizes)} has {total} devices, but {n} are available "
                     f"({devices[0].platform}); the axis sizes must multiply to the device count")
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


def logical_axes(path: Sequence[str], ndim: int) -> tuple[str | None, ...]:
  """The logical axes of the parameter at `path` (keys in `nnx.state`) with `ndim` dimensions; ValueError when no
  `PARAM_AXES` entry covers it or its rank disagrees."""
  joined = "/".join(str(p) for p in path)
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, joined):
      stacked = tuple("layers" for p in path if str(p) in _STACKS)
      full = stacked + tuple(axes)
      if len(full) != ndim:
        raise ValueError(f"parameter {joined}: {ndim} dimensions, but its layout {full} (PARAM_AXES {pattern!r}) "
                         f"names {len(full)}")
      return full
  raise ValueError(f"parameter {joined} has no sharding layout: add a PARAM_AXES entry for it "
                   "(models/sharding.py)")


def mesh_sizes(mesh) -> dict[str, int]:
  """{axis name: size} of a Mesh or AbstractMesh."""
  return dict(zip(mesh.axis_names, mesh.axis_sizes))


def row_axes(b: int) -> tuple[str, ...]:
  """The set mesh's batch axes of size > 1 when they divide b rows, else () (no split): the axes over which each
  device can work on its own rows (`models.pruning.selection`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  sizes = mesh_sizes(mesh)
  axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
  return axes if axes and b % math.prod(sizes[a] for a in axes) == 0 else ()


def axis_names(entry) -> tuple[str, ...]:
  """The mesh axes one PartitionSpec entry names (None, an axis, or a tuple of axes)."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def shards(entry, sizes: Mapping[str, int]) -> int:
  """How many ways one PartitionSpec entry splits its dimension on a mesh of `sizes`."""
  return math.prod(sizes.get(a, 1) for a in axis_names(entry))


def _paths(state: nnx.State) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
  """(path, shape) of every parameter of a (possibly abstract) model state."""
  return [(tuple(str(k) for k in path), tuple(var.get_value().shape)) for path, var in nnx.to_flat_state(state)]


def _nested(flat: Mapping[tuple[str, ...], Any]) -> dict:
  """{path: value} -> the nested dict of `nnx.to_pure_dict` (the pytree jit, device_put and the loader see)."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def logical_specs(state: nnx.State) -> dict[tuple[str, ...], tuple[str | None, ...]]:
  """Every parameter's logical axes by path: what `nnx.with_partitioning` would annotate (`PARAM_AXES`). The model's
  Variables are left as they are: an `out_sharding` annotation would make flax shard every Variable it creates,
  which needs a mesh even where none is wanted."""
  return {path: logical_axes(path, len(shape)) for path, shape in _paths(state)}


def param_specs(state: nnx.State, mesh) -> dict[tuple[str, ...], P]:
  """Every parameter's PartitionSpec on `mesh` by path: its logical axes mapped by `RULES` (flax's
  `nnx.logical_axis_rules` mapping). `mesh` may be a `jax.sharding.AbstractMesh` (only its axis names and sizes
  are read). ValueError naming the parameter, dimension, axis and sizes when a mesh axis does not divide the
  dimension it shards."""
  sizes = mesh_sizes(mesh)
  shapes = dict(_paths(state))
  with nnx.logical_axis_rules(RULES):
    rules = flax_spmd.get_logical_axis_rules()
  specs = {}
  for path, logical in logical_specs(state).items():
    spec = flax_spmd.from_sharding_rules(logical, rules)
    for dim, (size, axes) in enumerate(zip(shapes[path], spec)):
      names, ways = axis_names(axes), shards(axes, sizes)
      if size % ways:
        raise ValueError(f"mesh axis {'+'.join(names)}={ways} does not divide dimension {dim} ({logical[dim]!r}, "
                         f"size {size}) of {'/'.join(path)} (shape {shapes[path]}); pick a {'+'.join(names)} size "
                         f"that divides {size}")
    specs[path] = P(*spec)
  return specs


def param_shardings(state: nnx.State, mesh) -> dict[tuple[str, ...], NamedSharding]:
  """Every parameter's NamedSharding on `mesh` by path (`param_specs`)."""
  return {path: NamedSharding(mesh, spec) for path, spec in param_specs(state, mesh).items()}


def shard_model(model, mesh):
  """The model with every parameter placed by `param_shardings` (for a model already in memory; loading and
  `create_sharded` build the shards directly)."""
  graphdef, state = nnx.split(model)
  placed = jax.device_put(nnx.to_pure_dict(state), _nested(param_shardings(state, mesh)))
  nnx.replace_by_pure_dict(state, placed)
  return nnx.merge(graphdef, state)


def create_sharded(make, mesh):
  """`make()` (a model constructor, e.g. random init) run under jit with each parameter's shards as its outputs:
  every device creates only its own shards, the whole model never exists on one device."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  values = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())),
                   out_shardings=_nested(param_shardings(state, mesh)))()
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def batch_divisor(mesh) -> int:
  """How many ways the batch is split on `mesh` (data x fsdp)."""
  return shards(BATCH_AXES, mesh_sizes(mesh))


def batch_spec(ndim: int) -> P:
  """A batch-major array's spec: rows over (data, fsdp), the rest replicated."""
  return P(BATCH_AXES, *([None] * (ndim - 1)))


def put_batch(x, mesh):
  """A host array holding the whole batch (every process passes the same value) -> a global array with its rows
  split over (data, fsdp); each device receives only its rows. Scalars and 0-d arrays are replicated."""
  x = np.asarray(x)
  spec = P() if x.ndim == 0 else batch_spec(x.ndim)
  if x.ndim and x.shape[0] % batch_divisor(mesh):
    raise ValueError(f"a batch of {x.shape[0]} rows does not split over the mesh's data x fsdp = "
                     f"{batch_divisor(mesh)} devices; use a batch size that is a multiple of {batch_divisor(mesh)}")
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])


def constrain(x: jax.Array, *logical: str | None) -> jax.Array:
  """`jax.lax.with_sharding_constraint` of `x` to its logical axes (one per dimension, mapped by `RULES`) on the mesh
  set with `jax.set_mesh`; `x` unchanged without one. Mesh axes of size 1, and axes that do not divide the dimension
  (a batch of 1 on data:2), are dropped, so the constraint never pads."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or x.ndim != len(logical):
    return x
  sizes = mesh_sizes(mesh)
  spec = []
  for size, name in zip(x.shape, logical):
    names = tuple(a for a in axis_names(_RULE.get(name) if name is not None else None) if sizes.get(a, 1) > 1)
    if names and size % shards(names, sizes):
      names = ()
    spec.append(names[0] if len(names) == 1 else (names or None))
  if all(s is None for s in spec):
    return x
  return jax.lax.with_sharding_constraint(x, P(*spec))
