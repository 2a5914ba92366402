"""`PruningConfig`: what to prune, where and how; the TOPS schedule of the paper.

The config is hashable (a static argument of the jitted programs) except for its float hyperparameters, which the
programs take as traced arguments: `StaticConfig` is the config with them held out of its hash, so a sweep over
alpha or lambda reuses one compiled forward (`traced_hparams` are the values).
"""

import dataclasses
from typing import Any

from tops_jax import prune
from tops_jax import sparsevlm as sparsevlm_lib

__all__ = ["PruningConfig", "StaticConfig", "tops_schedule", "tops_layers", "PER_CROP_METHODS", "STAGE1_RELEVANCE",
           "STAGE2_RELEVANCE", "SCOPES", "GRIDS", "FEATURES", "POSITIONS", "NEWLINES",
           "STAGE2_RATERS", "STAGE2_TIMINGS", "pdrop_schedule", "PDROP_LAYERS", "PDROP_LAMBDA",
           "VARIABLE_COUNT_METHODS", "STAGE2_ONLY_METHODS", "sparsevlm_schedule"]

STAGE1_RELEVANCE = ("cls", "text", "clip_text", "none")
STAGE2_RELEVANCE = ("raters", "last_token", "none")
STAGE2_RATERS = ("attention", "sparsevlm")     # `models.pruning.stage2` argues the default
STAGE2_TIMINGS = ("before", "after")
SCOPES = ("global", "per_crop", "ratio", "crop_fixed", "crop_divided")
GRIDS = ("unpadded", "padded", "padded_unpad")
FEATURES = ("projector", "vision")
POSITIONS = ("contiguous", "original")
NEWLINES = ("drop", "rows", "keep", "candidates")
# Methods whose first k greedy picks are the same for every budget >= k (per-crop shares are data dependent).
PER_CROP_METHODS = ("tops", "fastv", "divprune", "cdpruner", "scope", "random")

# Methods whose first k picks are the same for every budget >= k: a step may keep a per-row count from the front of
# their order (`stage2_ratios`, data-dependent counts).
VARIABLE_COUNT_METHODS = PER_CROP_METHODS + ("pdrop",)
# Methods that run only between decoder layers, through their own step (`models.pruning.stage2.choose`): not
# `tops_jax.prune` entries (SparseVLM: data-dependent counts and recycled tokens, see `tops_jax.sparsevlm`).
STAGE2_ONLY_METHODS = ("sparsevlm",)
# Stage II methods that score from the layer before the pruned one ("before" timing), as their official codes.
_SCORES_PREVIOUS_LAYER = ("fastv", "dart")

# TOPS Stage II (alpha, lambda) from the paper, by (family, decoder layers) and then target T.
_TOPS_STAGE2 = {
    ("llava-1.5", 32): {128: (0.5, 0.5), 64: (0.5, 1.0), 32: (0.5, 1.0)},
    ("llava-1.5", 40): {128: (0.5, 0.4), 64: (0.5, 0.4), 32: (0.5, 0.4)},
    ("llava-next", 32): {640: (0.5, 0.5), 320: (0.5, 0.4), 160: (0.5, 0.5)},
    ("llava-next", 40): {640: (0.5, 0.5), 320: (0.5, 0.5), 160: (0.5, 0.5)},
}


def _hparams(name: str, value) -> tuple[tuple[str, Any], ...]:
  """A dict or (name, value) pairs -> sorted hashable pairs."""
  try:
    items = list(dict(value).items())
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a dict or (name, value) pairs, got {value!r}") from None
  out = []
  for k, v in items:
    if isinstance(v, list):
      v = tuple(v)
    if hasattr(v, "shape"):
      raise ValueError(f"{name}: hyperparameter {k} is an array; the config is static (hashable), pass Python values")
    out.append((str(k), v))
  return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class PruningConfig:
  """What to prune, where and how (hashable: a static argument of the jitted forward).

  method: a `tops_jax.prune` method name (Stage I, and Stage II unless `stage2_method`).
  stage1_budget: visual tokens kept per image before the LLM, or None (no Stage I).
  stage1_scope: LLaVA-NeXT "global" | "per_crop" | "ratio" | "crop_fixed" | "crop_divided" (`models.pruning.stage1`
    tabulates them); LLaVA-1.5 has one crop, where all select the same K.
  stage1_grid: "unpadded" (candidates are the packed tokens) | "padded" (each real crop's tokens before unpadding, all
    picks to the LLM) | "padded_unpad" (before unpadding; unpadding then drops the picks it removes).
  stage1_features: what the method's similarity reads: "projector" (the projector outputs) | "vision" (the vision
    feature layer's hidden states, before the projector).
  stage1_relevance: "cls" | "text" | "clip_text" (CDPruner: CLIP text-image relevance, needs `clip`) | "none".
  visionzip_cls: VisionZip keeps each crop's CLS token and lays the rows out as its official code (`stage1`).
  stage1_crops: the nominal crops per image behind the papers' budgets (LLaVA-NeXT: 5, so 2880 = 5 x 576 tokens;
    LLaVA-1.5: 1): "crop_fixed" keeps stage1_budget // stage1_crops per crop, "ratio" reads N_nominal = stage1_crops x
    the crop's tokens. None: the model's `max_num_crops`.
  stage1_hparams: keyword arguments of the method (dict or pairs), e.g. {"alpha": 0.5, "lam": 0.5}.
  newlines: LLaVA-NeXT Stage I newline policy "drop" | "rows" | "keep".
  stage2: ((layer, keep), ...) pruning steps inside the LLM: layers increasing in [1, L) ("after": [0, L - 1)),
    budgets non-increasing.
  stage2_method: method of Stage II (default `method`).
  stage2_relevance: "raters" | "last_token" | "none".
  stage2_hparams: keyword arguments of the Stage II method (shared by the steps).
  stage2_raters: text raters of stage2_relevance="raters": "attention" (re-chosen at each step from that layer's
    attention) | "sparsevlm" (chosen once from the LLM input embeddings, SparseVLM's rule); see `stage2`.
  stage2_timing: "before" (layer l runs on the pruned sequence) | "after" (layer l runs on the full sequence, its
    output is pruned: layer l + 1 is the first pruned one); `prune_layer` / `score_layer` give the layers.
  stage2_ratios: per step, the fraction of each row's own image tokens (as they enter the LLM) it keeps,
    int(n * ratio) with Python's float rounding, at most the step's static keep (PyramidDrop's
    image_token_ratio_list); None: every row keeps the static keep.
  positions: position ids after Stage II: "contiguous" (re-indexed from 0) | "original".
  """
  method: str
  stage1_budget: int | None = None
  stage1_scope: str = "global"
  stage1_relevance: str = "cls"
  stage1_hparams: Any = ()
  stage1_grid: str = "unpadded"
  stage1_features: str = "projector"
  visionzip_cls: bool = False
  stage1_crops: int | None = None
  newlines: str = "drop"
  stage2: tuple[tuple[int, int], ...] = ()
  stage2_method: str | None = None
  stage2_relevance: str = "raters"
  stage2_hparams: Any = ()
  stage2_raters: str = "attention"
  stage2_timing: str = "before"
  stage2_ratios: tuple[float, ...] | None = None
  positions: str = "contiguous"

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_("stage1_hparams", _hparams("stage1_hparams", self.stage1_hparams))
    set_("stage2_hparams", _hparams("stage2_hparams", self.stage2_hparams))
    try:
      set_("stage2", tuple((int(layer), int(keep)) for layer, keep in self.stage2))
    except (TypeError, ValueError):
      raise ValueError(f"stage2 must be a sequence of (layer, keep) pairs, got {self.stage2!r}") from None
    for name, value, allowed in (("stage1_scope", self.stage1_scope, SCOPES),
                                 ("stage1_relevance", self.stage1_relevance, STAGE1_RELEVANCE),
                                 ("stage2_relevance", self.stage2_relevance, STAGE2_RELEVANCE),
                                 ("positions", self.positions, POSITIONS), ("newlines", self.newlines, NEWLINES),
                                 ("stage1_grid", self.stage1_grid, GRIDS),
                                 ("stage1_features", self.stage1_features, FEATURES)):
      if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    for name, method in (("method", self.method), ("stage2_method", self.stage2_method)):
      if method is not None and method not in prune.METHODS and method not in STAGE2_ONLY_METHODS:
        raise ValueError(f"unknown {name} {method!r}; known methods: "
                         f"{', '.join(tuple(prune.METHODS) + STAGE2_ONLY_METHODS)}")
    budget = self.stage1_budget
    if budget is not None and self.method in STAGE2_ONLY_METHODS:
      raise ValueError(f"{self.method} prunes between decoder layers only: it has no Stage I (stage1_budget)")
    # Hyperparameters are checked here, where the config is built (a NaN alpha from a flag would otherwise reach
    # the jitted forward as a traced value that nothing can reject).
    crops = self.stage1_crops
    if crops is not None and (isinstance(crops, bool) or not isinstance(crops, int) or crops < 1):
      raise ValueError(f"stage1_crops must be a positive int or None, got {crops!r}")
    if budget is not None and self.visionzip_cls:
      _check_visionzip_split(dict(self.stage1_hparams))
    elif budget is not None:
      prune.check_hparams(self.method, want="merge" if prune.METHODS[self.method].merge else "order",
                          **dict(self.stage1_hparams))
    if self.stage2 and self.method2 not in STAGE2_ONLY_METHODS:
      prune.check_hparams(self.method2, **dict(self.stage2_hparams))
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
      raise ValueError(f"stage1_budget must be a positive int or None, got {budget!r}")
    if budget is not None:
      if prune.needs_relevance(self.method, **dict(self.stage1_hparams)) and self.stage1_relevance == "none":
        raise ValueError(f"{self.method} needs a relevance vector; stage1_relevance is 'none'")
      self._check_layout()
    previous = None if self.newlines == "keep" else budget    # kept newlines add to Stage II's candidates
    self._check_stage2_options()
    for i, (layer, keep) in enumerate(self.stage2):
      if layer < 1 and self.stage2_timing == "before":
        raise ValueError(f"stage2 step {i}: layer {layer} must be >= 1 (prune between decoder layers)")
      if layer < 0:
        raise ValueError(f"stage2 step {i}: layer {layer} must be >= 0")
      if i and layer <= self.stage2[i - 1][0]:
        raise ValueError(f"stage2 layers must increase, got {[s[0] for s in self.stage2]}")
      if keep < 1:
        raise ValueError(f"stage2 step {i}: keep must be >= 1, got {keep}")
      if previous is not None and keep > previous and self.method2 not in STAGE2_ONLY_METHODS:
        raise ValueError(f"stage2 step {i} keeps {keep} tokens, more than the {previous} it receives "
                         "(budgets must not increase)")
      previous = keep
    if self.stage2 and self.method2 not in STAGE2_ONLY_METHODS:
      m2 = self.method2
      if prune.METHODS[m2].merge is not None:
        raise ValueError(f"{m2} merges tokens; merging methods run in Stage I only")
      if prune.needs_relevance(m2, **dict(self.stage2_hparams)) and self.stage2_relevance == "none":
        raise ValueError(f"{m2} needs a relevance vector; stage2_relevance is 'none'")

  def _check_stage2_options(self):
    for name, value, allowed in (("stage2_raters", self.stage2_raters, STAGE2_RATERS),
                                 ("stage2_timing", self.stage2_timing, STAGE2_TIMINGS)):
      if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if self.stage2_raters != "attention" and self.stage2_relevance != "raters":
      raise ValueError(f"stage2_raters={self.stage2_raters!r} chooses text raters; stage2_relevance is "
                       f"{self.stage2_relevance!r}")
    if self.stage2 and self.method2 == "sparsevlm":
      self._check_sparsevlm()
    if self.stage2_ratios is None:
      return
    try:
      ratios = tuple(float(r) for r in self.stage2_ratios)
    except (TypeError, ValueError):
      raise ValueError(f"stage2_ratios must be a sequence of floats, got {self.stage2_ratios!r}") from None
    object.__setattr__(self, "stage2_ratios", ratios)
    if len(ratios) != len(self.stage2):
      raise ValueError(f"stage2_ratios holds {len(ratios)} ratios for {len(self.stage2)} stage2 steps")
    if not all(0.0 < r <= 1.0 for r in ratios):
      raise ValueError(f"stage2_ratios must lie in (0, 1], got {ratios}")
    if self.stage2 and self.method2 not in VARIABLE_COUNT_METHODS:
      raise ValueError(f"stage2_ratios give each row its own count, kept from the front of the method's order: "
                       f"they need a method whose order does not depend on the budget "
                       f"({', '.join(VARIABLE_COUNT_METHODS)}); {self.method2} is not one")

  def _check_sparsevlm(self):
    hp = dict(self.stage2_hparams)
    unknown = sorted(set(hp) - {"version", "budget"})
    if unknown:
      raise ValueError(f"sparsevlm: unknown hyperparameter(s) {', '.join(unknown)}; sparsevlm takes: version, budget "
                       "(the official setting whose per-step counts the steps follow)")
    steps = sparsevlm_lib.schedule("llava-1.5", hp.get("budget", 192), hp.get("version", "v1")).steps
    if len(self.stage2) > len(steps):
      raise ValueError(f"sparsevlm: {len(self.stage2)} stage2 steps, the official setting has {len(steps)}")
    wanted = dict(stage2_relevance="raters", stage2_raters="sparsevlm", stage2_timing="after",
                  positions="contiguous", stage2_ratios=None)
    wrong = {k: getattr(self, k) for k, v in wanted.items() if getattr(self, k) != v}
    if wrong:
      raise ValueError(f"sparsevlm runs as its official code: {wanted}; got {wrong}")

  def _check_layout(self):
    scope, grid, merge = self.stage1_scope, self.stage1_grid, prune.METHODS[self.method].merge is not None
    if scope in ("per_crop", "ratio", "crop_divided") and self.method not in PER_CROP_METHODS:
      raise ValueError(f"stage1_scope={scope!r} gives data-dependent budgets and needs a method whose greedy order "
                       f"does not depend on the budget ({', '.join(PER_CROP_METHODS)}); {self.method} is not one")
    if grid != "unpadded" and scope not in ("crop_fixed", "crop_divided"):
      raise ValueError(f"stage1_grid={grid!r} selects per crop before unpadding: it needs stage1_scope 'crop_fixed' "
                       f"or 'crop_divided', got {scope!r}")
    if grid == "padded" and self.newlines != "drop":
      raise ValueError(f"stage1_grid='padded' hands the crops' tokens to the LLM without unpadding, so there are no "
                       f"newlines to keep: newlines must be 'drop', got {self.newlines!r}")
    if self.newlines == "candidates" and (grid != "unpadded" or scope not in ("global", "ratio")):
      raise ValueError("newlines='candidates' makes the newline slots candidates of one selection over the packed "
                       "tokens: it needs stage1_grid='unpadded' and stage1_scope 'global' or 'ratio'")
    if self.visionzip_cls and self.method != "visionzip":
      raise ValueError(f"visionzip_cls applies to method='visionzip', got {self.method!r}")
    if self.visionzip_cls and (scope != "crop_fixed" or grid != "padded"):
      raise ValueError("visionzip_cls is VisionZip's official layout: per crop ('crop_fixed') over the padded crops "
                       f"('padded'), got stage1_scope={scope!r}, stage1_grid={grid!r}")
    if merge and scope != "global" and not self.visionzip_cls:
      raise ValueError(f"{self.method} merges tokens; merging methods select globally (stage1_scope='global') or, "
                       "for VisionZip, with its official per-crop layout (visionzip_cls=True)")
    if self.stage1_relevance == "clip_text" and self.method != "cdpruner":
      raise ValueError(f"stage1_relevance='clip_text' is CDPruner's relevance; method is {self.method!r}")

  @property
  def method2(self) -> str:
    return self.stage2_method or self.method

  @property
  def stage2_counts_vary(self) -> bool:
    """Whether the Stage II keeps are static bounds of per-row counts (`stage2_ratios`, SparseVLM) rather than the
    counts every row keeps."""
    return self.stage2_ratios is not None or self.method2 in STAGE2_ONLY_METHODS

  def traced_hparams(self) -> dict[str, dict[str, float]]:
    """The float hyperparameters of each stage: {"stage1": {...}, "stage2": {...}}, the traced inputs."""
    return {"stage1": {k: v for k, v in self.stage1_hparams if _traced(v)},
            "stage2": {k: v for k, v in self.stage2_hparams if _traced(v)}}

  def static(self) -> "StaticConfig":
    return StaticConfig(self)

  def segments(self, num_layers: int) -> tuple[tuple[int, int], ...]:
    """The G layer segments [start, stop) between the Stage II pruning points (`prune_layer`)."""
    bounds = (0,) + tuple(self.prune_layer(layer) for layer, _ in self.stage2) + (num_layers,)
    return tuple(zip(bounds[:-1], bounds[1:]))

  def prune_layer(self, layer: int) -> int:
    """The first decoder layer that runs on the sequence pruned by the Stage II step at `layer`."""
    return layer + 1 if self.stage2_timing == "after" else layer

  def score_layer(self, layer: int) -> int:
    """The decoder layer whose attention (or keys) scores the Stage II step at `layer`: "after", layer itself;
    "before", layer - 1 for FastV and DART (their official codes read the layer before the pruned one), else layer
    (its own attention rows over its input, as PyramidDrop's and SparseVLM's)."""
    if self.stage2_timing == "before" and self.method2 in _SCORES_PREVIOUS_LAYER:
      return layer - 1
    return layer

  def check_model(self, model):
    """Raises ValueError when the schedule does not fit `model` (a LLaVA or LLaVA-NeXT port)."""
    text = model.config.text
    num_layers = text.num_hidden_layers
    for layer, _ in self.stage2:
      if self.prune_layer(layer) >= num_layers:
        low, high = (0, num_layers - 1) if self.stage2_timing == "after" else (1, num_layers)
        raise ValueError(f"stage2 layer {layer} is out of range for a decoder with {num_layers} layers "
                         f"(stage2_timing={self.stage2_timing!r}: pruning layers lie in [{low}, {high}))")
    # Bounds that hold for every image (each batch's own counts are checked when it is prepared).
    most = model.config.max_image_tokens
    if self.stage1_budget is not None and self.stage1_budget > most:
      raise ValueError(f"stage1_budget={self.stage1_budget} exceeds the {most} visual tokens per image")
    if self.stage2 and not self.stage1_budget and self.stage2[0][1] > most and not self.stage2_counts_vary:
      raise ValueError(f"stage2 keeps {self.stage2[0][1]} tokens, more than the {most} visual tokens per image")
    if self.stage1_budget is not None and self.method == "visionzip":
      c = model.config
      if not isinstance(c.vision_feature_layer, int) or c.vision_feature_select_strategy != "default":
        raise ValueError("visionzip needs a single int vision_feature_layer and the 'default' strategy")
    if self.stage2 and self.stage2_relevance != "none" and text.sliding_window is not None:
      raise ValueError("Stage II attention relevance ignores sliding windows; this model has sliding_window="
                       f"{text.sliding_window}")


def tops_layers(num_layers: int) -> tuple[int, int]:
  """TOPS' two Stage II layers for an L-layer decoder: round(12/32 L) and round(24/32 L) (the paper's 12 and 24 of
  32). Raises ValueError when they are not distinct layers inside (0, L)."""
  l1, l2 = round(num_layers * 12 / 32), round(num_layers * 24 / 32)
  if not 1 <= l1 < l2 < num_layers:
    raise ValueError(f"a decoder of {num_layers} layers is too shallow for the TOPS schedule (layers {l1}, {l2})")
  return l1, l2


def tops_schedule(num_layers: int, target: int, *, family: str = "llava-1.5", stage1_alpha: float = 0.5,
                  stage1_lam: float = 0.5, stage2_alpha: float | None = None, stage2_lam: float | None = None,
                  stage1_scope: str = "global", newlines: str = "drop", raters: str = "attention",
                  timing: str = "before") -> PruningConfig:
  """The TOPS schedule for target T: Stage I N -> 2T, layer round(12/32 L): -> T, layer round(24/32 L): -> T // 4.

  Stage I uses (alpha, lambda) = (0.5, 0.5) and CLS relevance; Stage II the paper's per-model values (LLaVA-1.5-7B:
  (0.5, 0.5) at T=128, (0.5, 1.0) at 64 and 32; 13B (0.5, 0.4); NeXT-7B (0.5, 0.5) / (0.5, 0.4) / (0.5, 0.5) at
  640 / 320 / 160; NeXT-13B (0.5, 0.5)) with text-rater relevance and contiguous positions. Other models and
  targets need `stage2_alpha` and `stage2_lam`. `raters` and `timing` (the `stage2_raters` / `stage2_timing`
  fields) default to the paper's reading (`models.pruning.stage2` argues it); "sparsevlm" / "after" are the
  SparseVLM code's, for ablations.
  """
  if not isinstance(target, int) or target < 4:
    raise ValueError(f"target T must be an int >= 4 (the last Stage II step keeps T // 4), got {target!r}")
  l1, l2 = tops_layers(num_layers)
  paper = _TOPS_STAGE2.get((family, num_layers), {}).get(target)
  if stage2_alpha is None or stage2_lam is None:
    if paper is None:
      raise ValueError(f"no paper Stage II setting for family={family!r}, {num_layers} layers, T={target}; "
                       "pass stage2_alpha and stage2_lam")
    stage2_alpha = paper[0] if stage2_alpha is None else stage2_alpha
    stage2_lam = paper[1] if stage2_lam is None else stage2_lam
  return PruningConfig(method="tops", stage1_budget=2 * target, stage1_scope=stage1_scope, stage1_relevance="cls",
                       stage1_hparams={"alpha": float(stage1_alpha), "lam": float(stage1_lam)}, newlines=newlines,
                       stage2=((l1, target), (l2, target // 4)), stage2_relevance="raters",
                       stage2_hparams={"alpha": float(stage2_alpha), "lam": float(stage2_lam)}, positions="contiguous",
                       stage2_raters=raters, stage2_timing=timing)


# PyramidDrop's published inference setting (Cooperx521/PyramidDrop scripts/v1_5/pdrop_eval/*.sh and
# scripts/v1_6/pdrop_eval/*.sh, LLaVA-1.5 and LLaVA-NeXT, 7B and 13B alike): --layer_list '[8,16,24]'
# --image_token_ratio_list "[0.5,0.25,0.125]", i.e. lambda = 0.5 per stage, absolute layers (not scaled to depth).
PDROP_LAYERS = (8, 16, 24)
PDROP_LAMBDA = 0.5
# The author's advice for budgets that (8, 16, 24) cannot reach (issue #29: "2, 8, 16" with lambda = 0.19 for about
# 64 of 576 tokens; any lambda > 0 on (8, 16, 24) keeps more than 8/32 of the tokens on average).
_PDROP_LOW_LAYERS = (2, 8, 16)
# The token counts the TOPS tables' budgets are fractions of (METHODS.md section 4: NeXT's 5 x 576).
_BASE_TOKENS = {"llava-1.5": 576, "llava-next": 2880}


def _pdrop_average(layers, lam: float, num_layers: int) -> float:
  """PyramidDrop's "average tokens" as a fraction of N: sum over layers of the kept fraction / L (lambda^s in
  stage s)."""
  bounds = (0,) + tuple(layers) + (num_layers,)
  return sum((b - a) * lam ** s for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))) / num_layers


def pdrop_schedule(num_layers: int, target: int | None = None, *, family: str = "llava-1.5",
                   num_visual: int | None = None, layers: tuple[int, ...] | None = None,
                   lam: float | None = None) -> PruningConfig:
  """PyramidDrop (method "pdrop"): at each layer l of `layers`, before layer l runs, keep int(n * lam^(s+1)) of each
  image's n tokens, ranked by the attention of the last instruction token at layer l; contiguous positions.

  target None: the published setting, layers (8, 16, 24) and lambda 0.5 (`PDROP_LAYERS`, `PDROP_LAMBDA`).
  target T: PyramidDrop's "average number of visual tokens" (the kept image tokens summed over the L layers / L,
    the measure of its Table 2, issue #22) equals T / N_family (N = 576 for "llava-1.5", 2880 for "llava-next": the
    TOPS tables' budgets; other families: `num_visual`). The paper's per-budget settings are not published; the layers
    are (8, 16, 24) when they can reach T and otherwise the author's (2, 8, 16) (issue #29), and lambda solves the
    continuous average equation, rounded to two decimals as the author reports it (T = 64 of 576 on 32 layers:
    0.19, as in issue #29). `layers` and `lam` override.
  num_visual: the most image tokens an image brings to the LLM (static keeps int(num_visual * ratio); LLaVA-NeXT:
    `model.config.max_image_tokens`, so that every image's own int(n * ratio) fits); default N_family.
  """
  base = _BASE_TOKENS.get(family, num_visual)
  num_visual = base if num_visual is None else int(num_visual)
  if num_visual is None or num_visual < 1:
    raise ValueError(f"family {family!r} has no reference token count: pass num_visual (the image's tokens)")
  if target is None:
    layers = PDROP_LAYERS if layers is None else layers
    lam = PDROP_LAMBDA if lam is None else lam
  elif lam is not None:
    raise ValueError("give a target (lambda is then solved) or lam, not both")
  layers = tuple(int(layer) for layer in (layers or ()))
  if target is not None:
    if isinstance(target, bool) or not isinstance(target, int) or not 0 < target < base:
      raise ValueError(f"target must be an int in (0, {base}) (average visual tokens per layer), got {target!r}")
    fraction = target / base
    if not layers:
      layers = PDROP_LAYERS if _pdrop_average(PDROP_LAYERS, 0.0, num_layers) < fraction else _PDROP_LOW_LAYERS
    if not _pdrop_average(layers, 0.0, num_layers) < fraction:
      raise ValueError(f"layers {layers} keep every token up to layer {layers[0]}: their average is at least "
                       f"{base * layers[0] / num_layers:.1f} tokens, above target={target}; pass layers=")
    lo, hi = 0.0, 1.0
    for _ in range(60):
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if _pdrop_average(layers, mid, num_layers) < fraction else (lo, mid)
    lam = round(lo, 2)
  if not layers or not 0.0 < lam <= 1.0:
    raise ValueError(f"need at least one layer and lambda in (0, 1], got layers={layers}, lam={lam}")
  if layers[-1] >= num_layers:
    raise ValueError(f"a decoder of {num_layers} layers is too shallow for PyramidDrop layers {layers}")
  ratios = tuple(round(lam ** (s + 1), 12) for s in range(len(layers)))   # as a hand-written list: 0.42^2 = 0.1764
  keeps = tuple(max(1, int(num_visual * r)) for r in ratios)
  return PruningConfig(method="pdrop", stage2=tuple(zip(layers, keeps)), stage2_relevance="last_token",
                       stage2_ratios=ratios, positions="contiguous")


def _check_visionzip_split(hp: dict[str, Any]):
  """VisionZip's official layout takes exactly its per-crop (dominant, contextual), CLS counted in dominant."""
  if set(hp) != {"dominant", "contextual"}:
    raise ValueError(f"visionzip_cls takes the per-crop hyperparameters dominant and contextual (the official "
                     f"counts, CLS included in dominant), got {sorted(hp)}")
  for name, low in (("dominant", 1), ("contextual", 0)):
    value = hp[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"visionzip_cls: {name} must be an int >= {low}, got {value!r}")


def sparsevlm_schedule(num_layers: int, target: int = 192, *, version: str = "v1",
                       num_visual: int = 576) -> PruningConfig:
  """SparseVLM (method "sparsevlm") as its official code runs on LLaVA-1.5 (`tops_jax.sparsevlm.schedule`):
  v1 prunes after layers 2, 6, 15, 19 with (scale, bias) = (13.5, 0) / (9, 6) / (0.8, 0) for the 192 / 128 / 64
  settings, v1.5 after layers 2, 6, 15 with fixed counts; raters chosen once from the input embeddings, timing
  "after", contiguous positions, recycled tokens inserted after the kept ones. `target` names the official setting
  (its mean visual tokens per layer). The keeps are static bounds on the kept counts over every prompt (v1: rank
  <= min(T, N) with T = N), for images of at most `num_visual` tokens; the driver tightens them per batch.
  """
  plan = sparsevlm_lib.schedule("llava-1.5", target, version)
  layers = tuple(step.layer for step in plan.steps)
  if layers[-1] + 1 >= num_layers:
    raise ValueError(f"a decoder of {num_layers} layers is too shallow for SparseVLM's layers {layers}")
  bounds = sparsevlm_lib.sizes(plan, num_visual, num_visual)
  return PruningConfig(method="sparsevlm", stage2=tuple((layer, max(b.keep, 1)) for layer, b in zip(layers, bounds)),
                       stage2_relevance="raters", stage2_raters="sparsevlm", stage2_timing="after",
                       stage2_hparams={"version": version, "budget": int(target)}, positions="contiguous")


def _traced(value) -> bool:
  """Float hyperparameters are traced; ints, strings, bools and tuples shape the program and stay static."""
  return isinstance(value, float)


@dataclasses.dataclass(frozen=True, eq=False)
class StaticConfig:
  """A `PruningConfig` as a jit static argument: equal (and hashed) by everything but its float hyperparameters.

  Code under jit reads the structure from `config` and the hyperparameters from `hparams(stage, traced)`, never the
  float values of `config` (they belong to whichever config compiled the program first).
  """
  config: PruningConfig

  def _key(self):
    held_out = lambda pairs: tuple((k, "<traced>" if _traced(v) else v) for k, v in pairs)
    c = self.config
    return tuple((f.name, held_out(getattr(c, f.name)) if f.name.endswith("_hparams") else getattr(c, f.name))
                 for f in dataclasses.fields(c))

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, StaticConfig) and self._key() == other._key()

  def hparams(self, stage: str, traced: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The keyword arguments of `stage` ("stage1" | "stage2"): the static ones plus the traced values."""
    pairs = self.config.stage1_hparams if stage == "stage1" else self.config.stage2_hparams
    return {**{k: v for k, v in pairs if not _traced(v)}, **traced[stage]}
