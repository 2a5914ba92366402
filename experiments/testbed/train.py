"""Trains the testbed LLaVA-NeXT (`experiments.testbed`) on the synthetic VQA benchmark and saves a HF checkpoint.

    python -m experiments.testbed.train --output_dir=experiments/testbed_ckpt     # the defaults: the shipped recipe

Three phases: `--vision_steps` of the auxiliary vision losses alone, `--short_steps` of the full loss on the base
crop alone, `--steps` of the same loss on the real anyres input. The defaults are the recipe of the committed
`experiments/testbed_ckpt` (see BUILD.md for its time and accuracy). The flags are read once, in `main`, into a frozen
`TrainConfig`.

The schedule and the loss flags in full, the optimizer, data and seeding, validation, the final evaluation and what
is saved: experiments/EXPERIMENTS.md#train.
"""

import dataclasses
import functools
import json
import queue
import tempfile
import threading
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import optax
from absl import app
from absl import flags
from absl import logging
from flax import nnx

import models
from experiments.synthvqa import vqa
from experiments.testbed import batches
from experiments.testbed import evaluation
from experiments.testbed import heads as heads_lib
from experiments.testbed import losses
from experiments.testbed import model as model_lib
from experiments.testbed import optimizer
from models import pruning
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
flags.DEFINE_float("grounding_weight", 1.0, "Weight of the attention grounding losses (see losses.loss_fn).")
flags.DEFINE_float("count_weight", 1.0, "Weight of the counting-head attention loss (see losses.loss_fn).")
flags.DEFINE_integer("short_steps", 3000, "Steps on the base crop alone (36 visual tokens, no detail questions) "
                     "between the vision warm-up and the full phase.")
flags.DEFINE_integer("short_batch_size", 64, "Examples per step of the short phase.")
flags.DEFINE_float("short_learning_rate", 2e-3, "Peak learning rate of the short phase.")
flags.DEFINE_float("position_weight", 1.0, "Weight of the token-position losses (losses.position_loss): tower output "
                   "in the vision phase, projector output in the others (0: off).")
flags.DEFINE_float("relation_weight", 4.0, "Weight of the relation loss (see losses.loss_fn): the two objects of a "
                   "spatial question read from the answer position's residual stream (0: off).")
flags.DEFINE_float("count_sink", 5.0, "Weight of \"<s>\" in the counting head's target attention, relative to one "
                   "counted object (batches.encode's count_sink).")
flags.DEFINE_bool("dot_head", True, "On detail questions, grounded head 1 of the answer position looks at the one "
                  "grid-crop token holding the dot instead of the whole object (batches.encode's dot_head).")
flags.DEFINE_list("full_family_weights", ["detail=1.5"], "family=weight pairs (e.g. detail=2): relative sampling "
                  "weights of the question families in the full phase; unnamed families weigh 1.")
flags.DEFINE_integer("count_heads", 2, "Counting heads at the answer position (losses.loss_fn): 1 = head 2 of the "
                     "middle grounded layer; 2 = also head 2 of the last layer.")
flags.DEFINE_float("count_read_weight", 0.0, "Weight of the count readout (see losses.loss_fn): a counting "
                   "question's answer, as n / 6, read linearly from the residual stream at the answer position "
                   "entering the last decoder layer.")
flags.DEFINE_float("order_weight", 4.0, "Weight of the order loss (see losses.loss_fn): the two objects' coordinates "
                   "along the asked axis, oriented by the asked direction, read where the relation loss reads.")
flags.DEFINE_float("direction_weight", 1.0, "Weight of the direction loss (see losses.loss_fn): the answer position "
                   "attends to the asked relation word of a spatial question.")
flags.DEFINE_float("caption_weight", 0.5, "Weight of the image-token caption loss (see losses.loss_fn).")
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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run reads, from the flags of the same names (`from_flags`; see them for the meaning)."""
  output_dir: str
  seed: int
  # architecture
  text_layers: int
  text_width: int
  text_mlp: int
  vision_layers: int
  vision_width: int
  # schedule and optimiser
  vision_steps: int
  short_steps: int
  steps: int
  batch_size: int
  short_batch_size: int
  vision_learning_rate: float
  short_learning_rate: float
  learning_rate: float
  warmup_steps: int
  weight_decay: float
  # objective and data
  weights: losses.LossWeights
  count_heads: int
  count_sink: float
  dot_head: bool
  full_family_weights: Mapping[str, float] | None
  freeze_vision: bool
  # starting points
  init_from: str | None
  vision_from: str | None
  # logging and evaluation
  log_every: int
  eval_every: int
  val_examples: int
  eval_examples: int
  eval_keep_fraction: float
  check_transformers: int

  @classmethod
  def from_flags(cls, values: flags.FlagValues) -> "TrainConfig":
    """The config of parsed flag values (raises ValueError for malformed --full_family_weights)."""
    weights = losses.LossWeights(
        aux=values.aux_weight, question=values.question_weight, grounding=values.grounding_weight,
        caption=values.caption_weight, count=values.count_weight, position=values.position_weight,
        relation=values.relation_weight, order=values.order_weight, direction=values.direction_weight,
        count_read=values.count_read_weight)
    full_family_weights = vqa.parse_family_weights(values.full_family_weights, "--full_family_weights")
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("weights", "full_family_weights")]
    return cls(weights=weights, full_family_weights=full_family_weights, **{n: values[n].value for n in names})

  def hf_config(self) -> dict:
    """The model's config dict: the testbed's with these widths and depths."""
    return model_lib.hf_config(
        vision=dict(hidden_size=self.vision_width, intermediate_size=4 * self.vision_width,
                    num_hidden_layers=self.vision_layers, projection_dim=self.vision_width),
        text=dict(hidden_size=self.text_width, intermediate_size=self.text_mlp, num_hidden_layers=self.text_layers))


@dataclasses.dataclass(frozen=True)
class Phase:
  """One training phase: `steps` optimizer steps on batches [first, first + steps) of a training stream of `total`
  examples (`vqa.iter_split(..., seed=seed, weights=family_weights)`), parameters selected by `frozen` fixed."""
  name: str
  steps: int
  batch_size: int
  learning_rate: float
  seed: int
  first: int
  total: int
  frozen: optimizer.Frozen = optimizer.NOTHING
  base_only: bool = False
  family_weights: Mapping[str, float] | None = None
  validate: bool = True   # log validation accuracy every config.eval_every steps


def _batches(config: TrainConfig, phase: Phase, hf, processor):
  """Yields the phase's encoded training batches, produced by a background thread."""
  out: queue.Queue = queue.Queue(maxsize=4)

  def work():
    stream = vqa.iter_split("train", phase.total, seed=phase.seed, weights=phase.family_weights,
                            start=phase.first * phase.batch_size)
    for _ in range(phase.steps):
      examples = [next(stream) for _ in range(phase.batch_size)]
      out.put(batches.encode(examples, processor, hf, with_answer=True, labels=True, base_only=phase.base_only,
                             count_sink=config.count_sink, dot_head=config.dot_head))
    out.put(None)

  threading.Thread(target=work, daemon=True).start()
  while (batch := out.get()) is not None:
    yield batch


def _train_phase(config: TrainConfig, phase: Phase, loss, params, graphdefs, hf, processor):
  """Runs the phase's optimizer steps of `loss(model, heads, batch)` over params=(model state, heads state)."""
  if phase.steps <= 0:
    return params
  tx = optimizer.make(phase.steps, phase.learning_rate, phase.frozen, warmup_steps=config.warmup_steps,
                      weight_decay=config.weight_decay)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    def objective(params):
      return loss(nnx.merge(graphdefs[0], params[0]), nnx.merge(graphdefs[1], params[1]), batch)
    (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, dict(metrics, loss=value)

  start, sums, steps, every = time.time(), {}, phase.steps, config.log_every
  for i, batch in enumerate(_batches(config, phase, hf, processor), 1):
    batch = {k: (v if k == "layout" else jnp.asarray(v)) for k, v in batch.items()}
    params, opt_state, metrics = step(params, opt_state, batch)
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + float(v)
    if i % every == 0 or i == steps:
      n = every if i % every == 0 else i % every
      logging.info("%s step %d/%d  %.0fs  %s", phase.name, i, steps, time.time() - start,
                   "  ".join(f"{k}={v / n:.4f}" for k, v in sorted(sums.items())))
      sums = {}
    if phase.validate and config.eval_every and i % config.eval_every == 0 and i < steps:
      model = nnx.merge(graphdefs[0], params[0])
      val = vqa.make_split("validation", config.val_examples, seed=config.seed)
      acc = evaluation.evaluate(model, val, config.batch_size, processor=processor)
      logging.info("validation step %d: %s", i, json.dumps({k: round(v, 4) for k, v in acc.items()}))
  return params


def _stage_ii_layers(num_layers: int):
  """TOPS' Stage II layers for the decoder (`pruning.tops_layers`), or why it has none."""
  try:
    return pruning.tops_layers(num_layers)
  except ValueError as e:
    return str(e)


def train(config: TrainConfig):
  """Trains, saves to config.output_dir, evaluates; returns the trained model."""
  hf = config.hf_config()
  if config.init_from:
    model = models.load_pretrained(config.init_from)
  else:
    model = model_lib.make_model(hf, seed=config.seed)
  if config.vision_from:
    nnx.update(model.vision_tower, nnx.state(models.load_pretrained(config.vision_from).vision_tower))
  heads = heads_lib.AuxHeads(hf["vision_config"]["hidden_size"], hf["text_config"]["hidden_size"],
                             rngs=nnx.Rngs(config.seed + 1))
  graphdef_model, model_params = nnx.split(model)
  graphdef_heads, head_params = nnx.split(heads)
  graphdefs, params = (graphdef_model, graphdef_heads), (model_params, head_params)
  processor = model_lib.make_processor(hf)
  total = (config.vision_steps + config.steps) * config.batch_size
  logging.info("config: %s", json.dumps(hf))
  logging.info("parameters: %d (model), stage II layers %s",
               sum(a.size for a in jax.tree.leaves(model_params)), _stage_ii_layers(config.text_layers))
  # The short phase: base crop only (a 62-token sequence instead of ~300), tower frozen, detail questions left out
  # (their dot is not legible at base resolution); its own example stream (seed + 1), so no example repeats.
  phases = [
      (Phase("vision", config.vision_steps, config.batch_size, config.vision_learning_rate, config.seed, 0, total,
             validate=False),
       functools.partial(losses.vision_loss, weights=config.weights)),
      (Phase("short", config.short_steps, config.short_batch_size, config.short_learning_rate, config.seed + 1, 0,
             config.short_steps * config.short_batch_size, optimizer.TOWER, base_only=True,
             family_weights={f: float(f != "detail") for f in vqa.FAMILIES}),
       functools.partial(losses.loss_fn, weights=config.weights, count_heads=config.count_heads, train_vision=False)),
      (Phase("full", config.steps, config.batch_size, config.learning_rate, config.seed, config.vision_steps, total,
             optimizer.TOWER if config.freeze_vision else optimizer.NOTHING, family_weights=config.full_family_weights),
       functools.partial(losses.loss_fn, weights=config.weights, count_heads=config.count_heads,
                         train_vision=not config.freeze_vision)),
  ]
  start = time.time()
  for phase, loss in phases:
    params = _train_phase(config, phase, loss, params, graphdefs, hf, processor)
  logging.info("training took %.1f min", (time.time() - start) / 60)
  model = nnx.merge(graphdef_model, params[0])

  with tempfile.TemporaryDirectory() as tmp:
    processor.save_pretrained(tmp)
    saving.save_pretrained(model, hf, config.output_dir, tokenizer_dir=tmp)
  logging.info("saved %s", config.output_dir)
  _evaluate(config, model, processor)
  return model


def _evaluate(config: TrainConfig, model, processor):
  """Test accuracy (all tokens and random Stage I) and the answers of transformers loaded from the saved checkpoint."""
  test = vqa.make_split("test", max(config.eval_examples, config.check_transformers), seed=0)
  if config.eval_examples:
    examples = test[:config.eval_examples]
    acc = evaluation.evaluate(model, examples, config.batch_size, processor=processor)
    logging.info("test accuracy (%d examples, all tokens): %s", config.eval_examples,
                 json.dumps({k: round(v, 4) for k, v in acc.items()}))
    if config.eval_keep_fraction:
      acc = evaluation.evaluate(model, examples, config.batch_size, processor=processor,
                                keep_fraction=config.eval_keep_fraction, seed=config.seed)
      logging.info("test accuracy (%d examples, random %.1f%% of visual tokens): %s", config.eval_examples,
                   100 * config.eval_keep_fraction, json.dumps({k: round(v, 4) for k, v in acc.items()}))
  if config.check_transformers:
    examples = test[:config.check_transformers]
    ours = evaluation.evaluate(model, examples, config.batch_size, processor=processor, return_predictions=True)[1]
    theirs = evaluation.transformers_answers(config.output_dir, examples)
    same = sum(a == b for a, b in zip(ours, theirs))
    logging.info("transformers vs port: %d / %d test answers identical", same, len(examples))
    if same != len(examples):
      raise SystemExit(f"transformers and the port disagree on {len(examples) - same} of {len(examples)} answers")


def main(argv):
  del argv
  train(TrainConfig.from_flags(FLAGS))


if __name__ == "__main__":
  app.run(main)
