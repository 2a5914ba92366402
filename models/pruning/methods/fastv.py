"""FastV: before layer 2, the attention of layer 1 from the last token to the visual tokens keeps `target` of them.

Source: pkunlp-icler/FastV (its K = 2: last-token attention of layer K - 1, mean over heads; original positions).
Qwen2.5-VL: the same K = 2 and target (llmc's Qwen path gathers the kept tokens' precomputed M-RoPE cos/sin, i.e.
their original ids); positions="contiguous" raises there (`base.check_positions`).
"""

from models.pruning.methods import base
from models.pruning.modes import Stage2

__all__ = ["METHOD", "protocol"]


def protocol(target: int, family: str, num_layers: int, o: dict) -> tuple[None, Stage2]:
  base.check_positions("fastv", family, o.get("positions", "original"))
  return None, Stage2(steps=((2, target),), relevance="last_token", positions=o.get("positions", "original"),
                      params=o.get("hparams", {}))


METHOD = base.Method(protocol=protocol, overrides=("hparams", "positions"), budget_free=True, variable_count=True,
                     scores_previous_layer=True)
