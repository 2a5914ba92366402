"""One home per method: its official protocol on every backbone (with the sources it follows), its traits and the
hooks the stages call (`base.Method`). The stages, `PruningConfig` and `method_config` look a method up here and never
branch on its name.

Modules: `tops`, `cdpruner`, `divprune`, `scope`, `visionzip`, `dart`, `fastv`, `vispruner`, `prumerge`
(PruMerge+), `pdrop` (PyramidDrop), `sparsevlm`, `simple` (TrimTokenator, random, pooling); `base` (the record).
"""

from models.pruning.methods import cdpruner
from models.pruning.methods import dart
from models.pruning.methods import divprune
from models.pruning.methods import fastv
from models.pruning.methods import pdrop
from models.pruning.methods import prumerge
from models.pruning.methods import scope
from models.pruning.methods import simple
from models.pruning.methods import sparsevlm
from models.pruning.methods import tops
from models.pruning.methods import visionzip
from models.pruning.methods import vispruner
from models.pruning.methods.base import FAMILIES, Method, NoProtocol

__all__ = ["METHODS", "Method", "NoProtocol", "FAMILIES", "get"]

# In the order `method_config` lists them (the runner's "all").
METHODS: dict[str, Method] = {
    "tops": tops.METHOD,
    "cdpruner": cdpruner.METHOD,
    "divprune": divprune.METHOD,
    "scope": scope.METHOD,
    "visionzip": visionzip.METHOD,
    "dart": dart.METHOD,
    "fastv": fastv.METHOD,
    "trimtokenator": simple.TRIMTOKENATOR,
    "random": simple.RANDOM,
    "pooling": simple.POOLING,
    "vispruner": vispruner.METHOD,
    "prumerge_plus": prumerge.METHOD,
    "pdrop": pdrop.METHOD,
    "sparsevlm": sparsevlm.METHOD,
}


def get(name: str) -> Method:
  """The method `name`; ValueError naming the known ones."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
  return METHODS[name]
