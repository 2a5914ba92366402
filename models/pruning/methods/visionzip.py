"""VisionZip: dominant tokens by CLS attention plus contextual tokens merged by key similarity, per crop, in the
vision space; its official split, LLaVA-NeXT layout and order, and its Stage I hooks.

Source: dvlab-research/VisionZip `visionzip/main.py`, `llava_arch.py`: per crop [CLS, dominant, contextual] with
target // 5 tokens per crop on LLaVA-NeXT (54 : 10 of every 64, CLS counted in dominant: `tops_jax.visionzip.split`),
merged in the vision space then projected; the rows go to the LLM as base crop, grid dominant tokens (canvas
row-major), grid CLS tokens, grid contextual tokens (`tops_jax.visionzip.next_order`). `visionzip_cls=False` (ours):
`target` patch tokens globally (`tops_jax.prune.merge("visionzip")` over the vision features with the tower's keys).
Qwen2.5-VL (no CLS token; VisionZip has no Qwen code): that global form is the protocol there, with llmc's Qwen
substitutes (BACKBONES.md section 5): dominant tokens by the attention each merged token receives in the tower's last
full-attention block (mean over heads and queries, averaged over the 2 x 2 merge group), contextual tokens merged by
that block's keys (mean over heads and the group); features = the merger's input, merged then projected by the merger
(`models.qwen2_5_vl.visual_tokens`); the official 54 : 10 split of the target (`tops_jax.visionzip.split`).
`visionzip_cls=True` raises there (its layout keeps each crop's CLS token).
"""

import jax
import jax.numpy as jnp

from models.family import VisualTokens
from models.pruning import crops as crops_lib
from models.pruning.crops import nominal_crops
from models.pruning.methods import base
from models.pruning.modes import Layout, Stage1
from models.pruning.outputs import Rows
from tops_jax import visionzip as visionzip_lib

__all__ = ["METHOD", "SPLITS", "protocol", "split"]


def split(quota: int) -> dict[str, int]:
  """VisionZip's official (dominant, contextual) for a crop's `quota`, CLS counted in dominant: 54 : 10 of 64."""
  dominant, contextual = visionzip_lib.split(quota)
  return {"dominant": dominant, "contextual": contextual}


# The published settings (README, eval scripts), by target: per image on LLaVA-1.5 ((54, 10), (108, 20), (162, 30)),
# per crop on LLaVA-NeXT, a quota of target // 5 ((108, 20), (54, 10), (27, 5)).
SPLITS = {
    "llava": {target: visionzip_lib.split(target) for target in (64, 128, 192)},
    "llava_next": {target: visionzip_lib.split(target // 5) for target in (640, 320, 160)},
}


def protocol(target: int, family: str, num_layers: int, o: dict) -> tuple[Stage1, None]:
  if family in base.NO_CLS:
    if o.get("visionzip_cls"):
      raise ValueError(f"visionzip: override visionzip_cls=True keeps each crop's CLS token; {family}'s tower has none")
    return base.stage1(target, dict(o, visionzip_cls=False), relevance=base.saliency(family), features="vision"), None
  base.check_per_crop("visionzip", target, family, o, minimum=2)
  if o.get("visionzip_cls", True) and o.get("scope", "official") == "official":
    return base.stage1(target, o, relevance="cls", features="vision", scope="crop_fixed", grid="padded",
                       visionzip_cls=True, params=split(target // o["crops"])), None
  return base.stage1(target, dict(o, visionzip_cls=False), relevance="cls", features="vision"), None


def _tower(config) -> tuple[str, ...]:
  return ("keys", "cls_features") if config.visionzip_cls else ("keys",)


def _rows(model, config, images: VisualTokens, key, hp) -> Rows:
  """VisionZip's official output: per crop [CLS, dominant, contextual] merged in the vision space
  (`tops_jax.visionzip.compress`), laid out in its LLaVA-NeXT order (`visionzip.next_order`), then projected."""
  del key
  feats = images.group_features
  b, p, t, dv = feats.shape
  dominant, contextual = int(hp["dominant"]), int(hp["contextual"])
  quota = crops_lib.per_crop_quota(config, model.config)
  if dominant + contextual != quota:        # the rows must fill exactly the layout's static quota
    raise ValueError(f"visionzip_cls: dominant + contextual = {dominant + contextual} must equal the crop's quota "
                     f"stage1_budget // stage1_crops = {config.stage1_budget} // "
                     f"{nominal_crops(config, model.config)} = {quota}")
  if quota > t:
    raise ValueError(f"visionzip: dominant + contextual = {quota} exceeds the {t} tokens of a crop")
  flat = lambda x: x.reshape(b * p, *x.shape[2:])
  tokens, source, kind = visionzip_lib.compress(
      flat(feats), flat(images.group_relevance.get("cls")), flat(images.group_keys),
      flat(images.extras["cls_features"]), jnp.ones((b * p, t), bool), dominant=dominant, contextual=contextual)
  kind, source = kind.reshape(b, p, quota), source.reshape(b, p, quota)
  side = int(round(t ** 0.5))
  perm, valid = jax.vmap(lambda kd, src, g, cv: visionzip_lib.next_order(kd, src, g, cv, side=side))(
      kind, source, images.grid, images.group_valid)
  order = lambda x: jnp.take_along_axis(x, perm.reshape(perm.shape + (1,) * (x.ndim - 2)), axis=1)
  tokens = order(tokens.reshape(b, p * quota, dv))
  crop = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None, :, None], (b, p, quota))
  flat_src = jnp.where(source >= 0, crop * t + source, -1).reshape(b, p * quota)
  slot = jnp.where(flat_src >= 0,
                   jnp.take_along_axis(crops_lib.slot_of_source(images), jnp.maximum(flat_src, 0), axis=-1), -1)
  slot = order(slot)
  return Rows(embeds=model.project(tokens), valid=valid, packed=jnp.where(valid, slot, -1))


def _stage1_rows(model, config, images: VisualTokens, key, hp):
  if config.stage1.layout is not Layout.VISIONZIP_CLS:
    return None
  rows = _rows(model, config, images, key, hp)
  return rows, rows.packed, images.relevance.get("cls")


def _merge_inputs(config, images: VisualTokens, feats, hp):
  """Merged in the vision space with the tower's keys, then projected."""
  del feats
  hp.setdefault("keys", images.keys)
  return images.features, hp, True


def _check_model(config, model):
  c = model.config
  if not hasattr(c, "vision_feature_layer"):      # the family fixes its own features (Qwen2.5-VL: the merger input)
    return
  if config.stage1 is not None and (not isinstance(c.vision_feature_layer, int)
                                    or c.vision_feature_select_strategy != "default"):
    raise ValueError("visionzip needs a single int vision_feature_layer and the 'default' strategy")


METHOD = base.Method(protocol=protocol, overrides=base.LAYOUT_OVERRIDES + ("visionzip_cls",),
                     own_layouts=(Layout.VISIONZIP_CLS,), tower=_tower, stage1_rows=_stage1_rows,
                     merge_inputs=_merge_inputs, check_model=_check_model)
