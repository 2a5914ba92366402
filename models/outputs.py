"""Named outputs of the model ports: pytrees (NamedTuples) that `jax.jit` can return.

Axes (`models` legend): B batch (prompts), I images (all images of the batch, flattened in order), N visual tokens
per image (packed: slots), T + 1 vision positions of a crop (CLS first), P crops, Dv vision width (times the number
of feature layers once concatenated), Dh head width, D text width, S sequence, V vocabulary, L decoder layers.

Fields that were not asked for are None.
"""

from typing import NamedTuple

import jax

__all__ = ["VisionOutput", "DecoderOutput", "LlavaOutput"]


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
  received: float32[I, N] (or [I, N + 1]) | None aligned with `features`, when asked: the mean attention each key of
    the layer producing the (last) feature layer receives, mean over heads and over all N + 1 queries (CLS
    included); with "default" the CLS column is dropped (not renormalised), as for `cls_attention`.
  """
  features: jax.Array
  cls_attention: jax.Array | None = None
  keys: jax.Array | None = None
  cls_features: jax.Array | None = None
  cls_keys: jax.Array | None = None
  last_query: jax.Array | None = None
  last_keys: jax.Array | None = None
  received: jax.Array | None = None


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
