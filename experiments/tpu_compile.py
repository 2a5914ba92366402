r"""Compiles the runner's programs for a TPU slice on a CPU-only machine: per-chip memory, cost and collectives.

    python -m experiments.tpu_compile --backbone=llava_next --shape=llava-next-7b --topology=v5e:2x4 \
        --mesh=fsdp:8 --methods=full,tops,visionzip,divprune --budgets=320 --batch_size=8 --output=rows.jsonl

Needs libtpu (`bash scripts/venv.sh tpu`: lock/tpu.txt, the test set plus jax[tpu]'s libtpu pin). No TPU and no
network: `jax.experimental.topologies.get_topology_desc` gives compile-only devices of the named slice, and the
programs are lowered over them and compiled by libtpu's compiler, as MaxText's train_compile.py does for training.

For each run (the full model, then each method at each budget: `pruning.method_config`, the official protocol, as the
runner builds it) two programs, exactly as the runner calls them (`experiments.runner.evaluate`):
  prefill      `pruning.prefill`'s jitted program (`pruning.prefill_program`): the vision tower over every crop,
               Stage I, the decoder segments with the Stage II steps, the KV cache, the last logits; inputs built
               as the runner builds a batch (ids padded to a multiple of 32, text_len its bound, visual_len the
               model's most image tokens), pixel_values split over data x fsdp, the rest replicated
  decode_step  one token per row through the layer segments from that prefill's cache (`pruning.decode_step`, the
               body of `pruning.decode`'s loop), the cache donated as the loop updates it in place
The parameters are abstract (`jax.ShapeDtypeStruct`s carrying their `models.sharding` NamedShardings on the slice's
mesh): no weight is created. Programs are compiled with keep_unused=True, so every parameter is an argument: the
runner keeps the whole model in HBM whichever parameters one program reads.

Each program is one JSONL row: per-chip argument / output / temp / alias bytes (XLA's memory analysis) and their
total (arguments + outputs + temporaries - aliases) against the chip's HBM (`experiments.analysis.tpu_targets`),
flops, bytes accessed and optimal_seconds (XLA's cost analysis, per chip), the collectives of the partitioned HLO
(all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute) and the weights an all-gather gathers
whole, and the compile time. A mesh that does not cover the slice or does not divide the model, a batch the mesh
does not split, and a program the compiler rejects (out of HBM: its message carries the numbers) are rows with
`error` and, where known, the numbers.
"""

import os
import sys

# Before jax is imported: libtpu must never ask the cloud metadata server (no code here contacts any address), and no
# TPU client is started (it would look for TPU chips and hosts); the topology's devices are compile-only. (Imported
# after jax, as in the tests, whose conftest sets both, this changes nothing jax reads.)
os.environ["TPU_SKIP_MDS_QUERY"] = "1"
if "jax" not in sys.modules:
  os.environ["JAX_PLATFORMS"] = "cpu"
# libtpu takes /tmp/libtpu_lockfile to own the host's chips; compiling only, there are none to own, and a second
# process (pytest workers, a second compile) would otherwise fail to load it.
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"

# pylint: disable=g-import-not-at-top,wrong-import-position
import functools
import json
import math
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.analysis import tpu_targets
from experiments.runner import plan as plan_lib
from models import backbones
from models import loading
from models import pruning
from models import shapes
from models import sharding

__all__ = ["topology_mesh", "abstract_model", "weight_shapes", "runner_batch", "shard_bytes",
           "tiled_argument_bytes", "compile_program", "compile_runs", "table"]


def topology_mesh(topology: tpu_targets.Topology, mesh_text: str) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh of `mesh_text` over the compile-only devices of `topology` (needs libtpu)."""
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(topology_name=topology.name, platform="tpu").devices
  return sharding.make_mesh(mesh_text, devices=devices)


def _family_config(shape: shapes.Shape):
  hf = shapes.hf_config(shape).to_dict()
  family = loading.family_of(hf["model_type"])
  return family, family.config.from_hf(hf)


def abstract_model(family, config, dtype, mesh):
  """The model with every parameter a `jax.ShapeDtypeStruct` carrying its NamedSharding on `mesh` (nothing is
  allocated). ValueError from `sharding.param_specs` when a mesh axis does not divide a weight."""
  model = nnx.eval_shape(lambda: family.model(config, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  specs = sharding.param_shardings(state, mesh)
  place = lambda path, v: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                               sharding=specs[tuple(str(getattr(k, "key", k)) for k in path)])
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(place, nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


_HLO_DTYPES = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}


def weight_shapes(model) -> dict[str, tuple[str, tuple[int, ...]]]:
  """{path: (HLO dtype, shape)} of every sharded parameter of an `abstract_model`, and for a layer stack also
  {path[layer]: one layer's shape}: what `tpu_targets.collectives` matches all-gathers against."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    value = var.get_value()
    if all(e is None for e in value.sharding.spec):
      continue      # replicated: never gathered (an activation of its shape would only be mistaken for it)
    name, dtype = "/".join(map(str, path)), _HLO_DTYPES.get(jnp.dtype(value.dtype).name, jnp.dtype(value.dtype).name)
    out[name] = (dtype, tuple(value.shape))
    if any(str(p) == "layers" for p in path):
      out[name + "[layer]"] = (dtype, tuple(value.shape[1:]))
  return out


def runner_batch(model, batch: int, image_size: tuple[int, int], text_tokens: int) -> dict[str, Any]:
  """Host arrays shaped as the runner's encoded batch (`Evaluator.encode`): B rows of a few text tokens, one image's
  <image> run and the rest of the text, padded with masked tokens to a multiple of 32; zero pixels (their values do not
  change a compile) with the crops padded to the model's most."""
  config = model.config
  sizes = np.tile(np.asarray(image_size, np.int32), (batch, 1))
  visual = int(np.asarray(model.layout(sizes, batch).counts)[0])
  crops = (config.max_num_crops,) if backbones.of_model(model).pixel_crops else ()
  crop = config.vision.image_size
  head = min(5, text_tokens)
  text = np.full((batch, text_tokens), 3, np.int32)
  ids = np.concatenate([text[:, :head], np.full((batch, visual), config.image_token_id, np.int32), text[:, head:]], 1)
  length = -(-ids.shape[1] // 32) * 32
  mask = np.arange(length)[None, :] < ids.shape[1]
  ids = np.pad(ids, ((0, 0), (0, length - ids.shape[1])))
  arrays = dict(input_ids=ids, attention_mask=np.broadcast_to(mask, ids.shape).copy(),
                pixel_values=np.zeros((batch, *crops, 3, crop, crop), np.float32), text_bound=-(-text_tokens // 8) * 8)
  if crops:
    arrays["image_sizes"] = sizes
  return arrays


def _abstract(tree, mesh, split_rows: bool):
  """Every array leaf -> a ShapeDtypeStruct on `mesh`: rows over data x fsdp when `split_rows` and they divide,
  else replicated (what a host array passed to a program under the mesh becomes). Python scalars stay."""
  rows = sharding.batch_divisor(mesh)

  def one(x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      return x
    split = split_rows and np.ndim(x) and x.shape[0] % rows == 0
    spec = sharding.batch_spec(np.ndim(x)) if split else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
  return jax.tree.map(one, tree)


def shard_bytes(tree) -> int:
  """Bytes one chip holds of the abstract arrays of `tree` (each leaf's shard shape; a Python scalar argument is a
  32-bit scalar on every chip): the analytic count XLA's argument bytes are checked against."""
  total = 0
  for x in jax.tree.leaves(tree):
    if isinstance(x, jax.ShapeDtypeStruct):
      total += math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    else:
      total += jnp.asarray(x).dtype.itemsize
  return total


def tiled_argument_bytes(compiled, args) -> int:
  """The per-chip bytes of `args` (abstract, as lowered) in the layouts the compiler chose for them
  (`tpu_targets.tiled_bytes` of each shard): the analytic count of XLA's argument bytes on a TPU, whose tiles pad small
  minor dimensions (a PRNG key is its uint32[2] data)."""
  from jax._src.layout import Format  # pylint: disable=g-import-not-at-top  (the type of compiled.input_formats)
  formats = jax.tree.leaves(compiled.input_formats[0], is_leaf=lambda f: isinstance(f, Format))
  total = 0
  for x, f in zip(jax.tree.leaves(args), formats, strict=True):
    if isinstance(x, jax.ShapeDtypeStruct):
      shape, itemsize = tuple(x.sharding.shard_shape(x.shape)), x.dtype.itemsize
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        shape, itemsize = shape + (2,), 4
    else:
      shape, itemsize = (), jnp.asarray(x).dtype.itemsize
    layout = f.layout
    total += tpu_targets.tiled_bytes(shape, itemsize, tuple(layout.major_to_minor or ()), tuple(layout.tiling or ()))
  return total


def _numbers(compiled, weights, hbm: int) -> dict[str, Any]:
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
  text = compiled.as_text()
  found = tpu_targets.collectives(text, weights)
  optimal = cost.get("optimal_seconds")
  m = dict(argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
           temp_bytes=int(memory.temp_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes))
  total = tpu_targets.program_bytes(m["argument_bytes"], m["output_bytes"], m["temp_bytes"], m["alias_bytes"])
  return dict(m, total_bytes=total, hbm_bytes=hbm, fits=total <= hbm,
              flops=cost.get("flops"), bytes_accessed=cost.get("bytes accessed"),
              optimal_seconds=None if optimal is None or optimal < 0 else optimal,   # < 0: XLA has no estimate
              while_loops=tpu_targets.while_loops(text), collectives=found.counts,
              weight_all_gathers=list(found.weight_gathers))


def compile_program(fn, args, mesh, weights, hbm: int, **jit_options) -> tuple[dict[str, Any], Any]:
  """jit(fn, keep_unused=True, **jit_options).lower(*args).compile() under `mesh`: (the row's numbers, the
  compiled executable or None). A compile the target rejects (out of HBM) is a row with `error`: its message."""
  t0 = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      lowered = jax.jit(fn, keep_unused=True, **jit_options).lower(*args)
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError RESOURCE_EXHAUSTED and kin: a row)
    return dict(error=f"{type(e).__name__}: {str(e).strip()[:2000]}", compile_s=time.perf_counter() - t0), None
  return dict(_numbers(compiled, weights, hbm), tiled_argument_bytes=tiled_argument_bytes(compiled, args),
              compile_s=time.perf_counter() - t0), compiled


def _runs(methods: Sequence[str], budgets: Sequence[int], family: str, num_layers: int, overrides):
  """(method, target, PruningConfig | error) for the full model once and each method at each budget."""
  out = []
  for method in methods:
    if method == "full":
      out.append(("full", None, pruning.PruningConfig.full()))
      continue
    for target in budgets:
      try:
        out.append((method, target, pruning.method_config(method, family=family, target=target,
                                                          num_layers=num_layers, **overrides.get(method, {}))))
      except (pruning.NoProtocol, ValueError) as e:
        out.append((method, target, f"{type(e).__name__}: {e}"))
  return out


def compile_runs(backbone: str, shape_name: str, topology_name: str, mesh_text: str, methods: Sequence[str],
                 budgets: Sequence[int], batch_size: int, *, dtype: str = "bfloat16", max_new_tokens: int = 16,
                 text_tokens: int = 26, overrides: Sequence[str] = (), output: str | None = None
                 ) -> list[dict[str, Any]]:
  """Every row of the module docstring for one backbone, shape, topology and mesh (rows written to `output` as
  they are measured). overrides: the runner's method.name=value options of `pruning.method_config`."""
  if backbone not in plan_lib.BACKBONES:
    raise ValueError(f"unknown --backbone {backbone!r}; known: {', '.join(plan_lib.BACKBONES)}")
  if shape_name not in shapes.SHAPES:
    raise ValueError(f"unknown --shape {shape_name!r}; known: {', '.join(shapes.SHAPES)}")
  spec, shape = plan_lib.BACKBONES[backbone], shapes.SHAPES[shape_name]
  if shape.model_type != spec.model_type:
    raise ValueError(f"--shape {shape_name} is a {shape.model_type} model, --backbone {backbone} a {spec.model_type}")
  topology = tpu_targets.parse_topology(topology_name)
  base = dict(backbone=backbone, shape=shape_name, topology=topology.name, mesh=mesh_text, batch=batch_size,
              dtype=dtype, hbm_bytes=topology.hbm_bytes)
  rows: list[dict[str, Any]] = []

  def record(row):
    rows.append(row)
    if output:
      with open(output, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(_line(row), flush=True)

  sizes = sharding.parse_mesh(mesh_text)
  problem = tpu_targets.check_mesh(sizes, topology)
  if problem is None and batch_size % (sizes["data"] * sizes["fsdp"]):
    problem = (f"--batch_size={batch_size} does not split over the mesh's data x fsdp = "
               f"{sizes['data'] * sizes['fsdp']} chips")
  family, config = _family_config(shape)
  model_dtype = jnp.dtype(dtype)
  if problem is None:      # a mesh axis that does not divide a weight: found on an AbstractMesh, before libtpu
    state = nnx.state(nnx.eval_shape(lambda: family.model(config, dtype=model_dtype, rngs=nnx.Rngs(0))))
    try:
      sharding.param_specs(state, jax.sharding.AbstractMesh(tuple(sizes[a] for a in sharding.AXES), sharding.AXES))
    except ValueError as e:
      problem = str(e)
  if problem is None:
    mesh = topology_mesh(topology, mesh_text)
    model = abstract_model(family, config, model_dtype, mesh)
  if problem is not None:
    record(dict(base, program="all", error=problem))
    return rows
  weights = weight_shapes(model)
  arrays = runner_batch(model, batch_size, shape.image_size, text_tokens)
  key = jax.random.key(0)
  params = shard_bytes(nnx.state(model))
  runs = _runs(methods, budgets, spec.family, config.text.num_hidden_layers, plan_lib.parse_overrides(overrides))
  for method, target, cfg in runs:
    row = dict(base, method=method, target=target)
    if isinstance(cfg, str):
      record(dict(row, program="all", error=cfg))
      continue
    fn, args, static = pruning.prefill_program(
        model, cfg, arrays["input_ids"], arrays["attention_mask"], pixel_values=arrays["pixel_values"],
        image_sizes=arrays.get("image_sizes"), max_new_tokens=max_new_tokens, key=key, text_len=arrays["text_bound"],
        visual_len=model.config.max_image_tokens)
    _, batch, traced = args
    batch = dict(_abstract({k: v for k, v in batch.items() if k != "pixel_values"}, mesh, split_rows=False),
                 pixel_values=_abstract(batch["pixel_values"], mesh, split_rows=True))
    traced = _abstract(traced, mesh, split_rows=False)
    numbers, compiled = compile_program(functools.partial(fn.__wrapped__, **static), (model, batch, traced), mesh,
                                        weights, topology.hbm_bytes)
    record(dict(row, program="prefill", capacity=static["capacity"], param_bytes=params,
                input_bytes=shard_bytes((batch, traced)), **numbers))
    if compiled is None:
      continue
    out = jax.tree.map(lambda info, s: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=s),
                       compiled.out_info, compiled.output_shardings)
    tokens = _abstract(np.zeros(batch_size, np.int32), mesh, split_rows=True)
    step = lambda m, cache, t, p, cfg=cfg: pruning.decode_step(m, cfg, cache, t, p)
    numbers, _ = compile_program(step, (model, out.cache, tokens, out.positions), mesh, weights, topology.hbm_bytes,
                                 donate_argnums=1)
    record(dict(row, program="decode_step", param_bytes=params,
                input_bytes=shard_bytes((out.cache, tokens, out.positions)), **numbers))
  return rows


def _gib(n) -> str:
  return "—" if n is None else f"{n / 2**30:.2f}"


def _line(r: dict[str, Any]) -> str:
  name = f"{r.get('method', '')}{'' if r.get('target') is None else '@' + str(r['target'])} {r['program']}"
  if "error" in r:
    return f"{r['topology']} {r['mesh']} {name}: error: {r['error'].splitlines()[0][:300]}"
  c = r["collectives"]
  return (f"{r['topology']} {r['mesh']} {name}: args {_gib(r['argument_bytes'])} out {_gib(r['output_bytes'])} "
          f"temp {_gib(r['temp_bytes'])} total {_gib(r['total_bytes'])} GiB of {_gib(r['hbm_bytes'])} "
          f"(fits: {r['fits']}), {r['flops'] or 0:.3g} flops, {r['bytes_accessed'] or 0:.3g} bytes, "
          f"optimal {r['optimal_seconds']} s, {r['while_loops']} loops (cost: one trip each); "
          f"all-gather {c['all-gather']} all-reduce {c['all-reduce']} "
          f"reduce-scatter {c['reduce-scatter']} all-to-all {c['all-to-all']}; weights gathered "
          f"{len(r['weight_all_gathers'])}; compile {r['compile_s']:.1f} s")


def table(rows: Sequence[dict[str, Any]]) -> str:
  """Markdown: one line per program (GiB per chip; errors in the last column)."""
  head = ["mesh", "method", "T", "program", "args GiB", "out GiB", "temp GiB", "total GiB", "fits", "GFLOPs",
          "GB accessed", "optimal ms", "AG", "AR", "RS", "A2A", "weights AG", "compile s", "error"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    if "error" in r:
      cells = [r["mesh"], r.get("method", "—"), str(r.get("target") or "—"), r["program"]] + ["—"] * 14
      cells.append(r["error"].splitlines()[0][:200].replace("|", "/"))
    else:
      c = r["collectives"]
      ms = None if r["optimal_seconds"] is None else r["optimal_seconds"] * 1e3
      cells = [r["mesh"], r["method"], str(r["target"] or "—"), r["program"], _gib(r["argument_bytes"]),
               _gib(r["output_bytes"]), _gib(r["temp_bytes"]), _gib(r["total_bytes"]), "yes" if r["fits"] else "NO",
               f"{(r['flops'] or 0) / 1e9:.1f}", f"{(r['bytes_accessed'] or 0) / 1e9:.2f}",
               "—" if ms is None else f"{ms:.2f}", str(c["all-gather"]), str(c["all-reduce"]),
               str(c["reduce-scatter"]), str(c["all-to-all"]), str(len(r["weight_all_gathers"])),
               f"{r['compile_s']:.0f}", ""]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _define_flags():
  """The command line, defined only when this module runs as a script (tests import it beside the runner)."""
  flags.DEFINE_string("backbone", "llava_next", "Runner backbone (experiments.runner.plan.BACKBONES).")
  flags.DEFINE_string("shape", "llava-next-7b", "Random-weight shape (models.shapes.SHAPES): only its shapes are used.")
  flags.DEFINE_string("topology", "v5e:2x4", "TPU slice as libtpu names it: v5e:2x4, v6e:2x2, v5p:2x2x1, v4:2x2x1.")
  flags.DEFINE_string("mesh", "fsdp:8", "Mesh over the slice (axes data, fsdp, tensor), as the runner's --mesh.")
  flags.DEFINE_list("methods", ["full", "tops", "visionzip", "divprune"], "'full' and pruning methods.")
  flags.DEFINE_list("budgets", ["320"], "Targets (visual tokens per image) of every method but full.")
  flags.DEFINE_integer("batch_size", 8, "Global batch (a multiple of data x fsdp).")
  flags.DEFINE_integer("max_new_tokens", 16, "Tokens the cache holds room for (the runner's max_new_tokens; > 1: "
                       "the cached prefill and decoding, as the runner runs them).")
  flags.DEFINE_integer("text_tokens", 26, "Text tokens around the image (POPE's prompt is about 26).")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and cache dtype.")
  flags.DEFINE_list("overrides", [], "method.name=value options of pruning.method_config, as the runner.")
  flags.DEFINE_string("output", None, "JSONL file the rows are appended to.")


def main(argv):
  del argv
  f = flags.FLAGS
  rows = compile_runs(f.backbone, f.shape, f.topology, f.mesh, f.methods, [int(b) for b in f.budgets],
                      f.batch_size, dtype=f.dtype, max_new_tokens=f.max_new_tokens, text_tokens=f.text_tokens,
                      overrides=f.overrides, output=f.output)
  print(table(rows))
  if any("error" in r for r in rows):
    print(f"{sum('error' in r for r in rows)} of {len(rows)} rows are errors (see the last column)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
