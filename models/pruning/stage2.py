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

Variable counts and inserted rows (`Choice`, `rebuild`). A step keeps, per row, the first `count` (<= its static
keep K) candidates of the method's selection order (methods whose first k picks do not depend on K,
`config.VARIABLE_COUNT_METHODS`), and may insert E extra hidden-state rows (a static maximum, `extra_valid` per row),
placed right after the row's image run, before the text that follows it (SparseVLM's recycled tokens). The new
sequence has `text_len + K + E` slots; masks, positions (contiguous: re-indexed; original: inserted rows take the
position of the image run's last slot) and the KV cache stay exact. Inserted rows are visual (candidates of later
steps) with source and packed position -1; in `Segment.index` they are S_prev + e (row e of `extra`).
Per-row counts come from `stage2_ratios` (PyramidDrop: int(n * ratio) of the row's n image tokens entering the LLM,
Python's float rounding through a static table) or a method's `choose` (SparseVLM).

SparseVLM (method "sparsevlm", Stage II only; `config.sparsevlm_schedule` gives the official settings). Raters once
from the input embeddings ("sparsevlm" raters), timing "after", contiguous positions. At each step p the text ->
candidate block of layer p's head-mean attention (`tops_jax.sparsevlm.rater_attention`, all text rows, the raters
flagged) and the candidates' hidden states OUTPUT by layer p go through `tops_jax.sparsevlm.prune_step` with the
official step's rule (v1: min(int(rank * scale + bias), N - 1) unless rank == N; v1.5: min(count, N - 1)); the kept
tokens stay in place and the merged clusters are the inserted rows, in center order, so the new image run is
[kept ascending; merged], the official `select_and_merge_token`. Static sizes: `step_bounds`. `StageOutput.kept`
lists -1 for a kept token that is an earlier step's merged cluster (it has no packed position).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.pruning import sequence
from models.pruning.config import PruningConfig
from models.pruning.outputs import StageOutput
from tops_jax import prune
from tops_jax import relevance as relevance_lib
from tops_jax import sparsevlm as sparsevlm_lib

__all__ = ["Scores", "Choice", "Bound", "score", "choose", "rebuild", "sparsevlm_raters", "ratio_counts",
           "step_bounds"]


class Scores(NamedTuple):
  """What a Stage II step reads, gathered once at the scoring layer."""
  visual: jax.Array           # int32[B, C] sequence positions of the candidates
  visual_valid: jax.Array     # bool[B, C]
  relevance: jax.Array | None  # float32[B, C]
  text: jax.Array             # int32[B, A] sequence positions of the text after the image
  text_valid: jax.Array       # bool[B, A]
  keys: jax.Array | None      # float[B, S, Hkv * Dh] keys of the scoring layer (DART)
  block: jax.Array | None = None   # float32[B, A, C] text -> candidate attention, mean over heads (SparseVLM)
  raters: jax.Array | None = None  # bool[B, A] the text raters (SparseVLM)


class Bound(NamedTuple):
  """Static sizes of one step: at most `keep` kept candidates and `extra` inserted rows (the next step's candidates:
  keep + extra); `max_deleted` bounds SparseVLM's deleted count (None for the other methods)."""
  keep: int
  extra: int = 0
  max_deleted: int | None = None


def step_bounds(config: PruningConfig, num_candidates: int, text_len: int) -> tuple[Bound, ...]:
  """The static sizes of every step, for a first step of `num_candidates` candidates (host side; the driver's trace
  and the KV cache capacity read the same numbers). SparseVLM: `sparsevlm.step_sizes` over every N <= the
  candidates and every rank <= min(text_len, N), capped by the config's keep; its `recycle` then allots
  C = int(M / 10) + 1 rows with M = min(int(0.3 * max_deleted) + 1, N)."""
  if config.method2 != "sparsevlm":
    return tuple(Bound(keep) for _, keep in config.stage2)
  hp = dict(config.stage2_hparams)
  steps = sparsevlm_lib.schedule("llava-1.5", hp.get("budget", 192), hp.get("version", "v1")).steps
  out, n = [], num_candidates
  for (_, keep), step in zip(config.stage2, steps):
    size = sparsevlm_lib.step_sizes(step, n, text_len)
    recycled = min((3 * size.deleted) // 10 + 1, n)
    out.append(Bound(keep=max(min(keep, size.keep), 1), extra=recycled // 10 + 1, max_deleted=size.deleted))
    n = out[-1].keep + out[-1].extra
  return tuple(out)


class Choice(NamedTuple):
  """What a step keeps, per row.

  order: int32[B, K] candidate indices (into `Scores.visual`) in selection order.
  count: int32[B] how many of `order` the row keeps (<= K; invalid candidates are never kept).
  extra: float[B, E, D] rows inserted after the row's image run, or None.
  extra_valid: bool[B, E] which inserted rows are real (None: all, when `extra` is given).
  """
  order: jax.Array
  count: jax.Array
  extra: jax.Array | None = None
  extra_valid: jax.Array | None = None


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
  if source == "none" and config.method2 != "dart":
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
    if config.method2 != "sparsevlm":
      block = None
  elif source == "last_token":
    rel = relevance_lib.last_token_attention(q[:, :, 0], k, visual=visual, kv_valid=seq.mask,
                                             q_position=last[:, 0], k_positions=slots)
    rel = jnp.where(visual_valid, rel, 0.0)
  keys = k.transpose(0, 2, 1, 3).reshape(*k.shape[:1], k.shape[2], -1) if config.method2 == "dart" else None
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
  keep = bound.keep
  feats = sequence.take(seq.hidden, scores.visual)
  if config.method2 == "sparsevlm":
    official = sparsevlm_lib.schedule("llava-1.5", hp.get("budget", 192), hp.get("version", "v1")).steps[step]
    out = sparsevlm_lib.prune_step(scores.block, scores.raters, feats, scores.visual_valid, max_keep=keep,
                                   count=official.count, scale=official.scale, bias=official.bias,
                                   max_deleted=bound.max_deleted, key=key)
    c = scores.visual.shape[1]
    return Choice(order=jnp.minimum(out.kept, c - 1), count=out.num_kept, extra=out.recycled.tokens,
                  extra_valid=out.recycled.valid)
  hp = dict(hp)
  if config.method2 == "dart":
    norm = model.language_model.norm
    feats = norm(feats)
    hp.setdefault("keys", sequence.take(scores.keys, scores.visual))
    hp.setdefault("text_features", norm(sequence.take(seq.hidden, scores.text)))
    hp.setdefault("text_keys", sequence.take(scores.keys, scores.text))
    hp.setdefault("text_valid", scores.text_valid)
    # DART visits its pivots in Python set order of their prompt positions (the official loop).
    hp.setdefault("positions", sequence.take_positions(seq.positions, scores.visual)[0])
    hp.setdefault("text_positions", sequence.take_positions(seq.positions, scores.text)[0])
  order = prune.select_order(config.method2, feats, keep=keep, relevance=scores.relevance,
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
