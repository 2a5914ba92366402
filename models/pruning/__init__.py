"""Visual token pruning inside a `models.family.VisionLanguageModel`, driven by a `PruningConfig`, through the models'
public seams only (visual_tokens -> Stage I -> embed -> run_layers segments, query_keys -> Stage II -> head).

Axes and counts: the legend and the count vocabulary of `models` (here I images over B rows, the groups P are crops
of T tokens each).

    cfg = pruning.tops_schedule(num_layers=32, target=128)             # 576 -> 256 | L12: -> 128 | L24: -> 32
    cfg = pruning.PruningConfig("divprune", stage1=pruning.Stage1(budget=64, relevance="none"))   # typed
    out = pruning.forward(model, cfg, input_ids, attention_mask, pixel_values, image_sizes)
    out.stage1.kept, out.stage2[0].kept   # int32[I, K] / int32[B, K] packed image positions kept by each stage
    gen = pruning.greedy(model, cfg, input_ids, attention_mask, pixel_values=px, max_new_tokens=32)

Nothing here branches on the model family or on a method's name. The map of the modules, the full example, Stage I's
and Stage II's options, the static lengths, generation and the limits: models/pruning/PRUNING.md#package.
"""

from models.pruning.config import (FULL, NEWLINES, PER_CROP_METHODS, POSITIONS, SCOPES, STAGE1_RELEVANCE,
                                   STAGE2_RATERS, STAGE2_RELEVANCE, STAGE2_TIMINGS, Layout, PruningConfig, Stage1,
                                   Stage2, StaticConfig)
from models.pruning.driver import decode, decode_step, forward, greedy, prefill, prefill_program
from models.pruning.outputs import PrunedGeneration, PruneOutput, Segment, StageOutput
from models.pruning.protocols import (OFFICIAL_METHODS, NoProtocol, method_config, override_kind, overrides_of,
                                      pdrop_schedule, sparsevlm_schedule, supports, tops_layers, tops_schedule)
from models.pruning.sequence import text_length
from models.pruning.stage1 import ClipText, crop_quotas, row_newlines

__all__ = ["PruningConfig", "Stage1", "Stage2", "Layout", "FULL", "StaticConfig", "tops_schedule", "tops_layers",
           "PER_CROP_METHODS", "StageOutput", "Segment", "PruneOutput", "PrunedGeneration", "prefill_program",
           "forward", "prefill", "greedy", "decode", "decode_step", "crop_quotas", "row_newlines", "text_length",
           "STAGE1_RELEVANCE", "STAGE2_RELEVANCE", "SCOPES", "POSITIONS", "NEWLINES", "method_config",
           "overrides_of", "override_kind", "OFFICIAL_METHODS", "ClipText", "supports", "STAGE2_RATERS",
           "STAGE2_TIMINGS", "pdrop_schedule", "sparsevlm_schedule"]
