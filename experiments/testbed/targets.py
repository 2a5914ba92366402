"""Dense training targets of the testbed, derived from each example's `Scene` (fair game in a testbed: the model
never sees them at test time): per-patch labels for the vision tower's auxiliary heads, and the grounding, counting,
relation and caption targets of `losses.loss_fn`.

Axes: B batch, S sequence (padded), P crops per image (base + grid, padded), T patches per crop (CLS dropped),
Q = GROUNDED_WORDS + 1 grounded query positions per row.

Patch geometry follows `LlavaNextImageProcessorPil`: the base crop is the whole image resized to the crop size; the
grid crops tile the image resized to fit the best pinpoint and centred with zero padding (`models.anyres.crop_grid`).
"""

from typing import Mapping, Sequence

import numpy as np

from experiments.synthvqa import scenes
from experiments.synthvqa import vqa
from experiments.testbed import model
from experiments.testbed import vocab
from models import anyres

__all__ = ["NUM_LABELS", "GROUNDED_WORDS", "patch_labels", "grid_centre", "grounding_targets"]

# Patch label columns: colour (0 = background, 1 + COLORS index), shape (0 = background, 1 + SHAPES index),
# centre (0/1), dot colour at grid-crop centre patches (0 = no dot, 1 + COLORS index; -1 = elsewhere), owner (index
# of the object in scene.objects, -1 = background).
NUM_LABELS = 5
GROUNDED_WORDS = 4   # the longest question ("is the red star left of the blue circle?") has 4 colour/shape words


def _word_matchers() -> dict:
  """token id -> predicate on a SceneObject, for the colour and shape words of the questions."""
  words = vocab.words()
  match = {words.index(c): (lambda o, c=c: o.color == c) for c in scenes.COLORS}
  for shape in scenes.SHAPES:
    for w in (shape, vqa.PLURALS[shape]):
      match[words.index(w)] = lambda o, shape=shape: o.shape == shape
  match[words.index("objects")] = lambda o: True
  return match


_WORD_MATCH = _word_matchers()
_WORD_IDS = {w: i for i, w in enumerate(vocab.words())}


def patch_labels(scene: scenes.Scene, hf: Mapping, num_crops: int | None = None,
                 image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Auxiliary labels of every patch of every crop the processor makes of `scene`'s image.

  Returns (labels int8[P, T, NUM_LABELS], crop_valid bool[P]); P = `num_crops` (default: the most any image gets),
  crops past the image's own count are padding (labels 0, -1 for the dot and owner columns, crop_valid False).
  Columns: see `NUM_LABELS`. A patch belongs to the object drawn on most of 4 x 4 sample points spread over it (at
  least 3 of the 16; else background): a pixel is drawn by object i when it lies in i's box and is not grey
  (backgrounds and clutter are grey by construction, see `experiments.synthvqa.scenes`). `image` is
  `scenes.render(scene)` (rendered when not given).
  """
  pinpoints, crop, patch = model.geometry(hf)
  g = crop // patch
  height, width = scene.height, scene.width
  rows, cols, new_h, new_w, pad_y, pad_x = anyres.crop_grid((height, width), pinpoints, crop)
  count = 1 + rows * cols
  num_crops = anyres.max_num_crops(pinpoints, crop) if num_crops is None else num_crops
  if count > num_crops:
    raise ValueError(f"a {height}x{width} image has {count} crops, more than num_crops={num_crops}")
  image = scenes.render(scene) if image is None else image
  if image.shape != (height, width, 3):
    raise ValueError(f"image has shape {image.shape}, expected the scene's {(height, width, 3)}")
  drawn = np.ptp(image.astype(np.int16), axis=-1) > 40
  owner = np.full((height, width), -1, np.int32)
  for i, obj in enumerate(scene.objects):
    x0, y0, x1, y1 = obj.box
    box = (slice(max(y0, 0), y1 + 1), slice(max(x0, 0), x1 + 1))
    owner[box] = np.where(drawn[box], i, -1)
  colour = np.array([0] + [1 + scenes.COLORS.index(o.color) for o in scene.objects], np.int8)
  shape = np.array([0] + [1 + scenes.SHAPES.index(o.shape) for o in scene.objects], np.int8)
  dot = np.array([0 if o.dot is None else 1 + scenes.COLORS.index(o.dot) for o in scene.objects], np.int8)

  sub = 4
  points = ((np.arange(g)[:, None] * sub + np.arange(sub)[None] + 0.5) * patch / sub).ravel()   # [g * sub] pixels
  labels = np.zeros((num_crops, g * g, NUM_LABELS), np.int8)
  labels[..., 3:] = -1
  # Original-image coordinates of each crop's sample points: rows and columns of [g * sub] points per crop.
  grid = [(r, c) for r in range(rows) for c in range(cols)]
  ys = [points * height / crop] + [(r * crop + points - pad_y) * height / new_h for r, _ in grid]
  xs = [points * width / crop] + [(c * crop + points - pad_x) * width / new_w for _, c in grid]
  votes = np.arange(len(scene.objects))[:, None, None]
  for p, (y, x) in enumerate(zip(ys, xs)):
    yy, xx = np.meshgrid(np.floor(y).astype(int), np.floor(x).astype(int), indexing="ij")
    inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
    who = np.where(inside, owner[np.clip(yy, 0, height - 1), np.clip(xx, 0, width - 1)], -1)
    who = who.reshape(g, sub, g, sub).transpose(0, 2, 1, 3).reshape(1, g * g, sub * sub)
    hits = np.sum(who == votes, axis=-1)                                     # [objects, T]
    best = np.where(hits.max(axis=0) >= 3, np.argmax(hits, axis=0), -1)
    labels[p, :, 0], labels[p, :, 1], labels[p, :, 4] = colour[best + 1], shape[best + 1], best
  for i, obj in enumerate(scene.objects):
    cy, cx = obj.cy + 0.5, obj.cx + 0.5
    labels[0, (int(cy * crop / height) // patch) * g + int(cx * crop / width) // patch, 2] = 1
    p, t = grid_centre(scene, i, hf)
    labels[p, t, 2], labels[p, t, 3] = 1, dot[i]   # the 5-px dot is only legible at full scale: grid crops only
  return labels, np.arange(num_crops) < count


def grid_centre(scene: scenes.Scene, i: int, hf: Mapping) -> tuple[int, int]:
  """(crop, token) of the grid-crop patch holding object i's centre (and its dot, when it has one); crop >= 1."""
  pinpoints, crop, patch = model.geometry(hf)
  g = crop // patch
  _, cols, new_h, new_w, pad_y, pad_x = anyres.crop_grid((scene.height, scene.width), pinpoints, crop)
  obj = scene.objects[i]
  y, x = (obj.cy + 0.5) * new_h / scene.height + pad_y, (obj.cx + 0.5) * new_w / scene.width + pad_x
  return 1 + int(y // crop) * cols + int(x // crop), (int(y % crop) // patch) * g + int(x % crop) // patch


def grounding_targets(examples: Sequence[vqa.Example], ids_list: Sequence[np.ndarray], layout: anyres.PackLayout,
                      labels: np.ndarray, hf: Mapping, seq_len: int, *, count_sink: float = 1.0,
                      dot_head: bool = False, base_only: bool = False) -> dict:
  """The decoder's targets of `losses.loss_fn` for a batch, as a dict of numpy arrays.

  Args:
    examples: the batch's examples.
    ids_list: each example's prompt token ids int32[S_i] (with the answer and "</s>"; image run as packed).
    layout: the batch's `anyres.PackLayout` (base_only: the base rows only).
    labels: `patch_labels` of each example, int8[B, P, T, NUM_LABELS].
    hf: the config dict.
    seq_len: the padded sequence length S.
    count_sink: the weight of "<s>" in count_target relative to one object's centre token (see the comment in the
      code).
    dot_head: on detail rows, head 1's evidence in head_evidence is the one grid-crop token that holds the dot
      (`grid_centre`) instead of all the object's tokens (not with base_only, whose image has no grid crops).
    base_only: the batch is the base-crop-only view.

  Returns:
    grounding_queries int32[B, Q], grounding_evidence bool[B, Q, S], head_evidence bool[B, 2, S], count_target
    float32[B, S] (see the comment in the code and `losses.loss_fn`), caption_targets int32[B, S, 2] (word ids of the
    colour and shape of the object an image token shows; -1: none), relation_target float32[B, 4] (row and column of
    the first and the second named object's centre, scaled to (0, 1); zeros for non-spatial rows, marked by
    relation_valid bool[B]), order_target float32[B, 2] (the same two centres' coordinate along the asked axis,
    oriented so that the answer is "yes" iff the first is smaller: column for "left", 1 - column for "right", row for
    "above", 1 - row for "below"), direction_evidence bool[B, S] (the token of the asked relation word; spatial rows
    only) and count_value float32[B] (a counting question's answer n as n / 6; zeros for other rows, marked by
    count_valid bool[B]).
  """
  _, crop, patch = model.geometry(hf)
  b, s = len(examples), seq_len
  out = {}
  # Grounding targets: query positions int32[B, Q] = the question's colour and shape words (in order, at most
  # GROUNDED_WORDS; plurals count, "objects" names every object) and the answer position; per query, the image
  # tokens of the objects it names: a word names the objects of that colour / shape, the answer position names every
  # object of vqa.Example.evidence. Unused queries have no image tokens.
  out["grounding_queries"] = np.zeros((b, GROUNDED_WORDS + 1), np.int32)
  out["grounding_evidence"] = np.zeros((b, GROUNDED_WORDS + 1, s), bool)
  # head_evidence: per grounded answer head (0, 1), the same evidence, except for spatial questions, where head 0
  # looks at the first named object and head 1 at the second, on their base-crop tokens only (the base crop is the
  # whole image, so its tokens carry the absolute position the relation is decided by; a grid token knows only its
  # place within its crop), and, with dot_head, for detail questions, where head 1 looks at the one grid-crop token
  # holding the dot (the object's other tokens dilute a colour that lives in a few pixels). count_target: the
  # answer position's counting head attends to "<s>" (position 0, the sink) with weight count_sink and to the
  # base-crop centre token of every evidence object with weight 1 each, so the mass left on the sink is w / (w + n)
  # for n objects; for a "no" existence answer all of it. Spatial rows have none. Neighbouring counts differ in that
  # mass by w / ((w + n) (w + n + 1)): with w = 1 that is 1/42 between five and six objects; the gap of the largest
  # count pair (5, 6) is widest at w = sqrt(30) ~ 5.5, about twice it.
  out["head_evidence"] = np.zeros((b, 2, s), bool)
  out["count_target"] = np.zeros((b, s), np.float32)
  out["caption_targets"] = np.full((b, s, 2), -1, np.int32)
  out["relation_target"] = np.zeros((b, 4), np.float32)
  out["relation_valid"] = np.zeros((b,), bool)
  out["order_target"] = np.zeros((b, 2), np.float32)
  out["direction_evidence"] = np.zeros((b, s), bool)
  out["count_value"] = np.zeros((b,), np.float32)
  out["count_valid"] = np.zeros((b,), bool)
  t = (crop // patch) ** 2
  g = crop // patch
  for i, ex in enumerate(examples):
    ids = ids_list[i]
    rows = layout.source[i, :layout.counts[i]]
    owner = np.where(rows >= 0, labels[i, rows // t, rows % t, 4], -1)
    first = int(np.flatnonzero(ids == model.IMAGE_TOKEN_ID)[0])
    image = slice(first, first + len(rows))
    base = (rows >= 0) & (rows < t)
    centre = {}   # object -> index into the image run of its base-crop centre token (same rule as patch_labels)
    for obj in ex.evidence:
      o = ex.scene.objects[obj]
      row = ((int((o.cy + 0.5) * crop / ex.scene.height) // patch) * g
             + int((o.cx + 0.5) * crop / ex.scene.width) // patch)
      centre[obj] = int(np.flatnonzero(rows == row)[0])
    if ex.family == "spatial":   # a small object may own no base token (under 3 of 16 samples), never its centre
      for k, obj in enumerate(ex.evidence[:2]):
        mine = (owner == obj) & base
        mine[centre[obj]] = True
        out["head_evidence"][i, k, image] = mine
        o = ex.scene.objects[obj]
        out["relation_target"][i, 2 * k:2 * k + 2] = (o.cy + 0.5) / ex.scene.height, (o.cx + 0.5) / ex.scene.width
        along = out["relation_target"][i, 2 * k + (ex.subtype in ("left", "right"))]
        out["order_target"][i, k] = 1.0 - along if ex.subtype in ("right", "below") else along
      out["relation_valid"][i] = True
      out["direction_evidence"][i, :len(ids)] = ids == _WORD_IDS[ex.subtype]
    else:
      out["head_evidence"][i, :, image] = np.isin(owner, ex.evidence)[None]
      if dot_head and ex.family == "detail" and not base_only:
        p, tok = grid_centre(ex.scene, ex.evidence[0], hf)
        out["head_evidence"][i, 1] = False
        out["head_evidence"][i, 1, first + int(np.flatnonzero(rows == p * t + tok)[0])] = True
      out["count_target"][i, 0] = count_sink
      for obj in ex.evidence:
        out["count_target"][i, first + centre[obj]] += 1.0
      out["count_target"][i] /= out["count_target"][i].sum()
      if ex.family == "counting":
        out["count_value"][i] = len(ex.evidence) / (len(vqa.NUMBER_WORDS) - 1)
        out["count_valid"][i] = True
    words = [(j, _WORD_MATCH[ids[j]]) for j in range(len(ids) - 2) if ids[j] in _WORD_MATCH][:GROUNDED_WORDS]
    for k, (j, match) in enumerate(words):
      named = [n for n, o in enumerate(ex.scene.objects) if match(o)]
      out["grounding_queries"][i, k] = j
      out["grounding_evidence"][i, k, image] = np.isin(owner, named)
    out["grounding_queries"][i, -1] = len(ids) - 3
    out["grounding_evidence"][i, -1, image] = np.isin(owner, ex.evidence)
    words_of = np.array([[_WORD_IDS[o.color], _WORD_IDS[o.shape]] for o in ex.scene.objects] + [[-1, -1]])
    out["caption_targets"][i, image] = words_of[owner]                   # owner -1 picks the last row
  return out
