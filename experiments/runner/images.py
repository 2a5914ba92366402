"""Image handling of the official evaluations, applied before the checkpoint's processor.

Axes: H image height, W image width (pixels), 3 RGB channels.

- "pad" (LLaVA-1.5's `image_aspect_ratio: pad`: `expand2square` in LLaVA's `llava/mm_utils.py`, used by
  `process_images`): the image is pasted on a square of side max(H, W) filled with the processor's `image_mean` as
  0-255 integers (int(m * 255) per channel), centred along the short side at offset (long - short) // 2; the
  processor's shortest-edge resize and centre crop then see the whole image. lmms-eval's llava wrapper pads too,
  even for tasks whose yaml sets `image_aspect_ratio: original` (ScienceQA, MMBench): it applies the yaml only when
  the checkpoint config has no image_aspect_ratio, and LLaVA-1.5's says "pad".
- "original": the image as it is (the CLIP processor resizes the short side and centre-crops).
- "fixed_672" (LLaVA-NeXT at the paper's fixed input): the image resized to 672 x 672 (bicubic), so the anyres
  grid is always 2 x 2 with nothing to unpad: 5 x 576 = 2,880 visual tokens before pruning.
- "native" (LLaVA-NeXT): the image as it is; the anyres packing depends on its size.
"""

import numpy as np

__all__ = ["ASPECTS", "expand2square", "prepare"]

ASPECTS = ("pad", "original", "fixed_672", "native")


def expand2square(image: np.ndarray, fill) -> np.ndarray:
  """uint8[H, W, 3] -> uint8[S, S, 3], S = max(H, W): the image centred on a `fill`-coloured square."""
  h, w = image.shape[:2]
  if h == w:
    return image
  side = max(h, w)
  out = np.empty((side, side, 3), np.uint8)
  out[...] = np.asarray(fill, np.uint8)
  top, left = ((side - h) // 2, 0) if w > h else (0, (side - w) // 2)
  out[top:top + h, left:left + w] = image
  return out


def prepare(image: np.ndarray, aspect: str, image_mean=None) -> np.ndarray:
  """The image the processor receives under `aspect` (see the module docstring). image_mean: the processor's
  per-channel mean in [0, 1] ("pad")."""
  if aspect == "pad":
    if image_mean is None:
      raise ValueError("aspect 'pad' needs the processor's image_mean")
    return expand2square(image, tuple(int(m * 255) for m in image_mean))
  if aspect in ("original", "native"):
    return image
  if aspect == "fixed_672":
    from PIL import Image  # pylint: disable=g-import-not-at-top
    return np.asarray(Image.fromarray(image).resize((672, 672), Image.BICUBIC))
  raise ValueError(f"unknown image aspect {aspect!r}; known: {', '.join(ASPECTS)}")
