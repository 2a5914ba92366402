"""PyramidDrop: at the end of each stage, keep the image tokens the last instruction token attends to most.

Axes: N visual tokens, D width, K kept.

Source: PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", CVPR 2025), official code `Cooperx521/PyramidDrop` (commit 6444f30),
llava/model/modeling_llama_pdrop.py, `LlamaModel.pdrop_forward` and `pdrop_rank_drop` (the same rule in the llmc
port, `ModelTC/LightCompress` llmc/compression/token_reduction/pyramiddrop.py). Facts read from that code:
- Rank & drop runs when layer `rank_layer - 1` has finished and `rank_layer` is in `layer_list` (scripts:
  `[8,16,24]`): the queries and keys are layer `rank_layer`'s own projections (input RMSNorm, q/k_proj, RoPE at the
  current position ids) of the hidden states entering that layer, so layer `rank_layer` already runs on the pruned
  sequence. The signal is the softmax row (causal and padding masked, float32) of the LAST INSTRUCTION token (the
  last prompt token, position prompt_len + image_tokens - 1), mean over heads, restricted to the image tokens.
- `image_token_ratio_list` (scripts: `[0.5,0.25,0.125]`, lambda = 0.5) gets 1.0 prepended; stage s keeps
  `int(N * ratio[s + 1])` of the `int(N * ratio[s])` image tokens left, where N is the image's token count entering
  the LLM (LLaVA-NeXT: `image_feature.shape[0]`, newline tokens included and ranked like the others): ratios are of the
  ORIGINAL count, floored each time with Python `int`.
- `topk(keep_length)` of that attention, indices sorted ascending (spatial order kept); the rebuilt sequence is
  [before image; kept image tokens; after image] and the position ids are re-indexed `arange(0, len)`; in decoding
  the position of a new token in each stage is shifted down by the tokens dropped so far (contiguous per stage).
- Batched inference only supports right padding (`tokenizer_padding_side == "right"`).

This module only ranks the signal (`tops_jax.relevance.last_token_attention`); the stage schedule, the per-image
counts and the sequence rebuild are `models.pruning`'s (`pdrop_schedule`).

Choices: ties go to the lowest index (`torch.topk` leaves them unspecified). Padding is never kept; if an outer jit
hides that fewer than K tokens are valid, the last slots hold the lowest-index padding positions.
"""

import jax

from tops_jax import fastv

__all__ = ["order"]


def order(features: jax.Array, relevance: jax.Array, valid: jax.Array, key: jax.Array | None = None, *,
          keep: int) -> jax.Array:
  """Top-`keep` valid tokens by the last instruction token's attention, best first.

  Args:
    features: float[N, D] (unused; part of the common method signature).
    relevance: float32[N] attention of the last instruction token to each image token, mean over heads.
    valid: bool[N] padding False.
    key: unused.
    keep: static number of tokens to keep.

  Returns:
    int32[K] indices, highest attention first (the first k of the order are the top-k for every k <= K).
  """
  if relevance is None:
    raise ValueError("pdrop: needs relevance=float[N] (last instruction token attention, see tops_jax.relevance)")
  return fastv.order(features, relevance, valid, key, keep=keep)     # the same top-k of an attention row
