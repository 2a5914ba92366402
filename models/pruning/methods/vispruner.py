"""VisPruner: CLS-attention important tokens plus diverse tokens from the rest; CDPruner's padded-canvas layout.

Source: Theia-4869/VisPruner @aefa01a `llava/model/llava_arch.py`: layer -2 features, half of each crop's quota by
CLS attention, target // 5 per crop on LLaVA-NeXT, the same "_unpad" strip as CDPruner (no unpadding, no newlines).
Qwen2.5-VL: the maintainer's answer for towers without CLS (Theia-4869/VisPruner #1): "the average attention each
visual token receives from all other tokens", averaged over the 2 x 2 merge group and pruned on the merged tokens
(`base.saliency`: the last full-attention block's received attention, as llmc's Qwen port reads it), the features the
merger's input, one global selection per image.
"""

from models.pruning.methods import base
from models.pruning.modes import Stage1

__all__ = ["METHOD", "protocol"]


def protocol(target: int, family: str, num_layers: int, o: dict) -> tuple[Stage1, None]:
  base.check_per_crop("vispruner", target, family, o)
  layout = dict(scope="crop_fixed", grid="padded") if base.anyres(family) else dict(scope="global")
  return base.stage1(target, o, relevance=base.saliency(family), features="vision", **layout), None


METHOD = base.Method(protocol=protocol, overrides=base.LAYOUT_OVERRIDES)
