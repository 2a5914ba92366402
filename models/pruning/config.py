"""`PruningConfig`: what to prune, where and how, as typed records (the methods' schedules: `models.pruning.methods`).

    PruningConfig(method, stage1=Stage1(budget, layout=Layout.GLOBAL, ...) | None, stage2=Stage2(steps, ...) | None)
    PruningConfig.full()           # the unpruned model (FULL); PruningConfig(method="tops") means the same
    PruningConfig.flat(method, stage1_budget=..., stage2=((layer, keep), ...), ...)   # the flat keyword spelling

Stage presence is explicit (None: no such stage). Modes are `Literal`s; the Stage I layout is one `Layout` row (the
table in `models.pruning.stage1`); hyperparameters are the method's typed `params.Params`, checked once when the
config is built. The config is hashable (a static argument of the jitted programs) except for its float
hyperparameters, which the programs take as traced arguments: `StaticConfig` is the config with them held out of its
hash, so a sweep over alpha or lambda reuses one compiled forward (`traced_hparams` are the values). The flat
attribute names of the keyword spelling (`stage1_budget`, `stage1_scope`, `stage2_hparams`, ...) stay readable as
properties (the runner, its overrides and its error messages speak them; `steps` are Stage II's (layer, keep)
steps), and the repr is that spelling's, which the runner's row keys hash.
"""

import dataclasses
from typing import Any

from models.pruning import methods
from models.pruning import params as params_lib
from models.pruning.modes import (FEATURES, GRIDS, NEWLINES, POSITIONS, SCOPES, STAGE1_RELEVANCE, STAGE2_RATERS,
                                  STAGE2_RELEVANCE, STAGE2_TIMINGS, Layout, Stage1, Stage2, check_choice)
from tops_jax import prune

__all__ = ["PruningConfig", "Stage1", "Stage2", "Layout", "FULL", "StaticConfig", "PER_CROP_METHODS",
           "STAGE1_RELEVANCE", "STAGE2_RELEVANCE", "SCOPES", "GRIDS", "FEATURES", "POSITIONS", "NEWLINES",
           "STAGE2_RATERS", "STAGE2_TIMINGS", "VARIABLE_COUNT_METHODS", "STAGE2_ONLY_METHODS"]

# Methods whose first k greedy picks are the same for every budget >= k (per-crop shares are data dependent).
PER_CROP_METHODS = tuple(name for name, m in methods.METHODS.items() if m.budget_free)
# Methods whose first k picks are the same for every budget >= k: a step may keep a per-row count from the front of
# their order (`stage2_ratios`, data-dependent counts).
VARIABLE_COUNT_METHODS = tuple(name for name, m in methods.METHODS.items() if m.variable_count)
# Methods that run only between decoder layers, through their own step (`models.pruning.stage2.choose`): not
# `tops_jax.prune` entries (SparseVLM: data-dependent counts and recycled tokens, see `tops_jax.sparsevlm`).
STAGE2_ONLY_METHODS = tuple(name for name, m in methods.METHODS.items() if m.stage2_only)


def _check_method(name: str, method: str | None):
  if method is not None and method not in methods.METHODS:
    raise ValueError(f"unknown {name} {method!r}; known methods: {', '.join(methods.METHODS)}")


_FLAT_DEFAULTS = dict(stage1_budget=None, stage1_scope="global", stage1_relevance="cls", stage1_hparams=(),
                      stage1_grid="unpadded", stage1_features="projector", visionzip_cls=False, stage1_crops=None,
                      newlines="drop", stage2=(), stage2_method=None, stage2_relevance="raters", stage2_hparams=(),
                      stage2_raters="attention", stage2_timing="before", stage2_ratios=None, positions="contiguous")

_FLAT_CHOICES = (("stage1_scope", SCOPES), ("stage1_relevance", STAGE1_RELEVANCE),
                 ("stage2_relevance", STAGE2_RELEVANCE), ("positions", POSITIONS), ("newlines", NEWLINES),
                 ("stage1_grid", GRIDS), ("stage1_features", FEATURES), ("stage2_raters", STAGE2_RATERS),
                 ("stage2_timing", STAGE2_TIMINGS))


@dataclasses.dataclass(frozen=True)
class PruningConfig:
  """What to prune, where and how (hashable: a static argument of the jitted forward).

  method: a `tops_jax.prune` method name, or "sparsevlm" (Stage II only): Stage I's method, and Stage II's unless
    `stage2.method` names another.
  stage1: `Stage1`, or None (no Stage I).
  stage2: `Stage2`, or None (no Stage II). Both None: the unpruned model (`full()`, `FULL`).
  The stages' hyperparameters may be given as dicts or pairs; they become the method's `params.Params`.
  """
  method: str
  stage1: Stage1 | None = None
  stage2: Stage2 | None = None

  def __post_init__(self):
    _check_method("method", self.method)
    _check_method("stage2_method", self.stage2 and self.stage2.method)
    s1, s2 = self.stage1, self.stage2
    if s1 is not None and not isinstance(s1, Stage1) or s2 is not None and not isinstance(s2, Stage2):
      raise ValueError(f"stage1 / stage2 must be Stage1 / Stage2 or None, got {s1!r}, {s2!r}")
    if s1 is not None and self.spec.stage2_only:
      raise ValueError(f"{self.method} prunes between decoder layers only: it has no Stage I (stage1_budget)")
    # Hyperparameters are checked here, where the config is built (a NaN alpha from a flag would otherwise reach
    # the jitted forward as a traced value that nothing can reject).
    if s1 is not None:
      merge = prune.METHODS[self.method].merge is not None
      hp = params_lib.of(self.method, s1.params, cls=self.spec.params, name="stage1_hparams", merge=merge,
                         split=s1.layout is Layout.VISIONZIP_CLS)
      object.__setattr__(self, "stage1", dataclasses.replace(s1, params=hp))
      if prune.needs_relevance(self.method, **dict(hp.items())) and s1.relevance == "none":
        raise ValueError(f"{self.method} needs a relevance vector; stage1_relevance is 'none'")
      self._check_layout()
    if s2 is not None:
      object.__setattr__(self, "stage2", dataclasses.replace(
          s2, params=params_lib.of(self.method2, s2.params, cls=self.spec2.params, name="stage2_hparams")))
      self._check_stage2()

  def __repr__(self):
    """The flat spelling, field for field as the flat config wrote it: the runner's row keys hash this repr
    (`experiments.evaluate.run_hash`), so results written before the typed config still resume."""
    flat = ", ".join(f"{name}={getattr(self, 'steps' if name == 'stage2' else name)!r}" for name in _FLAT_DEFAULTS)
    return f"PruningConfig(method={self.method!r}, {flat})"

  @classmethod
  def full(cls) -> "PruningConfig":
    """The unpruned model: no Stage I, no Stage II."""
    return cls(method="tops")

  @property
  def is_full(self) -> bool:
    return self.stage1 is None and self.stage2 is None

  @classmethod
  def flat(cls, method: str, **fields) -> "PruningConfig":
    """The config from the flat keyword spelling (`stage1_budget`, `stage1_scope`, `stage1_grid`, `visionzip_cls`,
    `stage1_relevance`, `stage1_features`, `stage1_crops`, `stage1_hparams`, `newlines`; `stage2` as (layer, keep)
    steps, `stage2_method`, `stage2_relevance`, `stage2_hparams`, `stage2_raters`, `stage2_timing`, `stage2_ratios`,
    `positions`): the vocabulary of the runner's overrides. Fields of an absent stage must keep their defaults' type
    and are not stored."""
    unknown = sorted(set(fields) - set(_FLAT_DEFAULTS))
    if unknown:
      raise TypeError(f"PruningConfig.flat: unknown field(s) {', '.join(unknown)}")
    f = dict(_FLAT_DEFAULTS, **fields)
    for name, allowed in _FLAT_CHOICES:     # checked whether or not their stage is present
      check_choice(name, f[name], allowed)
    _check_method("stage2_method", f["stage2_method"])
    if f["stage2_raters"] != "attention" and f["stage2_relevance"] != "raters":
      raise ValueError(f"stage2_raters={f['stage2_raters']!r} chooses text raters; stage2_relevance is "
                       f"{f['stage2_relevance']!r}")
    stage1 = None
    if f["stage1_budget"] is not None:
      stage1 = Stage1(budget=f["stage1_budget"], relevance=f["stage1_relevance"], features=f["stage1_features"],
                      newlines=f["newlines"], crops=f["stage1_crops"], params=f["stage1_hparams"],
                      layout=Layout.of(f["stage1_scope"], f["stage1_grid"], f["visionzip_cls"]))
    try:
      steps = tuple(f["stage2"])
    except TypeError:
      raise ValueError(f"stage2 must be a sequence of (layer, keep) pairs, got {f['stage2']!r}") from None
    stage2 = None
    if steps:
      stage2 = Stage2(steps=steps, method=f["stage2_method"], relevance=f["stage2_relevance"],
                      params=f["stage2_hparams"], raters=f["stage2_raters"], timing=f["stage2_timing"],
                      ratios=f["stage2_ratios"], positions=f["positions"])
    elif f["stage2_ratios"] is not None and len(tuple(f["stage2_ratios"])):
      raise ValueError(f"stage2_ratios holds {len(tuple(f['stage2_ratios']))} ratios for 0 stage2 steps")
    return cls(method=method, stage1=stage1, stage2=stage2)

  # The flat view (the runner's and the overrides' vocabulary): each stage's fields, its defaults when absent.
  stage1_budget = property(lambda self: self.stage1.budget if self.stage1 else None)
  stage1_scope = property(lambda self: self.stage1.layout.scope if self.stage1 else "global")
  stage1_grid = property(lambda self: self.stage1.layout.grid if self.stage1 else "unpadded")
  visionzip_cls = property(lambda self: bool(self.stage1) and self.stage1.layout is Layout.VISIONZIP_CLS)
  stage1_relevance = property(lambda self: self.stage1.relevance if self.stage1 else "cls")
  stage1_features = property(lambda self: self.stage1.features if self.stage1 else "projector")
  stage1_crops = property(lambda self: self.stage1.crops if self.stage1 else None)
  stage1_hparams = property(lambda self: self.stage1.params.items() if self.stage1 else ())
  newlines = property(lambda self: self.stage1.newlines if self.stage1 else "drop")
  steps = property(lambda self: self.stage2.steps if self.stage2 else ())
  stage2_method = property(lambda self: self.stage2.method if self.stage2 else None)
  stage2_relevance = property(lambda self: self.stage2.relevance if self.stage2 else "raters")
  stage2_hparams = property(lambda self: self.stage2.params.items() if self.stage2 else ())
  stage2_raters = property(lambda self: self.stage2.raters if self.stage2 else "attention")
  stage2_timing = property(lambda self: self.stage2.timing if self.stage2 else "before")
  stage2_ratios = property(lambda self: self.stage2.ratios if self.stage2 else None)
  positions = property(lambda self: self.stage2.positions if self.stage2 else "contiguous")

  def _check_stage2(self):
    m2, spec2 = self.method2, self.spec2
    spec2.check_stage2(self)
    if self.stage2_ratios is not None and not spec2.variable_count:
      raise ValueError(f"stage2_ratios give each row its own count, kept from the front of the method's order: "
                       f"they need a method whose order does not depend on the budget "
                       f"({', '.join(VARIABLE_COUNT_METHODS)}); {m2} is not one")
    previous = None if self.newlines == "keep" else self.stage1_budget    # kept newlines add to the candidates
    for i, (_, keep) in enumerate(self.steps):
      if previous is not None and keep > previous and not spec2.stage2_only:
        raise ValueError(f"stage2 step {i} keeps {keep} tokens, more than the {previous} it receives "
                         "(budgets must not increase)")
      previous = keep
    if not spec2.stage2_only:
      if prune.METHODS[m2].merge is not None:
        raise ValueError(f"{m2} merges tokens; merging methods run in Stage I only")
      if prune.needs_relevance(m2, **dict(self.stage2_hparams)) and self.stage2_relevance == "none":
        raise ValueError(f"{m2} needs a relevance vector; stage2_relevance is 'none'")

  def _check_layout(self):
    scope, grid, merge = self.stage1_scope, self.stage1_grid, prune.METHODS[self.method].merge is not None
    if scope in ("per_crop", "ratio", "crop_divided") and not self.spec.budget_free:
      raise ValueError(f"stage1_scope={scope!r} gives data-dependent budgets and needs a method whose greedy order "
                       f"does not depend on the budget ({', '.join(PER_CROP_METHODS)}); {self.method} is not one")
    if grid == "padded" and self.newlines != "drop":
      raise ValueError(f"stage1_grid='padded' hands the crops' tokens to the LLM without unpadding, so there are no "
                       f"newlines to keep: newlines must be 'drop', got {self.newlines!r}")
    if self.newlines == "candidates" and (grid != "unpadded" or scope not in ("global", "ratio")):
      raise ValueError("newlines='candidates' makes the newline slots candidates of one selection over the packed "
                       "tokens: it needs stage1_grid='unpadded' and stage1_scope 'global' or 'ratio'")
    own = {m: name for name, spec in methods.METHODS.items() for m in spec.own_layouts}
    if self.stage1.layout in own and self.stage1.layout not in self.spec.own_layouts:
      raise ValueError(f"{self.stage1.layout.name} is {own[self.stage1.layout]}'s own layout (visionzip_cls applies "
                       f"to method={own[self.stage1.layout]!r}), got method={self.method!r}")
    if merge and scope != "global" and not self.visionzip_cls:
      raise ValueError(f"{self.method} merges tokens; merging methods select globally (stage1_scope='global') or, "
                       "for VisionZip, with its official per-crop layout (visionzip_cls=True)")
    if self.stage1_relevance == "clip_text" and not self.spec.clip_text:
      raise ValueError(f"stage1_relevance='clip_text' is CDPruner's relevance; method is {self.method!r}")

  @property
  def method2(self) -> str:
    return self.stage2_method or self.method

  @property
  def spec(self) -> methods.Method:
    """The method's protocol, traits and hooks (`models.pruning.methods`)."""
    return methods.get(self.method)

  @property
  def spec2(self) -> methods.Method:
    return methods.get(self.method2)

  @property
  def stage2_counts_vary(self) -> bool:
    """Whether the Stage II keeps are static bounds of per-row counts (`stage2_ratios`, SparseVLM) rather than the
    counts every row keeps."""
    return self.stage2_ratios is not None or self.spec2.stage2_only

  def traced_hparams(self) -> dict[str, dict[str, float]]:
    """The float hyperparameters of each stage: {"stage1": {...}, "stage2": {...}}, the traced inputs."""
    return {"stage1": self.stage1.params.traced() if self.stage1 else {},
            "stage2": self.stage2.params.traced() if self.stage2 else {}}

  def static(self) -> "StaticConfig":
    return StaticConfig(self)

  def segments(self, num_layers: int) -> tuple[tuple[int, int], ...]:
    """The G layer segments [start, stop) between the Stage II pruning points (`prune_layer`)."""
    bounds = (0,) + tuple(self.prune_layer(layer) for layer, _ in self.steps) + (num_layers,)
    return tuple(zip(bounds[:-1], bounds[1:]))

  def prune_layer(self, layer: int) -> int:
    """The first decoder layer that runs on the sequence pruned by the Stage II step at `layer`."""
    return layer + 1 if self.stage2_timing == "after" else layer

  def score_layer(self, layer: int) -> int:
    """The decoder layer whose attention (or keys) scores the Stage II step at `layer`: "after", layer itself;
    "before", layer - 1 for FastV and DART (their official codes read the layer before the pruned one), else layer
    (its own attention rows over its input, as PyramidDrop's and SparseVLM's)."""
    if self.stage2_timing == "before" and self.spec2.scores_previous_layer:
      return layer - 1
    return layer

  def check_model(self, model):
    """Raises ValueError when the schedule does not fit `model` (a LLaVA or LLaVA-NeXT port)."""
    text = model.config.text
    num_layers = text.num_hidden_layers
    for layer, _ in self.steps:
      if self.prune_layer(layer) >= num_layers:
        low, high = (0, num_layers - 1) if self.stage2_timing == "after" else (1, num_layers)
        raise ValueError(f"stage2 layer {layer} is out of range for a decoder with {num_layers} layers "
                         f"(stage2_timing={self.stage2_timing!r}: pruning layers lie in [{low}, {high}))")
    # Bounds that hold for every image (each batch's own counts are checked when it is prepared).
    most = model.config.max_image_tokens
    if self.stage1_budget is not None and self.stage1_budget > most:
      raise ValueError(f"stage1_budget={self.stage1_budget} exceeds the {most} visual tokens per image")
    if self.stage2 and not self.stage1_budget and self.steps[0][1] > most and not self.stage2_counts_vary:
      raise ValueError(f"stage2 keeps {self.steps[0][1]} tokens, more than the {most} visual tokens per image")
    self.spec.check_model(self, model)
    if self.stage2 and getattr(model, "KEEPS_POSITIONS", False) and self.positions != "original":
      raise ValueError(f"positions={self.positions!r}: this model's M-RoPE ids carry the image geometry (t, h, w) and "
                       "cannot be re-indexed contiguously; use positions='original'")
    if self.stage2 and self.stage2_relevance != "none" and text.sliding_window is not None:
      raise ValueError("Stage II attention relevance ignores sliding windows; this model has sliding_window="
                       f"{text.sliding_window}")


@dataclasses.dataclass(frozen=True, eq=False)
class StaticConfig:
  """A `PruningConfig` as a jit static argument: equal (and hashed) by everything but its float hyperparameters.

  Code under jit reads the structure from `config` and the hyperparameters from `hparams(stage, traced)`, never the
  float values of `config` (they belong to whichever config compiled the program first).
  """
  config: PruningConfig

  def _key(self):
    def stage(s):
      return None if s is None else tuple((f.name, s.params.static_key() if f.name == "params" else getattr(s, f.name))
                                          for f in dataclasses.fields(s))
    c = self.config
    return (c.method, stage(c.stage1), stage(c.stage2))

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, StaticConfig) and self._key() == other._key()

  def hparams(self, stage: str, traced: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The keyword arguments of `stage` ("stage1" | "stage2"): the static ones plus the traced values."""
    s = self.config.stage1 if stage == "stage1" else self.config.stage2
    return {**({} if s is None else s.params.static()), **traced[stage]}


FULL = PruningConfig.full()
