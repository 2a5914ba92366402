"""TOPS (Token Optimal Preservation Sets): the paper's schedule and (alpha, lambda) table, its only hooks.

Source: arXiv 2606.27161, Algorithms 1-2 and the schedule / hyperparameter tables (METHODS.md section 1). Stage I
N -> 2 target with CLS relevance and (alpha, lambda) = (0.5, 0.5); Stage II at round(12/32 L) -> target and
round(24/32 L) -> target // 4 with text-rater relevance, contiguous positions and the per-backbone values of `STAGE2`.
"""

import dataclasses

from models.pruning.methods import base
from models.pruning.modes import Layout, Stage1, Stage2
from tops_jax import tops as tops_lib

__all__ = ["METHOD", "STAGE2", "layers", "schedule", "protocol"]

# TOPS Stage II (alpha, lambda) from the paper (its hyperparameter table: LLaVA-1.5-7B / 13B, LLaVA-NeXT-7B / 13B), by
# (backbone, decoder layers) and then target.
STAGE2 = {
    ("llava", 32): {128: (0.5, 0.5), 64: (0.5, 1.0), 32: (0.5, 1.0)},
    ("llava", 40): {128: (0.5, 0.4), 64: (0.5, 0.4), 32: (0.5, 0.4)},
    ("llava_next", 32): {640: (0.5, 0.5), 320: (0.5, 0.4), 160: (0.5, 0.5)},
    ("llava_next", 40): {640: (0.5, 0.5), 320: (0.5, 0.5), 160: (0.5, 0.5)},
}


def layers(num_layers: int) -> tuple[int, int]:
  """TOPS' two Stage II layers for an L-layer decoder: round(12/32 L) and round(24/32 L) (the paper's 12 and 24 of
  32). Raises ValueError when they are not distinct layers inside (0, L)."""
  l1, l2 = round(num_layers * 12 / 32), round(num_layers * 24 / 32)
  if not 1 <= l1 < l2 < num_layers:
    raise ValueError(f"a decoder of {num_layers} layers is too shallow for the TOPS schedule (layers {l1}, {l2})")
  return l1, l2


def schedule(num_layers: int, target: int, *, family: str = "llava", stage1_alpha: float = 0.5,
                  stage1_lam: float = 0.5, stage2_alpha: float | None = None, stage2_lam: float | None = None,
                  stage1_scope: str = "global", newlines: str = "drop", raters: str = "attention",
                  timing: str = "before") -> tuple[Stage1, Stage2]:
  """The TOPS schedule for `target`: Stage I N -> 2 target, layer round(12/32 L): -> target, layer round(24/32 L):
  -> target // 4.

  Stage I uses (alpha, lambda) = (0.5, 0.5) and CLS relevance; Stage II the paper's per-model values (LLaVA-1.5-7B:
  (0.5, 0.5) at target 128, (0.5, 1.0) at 64 and 32; 13B (0.5, 0.4); NeXT-7B (0.5, 0.5) / (0.5, 0.4) / (0.5, 0.5) at
  640 / 320 / 160; NeXT-13B (0.5, 0.5)) with text-rater relevance and contiguous positions. Other models and
  targets need `stage2_alpha` and `stage2_lam`. `raters` and `timing` (the `stage2_raters` / `stage2_timing`
  fields) default to the paper's reading (`models.pruning.stage2` argues it); "sparsevlm" / "after" are the
  SparseVLM code's, for ablations.
  """
  if not isinstance(target, int) or target < 4:
    raise ValueError(f"target must be an int >= 4 (the last Stage II step keeps target // 4), got {target!r}")
  l1, l2 = layers(num_layers)
  paper = STAGE2.get((base.family(family), num_layers), {}).get(target)
  if stage2_alpha is None or stage2_lam is None:
    if paper is None:
      raise ValueError(f"no paper Stage II setting for family={family!r}, {num_layers} layers, target={target}; "
                       "pass stage2_alpha and stage2_lam")
    stage2_alpha = paper[0] if stage2_alpha is None else stage2_alpha
    stage2_lam = paper[1] if stage2_lam is None else stage2_lam
  stage1 = Stage1(budget=2 * target, layout=Layout.of(stage1_scope, "unpadded"), relevance="cls", newlines=newlines,
                  params={"alpha": float(stage1_alpha), "lam": float(stage1_lam)})
  stage2 = Stage2(steps=((l1, target), (l2, target // 4)), relevance="raters", raters=raters, timing=timing,
                  params={"alpha": float(stage2_alpha), "lam": float(stage2_lam)}, positions="contiguous")
  return stage1, stage2


def protocol(target: int, family: str, num_layers: int, o: dict) -> tuple[Stage1, Stage2]:
  """The paper's schedule on `family` ("testbed": LLaVA-NeXT's table, else the paper's default pair (0.5, 0.5)),
  with the named overrides."""
  schedule_family = "llava_next" if family == "testbed" else family
  stage2 = dict(stage2_alpha=o.get("stage2_alpha"), stage2_lam=o.get("stage2_lam"))
  if family == "testbed":   # no paper setting for the testbed: the paper's default pair
    stage2 = {k: (0.5 if v is None else v) for k, v in stage2.items()}
  alpha, lam = o.get("stage1_alpha"), o.get("stage1_lam")
  extra = {k: o[k] for k in ("raters", "timing") if k in o}
  s1, s2 = schedule(num_layers, target, family=schedule_family, stage1_alpha=0.5 if alpha is None else alpha,
                    stage1_lam=0.5 if lam is None else lam, **stage2, **extra)
  fields = {}
  if o.get("scope", "official") != "official":
    fields["layout"] = Layout.of(o["scope"], "unpadded")
  if "newlines" in o:
    fields["newlines"] = o["newlines"]
  hp = {}
  if o.get("normalize"):
    hp["normalize"] = o["normalize"]
  if o.get("criteria"):      # checked here, not when the first batch is traced
    hp["criteria"] = tops_lib.check_criteria(o["criteria"])
  hp1 = dict(s1.params, **hp, **o.get("hparams", {}))
  hp2 = dict(s2.params, **hp, **o.get("stage2_hparams", {}))
  return dataclasses.replace(s1, params=hp1, **fields), dataclasses.replace(s2, params=hp2)


METHOD = base.Method(protocol=protocol, budget_free=True, variable_count=True,
                     overrides=("stage1_alpha", "stage1_lam", "stage2_alpha", "stage2_lam", "normalize", "criteria",
                                "scope", "newlines", "hparams", "stage2_hparams", "raters", "timing"))
