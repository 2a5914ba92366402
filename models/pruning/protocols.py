"""How each method is run: `method_config(method, family=, target=, num_layers=, **overrides) -> PruningConfig`, and
the public schedule builders (`tops_schedule`, `pdrop_schedule`, `sparsevlm_schedule`).

Each method's protocol, its tables and its sources live in its module of `models.pruning.methods`; this module checks
the arguments, applies the family's nominal crops and builds the `PruningConfig`. The default is the method's
OFFICIAL protocol on that backbone at that target; our own variants are named overrides (unknown ones raise).

The table of every method's official protocol and the source read, the fixed 672 x 672 resolution, and the named
overrides with the reason each exists: models/pruning/PRUNING.md#protocols.
"""

from models.pruning import methods
from models.pruning.config import PruningConfig
from models.pruning.methods import pdrop as pdrop_lib
from models.pruning.methods import sparsevlm as sparsevlm_method
from models.pruning.methods import tops as tops_lib
from models.pruning.methods import base

__all__ = ["FAMILIES", "method_config", "OFFICIAL_METHODS", "overrides_of", "override_kind", "supports", "NoProtocol",
           "tops_schedule", "tops_layers", "pdrop_schedule", "PDROP_LAYERS", "PDROP_LAMBDA", "sparsevlm_schedule"]

FAMILIES, NoProtocol = base.FAMILIES, base.NoProtocol
OFFICIAL_METHODS = tuple(methods.METHODS)
tops_layers = tops_lib.layers
PDROP_LAYERS, PDROP_LAMBDA = pdrop_lib.LAYERS, pdrop_lib.LAMBDA


def supports(method: str, family: str) -> bool:
  """Whether `method` has a protocol on `family` at all (PruMerge+'s and SparseVLM's official code are LLaVA-1.5
  only); depth and target can still rule a run out (`NoProtocol`, e.g. PyramidDrop on Qwen2.5-VL's 28 layers)."""
  return base.family(family) not in methods.get(method).unsupported


def overrides_of(method: str) -> tuple[str, ...]:
  """The named overrides `method_config` accepts for `method`."""
  return methods.get(method).overrides


def override_kind(name: str) -> tuple[str, str]:
  """The kind of value the named override `name` takes ("number", "int", "bool", "str", "ints", "strs" or "dict") and
  how messages say it ("a number", ...)."""
  kind = base.OVERRIDE_KINDS[name]
  return kind, base.KINDS[kind][1]


def method_config(method: str, *, family: str, target: int, num_layers: int, crops: int | None = None,
                  **overrides) -> PruningConfig:
  """The official protocol of `method` on `family` at `target` (see models/pruning/PRUNING.md#protocols), with
  overrides.

  crops: the nominal crops per image behind the target (N_nominal / tokens per crop: LLaVA-NeXT 2880 / 576 = 5,
    LLaVA-1.5 1; the runner passes its backbone's); None: 5 on LLaVA-NeXT families, 1 on LLaVA-1.5.
  Raises ValueError naming the method, the family or the override that does not apply or is not of its kind
  (`override_kind`; `NoProtocol` where the official code has no setting for this family, depth or target).
  """
  if method not in methods.METHODS:
    raise ValueError(f"unknown method {method!r}; method_config knows: {', '.join(methods.METHODS)}")
  spec = methods.METHODS[method]
  name = base.family(family)
  if name not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)} (or their older spellings "
                     "llava-1.5, llava_1_5, llava-next)")
  if isinstance(target, bool) or not isinstance(target, int) or target < 1:
    raise ValueError(f"target must be a positive int, got {target!r}")
  unknown = sorted(set(overrides) - set(spec.overrides))
  if unknown:
    raise ValueError(f"{method}: unknown override(s) {', '.join(unknown)}; {method} takes: "
                     f"{', '.join(spec.overrides)}")
  o = {k: v for k, v in overrides.items() if v is not None}
  for key, value in o.items():
    base.check_override(method, key, value)
  if crops is None:
    crops = base.nominal_groups(name)
  if isinstance(crops, bool) or not isinstance(crops, int) or crops < 1:
    raise ValueError(f"crops must be a positive int, got {crops!r}")
  o["crops"] = crops
  if not supports(method, family):
    why = spec.unsupported_reason.get(name, "its official code runs LLaVA-1.5 only (no anyres path)")
    raise NoProtocol(f"{method} has no {family} protocol: {why}")
  stage1, stage2 = spec.protocol(target, name, num_layers, o)
  return PruningConfig(method=method, stage1=stage1, stage2=stage2)


def tops_schedule(num_layers: int, target: int, **kwargs) -> PruningConfig:
  """The TOPS schedule for `target` (`methods.tops.schedule`, its arguments): Stage I N -> 2 target, layer
  round(12/32 L): -> target, layer round(24/32 L): -> target // 4, the paper's (alpha, lambda)."""
  stage1, stage2 = tops_lib.schedule(num_layers, target, **kwargs)
  return PruningConfig(method="tops", stage1=stage1, stage2=stage2)



def pdrop_schedule(num_layers: int, target: int | None = None, **kwargs) -> PruningConfig:
  """PyramidDrop (method "pdrop"), `methods.pdrop.schedule` (its arguments)."""
  return PruningConfig(method="pdrop", stage2=pdrop_lib.schedule(num_layers, target, **kwargs))


def sparsevlm_schedule(num_layers: int, target: int = 192, **kwargs) -> PruningConfig:
  """SparseVLM (method "sparsevlm") as its official code runs on LLaVA-1.5, `methods.sparsevlm.stage2` (its
  arguments)."""
  return PruningConfig(method="sparsevlm", stage2=sparsevlm_method.stage2(num_layers, target, **kwargs))
