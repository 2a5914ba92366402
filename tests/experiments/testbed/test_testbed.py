"""Tests for the experiments.testbed package (model, batches, targets, heads, losses, evaluation, probes) and
models.saving: a tiny testbed-shaped LLaVA-NeXT learns, saves, reloads exactly through `models.load_pretrained`, and
gives transformers' logits when transformers loads the same directory."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

import models
from experiments import testbed
from experiments.synthvqa import scenes
from experiments.synthvqa import vqa
from experiments.testbed import batches
from experiments.testbed import evaluation
from experiments.testbed import heads as heads_lib
from experiments.testbed import losses
from experiments.testbed import model as testbed_model
from experiments.testbed import probes
from experiments.testbed import targets as targets_lib
from experiments.testbed import vocab
from models import pruning
from models import saving

TINY = dict(vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=16),
            text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2))
# XLA's LLVM backend at optimisation level 0: the tests' jitted programs compile in half the CPU time (60% of the wall
# time) and run a little slower, which the few calls of each do not notice.
FAST_COMPILE = dict(compiler_options={"xla_backend_optimization_level": 0})


def _init(make):
  """The module `make()` builds, its initialisers run as one compiled program (2 s of CPU for the model and heads
  here): run eagerly, each parameter shape compiles its own truncated-normal program (9 s)."""
  graphdef = nnx.graphdef(nnx.eval_shape(make))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()), **FAST_COMPILE)())


def _randomize(model, seed):
  """Re-draws every parameter (norm scales around 1, the rest N(0, 0.5/sqrt(fan_in))) so no weight sits at a trivial
  init and a transposed or dropped tensor shows in the numbers. NumPy draws: jax.random would compile a program per
  parameter shape."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  new = [1.0 + 0.1 * rng.normal(size=a.shape) if a.ndim == 1 else
         rng.normal(size=a.shape) * 0.5 / np.sqrt(a.shape[-2] if a.ndim >= 2 else 1.0)
         for a in leaves]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, [jnp.asarray(x, a.dtype) for x, a in zip(new, leaves)]))


@pytest.fixture(scope="module")
def hf():
  return testbed.hf_config(**TINY)


@pytest.fixture(scope="module")
def fresh(hf):
  """(model, heads): the testbed's initialisation (`make_model`, not re-drawn) and the auxiliary heads with the
  text-side ones. Tests read them and train copies of their state; none mutates them."""
  heads = _init(lambda: heads_lib.AuxHeads(hf["vision_config"]["hidden_size"], hf["text_config"]["hidden_size"],
                                           rngs=nnx.Rngs(1)))
  return _init(lambda: testbed.make_model(hf, seed=0)), heads


@pytest.fixture(scope="module")
def vision_only(hf):
  """Auxiliary heads without the text-side ones: the loss terms that read those raise."""
  return _init(lambda: heads_lib.AuxHeads(hf["vision_config"]["hidden_size"], rngs=nnx.Rngs(1)))


@pytest.fixture(scope="module")
def model(fresh):
  return _randomize(fresh[0], seed=1)


@pytest.fixture(scope="module")
def processor(hf):
  return testbed.make_processor(hf)


@pytest.fixture(scope="module")
def examples():
  """Test examples covering every benchmark image size (so every crop grid and unpad case is exercised)."""
  pool = vqa.make_split("test", 40, seed=0)
  picked, seen = [], set()
  for ex in pool:
    if ex.image.shape not in seen:
      seen.add(ex.image.shape)
      picked.append(ex)
  assert len(seen) == len(scenes.SceneConfig().image_sizes)
  return picked


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model, hf, processor):
  tok = tmp_path_factory.mktemp("processor")
  processor.save_pretrained(tok)
  return saving.save_pretrained(model, hf, tmp_path_factory.mktemp("ckpt"), tokenizer_dir=tok)


# Ops run eagerly are compiled once per shape, the bulk of these tests' time: the tests that run the model eagerly all
# use batches of 5 (`examples`, `train_batch`, the probe's), so most of the forward's ops compile once for the module.
@pytest.fixture(scope="module")
def train_batch(hf, processor):
  """A training batch (numpy) of 5 examples: two spatial, two counting (different answers), one attribute. The
  relation and order terms have spatial rows to read and others to mask out, the count terms counting rows and
  others; masked means run over two rows, not one, so a sum in place of a mean shows."""
  pool = vqa.make_split("train", 20, seed=4)
  picked = [ex for family, n in (("spatial", 2), ("counting", 2), ("attribute", 1))
            for ex in [e for e in pool if e.family == family][:n]]
  return batches.encode(picked, processor, hf, with_answer=True, labels=True)


LOSS_WEIGHTS = losses.LossWeights(grounding=1.0, caption=0.5, count=1.0, position=1.0, relation=1.0)


@pytest.fixture(scope="module")
def loss_and_grad(fresh):
  """jit(value_and_grad) of `loss_fn` with LOSS_WEIGHTS over params = (model state, heads state), train_vision
  static: test_loss_goes_down and test_frozen_tower_gets_no_gradient share its train_vision=True program."""
  graphdefs = (nnx.graphdef(fresh[0]), nnx.graphdef(fresh[1]))

  @functools.partial(jax.jit, static_argnames="train_vision", **FAST_COMPILE)
  def fn(params, batch, train_vision):
    def objective(p):
      return losses.loss_fn(nnx.merge(graphdefs[0], p[0]), nnx.merge(graphdefs[1], p[1]), batch, LOSS_WEIGHTS,
                            train_vision=train_vision)
    return jax.value_and_grad(objective, has_aux=True)(params)
  return fn


def _jnp(batch):
  return {k: (v if k == "layout" else jnp.asarray(v)) for k, v in batch.items()}


def test_config_is_valid_for_both_libraries():
  hf = testbed.hf_config()
  config = transformers.LlavaNextConfig(**{k: v for k, v in hf.items() if k != "architectures"})
  assert config.text_config.num_hidden_layers == 4 and config.vision_config.image_size == vocab.CROP_SIZE
  assert pruning.tops_layers(config.text_config.num_hidden_layers) == (2, 3)
  assert len(set(pruning.tops_layers(config.text_config.num_hidden_layers))) == 2


@pytest.mark.slow
def test_loss_goes_down(fresh, train_batch, loss_and_grad):
  params = (nnx.state(fresh[0]), nnx.state(fresh[1]))
  batch = _jnp(train_batch)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @functools.partial(jax.jit, **FAST_COMPILE)
  def update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  total, answer = [], []
  for _ in range(8):
    (loss, metrics), grads = loss_and_grad(params, batch, train_vision=True)
    params, opt_state = update(grads, opt_state, params)
    total.append(float(loss))
    answer.append(float(metrics["answer_loss"]))
  assert np.all(np.isfinite(total))
  assert total[-1] < 0.8 * total[0], total
  assert answer[-1] < answer[0], answer


def test_encode_shapes_targets_and_labels(hf, processor, examples):
  batch = batches.encode(examples, processor, hf, with_answer=True, labels=True)
  b, s = batch["input_ids"].shape
  assert s == testbed_model.seq_len(hf) and b == len(examples)
  words = vocab.words()
  for i, ex in enumerate(examples):
    n = int(batch["attention_mask"][i].sum())
    assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
    ids = batch["input_ids"][i]
    assert int((ids == testbed.IMAGE_TOKEN_ID).sum()) == int(batch["layout"].counts[i])
    assert [words[t] for t in batch["targets"][i]] == [ex.answer, vocab.EOS]
    np.testing.assert_array_equal(ids[batch["target_positions"][i] + 1], batch["targets"][i])
    assert batch["last"][i] == n - 1
    assert batch["crop_valid"][i].sum() == 1 + batch["layout"].grid[i].prod()


def test_grounding_targets_name_the_right_objects(hf, processor):
  examples = vqa.make_split("train", 30, seed=1)
  batch = batches.encode(examples, processor, hf, with_answer=True, labels=True)
  words = vocab.words()
  plural = {v: k for k, v in vqa.PLURALS.items()}
  for i, ex in enumerate(examples):
    ids = batch["input_ids"][i]
    queries, evidence = batch["grounding_queries"][i], batch["grounding_evidence"][i]
    assert queries[-1] == batch["target_positions"][i, 0]
    question = [words[t] for t in ids[:int(batch["last"][i]) - 1]]
    named = [(j, w) for j, w in enumerate(question) if w in scenes.COLORS or w in scenes.SHAPES or w in plural
             or w == "objects"]
    # Every labelled patch survives packing (unpadding only cuts the processor's padding), so a query's evidence
    # tokens are exactly the patches whose owner it names.
    owners = batch["patch_labels"][i, ..., 4][batch["crop_valid"][i]]
    for k in range(len(queries) - 1):
      if k >= len(named):
        assert not evidence[k].any()
        continue
      j, w = named[k]
      assert queries[k] == j
      objects = [n for n, o in enumerate(ex.scene.objects)
                 if w == "objects" or o.color == w or o.shape == w or o.shape == plural.get(w)]
      assert evidence[k].sum() == int(np.isin(owners, objects).sum()), (ex.question, w)
      assert np.all(ids[evidence[k]] == testbed.IMAGE_TOKEN_ID)
    assert evidence[-1].sum() == int(np.isin(owners, ex.evidence).sum())
    assert evidence[-1].any() == bool(ex.evidence)


def test_caption_targets_name_the_object_under_each_image_token(hf, processor):
  examples = vqa.make_split("train", 20, seed=2)
  batch = batches.encode(examples, processor, hf, with_answer=True, labels=True)
  words = vocab.words()
  for i, ex in enumerate(examples):
    targets = batch["caption_targets"][i]
    image = batch["input_ids"][i] == testbed.IMAGE_TOKEN_ID
    assert (targets[~image] == -1).all()                     # text and padding never get a caption
    labelled = targets[:, 0] >= 0
    assert labelled.any() and (labelled == (targets[:, 1] >= 0)).all()
    objects = {(o.color, o.shape) for o in ex.scene.objects}
    assert {(words[c], words[s]) for c, s in targets[labelled]} <= objects
    # the tokens of the evidence objects for the answer position are among the labelled ones and name them
    evidence = batch["grounding_evidence"][i, -1]
    assert labelled[evidence].all()
    named = {(ex.scene.objects[k].color, ex.scene.objects[k].shape) for k in ex.evidence}
    assert {(words[c], words[s]) for c, s in targets[evidence]} <= named


def test_answer_heads_and_count_targets(hf, processor):
  """Spatial rows: head 0 sees the first named object and head 1 the second, on base-crop tokens (the base crop is
  rows 0..35 of the pack), no counting target. Other rows: both heads see every evidence token; the counting
  target puts count_sink units of mass on "<s>" and one on each evidence object's base-crop centre token (a patch
  labelled centre)."""
  examples = vqa.make_split("train", 60, seed=4)
  for base_only, sink in ((False, 1.0), (True, 5.0)):
    batch = batches.encode(examples, processor, hf, with_answer=True, labels=True, base_only=base_only,
                           count_sink=sink)
    t = (hf["vision_config"]["image_size"] // hf["vision_config"]["patch_size"]) ** 2
    for i, ex in enumerate(examples):
      ids, heads, target = batch["input_ids"][i], batch["head_evidence"][i], batch["count_target"][i]
      first = int(np.flatnonzero(ids == testbed.IMAGE_TOKEN_ID)[0])
      rows = np.full(ids.shape, -1)
      count = int(batch["layout"].counts[i])
      rows[first:first + count] = batch["layout"].source[i, :count]
      owner = np.full(ids.shape, -1)
      image = rows >= 0
      owner[image] = batch["patch_labels"][i, rows[image] // t, rows[image] % t, 4]
      if ex.family == "spatial":
        assert not target.any()
        for k in range(2):
          assert heads[k].any() and np.all((rows[heads[k]] >= 0) & (rows[heads[k]] < t))
          others = owner[heads[k]][owner[heads[k]] >= 0]
          assert set(others.tolist()) <= {ex.evidence[k]}, (ex.question, k)
        assert not (heads[0] & heads[1]).any()
        continue
      np.testing.assert_array_equal(heads[0], heads[1])
      np.testing.assert_array_equal(heads[0], image & np.isin(owner, ex.evidence))
      np.testing.assert_allclose(target.sum(), 1.0, rtol=1e-6)
      marked = np.flatnonzero(target[1:]) + 1
      assert np.all(rows[marked] >= 0) and np.all(rows[marked] < t)
      assert np.all(batch["patch_labels"][i, 0, rows[marked], 2] == 1)
      unit = target[0] / sink                                         # the mass of one object
      weights = np.round(target[marked] / unit).astype(int)           # objects per centre token (>1: shared)
      np.testing.assert_allclose(target[marked], weights * unit, rtol=1e-5)
      np.testing.assert_allclose(target[0], sink / (sink + len(ex.evidence)), rtol=1e-5)
      assert weights.sum() == len(ex.evidence), (ex.question, ex.evidence)
      assert ex.family != "existence" or ex.answer == "yes" or len(marked) == 0


@pytest.mark.slow
def test_base_only_view_equals_keeping_the_base_rows(model, processor, hf, examples):
  """encode(base_only=True) (the short training phase's cheap view) is the same model input as Stage I keeping
  exactly the base crop's 36 rows, so the two give the same answer logits."""
  short = batches.encode(examples, processor, hf, with_answer=True, labels=True, base_only=True)
  full = batches.encode(examples, processor, hf, with_answer=True, labels=True)
  t = (hf["vision_config"]["image_size"] // hf["vision_config"]["patch_size"]) ** 2
  assert short["input_ids"].shape[1] < full["input_ids"].shape[1] and short["pixel_values"].shape[1] == 1
  assert np.all((short["input_ids"] == testbed.IMAGE_TOKEN_ID).sum(1) == t)
  kept = dict(full, keep_index=np.tile(np.arange(t, dtype=np.int32), (len(examples), 1)),
              keep_valid=np.ones((len(examples), t), bool))
  kept["input_ids"] = np.zeros_like(full["input_ids"])
  kept["attention_mask"] = np.zeros_like(full["attention_mask"])
  n = short["input_ids"].shape[1]
  kept["input_ids"][:, :n], kept["attention_mask"][:, :n] = short["input_ids"], short["attention_mask"]
  np.testing.assert_array_equal(short["target_positions"],
                                full["target_positions"] - (full["layout"].counts - t)[:, None])
  forward = jax.jit(testbed_model.forward, **FAST_COMPILE)    # the two shapes are new to the module: compiled whole
  got = forward(model, _jnp(short), jnp.asarray(short["target_positions"])).logits
  want = forward(model, _jnp(kept), jnp.asarray(short["target_positions"])).logits
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-4)
  with pytest.raises(ValueError, match="base_only and keep_fraction"):
    batches.encode(examples, processor, hf, base_only=True, keep_fraction=0.5)


@pytest.mark.slow
def test_forward_residuals_are_the_stream_the_logits_come_from(model, processor, hf, examples):
  batch = _jnp(batches.encode(examples, processor, hf, with_answer=True))
  at = jnp.asarray(batch["target_positions"])                                   # text positions: ":" and the answer
  out = testbed_model.forward(model, batch, at, residual_positions=at)
  layers, width = model.config.text.num_hidden_layers, model.config.text.hidden_size
  assert out.residuals.shape == (layers + 1, len(examples), at.shape[1], width)
  np.testing.assert_allclose(np.asarray(model.head(out.residuals[-1])), np.asarray(out.logits), rtol=0, atol=1e-5)
  ids = jnp.take_along_axis(batch["input_ids"], at, axis=1)
  np.testing.assert_allclose(np.asarray(out.residuals[0]), np.asarray(model.language_model.embed(ids)), rtol=0,
                             atol=1e-6)
  assert not np.allclose(np.asarray(out.residuals[1]), np.asarray(out.residuals[0]), atol=1e-3)
  everywhere = testbed_model.forward(model, batch, None, residual_positions=at[:, :1])  # all logits, one position
  np.testing.assert_allclose(np.asarray(everywhere.residuals), np.asarray(out.residuals[:, :, :1]), rtol=0, atol=1e-5)


def test_count_loss_matches_numpy():
  rng = np.random.default_rng(0)
  attention = rng.dirichlet(np.ones(9), size=4).astype(np.float32)
  target = np.zeros((4, 9), np.float32)
  target[0, [0, 3]] = 0.5
  target[1, 0] = 1.0
  target[3, [0, 2, 5]] = [0.25, 0.5, 0.25]         # row 2 has no target and is ignored
  want = np.mean([-(target[r] * np.log(attention[r] + 1e-6)).sum() for r in (0, 1, 3)])
  np.testing.assert_allclose(float(losses.count_loss(jnp.asarray(attention), jnp.asarray(target))), want, rtol=1e-5)
  assert float(losses.count_loss(jnp.asarray(target[[1]] * 0.999 + 1e-4), jnp.asarray(target[[1]]))) < 0.01


@pytest.mark.slow
def test_frozen_tower_gets_no_gradient(fresh, train_batch, loss_and_grad):
  params = (nnx.state(fresh[0]), nnx.state(fresh[1]))
  batch = _jnp(train_batch)
  norm = lambda tree: sum(float(np.sum(np.square(a))) for a in jax.tree.leaves(tree))
  frozen, trained = (loss_and_grad(params, batch, train_vision=v)[1][0] for v in (False, True))
  assert norm(frozen["vision_tower"]) == 0.0 and norm(trained["vision_tower"]) > 0.0
  assert norm(frozen["multi_modal_projector"]) > 0.0 and norm(frozen["language_model"]) > 0.0


@pytest.mark.slow
def test_position_targets_and_loss(fresh, vision_only, train_batch):
  target = losses.position_targets(36)
  assert target.shape == (36, 2)
  np.testing.assert_allclose(target[0], [1 / 12, 1 / 12])
  np.testing.assert_allclose(target[7], [3 / 12, 3 / 12])       # row 1, column 1
  np.testing.assert_allclose(target[11], [3 / 12, 11 / 12])     # row 1, column 5
  with pytest.raises(ValueError, match="square patch grid"):
    losses.position_targets(35)
  head = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  head.kernel[...], head.bias[...] = jnp.eye(2), jnp.zeros(2)
  tokens = jnp.broadcast_to(jnp.asarray(target), (3, 36, 2))
  assert float(losses.position_loss(head, tokens)) == 0.0
  shift = np.array([0.1, -0.2], np.float32)
  np.testing.assert_allclose(float(losses.position_loss(head, tokens + shift)), np.sum(shift ** 2), rtol=1e-5)
  # loss_fn needs the projector-side head for the term
  model, both = fresh
  batch = _jnp(train_batch)
  with pytest.raises(ValueError, match="text_width"):
    losses.loss_fn(model, vision_only, batch, losses.LossWeights(position=1.0))
  assert float(losses.loss_fn(model, both, batch, losses.LossWeights(position=1.0))[1]["position"]) > 0.0


@pytest.mark.slow
def test_relation_targets_and_loss(hf, processor, fresh, vision_only, train_batch):
  examples = vqa.make_split("train", 10, seed=4)
  batch = batches.encode(examples, processor, hf, with_answer=True, labels=True)
  for i, ex in enumerate(examples):
    assert batch["relation_valid"][i] == (ex.family == "spatial")
    if ex.family != "spatial":
      assert not batch["relation_target"][i].any() and not batch["order_target"][i].any()
      assert not batch["direction_evidence"][i].any()
      continue
    a, b = (ex.scene.objects[j] for j in ex.evidence[:2])
    row_a, col_a, row_b, col_b = batch["relation_target"][i] * np.tile([ex.scene.height, ex.scene.width], 2)
    np.testing.assert_allclose([row_a, col_a, row_b, col_b], [a.cy + 0.5, a.cx + 0.5, b.cy + 0.5, b.cx + 0.5],
                               rtol=1e-5)
    # the target agrees with the asked relation: "yes" iff it holds between the two centres
    holds = {"left": col_a < col_b, "right": col_a > col_b, "above": row_a < row_b, "below": row_a > row_b}[ex.subtype]
    assert holds == (ex.answer == "yes")
    marked = np.flatnonzero(batch["direction_evidence"][i])
    assert len(marked) == 1 and vocab.words()[batch["input_ids"][i, marked[0]]] == ex.subtype
    assert marked[0] < batch["target_positions"][i, 0]
    first, second = batch["order_target"][i]
    assert (first < second) == (ex.answer == "yes")
    axis = 1 if ex.subtype in ("left", "right") else 0
    flip = ex.subtype in ("right", "below")
    np.testing.assert_allclose(batch["order_target"][i],
                               np.abs(flip - batch["relation_target"][i, [axis, 2 + axis]]), rtol=1e-6)
  assert batch["relation_valid"].any() and not batch["relation_valid"].all()
  # the loss terms, on the shared training batch: two spatial rows and three others
  batch = train_batch
  assert batch["relation_valid"].sum() == 2 and batch["direction_evidence"][batch["relation_valid"]].any(-1).all()
  model, heads = fresh
  with pytest.raises(ValueError, match="text_width"):
    losses.loss_fn(model, vision_only, _jnp(batch), losses.LossWeights(relation=1.0))
  _, metrics = losses.loss_fn(model, heads, _jnp(batch), losses.LossWeights(relation=1.0))
  residual = testbed_model.forward(
      model, _jnp(batch), None, residual_positions=jnp.asarray(batch["target_positions"][:, :1])).residuals[-2][:, 0]
  err = np.mean((np.asarray(heads.relation(residual)) - batch["relation_target"]) ** 2, -1)
  np.testing.assert_allclose(float(metrics["relation"]), err[batch["relation_valid"]].mean(), rtol=1e-4)
  assert "relation" not in losses.loss_fn(model, heads, _jnp(batch))[1]
  _, metrics = losses.loss_fn(model, heads, _jnp(batch), losses.LossWeights(order=1.0))
  err = np.mean((np.asarray(heads.order(residual)) - batch["order_target"]) ** 2, -1)
  np.testing.assert_allclose(float(metrics["order"]), err[batch["relation_valid"]].mean(), rtol=1e-4)
  assert "relation" not in metrics
  _, metrics = losses.loss_fn(model, heads, _jnp(batch), losses.LossWeights(direction=1.0))
  layer = losses.grounding_layers(hf["text_config"]["num_hidden_layers"])[0]
  probs = testbed_model.forward(model, _jnp(batch), None, attention_layers=(layer,),
                                attention_queries=jnp.asarray(batch["target_positions"][:, :1])).attention[0, :, 1, 0]
  mass = np.sum(np.where(batch["direction_evidence"], np.asarray(probs), 0.0), -1)    # head 1, answer position
  np.testing.assert_allclose(float(metrics["direction"]), np.mean(-np.log(mass[batch["relation_valid"]] + 1e-6)),
                             rtol=1e-4)


@pytest.mark.slow
def test_count_readout_target_and_loss(hf, processor, fresh, vision_only, train_batch):
  """count_value is a counting question's answer n as n / 6 (its evidence lists the n counted objects), only on
  counting rows; the count_read term is the masked squared error of heads.count read where the relation term
  reads."""
  examples = vqa.make_split("train", 40, seed=5)
  batch = batches.encode(examples, processor, hf, with_answer=True, labels=True)
  counting = np.array([ex.family == "counting" for ex in examples])
  np.testing.assert_array_equal(batch["count_valid"], counting)
  expected = [vqa.NUMBER_WORDS.index(ex.answer) / 6 if ex.family == "counting" else 0.0 for ex in examples]
  np.testing.assert_allclose(batch["count_value"], expected, rtol=1e-6)
  assert len(set(np.round(batch["count_value"][counting] * 6).tolist())) > 2
  # the loss terms, on the shared training batch: two counting rows with different answers and three others, of
  # which one (attribute) has a counting-head target too
  batch = train_batch
  counting = batch["count_valid"]
  assert counting.sum() == 2 and len(set(batch["count_value"][counting].tolist())) == 2
  assert (batch["count_target"].sum(-1) > 0).sum() == 3
  model, heads = fresh
  _, metrics = losses.loss_fn(model, heads, _jnp(batch), losses.LossWeights(count_read=1.0))
  residual = testbed_model.forward(
      model, _jnp(batch), None, residual_positions=jnp.asarray(batch["target_positions"][:, :1])).residuals[-2][:, 0]
  err = (np.asarray(heads.count(residual))[:, 0] - batch["count_value"]) ** 2
  np.testing.assert_allclose(float(metrics["count_read"]), err[counting].mean(), rtol=1e-4)
  assert "count_read" not in losses.loss_fn(model, heads, _jnp(batch))[1]
  with pytest.raises(ValueError, match="weights.count_read"):
    losses.loss_fn(model, vision_only, _jnp(batch), losses.LossWeights(count_read=1.0))
  # count_heads=2: the counting term is the mean over head 2 of the middle and of the last grounded layer (TINY has 3
  # decoder layers: layers 1 and 2)
  assert losses.grounding_layers(hf["text_config"]["num_hidden_layers"])[1:] == (1, 2)
  probs = testbed_model.forward(model, _jnp(batch), None, attention_layers=(1, 2),
                                attention_queries=jnp.asarray(batch["grounding_queries"])).attention[:, :, 2, -1]
  per_head = [float(losses.count_loss(p, jnp.asarray(batch["count_target"]))) for p in probs]
  for heads_used in (1, 2):
    _, metrics = losses.loss_fn(model, heads, _jnp(batch), losses.LossWeights(count=1.0), count_heads=heads_used)
    np.testing.assert_allclose(float(metrics["count"]), np.mean(per_head[:heads_used]), rtol=1e-4)
  assert abs(per_head[0] - per_head[1]) > 1e-4
  with pytest.raises(ValueError, match="count_heads must be 1 or 2, got 3"):
    losses.loss_fn(model, heads, _jnp(batch), losses.LossWeights(count=1.0), count_heads=3)


def test_dot_head_evidence_is_the_dot_token(hf, processor):
  """With dot_head, a detail row's head 1 looks at one grid-crop token of the named object, labelled with the dot in
  the answer's colour; head 0 and every other row keep their evidence, and the base-only view is unchanged."""
  examples = vqa.make_split("train", 30, seed=6, weights={"detail": 2.0, "attribute": 1.0, "counting": 1.0})
  t = (hf["vision_config"]["image_size"] // hf["vision_config"]["patch_size"]) ** 2
  plain = batches.encode(examples, processor, hf, with_answer=True, labels=True)
  dot = batches.encode(examples, processor, hf, with_answer=True, labels=True, dot_head=True)
  detail = np.array([ex.family == "detail" for ex in examples])
  assert detail.sum() == 15
  np.testing.assert_array_equal(dot["head_evidence"][~detail], plain["head_evidence"][~detail])
  np.testing.assert_array_equal(dot["head_evidence"][:, 0], plain["head_evidence"][:, 0])
  for i in np.flatnonzero(detail):
    marked = np.flatnonzero(dot["head_evidence"][i, 1])
    assert len(marked) == 1 and plain["head_evidence"][i, 1, marked[0]]       # one token of the named object
    first = int(np.flatnonzero(dot["input_ids"][i] == testbed.IMAGE_TOKEN_ID)[0])
    row = dot["layout"].source[i, marked[0] - first]
    assert row >= t                                                            # a grid crop, not the base crop
    label = dot["patch_labels"][i, row // t, row % t]
    assert label[3] == 1 + scenes.COLORS.index(examples[i].answer) and label[2] == 1
  base = [batches.encode(examples, processor, hf, with_answer=True, labels=True, base_only=True, dot_head=d)
          for d in (False, True)]
  np.testing.assert_array_equal(base[0]["head_evidence"], base[1]["head_evidence"])


def test_patch_labels_agree_with_the_processed_pixels(hf, processor):
  """Read back from the processor's grid crops (the image at full scale): a patch that is mostly one object colour is
  labelled with it, a patch without any colour is background, every object owns a patch, and each centre patch's
  8x8 block shows the object's colour."""
  rng = np.random.default_rng(0)
  config = scenes.SceneConfig(backgrounds=("plain",))
  nominal = np.array([scenes.COLOR_RGB[c] for c in scenes.COLORS], np.float32)
  mean, std = np.array(processor.image_processor.image_mean), np.array(processor.image_processor.image_std)
  for size in config.image_sizes:
    specs = [scenes.ObjectSpec(s, c) for s, c in zip(["square", "circle", "diamond"], ["red", "blue", "green"])]
    scene = scenes.sample_scene(rng, specs, config, image_size=size)
    px = processor.image_processor(images=[scenes.render(scene)], return_tensors="np")["pixel_values"][0]
    rgb = (px.transpose(0, 2, 3, 1) * std + mean) * 255                       # [P, 48, 48, 3]
    labels, crop_valid = targets_lib.patch_labels(scene, hf)
    assert crop_valid.sum() == px.shape[0]
    owned = set()
    for p in range(1, px.shape[0]):
      for t in range(36):
        block = rgb[p, (t // 6) * 8:(t // 6) * 8 + 8, (t % 6) * 8:(t % 6) * 8 + 8].reshape(-1, 3)
        coloured = block[np.ptp(block, axis=-1) > 60]
        if len(coloured) == 0:
          assert labels[p, t, 0] == 0, (size, p, t)
        names = 1 + np.argmin(np.abs(nominal[None] - coloured[:, None]).sum(-1), axis=-1)
        if len(coloured) >= 32 and len(set(names)) == 1:
          assert labels[p, t, 0] == names[0], (size, p, t)
        if labels[p, t, 0]:
          owned.add((labels[p, t, 0], labels[p, t, 1]))
          obj = scene.objects[labels[p, t, 4]]
          assert (labels[p, t, 0], labels[p, t, 1]) == (1 + scenes.COLORS.index(obj.color),
                                                          1 + scenes.SHAPES.index(obj.shape))
        if labels[p, t, 2]:
          assert np.abs(block - nominal[labels[p, t, 0] - 1]).sum(-1).min() < 40, (size, p, t)
          assert labels[p, t, 3] == 0                                           # no dots in this scene
    assert owned == {(1 + scenes.COLORS.index(o.color), 1 + scenes.SHAPES.index(o.shape)) for o in scene.objects}
    assert labels[:, :, 2].sum() == 2 * len(scene.objects)                      # one centre in base, one in grid
    assert (labels[~crop_valid] == np.array([0, 0, 0, -1, -1])).all()


@pytest.mark.slow
def test_save_load_round_trip_is_exact(ckpt, model):
  loaded = models.load_pretrained(ckpt)
  assert type(loaded) is type(model) and loaded.config == model.config
  want = nnx.to_flat_state(nnx.state(model))
  got = dict(nnx.to_flat_state(nnx.state(loaded)))
  assert len(got) == len(want)
  for key, var in want:
    np.testing.assert_array_equal(np.asarray(got[key].get_value()), np.asarray(var.get_value()), err_msg=str(key))


@pytest.mark.slow
def test_transformers_loads_the_checkpoint_with_the_same_logits(ckpt, model, processor, hf, examples):
  torch_model, info = transformers.LlavaNextForConditionalGeneration.from_pretrained(
      ckpt, attn_implementation="eager", output_loading_info=True)
  assert not any(info.values()), info
  torch_model.eval()
  batch = batches.encode(examples, processor, hf)
  with torch.no_grad():
    want = torch_model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                       attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
                       pixel_values=torch.tensor(batch["pixel_values"]),
                       image_sizes=torch.tensor(batch["image_sizes"], dtype=torch.long)).logits.numpy()
  with jax.default_matmul_precision("float32"):
    got = model(input_ids=jnp.asarray(batch["input_ids"]), pixel_values=jnp.asarray(batch["pixel_values"]),
                attention_mask=jnp.asarray(batch["attention_mask"]), image_sizes=batch["image_sizes"],
                all_logits=True).logits
    last = testbed_model.forward(model, _jnp(batch), jnp.asarray(batch["last"])[:, None])[0][:, 0]
  real = batch["attention_mask"]
  np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=0, atol=1e-4)
  rows = np.arange(len(examples))
  np.testing.assert_allclose(np.asarray(last), want[rows, batch["last"]], rtol=0, atol=1e-4)
  # evaluate() answers like transformers' greedy first token (3 examples per batch: the last batch is padded).
  _, predictions = evaluation.evaluate(model, examples, batch_size=3, processor=processor, return_predictions=True)
  assert predictions == [vocab.words()[t] for t in want[rows, batch["last"]].argmax(-1)]


@pytest.mark.slow
def test_random_keep_merges_the_chosen_rows(model, processor, hf, examples):
  full = batches.encode(examples, processor, hf)
  pruned = batches.encode(examples, processor, hf, keep_fraction=0.056, seed=3)
  layout = full["layout"]
  packed = np.asarray(model(input_ids=jnp.asarray(full["input_ids"]), pixel_values=jnp.asarray(full["pixel_values"]),
                            attention_mask=jnp.asarray(full["attention_mask"]),
                            image_sizes=full["image_sizes"]).packed_embeds)
  table = np.asarray(model.language_model.embed_tokens.embedding[...])
  x = np.zeros((len(examples), pruned["input_ids"].shape[1], table.shape[1]), np.float32)
  for i in range(len(examples)):
    visual = np.flatnonzero(layout.valid[i] & ~layout.newline[i])
    k = int(pruned["keep_valid"][i].sum())
    assert k == round(0.056 * len(visual)) and pruned["keep_valid"][i, :k].all()
    kept = pruned["keep_index"][i, :k]
    assert np.all(np.diff(kept) > 0) and set(kept) <= set(visual)
    ids = pruned["input_ids"][i]
    n = int(pruned["attention_mask"][i].sum())
    assert int((ids == testbed.IMAGE_TOKEN_ID).sum()) == k
    assert n == int(full["attention_mask"][i].sum()) - int(layout.counts[i]) + k
    x[i] = table[ids]
    x[i, ids == testbed.IMAGE_TOKEN_ID] = packed[i, kept]
  lm = model.language_model
  mask = jnp.asarray(pruned["attention_mask"])
  seg = lm.run_layers(jnp.asarray(x), jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]), mask)
  want = np.asarray(model.head(seg.hidden))[np.arange(len(examples)), pruned["last"]]
  got = testbed_model.forward(model, _jnp(pruned), jnp.asarray(pruned["last"])[:, None])[0][:, 0]
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_bad_inputs_raise(model, hf, processor, examples, tmp_path):
  with pytest.raises(ValueError, match="at least one example"):
    batches.encode([], processor, hf)
  with pytest.raises(ValueError, match="keep_fraction"):
    batches.encode(examples, processor, hf, keep_fraction=0.0)
  with pytest.raises(ValueError, match="count_sink"):
    batches.encode(examples, processor, hf, with_answer=True, labels=True, count_sink=0.0)
  with pytest.raises(ValueError, match="batch_size"):
    evaluation.evaluate(model, examples, batch_size=0, processor=processor)
  with pytest.raises(ValueError, match="does not match the model's config"):
    saving.save_pretrained(model, testbed.hf_config(), tmp_path / "a")
  with pytest.raises(ValueError, match="unknown model_type"):
    saving.save_pretrained(model, dict(hf, model_type="gpt2"), tmp_path / "b")
  with pytest.raises(ValueError, match="tokenizer_dir"):
    saving.save_pretrained(model, hf, tmp_path / "c", tokenizer_dir=tmp_path / "missing")


@pytest.mark.slow
def test_shipped_checkpoint_is_the_default_recipe_and_answers_from_the_image():
  """The committed experiments/testbed_ckpt has the default architecture, and its answers depend on the image:
  on the same questions it does much better with all visual tokens than with none of the objects visible (every
  image replaced by a blank one of the same size)."""
  with open(f"{testbed.DEFAULT_CKPT}/config.json") as f:
    shipped = json.load(f)
  expected = testbed.hf_config()
  for section in ("vision_config", "text_config"):
    for key, value in expected[section].items():
      assert shipped[section][key] == value, (section, key)
  model = models.load_pretrained(testbed.DEFAULT_CKPT)
  examples = vqa.make_split("test", 96, seed=0)
  blank = [dataclasses.replace(ex, image=np.full_like(ex.image, 128)) for ex in examples]
  seen = evaluation.evaluate(model, examples, batch_size=32)["all"]
  unseen = evaluation.evaluate(model, blank, batch_size=32)["all"]
  assert seen > unseen + 0.15, (seen, unseen)


def test_probe_ridge_recovers_planted_signals_and_not_noise():
  """The probes of experiments.testbed.probes: a linear signal is read back (R^2 ~ 1, accuracy ~ 1), noise is not."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(800, 24))
  w = rng.normal(size=(24, 2))
  assert probes.held_out_r2(x, x @ w + 0.01 * rng.normal(size=(800, 2)), ridge=1e-3) > 0.99
  assert probes.held_out_r2(x, rng.normal(size=(800, 2)), ridge=1e-3) < 0.1
  assert probes.held_out_accuracy(x, x @ w[:, 0] > 0.3, ridge=1e-3) > 0.9  # least squares, not max-margin
  assert 0.35 < probes.held_out_accuracy(x, rng.random(800) < 0.5, ridge=1e-3) < 0.65
  with pytest.raises(ValueError, match="same N"):
    probes.ridge_fit(x, x[:10, 0], ridge=1.0)


@pytest.mark.slow
def test_probe_runs_on_spatial_questions_and_rejects_others(model):
  spatial = vqa.make_split("validation", 25, seed=0, weights={f: float(f == "spatial") for f in vqa.FAMILIES})
  result = probes.probe(model, spatial, batch_size=5)
  masses = [v for k, v in result.items() if k.startswith("evidence_mass")]
  assert len(masses) == 4 and all(0.0 <= m <= 1.0 for m in masses), result
  assert {"position_r2_tower", "position_r2_projected"} <= set(result) and result["position_r2_tower"] <= 1.0
  assert any(k.startswith("relation_accuracy") for k in result), result
  layers = {k.split("_layer")[1].split("_")[0] for k in result if k.startswith("residual_relation_accuracy")}
  assert layers == {str(l) for l in range(model.config.text.num_hidden_layers + 1)}, result
  directions = {k for k in result if k.startswith("residual_direction_accuracy")}
  assert len(directions) == 2 * len(layers) and all(0.0 <= result[k] <= 1.0 for k in directions), result
  with pytest.raises(ValueError, match="all spatial"):
    probes.probe(model, vqa.make_split("validation", 12, seed=0), batch_size=8)
