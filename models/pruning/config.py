"""`PruningConfig`: what to prune, where and how; the TOPS schedule of the paper.

The config is hashable (a static argument of the jitted programs) except for its float hyperparameters, which the
programs take as traced arguments: `StaticConfig` is the config with them held out of its hash, so a sweep over
alpha or lambda reuses one compiled forward (`traced_hparams` are the values).
"""

import dataclasses
from typing import Any

from tops_jax import prune

__all__ = ["PruningConfig", "StaticConfig", "tops_schedule", "tops_layers", "PER_CROP_METHODS", "STAGE1_RELEVANCE",
           "STAGE2_RELEVANCE", "SCOPES", "POSITIONS", "NEWLINES"]

STAGE1_RELEVANCE = ("cls", "text", "none")
STAGE2_RELEVANCE = ("raters", "last_token", "none")
SCOPES = ("global", "per_crop")
POSITIONS = ("contiguous", "original")
NEWLINES = ("drop", "rows", "keep")
# Methods whose first k greedy picks are the same for every budget >= k (per-crop shares are data dependent).
PER_CROP_METHODS = ("tops", "fastv", "divprune", "cdpruner", "scope", "random")

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
  stage1_scope: LLaVA-NeXT "global" | "per_crop" (see the module docstring); LLaVA-1.5 has one crop.
  stage1_relevance: "cls" | "text" | "none".
  stage1_hparams: keyword arguments of the method (dict or pairs), e.g. {"alpha": 0.5, "lam": 0.5}.
  newlines: LLaVA-NeXT Stage I newline policy "drop" | "rows" | "keep".
  stage2: ((layer, keep), ...) pruning steps inside the LLM: layers increasing in [1, L), budgets non-increasing.
  stage2_method: method of Stage II (default `method`).
  stage2_relevance: "raters" | "last_token" | "none".
  stage2_hparams: keyword arguments of the Stage II method (shared by the steps).
  positions: position ids after Stage II: "contiguous" (re-indexed from 0) | "original".
  """
  method: str
  stage1_budget: int | None = None
  stage1_scope: str = "global"
  stage1_relevance: str = "cls"
  stage1_hparams: Any = ()
  newlines: str = "drop"
  stage2: tuple[tuple[int, int], ...] = ()
  stage2_method: str | None = None
  stage2_relevance: str = "raters"
  stage2_hparams: Any = ()
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
                                 ("positions", self.positions, POSITIONS), ("newlines", self.newlines, NEWLINES)):
      if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    for name, method in (("method", self.method), ("stage2_method", self.stage2_method)):
      if method is not None and method not in prune.METHODS:
        raise ValueError(f"unknown {name} {method!r}; known methods: {', '.join(prune.METHODS)}")
    budget = self.stage1_budget
    # Hyperparameters are checked here, where the config is built (a NaN alpha from a flag would otherwise reach
    # the jitted forward as a traced value that nothing can reject).
    if budget is not None:
      prune.check_hparams(self.method, want="merge" if prune.METHODS[self.method].merge else "order",
                          **dict(self.stage1_hparams))
    if self.stage2:
      prune.check_hparams(self.stage2_method or self.method, **dict(self.stage2_hparams))
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
      raise ValueError(f"stage1_budget must be a positive int or None, got {budget!r}")
    if budget is not None:
      if prune.needs_relevance(self.method, **dict(self.stage1_hparams)) and self.stage1_relevance == "none":
        raise ValueError(f"{self.method} needs a relevance vector; stage1_relevance is 'none'")
      if self.stage1_scope == "per_crop" and self.method not in PER_CROP_METHODS:
        raise ValueError(f"stage1_scope='per_crop' needs a method whose greedy order does not depend on the budget "
                         f"({', '.join(PER_CROP_METHODS)}); {self.method} is not one")
    previous = None if self.newlines == "keep" else budget    # kept newlines add to Stage II's candidates
    for i, (layer, keep) in enumerate(self.stage2):
      if layer < 1:
        raise ValueError(f"stage2 step {i}: layer {layer} must be >= 1 (prune between decoder layers)")
      if i and layer <= self.stage2[i - 1][0]:
        raise ValueError(f"stage2 layers must increase, got {[s[0] for s in self.stage2]}")
      if keep < 1:
        raise ValueError(f"stage2 step {i}: keep must be >= 1, got {keep}")
      if previous is not None and keep > previous:
        raise ValueError(f"stage2 step {i} keeps {keep} tokens, more than the {previous} it receives "
                         "(budgets must not increase)")
      previous = keep
    if self.stage2:
      m2 = self.stage2_method or self.method
      if prune.METHODS[m2].merge is not None:
        raise ValueError(f"{m2} merges tokens; merging methods run in Stage I only")
      if prune.needs_relevance(m2, **dict(self.stage2_hparams)) and self.stage2_relevance == "none":
        raise ValueError(f"{m2} needs a relevance vector; stage2_relevance is 'none'")

  @property
  def method2(self) -> str:
    return self.stage2_method or self.method

  def traced_hparams(self) -> dict[str, dict[str, float]]:
    """The float hyperparameters of each stage: {"stage1": {...}, "stage2": {...}}, the traced inputs."""
    return {"stage1": {k: v for k, v in self.stage1_hparams if _traced(v)},
            "stage2": {k: v for k, v in self.stage2_hparams if _traced(v)}}

  def static(self) -> "StaticConfig":
    return StaticConfig(self)

  def segments(self, num_layers: int) -> tuple[tuple[int, int], ...]:
    """The G layer segments [start, stop) between the Stage II pruning points."""
    bounds = (0,) + tuple(layer for layer, _ in self.stage2) + (num_layers,)
    return tuple(zip(bounds[:-1], bounds[1:]))

  def score_layer(self, layer: int) -> int:
    """The decoder layer whose attention (or keys) scores a Stage II step at `layer`."""
    return layer - 1 if self.stage2_relevance == "last_token" or self.method2 == "dart" else layer

  def check_model(self, model):
    """Raises ValueError when the schedule does not fit `model` (a LLaVA or LLaVA-NeXT port)."""
    text = model.config.text
    num_layers = text.num_hidden_layers
    for layer, _ in self.stage2:
      if layer >= num_layers:
        raise ValueError(f"stage2 layer {layer} is out of range for a decoder with {num_layers} layers "
                         f"(pruning layers lie in [1, {num_layers}))")
    # Bounds that hold for every image (each batch's own counts are checked when it is prepared).
    most = model.config.max_image_tokens
    if self.stage1_budget is not None and self.stage1_budget > most:
      raise ValueError(f"stage1_budget={self.stage1_budget} exceeds the {most} visual tokens per image")
    if self.stage2 and not self.stage1_budget and self.stage2[0][1] > most:
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
                  stage1_scope: str = "global", newlines: str = "drop") -> PruningConfig:
  """The TOPS schedule for target T: Stage I N -> 2T, layer round(12/32 L): -> T, layer round(24/32 L): -> T // 4.

  Stage I uses (alpha, lambda) = (0.5, 0.5) and CLS relevance; Stage II the paper's per-model values (LLaVA-1.5-7B:
  (0.5, 0.5) at T=128, (0.5, 1.0) at 64 and 32; 13B (0.5, 0.4); NeXT-7B (0.5, 0.5) / (0.5, 0.4) / (0.5, 0.5) at
  640 / 320 / 160; NeXT-13B (0.5, 0.5)) with text-rater relevance and contiguous positions. Other models and
  targets need `stage2_alpha` and `stage2_lam`.
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
                       stage2_hparams={"alpha": float(stage2_alpha), "lam": float(stage2_lam)}, positions="contiguous")


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
