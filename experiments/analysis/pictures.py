"""Kept-token pictures: which pixels of the original image each method's kept tokens saw.

Axes: H image height, W image width (pixels), N packed image slots of one image, K kept slots, R pictured images
(rows), C pictured methods (columns).

    boxes = pictures.slot_boxes((h, w), model.layout(np.array([[h, w]]), 1), 0, model.config)   # either family
    pictures.kept_picture(images, [[pictures.kept_mask((h, w), boxes, kept), ...], ...], titles, "kept_tokens.png")

Pictures. A kept token is drawn as the pixels of the original image its vision patch saw. For LLaVA-NeXT anyres
(`token_boxes`) the base crop's tokens saw the whole image squeezed into one crop, so each covers a coarse box
(H/g x W/g pixels, g patches per crop side); the grid crops' tokens saw the image at full resolution, so each covers
a fine box. `kept_mask` paints the union of the kept tokens' boxes, coarse and fine together; pass only the slots of
one kind (`layout.crop == 0` or `> 0`) to see one scale. Figures are drawn on matplotlib's Agg canvas directly (no
pyplot, no global backend switch).
"""

import math
import textwrap
from typing import Sequence

import numpy as np

from experiments.analysis import report
from models import anyres

__all__ = ["Box", "token_boxes", "grid_boxes", "slot_boxes", "kept_mask", "shade", "kept_picture"]


# --- token -> pixel geometry -----------------------------------------------------------------------------------------

Box = tuple[float, float, float, float] | None


def _clip_box(y0: float, x0: float, y1: float, x1: float, height: int, width: int) -> Box:
  y0, y1 = max(y0, 0.0), min(y1, float(height))
  x0, x1 = max(x0, 0.0), min(x1, float(width))
  return (y0, x0, y1, x1) if y1 > y0 and x1 > x0 else None


def token_boxes(image_size, layout: anyres.PackLayout, index: int, config) -> list[Box]:
  """Pixel box (y0, x0, y1, x1) in the original image of every packed slot of image `index` of a LLaVA-NeXT layout.

  image_size: the image's (height, width), as the processor saw it; layout: `model.pack_layout(image_sizes)`;
  config: a `LlavaNextConfig` (reads `image_grid_pinpoints`, `vision.image_size`, `vision.patch_size`).
  Returns a list of length N: half-open float boxes clipped to the image, None for newline and padding slots.
  Geometry as `LlavaNextImageProcessorPil` (through `anyres.crop_grid`): the base crop (crop 0) is the
  whole image stretched to the crop, so its patches cover coarse boxes; the grid crops tile the image resized to fit
  the best pinpoint and centred with zero padding, so their patches cover fine boxes. Unpadding works on whole
  patches (transformers' `unpad_image`): a kept patch that straddles the padding is clipped to the image, and for a
  padded size the cut can also drop the patches holding a thin strip (under one patch) at the image's edges, which
  then only the base crop covers.
  """
  height, width = anyres._size(image_size)  # pylint: disable=protected-access
  pinpoints = tuple(map(tuple, config.image_grid_pinpoints))
  crop, patch = config.vision.image_size, config.vision.patch_size
  source = np.asarray(layout.source)
  if source.ndim != 2 or not 0 <= index < source.shape[0]:
    raise ValueError(f"token_boxes: index {index} is not an image of a layout with source shape {source.shape}")
  count = anyres.num_image_features((height, width), pinpoints, crop, patch)
  # The processor's resize-and-pad geometry, shared with the testbed's patch labels.
  rows, cols, new_h, new_w, pad_y, pad_x = anyres.crop_grid((height, width), pinpoints, crop)
  if int(layout.counts[index]) != count or tuple(np.asarray(layout.grid[index]).tolist()) != (rows, cols):
    raise ValueError(f"token_boxes: layout image {index} ({int(layout.counts[index])} slots, grid "
                     f"{tuple(np.asarray(layout.grid[index]).tolist())}) was not built for a {height}x{width} image "
                     f"({count} slots, grid {(rows, cols)})")
  g = crop // patch
  t = g * g
  boxes: list[Box] = []
  for s in source[index].tolist():
    if s < 0:
      boxes.append(None)
      continue
    c, token = divmod(s, t)
    py, px = divmod(token, g)
    if c == 0:
      sy, sx = height / crop, width / crop
      boxes.append(_clip_box(py * patch * sy, px * patch * sx, (py + 1) * patch * sy, (px + 1) * patch * sx,
                             height, width))
      continue
    r, cc = divmod(c - 1, cols)
    ty, tx = r * crop + py * patch - pad_y, cc * crop + px * patch - pad_x     # in the resized image
    sy, sx = height / new_h, width / new_w
    boxes.append(_clip_box(ty * sy, tx * sx, (ty + patch) * sy, (tx + patch) * sx, height, width))
  return boxes


def grid_boxes(image_size, num_patches: int, crop_size: int | None = None, resize: str = "center_crop") -> list[Box]:
  """Pixel box of each of the g x g patches (row-major) of a single-crop model (LLaVA-1.5), in original pixels.

  resize: "center_crop" (CLIP / llava-hf processors: shorter side resized to the crop, then a centre crop; the
  image beyond the crop is never seen), "pad" (original LLaVA: padded to a centred square, then resized; patches
  wholly in the padding get None) or "stretch" (resized to a square). crop_size: the vision crop in pixels
  (`config.vision.image_size`); with it "center_crop" follows the processor's integer rounding of the resized size and
  the crop offset exactly, without it the geometry is continuous (edges off by under one resized pixel). "pad" and
  "stretch" are exact either way.
  """
  height, width = anyres._size(image_size)  # pylint: disable=protected-access
  g = math.isqrt(num_patches) if num_patches > 0 else 0
  if g == 0 or g * g != num_patches:
    raise ValueError(f"grid_boxes: num_patches must be a positive square, got {num_patches}")
  if crop_size is not None and crop_size <= 0:
    raise ValueError(f"grid_boxes: crop_size must be positive, got {crop_size}")
  if resize == "center_crop":
    short = min(height, width)
    if crop_size is None:
      top, left, step_y, step_x = (height - short) / 2, (width - short) / 2, short / g, short / g
    else:   # transformers: shorter side -> crop, longer -> int(crop * long / short); crop offset (new - crop) // 2
      new_h, new_w = (crop_size, int(crop_size * width / height)) if height <= width else (
          int(crop_size * height / width), crop_size)
      sy, sx = height / new_h, width / new_w
      top, left = (new_h - crop_size) // 2 * sy, (new_w - crop_size) // 2 * sx
      step_y, step_x = crop_size / g * sy, crop_size / g * sx
  elif resize == "pad":
    side = max(height, width)
    top, left, step_y, step_x = -((side - height) // 2), -((side - width) // 2), side / g, side / g
  elif resize == "stretch":
    top, left, step_y, step_x = 0.0, 0.0, height / g, width / g
  else:
    raise ValueError(f"grid_boxes: resize must be 'center_crop', 'pad' or 'stretch', got {resize!r}")
  return [_clip_box(top + y * step_y, left + x * step_x, top + (y + 1) * step_y, left + (x + 1) * step_x,
                    height, width) for y in range(g) for x in range(g)]


def slot_boxes(image_size, layout: anyres.PackLayout, index: int, config) -> list[Box]:
  """The pixel box of every packed slot of image `index`, for either family: a layout with grid crops is LLaVA-NeXT's
  anyres packing (`token_boxes`); a single-crop layout (`models.llava.single_crop_layout`) is LLaVA-1.5's patch grid
  behind the CLIP processor's shortest-edge resize and centre crop (`grid_boxes`)."""
  if int(np.prod(np.asarray(layout.grid)[index])) > 0:
    return token_boxes(image_size, layout, index, config)
  return grid_boxes(image_size, int(np.asarray(layout.counts)[index]), crop_size=config.vision.image_size)


def kept_mask(image_size, boxes: Sequence[Box], kept_slots) -> np.ndarray:
  """bool[H, W]: the union of the boxes of the kept slots (int[K] indices into `boxes`; negative entries are padding
  and skipped; slots without a box, e.g. newlines, add nothing). A pixel is covered when its centre lies in a box."""
  height, width = anyres._size(image_size)  # pylint: disable=protected-access
  kept = np.asarray(kept_slots).reshape(-1)
  if kept.size and not np.issubdtype(kept.dtype, np.integer):
    raise ValueError(f"kept_mask: kept_slots must be integer slot indices, got dtype {kept.dtype}")
  if kept.size and int(kept.max()) >= len(boxes):
    raise ValueError(f"kept_mask: slot {int(kept.max())} is out of range for {len(boxes)} boxes")
  mask = np.zeros((height, width), bool)
  for s in kept.tolist():
    if s < 0 or boxes[s] is None:
      continue
    y0, x0, y1, x1 = boxes[s]
    # Pixel i (centre i + 0.5) is inside [a, b) iff ceil(a - 0.5) <= i < ceil(b - 0.5).
    r0, r1 = math.ceil(y0 - 0.5), math.ceil(y1 - 0.5)
    c0, c1 = math.ceil(x0 - 0.5), math.ceil(x1 - 0.5)
    mask[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = True
  return mask


# --- pictures --------------------------------------------------------------------------------------------------------

def shade(image: np.ndarray, mask: np.ndarray, dim: float = 0.25) -> np.ndarray:
  """uint8[H, W, 3] image with pixels outside the kept area scaled by `dim`; mask: bool or float[H, W] in [0, 1]
  (1 = kept), a float mask blends linearly."""
  image = np.asarray(image)
  mask = np.asarray(mask)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"shade: image must be uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
  if mask.shape != image.shape[:2]:
    raise ValueError(f"shade: mask must be [{image.shape[0]}, {image.shape[1]}] like the image, got {mask.shape}")
  weight = mask.astype(np.float32)
  if np.any(weight < 0) or np.any(weight > 1):
    raise ValueError("shade: mask values must lie in [0, 1]")
  factor = dim + (1.0 - dim) * weight
  return np.round(image.astype(np.float32) * factor[..., None]).astype(np.uint8)


def kept_picture(images: Sequence[np.ndarray], kept_masks: Sequence[Sequence[np.ndarray]], titles: Sequence[str],
                 path: str, row_titles: Sequence[str] | None = None, dim: float = 0.25):
  """PNG grid: row r = images[r], column c = method c; each cell the image with the pixels outside
  kept_masks[c][r] dimmed.

  images: R uint8[H_r, W_r, 3] (sizes may differ); kept_masks: C lists (one per method, as titles) of R bool or
  float[H_r, W_r] masks; titles: C column titles; row_titles: optional R labels. The PNG is
  (C * 240) x (R * 240) pixels; each cell's caption gives the share of the image's pixels kept.
  """
  num_rows, num_cols = len(images), len(kept_masks)
  if num_rows == 0 or num_cols == 0:
    raise ValueError(f"kept_picture: need at least one image and one method, got {num_rows} and {num_cols}")
  if len(titles) != num_cols:
    raise ValueError(f"kept_picture: {len(titles)} titles for {num_cols} methods")
  if row_titles is not None and len(row_titles) != num_rows:
    raise ValueError(f"kept_picture: {len(row_titles)} row titles for {num_rows} images")
  for c, masks in enumerate(kept_masks):
    if len(masks) != num_rows:
      raise ValueError(f"kept_picture: method {titles[c]!r} has {len(masks)} masks for {num_rows} images")
  fig = report.new_figure(num_cols * report.CELL_SIZE, num_rows * report.CELL_SIZE)
  axes = fig.subplots(num_rows, num_cols, squeeze=False)
  for r, image in enumerate(images):
    for c in range(num_cols):
      ax = axes[r, c]
      mask = np.asarray(kept_masks[c][r])
      ax.imshow(shade(image, mask, dim), interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_xlabel(f"{100 * float(np.mean(mask.astype(np.float32))):.0f}% of pixels", fontsize="x-small")
      if r == 0:
        ax.set_title(titles[c], fontsize="small")
      if c == 0 and row_titles is not None:
        ax.set_ylabel(textwrap.fill(row_titles[r], 30), fontsize="x-small")
  fig.tight_layout(pad=0.4)
  fig.savefig(path, dpi=report.DPI)
