"""The testbed's auxiliary heads: linear read-outs trained beside the model (training only, never saved in the
checkpoint), and which of them read the vision tower.

Axes: B batch, P crops per image (base + grid, padded), T patches per crop (CLS dropped), Dv vision width.
"""

import jax
from flax import nnx

from experiments.synthvqa import scenes

__all__ = ["NUM_COLORS", "NUM_SHAPES", "TEXT_SIDE", "TOWER_SIDE", "AuxHeads"]

NUM_COLORS, NUM_SHAPES = len(scenes.COLORS), len(scenes.SHAPES)
# The heads that read the text side (the projector's output, the decoder's residual stream): they train with the
# projector and the decoder. TOWER_SIDE, an nnx filter over an AuxHeads' state, selects the others, which read the
# vision tower and stay fixed while it is frozen.
TEXT_SIDE = ("text_position", "relation", "order", "count")
TOWER_SIDE = nnx.Not(nnx.Any(*(nnx.PathContains(name) for name in TEXT_SIDE)))


class AuxHeads(nnx.Module):
  """Auxiliary linear heads (training only, not saved): per-patch labels and per-crop presence on the vision tower;
  the (row, column) of each base-crop token read from the tower's output (`position`) and, with `text_width`, from
  the projector's output (`text_position`; see `losses.position_loss`); with `text_width`, the two named objects'
  (row, column) read from the decoder's residual stream at the answer position (`relation`; see `losses.loss_fn`),
  their coordinates along the asked axis (`order`), and a counting question's answer (`count`)."""

  def __init__(self, vision_width: int, text_width: int | None = None, *, rngs: nnx.Rngs):
    self.patch = nnx.Linear(vision_width, 2 * (1 + NUM_COLORS) + 1 + (1 + NUM_SHAPES), rngs=rngs)
    self.crop = nnx.Linear(vision_width, NUM_COLORS + NUM_SHAPES, rngs=rngs)
    # Created after the heads above, so adding them leaves those heads' initialisation as it was.
    self.position = nnx.Linear(vision_width, 2, rngs=rngs)
    self.text_position = nnx.Linear(text_width, 2, rngs=rngs) if text_width else None
    self.relation = nnx.Linear(text_width, 4, rngs=rngs) if text_width else None
    self.order = nnx.Linear(text_width, 2, rngs=rngs) if text_width else None
    self.count = nnx.Linear(text_width, 1, rngs=rngs) if text_width else None

  def __call__(self, features: jax.Array, pooled: jax.Array):
    """features float[B, P, T, Dv], pooled float[B, P, Dv] -> (patch logits float[B, P, T, 24], crop [B, P, 14])."""
    return self.patch(features), self.crop(pooled)
