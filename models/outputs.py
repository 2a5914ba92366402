"""Named outputs of the model ports: pytrees (NamedTuples) that `jax.jit` can return.

Axes (`models` legend): B batch (prompts), I images (all images of the batch, flattened in order), N visual tokens
per image (packed: slots), T + 1 vision positions of a crop (CLS first), P crops, Dv vision width (times the number
of feature layers once concatenated), Dh head width, D text width, S sequence, V vocabulary, L decoder layers.

Fields that were not asked for are None.
"""

from typing import NamedTuple

import jax

__all__ = ["VisionOutput", "ImageTokens", "DecoderOutput", "LlavaOutput"]


class VisionOutput(NamedTuple):
  """What the CLIP tower hands to LLaVA.

  features: float[I, N, Dv] (`select_strategy="default"`: CLS dropped) or float[I, N + 1, Dv] ("full"): the hidden
    states of the `vision_feature_layer`(s), concatenated along the width in the order given, like transformers.
  cls_attention: float32[I, N] or float32[I, N + 1] aligned with `features`: attention from the CLS query to every key
    of the layer that produces the (last) feature layer, softmax over all N + 1 keys, mean over heads; with "default"
    the CLS column is dropped (not renormalised), as VisionZip/TOPS Stage I read it.
  keys: float[I, N, Dh] (or [I, N + 1, Dh]) aligned with `features`, when asked: the attention keys of that same layer
    (k_proj of its normed input), mean over heads: VisionZip's `metric` for merging contextual tokens.
  cls_features: float[I, Dv] | None the CLS position of `features` (whatever the select strategy), when asked.
  cls_keys: float[I, Dh] | None the CLS position of `keys`, when asked with keys.
  last_query: float[I, Dv] | None the LAST encoder layer's full-width q_proj of the CLS position, applied to its input
    (hidden state -2), when asked (PruMerge+ reads that layer's attention).
  last_keys: float[I, N + 1, Dv] | None that layer's full-width k_proj of every position (CLS first), when asked.
  """
  features: jax.Array
  cls_attention: jax.Array | None = None
  keys: jax.Array | None = None
  cls_features: jax.Array | None = None
  cls_keys: jax.Array | None = None
  last_query: jax.Array | None = None
  last_keys: jax.Array | None = None


class ImageTokens(NamedTuple):
  """The image tokens of a batch as the decoder will receive them, and what pruners read about them; the same
  interface for LLaVA-1.5 (one crop: N = the patches, the trivial layout) and LLaVA-NeXT (anyres packing).

  embeds: float[I, N, D] projector outputs in packed order (NeXT: newline slots hold `image_newline`, padding zeros).
  valid: bool[I, N] real slots (image tokens and newlines; a prefix of each row).
  newline: bool[I, N] `image_newline` slots (LLaVA-1.5: none).
  crop: int32[I, N] crop of each slot: 0 the base crop, 1.. the grid crops; -1 newline and padding.
  source: int32[I, N] index of each slot in the image's flattened per-crop tokens [P * T]; -1 newline and padding.
  cls_attention: float32[I, N] | None CLS attention of the feature layer (0 at newline and padding slots).
  features: float[I, N, Dv] pre-projector vision features (zeros at newline and padding slots).
  keys: float[I, N, Dh] | None the feature layer's keys, mean over heads (`VisionOutput.keys`), when asked.
  crop_embeds: float[I, P, T, D] projector outputs per crop, before packing (LLaVA-1.5: P = 1, T = N).
  crop_cls_attention: float32[I, P, T] | None CLS attention per crop.
  crop_features: float[I, P, T, Dv] pre-projector vision features per crop, before packing (padded crops included).
  crop_valid: bool[I, P] real crops (False for the processor's padding crops; LLaVA-1.5: one real crop).
  crop_keys: float[I, P, T, Dh] | None the feature layer's keys per crop, when asked.
  cls_features: float[I, P, Dv] | None the CLS token's hidden state of the feature layer per crop, when asked
    (VisionZip keeps it).
  cls_keys: float[I, P, Dh] | None the CLS token's key of that layer (mean over heads), when asked.
  grid: int32[I, 2] (rows, cols) of grid crops per image (LLaVA-1.5: (0, 0), the base crop only).
  last_query / last_keys: `VisionOutput.last_query` / `last_keys` (LLaVA-1.5 only: PruMerge+), when asked.
  """
  embeds: jax.Array
  valid: jax.Array
  newline: jax.Array
  crop: jax.Array
  source: jax.Array
  cls_attention: jax.Array | None
  features: jax.Array
  keys: jax.Array | None
  crop_embeds: jax.Array
  crop_cls_attention: jax.Array | None
  crop_features: jax.Array | None = None
  crop_valid: jax.Array | None = None
  crop_keys: jax.Array | None = None
  cls_features: jax.Array | None = None
  cls_keys: jax.Array | None = None
  grid: jax.Array | None = None
  last_query: jax.Array | None = None
  last_keys: jax.Array | None = None


class DecoderOutput(NamedTuple):
  """Result of running a segment [start, stop) of decoder layers (see `models.llama.LlamaModel.run_layers`).

  hidden: float[B, S, D] output of layer stop - 1 (before the final norm).
  hidden_states: float[stop - start, B, S, D] the input of each layer of the segment, when asked.
  cache: the KV cache with this segment's keys/values written (`models.llama.KVCache`), when one was given.
  """
  hidden: jax.Array
  hidden_states: jax.Array | None = None
  cache: object | None = None


class LlavaOutput(NamedTuple):
  """Everything a LLaVA forward computes, for scorers that read intermediates without forking the model.

  logits: float32[B, S, V].
  image_features: float[I, N, Dv] vision features fed to the projector (`VisionOutput.features`).
  cls_attention: float32[I, N] CLS-to-patch attention of the feature layer (Stage I relevance).
  image_embeds: float[I, N, D] projector output.
  inputs_embeds: float[B, S, D] text embeddings with the image rows merged in (the decoder input).
  hidden_states: float[L + 1, B, S, D] when `output_hidden_states=True`: entry l < L is the input of decoder layer l
    (entry 0 = inputs_embeds), entry L the output of the last layer BEFORE the final norm. transformers' tuple
    differs only in its last entry, which is after the norm (that one is `last_hidden_state` here).
  last_hidden_state: float[B, S, D] after the final norm.
  cache: `models.llama.KVCache` when the call was given one.
  """
  logits: jax.Array
  image_features: jax.Array | None = None
  cls_attention: jax.Array | None = None
  image_embeds: jax.Array | None = None
  inputs_embeds: jax.Array | None = None
  hidden_states: jax.Array | None = None
  last_hidden_state: jax.Array | None = None
  cache: object | None = None
