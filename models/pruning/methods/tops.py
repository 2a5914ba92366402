"""TOPS (Token Optimal Preservation Sets): the paper's schedules and (alpha, lambda) tables, its only hooks.

Source: arXiv 2606.27161, Algorithms 1-2 and the schedule / hyperparameter tables (METHODS.md section 1).
- LLaVA-1.5 / LLaVA-NeXT (Table 9): Stage I N -> 2 target with CLS relevance and (alpha, lambda) = (0.5, 0.5);
  Stage II at round(12/32 L) -> target and round(24/32 L) -> target // 4 with text-rater relevance, contiguous
  positions and the per-backbone values of `STAGE2`.
- Qwen2.5-VL (Table 10, the same table as InternVL3-8B's; BACKBONES.md 1.2): `QWEN_SCHEDULE`, Stage I -> 2 target,
  Stage II at layers 12 and 16 of the 28-layer decoder to the table's budgets (T = 256: 512 -> 281 -> 77; 128: 256 ->
  139 -> 39; 64: 128 -> 71 -> 19), Stage II (alpha, lambda) = (0.5, 0.4) (Table 8, Qwen2.5-VL), Stage I (0.5, 0.5).
  Table 10 lists the rows by their Stage I budgets (512 / 256 / 128), Table 2 by "Retain 256 / 128": the row of a
  target T is the one whose Stage I keeps 2T, Table 9's LLaVA rule (Stage I = 2 target), which the layer-averaged
  counts also fit. The layers are counted from 0 and prune "before", as the LLaVA schedules here: layers 0-11 run on
  the Stage I tokens, layer 12 is the first to run on 281 (the LLaVA rows' "L12" is the same `Stage2` step, layer
  index 12 of 32). Stage I relevance: the attention each merged token receives in the tower's last full-attention
  block (`relevance="received"`; the tower has no CLS token, the paper names no substitute, this is the peers'
  choice); `relevance="none"` runs Stage I without a relevance term (criteria diversity + coverage, seeded by the
  best score of those two). Positions: "original" (each kept token keeps its own M-RoPE ids: Alg. 2's contiguous
  re-index is a 1-D RoPE rule). Other targets or depths: `NoProtocol`, unless `stage2_keeps` / `layers` say them.
"""

import dataclasses

from models.pruning.methods import base
from models.pruning.modes import Layout, Stage1, Stage2
from tops_jax import tops as tops_lib

__all__ = ["METHOD", "STAGE2", "QWEN_SCHEDULE", "QWEN_LAYERS", "QWEN_STAGE2", "layers", "schedule", "qwen_schedule",
           "protocol"]

# TOPS Stage II (alpha, lambda) from the paper (its hyperparameter table: LLaVA-1.5-7B / 13B, LLaVA-NeXT-7B / 13B), by
# (backbone, decoder layers) and then target.
STAGE2 = {
    ("llava", 32): {128: (0.5, 0.5), 64: (0.5, 1.0), 32: (0.5, 1.0)},
    ("llava", 40): {128: (0.5, 0.4), 64: (0.5, 0.4), 32: (0.5, 0.4)},
    ("llava_next", 32): {640: (0.5, 0.5), 320: (0.5, 0.4), 160: (0.5, 0.5)},
    ("llava_next", 40): {640: (0.5, 0.5), 320: (0.5, 0.5), 160: (0.5, 0.5)},
}

# Qwen2.5-VL-7B (28 decoder layers), Table 10, keyed by the target T ("Retain T"): (Stage I, after layer-12 step,
# after layer-16 step). The Stage II budgets are the table's, not T and T / 4.
QWEN_SCHEDULE = {256: (512, 281, 77), 128: (256, 139, 39), 64: (128, 71, 19)}
QWEN_LAYERS, QWEN_DEPTH = (12, 16), 28
# Table 8: Qwen2.5-VL's Stage II pair, given at 80.2% and 90.1% pruned (T = 256, 128); the paper lists no other Qwen
# value, so T = 64 (Table 10's third row, not in Table 2) takes the same pair.
QWEN_STAGE2 = (0.5, 0.4)
# The Stage I relevance of each family's TOPS protocol and what the `relevance` override may name.
_RELEVANCE = ("cls", "received", "none")


def layers_of(num_layers: int) -> tuple[int, int]:
  """TOPS' two Stage II layers for an L-layer decoder: round(12/32 L) and round(24/32 L) (the paper's 12 and 24 of
  32). Raises ValueError when they are not distinct layers inside (0, L)."""
  l1, l2 = round(num_layers * 12 / 32), round(num_layers * 24 / 32)
  if not 1 <= l1 < l2 < num_layers:
    raise ValueError(f"a decoder of {num_layers} layers is too shallow for the TOPS schedule (layers {l1}, {l2})")
  return l1, l2


def schedule(num_layers: int, target: int, *, family: str = "llava", stage1_alpha: float = 0.5,
                  stage1_lam: float = 0.5, stage2_alpha: float | None = None, stage2_lam: float | None = None,
                  stage1_scope: str = "global", newlines: str = "drop", raters: str = "attention",
                  timing: str = "before", layers: tuple[int, ...] | None = None,
                  stage2_keeps: tuple[int, ...] | None = None, relevance: str = "cls") -> tuple[Stage1, Stage2]:
  """The TOPS schedule for `target`: Stage I N -> 2 target, layer round(12/32 L): -> target, layer round(24/32 L):
  -> target // 4.

  Stage I uses (alpha, lambda) = (0.5, 0.5) and CLS relevance; Stage II the paper's per-model values (LLaVA-1.5-7B:
  (0.5, 0.5) at target 128, (0.5, 1.0) at 64 and 32; 13B (0.5, 0.4); NeXT-7B (0.5, 0.5) / (0.5, 0.4) / (0.5, 0.5) at
  640 / 320 / 160; NeXT-13B (0.5, 0.5)) with text-rater relevance and contiguous positions. Other models and
  targets need `stage2_alpha` and `stage2_lam`. `raters` and `timing` (the `stage2_raters` / `stage2_timing`
  fields) default to the paper's reading (`models.pruning.stage2` argues it); "sparsevlm" / "after" are the
  SparseVLM code's, for ablations. `layers` / `stage2_keeps` replace the Stage II layers / keeps (our variants);
  `relevance` the Stage I signal ("none": no relevance term, `_stage1_relevance`).
  """
  if not isinstance(target, int) or target < 4:
    raise ValueError(f"target must be an int >= 4 (the last Stage II step keeps target // 4), got {target!r}")
  steps = _steps(layers_of(num_layers) if layers is None else layers,
                 (target, target // 4) if stage2_keeps is None else stage2_keeps)
  paper = STAGE2.get((base.family(family), num_layers), {}).get(target)
  if stage2_alpha is None or stage2_lam is None:
    if paper is None:
      raise ValueError(f"no paper Stage II setting for family={family!r}, {num_layers} layers, target={target}; "
                       "pass stage2_alpha and stage2_lam")
    stage2_alpha = paper[0] if stage2_alpha is None else stage2_alpha
    stage2_lam = paper[1] if stage2_lam is None else stage2_lam
  stage1 = Stage1(budget=2 * target, layout=Layout.of(stage1_scope, "unpadded"), newlines=newlines,
                  **_stage1_relevance(relevance, {"alpha": float(stage1_alpha), "lam": float(stage1_lam)}))
  stage2 = Stage2(steps=steps, relevance="raters", raters=raters, timing=timing,
                  params={"alpha": float(stage2_alpha), "lam": float(stage2_lam)}, positions="contiguous")
  return stage1, stage2


def qwen_schedule(num_layers: int, target: int, *, stage1_alpha: float = 0.5, stage1_lam: float = 0.5,
                  stage2_alpha: float = QWEN_STAGE2[0], stage2_lam: float = QWEN_STAGE2[1],
                  raters: str = "attention", timing: str = "before", layers: tuple[int, ...] | None = None,
                  stage2_keeps: tuple[int, ...] | None = None, relevance: str = "received") -> tuple[Stage1, Stage2]:
  """Table 10's schedule for Qwen2.5-VL at `target` (the module docstring): Stage I -> 2 target (received relevance,
  (0.5, 0.5)), layers 12 and 16 of 28 -> `QWEN_SCHEDULE`'s budgets ((0.5, 0.4), text raters), original positions.

  Raises `NoProtocol` for a target the table does not list (unless `stage2_keeps`) or a decoder that is not 28
  layers deep (unless `layers`): the paper gives no rule that scales the table.
  """
  if isinstance(target, bool) or not isinstance(target, int) or target < 1:
    raise ValueError(f"target must be a positive int, got {target!r}")
  if stage2_keeps is None and target not in QWEN_SCHEDULE:
    raise base.NoProtocol(f"tops on qwen2_5_vl: Table 10 lists targets {sorted(QWEN_SCHEDULE)}, not {target} "
                          "(its Stage II budgets are not T and T / 4; pass stage2_keeps= for a variant)")
  if layers is None and num_layers != QWEN_DEPTH:
    raise base.NoProtocol(f"tops on qwen2_5_vl: Table 10's layers {QWEN_LAYERS} are the {QWEN_DEPTH}-layer "
                          f"Qwen2.5-VL-7B decoder's; this decoder has {num_layers} layers and the paper gives no rule "
                          "to scale them (pass layers= for a variant)")
  steps = _steps(QWEN_LAYERS if layers is None else layers,
                 QWEN_SCHEDULE[target][1:] if stage2_keeps is None else stage2_keeps)
  stage1 = Stage1(budget=2 * target, **_stage1_relevance(relevance, {"alpha": float(stage1_alpha),
                                                                    "lam": float(stage1_lam)}))
  stage2 = Stage2(steps=steps, relevance="raters", raters=raters, timing=timing, positions="original",
                  params={"alpha": float(stage2_alpha), "lam": float(stage2_lam)})
  return stage1, stage2


def _steps(layers_: tuple[int, ...], keeps: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  layers_, keeps = tuple(layers_), tuple(keeps)
  if len(layers_) != len(keeps):
    raise ValueError(f"tops: {len(layers_)} Stage II layers {layers_} for {len(keeps)} stage2_keeps {keeps}")
  return tuple(zip(layers_, keeps))


def _stage1_relevance(relevance: str, params: dict) -> dict:
  """Stage I's relevance fields: the tower signal, or "none" with the relevance criterion dropped (the seed is then
  the best diversity + coverage score, `tops_jax.tops.order`)."""
  if relevance not in _RELEVANCE:
    raise ValueError(f"tops: override relevance must be one of {_RELEVANCE}, got {relevance!r}")
  if relevance == "none":
    params = dict(params, criteria=("diversity", "coverage"))
  return {"relevance": relevance, "params": params}


def protocol(target: int, family: str, num_layers: int, o: dict) -> tuple[Stage1, Stage2]:
  """The paper's schedule on `family` (Qwen2.5-VL: Table 10, `qwen_schedule`; "testbed": LLaVA-NeXT's table, else the
  paper's default pair (0.5, 0.5)), with the named overrides."""
  extra = {k: o[k] for k in ("raters", "timing", "layers", "stage2_keeps") if k in o}
  alpha, lam = o.get("stage1_alpha"), o.get("stage1_lam")
  stage1 = dict(stage1_alpha=0.5 if alpha is None else alpha, stage1_lam=0.5 if lam is None else lam,
                relevance=o.get("relevance", base.saliency(family)))
  if stage1["relevance"] == "cls" and family in base.NO_CLS:
    raise ValueError(f"tops: override relevance='cls' names a CLS token; {family}'s tower has none (use 'received' "
                     "or 'none')")
  stage2 = {k: v for k in ("stage2_alpha", "stage2_lam") if (v := o.get(k)) is not None}
  if family in base.NO_CLS:
    s1, s2 = qwen_schedule(num_layers, target, **stage1, **stage2, **extra)
  else:
    if family == "testbed":   # no paper setting for the testbed: the paper's default pair
      stage2 = {"stage2_alpha": 0.5, "stage2_lam": 0.5, **stage2}
    s1, s2 = schedule(num_layers, target, family="llava_next" if family == "testbed" else family, **stage1, **stage2,
                      **extra)
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
    if s1.relevance == "none" and "relevance" in hp["criteria"]:
      raise ValueError(f"tops: override criteria={hp['criteria']} keeps the relevance criterion, but override "
                       "relevance='none' gives Stage I no relevance")
  hp1 = dict(s1.params, **hp, **o.get("hparams", {}))
  hp2 = dict(s2.params, **hp, **o.get("stage2_hparams", {}))
  return dataclasses.replace(s1, params=hp1, **fields), dataclasses.replace(s2, params=hp2)


layers = layers_of   # the public name (`models.pruning.tops_layers`)

METHOD = base.Method(protocol=protocol, budget_free=True, variable_count=True,
                     overrides=("stage1_alpha", "stage1_lam", "stage2_alpha", "stage2_lam", "normalize", "criteria",
                                "scope", "newlines", "hparams", "stage2_hparams", "raters", "timing", "relevance",
                                "layers", "stage2_keeps"))
