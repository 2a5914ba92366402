"""What a method module declares: its official protocol, its traits, and the hooks the stages call.

A `Method`'s defaults are a plain `tops_jax.prune` method (select or merge over the candidates, nothing of its own);
a method module fills in what is true only of it. The stages and `PruningConfig` read these fields and never ask for
a method by name. Backbones are named by their `models.backbones` registry name ("llava", "llava_next",
"qwen2_5_vl"; `family` turns the older spellings into it), plus "testbed" (the small LLaVA-NeXT of the tests and the
synthetic benchmark, run with LLaVA-NeXT's protocols).
"""

import types
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

from models import backbones
from models.pruning.modes import Layout, Stage1

__all__ = ["Method", "NoProtocol", "FAMILIES", "NO_CLS", "VARIABLE_GRID", "LAYOUT_OVERRIDES", "OVERRIDE_KINDS", "KINDS",
           "check_override", "family", "nominal_groups", "anyres", "saliency", "keeps_positions", "check_positions",
           "stage1", "check_per_crop"]

# The backbones the methods have protocols for (registry names), and the testbed.
FAMILIES = tuple(name for name, b in backbones.BACKBONES.items() if b.multimodal) + ("testbed",)


def family(name: str) -> str:
  """The registry name of a backbone spelling ("llava-1.5", "llava_1_5" -> "llava"; "llava-next" -> "llava_next");
  "testbed" and names the registry does not know come back as given."""
  if name == "testbed" or name not in backbones.names():
    return name
  return backbones.get(name).name


def nominal_groups(name: str) -> int:
  """The groups behind the papers' budgets on the family (`models.backbones.Backbone.nominal_groups`: LLaVA-NeXT's
  5 crops, LLaVA-1.5's 1; the testbed is a LLaVA-NeXT)."""
  name = family(name)
  return backbones.get("llava_next" if name == "testbed" else name).nominal_groups


def anyres(name: str) -> bool:
  """Whether the family encodes an image as several groups (LLaVA-NeXT's anyres crops)."""
  return nominal_groups(name) > 1


def _families_where(test: Callable[[type], bool]) -> tuple[str, ...]:
  return tuple(name for name, b in backbones.BACKBONES.items() if b.multimodal and test(b.model))


# Families whose vision tower has no CLS token (their model's `TOWER_RELEVANCE` lacks "cls": Qwen2.5-VL provides
# "received" only): the methods that read CLS attention on LLaVA read the attention each token receives in the
# tower's last full-attention block there (issue 29; the peers' substitute: llmc, FlashVID, the VisPruner
# maintainer, BACKBONES.md section 5).
NO_CLS = _families_where(lambda model: "cls" not in getattr(model, "TOWER_RELEVANCE", ("cls",)))
# Families whose images' token grids differ beyond one padded layout (`STATIC_TOKEN_GRID = False`: Qwen2.5-VL's
# merged grids follow each image's size), where a method partitioning one static grid (pooling) has no protocol.
VARIABLE_GRID = _families_where(lambda model: not getattr(model, "STATIC_TOKEN_GRID", True))


def saliency(name: str) -> str:
  """The family's tower saliency signal (`models.family.RELEVANCE`): "cls" (LLaVA's CLIP), "received" (`NO_CLS`)."""
  return "received" if family(name) in NO_CLS else "cls"


def keeps_positions(name: str) -> bool:
  """Whether the family's position ids carry the image geometry and survive pruning unchanged (M-RoPE:
  `KEEPS_POSITIONS` of its model class), so Stage II must keep positions="original"."""
  name = family(name)
  return name != "testbed" and name in backbones.names() and getattr(backbones.get(name).model, "KEEPS_POSITIONS",
                                                                       False)


def check_positions(method: str, name: str, positions: str):
  """ValueError naming the `positions` override when it renumbers a family whose ids must be kept."""
  if positions != "original" and keeps_positions(name):
    raise ValueError(f"{method}: override positions={positions!r} re-indexes the kept tokens, but {name}'s M-RoPE ids "
                     "carry the image geometry (t, h, w): use positions='original'")


class NoProtocol(ValueError):
  """The method's official code has no setting for this backbone, depth or budget (`method_config` raises it; the
  runner's "all" leaves such runs out and names them)."""


def _no_tower(config) -> tuple[str, ...]:
  return ()


def _same_hparams(config, hp: dict[str, Any], text, text_valid) -> dict[str, Any]:
  return hp


def _merge_inputs(config, images, feats, hp):
  return feats, hp, config.stage1_features == "vision"


def _no_check(config, model=None):
  return None


def _stage2_same(model, seq, scores, feats, hp):
  return feats, hp


class Method(NamedTuple):
  """A method: its official protocol, traits and hooks (defaults: a plain `tops_jax.prune` method).

  protocol: (target, family, num_layers, overrides) -> (Stage1 | None, Stage2 | None), the official setting with the
    named overrides applied (`models.pruning.protocols.method_config` checks the arguments first).
  overrides: the named overrides `protocol` accepts.
  unsupported: families the official code has no path for (`NoProtocol`).
  unsupported_reason: why, per family (`method_config`'s message; default: LLaVA-1.5 only, no anyres path).
  params: its hyperparameter class (None: derived from its `tops_jax` keywords, `params.PARAMS`).
  budget_free: its first n picks are the same for every keep >= n, so data-dependent quotas and per-row counts can be
    cut from the front of one order.
  variable_count: Stage II may keep a per-row count from the front of its order (`stage2_ratios`).
  stage2_only: prunes between decoder layers only, through its own `stage2_choose` (no `tops_jax.prune` entry).
  scores_previous_layer: under "before" timing its Stage II step reads the layer before the pruned one.
  clip_text: reads CDPruner's CLIP text relevance (stage1_relevance="clip_text").
  own_layouts: Stage I layouts only this method has (VisionZip's CLS layout).
  reads_keys / reads_block: Stage II reads the scoring layer's keys (DART) / the text -> candidate attention block.
  tower(config) -> the `model.visual_tokens` extras Stage I needs by name (keys, CLS features, last q/k).
  capacity(config, model_config) -> the static rows per image, when its own rows fix them (None: the layout's).
  stage1_hparams(config, hp, text, text_valid) -> hp: the keyword arguments of its Stage I selection.
  stage1_rows(model, config, images, key, hp) -> (Rows, kept, relevance) | None: its own Stage I output.
  merge_inputs(config, images, feats, hp) -> (features, hp, project): what a merging method merges, and whether the
    merged tokens are vision features to project.
  check_model(config, model): raises where the model cannot run its protocol.
  check_stage2(config): raises where a Stage II config is not one the method runs.
  stage2_bounds(config, num_candidates, text_len) -> Bound per step (None: each step's static keep).
  stage2_inputs(model, seq, scores, feats, hp) -> (feats, hp): what its Stage II selection reads.
  stage2_choose(model, config, seq, bound, scores, key, hp, step) -> Choice: its own Stage II step (None: the
    `tops_jax.prune` order).
  """
  protocol: Callable
  overrides: tuple[str, ...]
  unsupported: tuple[str, ...] = ()
  unsupported_reason: Mapping[str, str] = types.MappingProxyType({})
  params: type | None = None
  budget_free: bool = False
  variable_count: bool = False
  stage2_only: bool = False
  scores_previous_layer: bool = False
  clip_text: bool = False
  own_layouts: tuple[Layout, ...] = ()
  reads_keys: bool = False
  reads_block: bool = False
  tower: Callable = _no_tower
  capacity: Callable | None = None
  stage1_hparams: Callable = _same_hparams
  stage1_rows: Callable | None = None
  merge_inputs: Callable = _merge_inputs
  check_model: Callable = _no_check
  check_stage2: Callable = _no_check
  stage2_bounds: Callable | None = None
  stage2_inputs: Callable = _stage2_same
  stage2_choose: Callable | None = None


# The named overrides of a Stage I method's layout (`stage1`).
LAYOUT_OVERRIDES = ("scope", "grid", "newlines", "features", "relevance", "hparams")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


# Each kind of override value: (test, what it reads as in messages).
KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "number": (_is_number, "a number"),
    "int": (_is_int, "an int"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "ints": (lambda v: isinstance(v, (tuple, list)) and bool(v) and all(map(_is_int, v)),
             "a non-empty sequence of ints"),
    "strs": (lambda v: isinstance(v, str) or isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v),
             "a name or a sequence of names"),
    "dict": (lambda v: isinstance(v, Mapping), "a dict of hyperparameters (name -> value)"),
}
# What every named override of every method takes (one meaning per name across the methods; a protocol reads it so).
OVERRIDE_KINDS: dict[str, str] = {
    **dict.fromkeys(("stage1_alpha", "stage1_lam", "stage2_alpha", "stage2_lam", "lam"), "number"),
    **dict.fromkeys(("scope", "grid", "newlines", "features", "relevance", "normalize", "raters", "timing",
                     "dart_count", "positions", "mode", "version"), "str"),
    **dict.fromkeys(("hparams", "stage2_hparams"), "dict"),
    "num_visual": "int", "visionzip_cls": "bool", "dedup": "bool", "layers": "ints", "stage2_keeps": "ints",
    "criteria": "strs",
}


def check_override(method: str, name: str, value):
  """ValueError naming `method`'s override `name` and the kind it takes when `value` is not of that kind (None: the
  default, always accepted)."""
  test, what = KINDS[OVERRIDE_KINDS[name]]
  if value is not None and not test(value):
    raise ValueError(f"{method}: override {name} must be {what}, got {value!r}")


def stage1(target: int, o: dict[str, Any], *, scope: str = "global", grid: str = "unpadded", newlines: str = "drop",
           features: str = "projector", relevance: str = "cls", visionzip_cls: bool = False,
           params: dict[str, Any] | None = None) -> Stage1:
  """A Stage I: the official fields, then the layout overrides of `o` (a non-official `scope` selects over the
  unpadded tokens, without newline candidates, unless `grid` / `newlines` say otherwise)."""
  f = dict(scope=scope, grid=grid, newlines=newlines, features=features, relevance=relevance,
           visionzip_cls=visionzip_cls)
  if "scope" in o and o["scope"] != "official":
    f.update(scope=o["scope"], grid="unpadded", visionzip_cls=False)
    if f["newlines"] in ("keep", "candidates"):
      f["newlines"] = "drop"
  for name in ("grid", "newlines", "features", "relevance", "visionzip_cls"):
    if name in o:
      f[name] = o[name]
  return Stage1(budget=target, layout=Layout.of(f["scope"], f["grid"], f["visionzip_cls"]), relevance=f["relevance"],
                features=f["features"], newlines=f["newlines"], crops=o.get("crops"),
                params=dict(params or {}, **o.get("hparams", {})))


def check_per_crop(method: str, target: int, family: str, o: dict[str, Any], minimum: int = 1):
  """The official per-crop layouts keep a quota of target // crops tokens per crop: refuse a target that leaves fewer
  than `minimum`."""
  crops = o["crops"]
  official = anyres(family) and o.get("scope", "official") == "official" and o.get("visionzip_cls", True)
  if official and target // crops < minimum:
    raise ValueError(f"{method}'s official layout keeps target // {crops} tokens per crop: target={target} leaves "
                     f"{target // crops} (use a larger target or a global override such as scope=global)")
