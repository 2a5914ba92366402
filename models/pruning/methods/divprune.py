"""DivPrune: max-min diversity over the projector outputs; its official LLaVA-NeXT layout.

Source: vbdi/divprune `LLaVA/llava/model/llava_arch.py`: the whole packed sequence (newlines too) is the candidate
set, round(target / 2880 x its length) kept, packed order (the "ratio" layout with newline candidates).
"""

from models.pruning.methods import base
from models.pruning.modes import Stage1

__all__ = ["METHOD", "protocol"]


def protocol(target: int, family: str, num_layers: int, o: dict) -> tuple[Stage1, None]:
  layout = dict(scope="ratio", newlines="candidates") if base.anyres(family) else dict(scope="global")
  return base.stage1(target, o, relevance="none", **layout), None


METHOD = base.Method(protocol=protocol, overrides=base.LAYOUT_OVERRIDES, budget_free=True, variable_count=True)
