"""experiments.tpu_compile: the runner's programs compiled for a TPU slice without a TPU.

Tests marked tpu compile through libtpu (the `tpu` extra: `bash scripts/venv.sh tpu`, then `pytest --tpu -m tpu
tests`); without --tpu they are deselected, and --tpu without libtpu stops the run (tests/conftest.py). The rest
(meshes and batches that do not fit, caught before any compile) run everywhere.
"""

import functools
import re

import jax
import pytest

from experiments import tpu_compile
from experiments.analysis import hlo_cost
from experiments.analysis import tpu_report
from experiments.bench import shard_memory
from models import shapes

TOPOLOGY = "v5e:2x2"
# tiny-next at target 40 (of its 88 packed image tokens): TOPS' Stage II has no paper setting there.
_TOPS = ["tops.stage2_alpha=0.5", "tops.stage2_lam=0.5"]


def _compile(mesh: str, methods=("full",), batch: int = 4, topology: str = TOPOLOGY, **kwargs):
  return tpu_compile.compile_runs("llava_next", "tiny-next", topology, mesh, list(methods), [40], batch,
                                  dtype="float32", max_new_tokens=4, overrides=_TOPS, **kwargs)


@functools.lru_cache(maxsize=None)
def _full_rows(mesh: str) -> tuple:
  """The full model's rows on `mesh`, compiled once for the tests that read them (rows are only read)."""
  return tuple(_compile(mesh))


@pytest.mark.parametrize("topology, mesh, batch, match", [
    (TOPOLOGY, "fsdp:8", 4, r"mesh data 1 x fsdp 8 x tensor 1 has 8 devices, the v5e:2x2 slice 4 chips"),
    ("v5e:8x8", "fsdp:64", 64, r"fsdp=64 does not divide dimension \d+ \('embed', size 32\)"),
    (TOPOLOGY, "data:4", 6, r"--batch_size=6 does not split over the mesh's data x fsdp = 4 chips"),
])
def test_what_cannot_run_is_a_row_naming_the_numbers(topology, mesh, batch, match, tmp_path):
  out = tmp_path / "rows.jsonl"
  rows = _compile(mesh, batch=batch, topology=topology, output=str(out))
  assert len(rows) == 1 and rows[0]["program"] == "all"
  assert rows[0]["mesh"] == mesh and rows[0]["topology"] == topology
  assert re.search(match, rows[0]["error"]), rows[0]["error"]
  assert out.read_text().count("\n") == 1


def test_flags_that_name_nothing_known_fail():
  with pytest.raises(ValueError, match="unknown --backbone"):
    tpu_compile.compile_runs("llava_2", "tiny-next", TOPOLOGY, "data:4", ["full"], [40], 4)
  with pytest.raises(ValueError, match="is a llava_next model, --backbone llava_1_5 a llava"):
    tpu_compile.compile_runs("llava_1_5", "tiny-next", TOPOLOGY, "data:4", ["full"], [40], 4)
  with pytest.raises(ValueError, match="GENERATION:GRID"):
    tpu_compile.compile_runs("llava_next", "tiny-next", "tpu8", "data:4", ["full"], [40], 4)


def _param_bytes(mesh: str) -> int:
  family, config = shard_memory.resolve(shapes.SHAPES["tiny-next"])
  state = shard_memory.abstract_state(family, config, jax.numpy.float32)
  return shard_memory.param_bytes(state, shard_memory.abstract_mesh(mesh)).per_device


@pytest.fixture(scope="module")
def data4():
  return _compile("data:4", methods=("full", "tops"))


@pytest.mark.tpu
def test_full_and_tops_compile_with_a_cost_and_a_fit(data4):
  rows = {(r["method"], r["program"]): r for r in data4}
  assert set(rows) == {(m, p) for m in ("full", "tops") for p in ("prefill", "decode_step")}, data4
  for r in data4:
    assert "error" not in r, r
    assert r["fits"] and 0 < r["total_bytes"] < r["hbm_bytes"]
    assert r["flops"] > 0 and r["bytes_accessed"] > 0 and r["while_loops"] > 0
    assert len(r["trips"]) == r["while_loops"], r
    # Every loop's count is read, except TOPS' coverage update (`greedy.update_coverage_gain`): a lax.while_loop over
    # the columns a step changed, data-dependent, counted once (elementwise work: no flop of loop_flops is in it).
    assert (r["unknown_trips"] == 0) == (r["method"] == "full" or r["program"] == "decode_step"), r
    assert r["loop_flops"] > 0 and r["roofline_s"] > 0 and r["loop_hbm_bytes"] > 0
  assert rows["tops", "prefill"]["while_loops"] > rows["full", "prefill"]["while_loops"]
  # With every loop's trips applied, TOPS' prefill (40 of 88 image tokens from the first layer on) costs fewer flops
  # than the full one, though it has more loops. (Its roofline is not asserted: at tiny-next's 32-wide layers both
  # prefills are bound by the same few MB of memory traffic, within a few per cent of each other.)
  assert rows["tops", "prefill"]["loop_flops"] < rows["full", "prefill"]["loop_flops"]


@pytest.mark.tpu
def test_a_sweep_resumes_and_reports(tmp_path):
  """Two meshes of one slice, then the same command again: the second compiles nothing; the summary has one line
  per mesh with the TOPS / full ratio."""
  out = str(tmp_path / "rows.jsonl")
  args = ("llava_next", ["tiny-next"], ["v5e:2x2"], ["data", "fsdp+tensor"], ["full", "tops"], [40], 4)
  options = dict(output=out, largest_mesh=None, dtype="float32", max_new_tokens=4, overrides=_TOPS)
  first = tpu_compile.sweep(*args, **options)
  assert {r["mesh"] for r in first} == {"data:4", "fsdp:2,tensor:2"} and len(first) == 8
  assert tpu_compile.sweep(*args, **options) == first
  summary = tpu_report.summary(first, ["tops"])
  lines = [l for l in summary.splitlines()[2:]]
  assert len(lines) == 2 and all(float(l.split("|")[-3]) < 1 for l in lines), summary    # tops@40 / full TFLOPs


@pytest.mark.tpu
def test_xla_cost_counts_a_loop_body_once():
  """Why the rows carry `loop_flops`: XLA's cost of a 10-step scan of a matmul is a tenth of its unrolled form's,
  while `hlo_cost` reads the trip count from libtpu's program and counts all ten."""
  mesh = tpu_compile.topology_mesh(tpu_compile.tpu_targets.parse_topology(TOPOLOGY), "data:4")
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  w = jax.ShapeDtypeStruct((10, 256, 256), jax.numpy.float32, sharding=rep)
  x = jax.ShapeDtypeStruct((128, 256), jax.numpy.float32, sharding=rep)
  matmuls = 2 * 128 * 256 * 256 * 10

  def unrolled(w, x):
    for i in range(10):
      x = x @ w[i]
    return x
  scanned = lambda w, x: jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0]
  compiled = [jax.jit(f).lower(w, x).compile() for f in (unrolled, scanned)]
  flops = [c.cost_analysis()["flops"] for c in compiled]
  assert flops[0] == matmuls and flops[1] < matmuls / 5, flops
  assert [hlo_cost.program_cost(c.as_text()).flops for c in compiled] == [matmuls, matmuls]


@pytest.mark.tpu
@pytest.mark.parametrize("mesh", ["data:4", "fsdp:4", "fsdp:2,tensor:2", "data:2,tensor:2"])
def test_arguments_are_the_parameter_shards_plus_the_inputs(mesh, data4):
  rows = data4 if mesh == "data:4" else _full_rows(mesh)
  params = _param_bytes(mesh)
  for r in rows:
    assert "error" not in r, r
    assert r["argument_bytes"] == r["tiled_argument_bytes"], (mesh, r)     # TOPS too: its hyperparameter scalars
    if r["method"] != "full":
      continue
    assert r["param_bytes"] == params, (mesh, r["program"])
    # TPU tiles pad small minor dimensions (tiny-next's widths of 32 take 128 lanes): XLA's arguments are the same
    # shards in the layouts the compiler chose, exactly, and never less than the unpadded count.
    assert r["argument_bytes"] == r["tiled_argument_bytes"] >= r["param_bytes"] + r["input_bytes"], (mesh, r)


@pytest.mark.tpu
@pytest.mark.parametrize("mesh", ["data:2,tensor:2", "fsdp:2,tensor:2", "fsdp:4"])
def test_tensor_parallel_never_gathers_a_weight_and_fsdp_one_layer_at_a_time(mesh):
  for r in _full_rows(mesh):
    assert "error" not in r, r
    gathered = r["weight_all_gathers"]
    if "fsdp" not in mesh:
      assert gathered == [] and r["collectives"]["all-reduce"] > 0, (mesh, r["program"], gathered)
    else:     # FSDP gathers weights, but never a whole layer stack
      assert all(name.endswith("[layer]") or "layers" not in name for name in gathered), (mesh, gathered)
