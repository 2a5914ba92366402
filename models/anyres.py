"""LLaVA-NeXT "anyres" geometry and the packing of per-crop features into one token sequence per image.

Axes: I images, B text sequences, S sequence, P crops per image (base crop + grid crops, padded), T vision tokens per
crop (g * g, CLS dropped), g vision patches per crop side, N packed image tokens (padded), D width.

Reference: transformers 5.23 `models/llava_next` (`select_best_resolution`, `get_anyres_image_grid_shape`,
`image_size_to_num_patches`, `unpad_image`, `LlavaNextModel.pack_image_features`, and the processor's token count
`LlavaNextProcessor._get_number_of_features`). The integers here are the same as theirs, including
`select_best_resolution`'s tie-breaking (first pinpoint wins a full tie) and `unpad_image`'s `round(x, 7)`.

What an image becomes (the "spatial_unpad" merge of LLaVA-1.6):
  crop 0 is the whole image resized to the crop size; crops 1..R*C tile the image resized-and-padded to the best
  pinpoint, row-major (R rows x C columns of crops). The grid crops' g x g feature maps are tiled into one
  (R*g) x (C*g) map, the rows or columns that only saw the processor's padding are cut (unpad), and a learned
  `image_newline` vector ends every remaining row. Packed order: the base crop's T tokens, then the unpadded map row
  by row, each row followed by one newline token.

Host geometry, device data. Everything that depends on `image_sizes` (which pinpoint, how much to unpad) is decided
on the host with Python integers, and `pack_layout` turns it into gather indices (`PackLayout`, numpy). Pass the
layout as arrays into a jitted function: `pack_features` and `merge_into_embeddings` are jit-safe and have static
shapes. The packed length N defaults to `max_num_features(...)`, the largest count any image can reach under the
pinpoints (2928 for LLaVA-1.6 at 336 px), so one compiled program serves every image size.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "PackLayout",
    "CropGrid",
    "select_best_resolution",
    "grid_shape",
    "crop_grid",
    "num_crops",
    "max_num_crops",
    "pad_crops",
    "unpad_bounds",
    "unpad_image",
    "tile_crops",
    "add_image_newline",
    "num_image_features",
    "max_num_features",
    "pack_layout",
    "pack_features",
    "merge_into_embeddings",
]


def _size(image_size, what: str = "image_size") -> tuple[int, int]:
  """(height, width) as Python ints from a pair, list, numpy or jax array; positive."""
  size = np.asarray(image_size)
  if size.shape != (2,) or not (np.issubdtype(size.dtype, np.integer) or np.all(size == np.round(size))):
    raise ValueError(f"{what} must be an integer pair (height, width), got {image_size!r}")
  height, width = int(size[0]), int(size[1])
  if height <= 0 or width <= 0:
    raise ValueError(f"{what} must be positive, got {(height, width)}")
  return height, width


def _pinpoints(pinpoints) -> list[tuple[int, int]]:
  if pinpoints is None or len(pinpoints) == 0:
    raise ValueError("image_grid_pinpoints must be a non-empty list of (height, width) resolutions")
  return [_size(p, "each image_grid_pinpoints entry") for p in pinpoints]


def select_best_resolution(image_size, pinpoints) -> tuple[int, int]:
  """The pinpoint (height, width) that keeps the most image pixels, then wastes the fewest; first wins full ties.

  An image scaled to fit a pinpoint keeps int(w * s) * int(h * s) pixels (s = the fitting scale), counted at most
  once per original pixel (upscaling adds nothing); the rest of the pinpoint is waste.
  """
  height, width = _size(image_size)
  best, best_kept, best_waste = None, 0, math.inf
  for pin_height, pin_width in _pinpoints(pinpoints):
    scale = min(pin_width / width, pin_height / height)
    kept = min(int(width * scale) * int(height * scale), width * height)
    waste = pin_width * pin_height - kept
    if kept > best_kept or (kept == best_kept and waste < best_waste):
      best, best_kept, best_waste = (pin_height, pin_width), kept, waste
  return best


def grid_shape(image_size, pinpoints, crop_size: int) -> tuple[int, int]:
  """(rows, cols) of grid crops for an image: the best pinpoint divided by the crop size (floor, as transformers)."""
  pin_height, pin_width = select_best_resolution(image_size, pinpoints)
  return pin_height // crop_size, pin_width // crop_size


class CropGrid(NamedTuple):
  """How the processor cuts an image into grid crops (`crop_grid`); all Python ints, pixels of the resized image.

  rows, cols: grid crops per column and per row (the best pinpoint divided by the crop size, floor);
  height, width: the image resized to fit inside the pinpoint with its aspect ratio kept (transformers'
    `get_patch_output_size`);
  pad_top, pad_left: zero padding above and left of the resized image, centring it in the pinpoint (the rest of the
    padding, `pinpoint - size - pad`, is below and right).
  Grid crop r, c (crop 1 + r * cols + c) covers rows [r * crop, (r + 1) * crop) and columns [c * crop, (c + 1) * crop)
  of the padded pinpoint; resized-image pixel (y, x) is original pixel (y * H / height, x * W / width).
  """
  rows: int
  cols: int
  height: int
  width: int
  pad_top: int
  pad_left: int


def crop_grid(image_size, pinpoints, crop_size: int) -> CropGrid:
  """The processor's resize-and-pad geometry of the grid crops for an image of (H, W) `image_size` (see `CropGrid`).

  Same integers as `LlavaNextImageProcessor(Pil)`: `select_best_resolution`, then `get_patch_output_size` (the side
  whose scale is smaller fills the pinpoint, the other is ceil(side * scale) capped at the pinpoint) and
  `_get_padding_size` (floor half of the slack before). The base crop (crop 0) is the whole image stretched to the
  crop and needs none of this.
  """
  height, width = _size(image_size)
  pin_height, pin_width = select_best_resolution((height, width), pinpoints)
  scale_w, scale_h = pin_width / width, pin_height / height
  if scale_w < scale_h:
    new_height, new_width = min(math.ceil(height * scale_w), pin_height), pin_width
  else:
    new_height, new_width = pin_height, min(math.ceil(width * scale_h), pin_width)
  return CropGrid(pin_height // crop_size, pin_width // crop_size, new_height, new_width,
                  (pin_height - new_height) // 2, (pin_width - new_width) // 2)


def num_crops(image_size, pinpoints, crop_size: int) -> int:
  """Crops the processor makes for an image: the grid crops (ceil per side) plus the base crop."""
  pin_height, pin_width = select_best_resolution(image_size, pinpoints)
  return -(-pin_height // crop_size) * -(-pin_width // crop_size) + 1


def max_num_crops(pinpoints, crop_size: int) -> int:
  """The most crops any image can get under these pinpoints (the padded P that fits every image)."""
  return max(-(-h // crop_size) * -(-w // crop_size) + 1 for h, w in _pinpoints(pinpoints))


def pad_crops(pixel_values, num_crops: int):
  """float[I, P, C, H, W] -> float[I, num_crops, C, H, W] with zero crops appended (P <= num_crops).

  The processor pads the crop axis to the most crops in its batch; padding to `max_num_crops` instead keeps one
  compiled program for every batch.
  """
  if pixel_values.ndim != 5 or pixel_values.shape[1] > num_crops:
    raise ValueError(f"pad_crops: expected float[I, P <= {num_crops}, C, H, W], got shape {pixel_values.shape}")
  xp = jnp if isinstance(pixel_values, jax.Array) else np
  return xp.pad(pixel_values, ((0, 0), (0, num_crops - pixel_values.shape[1]), (0, 0), (0, 0), (0, 0)))


def unpad_bounds(original_size, current_size) -> tuple[int, int, int, int]:
  """(top, bottom, left, right): the part of a padded feature map of `current_size` that saw the image.

  original_size: the image's (height, width) in pixels; current_size: the (height, width) of the tiled feature map.
  The processor resized the image to fit the pinpoint and centred it, so the map is cut symmetrically on the long side
  of the mismatch, `(current - scaled) // 2` on each end (as transformers' `unpad_image`).
  """
  height, width = _size(original_size, "original_size")
  cur_height, cur_width = _size(current_size, "current_size")
  if width / height > cur_width / cur_height:
    new_height = int(round(height * (cur_width / width), 7))
    pad = (cur_height - new_height) // 2
    return pad, cur_height - pad, 0, cur_width
  new_width = int(round(width * (cur_height / height), 7))
  pad = (cur_width - new_width) // 2
  return 0, cur_height, pad, cur_width - pad


def unpad_image(feature_map, original_size):
  """float[H, W, ...] -> float[H', W', ...]: the rows/columns of the map that saw the image (see `unpad_bounds`)."""
  top, bottom, left, right = unpad_bounds(original_size, feature_map.shape[:2])
  return feature_map[top:bottom, left:right]


def tile_crops(crop_features, rows: int, cols: int):
  """float[R * C, g * g, D] grid-crop tokens (row-major crops) -> float[R * g, C * g, D] one spatial map."""
  n, t, d = crop_features.shape
  g = math.isqrt(t)
  if n != rows * cols or g * g != t:
    raise ValueError(f"tile_crops: expected [{rows * cols}, g*g, D] for a {rows}x{cols} grid, "
                     f"got {crop_features.shape}")
  x = crop_features.reshape(rows, cols, g, g, d)
  return x.transpose(0, 2, 1, 3, 4).reshape(rows * g, cols * g, d)


def add_image_newline(feature_map, image_newline):
  """float[H, W, D], float[D] -> float[H * (W + 1), D]: the map row by row, each row ended by `image_newline`."""
  h, w, d = feature_map.shape
  xp = jnp if isinstance(feature_map, jax.Array) else np
  newline = xp.broadcast_to(xp.asarray(image_newline, dtype=feature_map.dtype), (h, 1, d))
  return xp.concatenate([feature_map, newline], axis=1).reshape(h * (w + 1), d)


def _image_geometry(image_size, pinpoints, crop_size: int, patch_size: int):
  """(g, rows, cols, (top, bottom, left, right)) for one image; checks that the pinpoint tiles into whole crops."""
  if crop_size <= 0 or patch_size <= 0 or crop_size % patch_size:
    raise ValueError(f"crop_size ({crop_size}) must be a positive multiple of patch_size ({patch_size})")
  pin_height, pin_width = select_best_resolution(image_size, pinpoints)
  if pin_height % crop_size or pin_width % crop_size:
    raise ValueError(f"pinpoint {(pin_height, pin_width)} is not a multiple of the crop size {crop_size}; "
                     "the model's crop grid would not match the processor's crops")
  g = crop_size // patch_size
  rows, cols = pin_height // crop_size, pin_width // crop_size
  return g, rows, cols, unpad_bounds(image_size, (rows * g, cols * g))


def num_image_features(image_size, pinpoints, crop_size: int, patch_size: int) -> int:
  """Image tokens of one image after packing: g*g base tokens + unpadded rows * (unpadded cols + 1 newline).

  This is the number of <image> tokens the processor writes (`vision_feature_select_strategy="default"`,
  `num_additional_image_tokens=1`, as in the llava-hf checkpoints).
  """
  g, _, _, (top, bottom, left, right) = _image_geometry(image_size, pinpoints, crop_size, patch_size)
  return g * g + (bottom - top) * (right - left + 1)


def max_num_features(pinpoints, crop_size: int, patch_size: int) -> int:
  """An upper bound on `num_image_features` over all image sizes: g*g + max over pinpoints of rows * (cols + 1)
  (reached by an image shaped like that pinpoint when it is the one selected, e.g. 672x672 -> 2928 for LLaVA-1.6)."""
  g = crop_size // patch_size
  return g * g + max((h // crop_size * g) * (w // crop_size * g + 1) for h, w in _pinpoints(pinpoints))


class PackLayout(NamedTuple):
  """Where each packed image token comes from (numpy on the host; pass as arrays into jitted code).

  source: int32[I, N] index into the image's flattened crop tokens float[P * T, D] (crop * T + token); -1 for
    newline and padding slots.
  crop: int32[I, N] crop of each token: 0 the base (global) crop, 1..R*C the grid crops row-major; -1 for newline and
    padding slots.
  newline: bool[I, N] slots holding `image_newline`.
  valid: bool[I, N] slots holding a real token (image or newline); valid slots are a prefix of each row.
  counts: int32[I] valid slots per image (= the <image> tokens the processor wrote for it).
  grid: int32[I, 2] (rows, cols) of grid crops per image.
  """
  source: np.ndarray
  crop: np.ndarray
  newline: np.ndarray
  valid: np.ndarray
  counts: np.ndarray
  grid: np.ndarray


def pack_layout(image_sizes, pinpoints, crop_size: int, patch_size: int, num_tokens: int | None = None) -> PackLayout:
  """Gather indices that pack each image's crop tokens into one row of the packed array.

  image_sizes: int[I, 2] original (height, width) per image, host values (as the processor returns them).
  num_tokens: the padded length N; defaults to `max_num_features` so that every image size shares one shape.
  """
  sizes = np.asarray(image_sizes)
  if sizes.ndim != 2 or sizes.shape[1] != 2 or sizes.shape[0] == 0:
    raise ValueError(f"image_sizes must be int[I, 2] (height, width) per image with I >= 1, got shape {sizes.shape}")
  if num_tokens is None:
    num_tokens = max_num_features(pinpoints, crop_size, patch_size)
  num_images = sizes.shape[0]
  source = np.full((num_images, num_tokens), -1, np.int32)
  crop = np.full((num_images, num_tokens), -1, np.int32)
  newline = np.zeros((num_images, num_tokens), bool)
  counts = np.zeros((num_images,), np.int32)
  grid = np.zeros((num_images, 2), np.int32)
  for i, image_size in enumerate(sizes):
    g, rows, cols, (top, bottom, left, right) = _image_geometry(image_size, pinpoints, crop_size, patch_size)
    t = g * g
    # Spatial position (y, x) of the tiled map lies in crop 1 + (y // g) * cols + x // g at token (y % g) * g + x % g.
    y, x = np.meshgrid(np.arange(top, bottom), np.arange(left, right + 1), indexing="ij")
    is_newline = x == right
    grid_crop = np.where(is_newline, -1, 1 + (y // g) * cols + x // g)
    grid_source = np.where(is_newline, -1, grid_crop * t + (y % g) * g + x % g)
    count = t + is_newline.size
    if count > num_tokens:
      raise ValueError(f"image {i} of size {tuple(image_size.tolist())} packs into {count} tokens, more than "
                       f"num_tokens={num_tokens}")
    source[i, :t], source[i, t:count] = np.arange(t), grid_source.ravel()
    crop[i, :t], crop[i, t:count] = 0, grid_crop.ravel()
    newline[i, t:count] = is_newline.ravel()
    counts[i], grid[i] = count, (rows, cols)
  valid = np.arange(num_tokens)[None, :] < counts[:, None]
  return PackLayout(source=source, crop=crop, newline=newline, valid=valid, counts=counts, grid=grid)


def pack_features(crop_features: jax.Array, source: jax.Array, newline: jax.Array, valid: jax.Array,
                  image_newline: jax.Array) -> jax.Array:
  """Packs per-crop tokens into one padded row per image (jit-safe).

  crop_features: float[I, P, T, D]; source, newline, valid: from `PackLayout` (int32/bool[I, N]);
  image_newline: float[D]. Returns float[I, N, D] with zeros in padding slots.
  """
  num_images, p, t, d = crop_features.shape
  if source.shape != newline.shape or source.shape != valid.shape or source.ndim != 2 or source.shape[0] != num_images:
    raise ValueError(f"pack_features: source/newline/valid must be [I={num_images}, N], got {source.shape}, "
                     f"{newline.shape}, {valid.shape}")
  if image_newline.shape != (d,):
    raise ValueError(f"pack_features: image_newline must be float[{d}], got shape {image_newline.shape}")
  if not isinstance(source, jax.core.Tracer) and int(np.max(source)) >= p * t:
    raise ValueError(f"pack_features: the layout reads crop token {int(np.max(source))} but crop_features holds only "
                     f"P*T = {p}*{t}; pad pixel_values to at least `num_crops` crops per image")
  flat = crop_features.reshape(num_images, p * t, d)
  gathered = jnp.take_along_axis(flat, jnp.maximum(source, 0)[..., None], axis=1)
  packed = jnp.where(newline[..., None], image_newline.astype(flat.dtype), gathered)
  return jnp.where(valid[..., None], packed, jnp.zeros((), flat.dtype))


def merge_into_embeddings(embeddings: jax.Array, image_mask: jax.Array, packed: jax.Array,
                          valid: jax.Array) -> jax.Array:
  """Writes packed image tokens into the <image> positions of the text embeddings (jit-safe).

  embeddings: float[B, S, D]; image_mask: bool[B, S] (input_ids == image_token_id); packed: float[I, N, D];
  valid: bool[I, N] (valid slots are a prefix of each row). Returns float[B, S, D].

  Same order as transformers' `masked_scatter`: the k-th <image> position of the flattened batch receives the k-th
  valid packed token of the images taken in order, so a sequence may hold zero, one or several images. The count
  of <image> tokens must equal the count of valid packed tokens; it raises on concrete inputs, and under jit extra
  <image> positions keep the last image's padding (zeros).
  """
  b, s, d = embeddings.shape
  if image_mask.shape != (b, s):
    raise ValueError(f"merge_into_embeddings: image_mask must be bool[{b}, {s}], got {image_mask.shape}")
  if packed.ndim != 3 or packed.shape[-1] != d or valid.shape != packed.shape[:2]:
    raise ValueError(f"merge_into_embeddings: packed must be float[I, N, {d}] with valid bool[I, N], got "
                     f"{packed.shape} and {valid.shape}")
  if not isinstance(image_mask, jax.core.Tracer) and not isinstance(valid, jax.core.Tracer):
    n_slots, n_feats = int(np.sum(image_mask)), int(np.sum(valid))
    if n_slots != n_feats:
      raise ValueError(f"merge_into_embeddings: {n_slots} <image> tokens in input_ids but {n_feats} image features; "
                       "the processor must expand <image> to `num_image_features` tokens per image")
  counts = jnp.sum(valid, axis=-1, dtype=jnp.int32)
  ends = jnp.cumsum(counts)
  rank = jnp.cumsum(image_mask.reshape(-1), dtype=jnp.int32) - 1
  image = jnp.minimum(jnp.searchsorted(ends, rank, side="right"), packed.shape[0] - 1)
  slot = jnp.clip(rank - (ends - counts)[image], 0, packed.shape[1] - 1)
  tokens = packed[image, slot].reshape(b, s, d).astype(embeddings.dtype)
  return jnp.where(image_mask[..., None], tokens, embeddings)
