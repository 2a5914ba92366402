"""CDPruner: a DPP over the projector outputs conditioned on the CLIP text-image relevance; its official layout.

Source: Theia-4869/CDPruner @9541616 `llava/model/llava_arch.py`: relevance = the negated CLIP text-image similarity
min-max rescaled over all crops of the image (`tops_jax.relevance.clip_text_relevance`), target // 5 per crop among
its 576 tokens on LLaVA-NeXT; the picks go to the LLM on the padded canvas (base crop, then the grid canvas
row-major), no unpadding and no newlines (its `prepare_inputs_labels_for_multimodal` strips "_unpad" from
spatial_unpad).
relevance="text" is the documented fallback without a CLIP checkpoint (`models.pruning.protocols`).
Qwen2.5-VL: CDPruner has no Qwen code (its maintainer, issues #4 / #7: prune the merged tokens after the PatchMerger)
and Qwen's tower has no CLIP text tower to pair with, so the default there IS the fallback, relevance="text": the
cosine of each merged token (the LLM-space embedding) with the LLM's input embeddings of the text after the image,
mean over those tokens, not negated, min-max rescaled over the image (openvino.genai's C++ port for Qwen2/2.5-VL,
`cdpruner/relevance_calculator.cpp`: the same cosine / mean / min-max over the instruction-token embeddings, negated
only for CLIP models), one global selection per image. Its rows are labelled "cdpruner-text" (the runner labels every
CDPruner run whose relevance is not "clip_text"), never CDPruner's; "clip_text" raises there.
"""

from models.pruning.methods import base
from models.pruning.modes import Stage1

__all__ = ["METHOD", "protocol"]


def protocol(target: int, family: str, num_layers: int, o: dict) -> tuple[Stage1, None]:
  base.check_per_crop("cdpruner", target, family, o)
  layout = dict(scope="crop_fixed", grid="padded") if base.anyres(family) else dict(scope="global")
  if family in base.NO_CLS:        # no CLIP tower: the text-embedding fallback is the only relevance there
    if o.get("relevance") == "clip_text":
      raise ValueError(f"cdpruner: override relevance='clip_text' pairs CLIP's text tower with CLIP image features; "
                       f"{family}'s tower is not CLIP (its default is the text-embedding fallback, 'text')")
    return base.stage1(target, o, relevance="text", **layout), None
  return base.stage1(target, o, relevance="clip_text", **layout), None


def _stage1_hparams(config, hp, text, text_valid):
  if config.stage1_relevance == "clip_text":
    hp["rescale"] = False                   # clip_text_relevance rescaled it over all crops of the image already
  return hp


METHOD = base.Method(protocol=protocol, overrides=base.LAYOUT_OVERRIDES, budget_free=True, variable_count=True,
                     clip_text=True, stage1_hparams=_stage1_hparams)
