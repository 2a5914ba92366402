"""Trains the testbed LLaVA-NeXT (`experiments.testbed`) on the synthetic VQA benchmark and saves a HF checkpoint.

    python -m experiments.train_testbed --output_dir=experiments/testbed_ckpt     # the defaults: the shipped recipe

Schedule, three phases:
1. `--vision_steps` steps of the auxiliary vision losses alone (the tower and its heads; no decoder, cheap);
2. `--short_steps` steps of the full loss (`testbed.loss_fn`: answer + "</s>" cross entropy, next-token loss on the
   question, attention grounding of a few heads, the counting head, image-token captions) on the base crop alone
   (`testbed.encode(base_only=True)`: 36 visual tokens, a 62-token sequence instead of ~300, so a step costs about a
   third of a full one at twice the batch), without detail questions (the dot is not legible at base resolution);
   the decoder learns to find, compare and count objects here, where the CPU gives it ~5x the examples per second;
3. `--steps` steps of the same loss on the real anyres input (all crops, image_newline): the decoder learns to use
   the grid crops (detail questions come in here) and the ~250-token image.
Phases 2 and 3 train the projector, `image_newline` and decoder with the tower frozen, as LLaVA's stage 2 does
(`--nofreeze_vision` trains it in phase 3 too, with the auxiliary losses kept on).
`--position_weight` (1 in the shipped recipe; 0 turns it off) weighs `testbed.position_loss`: linear heads read each
base-crop token's row and column from the tower's output (phase 1) and from the projector's output (phases 2 and 3; that
head trains with the projector), because spatial questions need positions the other losses let the projector drop. Three
spatial terms of `testbed.loss_fn` (weights 4, 1, 4 in the order below in the shipped recipe; 0 turns each off) make the
answer position gather what a relation needs: `--relation_weight` reads the two named objects' places from the decoder's
residual stream there, `--direction_weight` makes one of its heads attend to the asked relation word, and
`--order_weight` reads the two objects' coordinates along the asked axis, oriented by that word, so the answer is a
comparison (without them the grounded heads look at the objects but spatial stays at chance:
`experiments.probe_testbed`, BUILD.md "Testbed"). `--count_sink` (5 in the shipped recipe) is the weight of "<s>" in the
counting head's target attention, and `--count_heads=2` (shipped) trains a second counting head in the last layer.
`--dot_head` (on in the shipped recipe) points one grounded head at the single grid-crop token that holds a detail
question's dot, and `--full_family_weights` (detail=1.5 in the shipped recipe) samples detail questions, which only
the full phase sees, 1.5 times as often as each other family there.
optax adamw (weight decay on matrices only) with linear warmup and cosine decay per phase, global-norm clipping.
Training examples are `vqa.iter_split("train", n, seed)` in order (fresh examples, never repeated; phase 2 draws its
own stream with seed + 1), encoded by a background thread; one jitted step per phase (all batches share one padded
shape). Everything is seeded by `--seed` (model init, data), so a rerun reproduces the checkpoint up to
floating-point reduction order. Validation accuracy (per family, full anyres input) is logged every `--eval_every`
steps of phases 2 and 3.

The defaults are the recipe of the committed `experiments/testbed_ckpt` (see BUILD.md for its time and accuracy).

At the end the model is evaluated on `--eval_examples` examples of the test split (full tokens) and saved with
`models.saving.save_pretrained` (config.json, model.safetensors, tokenizer and processor files); the auxiliary heads
are not saved.
"""

import json
import os
import queue
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from absl import logging
from flax import nnx

import models
from experiments import testbed
from experiments import vqa
from models import saving

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", None, "Checkpoint directory to write.", required=True)
flags.DEFINE_integer("steps", 1200, "Full-model training steps.")
flags.DEFINE_integer("vision_steps", 1500, "Auxiliary-only vision warm-up steps before the full model trains.")
flags.DEFINE_integer("seed", 0, "Seed of the initialisation and the training stream.")
flags.DEFINE_integer("batch_size", 32, "Examples per step.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate of the full phase.")
flags.DEFINE_float("vision_learning_rate", 3e-3, "Peak learning rate of the vision warm-up phase.")
flags.DEFINE_integer("warmup_steps", 100, "Linear warmup steps (each phase).")
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay on matrices and embeddings.")
flags.DEFINE_float("aux_weight", 0.5, "Weight of the auxiliary vision losses in the full phase.")
flags.DEFINE_float("question_weight", 0.5, "Weight of the next-token loss on the question text.")
flags.DEFINE_float("grounding_weight", 1.0, "Weight of the attention grounding losses (see testbed.loss_fn).")
flags.DEFINE_float("count_weight", 1.0, "Weight of the counting-head attention loss (see testbed.loss_fn).")
flags.DEFINE_integer("short_steps", 3000, "Steps on the base crop alone (36 visual tokens, no detail questions) between "
                     "the vision warm-up and the full phase.")
flags.DEFINE_integer("short_batch_size", 64, "Examples per step of the short phase.")
flags.DEFINE_float("short_learning_rate", 2e-3, "Peak learning rate of the short phase.")
flags.DEFINE_float("position_weight", 1.0, "Weight of the token-position losses (testbed.position_loss): tower output "
                   "in the vision phase, projector output in the others (0: off).")
flags.DEFINE_float("relation_weight", 4.0, "Weight of the relation loss (see testbed.loss_fn): the two objects of a "
                   "spatial question read from the answer position's residual stream (0: off).")
flags.DEFINE_float("count_sink", 5.0, "Weight of \"<s>\" in the counting head's target attention, relative to one "
                   "counted object (testbed.encode's count_sink).")
flags.DEFINE_bool("dot_head", True, "On detail questions, grounded head 1 of the answer position looks at the one "
                  "grid-crop token holding the dot instead of the whole object (testbed.encode's dot_head).")
flags.DEFINE_list("full_family_weights", ["detail=1.5"], "family=weight pairs (e.g. detail=2): relative sampling "
                  "weights of the question families in the full phase; unnamed families weigh 1.")
flags.DEFINE_integer("count_heads", 2, "Counting heads at the answer position (testbed.loss_fn): 1 = head 2 of the "
                     "middle grounded layer; 2 = also head 2 of the last layer.")
flags.DEFINE_float("count_read_weight", 0.0, "Weight of the count readout (see testbed.loss_fn): a counting "
                   "question's answer, as n / 6, read linearly from the residual stream at the answer position "
                   "entering the last decoder layer.")
flags.DEFINE_float("order_weight", 4.0, "Weight of the order loss (see testbed.loss_fn): the two objects' coordinates "
                   "along the asked axis, oriented by the asked direction, read where the relation loss reads.")
flags.DEFINE_float("direction_weight", 1.0, "Weight of the direction loss (see testbed.loss_fn): the answer position "
                   "attends to the asked relation word of a spatial question.")
flags.DEFINE_float("caption_weight", 0.5, "Weight of the image-token caption loss (see testbed.loss_fn).")
flags.DEFINE_bool("freeze_vision", True, "Freeze the vision tower in the full phase (LLaVA-style).")
flags.DEFINE_string("init_from", None, "Start from this checkpoint instead of a fresh init (for experiments).")
flags.DEFINE_string("vision_from", None, "Copy the vision tower of this checkpoint (same tower config) into the fresh "
                    "model; use with --vision_steps=0 to reuse a trained tower (for experiments).")
flags.DEFINE_integer("log_every", 25, "Steps between log lines.")
flags.DEFINE_integer("eval_every", 1000, "Steps between validation evaluations (0: only at the end).")
flags.DEFINE_integer("val_examples", 350, "Validation examples per periodic evaluation.")
flags.DEFINE_integer("eval_examples", 1000, "Test examples evaluated at the end (0: skip).")
flags.DEFINE_float("eval_keep_fraction", 0.056, "Also evaluate with this random fraction of visual tokens (0: skip).")
flags.DEFINE_integer("check_transformers", 300, "Test examples on which transformers' answers (loaded from the saved "
                     "checkpoint; needs torch) must equal the port's (0: skip).")
flags.DEFINE_integer("text_layers", 4, "Decoder layers.")
flags.DEFINE_integer("text_width", 128, "Decoder width.")
flags.DEFINE_integer("text_mlp", 384, "Decoder SwiGLU width.")
flags.DEFINE_integer("vision_layers", 3, "Vision tower layers.")
flags.DEFINE_integer("vision_width", 96, "Vision tower width.")


def _config() -> dict:
  return testbed.hf_config(
      vision=dict(hidden_size=FLAGS.vision_width, intermediate_size=4 * FLAGS.vision_width,
                  num_hidden_layers=FLAGS.vision_layers, projection_dim=FLAGS.vision_width),
      text=dict(hidden_size=FLAGS.text_width, intermediate_size=FLAGS.text_mlp, num_hidden_layers=FLAGS.text_layers))


def _batches(hf, processor, first: int, num_batches: int, batch_size: int, seed: int, total: int,
             base_only: bool = False, weights=None):
  """Yields encoded training batches [first, first + num_batches) of the stream, produced by a background thread."""
  out: queue.Queue = queue.Queue(maxsize=4)

  def work():
    stream = vqa.iter_split("train", total, seed=seed, weights=weights, start=first * batch_size)
    for _ in range(num_batches):
      examples = [next(stream) for _ in range(batch_size)]
      out.put(testbed.encode(examples, processor, hf, with_answer=True, labels=True, base_only=base_only,
                             count_sink=FLAGS.count_sink, dot_head=FLAGS.dot_head))
    out.put(None)

  threading.Thread(target=work, daemon=True).start()
  while (batch := out.get()) is not None:
    yield batch


def _optimizer(steps: int, peak: float, frozen=lambda path: False) -> optax.GradientTransformation:
  """adamw (decay on matrices only), warmup + cosine, clipping; parameters where `frozen(path)` never change."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak, min(FLAGS.warmup_steps, steps // 2), max(steps, 1),
                                                end_value=0.02 * peak)
  decay_mask = lambda params: jax.tree.map(lambda a: a.ndim >= 2, params)
  adamw = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=FLAGS.weight_decay, mask=decay_mask))
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if frozen(jax.tree_util.keystr(path)) else "trained", params)
  return optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, labels)


def _vision_loss(model, heads, batch):
  """The auxiliary losses alone (the decoder is not run)."""
  px = batch["pixel_values"]
  b, p = px.shape[:2]
  vis = model.vision_tower.features(px.reshape(b * p, *px.shape[2:]),
                                    feature_layers=model.config.vision_feature_layer, select_strategy="full",
                                    cls_attention=False)
  full = vis.features.reshape(b, p, *vis.features.shape[1:])
  pooled = model.vision_tower.post_layernorm(full[:, :, 0])
  aux, metrics = testbed.aux_losses(heads, full[:, :, 1:], pooled, batch)
  if FLAGS.position_weight:
    position = testbed.position_loss(heads.position, full[:, 0, 1:])
    aux, metrics = aux + FLAGS.position_weight * position, dict(metrics, position=position)
  return aux, metrics


def _train_phase(name, loss, params, graphdefs, hf, processor, first, steps, total, peak, frozen=lambda path: False,
                 batch_size=None, seed=None, base_only=False, weights=None):
  """Runs `steps` optimizer steps of `loss(model, heads, batch)` over params=(model state, heads state)."""
  batch_size = batch_size or FLAGS.batch_size
  seed = FLAGS.seed if seed is None else seed
  if steps <= 0:
    return params
  tx = _optimizer(steps, peak, frozen)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    def objective(params):
      return loss(nnx.merge(graphdefs[0], params[0]), nnx.merge(graphdefs[1], params[1]), batch)
    (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, dict(metrics, loss=value)

  start, sums = time.time(), {}
  for i, batch in enumerate(_batches(hf, processor, first, steps, batch_size, seed, total, base_only, weights), 1):
    batch = {k: (v if k == "layout" else jnp.asarray(v)) for k, v in batch.items()}
    params, opt_state, metrics = step(params, opt_state, batch)
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + float(v)
    if i % FLAGS.log_every == 0 or i == steps:
      n = FLAGS.log_every if i % FLAGS.log_every == 0 else i % FLAGS.log_every
      logging.info("%s step %d/%d  %.0fs  %s", name, i, steps, time.time() - start,
                   "  ".join(f"{k}={v / n:.4f}" for k, v in sorted(sums.items())))
      sums = {}
    if name != "vision" and FLAGS.eval_every and i % FLAGS.eval_every == 0 and i < steps:
      model = nnx.merge(graphdefs[0], params[0])
      val = vqa.make_split("validation", FLAGS.val_examples, seed=FLAGS.seed)
      acc = testbed.evaluate(model, val, FLAGS.batch_size, processor=processor)
      logging.info("validation step %d: %s", i, json.dumps({k: round(v, 4) for k, v in acc.items()}))
  return params


def main(argv):
  del argv
  full_weights = vqa.parse_family_weights(FLAGS.full_family_weights, "--full_family_weights")
  hf = _config()
  model = models.load_pretrained(FLAGS.init_from) if FLAGS.init_from else testbed.make_model(hf, seed=FLAGS.seed)
  if FLAGS.vision_from:
    nnx.update(model.vision_tower, nnx.state(models.load_pretrained(FLAGS.vision_from).vision_tower))
  heads = testbed.AuxHeads(hf["vision_config"]["hidden_size"], hf["text_config"]["hidden_size"],
                           rngs=nnx.Rngs(FLAGS.seed + 1))
  graphdef_model, model_params = nnx.split(model)
  graphdef_heads, head_params = nnx.split(heads)
  graphdefs, params = (graphdef_model, graphdef_heads), (model_params, head_params)
  processor = testbed.make_processor(hf)
  total = (FLAGS.vision_steps + FLAGS.steps) * FLAGS.batch_size
  logging.info("config: %s", json.dumps(hf))
  logging.info("parameters: %d (model), stage II layers %s",
               sum(a.size for a in jax.tree.leaves(model_params)), testbed.stage_ii_layers(FLAGS.text_layers))
  start = time.time()
  params = _train_phase("vision", _vision_loss, params, graphdefs, hf, processor, 0, FLAGS.vision_steps, total,
                        FLAGS.vision_learning_rate)
  weights = dict(aux_weight=FLAGS.aux_weight, question_weight=FLAGS.question_weight,
                 grounding_weight=FLAGS.grounding_weight, count_weight=FLAGS.count_weight,
                 caption_weight=FLAGS.caption_weight, position_weight=FLAGS.position_weight,
                 relation_weight=FLAGS.relation_weight, order_weight=FLAGS.order_weight,
                 direction_weight=FLAGS.direction_weight, count_read_weight=FLAGS.count_read_weight,
                 count_heads=FLAGS.count_heads,
                 train_vision=not FLAGS.freeze_vision)
  full_loss = lambda m, h, b: testbed.loss_fn(m, h, b, **weights)
  # params = (model state, aux-head state): with a frozen tower, the tower and the heads stay as the first phase left
  # (the projector-side position head trains with the projector, the relation head with the decoder)
  text_heads = ("'text_position'", "'relation'", "'order'", "'count'")
  tower_side = lambda path: ((path.startswith("[1]") and not any(h in path for h in text_heads))
                             or "'vision_tower'" in path)
  frozen = lambda path: FLAGS.freeze_vision and tower_side(path)
  # The short phase: base crop only (a 62-token sequence instead of ~300), tower frozen, detail questions left out
  # (their dot is not legible at base resolution); its own example stream (seed + 1), so no example repeats.
  short_loss = lambda m, h, b: testbed.loss_fn(m, h, b, **dict(weights, train_vision=False))
  params = _train_phase("short", short_loss, params, graphdefs, hf, processor, 0, FLAGS.short_steps,
                        FLAGS.short_steps * FLAGS.short_batch_size, FLAGS.short_learning_rate,
                        tower_side,
                        batch_size=FLAGS.short_batch_size, seed=FLAGS.seed + 1, base_only=True,
                        weights={f: float(f != "detail") for f in vqa.FAMILIES})
  params = _train_phase("full", full_loss, params, graphdefs, hf, processor, FLAGS.vision_steps, FLAGS.steps, total,
                        FLAGS.learning_rate, frozen, weights=full_weights)
  logging.info("training took %.1f min", (time.time() - start) / 60)
  model = nnx.merge(graphdef_model, params[0])

  with tempfile.TemporaryDirectory() as tmp:
    processor.save_pretrained(tmp)
    saving.save_pretrained(model, hf, FLAGS.output_dir, tokenizer_dir=tmp)
  logging.info("saved %s", FLAGS.output_dir)
  test = vqa.make_split("test", max(FLAGS.eval_examples, FLAGS.check_transformers), seed=0)
  if FLAGS.eval_examples:
    acc, answers = testbed.evaluate(model, test[:FLAGS.eval_examples], FLAGS.batch_size, processor=processor,
                                    return_predictions=True)
    logging.info("test accuracy (%d examples, all tokens): %s", FLAGS.eval_examples,
                 json.dumps({k: round(v, 4) for k, v in acc.items()}))
    if FLAGS.eval_keep_fraction:
      acc = testbed.evaluate(model, test[:FLAGS.eval_examples], FLAGS.batch_size, processor=processor,
                             keep_fraction=FLAGS.eval_keep_fraction, seed=FLAGS.seed)
      logging.info("test accuracy (%d examples, random %.1f%% of visual tokens): %s", FLAGS.eval_examples,
                   100 * FLAGS.eval_keep_fraction, json.dumps({k: round(v, 4) for k, v in acc.items()}))
  if FLAGS.check_transformers:
    examples = test[:FLAGS.check_transformers]
    ours = testbed.evaluate(model, examples, FLAGS.batch_size, processor=processor, return_predictions=True)[1]
    theirs = testbed.transformers_answers(FLAGS.output_dir, examples)
    same = sum(a == b for a, b in zip(ours, theirs))
    logging.info("transformers vs port: %d / %d test answers identical", same, len(examples))
    if same != len(examples):
      raise SystemExit(f"transformers and the port disagree on {len(examples) - same} of {len(examples)} answers")


if __name__ == "__main__":
  app.run(main)
