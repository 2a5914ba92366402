"""TPU slice topologies, their HBM, and the collectives of an HLO text (no libtpu: the compiles that feed them are
tests/experiments/test_tpu_compile.py, marked tpu)."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.analysis import tpu_targets
from models import sharding


@pytest.mark.parametrize("name, generation, dims, chips, devices, gib, tflops", [
    ("v5e:2x4", "v5e", (2, 4), 8, 8, 16, 197),
    ("v5e:2x2", "v5e", (2, 2), 4, 4, 16, 197),
    ("v5litepod:4x4", "v5e", (4, 4), 16, 16, 16, 197),
    ("v6e:2x2", "v6e", (2, 2), 4, 4, 32, 918),
    ("v5p:2x2x1", "v5p", (2, 2, 1), 4, 4, 95, 459),
    ("v4:2x2x2", "v4", (2, 2, 2), 8, 16, 16, 137.5),     # two TensorCore devices per chip, half the HBM each
])
def test_topologies_and_their_hbm(name, generation, dims, chips, devices, gib, tflops):
  topo = tpu_targets.parse_topology(name)
  assert (topo.generation, topo.dims, topo.chips, topo.devices, topo.hbm_bytes) == (
      generation, dims, chips, devices, gib * 2**30)
  assert topo.peak_flops == tflops * 1e12 and topo.hbm_bytes_per_s > 0
  assert topo.name == f"{generation}:{'x'.join(map(str, dims))}"


@pytest.mark.parametrize("name, match", [
    ("v5e", r"GENERATION:GRID.*v4, v5e, v5p, v6e"),
    ("v3:2x2", r"generation of v4, v5e, v5p, v6e"),
    ("v5e:2x2x1", r"v5e slice is a 2-D grid.*v5e:2x2"),
    ("v5p:2x2", r"v5p slice is a 3-D grid.*v5p:2x2x2"),
    ("v5e:2xtwo", r"2-D grid"),
    ("v5e:0x4", r"2-D grid"),
])
def test_a_bad_topology_names_what_is_expected(name, match):
  with pytest.raises(ValueError, match=match):
    tpu_targets.parse_topology(name)


def test_a_mesh_must_cover_the_slice_exactly():
  topo = tpu_targets.parse_topology("v5e:2x4")
  assert tpu_targets.check_mesh({"data": 1, "fsdp": 8, "tensor": 1}, topo) is None
  assert tpu_targets.check_mesh({"data": 2, "fsdp": 2, "tensor": 2}, topo) is None
  problem = tpu_targets.check_mesh({"data": 1, "fsdp": 4, "tensor": 1}, topo)
  assert problem and "4 devices" in problem and "v5e:2x4 slice 8 chips" in problem
  v4 = tpu_targets.parse_topology("v4:2x2x1")
  assert tpu_targets.check_mesh({"data": 1, "fsdp": 8, "tensor": 1}, v4) is None
  assert "8 devices (4 chips, two TensorCores each)" in tpu_targets.check_mesh({"data": 4, "fsdp": 1, "tensor": 1}, v4)


_HLO = """
HloModule jit_f, entry_computation_layout={(bf16[32,4096,11008]{2,1,0})->bf16[8,11008]{1,0}}

%body (p: (s32[], bf16[8,4096])) -> (s32[], bf16[8,4096]) {
  %all-gather-start.1 = (bf16[512,11008]{1,0:T(8,128)(2,1)}, bf16[4096,11008]{1,0:T(8,128)(2,1)}) all-gather-start(bf16[512,11008]{1,0:T(8,128)(2,1)} %w), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %all-gather-done.1 = bf16[4096,11008]{1,0:T(8,128)(2,1)} all-gather-done(%all-gather-start.1)
  %all-reduce.2 = f32[8,4096]{1,0} all-reduce(f32[8,4096]{1,0} %x), channel_id=2, to_apply=%add
  %all-reduce-start.3 = f32[8]{0} all-reduce-start(f32[8]{0} %y), to_apply=%add
  %all-reduce-done.3 = f32[8]{0} all-reduce-done(%all-reduce-start.3)
  %reduce-scatter.4 = f32[1,4096]{1,0} reduce-scatter(f32[8,4096]{1,0} %z), dimensions={0}, to_apply=%add
  %all-to-all.5 = bf16[8,64]{1,0} all-to-all(bf16[8,64]{1,0} %a), dimensions={1}
  %collective-permute.6 = bf16[8,64]{1,0} collective-permute(bf16[8,64]{1,0} %a), source_target_pairs={{0,1}}
  %gather.7 = bf16[8,4096]{1,0} gather(bf16[32000,4096]{1,0} %e, s32[8,1]{1,0} %i), offset_dims={1}
  %all-gather.8 = bf16[1,32000,4096]{2,1,0} all-gather(bf16[1,4000,4096]{2,1,0} %emb), dimensions={1}
  %fusion.9 = bf16[8,4096]{1,0} fusion(%x), kind=kLoop, calls=%all-gather.fused, metadata={op_name="jit(f)/all_gather"}
}
"""

_WEIGHTS = {
    "mlp/up_proj/kernel": ("bf16", (32, 4096, 11008)),
    "mlp/up_proj/kernel[layer]": ("bf16", (4096, 11008)),
    "embed_tokens/embedding": ("bf16", (32000, 4096)),
    "lm_head/kernel": ("bf16", (4096, 32000)),
    "norm/scale": ("f32", (4096,)),
}


def test_collectives_are_counted_once_per_instruction():
  found = tpu_targets.collectives(_HLO, _WEIGHTS)
  assert found.counts == {"all-gather": 2, "all-reduce": 2, "reduce-scatter": 1, "all-to-all": 1,
                          "collective-permute": 1}
  # The async gather's result tuple holds one layer of up_proj; the other returns the whole table (the size-1
  # dimension aside). gather (not a collective), the fusion's name and its op_name metadata are not counted.
  assert found.weight_gathers == ("embed_tokens/embedding", "mlp/up_proj/kernel[layer]")
  assert tpu_targets.collectives(_HLO).weight_gathers == ()
  assert tpu_targets.collectives("").counts == dict.fromkeys(tpu_targets.COLLECTIVES, 0)


def test_a_gather_of_another_dtype_is_not_the_weight():
  text = "  %ag = f32[4096,11008]{1,0} all-gather(f32[512,11008]{1,0} %w), dimensions={0}\n"
  assert tpu_targets.collectives(text, _WEIGHTS).weight_gathers == ()


def test_on_a_real_partitioned_program():
  """XLA:CPU's partitioned HLO of an FSDP matmul (8 simulated devices): the weight split on its rows is gathered
  whole; replicated on tensor columns it is never moved."""
  mesh = sharding.make_mesh("fsdp:8")
  w = jax.ShapeDtypeStruct((64, 128), np.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
  x = jax.ShapeDtypeStruct((8, 64), np.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
  text = jax.jit(lambda w, x: x @ w).lower(w, x).compile().as_text()
  weights = {"w": ("f32", (64, 128))}
  found = tpu_targets.collectives(text, weights)
  assert found.counts["all-gather"] == len(re.findall(r"\sall-gather(-start)?\(", text)) >= 1
  assert found.weight_gathers == ("w",)
  mesh = sharding.make_mesh("tensor:8")
  w = jax.ShapeDtypeStruct((64, 128), np.float32, sharding=NamedSharding(mesh, P(None, "tensor")))
  x = jax.ShapeDtypeStruct((8, 64), np.float32, sharding=NamedSharding(mesh, P()))
  text = jax.jit(lambda w, x: x @ w, out_shardings=NamedSharding(mesh, P(None, "tensor"))).lower(w, x).compile()
  assert tpu_targets.collectives(text.as_text(), weights).weight_gathers == ()


def test_while_loops_are_counted():
  text = "  %w.1 = (s32[], f32[8]) while((s32[], f32[8]) %t), condition=%c, body=%b\n  %x = f32[8] add(%a, %b)\n"
  assert tpu_targets.while_loops(text) == 1 and tpu_targets.while_loops(_HLO) == 0


def test_tiled_bytes_pad_the_minor_dimensions_to_the_tile():
  """Layouts libtpu 0.0.42.1 chose for five arguments of one v5e program, whose memory analysis read 24,576 bytes."""
  cases = [((32, 32), 4, (0, 1), ((8, 128),), 16384), ((4, 100), 4, (0, 1), ((4, 128),), 2048),
           ((7,), 4, (0,), ((128,),), 512), ((3, 5, 56), 2, (1, 0, 2), ((4, 128), (2, 1)), 5120),
           ((4, 128), 1, (0, 1), ((4, 128), (4, 1)), 512)]
  assert [tpu_targets.tiled_bytes(*c[:4]) for c in cases] == [c[4] for c in cases]
  assert sum(c[4] for c in cases) == 24576
  assert tpu_targets.tiled_bytes((), 4) == 4 and tpu_targets.tiled_bytes((3, 5), 4) == 60
  assert tpu_targets.tiled_bytes((), 4, (), ((128,),)) == 512     # a float32 scalar argument (measured: 512 bytes)


def test_program_bytes_discounts_donated_outputs():
  assert tpu_targets.program_bytes(100, 40, 7, 30) == 117
