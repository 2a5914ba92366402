"""Visual token pruning inside the LLaVA-1.5 / LLaVA-NeXT ports, driven by a `PruningConfig`, through the models'
public seams only (image_tokens -> Stage I -> embed -> run_layers segments, query_keys -> Stage II -> head).

Modules: `config` (PruningConfig, the TOPS schedule, the static / traced split), `sequence` (static lengths and the
row gathers that rebuild a sequence), `stage1` (before the LLM), `stage2` (between decoder layers), `driver`
(`forward`, `prefill`, `greedy`), `outputs` (what they return). Nothing here branches on the model family: both
LLaVA classes expose the same `image_tokens` / `layout` / `embed` interface (LLaVA-1.5: one crop, no newlines).

Axes (the legend of `models`): B batch (one image per row), S sequence, N packed image slots per image (LLaVA-1.5:
the patches; NeXT: the anyres packing bucket incl. newline and padding slots), P crops, T tokens per crop, K kept,
C candidates, A text tokens after the image, D text width, Dv vision width, H / Hkv query / key-value heads, Dh head
width, L decoder layers, G layer segments (one more than the Stage II steps), V vocabulary, M new tokens.

    cfg = pruning.tops_schedule(num_layers=32, target=128)             # 576 -> 256 | L12: -> 128 | L24: -> 32
    out = pruning.forward(model, cfg, input_ids, attention_mask, pixel_values, image_sizes)
    out.logits                        # float32[B, 1, V] at each row's last token (all_logits=True: [B, S', V])
    out.stage1.kept, out.stage2[0].kept   # int32[B, K] packed image positions kept by each stage
    out.tokens_per_layer              # int32[B, L] real tokens each layer processed (FLOPs, "mean kept tokens")
    gen = pruning.greedy(model, cfg, input_ids, attention_mask, pixel_values=px, max_new_tokens=32)

Stage I (after the projector, before the merge). Candidates are the image tokens of each image (NeXT: the packed
tokens, newline slots excluded). What each method reads (all from `models.outputs.ImageTokens`):
- every method except visionzip: features = projector outputs (`ImageTokens.embeds`), float[B, N, D];
- visionzip: features = the vision feature-layer hidden states (pre-projector, Dv, `ImageTokens.features`) and
  `keys` = that layer's attention keys (`ImageTokens.keys`, mean over heads, VisionZip's `metric`), the same encoder
  layer whose CLS attention is the relevance; the merged tokens are then projected. Needs a single
  `vision_feature_layer` and the "default" strategy;
- trimtokenator: also `text` = the LLM input embeddings of the text after the image, with `text_valid`;
- relevance "cls": the CLS -> patch attention of the layer producing the features (`VisionOutput.cls_attention`);
  "text": `tops_jax.relevance.text_embedding_cosine` between the projector outputs and the LLM input embeddings of
  the text after the image (the port has no CLIP text tower, so this stands in for CDPruner's CLIP text-image
  similarity); "none": no relevance.
Selection is `prune.select` (merging methods: `prune.merge`, the merged tokens replace the kept rows), batched over
the images with per-row `valid`. Kept rows stay in ascending (spatial / packing) order. input_ids and the mask are
rebuilt so that each image's <image> run holds exactly its kept tokens; the static budget gives static shapes.
Stage I always re-indexes positions from 0 (`cumsum(mask) - 1`): the LLM sees the pruned prompt as its input.

LLaVA-NeXT choices:
- Newlines (`newlines`): never candidates, never counted in the budget. "drop" (default) removes every
  `image_newline` token, so the image run has exactly K tokens; "rows" keeps the newline of every grid row that
  keeps at least one token; "keep" keeps them all (with K = every token this is the unpruned sequence).
- Scope (`stage1_scope`): "global" selects K among all packed tokens of the image (DivPrune, TOPS); "per_crop"
  splits K evenly over the image's valid crops (base crop first takes the remainder) capped by what each crop still
  holds after unpadding (water-filling: a crop that has fewer tokens than its share keeps them all and the rest is
  spread over the others), then selects within each crop (VisionZip, CDPruner style). The shares are data dependent,
  so each crop is ranked with the method's greedy order and its share taken from the front: per_crop accepts only
  methods whose first k picks do not depend on the budget (`PER_CROP_METHODS`).
- The CLS token is never kept (LLaVA's "default" strategy drops it); budgets count patch tokens only. VisionZip's
  official 64-token LLaVA-1.5 setting keeps CLS + 53 + 10; here 64 means 54 dominant + 10 contextual patches.

Stage II (inside the LLM, at `stage2` layers l, each with a static budget). Run layers [0, l); the candidates are
every token at an <image> position of the current sequence (after Stage I: the kept tokens; NeXT without Stage I:
newline tokens included). Relevance:
- "raters" (TOPS, SparseVLM): `relevance.text_rater_attention` at layer l, with the queries of the real text tokens
  after the image and the keys of the whole sequence, post-RoPE, causal and padding masked (the rows of the
  layer's own attention map, never the S x S map);
- "last_token" (FastV): `relevance.last_token_attention` of the last real token at layer l - 1, as FastV scores
  at layer K - 1 and prunes before layer K;
- "none" (DivPrune/DART/random in the LLM).
Features are the hidden states entering layer l of the candidates; DART reads the final-norm hidden states as
features, the layer l - 1 keys (post-RoPE, heads concatenated) as `keys`, and the same for the text after the image
as `text_features` / `text_keys`. The sequence is rebuilt [prefix; kept visual; suffix] per row, the mask rebuilt
and positions either re-indexed from 0 ("contiguous", TOPS) or kept ("original", FastV); left/right padding is
preserved (right when some row ends in padding, else left).

LLaVA-1.5 has one crop, so "per_crop" selects exactly what "global" does for the PER_CROP_METHODS.

Static lengths (`sequence.Plan`). Every sequence after a stage has `text_len + budget` slots (NeXT "rows"/"keep": plus
the most newlines an image has), where `text_len` is the largest number of real non-image tokens in a row. `forward`
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

from models.pruning.config import (NEWLINES, PER_CROP_METHODS, POSITIONS, SCOPES, STAGE1_RELEVANCE, STAGE2_RELEVANCE,
                                   PruningConfig, StaticConfig, tops_layers, tops_schedule)
from models.pruning.driver import PrunedPrefill, decode, decode_step, forward, greedy, prefill
from models.pruning.outputs import PrunedGeneration, PruneOutput, Segment, StageOutput
from models.pruning.protocols import OFFICIAL_METHODS, method_config, overrides_of
from models.pruning.sequence import text_length
from models.pruning.stage1 import ClipText, crop_quotas, row_newlines

__all__ = ["PruningConfig", "StaticConfig", "tops_schedule", "tops_layers", "PER_CROP_METHODS", "StageOutput",
           "Segment", "PruneOutput", "PrunedGeneration", "PrunedPrefill", "forward", "prefill", "greedy", "decode",
           "decode_step", "crop_quotas", "row_newlines", "text_length", "STAGE1_RELEVANCE", "STAGE2_RELEVANCE",
           "SCOPES", "POSITIONS", "NEWLINES", "method_config", "overrides_of", "OFFICIAL_METHODS", "ClipText"]
