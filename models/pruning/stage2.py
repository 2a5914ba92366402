"""Stage II: prune the image tokens between decoder layers, scored from a layer's own attention rows.

Reads the decoder through `LlamaModel.query_keys` (post-RoPE queries of the few rows it needs and the keys of the
sequence: never the S x S map) and `norm`. Axes: B batch, S sequence, C candidates, K kept, A text tokens after the
image, Q query rows, H / Hkv query / key-value heads, Dh head width, D width, E inserted rows.

A step is `score` (the relevance, at `PruningConfig.score_layer`), `choose` (what each row keeps: a `Choice`) and
`rebuild` (the new sequence). The driver runs them between the layer segments of `PruningConfig.segments`.

The timings ("before", "after": SparseVLM's, official Gumpest/SparseVLMs modelling_sparse_llama.py), what the
attention rows cost, the text raters ("attention", "sparsevlm") and why TOPS defaults to "attention" and "before",
variable counts and inserted rows, and SparseVLM's step: models/pruning/PRUNING.md#stage2.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.pruning import methods
from models.pruning import selection
from models.pruning import sequence
from models.pruning.config import PruningConfig
from models.pruning.outputs import Bound, Choice, Scores, StageOutput
from tops_jax import relevance as relevance_lib

__all__ = ["Scores", "Choice", "Bound", "score", "choose", "rebuild", "sparsevlm_raters", "ratio_counts",
           "step_bounds"]


def step_bounds(config: PruningConfig, num_candidates: int, text_len: int) -> tuple[Bound, ...]:
  """The static sizes of every step, for a first step of `num_candidates` candidates (host side; the driver's trace
  and the KV cache capacity read the same numbers): each step's keep, or the method's own bounds (SparseVLM's
  `stage2_bounds`)."""
  own = methods.get(config.method2).stage2_bounds
  if own is None:
    return tuple(Bound(keep) for _, keep in config.steps)
  return own(config, num_candidates, text_len)


def sparsevlm_raters(plan: sequence.Plan, seq: sequence.Seq, num_candidates: int, source_len: int) -> jax.Array:
  """SparseVLM's raters from the LLM input `seq`, by input position: bool[B, source_len] (True at the input_ids
  position of each rater); `score` reads them through `Seq.source`."""
  visual, visual_valid = sequence.first(seq.visual & seq.mask, num_candidates)
  text, text_valid = sequence.text_after_image(seq.mask, seq.visual, plan.text_len)
  scores = relevance_lib.sparsevlm_rater_scores(sequence.take(seq.hidden, visual), sequence.take(seq.hidden, text),
                                                visual_valid=visual_valid, text_valid=text_valid)
  raters = relevance_lib.select_raters(scores, text_valid)
  src = sequence.take(seq.source, text)
  at = jnp.where(raters & (src >= 0), src, source_len)
  rows = jnp.arange(at.shape[0])[:, None]
  return jnp.zeros((at.shape[0], source_len), bool).at[rows, at].set(True, mode="drop")


def score(model, config: PruningConfig, plan: sequence.Plan, seq: sequence.Seq, layer: int,
          num_candidates: int, raters: jax.Array | None = None) -> Scores:
  """Stage II relevance from the attention rows of `layer` (its input is seq.hidden). raters: bool[B, S_ids] from
  `sparsevlm_raters` when config.stage2_raters == "sparsevlm"."""
  lm = model.language_model
  visual, visual_valid = sequence.first(seq.visual & seq.mask, num_candidates)
  text, text_valid = sequence.text_after_image(seq.mask, seq.visual, plan.text_len)
  source = config.stage2_relevance
  spec = methods.get(config.method2)
  if source == "none" and not spec.reads_keys:
    return Scores(visual, visual_valid, None, text, text_valid, None)
  last = sequence.last_real(seq.mask)[:, None]
  slots = jnp.broadcast_to(jnp.arange(seq.mask.shape[1], dtype=jnp.int32), seq.mask.shape)
  q, k = lm.query_keys(layer, seq.hidden, seq.positions, last if source == "last_token" else text)
  q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)          # [B, H, Q, Dh], [B, Hkv, S, Dh]
  rel = block = chosen = None
  if source == "raters":
    rater_scores = None
    if config.stage2_raters == "sparsevlm":
      src = sequence.take(seq.source, text)
      chosen = jnp.take_along_axis(raters, jnp.clip(src, 0, raters.shape[1] - 1), axis=-1) & (src >= 0) & text_valid
      # 1 for the raters, 0 for the others: exactly they pass `select_raters`' strict above-mean test (all raters:
      # none passes and every valid text token rates, the same set).
      rater_scores = chosen.astype(jnp.float32)
    # Causal order is the slot order (the decoder's own mask), whatever the position components.
    positions = dict(q_positions=text, k_positions=slots)
    # One text -> visual block serves both the rater mean and SparseVLM's rank (the attention rows once).
    block = relevance_lib.text_visual_attention(q, k, visual=visual, kv_valid=seq.mask, text_valid=text_valid,
                                                visual_valid=visual_valid, **positions)
    rel = relevance_lib.rater_relevance(block, text_valid, rater_scores)
    if not spec.reads_block:
      block = None
  elif source == "last_token":
    rel = relevance_lib.last_token_attention(q[:, :, 0], k, visual=visual, kv_valid=seq.mask,
                                             q_position=last[:, 0], k_positions=slots)
    rel = jnp.where(visual_valid, rel, 0.0)
  keys = k.transpose(0, 2, 1, 3).reshape(*k.shape[:1], k.shape[2], -1) if spec.reads_keys else None
  return Scores(visual, visual_valid, rel, text, text_valid, keys, block, chosen)


def ratio_counts(ratio: float, num_visual: jax.Array, most: int) -> jax.Array:
  """int(n * ratio) for each row's n image tokens, with Python's float64 rounding (a static table over 0..most):
  int32[B] -> int32[B]."""
  table = np.array([int(n * ratio) for n in range(most + 1)], np.int32)
  return jnp.asarray(table)[jnp.clip(num_visual, 0, most)]


def choose(model, config: PruningConfig, seq: sequence.Seq, bound: Bound, scores: Scores, key, hp: dict[str, Any],
           count: jax.Array | None = None, step: int = 0) -> Choice:
  """The method's selection order over the candidates (hidden states entering the pruned layer); count int32[B]
  (default `keep`) is cut to `keep`. SparseVLM: its official step `step` (`tops_jax.sparsevlm.prune_step`: rank
  based or fixed count, top-k of the raters' mean attention, recycled clusters as inserted rows)."""
  spec = methods.get(config.method2)
  if spec.stage2_choose is not None:
    return spec.stage2_choose(model, config, seq, bound, scores, key, hp, step)
  keep = bound.keep
  feats, hp = spec.stage2_inputs(model, seq, scores, sequence.take(seq.hidden, scores.visual), dict(hp))
  order = selection.select_order(config.method2, feats, keep=keep, relevance=scores.relevance,
                             valid=scores.visual_valid, key=key, **hp)
  b = order.shape[0]
  count = jnp.full((b,), keep, jnp.int32) if count is None else jnp.minimum(count.astype(jnp.int32), keep)
  return Choice(order=order, count=count)


def _place(flags: jax.Array, rank: jax.Array, size: int, left: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Gather map packing each row's flagged slots, by increasing `rank`, into `size` slots (left or right padding).

  flags: bool[B, R], rank: int32[B, R] (distinct among a row's flagged slots) -> (index int32[B, size] into the R
  slots, -1 for padding; mask bool[B, size]).
  """
  b, r = flags.shape
  if size > r:
    flags = jnp.pad(flags, ((0, 0), (0, size - r)))
    rank = jnp.pad(rank, ((0, 0), (0, size - r)))
  big = jnp.iinfo(jnp.int32).max
  idx = jnp.argsort(jnp.where(flags, rank, big), axis=-1, stable=True)[:, :size].astype(jnp.int32)
  count = jnp.sum(flags, axis=-1, dtype=jnp.int32)
  slot = jnp.arange(size)[None, :] - jnp.where(left, size - count, 0)[:, None]
  valid = (slot >= 0) & (slot < count[:, None])
  index = jnp.take_along_axis(idx, jnp.clip(slot, 0, size - 1), axis=-1)
  return jnp.where(valid, index, -1), valid


def rebuild(config: PruningConfig, plan: sequence.Plan, seq: sequence.Seq, keep: int, scores: Scores,
            choice: Choice, left) -> tuple[sequence.Seq, jax.Array, StageOutput]:
  """The sequence after a step: [prefix; kept visual, ascending; inserted rows; suffix] per row, `text_len + keep + E`
  slots -> (sequence, index int32[B, S'] into seq (S + e: inserted row e; -1 padding), StageOutput)."""
  b, s = seq.mask.shape
  c = scores.visual.shape[1]
  rows = jnp.arange(b)[:, None]
  take_n = (jnp.arange(choice.order.shape[1])[None, :] < choice.count[:, None]) & jnp.take_along_axis(
      scores.visual_valid, choice.order, axis=-1)
  chosen_c = jnp.zeros((b, c), bool).at[rows, choice.order].max(take_n)
  kept_c, kept_valid = sequence.first(chosen_c, keep)                     # ascending candidate indices
  kept_at = jnp.take_along_axis(scores.visual, kept_c, axis=-1)
  chosen = jnp.zeros((b, s), bool).at[rows, jnp.where(kept_valid, kept_at, s)].set(True, mode="drop")
  flags = seq.mask & (~seq.visual | chosen)
  stage = StageOutput(candidates=jnp.where(scores.visual_valid, sequence.take(seq.packed, scores.visual), -1),
                      kept=jnp.where(kept_valid, sequence.take(seq.packed, kept_at), -1), relevance=scores.relevance)
  if choice.extra is None:
    index, mask = sequence.compact(flags, plan.text_len + keep, left)
    return sequence.gather_seq(seq, index, mask, config.positions), index, stage

  e = choice.extra.shape[1]
  extra_valid = jnp.ones((b, e), bool) if choice.extra_valid is None else choice.extra_valid
  # Slot j of seq ranks j * (E + 1); inserted row i ranks right after the image run's last slot.
  last_image = jnp.max(jnp.where(seq.visual & seq.mask, jnp.arange(s), 0), axis=-1)
  rank = jnp.concatenate([jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) * (e + 1), (b, s)),
                          (last_image * (e + 1) + 1)[:, None] + jnp.arange(e, dtype=jnp.int32)[None, :]], axis=1)
  index, mask = _place(jnp.concatenate([flags, extra_valid], axis=1), rank, plan.text_len + keep + e, left)
  fill = lambda x, value: jnp.full((b, e) + x.shape[2:], value, x.dtype)
  joined = sequence.Seq(
      hidden=jnp.concatenate([seq.hidden, choice.extra.astype(seq.hidden.dtype)], axis=1),
      positions=jnp.concatenate([seq.positions, jnp.broadcast_to(
          sequence.take_positions(seq.positions, last_image[:, None]), seq.positions.shape[:2] + (e,))], axis=-1),
      mask=jnp.concatenate([seq.mask, extra_valid], axis=1),
      visual=jnp.concatenate([seq.visual, fill(seq.visual, True)], axis=1),
      source=jnp.concatenate([seq.source, fill(seq.source, -1)], axis=1),
      packed=jnp.concatenate([seq.packed, fill(seq.packed, -1)], axis=1))
  return sequence.gather_seq(joined, index, mask, config.positions), index, stage
