"""models.sharding on 8 simulated CPU devices (tests/conftest.py): meshes, where each weight lives, and that every
mesh computes what one device computes.

References: the same checkpoint loaded on one device (no mesh) and run through the same entry points; the
layout of each weight is checked against the MaxText rules written out by hand; "no weight is gathered whole" is
read from the compiled HLO and from XLA's per-device memory analysis.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_factories as mf
from models import anyres
from models import llama
from models import loading
from models import pruning
from models import sharding

MESHES = ("data:8", "fsdp:8", "data:2,fsdp:2,tensor:2")   # rows, weights, and rows + weights + heads
B = 8
TOL = dict(rtol=1e-4, atol=1e-4)
pytestmark = pytest.mark.usefixtures("float32_matmul")


def _mesh(spec):
  sizes = sharding.parse_mesh(spec)
  return sharding.make_mesh(spec, jax.devices()[:int(np.prod(list(sizes.values())))])


@pytest.fixture(scope="module")
def next_path(tmp_path_factory):
  return mf.tiny_llava_next(tmp_path_factory.mktemp("next"))[1]


@pytest.fixture(scope="module")
def llava_path(tmp_path_factory):
  return mf.tiny_llava(tmp_path_factory.mktemp("llava"))[1]


def _rows(rng, counts):
  """Left-padded rows [text; image run; text] of random lengths: (ids int32[B, S], mask bool[B, S])."""
  pre, post = rng.randint(3, 10, len(counts)), rng.randint(5, 30, len(counts))
  ids, mask = mf.prompt_rows(rng, pre, counts, post)
  return ids.astype(np.int32), mask.astype(bool)


def _next_batch():
  rng = np.random.RandomState(0)
  sizes = [(50, 70), (100, 20), (28, 28), (56, 56), (30, 90), (70, 40), (20, 50), (60, 60)]
  counts = [anyres.num_image_features(s, mf.TINY_PINPOINTS, 28, 7) for s in sizes]
  ids, mask = _rows(rng, counts)
  return dict(input_ids=ids, attention_mask=mask, pixel_values=rng.randn(B, 5, 3, 28, 28).astype(np.float32),
              image_sizes=np.array(sizes, np.int32))


def _llava_batch():
  rng = np.random.RandomState(1)
  ids, mask = _rows(rng, [mf.NUM_PATCHES] * B)
  return dict(input_ids=ids, attention_mask=mask, pixel_values=rng.randn(B, 3, 28, 28).astype(np.float32))


def _outputs(model, family, batch):
  """A TOPS prefill (Stage I and two Stage II steps; its KV cache), the greedy tokens decoded from it, and a
  random-selection forward (per-row keys)."""
  tops = pruning.method_config("tops", family=family, target=10 if family == "llava-next" else 6, num_layers=3,
                               stage2_alpha=0.5, stage2_lam=0.5)
  rand = pruning.method_config("random", family=family, target=12, num_layers=3)
  args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch.get("image_sizes"))
  picked = pruning.forward(model, rand, *args, key=jax.random.key(3))
  start = pruning.prefill(model, tops, batch["input_ids"], batch["attention_mask"],
                          pixel_values=batch["pixel_values"], image_sizes=batch.get("image_sizes"),
                          max_new_tokens=4, key=jax.random.key(0))
  gen = pruning.decode(model, tops, start, max_new_tokens=4)
  return start.extra, picked, gen, start.cache         # extra: the prefill's PruneOutput (logits, kept indices)


def _stages(out):
  return ([] if out.stage1 is None else [out.stage1.kept]) + [s.kept for s in out.stage2]


@pytest.fixture(scope="module")
def one_device(next_path, llava_path):
  """Each family's batch and its outputs on one device (no mesh), computed once per module."""
  refs = {}

  def get(family):
    if family not in refs:
      path, batch = (next_path, _next_batch()) if family == "llava-next" else (llava_path, _llava_batch())
      refs[family] = path, batch, _outputs(loading.load_pretrained(path), family, batch)
    return refs[family]
  return get


# Each mesh on LLaVA-NeXT (anyres packing, the heavier layout; the mixed mesh splits heads over tensor as a
# tensor-only mesh would, with rows and weights split beside it); LLaVA-1.5 on the mixed mesh. One test per
# (family, mesh), so the workers share them.
@pytest.mark.slow
@pytest.mark.parametrize("family, spec", [("llava-next", m) for m in MESHES] +
                         [("llava-1.5", "data:2,fsdp:2,tensor:2")])
def test_every_mesh_computes_what_one_device_computes(family, spec, one_device):
  path, batch, ref = one_device(family)
  mesh = _mesh(spec)
  with jax.set_mesh(mesh):
    got = _outputs(loading.load_pretrained(path, mesh=mesh), family, batch)
  (pruned, picked, gen, cache), (rpruned, rpicked, rgen, rcache) = got, ref
  np.testing.assert_allclose(np.asarray(pruned.logits), np.asarray(rpruned.logits), **TOL, err_msg=spec)
  assert len(_stages(pruned)) == len(_stages(rpruned)) == 3       # Stage I and two Stage II steps
  for a, b in zip(_stages(pruned) + _stages(picked), _stages(rpruned) + _stages(rpicked)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=spec)
  np.testing.assert_array_equal(np.asarray(gen.tokens), np.asarray(rgen.tokens), err_msg=spec)
  np.testing.assert_allclose(np.asarray(cache.k), np.asarray(rcache.k), **TOL, err_msg=spec)
  # The outputs and the cache are split like the activations: rows over (data, fsdp), cache heads over tensor.
  sizes = sharding.parse_mesh(spec)
  rows = sizes["data"] * sizes["fsdp"]
  assert pruned.logits.addressable_shards[0].data.shape[0] == B // rows, spec
  k_shard = cache.k.addressable_shards[0].data.shape
  assert k_shard[1] == B // rows and k_shard[3] == cache.k.shape[3] // sizes["tensor"], (spec, k_shard)


@pytest.mark.parametrize("spec", ["fsdp:8", "data:8"])
def test_the_prefill_gathers_weights_only(spec, next_path):
  """The unpruned and a TOPS prefill keep every row's work on its device: each float all-gather of the partitioned
  program is a weight (FSDP: one layer's at a time), none the batch's image tokens, hidden states, KV cache or
  attention operands (the image merge, the cache write and the CPU attention loop once gathered them). Not yet
  with data and fsdp both > 1: the token-embedding lookup (table split by width over fsdp) gathers its width shard
  of every row's embeddings along the data axis."""
  batch = _next_batch()
  tops = pruning.method_config("tops", family="llava-next", target=10, num_layers=3, stage2_alpha=0.5,
                               stage2_lam=0.5)
  mesh = _mesh(spec)
  with jax.set_mesh(mesh):
    model = loading.load_pretrained(next_path, mesh=mesh)
    shapes = [tuple(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model))]
    weights = {tuple(sorted(s)) for s in shapes} | {tuple(sorted(s[1:])) for s in shapes if len(s) > 2}
    for config in (pruning.PruningConfig.full(), tops):
      fn, args, static = pruning.prefill_program(model, config, batch["input_ids"], batch["attention_mask"],
                                                 pixel_values=batch["pixel_values"],
                                                 image_sizes=batch["image_sizes"], max_new_tokens=4)
      hlo = fn.lower(*args, **static).compile().as_text()
      gathered = {tuple(sorted(int(d) for d in dims.split(","))) for dims in
                  re.findall(r"= f32\[([\d,]+)\][^\n]*? all-gather\(", hlo)}
      assert gathered <= weights, (spec, config.method, gathered - weights)


def _expected_shard(path: str, shape, sizes):
  """The MaxText layout written out by hand: which dimension each mesh axis splits."""
  fsdp, tensor = sizes["fsdp"], sizes["tensor"]
  out = list(shape)
  stacked = "/layers/" in path
  body = out[1:] if stacked else out
  if path.endswith("embed_tokens/embedding"):
    body[0] //= tensor; body[1] //= fsdp
  elif path.endswith("lm_head/kernel") or re.search(r"(q|k|v)_proj/kernel$", path) or \
      re.search(r"(gate_proj|up_proj|fc1|linear_1)/kernel$", path):
    body[0] //= fsdp; body[1] //= tensor
  elif re.search(r"(o|out)_proj/kernel$", path) or re.search(r"(down_proj|fc2|linear_2)/kernel$", path):
    body[0] //= tensor; body[1] //= fsdp
  elif re.search(r"(q|k|v)_proj/bias$", path) or re.search(r"(fc1|linear_1)/bias$", path):
    body[0] //= tensor
  elif path.endswith("patch_embedding/kernel"):
    body[3] //= fsdp
  elif path.endswith("position_embedding/embedding"):
    body[1] //= fsdp
  return tuple(out[:1] + body if stacked else body)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["fsdp:8", "tensor:2", "data:2,fsdp:2,tensor:2"])
def test_weights_are_partitioned_and_each_device_reads_only_its_shard(spec, next_path, monkeypatch):
  mesh = _mesh(spec)
  sizes = sharding.parse_mesh(spec)
  reads = []
  original = loading._Reader._tensor                       # pylint: disable=protected-access

  def spy(self, file, name, rule, index):
    out = original(self, file, name, rule, index)
    reads.append((name, out.size))
    return out

  monkeypatch.setattr(loading._Reader, "_tensor", spy)     # pylint: disable=protected-access
  model = loading.load_pretrained(next_path, mesh=mesh)
  split = 0
  for key, var in nnx.to_flat_state(nnx.state(model)):
    path = "/".join(str(k) for k in key)
    array = var.get_value()
    want = _expected_shard(path, array.shape, sizes)
    assert {s.data.shape for s in array.addressable_shards} == {want}, (path, array.sharding.spec)
    split += want != array.shape
  assert split >= 15                      # every matrix of the three parts
  # Every read is one device's slice of a checkpoint tensor: with fsdp:8 an MLP kernel is read in eighths.
  up = [n for name, n in reads if name.endswith("layers.0.mlp.up_proj.weight")]
  assert up and max(up) == 64 * 128 // (sizes["fsdp"] * sizes["tensor"])
  assert len(up) == sizes["fsdp"] * sizes["tensor"]        # once per distinct shard: replicas along data share it


@pytest.mark.slow
def test_no_weight_is_gathered_whole():
  """Tensor parallel never moves a weight; FSDP gathers one layer at a time inside the layer loop, never a stacked
  parameter: read from the optimized HLO's all-gathers and XLA's per-device memory (weights dominate this model)."""
  config = llama.TextConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=8, head_dim=32)
  make = lambda: llama.LlamaForCausalLM(config, rngs=nnx.Rngs(0))
  all_shapes = [tuple(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(nnx.eval_shape(make)))]
  shapes = set(all_shapes)
  stacked = {s for s in shapes if len(s) == 3}
  per_layer = {s[1:] for s in stacked} | (shapes - stacked)
  total = sum(int(np.prod(s)) * 4 for s in all_shapes)                       # float32 bytes of the model
  layer = sum(int(np.prod(s[1:])) * 4 for s in all_shapes if len(s) == 3)     # one layer's weights
  for spec in ("tensor:8", "fsdp:8"):
    mesh = sharding.make_mesh(spec)
    with jax.set_mesh(mesh):
      model = sharding.create_sharded(make, mesh)
      ids = sharding.put_batch(np.ones((8, 16), np.int32), mesh)
      compiled = jax.jit(lambda m, x: m(x).logits).lower(model, ids).compile()
    gathered = {tuple(int(d) for d in dims.split(",")) for dims in
                re.findall(r"= f32\[([\d,]+)\][^\n]*? all-gather\(", compiled.as_text())}
    memory = compiled.memory_analysis()
    shard_bytes = sum(v.addressable_shards[0].data.nbytes for v in jax.tree.leaves(nnx.state(model)))
    assert shard_bytes < total / 7, spec                                   # eighths, small vectors replicated
    assert memory.argument_size_in_bytes == shard_bytes + ids.addressable_shards[0].data.nbytes, spec
    assert not gathered & stacked, (spec, gathered)
    if spec == "tensor:8":
      assert not gathered & per_layer, gathered
      assert memory.temp_size_in_bytes < layer / 2, memory
    else:
      assert gathered & per_layer                                          # FSDP: weights of one layer at a time
      assert memory.temp_size_in_bytes < total / 2, (memory, total)


@pytest.mark.parametrize("text, match", [
    ("model:2", r"unknown axis 'model'.*data, fsdp, tensor"),
    ("data:2,data:4", r"axis 'data' is given twice"),
    ("data:two", r"axis data has size 'two'"),
    ("data:0", r"axis data has size 0"),
    ("data", r"must read axis:size"),
    ("data:-1,fsdp:-1", r"only one axis may be -1"),
])
def test_bad_mesh_text_names_the_axis(text, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(text)


def test_mesh_size_must_match_the_devices():
  with pytest.raises(ValueError, match=r"data 2 x fsdp 1 x tensor 2 has 4 devices, but 8 are available"):
    sharding.make_mesh("data:2,tensor:2")
  with pytest.raises(ValueError, match=r"other axes \(3 devices\) do not divide the 8 devices"):
    sharding.make_mesh("data:-1,tensor:3")
  assert dict(zip(*[sharding.make_mesh("data:-1,tensor:2").axis_names,
                    sharding.make_mesh("data:-1,tensor:2").axis_sizes])) == dict(data=4, fsdp=1, tensor=2)


@pytest.mark.slow
def test_an_axis_that_does_not_divide_a_weight_is_named(next_path):
  mesh = sharding.make_mesh("tensor:3", jax.devices()[:3])
  with pytest.raises(ValueError, match=r"mesh axis tensor=3 does not divide dimension 0 \('vocab', size 256\) of "
                                       r"language_model/embed_tokens/embedding \(shape \(256, 64\)\)"):
    loading.load_pretrained(next_path, mesh=mesh)


def test_a_parameter_without_a_layout_is_an_error():
  with pytest.raises(ValueError, match=r"parameter vision_tower/new_thing/kernel has no sharding layout"):
    sharding.logical_axes(("vision_tower", "new_thing", "kernel"), 2)
  with pytest.raises(ValueError, match=r"3 dimensions, but its layout \('embed', 'mlp'\)"):
    sharding.logical_axes(("mlp", "fc1", "kernel"), 3)


def test_put_batch_names_a_batch_that_does_not_split():
  with pytest.raises(ValueError, match=r"batch of 6 rows does not split over the mesh's data x fsdp = 4"):
    sharding.put_batch(np.zeros((6, 3)), sharding.make_mesh("data:2,fsdp:2,tensor:2"))


def test_constrain_is_a_no_op_without_a_mesh():
  x = jnp.ones((4, 3, 2))
  assert sharding.constrain(x, "batch", "seq", None) is x
