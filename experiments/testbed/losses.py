"""The testbed's training objective (`loss_fn`, weighted by `LossWeights`), the vision warm-up objective
(`vision_loss`) and their terms.

Axes: B batch, S sequence (padded), P crops per image (base + grid, padded), T patches per crop (CLS dropped), Dv
vision width, D text width, V vocabulary, L decoder layers.

The objective: cross entropy on the answer token and the "</s>" after it, plus auxiliary losses that make the vision
tower learn fast from dense labels derived from the `Scene` (`targets`; fair game in a testbed; the heads are not
part of the checkpoint): per patch, the colour and shape of the object whose box contains the patch centre (or
background), whether the patch holds an object's centre, and at its centre patch in the grid crops (full scale) the
colour of the object's dot (or none); per crop, from the CLIP pooled output (post_layernorm of CLS), which colours
and shapes appear in the crop. In the decoder, a few heads are told where to look: question words at the objects
they name, the answer position at the evidence (for spatial questions one head per object, on the base crop, whose
tokens carry absolute position; with `encode(dot_head=True)`, for detail questions one head at the grid-crop token
holding the dot), and one or two counting heads at "<s>" plus one centre token per evidence object.
"""

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.testbed import heads as heads_lib
from experiments.testbed import model as model_lib

__all__ = [
    "LossWeights", "masked_mean", "aux_losses", "position_targets", "position_loss", "grounding_loss",
    "grounding_layers", "count_loss", "loss_fn", "vision_loss",
]


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """The weight of each term of `loss_fn` (0 turns a term off; see `loss_fn` for what each term is).

  The defaults are the bare objective (answer, half-weight question text, auxiliary vision losses);
  `experiments.testbed.train` builds its weights from its flags, whose defaults are the shipped recipe.
  """
  aux: float = 1.0         # `aux_losses` on the vision tower (only while it trains)
  question: float = 0.5    # next-token cross entropy on the question text
  grounding: float = 0.0   # attention of the grounded heads on the named objects and the evidence
  caption: float = 0.0     # image tokens' logits against the words of the object they show
  count: float = 0.0       # attention of the counting head(s) against the count target
  position: float = 0.0    # `position_loss` of the base-crop tokens (tower and projector side)
  relation: float = 0.0    # the two named objects' places, read from the residual stream at the answer position
  order: float = 0.0       # their coordinates along the asked axis, read there
  direction: float = 0.0   # attention of the answer position on the asked relation word
  count_read: float = 0.0  # a counting question's answer as one ordered quantity, read there


def masked_mean(values, mask):
  """Mean of `values` where `mask` holds (0 when it holds nowhere); any matching shapes."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def aux_losses(heads: heads_lib.AuxHeads, features: jax.Array, pooled: jax.Array, batch: Mapping):
  """Auxiliary vision losses (see the module docstring) -> (sum, metrics dict).

  features float[B, P, T, Dv] (CLS dropped), pooled float[B, P, Dv]; batch holds patch_labels and crop_valid.
  """
  patch_logits, crop_logits = heads(features, pooled)
  lab = batch["patch_labels"].astype(jnp.int32)
  crop_valid = batch["crop_valid"]
  patch_valid = jnp.broadcast_to(crop_valid[:, :, None], lab.shape[:3])
  c0, c1, c2 = 1 + heads_lib.NUM_COLORS, 2 + heads_lib.NUM_COLORS, 2 + heads_lib.NUM_COLORS + 1 + heads_lib.NUM_SHAPES
  ce = optax.softmax_cross_entropy_with_integer_labels
  colour = masked_mean(ce(patch_logits[..., :c0], lab[..., 0]), patch_valid)
  centre = masked_mean(optax.sigmoid_binary_cross_entropy(patch_logits[..., c0], lab[..., 2]), patch_valid)
  on_object = patch_valid & (lab[..., 0] > 0)
  shape = masked_mean(ce(patch_logits[..., c1:c2], lab[..., 1]), on_object)    # object vs background: colour head
  dot = masked_mean(ce(patch_logits[..., c2:], jnp.maximum(lab[..., 3], 0)), patch_valid & (lab[..., 3] >= 0))
  present = jnp.concatenate([jax.nn.one_hot(lab[..., 0] - 1, heads_lib.NUM_COLORS).max(axis=2),
                             jax.nn.one_hot(lab[..., 1] - 1, heads_lib.NUM_SHAPES).max(axis=2)], axis=-1)   # [B, P, 14]
  crop = masked_mean(optax.sigmoid_binary_cross_entropy(crop_logits, present).mean(-1), crop_valid)
  metrics = dict(colour=colour, shape=shape, centre=centre, dot=dot, crop=crop,
                 shape_accuracy=masked_mean(jnp.argmax(patch_logits[..., c1:c2], -1) == lab[..., 1], on_object),
                 centre_shape_accuracy=masked_mean(jnp.argmax(patch_logits[..., c1:c2], -1) == lab[..., 1],
                                                    on_object & (lab[..., 3] >= 0)),
                 colour_accuracy=masked_mean(jnp.argmax(patch_logits[..., :c0], -1) == lab[..., 0], on_object))
  return colour + shape + centre + dot + crop, metrics


def position_targets(num_tokens: int) -> np.ndarray:
  """float32[T, 2]: (row, column) of each token of a square crop's patch grid, patch centres scaled to (0, 1)."""
  side = int(round(np.sqrt(num_tokens)))
  if side * side != num_tokens:
    raise ValueError(f"position targets need a square patch grid, got {num_tokens} tokens")
  rows, cols = np.divmod(np.arange(num_tokens), side)
  return ((np.stack([rows, cols], -1) + 0.5) / side).astype(np.float32)


def position_loss(head: nnx.Linear, tokens: jax.Array) -> jax.Array:
  """Mean squared error of `head(tokens)` against `position_targets`: tokens float[B, T, D] of the base crop (the whole
  image, so a token's place in the crop is its place in the image). Spatial questions compare two objects' places;
  nothing else in the objective asks the tokens to keep them (see `experiments.testbed.probe`)."""
  target = jnp.asarray(position_targets(tokens.shape[-2]))
  return jnp.mean(jnp.sum((head(tokens).astype(jnp.float32) - target) ** 2, -1))


def grounding_loss(attention: jax.Array, evidence: jax.Array) -> jax.Array:
  """-log of the attention mass on the evidence tokens, mean over the rows that have evidence.

  attention float32[..., S] (attention rows of one head), evidence bool[..., S].
  """
  mass = jnp.sum(jnp.where(evidence, attention, 0.0), axis=-1)
  return masked_mean(-jnp.log(mass + 1e-6), jnp.broadcast_to(jnp.any(evidence, axis=-1), mass.shape))


def grounding_layers(num_layers: int) -> tuple[int, int, int]:
  """Grounded decoder layers: (question words, answer position, answer position) = (1, L // 2, L - 1); (1, 2, 3)
  for the testbed's L = 4."""
  return 1, num_layers // 2, num_layers - 1


def count_loss(attention: jax.Array, target: jax.Array) -> jax.Array:
  """Cross entropy of attention rows float32[B, S] against target distributions float32[B, S] (rows summing to 1;
  all-zero rows are ignored)."""
  ce = -jnp.sum(target * jnp.log(attention + 1e-6), axis=-1)
  return masked_mean(ce, jnp.sum(target, axis=-1) > 0)


def loss_fn(model, heads: heads_lib.AuxHeads, batch: Mapping, weights: LossWeights = LossWeights(), *,
            count_heads: int = 1, train_vision: bool = True):
  """The training objective -> (loss, metrics dict). `batch` is `batches.encode(..., with_answer=True,
  labels=True)` as arrays (`encode`'s targets below: `targets.grounding_targets`). Terms:

  - cross entropy of the answer token and the "</s>" after it;
  - `weights.question` x next-token cross entropy on the prompt text after the image (the question words);
  - `weights.aux` x `aux_losses` (vision tower);
  - `weights.grounding` x `grounding_loss` in three decoder layers (`grounding_layers`): in the first, head 0 of each
    colour or shape word of the question looks at the objects of that colour or shape; in the other two, heads 0
    and 1 of the position that predicts the answer look at the objects the answer depends on (for spatial
    questions head 0 at the first named object and head 1 at the second, on their base-crop tokens: `encode`'s
    head_evidence). Learning to route attention from a word to a few of ~250 image tokens from the answer loss
    alone plateaus for long on this budget; these heads shortcut it;
  - `weights.count` x `count_loss` of head 2 of the answer position in the middle grounded layer against
    `encode`'s count_target: attention to "<s>" (weight `encode`'s count_sink) and equally to each evidence
    object's centre token, so the head's output encodes how many objects the question names (attention normalises,
    so without a sink a head cannot count); with `count_heads=2` head 2 of the last layer too (its own keys and
    values under GQA, so a second reading of the count, not a copy), the term the mean of the two;
  - `weights.caption` x cross entropy of the logits at each object image token against the words of the object's
    colour and shape (mean of the two): the output head learns to name what an image token shows. Image positions
    are never decoded from, so this competes with no next-token target;
  - `weights.position` x `position_loss` of the base-crop tokens after the projector (`heads.text_position`, needs
    `AuxHeads(text_width=...)`) and, when the tower trains, of the tower's own output (`heads.position`);
  - `weights.relation` x mean squared error of `heads.relation` read from the residual stream at the answer position
    entering the last decoder layer, against `encode`'s relation_target, on spatial rows: the grounded heads look at
    the two named objects, and this asks them to carry the objects' places to the answer, which the answer loss alone
    does not make them do (`experiments.testbed.probe`, probe 4); the last layer then only has to compare them with
    the asked relation;
  - `weights.order` x the same with `heads.order` against `encode`'s order_target: the two objects' coordinates along
    the asked axis, oriented by the asked direction, so the answer is "yes" iff the first is smaller, a linear read
    of that residual. The word-dependent part of the comparison (which axis, which sign) must then happen before the
    last layer, under a dense regression target rather than the yes/no loss alone;
  - `weights.direction` x `grounding_loss` of head 1 of the answer position in the first grounded layer against
    `encode`'s direction_evidence (the asked relation word), on spatial rows: nothing else makes the answer position
    fetch that word ("left" and "right" are equally likely after a named object, so the question loss does not
    carry them forward), and without it the answer cannot depend on the asked direction;
  - `weights.count_read` x mean squared error of `heads.count` read where the relation term reads, against `encode`'s
    count_value (n / 6), on counting rows: the answer cross entropy treats the seven number words as unrelated
    classes, so a count off by one costs what one off by five does; this regression target asks the layers below the
    last to carry the count as one ordered quantity.

  train_vision=False stops the gradient at the vision features (the tower is frozen; `weights.aux` is then ignored).
  """
  grounded = weights.grounding or weights.count or weights.direction
  layers = grounding_layers(model.config.text.num_hidden_layers) if grounded else ()
  if count_heads not in (1, 2):
    raise ValueError(f"count_heads must be 1 or 2, got {count_heads}")
  reads = weights.relation or weights.order or weights.count_read
  if reads and heads.relation is None:
    raise ValueError("weights.relation, weights.order and weights.count_read need AuxHeads(..., text_width=...): "
                     "no head reads the decoder's residual stream")
  out = model_lib.forward(model, batch, None, pooled=train_vision, attention_layers=layers,
                          attention_queries=batch["grounding_queries"] if grounded else None,
                          train_vision=train_vision,
                          residual_positions=batch["target_positions"][:, :1] if reads else None)
  # attention rows [B, H, Q', S] of grounding_layers' three layers, in that order (forward returns each distinct
  # layer once, in increasing order; the layers coincide when the decoder has fewer than 4)
  attention = [out.attention[sorted(set(layers)).index(layer)] for layer in layers]
  logits = out.logits                                                                     # [B, S, V]
  answer_logits = jnp.take_along_axis(logits, batch["target_positions"][..., None], axis=1)
  answer_loss = optax.softmax_cross_entropy_with_integer_labels(answer_logits, batch["targets"]).sum(-1).mean()
  ids = batch["input_ids"]
  ce = optax.softmax_cross_entropy_with_integer_labels
  question_loss = masked_mean(ce(logits[:, :-1], ids[:, 1:]), batch["question_mask"][:, :-1])
  loss, metrics = answer_loss + weights.question * question_loss, {}
  if train_vision:
    aux, metrics = aux_losses(heads, out.features, out.pooled, batch)
    loss = loss + weights.aux * aux
  if weights.grounding:
    evidence = batch["grounding_evidence"]
    words = grounding_loss(attention[0][:, 0, :-1], evidence[:, :-1])
    answer = sum(grounding_loss(attention[k][:, :2, -1], batch["head_evidence"]) for k in (1, 2)) / 2
    loss = loss + weights.grounding * (words + answer)
    metrics = dict(metrics, grounding_words=words, grounding_answer=answer)
  if weights.count:
    count = sum(count_loss(attention[k][:, 2, -1], batch["count_target"]) for k in range(1, 1 + count_heads))
    count = count / count_heads
    loss = loss + weights.count * count
    metrics = dict(metrics, count=count)
  if weights.direction:
    direction = grounding_loss(attention[0][:, 1, -1], batch["direction_evidence"])
    loss = loss + weights.direction * direction
    metrics = dict(metrics, direction=direction)
  if weights.caption:
    targets = batch["caption_targets"]
    caption = jnp.stack([ce(logits, jnp.maximum(targets[..., k], 0)) for k in range(2)], -1).mean(-1)
    caption = masked_mean(caption, targets[..., 0] >= 0)
    loss = loss + weights.caption * caption
    metrics = dict(metrics, caption=caption)
  if weights.position:
    if heads.text_position is None:
      raise ValueError("weights.position needs AuxHeads(..., text_width=...): no head reads the projector's output")
    base = out.features[:, 0]                                                             # [B, T, Dv] base crop
    position = position_loss(heads.text_position, model.project(base))
    if train_vision:
      position = position + position_loss(heads.position, base)
    loss = loss + weights.position * position
    metrics = dict(metrics, position=position)
  if weights.relation:
    read = heads.relation(out.residuals[-2][:, 0])                                          # [B, 4]
    relation = masked_mean(jnp.mean(jnp.square(read - batch["relation_target"]), -1), batch["relation_valid"])
    loss = loss + weights.relation * relation
    metrics = dict(metrics, relation=relation)
  if weights.order:
    read = heads.order(out.residuals[-2][:, 0])                                             # [B, 2]
    order = masked_mean(jnp.mean(jnp.square(read - batch["order_target"]), -1), batch["relation_valid"])
    loss = loss + weights.order * order
    metrics = dict(metrics, order=order)
  if weights.count_read:
    read = heads.count(out.residuals[-2][:, 0])[:, 0]                                       # [B]
    count_read = masked_mean(jnp.square(read - batch["count_value"]), batch["count_valid"])
    loss = loss + weights.count_read * count_read
    metrics = dict(metrics, count_read=count_read)
  accuracy = jnp.mean(jnp.argmax(answer_logits[:, 0], -1) == batch["targets"][:, 0])
  return loss, dict(metrics, answer_loss=answer_loss, question_loss=question_loss, answer_accuracy=accuracy)


def vision_loss(model, heads: heads_lib.AuxHeads, batch: Mapping, weights: LossWeights):
  """The vision warm-up objective -> (loss, metrics dict): `aux_losses` and `weights.position` x `position_loss` of
  the tower's base-crop output; the decoder is not run."""
  px = batch["pixel_values"]
  b, p = px.shape[:2]
  vis = model.vision_tower.features(px.reshape(b * p, *px.shape[2:]),
                                    feature_layers=model.config.vision_feature_layer, select_strategy="full",
                                    cls_attention=False)
  full = vis.features.reshape(b, p, *vis.features.shape[1:])
  pooled = model.vision_tower.post_layernorm(full[:, :, 0])
  aux, metrics = aux_losses(heads, full[:, :, 1:], pooled, batch)
  if weights.position:
    position = position_loss(heads.position, full[:, 0, 1:])
    aux, metrics = aux + weights.position * position, dict(metrics, position=position)
  return aux, metrics
