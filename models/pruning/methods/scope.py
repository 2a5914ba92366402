"""SCOPE: CLS attention^alpha times the facility-location coverage gain over CLIP layer -2 features; its layout.

Source: kinredon/SCOPE `scope/clip_encoder.py`, `llava_arch.py`: int(target / crops) per real crop over the padded
crops, no unpadding, no newlines; base crop, then the grid canvas row-major.
Qwen2.5-VL (no CLS token, no Qwen code): the saliency is the attention each merged token receives in the tower's last
full-attention block (`base.saliency`), the features the merger's input (`VisualTokens.features`), one global
selection per image.
"""

from models.pruning.methods import base
from models.pruning.modes import Stage1

__all__ = ["METHOD", "protocol"]


def protocol(target: int, family: str, num_layers: int, o: dict) -> tuple[Stage1, None]:
  layout = dict(scope="crop_divided", grid="padded") if base.anyres(family) else dict(scope="global")
  return base.stage1(target, o, relevance=base.saliency(family), features="vision", **layout), None


METHOD = base.Method(protocol=protocol, overrides=base.LAYOUT_OVERRIDES, budget_free=True, variable_count=True)
