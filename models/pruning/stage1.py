"""Stage I: choose K of each image's tokens after the projector, before the LLM, and rebuild the prompt to hold them.

Reads the model only through its public image-token interface (`model.image_tokens` -> `models.outputs.ImageTokens`,
the same for LLaVA-1.5 and LLaVA-NeXT), `model.project`, `model.embed` and `model.language_model.embed`.
Axes: B batch (one image per row), S sequence, N packed image slots per image, P crops, T tokens per crop, K kept,
A text tokens after the image, D text width, Dv vision width.
"""

from typing import Any

import jax
import jax.numpy as jnp

from models import llama
from models.outputs import ImageTokens
from models.pruning import sequence
from models.pruning.config import PruningConfig
from models.pruning.outputs import StageOutput
from tops_jax import prune
from tops_jax import relevance as relevance_lib

__all__ = ["image_tokens", "crop_quotas", "row_newlines", "select", "run"]


def image_tokens(model, config: PruningConfig, pixel_values, layout, stage1: bool) -> ImageTokens:
  """One tower pass with exactly what the configured Stage I reads (CLS attention, VisionZip's keys)."""
  return model.image_tokens(pixel_values, layout, cls_attention=stage1 and config.stage1_relevance == "cls",
                            keys=stage1 and config.method == "visionzip")


def crop_quotas(capacity: jax.Array, budget: int) -> jax.Array:
  """Splits `budget` evenly over crops, capped by capacity (water-filling): int[B, P] -> int32[B, P].

  Every crop gets min(capacity, level) for the largest level whose total fits the budget; the remainder goes one
  token each to the first crops (in crop order) that still have room. The quotas sum to `budget` whenever the
  capacities allow it.
  """
  capacity = capacity.astype(jnp.int32)
  levels = jnp.arange(budget + 1, dtype=jnp.int32)                              # a quota never exceeds the budget
  filled = jnp.sum(jnp.minimum(capacity[:, None, :], levels[None, :, None]), axis=-1)    # [B, levels]
  level = jnp.sum(filled <= budget, axis=-1, dtype=jnp.int32) - 1
  base = jnp.minimum(capacity, level[:, None])
  room = capacity > level[:, None]
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


def _select_per_crop(config: PruningConfig, images: ImageTokens, text, text_valid, key, hp):
  """Per-crop selection -> (selected bool[B, N] packed slots, relevance float32[B, N] | None)."""
  img, cls, source = images.crop_embeds, images.crop_cls_attention, images.source
  b, p, t, d = img.shape
  budget = config.stage1_budget
  candidate = images.valid & ~images.newline
  slot = jnp.where(candidate, source, p * t)
  token_valid = jnp.zeros((b, p * t), bool).at[jnp.arange(b)[:, None], slot].set(True, mode="drop")
  token_valid = token_valid.reshape(b * p, t)
  feats = img.reshape(b * p, t, d)
  rel = None
  if config.stage1_relevance == "cls":
    rel = cls.reshape(b * p, t)
  elif config.stage1_relevance == "text":
    rel = relevance_lib.text_embedding_cosine(feats, jnp.repeat(text, p, axis=0), jnp.repeat(text_valid, p, axis=0))
  quota = crop_quotas(jnp.sum(token_valid, axis=-1).reshape(b, p), budget).reshape(b * p, 1)
  order = prune.select_order(config.method, feats, keep=min(t, budget), relevance=rel, valid=token_valid, key=key,
                             **hp)
  rank = jnp.full((b * p, t), t, jnp.int32).at[jnp.arange(b * p)[:, None], order].set(
      jnp.arange(order.shape[1], dtype=jnp.int32))
  chosen = ((rank < quota) & token_valid).reshape(b, p * t, 1)
  from_crop = lambda x: sequence.take(x, jnp.maximum(source, 0))[..., 0]
  selected = from_crop(chosen) & candidate
  packed_rel = None if rel is None else jnp.where(candidate, from_crop(rel.reshape(b, p * t, 1)), 0.0)
  return selected, packed_rel


def select(model, config: PruningConfig, images: ImageTokens, text, text_valid, key, hp: dict[str, Any]):
  """-> (selected bool[B, N], kept int32[B, K], embeds float[B, N, D] with merged rows, relevance | None)."""
  budget = config.stage1_budget
  hp = dict(hp)
  if config.method == "trimtokenator":
    hp.setdefault("text", text)
    hp.setdefault("text_valid", text_valid)
  candidate = images.valid & ~images.newline
  embeds = images.embeds
  if config.stage1_scope == "per_crop":
    selected, rel = _select_per_crop(config, images, text, text_valid, key, hp)
    kept, _ = sequence.first(selected, budget)
    return selected, kept, embeds, rel
  rel = None
  if config.stage1_relevance == "cls":
    rel = images.cls_attention
  elif config.stage1_relevance == "text":
    rel = relevance_lib.text_embedding_cosine(embeds, text, text_valid)
  rows = jnp.arange(embeds.shape[0])[:, None]
  if config.method == "visionzip":            # merged in the vision space, then projected
    hp.setdefault("keys", images.keys)
    tokens, kept = prune.merge("visionzip", images.features, keep=budget, relevance=rel, valid=candidate, key=key,
                               **hp)
    embeds = embeds.at[rows, kept].set(model.project(tokens))
  elif prune.METHODS[config.method].merge is not None:
    tokens, kept = prune.merge(config.method, embeds, keep=budget, relevance=rel, valid=candidate, key=key, **hp)
    embeds = embeds.at[rows, kept].set(tokens)
  else:
    kept = prune.select(config.method, embeds, keep=budget, relevance=rel, valid=candidate, key=key, **hp)
  selected = jnp.zeros(candidate.shape, bool).at[rows, kept].set(True)
  return selected, kept, embeds, rel


def run(model, config: PruningConfig, plan: sequence.Plan, ids, mask, images: ImageTokens, key, left,
        hp: dict[str, Any]) -> tuple[sequence.Seq, StageOutput]:
  """Stage I -> (the sequence entering layer 0, StageOutput)."""
  budget = config.stage1_budget
  image_id = model.config.image_token_id
  is_image = (ids == image_id) & mask
  text_idx, text_valid = sequence.text_after_image(mask, is_image, plan.text_len)
  text = sequence.take(model.language_model.embed(ids), text_idx)
  selected, kept, embeds, rel = select(model, config, images, text, text_valid, key, hp)
  if config.newlines == "keep":
    selected = selected | images.newline
  elif config.newlines == "rows":
    selected = selected | row_newlines(selected, images.newline, images.crop)
  rows, rows_valid = sequence.first(selected, budget + plan.newlines)

  packed = jnp.where(is_image, jnp.cumsum(is_image, axis=-1, dtype=jnp.int32) - 1, -1)
  keep = mask & (~is_image | sequence.take(selected[..., None], jnp.maximum(packed, 0))[..., 0])
  index, new_mask = sequence.compact(keep, plan.text_len + budget + plan.newlines, left)
  new_ids = jnp.where(new_mask, sequence.take(ids, index), 0 if image_id else 1)
  seq = sequence.Seq(hidden=model.embed(new_ids, sequence.take(embeds, rows), rows_valid),
                     positions=llama.position_ids_from_mask(new_mask), mask=new_mask, visual=new_ids == image_id,
                     source=index, packed=jnp.where(new_mask, sequence.take(packed, index), -1))
  candidate = images.valid & ~images.newline
  candidates = jnp.where(candidate, jnp.arange(candidate.shape[1], dtype=jnp.int32), -1)
  return seq, StageOutput(candidates=candidates, kept=kept.astype(jnp.int32), relevance=rel)
