"""The optimiser of a testbed training phase, and which parameters a phase keeps fixed.

The parameters are a pair (model state, heads state) of `nnx.State`s (`nnx.split` of the model and of its
`heads.AuxHeads`). What a phase keeps fixed is a pair of nnx filters over them (`Frozen`): `TOWER`, the vision tower
and the auxiliary heads that read it, or `NOTHING`.
"""

import jax
import optax
from flax import nnx
from flax.nnx import filterlib

from experiments.testbed import heads

__all__ = ["Frozen", "NOTHING", "TOWER", "frozen_labels", "make"]

# (model filter, heads filter): the parameters a phase keeps fixed, in (model state, heads state).
Frozen = tuple[filterlib.Filter, filterlib.Filter]
NOTHING: Frozen = (nnx.Nothing, nnx.Nothing)
# The vision tower and the heads that read it; the projector-side position head trains with the projector, the
# residual-stream heads with the decoder.
TOWER: Frozen = (nnx.PathContains("vision_tower"), heads.TOWER_SIDE)


def frozen_labels(state: nnx.State, frozen: filterlib.Filter) -> nnx.State:
  """`optax.multi_transform` labels of `state`, the same tree: "frozen" on the variables the nnx filter `frozen`
  selects, "trained" on the others."""
  select = filterlib.to_predicate(frozen)
  return nnx.map_state(lambda path, v: jax.tree.map(lambda _: "frozen" if select(path, v) else "trained", v), state)


def make(steps: int, peak: float, frozen: Frozen = NOTHING, *, warmup_steps: int,
         weight_decay: float) -> optax.GradientTransformation:
  """adamw (b1 0.9, b2 0.98; decay on matrices only) with linear warmup to `peak` over min(warmup_steps, steps // 2)
  steps and cosine decay to 2% of it at `steps`, after global-norm clipping at 1, for params = (model state, heads
  state); the parameters `frozen` selects never change (no update, no weight decay)."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak, min(warmup_steps, steps // 2), max(steps, 1),
                                                end_value=0.02 * peak)
  decay_mask = lambda params: jax.tree.map(lambda a: a.ndim >= 2, params)
  adamw = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=weight_decay, mask=decay_mask))
  labels = lambda params: tuple(frozen_labels(state, f) for state, f in zip(params, frozen, strict=True))
  return optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, labels)
