"""Stage I: choose each image's tokens after the vision tower, before the LLM, and rebuild the prompt to hold them.

Reads the model only through the family interface (`models.family`: `model.visual_tokens` -> `VisualTokens`,
`model.project`, `model.embed`, `model.positions`, `model.language_model.embed`).
Axes: B batch, I images (`sequence.ImageRows`: one or several per row; the selection functions work per image, and
their B axis is I), S sequence, N packed image slots per image, P crops, T tokens per crop, K kept (here the budget),
O image rows handed to the LLM, A text tokens after the image, D text width, Dv vision width.

What the LLM receives is a list of O image rows per image (`Rows`); the layouts (`PruningConfig.stage1_scope`,
`stage1_grid`, `newlines`; the rows of `config.Layout`) decide the candidates, the quota of each and the order of
the rows. The layout table, newlines, and VisionZip's CLS layout: models/pruning/PRUNING.md#stage1.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from models import family
from models.family import VisualTokens
from models.pruning import crops as crops_lib
from models.pruning import methods
from models.pruning import selection
from models.pruning import sequence
from models.pruning.config import PruningConfig
from models.pruning.crops import nominal_crops
from models.pruning.outputs import Rows, StageOutput
from tops_jax import prune
from tops_jax import relevance as relevance_lib

__all__ = ["ClipText", "Rows", "visual_tokens", "capacity", "nominal_crops", "crop_quotas", "row_newlines", "select",
           "run"]


class ClipText(NamedTuple):
  """CDPruner's relevance inputs (stage1_relevance="clip_text"), passed to the pruned forward as `clip=`.

  image_head: the CLIP checkpoint's image head (post_layernorm + visual_projection; an NNX module, a pytree):
    float[..., Dv] vision features -> float[..., E].
  text_embeds: float[B, E] each row's CLIP text embedding (`models.clip_text`).
  """
  image_head: Any
  text_embeds: jax.Array


def visual_tokens(model, config: PruningConfig, pixel_values, layout, stage1: bool) -> VisualTokens:
  """One tower pass with exactly what the configured Stage I reads (the family's relevance signal it names, "cls"
  or "received", and the extras the method's `tower` hook names: VisionZip's keys and CLS features, PruMerge+'s
  last-layer q/k)."""
  extras = methods.get(config.method).tower(config) if stage1 else ()
  named = config.stage1_relevance in family.RELEVANCE       # the family's own signals
  relevance = (config.stage1_relevance,) if stage1 and named else ()
  return model.visual_tokens(pixel_values, layout, relevance=relevance, extras=extras)


def capacity(config: PruningConfig, model_config, *, visual: int, newlines: int, num_crops: int) -> int:
  """Static image rows per image after Stage I.

  visual: the most packed slots an image of the batch has (newlines included); newlines: the most newline slots an
  image keeps under newlines="rows"/"keep" (0 otherwise); num_crops: P of pixel_values.
  """
  budget, scope, grid = config.stage1_budget, config.stage1_scope, config.stage1_grid
  own = methods.get(config.method).capacity
  if own is not None:
    return own(config, model_config)
  if scope == "ratio":
    return max(1, min(visual, round(budget * visual / crops_lib.nominal_tokens(config, model_config)))) + newlines
  if scope == "crop_fixed":
    return crops_lib.per_crop_quota(config, model_config) * num_crops + (newlines if grid == "padded_unpad" else 0)
  return budget + newlines


def crop_quotas(available: jax.Array, budget: int) -> jax.Array:
  """Splits `budget` evenly over crops, each capped by its available tokens (water-filling): int[B, P] -> int32[B, P].

  Every crop gets min(available, level) for the largest level whose total fits the budget; the remainder goes one
  token each to the first crops (in crop order) that still have room. The quotas sum to `budget` whenever the
  capacities allow it.
  """
  available = available.astype(jnp.int32)
  levels = jnp.arange(budget + 1, dtype=jnp.int32)                              # a quota never exceeds the budget
  filled = jnp.sum(jnp.minimum(available[:, None, :], levels[None, :, None]), axis=-1)    # [B, levels]
  level = jnp.sum(filled <= budget, axis=-1, dtype=jnp.int32) - 1
  base = jnp.minimum(available, level[:, None])
  room = available > level[:, None]
  extra = room & (jnp.cumsum(room, axis=-1) <= (budget - jnp.sum(base, axis=-1))[:, None])
  return base + extra.astype(jnp.int32)


def row_newlines(selected: jax.Array, newline: jax.Array, crop: jax.Array) -> jax.Array:
  """Newline slots to keep under newlines="rows": those ending a grid row that keeps at least one token.

  selected: bool[B, N] kept packed tokens; newline: bool[B, N]; crop: int32[B, N] (0 base crop, > 0 grid, -1
  newline/padding). Returns bool[B, N].
  """
  count = jnp.cumsum(selected, axis=-1, dtype=jnp.int32)
  # A row starts after the previous newline, or after the last base-crop token for the first row.
  base_end = (crop == 0) & (jnp.pad(crop, ((0, 0), (0, 1)), constant_values=-1)[:, 1:] != 0)
  marks = jnp.where(newline | base_end, count, 0)
  before = jax.lax.cummax(jnp.pad(marks, ((0, 0), (1, 0)))[:, :-1], axis=1)
  return newline & (count > before)


def _rank(config: PruningConfig, feats, rel, valid, keep: int, key, hp) -> jax.Array:
  """Greedy rank of every token (keep for the unranked): float[I * P, T, X] rows of candidates -> int32[I * P, T]."""
  m, t = valid.shape
  order = selection.select_order(config.method, feats, keep=keep, relevance=rel, valid=valid, key=key, **hp)
  return jnp.full((m, t), t, jnp.int32).at[jnp.arange(m)[:, None], order].set(
      jnp.arange(order.shape[1], dtype=jnp.int32))


def _crop_relevance(config: PruningConfig, images: VisualTokens, feats, text, text_valid, clip_text):
  """Relevance of each crop token: float32[B, P, T] | None."""
  b, p, t = feats.shape[:3]
  source = config.stage1_relevance
  if source in family.RELEVANCE:
    return images.group_relevance.get(source)
  if source == "text":
    flat = feats.reshape(b, p * t, -1)
    return relevance_lib.text_embedding_cosine(flat, text, text_valid).reshape(b, p, t)
  if source == "clip_text":
    return _clip_relevance(images.group_features.reshape(b, p * t, -1), clip_text,
                           jnp.repeat(images.group_valid, t, axis=-1)).reshape(b, p, t)
  return None


def _clip_relevance(features, clip_text, valid):
  """CDPruner's relevance: `clip_text` = (CLIP image-embedding function, text embeddings float[B, E])."""
  return relevance_lib.clip_text_relevance(clip_text.image_head(features), clip_text.text_embeds, valid)


def _per_crop(config: PruningConfig, model_config, images: VisualTokens, text, text_valid, clip_text, key, hp):
  """Per-crop selection -> chosen bool[B, P, T] (crop tokens) and relevance float32[B, P, T] | None."""
  vision = config.stage1_features == "vision"
  feats = images.group_features if vision else images.group_embeds
  b, p, t = feats.shape[:3]
  budget, scope = config.stage1_budget, config.stage1_scope
  crop_valid = images.group_valid if images.group_valid is not None else jnp.ones((b, p), bool)
  if config.stage1_grid == "unpadded":      # each crop's tokens that unpadding keeps
    candidate = images.valid & ~images.structural
    slot = jnp.where(candidate, images.source, p * t)
    token_valid = jnp.zeros((b, p * t), bool).at[jnp.arange(b)[:, None], slot].set(True, mode="drop")
    token_valid = token_valid.reshape(b, p, t)
  else:
    token_valid = jnp.broadcast_to(crop_valid[:, :, None], (b, p, t))
  rel = _crop_relevance(config, images, feats, text, text_valid, clip_text)
  if scope == "per_crop":
    quota, keep = crop_quotas(jnp.sum(token_valid, axis=-1), budget), min(t, budget)
  elif scope == "crop_fixed":
    q = crops_lib.per_crop_quota(config, model_config)
    quota, keep = jnp.full((b, p), q, jnp.int32), q
  else:                                     # crop_divided: int(K / real crops)
    real = jnp.sum(crop_valid, axis=-1, dtype=jnp.int32)
    quota, keep = jnp.broadcast_to((budget // jnp.maximum(real, 1))[:, None], (b, p)), min(t, budget)
  rank = _rank(config, feats.reshape(b * p, t, -1), None if rel is None else rel.reshape(b * p, t),
               token_valid.reshape(b * p, t), keep, key, hp).reshape(b, p, t)
  chosen = (rank < quota[:, :, None]) & token_valid & crop_valid[:, :, None]
  return chosen, rel


def _packed_relevance(config: PruningConfig, images: VisualTokens, feats, text, text_valid, clip_text):
  source = config.stage1_relevance
  if source in family.RELEVANCE:
    return images.relevance.get(source)
  if source == "text":
    return relevance_lib.text_embedding_cosine(feats, text, text_valid)
  if source == "clip_text":
    return _clip_relevance(images.features, clip_text, images.valid & ~images.structural)
  return None


def _from_crops(x: jax.Array, source: jax.Array, fill) -> jax.Array:
  """Per-crop values float/bool[B, P, T] -> packed order [B, N] (fill at newline and padding slots)."""
  b = x.shape[0]
  flat = x.reshape(b, -1, 1)
  return jnp.where(source >= 0, sequence.take(flat, jnp.maximum(source, 0))[..., 0], fill)


def _newline_policy(config: PruningConfig, selected, images: VisualTokens):
  if config.newlines == "keep":
    return selected | images.structural
  if config.newlines == "rows":
    return selected | row_newlines(selected, images.structural, images.group)
  return selected


def _packed_rows(config: PruningConfig, selected, images: VisualTokens, embeds, capacity: int):
  """Rows for a subset of the packed slots (newline policy applied), in packed order -> (Rows, bool[B, N])."""
  selected = _newline_policy(config, selected, images)
  idx, valid = sequence.first(selected, capacity)
  return Rows(embeds=sequence.take(embeds, idx), valid=valid, packed=jnp.where(valid, idx, -1)), selected


def select(model, config: PruningConfig, images: VisualTokens, text, text_valid, clip_text, key, hp: dict[str, Any],
           capacity: int) -> tuple[Rows, jax.Array | None, StageOutput]:
  """Stage I selection -> (the rows for the LLM, the packed slots they are (bool[B, N]; None when rows are not a
  subset of the packed slots), StageOutput over the packed slots)."""
  mc = model.config
  budget, scope, grid = config.stage1_budget, config.stage1_scope, config.stage1_grid
  spec = methods.get(config.method)
  hp = spec.stage1_hparams(config, dict(hp), text, text_valid)
  candidate = images.valid & ~images.structural
  if config.newlines == "candidates":
    candidate = images.valid
  candidates = jnp.where(candidate, jnp.arange(candidate.shape[1], dtype=jnp.int32), -1)
  embeds = images.embeds
  rows_b = jnp.arange(embeds.shape[0])[:, None]

  own = None if spec.stage1_rows is None else spec.stage1_rows(model, config, images, key, hp)
  if own is not None:                       # the method's own output (VisionZip's CLS layout, PruMerge+)
    rows, kept, relevance = own
    return rows, None, StageOutput(candidates=candidates, kept=kept, relevance=relevance)

  if scope in ("per_crop", "crop_fixed", "crop_divided"):
    chosen, rel = _per_crop(config, mc, images, text, text_valid, clip_text, key, hp)
    packed_rel = None if rel is None else _from_crops(rel, images.source, 0.0)
    if grid == "padded":                    # every pick goes to the LLM, in canvas order
      b, p, t = chosen.shape
      perm = canvas_order(images, t)
      idx, valid = sequence.first(jnp.take_along_axis(chosen.reshape(b, p * t), perm, axis=-1), capacity)
      idx = jnp.take_along_axis(perm, idx, axis=-1)
      slot = jnp.take_along_axis(crops_lib.slot_of_source(images), idx, axis=-1)
      rows = Rows(embeds=sequence.take(images.group_embeds.reshape(b, p * t, -1), idx), valid=valid,
                  packed=jnp.where(valid, slot, -1))
      return rows, None, StageOutput(candidates=candidates, kept=rows.packed, relevance=packed_rel)
    picked = _from_crops(chosen, images.source, False) & candidate       # unpadding drops what it removes
    rows, selected = _packed_rows(config, picked, images, embeds, capacity)
    kept = _kept(picked, budget if scope == "per_crop" else capacity)
    return rows, selected, StageOutput(candidates=candidates, kept=kept, relevance=packed_rel)

  feats = images.features if config.stage1_features == "vision" else embeds
  rel = _packed_relevance(config, images, feats, text, text_valid, clip_text)
  if scope == "ratio":
    n = jnp.sum(candidate, axis=-1, dtype=jnp.int32)
    quota = jnp.round(budget * n / crops_lib.nominal_tokens(config, mc)).astype(jnp.int32)
    keep = min(capacity, candidate.shape[1])
    order = selection.select_order(config.method, feats, keep=keep, relevance=rel, valid=candidate, key=key, **hp)
    rank = jnp.full(candidate.shape, keep, jnp.int32).at[rows_b, order].set(jnp.arange(keep, dtype=jnp.int32))
    selected = (rank < quota[:, None]) & candidate
  elif prune.METHODS[config.method].merge is not None:
    merged, hp, project = spec.merge_inputs(config, images, feats, hp)
    tokens, kept = selection.merge(config.method, merged, keep=budget, relevance=rel, valid=candidate, key=key, **hp)
    embeds = embeds.at[rows_b, kept].set(model.project(tokens) if project else tokens)
    selected = jnp.zeros(candidate.shape, bool).at[rows_b, kept].set(True)
  else:
    kept = selection.select(config.method, feats, keep=budget, relevance=rel, valid=candidate, key=key, **hp)
    selected = jnp.zeros(candidate.shape, bool).at[rows_b, kept].set(True)
  size = capacity if scope == "ratio" else budget
  kept = _kept(selected, size)
  rows, selected = _packed_rows(config, selected, images, embeds, capacity)
  return rows, selected, StageOutput(candidates=candidates, kept=kept, relevance=rel)


def _kept(selected, size: int) -> jax.Array:
  """The first `size` selected slots, ascending, -1 past the selection: int32[B, size]."""
  idx, valid = sequence.first(selected, min(size, selected.shape[1]))
  return jnp.where(valid, idx, -1).astype(jnp.int32)


def canvas_order(images: VisualTokens, t: int) -> jax.Array:
  """The flattened crop tokens [P * T] in the official anyres order, as a permutation int32[B, P * T]: the base
  crop's tokens, then the grid crops' tokens row-major over the padded canvas of the grid (rows cross crops: the
  reshape (rows, cols, g, g) -> permute (0, 2, 1, 3) of the LLaVA-NeXT code before unpadding), then padding crops."""
  b, p = images.group_valid.shape
  g = int(round(t ** 0.5))
  cols = images.grid[:, 1]
  crop = jnp.arange(p)[:, None]
  tok = jnp.arange(t)[None, :]
  i, j = (crop - 1) // jnp.maximum(cols[:, None, None], 1), (crop - 1) % jnp.maximum(cols[:, None, None], 1)
  a, c = tok // g, tok % g
  canvas = (i * g + a) * (cols[:, None, None] * g) + (j * g + c)
  key = jnp.where(crop == 0, tok, t + canvas)
  key = jnp.where(images.group_valid[:, :, None], key, p * t + crop * t + tok)
  return jnp.argsort(key.reshape(b, p * t), axis=-1, stable=True).astype(jnp.int32)


def run(model, config: PruningConfig, plan: sequence.Plan, ids, mask, images: VisualTokens,
        image_rows: sequence.ImageRows, clip_text, key, left, hp: dict[str, Any],
        layout=None) -> tuple[sequence.Seq, StageOutput]:
  """Stage I -> (the sequence entering layer 0, StageOutput over the images [I, ...]). Each image is selected on its
  own with its row's text; the row then holds its images' rows in prompt order, image m of the row at packed slots
  m * N + slot (`Seq.packed`). Positions: re-indexed from 0 over the rebuilt prompt (1-D RoPE), or, for a model
  with multimodal rotary ids (`model.KEEPS_POSITIONS`: M-RoPE), each kept token's own id from the full prompt
  (`layout`: the family's layout, which those ids read)."""
  image_id = model.config.image_token_id
  is_image = (ids == image_id) & mask
  text_idx, text_valid = sequence.text_after_image(mask, is_image, plan.text_len)
  text = sequence.take(model.language_model.embed(ids), text_idx)
  # Rows read their own images (`ImageRows.of_rows` / `of_images`, `sequence.take_images`): under a mesh, a gather at
  # traced image indices would gather every row's tokens onto every device.
  if clip_text is not None:
    clip_text = clip_text._replace(text_embeds=image_rows.of_images(clip_text.text_embeds))
  rows, selected, stage = select(model, config, images, image_rows.of_images(text), image_rows.of_images(text_valid),
                                 clip_text, key, hp, plan.rows)
  ordinal, within = sequence.image_slots(is_image, image_rows.row_images,
                                         jnp.sum(images.valid, axis=-1, dtype=jnp.int32))
  if selected is not None:      # the kept slots' own <image> positions
    kept_here = sequence.take_images(image_rows.of_rows(selected), ordinal, within)
  else:                         # the first n positions of the image's run, n = the image's row count
    counts = image_rows.of_rows(jnp.sum(rows.valid, axis=-1, dtype=jnp.int32))
    kept_here = within < jnp.take_along_axis(counts, ordinal, axis=-1)
  keep = mask & (~is_image | kept_here)
  index, new_mask = sequence.compact(keep, plan.text_len + plan.row_slots, left)
  new_ids = jnp.where(new_mask, sequence.take(ids, index), 0 if image_id else 1)
  visual = (new_ids == image_id) & new_mask
  ordinal, row = sequence.image_slots(visual, image_rows.row_images, jnp.sum(rows.valid, axis=-1, dtype=jnp.int32))
  packed = sequence.take_images(image_rows.of_rows(rows.packed), ordinal, row)
  packed = jnp.where(visual & (packed >= 0), packed + ordinal * images.embeds.shape[1], -1)
  if getattr(model, "KEEPS_POSITIONS", False):     # M-RoPE ids carry the image geometry: never renumbered
    positions = jnp.where(new_mask[None], sequence.take_positions(model.positions(ids, mask, layout), index), 1)
  else:
    positions = model.positions(new_ids, new_mask)
  # The model's merge (`model.embed`) row by row; padding never holds the image id, so `visual` is its image mask.
  hidden = sequence.place_images(model.language_model.embed(new_ids), visual, image_rows.of_rows(rows.embeds),
                                 ordinal, row)
  seq = sequence.Seq(hidden=hidden, positions=positions, mask=new_mask, visual=visual,
                     source=index, packed=packed)
  return seq, stage
