"""Visual token pruning inside the LLaVA-1.5 / LLaVA-NeXT ports, driven by a `PruningConfig`, through the models'
public seams only (image_tokens -> Stage I -> embed -> run_layers segments, query_keys -> Stage II -> head).

Modules: `config` (PruningConfig, the static / traced split), `modes` (its typed parts: `Stage1`, `Stage2`, the
`Layout` rows, the modes), `params` (each method's typed hyperparameters), `methods` (one module per method: its
official protocol on every backbone with its sources, its traits and the hooks the stages call), `protocols`
(`method_config`, `tops_schedule`, `pdrop_schedule`, `sparsevlm_schedule`), `sequence` (static lengths and the row
gathers that rebuild a sequence), `crops` (Stage I's crop arithmetic), `stage1` (before the LLM), `stage2` (between
decoder layers), `driver` (`forward`, `prefill`, `greedy`), `outputs` (what they return and hand each other).
Nothing here branches on the model family or on a method's name: both
LLaVA classes expose the same `image_tokens` / `layout` / `embed` interface (LLaVA-1.5: one crop, no newlines).

Axes (the legend of `models`): B batch (one image per row), S sequence, N packed image slots per image (LLaVA-1.5:
the patches; NeXT: the anyres packing bucket incl. newline and padding slots), P crops, T tokens per crop, K kept,
C candidates, A text tokens after the image, D text width, Dv vision width, H / Hkv query / key-value heads, Dh head
width, L decoder layers, G layer segments (one more than the Stage II steps), V vocabulary, M new tokens.

    cfg = pruning.tops_schedule(num_layers=32, target=128)             # 576 -> 256 | L12: -> 128 | L24: -> 32
    cfg = pruning.PruningConfig("divprune", stage1=pruning.Stage1(budget=64, relevance="none"))   # typed
    cfg = pruning.PruningConfig.flat("divprune", stage1_budget=64, stage1_relevance="none")        # the same, flat
    pruning.FULL                      # the unpruned model (= PruningConfig(method="tops"): no stage)
    out = pruning.forward(model, cfg, input_ids, attention_mask, pixel_values, image_sizes)
    out.logits                        # float32[B, 1, V] at each row's last token (all_logits=True: [B, S', V])
    out.stage1.kept, out.stage2[0].kept   # int32[B, K] packed image positions kept by each stage
    out.tokens_per_layer              # int32[B, L] real tokens each layer processed (FLOPs, "mean kept tokens")
    gen = pruning.greedy(model, cfg, input_ids, attention_mask, pixel_values=px, max_new_tokens=32)

Stage I (after the vision tower, before the merge; `stage1`). Each image hands the LLM a list of rows (`stage1.Rows`:
embeddings, a validity prefix, the packed slot of each row) and its <image> run is cut to that count; the layout
fields of the config (`Stage1`; named below by their flat spelling) decide the candidates, the budgets and the order
(the table in `stage1`'s docstring; `Stage1.layout` is one of its rows, a `Layout`):
- `stage1_scope`: "global" (K of the packed tokens), "per_crop" (K split evenly over the crops, water-filled: ours),
  "ratio" (round(K * n / N_nominal) of the n candidates: DivPrune), "crop_fixed" (K // P_nominal per crop whatever
  the crop count: CDPruner, VisionZip), "crop_divided" (int(K / P_real) per crop: SCOPE);
- `stage1_grid`: "unpadded" (the packed tokens), "padded" (each crop's T tokens, all picks to the LLM in the anyres
  canvas order: SCOPE, VisionZip), "padded_unpad" (each crop's T tokens; unpadding then drops what it removes:
  CDPruner);
- `newlines`: "drop" (none), "rows" (rows that keep a token), "keep" (all), "candidates" (selected like the tokens);
- `stage1_features`: "projector" (the projector outputs, `ImageTokens.embeds`) or "vision" (the feature layer's
  hidden states, `ImageTokens.features`; merges are projected afterwards);
- `stage1_relevance`: "cls" (CLS attention of the feature layer, mean over heads: every method here is invariant to
  the official head sum's constant factor), "text" (`relevance.text_embedding_cosine` of the projector outputs with
  the LLM input embeddings of the text after the image: the fallback when no CLIP text tower is given), "clip_text"
  (CDPruner: `relevance.clip_text_relevance` of the CLIP checkpoint's image embeddings with each row's CLIP text
  embedding, passed as `clip=ClipText(...)`), "none";
- `visionzip_cls`: VisionZip's official output (CLS + dominant + contextual per crop, its LLaVA-NeXT order).
`method_config(method, family=, target=, num_layers=, **overrides)` (`protocols`) gives each method's official
setting of these fields; the overrides name our variants. Kept rows keep the layout's order; the CLS token is only
ever kept by VisionZip's official layout. Stage I always re-indexes positions from 0 (`cumsum(mask) - 1`).

Stage II (inside the LLM, at `stage2` layers l, each with a static budget; `stage2` argues the options). Timing
(`stage2_timing`): "before" (default) runs layers [0, l) and the pruned sequence enters layer l; "after" runs
[0, l] and prunes layer l's output (SparseVLM's timing). The candidates are every token at an <image> position of the
current sequence (after Stage I: the kept tokens; NeXT without Stage I: newline tokens included). Relevance, read at
`score_layer`: layer l, except layer l - 1 for FastV and DART under "before" (their official codes):
- "raters" (TOPS, SparseVLM): `relevance.text_rater_attention`, with the queries of the real text tokens after the
  image and the keys of the whole sequence, post-RoPE, causal and padding masked (the rows of the layer's own
  attention map, never the S x S map); the raters (`stage2_raters`) are re-chosen from that layer's attention
  ("attention", default) or chosen once from the LLM input embeddings ("sparsevlm", SparseVLM's rule);
- "last_token" (FastV, PyramidDrop): `relevance.last_token_attention` of the last real token;
- "none" (DivPrune/DART/random in the LLM).
Features are the hidden states entering the first pruned layer of the candidates; DART reads the final-norm hidden
states as features, the scoring layer's keys (post-RoPE, heads concatenated) as `keys`, and the same for the text
after the image as `text_features` / `text_keys`. The sequence is rebuilt [prefix; kept visual; inserted rows;
suffix] per row, the mask rebuilt and positions either re-indexed from 0 ("contiguous", TOPS) or kept ("original",
FastV); left/right padding is preserved (right when some row ends in padding, else left). A step may keep a per-row
count below its static budget (`stage2_ratios`: PyramidDrop's int(n * ratio); SparseVLM's rank-based count) and
insert rows after the kept visual tokens (SparseVLM's recycled clusters). `pdrop_schedule` and `sparsevlm_schedule`
give those methods' published settings.

LLaVA-1.5 has one crop, so "per_crop" selects exactly what "global" does for the PER_CROP_METHODS.

Static lengths (`sequence.Plan`). Every sequence after Stage I has `text_len + rows` slots (`stage1.capacity`: the
budget, plus the most newlines an image keeps under "rows"/"keep"; the layouts' own bounds otherwise), after a Stage
II step `text_len + budget` (+ its inserted rows, `stage2.step_bounds`), where `text_len` is the largest number of real non-image tokens in a row. `forward`
and `greedy` read it from concrete inputs (exact); under an outer jit it is bounded from the shapes (S - N for
LLaVA-1.5, S - T for NeXT), or pass `text_len=`. The jitted programs are cached per (config structure, shapes,
text_len): pass a bucketed `text_len` to share one compile across batches whose prompts differ. Float hyperparameters
(alpha, lambda, eps, sigma, ...) are traced arguments, so a sweep over them compiles once.

Generation (`greedy` = `prefill` + `models.generate.decode`): the prefill runs the pruned schedule and writes each
layer's kept sequence into the KV cache from slot 0 (so layers after a pruning point hold shorter caches;
`llama.KVCache.end` is per layer). Decoding is `models.generate`'s loop over the G layer segments; the new token of
step t sits at position last_g + 1 + t in segment g, where last_g is the position of the row's last real token in that
segment (contiguous: segment length - 1; original: the original last position). Decoding is exact for the kept
sequences.

Limits: one image per row (I = B); the attention relevance does not model a sliding window, so Stage II attention
relevance rejects models that have one.
"""

from models.pruning.config import (FULL, NEWLINES, PER_CROP_METHODS, POSITIONS, SCOPES, STAGE1_RELEVANCE,
                                   STAGE2_RATERS, STAGE2_RELEVANCE, STAGE2_TIMINGS, Layout, PruningConfig, Stage1,
                                   Stage2, StaticConfig)
from models.pruning.driver import decode, decode_step, forward, greedy, prefill
from models.pruning.outputs import PrunedGeneration, PruneOutput, Segment, StageOutput
from models.pruning.protocols import (OFFICIAL_METHODS, NoProtocol, method_config, overrides_of, pdrop_schedule,
                                      sparsevlm_schedule, supports, tops_layers, tops_schedule)
from models.pruning.sequence import text_length
from models.pruning.stage1 import ClipText, crop_quotas, row_newlines

__all__ = ["PruningConfig", "Stage1", "Stage2", "Layout", "FULL", "StaticConfig", "tops_schedule", "tops_layers",
           "PER_CROP_METHODS", "StageOutput", "Segment", "PruneOutput", "PrunedGeneration",
           "forward", "prefill", "greedy", "decode", "decode_step", "crop_quotas", "row_newlines", "text_length",
           "STAGE1_RELEVANCE", "STAGE2_RELEVANCE", "SCOPES", "POSITIONS", "NEWLINES", "method_config",
           "overrides_of", "OFFICIAL_METHODS", "ClipText", "supports", "STAGE2_RATERS", "STAGE2_TIMINGS",
           "pdrop_schedule", "sparsevlm_schedule"]
