"""SparseVLM: its official schedules (moved here from `tops_jax.sparsevlm`, which keeps the step math), its protocol
and its Stage II hooks (the step bounds and its own step: rank-based counts, recycled clusters as inserted rows).

Sources: Gumpest/SparseVLMs v1 @b72c5d6 (code of 91fb6d9) `modelling_sparse_llama.py`, `score.py`, `utils.py`,
README.md and scripts/v1_5/eval/*.sh; v1.5 @535f8ba score.py; main @26a5f48 for the 96-token v1.5 setting
(`tops_jax.sparsevlm`'s docstring reads them). LLaVA-1.5 only: no branch has a LLaVA-NeXT path.
"""

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

from models.pruning import sequence
from models.pruning.methods import base
from models.pruning.modes import Stage2
from models.pruning.outputs import Bound, Choice
from models.pruning.params import Params
from tops_jax import sparsevlm as sparsevlm_lib

__all__ = ["METHOD", "SCHEDULES", "schedule", "stage2", "protocol", "SparseVLMParams", "step_bounds", "choose"]

_V1_SOURCE = ("Gumpest/SparseVLMs@b72c5d6 (v1, code of 91fb6d9): modelling_sparse_llama.py pruning_loc=[2, 6, 15, 19]; "
              "README.md and scripts/v1_5/eval/{mme,pope,textvqa}.sh --scale/--bias")
_V15_SOURCE = ("Gumpest/SparseVLMs@535f8ba (v1.5): modelling_sparse_llama.py pruning_loc=[2, 6, 15]; "
               "llava/model/language_model/score.py layer_dict, sparse_token_dict")
_V15_96_SOURCE = ("Gumpest/SparseVLMs@26a5f48 (main, USE_VERSION=1_0): llava/model/language_model/score.py "
                  "sparse_token_list_96")


def _v1(budget, scale, bias):
  steps = tuple(sparsevlm_lib.Step(layer, scale=scale, bias=bias) for layer in (2, 6, 15, 19))
  return sparsevlm_lib.Schedule("llava", "v1", budget, steps, _V1_SOURCE)


def _v15(budget, counts, source=_V15_SOURCE):
  steps = tuple(sparsevlm_lib.Step(layer, count=c) for layer, c in zip((2, 6, 15), counts))
  return sparsevlm_lib.Schedule("llava", "v1.5", budget, steps, source)


SCHEDULES: dict[tuple[str, str, int], sparsevlm_lib.Schedule] = {
    ("v1", "llava", 192): _v1(192, 13.5, 0.0),
    ("v1", "llava", 128): _v1(128, 9.0, 6.0),
    ("v1", "llava", 64): _v1(64, 0.8, 0.0),
    ("v1.5", "llava", 192): _v15(192, (300, 200, 110)),
    ("v1.5", "llava", 128): _v15(128, (303, 110, 36)),
    ("v1.5", "llava", 96): _v15(96, (238, 48, 26), _V15_96_SOURCE),
    ("v1.5", "llava", 64): _v15(64, (66, 30, 17)),
}


def schedule(family: str, budget: int, version: str = "v1") -> sparsevlm_lib.Schedule:
  """The official layers and counts of `version` ("v1" rank based, "v1.5" fixed counts) for a published target
  (`budget`: SparseVLM's "equal token number", the kept tokens per layer on average)."""
  if version not in ("v1", "v1.5"):
    raise ValueError(f"sparsevlm schedule: version must be 'v1' or 'v1.5', got {version!r}")
  family = base.family(family)
  if family == "llava_next":
    raise ValueError("sparsevlm schedule: the official SparseVLM code has no LLaVA-NeXT schedule (image_shape is "
                     "576 by default and the anyres path fails in llava_arch.py); build Step tuples explicitly")
  if family != "llava":
    raise ValueError(f"sparsevlm schedule: family must be 'llava-1.5' (or 'llava-next', which has no official "
                     f"schedule), got {family!r}")
  found = SCHEDULES.get((version, family, budget))
  if found is None:
    known = sorted(b for v, f, b in SCHEDULES if v == version and f == family)
    raise ValueError(f"sparsevlm schedule: budget={budget!r} has no official {version} setting; published: {known}")
  return found


@dataclasses.dataclass(frozen=True)
class SparseVLMParams(Params):
  """The official setting the steps follow (`budget`: its target, as `schedule` names it)."""
  version: Literal["v1", "v1.5"] = "v1"
  budget: int = 192

  def __post_init__(self):
    if self.version not in ("v1", "v1.5"):
      raise ValueError(f"sparsevlm: version must be 'v1' or 'v1.5', got {self.version!r}")

  def items(self):
    return (("budget", self.budget), ("version", self.version))

  def official(self) -> sparsevlm_lib.Schedule:
    return schedule("llava", self.budget, self.version)


def stage2(num_layers: int, target: int = 192, *, version: str = "v1",
           num_visual: int = 576) -> Stage2:
  """SparseVLM (method "sparsevlm") as its official code runs on LLaVA-1.5 (`schedule`):
  v1 prunes after layers 2, 6, 15, 19 with (scale, bias) = (13.5, 0) / (9, 6) / (0.8, 0) for the 192 / 128 / 64
  settings, v1.5 after layers 2, 6, 15 with fixed counts; raters chosen once from the input embeddings, timing
  "after", contiguous positions, recycled tokens inserted after the kept ones. `target` names the official setting
  (its mean visual tokens per layer). The keeps are static bounds on the kept counts over every prompt (v1: rank
  <= min(A, N) with A = N text tokens), for images of at most `num_visual` tokens; the driver tightens them per
  batch.
  """
  plan = schedule("llava", target, version)
  layers = tuple(step.layer for step in plan.steps)
  if layers[-1] + 1 >= num_layers:
    raise ValueError(f"a decoder of {num_layers} layers is too shallow for SparseVLM's layers {layers}")
  bounds = sparsevlm_lib.sizes(plan, num_visual, num_visual)
  return Stage2(steps=tuple((layer, max(b.keep, 1)) for layer, b in zip(layers, bounds)), relevance="raters",
                raters="sparsevlm", timing="after", params={"version": version, "budget": int(target)},
                positions="contiguous")


def protocol(target: int, family: str, num_layers: int, o: dict) -> tuple[None, Stage2]:
  try:
    return None, stage2(num_layers, target, version=o.get("version", "v1"), num_visual=o.get("num_visual", 576))
  except ValueError as e:
    raise base.NoProtocol(f"sparsevlm at target={target} on {num_layers} layers: {e}") from None


def check(config):
  """The steps follow an official setting, run as its official code."""
  steps = config.stage2.params.official().steps
  if len(config.steps) > len(steps):
    raise ValueError(f"sparsevlm: {len(config.steps)} stage2 steps, the official setting has {len(steps)}")
  wanted = dict(stage2_relevance="raters", stage2_raters="sparsevlm", stage2_timing="after",
                positions="contiguous", stage2_ratios=None)
  wrong = {k: getattr(config, k) for k, v in wanted.items() if getattr(config, k) != v}
  if wrong:
    raise ValueError(f"sparsevlm runs as its official code: {wanted}; got {wrong}")


def step_bounds(config, num_candidates: int, text_len: int) -> tuple[Bound, ...]:
  """The static sizes of every step (`models.pruning.stage2.step_bounds`): `sparsevlm.step_sizes` over every N <= the
  candidates and every rank <= min(text_len, N), capped by the config's keep; its `recycle` then allots
  C = int(M / 10) + 1 rows with M = min(int(0.3 * max_deleted) + 1, N)."""
  steps = config.stage2.params.official().steps
  out, n = [], num_candidates
  for (_, keep), step in zip(config.steps, steps):
    size = sparsevlm_lib.step_sizes(step, n, text_len)
    recycled = min((3 * size.deleted) // 10 + 1, n)
    out.append(Bound(keep=max(min(keep, size.keep), 1), extra=recycled // 10 + 1, max_deleted=size.deleted))
    n = out[-1].keep + out[-1].extra
  return tuple(out)


def choose(model, config, seq, bound: Bound, scores, key, hp: dict[str, Any], step: int) -> Choice:
  """The official step `step` (`tops_jax.sparsevlm.prune_step`: rank based or fixed count, top-k of the raters' mean
  attention, recycled clusters as inserted rows)."""
  del model
  feats = sequence.take(seq.hidden, scores.visual)
  official = schedule("llava", hp.get("budget", 192), hp.get("version", "v1")).steps[step]
  out = sparsevlm_lib.prune_step(scores.block, scores.raters, feats, scores.visual_valid, max_keep=bound.keep,
                                 count=official.count, scale=official.scale, bias=official.bias,
                                 max_deleted=bound.max_deleted, key=key)
  c = scores.visual.shape[1]
  return Choice(order=jnp.minimum(out.kept, c - 1), count=out.num_kept, extra=out.recycled.tokens,
                extra_valid=out.recycled.valid)


METHOD = base.Method(protocol=protocol, overrides=("version", "num_visual"),
                     unsupported=("llava_next", "testbed", "qwen2_5_vl"),
                     unsupported_reason={"qwen2_5_vl": "its official code (v1, v1.5) prunes LLaVA's "
                                                       "32-layer LLaMA at fixed layers (2, 6, 15, 19 / 2, 6, 15) and "
                                                       "neither paper nor code gives a rule for a 28-layer Qwen2 "
                                                       "decoder"},
                     params=SparseVLMParams, stage2_only=True, reads_block=True, check_stage2=check,
                     stage2_bounds=step_bounds, stage2_choose=choose)
