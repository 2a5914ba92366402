"""The typed parts of a `PruningConfig`: the modes (`Literal`s), Stage I's layout rows (`Layout`), `Stage1`, `Stage2`.

Each record checks its own fields when built; what depends on the method or on both stages is checked by
`models.pruning.config.PruningConfig`.
"""

import dataclasses
import enum
from typing import Any, Literal, get_args

__all__ = ["Layout", "Stage1", "Stage2", "STAGE1_RELEVANCE", "STAGE2_RELEVANCE", "STAGE2_RATERS", "STAGE2_TIMINGS",
           "SCOPES", "GRIDS", "FEATURES", "POSITIONS", "NEWLINES", "check_choice"]

Stage1Relevance = Literal["cls", "received", "text", "clip_text", "none"]
Stage2Relevance = Literal["raters", "last_token", "none"]
Raters = Literal["attention", "sparsevlm"]      # `models.pruning.stage2` argues the default
Timing = Literal["before", "after"]
Scope = Literal["global", "per_crop", "ratio", "crop_fixed", "crop_divided"]
Grid = Literal["unpadded", "padded", "padded_unpad"]
Features = Literal["projector", "vision"]
Positions = Literal["contiguous", "original"]
Newlines = Literal["drop", "rows", "keep", "candidates"]
STAGE1_RELEVANCE, STAGE2_RELEVANCE = get_args(Stage1Relevance), get_args(Stage2Relevance)
STAGE2_RATERS, STAGE2_TIMINGS = get_args(Raters), get_args(Timing)
SCOPES, GRIDS, FEATURES = get_args(Scope), get_args(Grid), get_args(Features)
POSITIONS, NEWLINES = get_args(Positions), get_args(Newlines)


class Layout(enum.Enum):
  """A row of Stage I's layout table (`models.pruning.stage1`): (scope, grid), or VisionZip's official output."""
  GLOBAL = ("global", "unpadded")
  PER_CROP = ("per_crop", "unpadded")
  RATIO = ("ratio", "unpadded")
  CROP_FIXED = ("crop_fixed", "unpadded")
  CROP_FIXED_UNPAD = ("crop_fixed", "padded_unpad")
  CROP_FIXED_CANVAS = ("crop_fixed", "padded")
  CROP_DIVIDED = ("crop_divided", "unpadded")
  CROP_DIVIDED_UNPAD = ("crop_divided", "padded_unpad")
  CROP_DIVIDED_CANVAS = ("crop_divided", "padded")
  VISIONZIP_CLS = ("crop_fixed", "padded", "cls")   # per crop [CLS, dominant, contextual], its LLaVA-NeXT order

  @property
  def scope(self) -> str:
    return self.value[0]

  @property
  def grid(self) -> str:
    return self.value[1]

  @classmethod
  def of(cls, scope: str, grid: str, visionzip_cls: bool = False) -> "Layout":
    """The row of (scope, grid); ValueError naming the field that is not one of the table's."""
    for name, value, allowed in (("stage1_scope", scope, SCOPES), ("stage1_grid", grid, GRIDS)):
      if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if visionzip_cls:
      if (scope, grid) != cls.VISIONZIP_CLS.value[:2]:
        raise ValueError("visionzip_cls is VisionZip's official layout: per crop ('crop_fixed') over the padded crops "
                         f"('padded'), got stage1_scope={scope!r}, stage1_grid={grid!r}")
      return cls.VISIONZIP_CLS
    for row in cls:
      if row.value == (scope, grid):
        return row
    raise ValueError(f"stage1_grid={grid!r} selects per crop before unpadding: it needs stage1_scope 'crop_fixed' "
                     f"or 'crop_divided', got {scope!r}")


def check_choice(name: str, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Stage1:
  """Stage I, before the LLM (`models.pruning.stage1`).

  budget: visual tokens kept per image (the count vocabulary: `models`).
  layout: the `Layout` row: candidates, the crops' quotas and LLM order; LLaVA-1.5 has one crop, where all select
    the same budget.
  relevance: "cls" (the CLS token's attention) | "received" (the mean attention each token receives; both of the
    vision feature layer, named signals of the family: `models.family.RELEVANCE`) | "text" | "clip_text" (CDPruner:
    CLIP text-image relevance, needs `clip`) | "none".
  features: what the method's similarity reads: "projector" (the projector outputs) | "vision" (the vision feature
    layer's hidden states, before the projector).
  newlines: LLaVA-NeXT newline policy "drop" | "rows" | "keep" | "candidates".
  crops: the nominal crops per image behind the papers' targets (LLaVA-NeXT: 5, so 2880 = 5 x 576 tokens;
    LLaVA-1.5: 1): "crop_fixed" keeps a quota of budget // crops per crop, "ratio" reads N_nominal = crops x the
    crop's tokens.
    None: the model's `max_num_crops`.
  params: the method's hyperparameters (`params.Params`; a dict or pairs is converted by `PruningConfig`).
  """
  budget: int
  layout: Layout = Layout.GLOBAL
  relevance: Stage1Relevance = "cls"
  features: Features = "projector"
  newlines: Newlines = "drop"
  crops: int | None = None
  params: Any = ()

  def __post_init__(self):
    budget, crops = self.budget, self.crops
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
      raise ValueError(f"stage1_budget must be a positive int or None, got {budget!r}")
    if crops is not None and (isinstance(crops, bool) or not isinstance(crops, int) or crops < 1):
      raise ValueError(f"stage1_crops must be a positive int or None, got {crops!r}")
    if not isinstance(self.layout, Layout):
      raise ValueError(f"layout must be a Layout, got {self.layout!r}")
    for name, value, allowed in (("stage1_relevance", self.relevance, STAGE1_RELEVANCE),
                                 ("newlines", self.newlines, NEWLINES),
                                 ("stage1_features", self.features, FEATURES)):
      check_choice(name, value, allowed)


@dataclasses.dataclass(frozen=True)
class Stage2:
  """Stage II, between decoder layers (`models.pruning.stage2`).

  steps: ((layer, keep), ...) layers increasing in [1, L) ("after": [0, L - 1)), keeps non-increasing.
  method: the Stage II method (None: the config's `method`).
  relevance: "raters" | "last_token" | "none".
  params: the method's hyperparameters, shared by the steps.
  raters: text raters of relevance "raters": "attention" (re-chosen at each step from that layer's attention) |
    "sparsevlm" (chosen once from the LLM input embeddings, SparseVLM's rule).
  timing: "before" (layer l runs on the pruned sequence) | "after" (layer l runs on the full sequence, its output is
    pruned: layer l + 1 is the first pruned one); `PruningConfig.prune_layer` / `score_layer` give the layers.
  ratios: per step, the fraction of each row's own image tokens (as they enter the LLM) it keeps, int(n * ratio)
    with Python's float rounding, at most the step's static keep (PyramidDrop's image_token_ratio_list); None: every
    row keeps the static keep.
  positions: position ids after a step: "contiguous" (re-indexed from 0) | "original".
  """
  steps: tuple[tuple[int, int], ...]
  method: str | None = None
  relevance: Stage2Relevance = "raters"
  params: Any = ()
  raters: Raters = "attention"
  timing: Timing = "before"
  ratios: tuple[float, ...] | None = None
  positions: Positions = "contiguous"

  def __post_init__(self):
    try:
      object.__setattr__(self, "steps", tuple((int(layer), int(keep)) for layer, keep in self.steps))
    except (TypeError, ValueError):
      raise ValueError(f"stage2 must be a sequence of (layer, keep) pairs, got {self.steps!r}") from None
    if not self.steps:
      raise ValueError("Stage2 needs at least one (layer, keep) step (no Stage II: stage2=None)")
    for name, value, allowed in (("stage2_relevance", self.relevance, STAGE2_RELEVANCE),
                                 ("positions", self.positions, POSITIONS),
                                 ("stage2_raters", self.raters, STAGE2_RATERS),
                                 ("stage2_timing", self.timing, STAGE2_TIMINGS)):
      check_choice(name, value, allowed)
    if self.ratios is not None:
      try:
        ratios = tuple(float(r) for r in self.ratios)
      except (TypeError, ValueError):
        raise ValueError(f"stage2_ratios must be a sequence of floats, got {self.ratios!r}") from None
      object.__setattr__(self, "ratios", ratios)
      if len(ratios) != len(self.steps):
        raise ValueError(f"stage2_ratios holds {len(ratios)} ratios for {len(self.steps)} stage2 steps")
      if not all(0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"stage2_ratios must lie in (0, 1], got {ratios}")
    for i, (layer, keep) in enumerate(self.steps):
      if layer < 1 and self.timing == "before":
        raise ValueError(f"stage2 step {i}: layer {layer} must be >= 1 (prune between decoder layers)")
      if layer < 0:
        raise ValueError(f"stage2 step {i}: layer {layer} must be >= 0")
      if i and layer <= self.steps[i - 1][0]:
        raise ValueError(f"stage2 layers must increase, got {[s[0] for s in self.steps]}")
      if keep < 1:
        raise ValueError(f"stage2 step {i}: keep must be >= 1, got {keep}")
