"""Tests for experiments.testbed.optimizer (what a phase freezes, as nnx filters) and the training entry point
experiments.testbed.train, which runs in child processes (its absl flags share names with the runner's)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from experiments import testbed
from experiments.testbed import heads as heads_lib
from experiments.testbed import optimizer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _python(*args, timeout=600):
  # XLA's LLVM backend at optimisation level 0: the training smoke run's programs compile in 60% of the CPU time
  # (they run one step each, and print the same losses either way).
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    flags = f"{flags} --xla_backend_optimization_level=0".strip()
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _key_path_tower_side(path: str) -> bool:
  """The freeze predicate the nnx filters replace (train_testbed.py before the package), on `jax.tree_util.keystr`
  paths of params = (model state, heads state): the reference `optimizer.TOWER` must reproduce."""
  text_heads = ("'text_position'", "'relation'", "'order'", "'count'")
  return (path.startswith("[1]") and not any(h in path for h in text_heads)) or "'vision_tower'" in path


def _params(hf, text_heads=True):
  """(model, heads, (model state, heads state)), abstract (`nnx.eval_shape`: the variables' shapes and dtypes, no
  values): what the filters and labels read is the tree of variables, and initialising the arrays eagerly compiles
  every initialiser."""
  model = nnx.eval_shape(lambda: testbed.make_model(hf, seed=0))
  heads = nnx.eval_shape(lambda: heads_lib.AuxHeads(hf["vision_config"]["hidden_size"],
                                                    hf["text_config"]["hidden_size"] if text_heads else None,
                                                    rngs=nnx.Rngs(1)))
  return model, heads, (nnx.split(model)[1], nnx.split(heads)[1])


@pytest.mark.parametrize("text_heads", [True, False])
def test_tower_filter_selects_what_the_key_path_predicate_selected(text_heads):
  """On the shipped architecture: the same labels, leaf for leaf, as the substring predicate; nnx.state with the same
  filters selects the same variables; the tower and the heads reading it are frozen, everything else trains."""
  model, heads, params = _params(testbed.hf_config(), text_heads)
  want = jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if _key_path_tower_side(jax.tree_util.keystr(p)) else "trained", params)
  got = tuple(optimizer.frozen_labels(state, f) for state, f in zip(params, optimizer.TOWER))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert jax.tree.leaves(got) == jax.tree.leaves(want)
  for module, state, labels, f in zip((model, heads), params, got, optimizer.TOWER):
    frozen = {path for path, _ in nnx.to_flat_state(nnx.state(module, f))}
    labelled = {path for path, v in nnx.to_flat_state(labels) if v.get_value() == "frozen"}
    assert frozen == labelled and {path for path, _ in nnx.to_flat_state(state)} >= frozen
  model_frozen = {path[0] for path, v in nnx.to_flat_state(got[0]) if v.get_value() == "frozen"}
  heads_frozen = {path[0] for path, v in nnx.to_flat_state(got[1]) if v.get_value() == "frozen"}
  assert model_frozen == {"vision_tower"}
  assert heads_frozen == {"patch", "crop", "position"}
  nothing = tuple(optimizer.frozen_labels(state, f) for state, f in zip(params, optimizer.NOTHING))
  assert set(jax.tree.leaves(nothing)) == {"trained"}


@pytest.mark.slow
def test_optimizer_never_moves_frozen_parameters():
  hf = testbed.hf_config(vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     projection_dim=16),
                         text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4))
  _, _, abstract = _params(hf)
  # random parameters and gradients on the model's tree (numpy draws: no per-shape compilation)
  rng = np.random.default_rng(0)
  leaves, treedef = jax.tree.flatten(abstract)
  params = jax.tree.unflatten(treedef, [rng.normal(size=a.shape).astype(a.dtype) for a in leaves])
  grads = jax.tree.unflatten(treedef, [rng.normal(size=a.shape).astype(np.float32) for a in leaves])
  labels = tuple(optimizer.frozen_labels(state, f) for state, f in zip(params, optimizer.TOWER))
  for frozen, want in ((optimizer.TOWER, labels), (optimizer.NOTHING, jax.tree.map(lambda _: "trained", labels))):
    tx = optimizer.make(10, 1e-2, frozen, warmup_steps=2, weight_decay=0.01)
    state = tx.init(params)
    step = jax.jit(tx.update, compiler_options={"xla_backend_optimization_level": 0})   # compiles 2x faster
    for _ in range(3):
      updates, state = step(grads, state, params)
    for label, update in zip(jax.tree.leaves(want), jax.tree.leaves(updates)):
      assert (label == "frozen") == (not np.any(np.asarray(update))), label


def test_flags_give_the_shipped_recipe():
  """TrainConfig.from_flags with the default flags: the recipe of experiments/testbed_ckpt (BUILD.md, "Testbed")."""
  code = textwrap.dedent("""
      from absl import flags
      from experiments import testbed
      from experiments.testbed import losses, train
      flags.FLAGS(["train", "--output_dir=/tmp/x"])
      config = train.TrainConfig.from_flags(flags.FLAGS)
      assert config.weights == losses.LossWeights(aux=0.5, question=0.5, grounding=1.0, caption=0.5, count=1.0,
                                                  position=1.0, relation=4.0, order=4.0, direction=1.0,
                                                  count_read=0.0), config.weights
      assert config.full_family_weights == dict(attribute=1.0, counting=1.0, spatial=1.0, existence=1.0,
                                                detail=1.5), config.full_family_weights
      assert (config.vision_steps, config.short_steps, config.steps) == (1500, 3000, 1200)
      assert (config.batch_size, config.short_batch_size, config.seed) == (32, 64, 0)
      assert (config.count_heads, config.count_sink, config.dot_head, config.freeze_vision) == (2, 5.0, True, True)
      assert config.hf_config() == testbed.hf_config()
      flags.FLAGS(["train", "--output_dir=/tmp/x", "--full_family_weights=detail"])
      try:
        train.TrainConfig.from_flags(flags.FLAGS)
        raise SystemExit("a malformed --full_family_weights was accepted")
      except ValueError as e:
        assert "--full_family_weights" in str(e), e
      print("ok")
  """)
  proc = _python("-c", code)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("entry, flag", [("experiments.testbed.train", "--output_dir"),
                                         ("experiments.testbed.probe", "--checkpoint")])
def test_entry_points_show_their_help(entry, flag):
  proc = _python("-m", entry, "--help")
  assert flag in proc.stdout and "Traceback" not in proc.stderr, proc.stderr[-3000:]   # absl's --help exits 1


@pytest.mark.slow
def test_training_smoke_run_saves_a_loadable_checkpoint(tmp_path):
  """One step of each phase on a tiny model, then the test evaluations and transformers' answers on the saved
  checkpoint: the whole entry point runs."""
  out = tmp_path / "ckpt"
  proc = _python("-m", "experiments.testbed.train", f"--output_dir={out}", "--vision_steps=1", "--short_steps=1",
                 "--steps=1", "--batch_size=2", "--short_batch_size=2", "--eval_every=0", "--eval_examples=2",
                 "--eval_keep_fraction=0.5", "--check_transformers=2", "--text_width=32", "--text_mlp=64",
                 "--vision_width=16", "--vision_layers=1", "--text_layers=3", "--log_every=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for line in ("vision step 1/1", "short step 1/1", "full step 1/1", "stage II layers (1, 2)",
               "test accuracy (2 examples, all tokens)", "random 50.0% of visual tokens",
               "transformers vs port: 2 / 2 test answers identical"):
    assert line in proc.stderr, line
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
  model = models.load_pretrained(str(out))
  assert model.config.text.num_hidden_layers == 3 and model.config.text.hidden_size == 32
  assert np.all(np.isfinite(np.asarray(jnp.asarray(model.image_newline[...]))))
