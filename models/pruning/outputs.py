"""What the pruned forward returns (per-stage kept tokens, the sequence each layer segment ran on, the logits) and
the records the stages and the methods' hooks hand each other (Stage I's `Rows`; Stage II's `Scores`, `Bound`,
`Choice`)."""

from typing import Any, NamedTuple

import jax

__all__ = ["StageOutput", "Segment", "PruneOutput", "PrunedGeneration", "Rows", "Scores", "Bound", "Choice"]


class Rows(NamedTuple):
  """The image rows Stage I hands to the LLM per image, in order."""
  embeds: jax.Array   # float[I, R, D]
  valid: jax.Array    # bool[I, R] a prefix of each image
  packed: jax.Array   # int32[I, R] packed slot of each row, -1 for rows that have none (padding, CLS, merged)


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


class StageOutput(NamedTuple):
  """One pruning step. Packed positions index the image's tokens (LLaVA-1.5: patch index; NeXT: packing slot).
  Stage I is per image (its B axis is the images I); a Stage II step is per row, where image m of a row of several
  images holds packed positions m * N + slot (N: the images' packed length).

  candidates: int32[B, C] packed position of each candidate (-1: none), the order `relevance` follows.
  kept: int32[B, K] packed positions kept, ascending; -1 fills the slots of a data-dependent count (Stage I "ratio",
    "crop_fixed", "crop_divided"). Stage I layouts that hand the LLM rows outside the packing (stage1_grid="padded",
    VisionZip's CLS and merged tokens) list the rows in LLM order, -1 for a row that has no packed slot.
  relevance: float32[B, C] the relevance the method read, or None.
  """
  candidates: jax.Array
  kept: jax.Array
  relevance: jax.Array | None


class Segment(NamedTuple):
  """The sequence one layer segment ran on.

  index: int32[B, S_g] row of the previous segment's sequence each slot came from (segment 0: of input_ids); -1 pad.
  source: int32[B, S_g] position in input_ids (-1: padding).
  positions: int32[R, B, S_g] position ids (R: the family's components, `models.family`).
  mask: bool[B, S_g] real tokens.
  visual: bool[B, S_g] tokens at <image> positions.
  """
  index: jax.Array
  source: jax.Array
  positions: jax.Array
  mask: jax.Array
  visual: jax.Array


class PruneOutput(NamedTuple):
  """logits: float32[B, 1, V] at each row's last real token (`forward(..., all_logits=True)`: float32[B, S_G, V] over
    the last segment's sequence).
  stage1: StageOutput | None; stage2: one StageOutput per Stage II step; segments: G Segments.
  inputs_embeds: float[B, S_0, D] decoder input (after Stage I).
  tokens_per_layer / visual_per_layer: int32[B, L] real (visual) tokens each decoder layer processed.
  last_positions: int32[B, G] position of each row's last real token per segment (decoding continues from +1).
  cache: the prefill `llama.KVCache`, or None.
  """
  logits: jax.Array
  stage1: StageOutput | None
  stage2: tuple[StageOutput, ...]
  segments: tuple[Segment, ...]
  inputs_embeds: jax.Array
  tokens_per_layer: jax.Array
  visual_per_layer: jax.Array
  last_positions: jax.Array
  cache: Any = None


class PrunedGeneration(NamedTuple):
  tokens: jax.Array       # int32[B, M]
  num_tokens: jax.Array   # int32[B]
  prefill: PruneOutput    # logits of the last prompt token only: float32[B, 1, V]
