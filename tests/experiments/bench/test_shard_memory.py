"""Per-device memory of the sharded ports: parameter and cache counts against hand counts and XLA's memory analysis.

The narrow shapes below have different widths (text 48, vision 32, MLP 80 / 64, query 4 x 12, key/value 2 x 12) so
that an embed dimension divided by tensor, or a head dimension by fsdp, changes the count.
"""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.analysis import flops
from experiments.bench import shard_memory
from models import shapes
from models import sharding

_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
               patch_size=14, projection_dim=32)
_TEXT = dict(vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
_NEXT = dataclasses.replace(shapes.SHAPES["tiny-next"], vision=_VISION, text=_TEXT)
_V15 = shapes.Shape("llava-1.5", _VISION, _TEXT, (56, 56), ())


def _hand_param_bytes(shape, f: int, t: int, itemsize: int) -> tuple[int, int]:
  """(unsharded, per device) bytes from the transformers sizes, one weight at a time, each divided by the mesh axes
  that shard it (MaxText: embed dims over fsdp; heads, MLP width, vocabulary over tensor; norms and output biases
  replicated; data replicates everything)."""
  d, m, v, layers = (shape.text[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
  h, hkv = shape.text["num_attention_heads"], shape.text["num_key_value_heads"]
  dh = d // h
  dv, mv, lv = (shape.vision[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
  p = shape.vision["patch_size"]
  positions = (shape.vision["image_size"] // p) ** 2 + 1
  weights = []                                               # (elements, ways split)
  weights += [(v * d, t * f), (d * v, f * t), (d, 1)]        # embed_tokens [V, D], lm_head [D, V], final norm
  for _ in range(layers):
    weights += [(d * h * dh, f * t), (d * hkv * dh, f * t), (d * hkv * dh, f * t), (h * dh * d, t * f)]
    weights += [(d * m, f * t), (d * m, f * t), (m * d, t * f), (d, 1), (d, 1)]
  weights += [(p * p * 3 * dv, f), (dv, 1), (positions * dv, f), (2 * dv, 1), (2 * dv, 1)]
  for _ in range(lv):
    weights += [(dv * dv, f * t)] * 4 + [(dv, t)] * 3 + [(dv, 1)]                # q, k, v, out kernels; biases
    weights += [(dv * mv, f * t), (mv, t), (mv * dv, t * f), (dv, 1), (2 * dv, 1), (2 * dv, 1)]
  weights += [(dv * d, f * t), (d, t), (d * d, t * f), (d, 1)]                     # projector
  if shape.model_type == "llava_next":
    weights.append((d, 1))                                                         # image_newline
  for n, ways in weights:
    assert n % ways == 0, (n, ways)
  return sum(n * itemsize for n, _ in weights), sum(n * itemsize // ways for n, ways in weights)


@pytest.mark.parametrize("shape", [_NEXT, _V15], ids=["next", "1.5"])
@pytest.mark.parametrize("mesh", ["data:1", "data:4", "fsdp:4", "tensor:2", "tensor:4", "data:2,fsdp:2,tensor:2",
                                  "fsdp:2,tensor:4"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_param_bytes_match_hand_count(shape, mesh, dtype):
  family, config = shard_memory.resolve(shape)
  state = shard_memory.abstract_state(family, config, dtype)
  abstract = shard_memory.abstract_mesh(mesh)
  sizes = dict(zip(abstract.axis_names, abstract.axis_sizes))
  got = shard_memory.param_bytes(state, abstract)
  assert got == _hand_param_bytes(shape, sizes["fsdp"], sizes["tensor"], jnp.dtype(dtype).itemsize)


@pytest.mark.parametrize("name", shard_memory.DEFAULT_MODELS)
def test_unsharded_params_are_the_flops_count(name):
  family, config = shard_memory.resolve(shard_memory.MODELS[name])
  state = shard_memory.abstract_state(family, config, jnp.bfloat16)
  total = shard_memory.param_bytes(state, shard_memory.abstract_mesh("data:1")).total
  assert total == flops.llava_params(config) * 2
  # Vicuna-7B / -13B with the CLIP ViT-L/14-336 tower and projector: about 7.06e9 / 13.35e9 parameters.
  assert abs(total / 2 - (13.35e9 if "13b" in name else 7.06e9)) < 0.01e9


def _hand_cache_bytes(text, sizes, batch, capacity, itemsize) -> int:
  """One device's shards: rows over data x fsdp when they divide the batch, heads over tensor when they divide."""
  layers, hkv = text["num_hidden_layers"], text["num_key_value_heads"]
  dh = text["hidden_size"] // text["num_attention_heads"]
  rows = sizes["data"] * sizes["fsdp"]
  local_rows = batch // rows if batch % rows == 0 else batch
  local_heads = hkv // sizes["tensor"] if hkv % sizes["tensor"] == 0 else hkv
  k = np.prod((layers, local_rows, capacity, local_heads, dh)) * itemsize
  valid = np.zeros((layers, local_rows, capacity), bool)
  end = np.zeros((layers,), np.int32)
  return int(2 * k + valid.nbytes + end.nbytes)


@pytest.mark.parametrize("mesh,batch,replicated", [
    ("data:1", 3, ""), ("data:4", 8, ""), ("fsdp:2,tensor:2", 6, ""), ("data:2,fsdp:2,tensor:2", 4, ""),
    ("data:2,fsdp:2", 2, "rows"), ("tensor:4", 4, "heads"), ("fsdp:4,tensor:4", 6, "rows heads")])
def test_cache_bytes_match_hand_count(mesh, batch, replicated):
  _, config = shard_memory.resolve(_NEXT)
  sizes = {"data": 1, "fsdp": 1, "tensor": 1, **{a: int(s) for a, s in (e.split(":") for e in mesh.split(","))}}
  got = shard_memory.cache_bytes(config.text, sizes, batch, 64, jnp.bfloat16)
  assert got.per_device == _hand_cache_bytes(_TEXT, sizes, batch, 64, 2)
  assert got.total == _hand_cache_bytes(_TEXT, dict(data=1, fsdp=1, tensor=1), batch, 64, 2)
  for what in ("rows", "heads"):
    assert (f"cache {what} replicated" in got.note) == (what in replicated)


@pytest.fixture(scope="module")
def next_model():
  """Random float32 weights at the narrow NeXT shape, on the default device (built once: eager init compiles each
  initialiser once, where a sharded init under jit compiles the whole model again for every mesh)."""
  family, config = shard_memory.resolve(_NEXT)
  return family.model(config, dtype=jnp.float32, rngs=nnx.Rngs(0))


@pytest.mark.slow
@pytest.mark.parametrize("mesh,devices,batch", [("data:4", 4, 4), ("fsdp:4", 4, 4), ("tensor:4", 4, 2),
                                                ("data:2,fsdp:2,tensor:2", 8, 4)])
def test_counts_match_xla_memory_analysis(next_model, mesh, devices, batch):
  real = sharding.make_mesh(mesh, jax.devices()[:devices])
  check = shard_memory.check_against_xla(next_model, real, batch=batch, capacity=32)
  full, per_device = _hand_param_bytes(_NEXT, real.shape["fsdp"], real.shape["tensor"], 4)
  assert check.params == per_device
  assert (check.params == full) == (mesh == "data:4")           # data replicates; fsdp and tensor divide
  assert check.shards == check.params                           # what the created arrays hold on a device
  assert check.arguments == check.params + check.inputs         # the program's arguments: shards and the ids
  # XLA:CPU returns the cache's 4 arrays as a tuple, whose table of 8-byte buffer pointers counts as output
  # (measured: 1 array +0, 2 arrays +16, 4 arrays +32 bytes).
  assert check.cache_outputs == check.cache + 8 * check.cache_arrays


def test_13b_fits_four_16gb_devices():
  """LLaVA-1.5-13B and -NeXT-13B in bfloat16 on 4 devices of 16 GB: parameters and the KV cache of 4 rows of
  W = 4096 slots (one LLaVA-NeXT prompt of up to 2,880 visual tokens plus its text and answer per row; rows split
  one per device on fsdp:4, all 4 on each device on tensor:4, whose heads are split instead) take at most ~10.1 GB a
  device. On one device the parameters alone (26.7 GB) do not fit."""
  rows = shard_memory.memory_rows(["llava-next-13b", "llava-1.5-13b"], ["fsdp:4", "tensor:4", "data:1"],
                                  batches=[4], capacity=4096, dtype=jnp.bfloat16)
  for row in rows:
    (b,) = row["batches"]
    if row["mesh"] == "data:1":
      assert row["params_per_device"] > 16e9 and not b["fits"][16]
      continue
    assert row["devices"] == 4
    assert b["total_per_device"] < 16e9 and b["fits"][16]
    # Every matrix is split 4 ways. Whole on each device: the norms and output biases (1.1 MB), and on tensor:4 also
    # the CLIP patch and position embeddings (2.4 MB; their only sharded axis is embed, over fsdp).
    assert 0 <= row["params_per_device"] - row["params_total"] / 4 < 4e6
    # Keys and values split 4 ways (rows on fsdp:4, heads on tensor:4); the validity mask (0.66 MB) is split by rows
    # only, so whole on tensor:4.
    assert 0 <= b["cache_per_device"] - b["cache_total"] / 4 < 1e6


def test_mesh_axis_that_does_not_divide_raises():
  family, config = shard_memory.resolve(shard_memory.MODELS["llava-next-7b"])
  state = shard_memory.abstract_state(family, config, jnp.bfloat16)
  with pytest.raises(ValueError, match=r"mesh axis tensor=3 does not divide"):
    shard_memory.param_bytes(state, shard_memory.abstract_mesh("tensor:3"))
  (row,) = shard_memory.memory_rows(["llava-next-7b"], ["tensor:3"])
  assert "tensor=3" in row["error"] and "params_per_device" not in row
  assert "error: mesh axis tensor=3" in shard_memory.table([row])
  with pytest.raises(ValueError, match="-1"):
    shard_memory.abstract_mesh("data:-1")


@pytest.mark.slow
def test_command_line():
  out = subprocess.run([sys.executable, "-m", "experiments.bench.shard_memory", "--models=llava-next-13b",
                        "--meshes=fsdp:4;tensor:3", "--batch=shard,8", "--capacity=1024"], capture_output=True,
                       text=True, check=True).stdout
  rows = [line for line in out.splitlines() if line.startswith("| llava-next-13b")]
  assert len(rows) == 2
  assert rows[0].startswith("| llava-next-13b | fsdp:4 | 4 | 26.70 | 6.68 | 4 |")
  assert "error: mesh axis tensor=3" in rows[1]
  assert "W = 1024 slots" in out
  from absl import flags  # pylint: disable=g-import-not-at-top
  assert "meshes" not in flags.FLAGS          # importing the module (as this test does) defines none
