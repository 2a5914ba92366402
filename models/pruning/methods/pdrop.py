"""PyramidDrop: drop a fixed fraction of each image's tokens at the end of each stage, by the last instruction token's
attention; its published layers and lambda, the lambda solved for a target, and its protocol.

Source: Cooperx521/PyramidDrop @6444f30 `modeling_llama_pdrop.py` (`pdrop_rank_drop`), scripts/v1_5 and v1_6
pdrop_eval/*.sh; the author's answer on small budgets in issue #29.
Qwen2.5-VL: `NoProtocol` (the layers are absolute LLaMA-32 layers with no depth rule); `layers=` runs a variant, the
target then read against Qwen's nominal 1,296 tokens, with original positions (M-RoPE ids are never renumbered).
"""

import dataclasses

from models.pruning.methods import base as base_lib
from models.pruning.modes import Stage2

__all__ = ["METHOD", "LAYERS", "LAMBDA", "published_budget", "schedule", "protocol"]

# PyramidDrop's published inference setting (Cooperx521/PyramidDrop scripts/v1_5/pdrop_eval/*.sh and
# scripts/v1_6/pdrop_eval/*.sh, LLaVA-1.5 and LLaVA-NeXT, 7B and 13B alike): --layer_list '[8,16,24]'
# --image_token_ratio_list "[0.5,0.25,0.125]", i.e. lambda = 0.5 per stage, absolute layers (not scaled to depth).
# The scripts name no token budget; by the measure a target names (`_average`) it keeps (8 + 4 + 2 + 1) / 32 = 15/32 of the
# image's tokens per layer on 32 layers: 270 of 576, 1,350 of 2,880 (`published_budget`). It is not a 192-token
# setting: a target of 192 of 576 solves to lambda 0.25 on the same layers.
LAYERS = (8, 16, 24)
LAMBDA = 0.5
# The author's advice for targets that (8, 16, 24) cannot reach (issue #29: "2, 8, 16" with lambda = 0.19 for about
# 64 of 576 tokens; any lambda > 0 on (8, 16, 24) keeps more than 8/32 of the tokens on average).
_LOW_LAYERS = (2, 8, 16)
# The token counts the TOPS tables' targets are fractions of (METHODS.md section 4: NeXT's 5 x 576; Qwen2.5-VL's
# nominal 1,296 = 36 x 36 merged tokens of a square image, the paper's Table 2).
_BASE_TOKENS = {"llava": 576, "llava_next": 2880, "qwen2_5_vl": 1296}


def _average(layers, lam: float, num_layers: int) -> float:
  """PyramidDrop's "average tokens" as a fraction of N: sum over layers of the kept fraction / L (lambda^s in
  stage s)."""
  bounds = (0,) + tuple(layers) + (num_layers,)
  return sum((b - a) * lam ** s for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))) / num_layers


def published_budget(num_layers: int, family: str = "llava", num_visual: int | None = None) -> int:
  """The target whose solved schedule is the published one: the average visual tokens per layer of lambda 0.5 on
  (8, 16, 24), rounded (32 layers: 270 of 576 (LLaVA-1.5), 1,350 of 2,880 (LLaVA-NeXT); 40 layers: 230 of 576)."""
  base = _BASE_TOKENS.get(base_lib.family(family), num_visual)
  if base is None:
    raise ValueError(f"family {family!r} has no reference token count: pass num_visual (the image's tokens)")
  if LAYERS[-1] >= num_layers:
    raise ValueError(f"a decoder of {num_layers} layers is too shallow for PyramidDrop layers {LAYERS}")
  return round(base * _average(LAYERS, LAMBDA, num_layers))


def schedule(num_layers: int, target: int | None = None, *, family: str = "llava",
                   num_visual: int | None = None, layers: tuple[int, ...] | None = None,
                   lam: float | None = None) -> Stage2:
  """PyramidDrop (method "pdrop"): at each layer l of `layers`, before layer l runs, keep int(n * lam^(s+1)) of each
  image's n tokens, ranked by the attention of the last instruction token at layer l; contiguous positions.

  target None: the published setting, layers (8, 16, 24) and lambda 0.5 (`LAYERS`, `LAMBDA`); by the average below
    it is the target `published_budget` (270 of 576 on 32 layers), which gives the same schedule.
  target: PyramidDrop's "average number of visual tokens" (the kept image tokens summed over the L layers / L, the
    measure of its Table 2, issue #22) equals target / N_family (N = 576 for "llava" (LLaVA-1.5), 2880 for
    "llava_next": the TOPS tables' targets; other families: `num_visual`). The paper's per-target settings are not
    published; the layers are (8, 16, 24) when they can reach the target and otherwise the author's (2, 8, 16) (issue
    #29), and lambda solves the continuous average equation, rounded to two decimals as the author reports it (target
    64 of 576 on 32 layers: 0.19, as in issue #29). `layers` and `lam` override.
  num_visual: the most image tokens an image brings to the LLM (static keeps int(num_visual * ratio); LLaVA-NeXT:
    `model.config.max_image_tokens`, so that every image's own int(n * ratio) fits); default N_family.
  """
  base = _BASE_TOKENS.get(base_lib.family(family), num_visual)
  num_visual = base if num_visual is None else int(num_visual)
  if num_visual is None or num_visual < 1:
    raise ValueError(f"family {family!r} has no reference token count: pass num_visual (the image's tokens)")
  if target is None:
    layers = LAYERS if layers is None else layers
    lam = LAMBDA if lam is None else lam
  elif lam is not None:
    raise ValueError("give a target (lambda is then solved) or lam, not both")
  layers = tuple(int(layer) for layer in (layers or ()))
  if target is not None:
    if isinstance(target, bool) or not isinstance(target, int) or not 0 < target < base:
      raise ValueError(f"target must be an int in (0, {base}) (average visual tokens per layer), got {target!r}")
    fraction = target / base
    if not layers:
      layers = LAYERS if _average(LAYERS, 0.0, num_layers) < fraction else _LOW_LAYERS
    if not _average(layers, 0.0, num_layers) < fraction:
      raise ValueError(f"layers {layers} keep every token up to layer {layers[0]}: their average is at least "
                       f"{base * layers[0] / num_layers:.1f} tokens, above target={target}; pass layers=")
    lo, hi = 0.0, 1.0
    for _ in range(60):
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if _average(layers, mid, num_layers) < fraction else (lo, mid)
    lam = round(lo, 2)
  if not layers or not 0.0 < lam <= 1.0:
    raise ValueError(f"need at least one layer and lambda in (0, 1], got layers={layers}, lam={lam}")
  if layers[-1] >= num_layers:
    raise ValueError(f"a decoder of {num_layers} layers is too shallow for PyramidDrop layers {layers}")
  ratios = tuple(round(lam ** (s + 1), 12) for s in range(len(layers)))   # as a hand-written list: 0.42^2 = 0.1764
  keeps = tuple(max(1, int(num_visual * r)) for r in ratios)
  return Stage2(steps=tuple(zip(layers, keeps)), relevance="last_token", ratios=ratios, positions="contiguous")


def protocol(target: int, family: str, num_layers: int, o: dict) -> tuple[None, Stage2]:
  """PyramidDrop's published layers (8, 16, 24) (or its author's (2, 8, 16) for small targets) with the lambda whose
  average kept tokens per layer is `target` (`schedule`)."""
  num_visual = o.get("num_visual")
  if family == "testbed" and "layers" not in o:
    raise base_lib.NoProtocol("pdrop prunes at decoder layers (8, 16, 24) or (2, 8, 16) of a 32-layer LLaMA; the "
                              f"testbed's {num_layers}-layer decoder has none of them (pass layers= to run a variant)")
  if family == "qwen2_5_vl" and "layers" not in o:
    raise base_lib.NoProtocol("pdrop's official code and scripts prune LLaVA's 32-layer LLaMA at the absolute layers "
                              "(8, 16, 24) (or the author's (2, 8, 16)); neither its paper nor its code gives a rule "
                              f"for the {num_layers}-layer Qwen2 decoder of Qwen2.5-VL (pass layers= to run a "
                              "variant)")
  try:
    stage2 = schedule(num_layers, target, family=family, num_visual=num_visual, layers=o.get("layers"),
                      lam=o.get("lam") if "layers" in o and target is None else None)
  except ValueError as e:
    raise base_lib.NoProtocol(f"pdrop at target={target} on {num_layers} layers: {e}") from None
  if o.get("hparams"):
    stage2 = dataclasses.replace(stage2, params=dict(stage2.params, **o["hparams"]))
  if base_lib.keeps_positions(family):    # M-RoPE ids carry the image geometry: kept, never renumbered
    stage2 = dataclasses.replace(stage2, positions="original")
  return None, stage2


METHOD = base_lib.Method(protocol=protocol, variable_count=True, overrides=("layers", "lam", "num_visual", "hparams"))
