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
import tempfile
import time
from typing import Any, Collection, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.analysis import hlo_cost
from experiments.analysis import tpu_report
from experiments.analysis import tpu_targets
from experiments.runner import plan as plan_lib
from models import backbones
from models import loading
from models import pruning
from models import shapes
from models import sharding

__all__ = ["topology_mesh", "abstract_model", "weight_shapes", "runner_batch", "shard_bytes",
           "tiled_argument_bytes", "compile_program", "compile_runs", "standard_mesh", "largest_batch", "sweep"]


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


def _numbers(compiled, weights, topology: tpu_targets.Topology) -> dict[str, Any]:
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
  text = compiled.as_text()
  found = tpu_targets.collectives(text, weights)
  loops = hlo_cost.program_cost(text, topology.peak_flops, topology.hbm_bytes_per_s)
  optimal = cost.get("optimal_seconds")
  m = dict(argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
           temp_bytes=int(memory.temp_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes))
  total = tpu_targets.program_bytes(m["argument_bytes"], m["output_bytes"], m["temp_bytes"], m["alias_bytes"])
  hbm = topology.hbm_bytes
  return dict(m, total_bytes=total, hbm_bytes=hbm, fits=total <= hbm,
              flops=cost.get("flops"), bytes_accessed=cost.get("bytes accessed"),
              optimal_seconds=None if optimal is None or optimal < 0 else optimal,   # < 0: XLA has no estimate
              loop_flops=loops.flops, loop_hbm_bytes=loops.hbm_bytes, collective_bytes=loops.collective_bytes,
              roofline_s=loops.seconds, trips=list(loops.trips), unknown_trips=loops.unknown_trips,
              while_loops=tpu_targets.while_loops(text), collectives=found.counts,
              weight_all_gathers=list(found.weight_gathers))


def compile_program(fn, args, mesh, weights, topology: tpu_targets.Topology, **jit_options
                    ) -> tuple[dict[str, Any], Any]:
  """jit(fn, keep_unused=True, **jit_options).lower(*args).compile() under `mesh`: (the row's numbers, the
  compiled executable or None). A compile the target rejects (out of HBM) is a row with `error`: its message."""
  t0 = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      lowered = jax.jit(fn, keep_unused=True, **jit_options).lower(*args)
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError RESOURCE_EXHAUSTED and kin: a row)
    return dict(error=f"{type(e).__name__}: {str(e).strip()[:2000]}", compile_s=time.perf_counter() - t0), None
  return dict(_numbers(compiled, weights, topology), tiled_argument_bytes=tiled_argument_bytes(compiled, args),
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
                 text_tokens: int = 26, overrides: Sequence[str] = (), output: str | None = None,
                 done: Collection[tuple[str, int | None]] = ()) -> list[dict[str, Any]]:
  """Every row of the module docstring for one backbone, shape, topology and mesh (rows written to `output` as
  they are measured). overrides: the runner's method.name=value options of `pruning.method_config`; done: the
  (method, target) runs already in `output` (a resumed sweep), not compiled again."""
  if backbone not in plan_lib.BACKBONES:
    raise ValueError(f"unknown --backbone {backbone!r}; known: {', '.join(plan_lib.BACKBONES)}")
  if shape_name not in shapes.SHAPES:
    raise ValueError(f"unknown --shape {shape_name!r}; known: {', '.join(shapes.SHAPES)}")
  spec, shape = plan_lib.BACKBONES[backbone], shapes.SHAPES[shape_name]
  if shape.model_type != spec.model_type:
    raise ValueError(f"--shape {shape_name} is a {shape.model_type} model, --backbone {backbone} a {spec.model_type}")
  topology = tpu_targets.parse_topology(topology_name)
  base = dict(backbone=backbone, shape=shape_name, topology=topology.name, mesh=mesh_text, batch=batch_size,
              dtype=dtype, overrides=sorted(overrides), hbm_bytes=topology.hbm_bytes)
  rows: list[dict[str, Any]] = []

  def record(row):
    rows.append(row)
    if output:
      with open(output, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(tpu_report.line(row), flush=True)

  wanted = [(m, None) if m == "full" else (m, t) for m in methods for t in ([None] if m == "full" else budgets)]
  if done and all(k in done for k in wanted):
    return rows
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
    if (method, target) in done:
      continue
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
                                        weights, topology)
    record(dict(row, program="prefill", capacity=static["capacity"], param_bytes=params,
                input_bytes=shard_bytes((batch, traced)), **numbers))
    if compiled is None:
      continue
    out = jax.tree.map(lambda info, s: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=s),
                       compiled.out_info, compiled.output_shardings)
    tokens = _abstract(np.zeros(batch_size, np.int32), mesh, split_rows=True)
    step = lambda m, cache, t, p, cfg=cfg: pruning.decode_step(m, cfg, cache, t, p)
    numbers, _ = compile_program(step, (model, out.cache, tokens, out.positions), mesh, weights, topology,
                                 donate_argnums=1)
    record(dict(row, program="decode_step", param_bytes=params,
                input_bytes=shard_bytes((out.cache, tokens, out.positions)), **numbers))
  return rows


def standard_mesh(kind: str, devices: int) -> str:
  """A mesh the runner's --mesh accepts for a slice of `devices`: "data", "fsdp", "tensor" (all devices on one axis),
  "fsdp+tensor" (tensor 2, fsdp the rest), "data+fsdp" (data 2, fsdp the rest), or an explicit "fsdp:4,tensor:2"."""
  half = max(1, devices // 2)
  kinds = {"data": f"data:{devices}", "fsdp": f"fsdp:{devices}", "tensor": f"tensor:{devices}",
           "fsdp+tensor": f"fsdp:{half},tensor:2", "data+fsdp": f"data:2,fsdp:{half}"}
  if kind in kinds:
    return kinds[kind]
  if ":" in kind:
    return kind
  raise ValueError(f"--mesh {kind!r}: expected one of {', '.join(kinds)} or an explicit mesh such as fsdp:4,tensor:2")


def largest_batch(backbone: str, shape_name: str, topology_name: str, mesh_text: str, method: str, target,
                  rows: Sequence[dict[str, Any]], *, dtype: str = "bfloat16", max_new_tokens: int = 16,
                  text_tokens: int = 26, overrides: Sequence[str] = (), tries: int = 6) -> dict[str, Any]:
  """The largest global batch whose prefill and decode step both fit. The line through each program's bytes in
  `rows` (`compile_runs` at batch B) and at 2B (compiled here) gives a guess (at most 64 B), which is compiled; then
  bisection, in steps of data x fsdp, between the largest batch known to fit and the smallest known not to, until
  they are one step apart or `tries` compiles are spent. One row, kind "largest_batch": largest (None when nothing
  fits), its bytes, the next batch measured and why it does not fit, and `bracketed` (whether they are one step
  apart: the answer is exact)."""
  topology = tpu_targets.parse_topology(topology_name)
  sizes = sharding.parse_mesh(mesh_text)
  step = sizes["data"] * sizes["fsdp"]
  base = dict(kind="largest_batch", backbone=backbone, shape=shape_name, topology=topology.name, mesh=mesh_text,
              dtype=dtype, method=method, target=target)
  measured: dict[int, tuple[int | None, int | None, str | None]] = {}   # batch -> (prefill, decode bytes, why not)

  def take(batch_rows, batch):
    got = {r["program"]: r for r in batch_rows if r.get("method") == method and r.get("target") == target}
    problem = next((r["error"] for r in got.values() if "error" in r), None)
    pre, dec = got.get("prefill", {}), got.get("decode_step", {})
    if problem is None and not (pre.get("fits") and dec.get("fits")):
      problem = f"{pre.get('total_bytes')} / {dec.get('total_bytes')} bytes over {topology.hbm_bytes}"  # prefill / decode
    measured[batch] = (pre.get("total_bytes"), dec.get("total_bytes"), problem and problem.splitlines()[0][:300])

  def compile_at(batch):
    take(compile_runs(backbone, shape_name, topology.name, mesh_text, [method], [] if target is None else [target],
                      batch, dtype=dtype, max_new_tokens=max_new_tokens, text_tokens=text_tokens,
                      overrides=overrides), batch)

  first = next((r["batch"] for r in rows if r.get("method") == method and r.get("target") == target), None)
  if first is None:
    raise ValueError(f"no rows of {method}@{target} to start from")
  take(rows, first)
  fits = lambda b: measured[b][2] is None
  compiles = 0
  if fits(first):
    compile_at(2 * first)
    compiles += 1
  if fits(first) and fits(2 * first):     # the line through both, for each program; the smaller guess
    guesses = [tpu_report.affine_batch(measured[first][k], first, measured[2 * first][k], 2 * first,
                                       topology.hbm_bytes, step) for k in (0, 1)]
    guess = min(max(step, min(guesses)), 64 * first)
    if guess not in measured:
      compile_at(guess)
      compiles += 1
  while compiles < tries:                 # then bisect between the largest batch known to fit and the smallest not
    lo = max((b for b in measured if fits(b)), default=0)
    hi = min((b for b in measured if not fits(b) and b > lo), default=None)
    if hi is None:                        # everything measured fits: double the largest
      mid = 2 * lo
    elif hi - lo <= step:
      break
    else:
      mid = max(step, (lo + hi) // 2 // step * step)
      if mid in measured:
        break
    compile_at(mid)
    compiles += 1
  ok = [b for b in measured if fits(b)]
  largest = max(ok) if ok else None
  over = min((b for b in measured if not fits(b) and (largest is None or b > largest)), default=None)
  return dict(base, largest=largest, prefill_bytes=measured[largest][0] if largest else None,
              decode_bytes=measured[largest][1] if largest else None, next=over,
              why_not=measured[over][2] if over else None, compiles=compiles,
              bracketed=over is not None and (largest or 0) + step == over)


def sweep(backbone: str, shape_names: Sequence[str], topologies: Sequence[str], meshes: Sequence[str],
          methods: Sequence[str], budgets: Sequence[int], batch_size: int, *, output: str, largest_mesh: str | None,
          largest_methods: Sequence[str] = (), largest_tries: int = 6, **options) -> list[dict[str, Any]]:
  """compile_runs for every shape x topology x mesh (mesh kinds expanded per topology by `standard_mesh`), resuming
  from the rows already in `output`, then `largest_batch` for `largest_methods` on the `largest_mesh` kind."""
  for shape_name in shape_names:
    for topology_name in topologies:
      topology = tpu_targets.parse_topology(topology_name)
      for kind in meshes:
        mesh_text = standard_mesh(kind, topology.devices)
        done = tpu_report.done_runs(tpu_report.load(output), backbone, shape_name, topology.name, mesh_text,
                                    batch_size, options.get("dtype", "bfloat16"), options.get("overrides", ()))
        compile_runs(backbone, shape_name, topology.name, mesh_text, methods, budgets, batch_size, output=output,
                     done=done, **options)
      if not largest_mesh:
        continue
      mesh_text = standard_mesh(largest_mesh, topology.devices)
      for method in largest_methods:
        target = None if method == "full" else budgets[0]
        rows = tpu_report.load(output)
        if any(r.get("kind") == "largest_batch" and (r["shape"], r["topology"], r["mesh"], r["method"],
                                                      r.get("target")) ==
               (shape_name, topology.name, mesh_text, method, target) for r in rows):
          continue
        point = [r for r in rows if r.get("kind", "run") == "run" and (r.get("shape"), r.get("topology"),
                 r.get("mesh"), r.get("batch")) == (shape_name, topology.name, mesh_text, batch_size)]
        row = largest_batch(backbone, shape_name, topology.name, mesh_text, method, target, point,
                            tries=largest_tries, **options)
        with open(output, "a", encoding="utf-8") as f:
          f.write(json.dumps(row) + "\n")
        print(f"largest batch {shape_name} {topology.name} {mesh_text} {method}: {row['largest']} "
              f"(next {row['next']}: {row['why_not']})", flush=True)
  return tpu_report.load(output)


def _define_flags():
  """The command line, defined only when this module runs as a script (tests import it beside the runner)."""
  flags.DEFINE_string("backbone", "llava_next", "Runner backbone (experiments.runner.plan.BACKBONES).")
  flags.DEFINE_list("shape", ["llava-next-7b"], "Random-weight shapes (models.shapes.SHAPES): only shapes are used.")
  flags.DEFINE_list("topology", ["v5e:2x4"], "TPU slices as libtpu names them: v5e:2x4, v6e:2x4, v5p:2x2x1, v4:2x2x1.")
  flags.DEFINE_multi_string("mesh", ["fsdp"], "Meshes over each slice (repeat the flag): a kind of "
                            "experiments.tpu_compile.standard_mesh (data, fsdp, tensor, fsdp+tensor, data+fsdp), "
                            "sized to the slice, or an explicit mesh as the runner's --mesh (fsdp:4,tensor:2).")
  flags.DEFINE_list("methods", ["full", "tops", "visionzip", "divprune"], "'full' and pruning methods.")
  flags.DEFINE_list("budgets", ["320"], "Targets (visual tokens per image) of every method but full.")
  flags.DEFINE_integer("batch_size", 8, "Global batch (a multiple of data x fsdp).")
  flags.DEFINE_integer("max_new_tokens", 16, "Tokens the cache holds room for (the runner's max_new_tokens; > 1: "
                       "the cached prefill and decoding, as the runner runs them).")
  flags.DEFINE_integer("text_tokens", 26, "Text tokens around the image (POPE's prompt is about 26).")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and cache dtype.")
  flags.DEFINE_list("overrides", [], "method.name=value options of pruning.method_config, as the runner.")
  flags.DEFINE_string("output", None, "JSONL file the rows are appended to; a sweep resumes from the rows in it.")
  flags.DEFINE_string("largest_batch_mesh", None, "Mesh kind on which to search each slice's largest batch.")
  flags.DEFINE_list("largest_batch_methods", ["full", "tops"], "Methods whose largest batch is searched.")
  flags.DEFINE_integer("largest_batch_tries", 6, "Compiles each largest-batch search may spend.")


def main(argv):
  del argv
  f = flags.FLAGS
  output = f.output or os.path.join(tempfile.mkdtemp(prefix="tpu_compile_"), "rows.jsonl")
  rows = sweep(f.backbone, f.shape, f.topology, f.mesh, f.methods, [int(b) for b in f.budgets], f.batch_size,
               output=output, largest_mesh=f.largest_batch_mesh, largest_methods=f.largest_batch_methods,
               largest_tries=f.largest_batch_tries, dtype=f.dtype, max_new_tokens=f.max_new_tokens, text_tokens=f.text_tokens, overrides=f.overrides)
  runs = [r for r in rows if r.get("kind", "run") == "run" and r.get("batch") == f.batch_size
          and r.get("shape") in f.shape and r.get("topology") in {tpu_targets.parse_topology(t).name for t in f.topology}]
  print(tpu_report.table(runs))
  print()
  print(tpu_report.summary(runs, [m for m in f.methods if m != "full"]))
  if any(r.get("kind") == "largest_batch" for r in rows):
    print()
    print(tpu_report.largest_batch_table(rows))
  errors = sum("error" in r for r in runs)
  print(f"rows: {output}" + (f"; {errors} of {len(runs)} are errors (see the tables)" if errors else ""))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
