"""Stage II: prune the image tokens between decoder layers, scored from a layer's own attention rows.

Reads the decoder through `LlamaModel.query_keys` (post-RoPE queries of the few rows it needs and the keys of the
sequence: never the S x S map) and `norm`. Axes: B batch, S sequence, C candidates, K kept, A text tokens after the
image, Q query rows, H / Hkv query / key-value heads, Dh head width, D width, E inserted rows.

A step is `score` (the relevance, at `PruningConfig.score_layer`), `choose` (what each row keeps: a `Choice`) and
`rebuild` (the new sequence). The driver runs them between the layer segments of `PruningConfig.segments`.

Timing (`stage2_timing`; the driver's loop, this module's inputs). A step at layer l:
- "before" (default): the pruned sequence enters layer l. The scoring layer's attention rows are computed on its
  input; the features are the hidden states entering layer l. FastV and DART score at layer l - 1 (their official
  codes: FastV's layer K - 1 attention, DART's layer K - 1 keys), every other method at layer l (PyramidDrop's
  `pdrop_rank_drop` projects the layer's own q/k from its input, official Cooperx521/PyramidDrop).
- "after": layer l runs on the full sequence and writes the full sequence into its KV cache; its attention rows
  score; its OUTPUT is pruned, so layer l + 1 is the first pruned layer and the features are layer l's output. This
  is SparseVLM's official timing (Gumpest/SparseVLMs v1 and v1.5, modelling_sparse_llama.py
  `LlamaDynamicvitModel.forward`: the layer in `pruning_loc` runs with the whole sequence, returns its attention,
  and `layer_outputs[0]` is cut). For FastV / DART, "after" at l equals "before" at l + 1.
Generation is exact under both: the cache of each layer holds the sequence that layer saw (the segment bounds are
`prune_layer`), and a new token's position in a segment continues that segment's positions.

What the attention rows cost. The rows are exact softmax rows of the scoring layer, computed from Q query rows
(raters, the last token) against the S keys: O(Q S Dh) per head plus one k projection of the layer input, never the
S x S map and never an eager layer. Under "before" timing the scoring layer never runs on the unpruned sequence (it
runs on the pruned one), so no full-sequence attention call exists whose logsumexp residual
(`jax.nn.dot_product_attention(..., return_residual=True)`) could normalise the rows: the normaliser over the S keys
is the work a residual would have saved, and it is the same O(Q S) as the rows. For LLaVA-NeXT-7B at T = 320 the
recomputed k projections of the two TOPS steps are 0.6% of the pruned prefill's FLOPs (BUILD.md "Speed").

Text raters (`stage2_raters`, relevance "raters"): relevance = attention of the raters to the visual tokens at the
scoring layer, mean over raters and heads (`relevance.text_rater_attention`); the modes differ in who rates.
- "attention" (default): re-chosen at every step from that layer's attention, the text tokens after the image whose
  attention mass to the visual tokens (mean over heads) is strictly above the mean over those text tokens.
- "sparsevlm": chosen ONCE from the LLM input embeddings and reused at every step, SparseVLM's rule (v1 and v1.5
  alike, `LlamaDynamicvitModel.forward`): m = softmax over the text tokens of (visual @ text^T) (no 1/sqrt(D)),
  averaged over the visual tokens; raters = text tokens after the image with m > mean(m) strictly
  (`relevance.sparsevlm_rater_scores` + `select_raters`). The text after the image is never pruned, so the same
  tokens rate at every layer; with Stage I the input embeddings are the pruned prompt's.
Why "attention" is TOPS' default: the paper applies the text-visual relevance threshold inside Algorithm 2, at
the pruning layer l, on that layer's quantities (its hidden states and attention); the threshold rule itself
("above the mean over text tokens") is SparseVLM's, which both modes apply. Choosing the raters once from the input
embeddings is SparseVLM's implementation, not a step the TOPS text states. (TOPS shares authors with SparseVLM, so
its unreleased code may reuse SparseVLM's rater and timing code: `tops_schedule(raters="sparsevlm",
timing="after")` runs that reading.)
Why "before" is TOPS' default: the paper's schedule table changes the budget AT L12 / L24 (2T -> T from layer 12
on), the convention of FastV and PyramidDrop for "pruning at layer l"; and it fits every decoder the schedule fits
("after" needs l + 1 < L).

Variable counts and inserted rows (`Choice`, `rebuild`). A step keeps, per row, the first `count` (<= its static keep
K) candidates of the method's selection order (methods whose first k picks do not depend on K,
`Method.variable_count`, `models.pruning.methods`), and may insert E extra hidden-state rows (a static maximum,
`extra_valid` per row), placed right after the row's image run, before the text that follows it (SparseVLM's recycled
tokens). The new sequence has `text_len + K + E` slots; masks, positions (contiguous: re-indexed; original: inserted
rows take the position of the image run's last slot) and the KV cache stay exact. Inserted rows are visual (candidates
of later steps) with source and packed position -1; in `Segment.index` they are S_prev + e (row e of `extra`). Per-row
counts come from `stage2_ratios` (PyramidDrop: int(n * ratio) of the row's n image tokens entering the LLM, Python's
float rounding through a static table) or a method's `choose` (SparseVLM).

SparseVLM (method "sparsevlm", Stage II only; `methods.sparsevlm` holds the official settings and its step). Raters once
from the input embeddings ("sparsevlm" raters), timing "after", contiguous positions. At each step p the text ->
candidate block of layer p's head-mean attention (`tops_jax.sparsevlm.rater_attention`, all text rows, the raters
flagged) and the candidates' hidden states OUTPUT by layer p go through `tops_jax.sparsevlm.prune_step` with the
official step's rule (v1: min(int(rank * scale + bias), N - 1) unless rank == N; v1.5: min(count, N - 1)); the kept
tokens stay in place and the merged clusters are the inserted rows, in center order, so the new image run is
[kept ascending; merged], the official `select_and_merge_token`. Static sizes: `step_bounds`. `StageOutput.kept`
lists -1 for a kept token that is an earlier step's merged cluster (it has no packed position).
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
