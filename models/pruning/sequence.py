"""Sequence bookkeeping of the pruned forward: the batch's static lengths (`Plan`), which images each row holds
(`ImageRows`), the running sequence (`Seq`) and the row gathers that rebuild it after a pruning step (static shapes,
left or right padding preserved).

Axes: B rows, I images of the batch (in row order, then prompt order), J most images in a row, S sequence, R position
components, K slots asked for."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models import llama

__all__ = ["Plan", "Seq", "ImageRows", "concrete", "take", "take_images", "place_images", "take_positions", "reindexed", "first", "compact",
           "gather_seq", "image_slots", "last_real", "text_after_image", "text_length"]


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static lengths of a batch (see "Static lengths" in models/pruning/PRUNING.md#package)."""
  text_len: int        # most real non-image tokens in a row
  visual: int          # most image tokens in a row before pruning (all of its images)
  newlines: int        # most newline tokens an image keeps in Stage I ("rows"/"keep"), else 0
  rows: int = 0        # static image rows per image after Stage I (`stage1.capacity`), 0 without Stage I
  images: int = 1      # most images in a row (J)

  @property
  def row_slots(self) -> int:
    """Static image slots per row after Stage I: every image of the row brings at most `rows`."""
    return self.images * self.rows


class ImageRows(NamedTuple):
  """Which images each row holds: the images of a batch are in row order, each row's in prompt order (its <image>
  runs, as transformers' masked_scatter fills them)."""
  image_row: jax.Array    # int32[I] the row of each image
  row_images: jax.Array   # int32[B, J] the images of each row in prompt order, -1 past the row's count

  @classmethod
  def from_counts(cls, per_row) -> "ImageRows":
    """From the number of images in each row (host ints, int[B])."""
    per_row = np.asarray(per_row, np.int64)
    most = max(1, int(per_row.max(initial=0)))
    first_image = np.concatenate([[0], np.cumsum(per_row)[:-1]])
    m = np.arange(most)
    row_images = np.where(m[None] < per_row[:, None], first_image[:, None] + m[None], -1).astype(np.int32)
    return cls(image_row=np.repeat(np.arange(len(per_row)), per_row).astype(np.int32), row_images=row_images)

  @property
  def one_per_row(self) -> bool:
    """Static (from the shapes): every row holds exactly one image, image b in row b (I = B and J = 1)."""
    return self.row_images.shape[1] == 1 and self.image_row.shape[0] == self.row_images.shape[0]

  def of_rows(self, x: jax.Array) -> jax.Array:
    """Each row's images of x [I, ...] -> [B, J, ...] (past a row's count: its first image's). One image per row:
    x itself, no gather across rows (under a mesh, a gather of traced image indices gathers every row's images onto
    every device; a row reading its own row stays where its row is)."""
    if self.one_per_row:
      return x[:, None]
    return x[jnp.maximum(self.row_images, 0)]

  def of_images(self, x: jax.Array) -> jax.Array:
    """Each image's row of x [B, ...] -> [I, ...] (x itself for one image per row, see `of_rows`)."""
    return x if self.one_per_row else x[self.image_row]


class Seq(NamedTuple):
  """The sequence entering the next decoder layer, per row."""
  hidden: jax.Array     # float[B, S, D]
  positions: jax.Array  # int32[R, B, S] (R: the family's position components; `models.family`)
  mask: jax.Array       # bool[B, S]
  visual: jax.Array     # bool[B, S]
  source: jax.Array     # int32[B, S]
  packed: jax.Array     # int32[B, S] packed position of visual tokens (image m of the row: m * N + slot), -1 otherwise


def concrete(*xs) -> bool:
  """True when every x is given and not a tracer (host checks and exact static lengths are possible)."""
  return all(x is not None and not isinstance(x, jax.core.Tracer) for x in xs)


def take(x: jax.Array, idx: jax.Array) -> jax.Array:
  """Rows of x: float/int[B, S, ...] at int[B, R] (clipped) -> [B, R, ...]."""
  idx = jnp.clip(idx, 0, x.shape[1] - 1)
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def take_images(x: jax.Array, ordinal: jax.Array, slot: jax.Array) -> jax.Array:
  """Per row, entries of its images: x [B, J, N, ...] (`ImageRows.of_rows`) at image ordinal int[B, S] of the row,
  slot int[B, S] (clipped to [0, N)) -> [B, S, ...]. A gather with the rows as batch dimensions, which a mesh keeps
  split along them."""
  b, j, n = x.shape[:3]
  return take(x.reshape((b, j * n) + x.shape[3:]), ordinal * n + jnp.clip(slot, 0, n - 1))


def place_images(text_embeds: jax.Array, visual: jax.Array, image_embeds: jax.Array, ordinal: jax.Array,
                 slot: jax.Array) -> jax.Array:
  """The prompt's embeddings: text_embeds float[B, S, D] with image ordinal, slot (int[B, S]) of each row's images
  image_embeds float[B, J, N, D] (`ImageRows.of_rows`) at its visual positions (bool[B, S]). The model's own merge
  (`model.embed`, transformers' masked_scatter: the k-th <image> position of the batch takes the k-th real image
  row) places the same rows, row by row."""
  tokens = take_images(image_embeds, ordinal, slot).astype(text_embeds.dtype)
  return jnp.where(visual[..., None], tokens, text_embeds)


def take_positions(positions: jax.Array, idx: jax.Array) -> jax.Array:
  """Positions at per-row slots, on the last axis for any R: int32[R, B, S] at int[B, K] (clipped) -> [R, B, K]."""
  idx = jnp.broadcast_to(jnp.clip(idx, 0, positions.shape[-1] - 1)[None], positions.shape[:1] + idx.shape)
  return jnp.take_along_axis(positions, idx, axis=-1)


def reindexed(mask: jax.Array, components: int) -> jax.Array:
  """Positions re-indexed from 0 over the real slots (cumsum(mask) - 1, padding at 1) in every component:
  bool[B, S] -> int32[R, B, S]."""
  pos = llama.position_ids_from_mask(mask)
  return jnp.broadcast_to(pos[None], (components,) + pos.shape)


def first(flag: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """The first `size` positions where flag is True, in order: (int32[B, size], bool[B, size] real entries)."""
  if size > flag.shape[1]:
    flag = jnp.pad(flag, ((0, 0), (0, size - flag.shape[1])))
  idx = jnp.argsort(~flag, axis=-1, stable=True)[:, :size].astype(jnp.int32)
  return idx, jnp.take_along_axis(flag, idx, axis=-1)


def compact(keep: jax.Array, size: int, left: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Gather map that packs each row's kept positions, in order, into `size` slots.

  keep: bool[B, S]; left: bool[] left padding (kept rows end at the last slot) or right padding.
  Returns (index int32[B, size] with -1 for padding slots, mask bool[B, size]).
  """
  idx, _ = first(keep, size)
  count = jnp.sum(keep, axis=-1, dtype=jnp.int32)
  slot = jnp.arange(size)[None, :] - jnp.where(left, size - count, 0)[:, None]
  valid = (slot >= 0) & (slot < count[:, None])
  index = jnp.take_along_axis(idx, jnp.clip(slot, 0, size - 1), axis=-1)
  return jnp.where(valid, index, -1), valid


def gather_seq(seq: Seq, index: jax.Array, mask: jax.Array, positions: str) -> Seq:
  """The rows of `seq` at index int32[B, S'] (-1 padding) with mask bool[B, S']; positions re-indexed or kept."""
  pick = lambda x, fill: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 2)), take(x, index), fill)
  r = seq.positions.shape[0]
  pos = (reindexed(mask, r) if positions == "contiguous"
         else jnp.where(mask[None], take_positions(seq.positions, index), 1))
  return Seq(hidden=pick(seq.hidden, 0), positions=pos, mask=mask, visual=pick(seq.visual, False),
              source=pick(seq.source, -1), packed=pick(seq.packed, -1))


def image_slots(visual: jax.Array, row_images: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The image and slot of every visual position: the k-th visual slot of a row belongs to the first of the row's
  images whose cumulative slot count exceeds k (transformers' masked_scatter order).

  visual: bool[B, S]; row_images: int32[B, J] (`ImageRows`); counts: int32[I] slots each image fills.
  Returns (ordinal int32[B, S] the image's place in its row, within int32[B, S] the slot inside the image); both 0
  where `visual` is False.
  """
  per_row = jnp.where(row_images >= 0, counts[jnp.maximum(row_images, 0)], 0)
  ends = jnp.cumsum(per_row, axis=-1)                                       # [B, J]
  k = jnp.cumsum(visual, axis=-1, dtype=jnp.int32) - 1                      # [B, S]
  ordinal = jnp.minimum(jnp.sum(k[..., None] >= ends[:, None, :], axis=-1, dtype=jnp.int32), row_images.shape[1] - 1)
  start = jnp.take_along_axis(ends - per_row, ordinal, axis=-1)
  return jnp.where(visual, ordinal, 0), jnp.where(visual, k - start, 0)


def last_real(mask: jax.Array) -> jax.Array:
  """Index of each row's last real slot: bool[B, S] -> int32[B]."""
  return (mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=-1)).astype(jnp.int32)


def text_after_image(mask: jax.Array, visual: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """Positions of the real text tokens after each row's last image: (int32[B, size], bool[B, size])."""
  s = mask.shape[1]
  last_visual = jnp.max(jnp.where(visual, jnp.arange(s), -1), axis=-1)
  return first(mask & ~visual & (jnp.arange(s)[None, :] > last_visual[:, None]), size)


def text_length(input_ids, attention_mask, image_token_id: int) -> int:
  """The most real non-image tokens in a row (host numpy): the static `text_len` of a batch."""
  ids = np.asarray(input_ids)
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  return int(np.max(np.sum(mask & (ids != image_token_id), axis=-1)))
