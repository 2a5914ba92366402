"""How each method is run: `method_config(method, family=, target=, num_layers=, **overrides) -> PruningConfig`.

The default is the method's OFFICIAL protocol on that backbone at that budget T (the tokens the papers' tables
name: 640 / 320 / 160 on LLaVA-NeXT, 128 / 64 / 32 on LLaVA-1.5), as its official code runs it; our own variants are
named overrides, each documented below with the reason it exists. `family` is "llava-1.5" or "llava-next" (the
testbed is a small LLaVA-NeXT: "testbed" runs as "llava-next"). On LLaVA-1.5 (one crop, no newlines) every per-crop
layout selects what the global one does.

| method | official protocol (LLaVA-NeXT) | source read |
|---|---|---|
| tops | the paper's schedule: Stage I N -> 2T (CLS relevance, (0.5, 0.5)), L12: -> T, L24: -> T/4 with text raters | arXiv 2606.27161, Alg. 1-2 |
| cdpruner | CLIP text relevance (negated, min-max over all crops), T // 5 per crop among its 576 tokens; the picks go to the LLM on the padded canvas (base crop, then the grid canvas row-major), NO unpadding and NO newlines: its `prepare_inputs_labels_for_multimodal` strips "_unpad" from spatial_unpad before the merge | Theia-4869/CDPruner @9541616 llava/model/llava_arch.py |
| divprune | the whole packed sequence (newlines too) is the candidate set, round(T / 2880 x its length) kept, packed order | vbdi/divprune LLaVA/llava/model/llava_arch.py |
| scope | CLIP layer -2 features, CLS attention saliency; int(T / crops) per crop over the padded crops, no unpadding, no newlines; base crop, then the grid canvas row-major | kinredon/SCOPE scope/clip_encoder.py, llava_arch.py |
| visionzip | per crop [CLS, dominant, contextual] (T // 5 per crop, 54 : 10 of every 64), merged in the vision space; base crop, grid dominant (canvas row-major), grid CLS, grid contextual | dvlab-research/VisionZip visionzip/main.py, llava_arch.py |
| dart | pruning before layer 2 to 4 + 8 floor(T / 8) tokens, original positions | ZichenWen1/DART, llmc dart.py |
| fastv | layer-1 last-token attention, pruning before layer 2 to T, original positions | pkunlp-icler/FastV |
| vispruner | CLS-attention important tokens (half of each crop's budget) + diverse remainder on layer -2 features; T // 5 per crop, CDPruner's padded-canvas layout (the same "_unpad" strip: no unpadding, no newlines) | Theia-4869/VisPruner @aefa01a llava/model/llava_arch.py |
| prumerge_plus | LLaVA-1.5 only: the last CLIP layer's full-width CLS attention, the fixed-count branch (T/2 by attention + T/2 strided), each merged with its 32 nearest tokens by key, then the extra token of the rest: T + 1 rows in its order | 42Shawn/LLaVA-PruMerge clip_encoder.py |
| pdrop | before layers 8, 16, 24 (7B and 13B alike) the last instruction token's attention keeps int(n lambda^s) of each image's n tokens, contiguous positions; T is its "average visual tokens per layer" (its Table 2), lambda solved for it (0.5 is the published 192-of-576 setting), layers (2, 8, 16) where (8, 16, 24) cannot reach T (the author's 64-token answer, issue #29) | Cooperx521/PyramidDrop @6444f30 `modeling_llama_pdrop.py` |
| sparsevlm | LLaVA-1.5 only: text raters chosen once from the input embeddings, pruning after layers 2, 6, 15, 19 with the rank-based count (scale, bias) of the published 192 / 128 / 64 settings, recycled tokens clustered (DPC-KNN) and merged after the kept ones | Gumpest/SparseVLMs v1 @b72c5d6 `modelling_sparse_llama.py`, `score.py`, `utils.py` |
| trimtokenator, random, pooling | T per image, globally (no official LLaVA-NeXT layout: TrimTokenator's code is not public) | |

CDPruner and VisPruner also override LLaVA's `select_best_resolution` with the single resolution 672 x 672 (their
comment: "to get 2880 visual tokens"), so every image there has a 2 x 2 grid. That is image preprocessing, shared by
every run of an invocation, so it is not part of a method's config: `--resolution=fixed_672` gives the same crop count
(5) but squashes the image to 672 x 672 instead of padding it inside 672 x 672; with native resolution an image has
3 to 5 crops and each real crop still gets T // 5.

Named overrides (keyword arguments; unknown ones raise, naming the method's accepted set):
- `scope`: "official" (default) or a `PruningConfig.stage1_scope` ("global", "per_crop", "ratio", "crop_fixed",
  "crop_divided"); with a non-official scope the grid is "unpadded" (ours: every budget over the tokens the LLM
  would see) unless `grid` says otherwise. Reason: budgets comparable across methods (exactly T per image).
- `grid`, `newlines`, `features`: the `stage1_grid`, `newlines`, `stage1_features` fields. `newlines="drop"` is our
  LLaVA-NeXT default for the methods without an official layout (exactly T visual tokens reach the LLM).
- `relevance`: `stage1_relevance`. CDPruner's "text" is the documented FALLBACK when no CLIP checkpoint is at hand:
  cosine of the projector outputs with the LLM's input embeddings of the text after the image, not negated. It is a
  different method from CDPruner's and is labelled as such in the runner.
- `visionzip_cls=False`: VisionZip without the CLS token, T patch tokens globally in ascending order (ours).
- `dart_count="exact"`: DART keeps exactly T tokens instead of the official 4 + 8 floor(T / 8).
- `mode="adaptive"` (PruMerge+): the released inference path's IQR-adaptive count, with T as the static upper
  bound; the default "fixed" is its fixed-count branch, the only way to fill a table at a given T.
- tops: `stage1_alpha`, `stage1_lam`, `stage2_alpha`, `stage2_lam` (None: the paper's), `normalize`, `criteria`,
  plus `scope` / `newlines` for Stage I and any Stage II field the schedule takes (`models.pruning.tops_schedule`).
- `hparams`: extra keyword arguments of the method (merged into its stage's hyperparameters).
"""

import dataclasses
from typing import Any

from models.pruning import config as config_lib
from models.pruning.config import PruningConfig
from tops_jax import dart as dart_lib
from tops_jax import visionzip as visionzip_lib

__all__ = ["FAMILIES", "method_config", "OFFICIAL_METHODS", "overrides_of", "supports", "NoProtocol"]

FAMILIES = ("llava-1.5", "llava-next", "testbed")
_LAYOUT = ("scope", "grid", "newlines", "features", "relevance", "hparams")
_OVERRIDES = {
    "tops": ("stage1_alpha", "stage1_lam", "stage2_alpha", "stage2_lam", "normalize", "criteria", "scope",
             "newlines", "hparams", "stage2_hparams", "raters", "timing"),
    "cdpruner": _LAYOUT,
    "divprune": _LAYOUT,
    "scope": _LAYOUT,
    "visionzip": _LAYOUT + ("visionzip_cls",),
    "dart": ("dart_count", "hparams", "positions"),
    "fastv": ("hparams", "positions"),
    "trimtokenator": _LAYOUT,
    "random": _LAYOUT,
    "pooling": ("hparams",),
    "vispruner": _LAYOUT,
    "prumerge_plus": ("mode", "hparams"),
    "pdrop": ("layers", "lam", "num_visual", "hparams"),
    "sparsevlm": ("version", "num_visual"),
}
OFFICIAL_METHODS = tuple(_OVERRIDES)
# Methods whose official code has no path for a family (method_config raises; the runner leaves them out there).
_UNSUPPORTED = {"prumerge_plus": ("llava-next", "testbed"), "sparsevlm": ("llava-next", "testbed")}


class NoProtocol(ValueError):
  """The method's official code has no setting for this backbone, depth or budget (`method_config` raises it; the
  runner's "all" leaves such runs out and names them)."""


def supports(method: str, family: str) -> bool:
  """Whether `method` has a protocol on `family` at all (PruMerge+'s and SparseVLM's official code are LLaVA-1.5
  only); depth and budget can still rule a run out (`NoProtocol`)."""
  return family not in _UNSUPPORTED.get(method, ())


def overrides_of(method: str) -> tuple[str, ...]:
  """The named overrides `method_config` accepts for `method`."""
  return _OVERRIDES[method]


def _next(family: str) -> bool:
  return family in ("llava-next", "testbed")


def _stage1(method: str, target: int, o: dict[str, Any], **official) -> PruningConfig:
  """A Stage I config: the official fields, then the layout overrides."""
  fields = dict(method=method, stage1_budget=target, stage1_crops=o.get("crops"), **official)
  if "scope" in o and o["scope"] != "official":
    fields.update(stage1_scope=o["scope"], stage1_grid="unpadded", visionzip_cls=False)
    if fields.get("newlines") in (None, "keep", "candidates"):
      fields["newlines"] = "drop"
  for name, field in (("grid", "stage1_grid"), ("newlines", "newlines"), ("features", "stage1_features"),
                      ("relevance", "stage1_relevance"), ("visionzip_cls", "visionzip_cls")):
    if name in o:
      fields[field] = o[name]
  hp = dict(fields.pop("stage1_hparams", {}), **o.get("hparams", {}))
  return PruningConfig(stage1_hparams=hp, **fields)


def _tops(target, family, num_layers, o):
  schedule_family = "llava-next" if family == "testbed" else family
  stage2 = dict(stage2_alpha=o.get("stage2_alpha"), stage2_lam=o.get("stage2_lam"))
  if family == "testbed":   # no paper setting for the testbed: the paper's default pair
    stage2 = {k: (0.5 if v is None else v) for k, v in stage2.items()}
  alpha, lam = o.get("stage1_alpha"), o.get("stage1_lam")
  extra = {k: o[k] for k in ("raters", "timing") if k in o}
  cfg = config_lib.tops_schedule(num_layers, target, family=schedule_family,
                                 stage1_alpha=0.5 if alpha is None else alpha, stage1_lam=0.5 if lam is None else lam,
                                 **stage2, **extra)
  fields = {}
  if o.get("scope", "official") != "official":
    fields["stage1_scope"] = o["scope"]
  if "newlines" in o:
    fields["newlines"] = o["newlines"]
  hp = {}
  if o.get("normalize"):
    hp["normalize"] = o["normalize"]
  if o.get("criteria"):
    hp["criteria"] = tuple(o["criteria"])
  hp1 = dict(cfg.stage1_hparams, **hp, **o.get("hparams", {}))
  hp2 = dict(cfg.stage2_hparams, **hp, **o.get("stage2_hparams", {}))
  return dataclasses.replace(cfg, stage1_hparams=hp1, stage2_hparams=hp2, **fields)


def _visionzip_split(per_crop: int) -> dict[str, int]:
  """VisionZip's official (dominant, contextual) for `per_crop` tokens, CLS counted in dominant: 54 : 10 of 64."""
  dominant, contextual = visionzip_lib.split(per_crop)
  return {"dominant": dominant, "contextual": contextual}


def _pdrop(target, family, num_layers, o):
  """PyramidDrop's published layers (8, 16, 24) (or its author's (2, 8, 16) for small budgets) with the lambda whose
  average kept tokens per layer is T (`config.pdrop_schedule`)."""
  num_visual = o.get("num_visual")
  if family == "testbed" and "layers" not in o:
    raise NoProtocol("pdrop prunes at decoder layers (8, 16, 24) or (2, 8, 16) of a 32-layer LLaMA; the testbed's "
                     f"{num_layers}-layer decoder has none of them (pass layers= to run a variant)")
  try:
    cfg = config_lib.pdrop_schedule(num_layers, target, family=family, num_visual=num_visual,
                                    layers=o.get("layers"), lam=o.get("lam") if "layers" in o and target is None
                                    else None)
  except ValueError as e:
    raise NoProtocol(f"pdrop at T={target} on {num_layers} layers: {e}") from None
  if o.get("hparams"):
    cfg = dataclasses.replace(cfg, stage2_hparams=dict(cfg.stage2_hparams, **o["hparams"]))
  return cfg


def method_config(method: str, *, family: str, target: int, num_layers: int, crops: int | None = None,
                  **overrides) -> PruningConfig:
  """The official protocol of `method` on `family` at budget `target` (see the module docstring), with overrides.

  crops: the nominal crops per image behind T (N_nominal / tokens per crop: LLaVA-NeXT 2880 / 576 = 5, LLaVA-1.5 1;
    the runner passes its backbone's); None: 5 on LLaVA-NeXT families, 1 on LLaVA-1.5.
  Raises ValueError naming the method, the family or the override that does not apply (`NoProtocol` where the
  official code has no setting for this family, depth or budget).
  """
  if method not in _OVERRIDES:
    raise ValueError(f"unknown method {method!r}; method_config knows: {', '.join(_OVERRIDES)}")
  if family not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
  if isinstance(target, bool) or not isinstance(target, int) or target < 1:
    raise ValueError(f"target T must be a positive int, got {target!r}")
  unknown = sorted(set(overrides) - set(_OVERRIDES[method]))
  if unknown:
    raise ValueError(f"{method}: unknown override(s) {', '.join(unknown)}; {method} takes: "
                     f"{', '.join(_OVERRIDES[method])}")
  o = {k: v for k, v in overrides.items() if v is not None}
  if crops is None:
    crops = 5 if _next(family) else 1
  if isinstance(crops, bool) or not isinstance(crops, int) or crops < 1:
    raise ValueError(f"crops must be a positive int, got {crops!r}")
  o["crops"] = crops
  per_crop_official = method in ("cdpruner", "vispruner", "visionzip") and _next(family) and \
      o.get("scope", "official") == "official" and o.get("visionzip_cls", True)
  if per_crop_official and target // crops < (2 if method == "visionzip" else 1):
    raise ValueError(f"{method}'s official layout keeps T // {crops} tokens per crop: T={target} leaves "
                     f"{target // crops} (use a larger T or a global override such as scope=global)")
  if not supports(method, family):
    raise NoProtocol(f"{method} has no {family} protocol: its official code runs LLaVA-1.5 only (no anyres path)")
  nxt = _next(family)
  if method == "tops":
    return _tops(target, family, num_layers, o)
  if method == "cdpruner":
    layout = dict(stage1_scope="crop_fixed", stage1_grid="padded") if nxt else dict(stage1_scope="global")
    return _stage1(method, target, o, stage1_relevance="clip_text", **layout)
  if method == "divprune":
    layout = dict(stage1_scope="ratio", newlines="candidates") if nxt else dict(stage1_scope="global")
    return _stage1(method, target, o, stage1_relevance="none", **layout)
  if method == "scope":
    layout = dict(stage1_scope="crop_divided", stage1_grid="padded") if nxt else dict(stage1_scope="global")
    return _stage1(method, target, o, stage1_relevance="cls", stage1_features="vision", **layout)
  if method == "visionzip":
    if o.get("visionzip_cls", True) and o.get("scope", "official") == "official":
      hp = _visionzip_split(target // crops)
      return _stage1(method, target, o, stage1_relevance="cls", stage1_features="vision",
                     stage1_scope="crop_fixed", stage1_grid="padded", visionzip_cls=True, stage1_hparams=hp)
    o = dict(o, visionzip_cls=False)
    return _stage1(method, target, o, stage1_relevance="cls", stage1_features="vision")
  if method in ("dart", "fastv"):
    keep = target
    if method == "dart" and o.get("dart_count", "official") == "official":
      keep = dart_lib.kept_count(target)
    elif method == "dart" and o["dart_count"] != "exact":
      raise ValueError(f"dart_count must be 'official' or 'exact', got {o['dart_count']!r}")
    return PruningConfig(method=method, stage2=((2, keep),),
                         stage2_relevance="last_token" if method == "fastv" else "none",
                         positions=o.get("positions", "original"), stage2_hparams=o.get("hparams", {}))
  if method == "vispruner":
    layout = dict(stage1_scope="crop_fixed", stage1_grid="padded") if nxt else dict(stage1_scope="global")
    return _stage1(method, target, o, stage1_relevance="cls", stage1_features="vision", **layout)
  if method == "prumerge_plus":
    return PruningConfig(method=method, stage1_budget=target, stage1_relevance="cls", stage1_features="vision",
                         stage1_hparams=dict({"mode": o.get("mode", "fixed")}, **o.get("hparams", {})))
  if method == "pdrop":
    return _pdrop(target, family, num_layers, o)
  if method == "sparsevlm":
    try:
      return config_lib.sparsevlm_schedule(num_layers, target, version=o.get("version", "v1"),
                                           num_visual=o.get("num_visual", 576))
    except ValueError as e:
      raise NoProtocol(f"sparsevlm at T={target} on {num_layers} layers: {e}") from None
  if method == "pooling":
    return PruningConfig(method="pooling", stage1_budget=target, stage1_relevance="none",
                         stage1_hparams=o.get("hparams", {}))
  relevance = {"trimtokenator": "text", "random": "none"}[method]
  return _stage1(method, target, o, stage1_relevance=relevance)
