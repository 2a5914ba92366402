r"""Memory per device of a LLaVA port on a (data, fsdp, tensor) mesh, for evaluation: parameters and the KV cache.

    python -m experiments.bench.shard_memory                       # the default models and meshes, a markdown table
    python -m experiments.bench.shard_memory --models=llava-next-13b --meshes='fsdp:4;tensor:4' --batch=shard,4

Axes: L decoder layers, B batch rows (global), W cache slots (capacity), Hkv key/value heads, Dh head width,
D text width, V vocabulary; mesh sizes d (data), f (fsdp), t (tensor).

Parameters, exact: the abstract model (`nnx.eval_shape`: nothing is allocated) and `models.sharding.param_specs` on
a `jax.sharding.AbstractMesh` of the requested sizes, so a mesh may be larger than the machine. A parameter's bytes
per device are its bytes over the product of the mesh axes its PartitionSpec names (embed / f; heads, MLP width,
vocabulary / t; layers, norms and biases of width D replicated; data replicates everything). A mesh axis that does
not divide the dimension it shards raises (`param_specs`: XLA would pad); such a mesh is an error row in the table.

KV cache (`models.llama.init_cache`, in the model's dtype, as `models.pruning` allocates it):
    k, v   dtype[L, B, W, Hkv, Dh]    rows over d x f, heads over t
    valid  bool[L, B, W]              rows over d x f
    end    int32[L]                   replicated
An axis group that does not divide its dimension is dropped by the constraint (`sharding.constrain`): that dimension
is then replicated (the row's note says so; e.g. the 40 key/value heads of a 13B on tensor:16, whose weights split).

Not counted: the prefill's activations and XLA temporaries (the vision tower over every crop, hidden states,
attention scores, logits; `experiments.bench.e2e` measures them per program), and the runtime's share (JAX on GPU
takes 75% of the memory by default, XLA_PYTHON_CLIENT_MEM_FRACTION). "fits" compares parameters + cache with 16e9
and 80e9 bytes: GB are decimal throughout, a little under the 16 and 80 GiB the devices hold.

XLA check (`check_against_xla`, a small model on a real mesh of this machine's devices): the model placed in its
shards (`sharding.shard_model`), a jitted program over the whole model state compiled (`keep_unused`: jit drops the
parameters a program does not read), and its `memory_analysis().argument_size_in_bytes` compared with `param_bytes`
plus the input ids' bytes per device; a jitted `init_cache` under the mesh, its `output_size_in_bytes` with
`cache_bytes` (XLA:CPU adds 8 bytes per returned array: the output tuple's pointer table).
"""

import functools
import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import nnx

from experiments.analysis import flops
from models import llama
from models import loading
from models import shapes
from models import sharding

__all__ = ["MODELS", "DEFAULT_MODELS", "DEFAULT_MESHES", "DEVICE_GB", "ParamBytes", "CacheBytes", "XlaCheck",
           "resolve", "abstract_state", "abstract_mesh", "param_bytes", "cache_bytes", "memory_rows", "table",
           "check_against_xla"]

MODELS: dict[str, shapes.Shape] = {name: shapes.SHAPES[name] for name in (
    "llava-next-7b", "llava-next-13b", "llava-1.5-7b", "llava-1.5-13b", "tiny-next")}
DEFAULT_MODELS = ("llava-next-7b", "llava-next-13b", "llava-1.5-7b", "llava-1.5-13b")
DEFAULT_MESHES = ("data:1", "data:8", "fsdp:8", "tensor:8", "fsdp:4", "tensor:4", "data:2,fsdp:2,tensor:2",
                  "fsdp:2,tensor:2")
DEVICE_GB = (16, 80)
_GB = 1e9


class ParamBytes(NamedTuple):
  total: int          # the whole model, unsharded
  per_device: int     # what each device holds


class CacheBytes(NamedTuple):
  total: int
  per_device: int
  note: str           # dimensions the constraint leaves replicated ("" when rows and heads both split)


def resolve(shape: shapes.Shape):
  """(family, config) of a random-weight shape: `models.backbones.BACKBONES` and the family's `Config.from_hf`."""
  hf = shapes.hf_config(shape).to_dict()
  family = loading.family_of(hf["model_type"])
  return family, family.config.from_hf(hf)


def abstract_state(family, config, dtype) -> nnx.State:
  """Shapes and dtypes of every parameter (`nnx.eval_shape`: no memory)."""
  return nnx.state(nnx.eval_shape(lambda: family.model(config, dtype=dtype, rngs=nnx.Rngs(0))))


def abstract_mesh(text: str) -> jax.sharding.AbstractMesh:
  """"fsdp:4" -> an AbstractMesh over `sharding.AXES` (absent axes 1); ValueError for -1, which needs devices."""
  sizes = sharding.parse_mesh(text)
  if any(v == -1 for v in sizes.values()):
    raise ValueError(f"mesh {text!r}: -1 (the devices left over) needs a device count; give every axis its size")
  return jax.sharding.AbstractMesh(tuple(sizes[a] for a in sharding.AXES), sharding.AXES)


def param_bytes(state: nnx.State, mesh) -> ParamBytes:
  """Bytes of the parameters of `state` (abstract or real), unsharded and per device of `mesh` (a Mesh or an
  AbstractMesh). ValueError from `sharding.param_specs` when a mesh axis does not divide what it shards."""
  specs = sharding.param_specs(state, mesh)
  sizes = sharding.mesh_sizes(mesh)
  total = per_device = 0
  for path, var in nnx.to_flat_state(state):
    value = var.get_value()
    nbytes = math.prod(value.shape) * jnp.dtype(value.dtype).itemsize
    total += nbytes
    spec = specs[tuple(str(k) for k in path)]
    per_device += nbytes // math.prod(sharding.shards(e, sizes) for e in spec)    # exact: param_specs checked divisibility
  return ParamBytes(total, per_device)


def cache_bytes(text_config, sizes: Mapping[str, int], batch: int, capacity: int, dtype) -> CacheBytes:
  """The port's KV cache for `batch` rows and `capacity` slots in `dtype`, unsharded and per device of a mesh of
  `sizes` ({"data": d, "fsdp": f, "tensor": t}), sharded as `models.llama.init_cache` constrains it."""
  c = text_config
  rows = math.prod(sizes.get(a, 1) for a in sharding.BATCH_AXES)
  heads = sizes.get("tensor", 1)
  notes = []
  if batch % rows:
    notes.append(f"B={batch} does not split over data x fsdp={rows}: cache rows replicated")
    rows = 1
  if c.num_key_value_heads % heads:
    notes.append(f"{c.num_key_value_heads} KV heads do not split over tensor={heads}: cache heads replicated")
    heads = 1
  layers = c.num_hidden_layers
  kv = int(flops.kv_cache_bytes(c, [capacity] * layers, dtype, batch))
  valid = layers * batch * capacity
  end = layers * jnp.dtype(jnp.int32).itemsize
  return CacheBytes(kv + valid + end, kv // (rows * heads) + valid // rows + end, "; ".join(notes))


def _batch(entry: str | int, sizes: Mapping[str, int]) -> int:
  """A --batch entry: an int, or "shard" for one row per batch shard (data x fsdp)."""
  if entry == "shard":
    return math.prod(sizes[a] for a in sharding.BATCH_AXES)
  value = int(entry)
  if value < 1:
    raise ValueError(f"--batch entries are positive or 'shard', got {entry!r}")
  return value


def memory_rows(models: Sequence[str], meshes: Sequence[str], batches: Sequence[str | int] = ("shard", 8),
                capacity: int = 4096, dtype=jnp.bfloat16) -> list[dict[str, Any]]:
  """One row per (model, mesh): parameter bytes, and per batch entry the cache, the total and the fit.

  A row whose mesh does not divide a weight carries `error` (the `param_specs` message) and no numbers."""
  rows = []
  for name in models:
    if name not in MODELS:
      raise ValueError(f"unknown model {name!r}; the models are {', '.join(MODELS)}")
    family, config = resolve(MODELS[name])
    state = abstract_state(family, config, dtype)
    for text in meshes:
      mesh = abstract_mesh(text)
      sizes = sharding.mesh_sizes(mesh)
      row = dict(model=name, mesh=text, devices=mesh.size, dtype=jnp.dtype(dtype).name, capacity=capacity)
      try:
        params = param_bytes(state, mesh)
      except ValueError as e:
        rows.append(dict(row, error=str(e)))
        continue
      row.update(params_total=params.total, params_per_device=params.per_device, batches=[])
      for entry in batches:
        b = _batch(entry, sizes)
        cache = cache_bytes(config.text, sizes, b, capacity, dtype)
        total = params.per_device + cache.per_device
        row["batches"].append(dict(entry=str(entry), batch=b, cache_total=cache.total,
                                   cache_per_device=cache.per_device, total_per_device=total, note=cache.note,
                                   fits={gb: total <= gb * _GB for gb in DEVICE_GB}))
      rows.append(row)
  return rows


def _gb(n: int) -> str:
  return f"{n / _GB:.2f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
  """Markdown: per batch entry the rows B, cache, parameters + cache per device, and whether that fits 16/80 GB."""
  entries = next((tuple(b["entry"] for b in r["batches"]) for r in rows if "batches" in r), ())
  head = ["model", "mesh", "devices", "params GB (all)", "params GB/device"]
  for e in entries:
    head += ["B = data·fsdp" if e == "shard" else "B", "KV GB/device", "total GB/device",
             "fits " + "/".join(str(g) for g in DEVICE_GB) + " GB"]
  lines = ["| " + " | ".join(head + ["note"]) + " |", "|" + "---|" * (len(head) + 1)]
  for r in rows:
    cells = [r["model"], r["mesh"].replace(",", " "), str(r["devices"])]
    if "error" in r:
      cells += ["—"] * (len(head) - len(cells)) + [f"error: {r['error']}"]
    else:
      cells += [_gb(r["params_total"]), _gb(r["params_per_device"])]
      for b in r["batches"]:
        fits = "/".join("yes" if b["fits"][g] else "no" for g in DEVICE_GB)
        cells += [str(b["batch"]), _gb(b["cache_per_device"]), _gb(b["total_per_device"]), fits]
      cells.append("; ".join(sorted({b["note"] for b in r["batches"] if b["note"]})))
    lines.append("| " + " | ".join(cells) + " |")
  first = rows[0] if rows else {}
  lines.append(f"\n{first.get('dtype', '')} weights and cache, W = {first.get('capacity', '')} slots; GB = 1e9 bytes; "
               "activations and XLA temporaries not included.")
  return "\n".join(lines)


class XlaCheck(NamedTuple):
  """Computed bytes beside what the compiled programs hold on one device (see the module docstring)."""
  params: int             # param_bytes(...).per_device
  shards: int             # bytes of the created model's arrays on the mesh's first device
  inputs: int             # bytes of the ids on that device
  arguments: int          # memory_analysis().argument_size_in_bytes of a program over (model, ids)
  cache: int              # cache_bytes(...).per_device
  cache_outputs: int      # memory_analysis().output_size_in_bytes of init_cache under the mesh
  cache_arrays: int       # arrays init_cache returns


def check_against_xla(model, mesh, batch: int, capacity: int, seq: int = 8) -> XlaCheck:
  """Places `model` (an in-memory port, e.g. random weights at a small shape) on `mesh` (a real
  `sharding.make_mesh` mesh) and compiles a program over it and one that allocates the cache; returns their
  per-device memory beside this module's counts. batch: rows of the ids int32[B, seq] and of the cache (a multiple
  of data x fsdp)."""
  text_config, dtype = model.config.text, model.language_model.dtype
  params = param_bytes(nnx.state(model), mesh)
  model = sharding.shard_model(model, mesh)
  device = mesh.devices.flat[0]
  shards = sum(s.data.nbytes for leaf in jax.tree.leaves(nnx.state(model)) for s in leaf.addressable_shards
               if s.device == device)
  ids = sharding.put_batch(np.zeros((batch, seq), np.int32), mesh)
  inputs = sum(s.data.nbytes for s in ids.addressable_shards if s.device == device)
  # keep_unused: jit would otherwise drop every parameter but the embedding table from the program's arguments.
  embed = jax.jit(lambda m, x: m.language_model.embed(x), keep_unused=True)
  arguments = embed.lower(model, ids).compile().memory_analysis().argument_size_in_bytes
  with jax.set_mesh(mesh):
    alloc = jax.jit(functools.partial(llama.init_cache, text_config, batch, capacity, dtype)).lower().compile()
  cache = cache_bytes(text_config, sharding.mesh_sizes(mesh), batch, capacity, dtype).per_device
  return XlaCheck(params=params.per_device, shards=shards, inputs=inputs, arguments=arguments, cache=cache,
                  cache_outputs=alloc.memory_analysis().output_size_in_bytes,
                  cache_arrays=len(llama.KVCache._fields))


def _define_flags():
  """The command line, defined only when this module runs as a script: tests import it beside the runner, whose flags
  could share names."""
  flags.DEFINE_list("models", list(DEFAULT_MODELS), f"Models (of {', '.join(MODELS)}).")
  flags.DEFINE_string("meshes", ";".join(DEFAULT_MESHES),
                      "Meshes separated by ';', each axis:size,... over data, fsdp, tensor (absent axes 1).")
  flags.DEFINE_list("batch", ["shard", "8"], "Global batch sizes of the KV cache; 'shard' is data x fsdp "
                    "(one row per batch shard).")
  flags.DEFINE_integer("capacity", 4096, "KV cache slots W per row.")
  flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16", "float16"], "Weights and cache dtype.")


def main(argv):
  del argv
  f = flags.FLAGS
  meshes = [m.strip() for m in f.meshes.split(";") if m.strip()]
  print(table(memory_rows(f.models, meshes, f.batch, f.capacity, jnp.dtype(f.dtype))))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
