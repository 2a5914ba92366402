"""The testbed's batches: benchmark examples through the processor into fixed-shape numpy arrays, optionally with
the training targets (`targets`), a cheap base-crop-only view, or random Stage I pruning.

Axes: B batch (one image per example), S sequence (padded), P crops per image (base + grid, padded), T patches per
crop (CLS dropped), N packed image tokens per image (padded), K kept image tokens per image (padded).

Stage I random pruning (`encode(..., keep_fraction=...)`): before the merge, keep round(fraction * n) of each image's
n visual tokens (image_newline rows are not visual tokens and are dropped with the rest), chosen uniformly at random
per example from a seeded generator, in their original order; the "<image>" run of the prompt is shortened to match
and positions are re-indexed contiguously.
"""

from typing import Mapping, Sequence

import numpy as np

from experiments.synthvqa import vqa
from experiments.testbed import model
from experiments.testbed import targets
from experiments.testbed import vocab
from models import anyres

__all__ = ["encode"]


def _shorten_image_run(ids: np.ndarray, keep: int) -> np.ndarray:
  """ids with its single contiguous run of image tokens cut to `keep` tokens."""
  where = np.flatnonzero(ids == model.IMAGE_TOKEN_ID)
  if len(where) == 0 or where[-1] - where[0] + 1 != len(where):
    raise ValueError("expected one contiguous run of image tokens in the prompt")
  return np.concatenate([ids[:where[0]], ids[where[0]:where[0] + keep], ids[where[-1] + 1:]])


def encode(examples: Sequence[vqa.Example], processor, hf: Mapping, *, with_answer: bool = False,
           labels: bool = False, keep_fraction: float | None = None, seed: int = 0, base_only: bool = False,
           count_sink: float = 1.0, dot_head: bool = False) -> dict:
  """Processor outputs of `examples`, padded to the fixed shapes of `hf` (one image per example).

  Returns a dict of numpy arrays:
    input_ids int32[B, S], attention_mask bool[B, S] (right padding), pixel_values float32[B, P, 3, C, C],
    image_sizes int32[B, 2], layout (`anyres.PackLayout` of int32/bool[B, N], counts int32[B], grid int32[B, 2]),
    last int32[B] (index of the last prompt token);
    with_answer: targets int32[B, 2] (answer, "</s>"), target_positions int32[B, 2] (the positions predicting them)
      and question_mask bool[B, S] (positions predicting the prompt text after the image, see `losses.loss_fn`);
    labels: patch_labels int8[B, P, T, NUM_LABELS], crop_valid bool[B, P] (`targets.patch_labels`); with with_answer
      also the decoder's targets of `targets.grounding_targets` (grounding_queries, grounding_evidence,
      head_evidence, count_target, caption_targets, relation_target, relation_valid, order_target,
      direction_evidence, count_value, count_valid);
    count_sink, dot_head: see `targets.grounding_targets`;
    keep_fraction: keep_index int32[B, K], keep_valid bool[B, K] (random Stage I pruning, see the module docstring;
      the input_ids then hold the shortened image runs);
    base_only: only the base crop (the whole image at crop resolution, 36 tokens, no grid crops, no image_newline):
      pixel_values float32[B, 1, ...], a layout of the base rows and image runs of 36 tokens. A cheap training view
      (`experiments.testbed.train`'s short phase), not a model input transformers would build.
  """
  if not examples:
    raise ValueError("encode needs at least one example")
  if keep_fraction is not None and not 0 < keep_fraction <= 1:
    raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
  if base_only and keep_fraction is not None:
    raise ValueError("base_only and keep_fraction cannot be combined")
  if not count_sink > 0:
    raise ValueError(f"count_sink must be positive, got {count_sink}")
  pinpoints, crop, patch = model.geometry(hf)
  s, p_max = model.seq_len(hf), anyres.max_num_crops(pinpoints, crop)
  n = anyres.max_num_features(pinpoints, crop, patch)
  if base_only:
    s = (crop // patch) ** 2 + model.MAX_TEXT_TOKENS
  b = len(examples)
  out = dict(input_ids=np.zeros((b, s), np.int32), attention_mask=np.zeros((b, s), bool),
             pixel_values=np.zeros((b, p_max, 3, crop, crop), np.float32), image_sizes=np.zeros((b, 2), np.int32),
             last=np.zeros((b,), np.int32))
  if with_answer:
    out.update(targets=np.zeros((b, 2), np.int32), target_positions=np.zeros((b, 2), np.int32),
               question_mask=np.zeros((b, s), bool))
  if labels:
    out.update(patch_labels=np.zeros((b, p_max, (crop // patch) ** 2, targets.NUM_LABELS), np.int8),
               crop_valid=np.zeros((b, p_max), bool))
  ids_list = []
  for i, ex in enumerate(examples):
    text = vocab.prompt(ex.question, ex.answer if with_answer else None)
    enc = processor(images=[ex.image], text=[text], return_tensors="np")
    px = enc["pixel_values"][0]
    out["pixel_values"][i, :px.shape[0]] = px
    out["image_sizes"][i] = enc["image_sizes"][0]
    ids_list.append(enc["input_ids"][0].astype(np.int32))
    if labels:
      out["patch_labels"][i], out["crop_valid"][i] = targets.patch_labels(ex.scene, hf, p_max, ex.image)
  layout = anyres.pack_layout(out["image_sizes"], pinpoints, crop, patch, n)
  if base_only:
    t = (crop // patch) ** 2
    layout = anyres.PackLayout(source=np.tile(np.arange(t, dtype=np.int32), (b, 1)), crop=np.zeros((b, t), np.int32),
                               newline=np.zeros((b, t), bool), valid=np.ones((b, t), bool),
                               counts=np.full((b,), t, np.int32), grid=np.zeros((b, 2), np.int32))
    out["pixel_values"] = out["pixel_values"][:, :1]
    ids_list = [_shorten_image_run(ids, t) for ids in ids_list]
  if labels and with_answer:
    out.update(targets.grounding_targets(examples, ids_list, layout, out["patch_labels"], hf, s,
                                         count_sink=count_sink, dot_head=dot_head, base_only=base_only))
  if keep_fraction is not None:
    visual = layout.valid & ~layout.newline
    keeps = [max(1, round(keep_fraction * int(v.sum()))) for v in visual]
    k_max = max(keeps)
    out["keep_index"], out["keep_valid"] = np.zeros((b, k_max), np.int32), np.zeros((b, k_max), bool)
    for i, (row, k) in enumerate(zip(visual, keeps)):
      rng = np.random.default_rng([seed, i])
      out["keep_index"][i, :k] = np.sort(rng.choice(np.flatnonzero(row), size=k, replace=False))
      out["keep_valid"][i, :k] = True
      ids_list[i] = _shorten_image_run(ids_list[i], k)
  for i, ids in enumerate(ids_list):
    if len(ids) > s:
      raise ValueError(f"example {examples[i].scene_id} has {len(ids)} tokens, more than the sequence length {s}")
    out["input_ids"][i, :len(ids)], out["attention_mask"][i, :len(ids)] = ids, True
    out["last"][i] = len(ids) - 1
    if with_answer:
      out["targets"][i] = ids[-2:]
      out["target_positions"][i] = (len(ids) - 3, len(ids) - 2)
      # positions predicting the prompt text after the image, up to and including the ":" before the answer
      out["question_mask"][i, np.flatnonzero(ids == model.IMAGE_TOKEN_ID)[-1]:len(ids) - 3] = True
  out["layout"] = layout
  return out

