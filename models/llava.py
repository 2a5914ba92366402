"""LLaVA-1.5 (CLIP ViT + MLP projector + LLaMA/Vicuna or Mistral) in Flax NNX, matching transformers'
`LlavaForConditionalGeneration`.

Axes: B batch, S sequence, I images (all images of the batch in order), N visual tokens per image, Dv vision width,
D text width, V vocabulary, L decoder layers.

    model = models.load_pretrained(path, dtype=jnp.bfloat16)
    out = jax.jit(lambda m, b: m(**b))(model, dict(input_ids=ids, pixel_values=px, attention_mask=mask))
    out.logits                          # float32[B, 1, V] at each row's last real token (all_logits=True: [B, S, V])
    tokens = model.visual_tokens(px, None, relevance=("cls",))   # VisualTokens: what pruners read (models.family)

The forward is a composition of small methods (`encode_images`, `project`, `embed`, `language_model.run_layers`,
`head`), the seam for token pruning. The chain step by step, the image-token merge, position ids and the vision
feature options: models/MODELS.md#llava.
"""

import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import activations
from models import anyres
from models import checks
from models import clip
from models import config_fields
from models import conversion
from models import family
from models import llama
from models.family import VisualTokens
from models.outputs import LlavaOutput, VisionOutput

__all__ = ["LlavaConfig", "LlavaMultiModalProjector", "LlavaForConditionalGeneration", "merge_image_features",
           "check_image_tokens", "single_crop_layout", "last_logits", "Decoded", "decode", "conversion_table",
           "relevance_of"]

# LlavaConfig's vision tower when config.json has no vision_config (CLIP ViT-L/14 at 336 px).
_DEFAULT_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14)


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """LLaVA config: the two towers plus the fields that join them (transformers' LlavaConfig defaults)."""
  vision: clip.CLIPVisionConfig = dataclasses.field(
      default_factory=lambda: clip.CLIPVisionConfig(**_DEFAULT_VISION))
  text: llama.TextConfig = dataclasses.field(default_factory=lambda: llama.TextConfig.from_hf({}))
  image_token_id: int = 32000
  projector_hidden_act: str = "gelu"
  multimodal_projector_bias: bool = True
  vision_feature_layer: int | tuple[int, ...] = -2
  vision_feature_select_strategy: str = "default"
  tie_word_embeddings: bool = False

  @classmethod
  def from_hf(cls, hf: dict[str, Any], model_type: str = "llava") -> "LlavaConfig":
    """From a parsed config.json; raises ValueError for fields the port does not implement.

    `model_type` is the expected top-level type (LLaVA-NeXT reuses this parser for the shared fields).
    """
    if hf.get("model_type") != model_type:
      raise ValueError(f"expected model_type {model_type!r}, got {hf.get('model_type')!r}")
    for name in ("vision_config", "text_config"):
      if hf.get(name) is not None and not isinstance(hf[name], dict):
        raise ValueError(f"{name} must be a JSON object, got {hf[name]!r}")
    vision_hf = hf.get("vision_config")
    vision = clip.CLIPVisionConfig(**_DEFAULT_VISION) if vision_hf is None else clip.CLIPVisionConfig.from_hf(vision_hf)
    text = llama.TextConfig.from_hf(hf.get("text_config") or {})
    for name in ("tie_word_embeddings", "multimodal_projector_bias"):
      if name in hf:
        config_fields.check_field(hf[name], bool, name)
    tie = hf.get("tie_word_embeddings", False) or text.tie_word_embeddings
    text = dataclasses.replace(text, tie_word_embeddings=tie)
    layer = hf.get("vision_feature_layer", -2)
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(layer, list) and layer and all(is_int(v) for v in layer):
      layer = tuple(layer)
    elif not is_int(layer):
      raise ValueError(f"vision_feature_layer must be an int or a non-empty list of ints, got {layer!r}")
    for v in (layer,) if isinstance(layer, int) else layer:
      clip.resolve_hidden_state_index(v, vision.num_hidden_layers)
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
      raise ValueError(f"vision_feature_select_strategy={strategy!r} is not supported (only 'default' and 'full')")
    act = hf.get("projector_hidden_act", "gelu")
    if act not in activations.ACTIVATIONS:
      raise ValueError(f"projector_hidden_act={act!r} is not supported; supported: {sorted(activations.ACTIVATIONS)}")
    token_field = "image_token_id" if "image_token_id" in hf else "image_token_index"
    token = hf.get(token_field, 32000)
    config_fields.check_field(token, int, token_field)
    if not 0 <= token < text.vocab_size:
      raise ValueError(f"{token_field}={token} is outside the vocabulary (vocab_size={text.vocab_size})")
    return cls(vision=vision, text=text, image_token_id=token, projector_hidden_act=act,
               multimodal_projector_bias=hf.get("multimodal_projector_bias", True),
               vision_feature_layer=layer, vision_feature_select_strategy=strategy, tie_word_embeddings=tie)

  @property
  def num_feature_layers(self) -> int:
    return 1 if isinstance(self.vision_feature_layer, int) else len(self.vision_feature_layer)

  @property
  def max_image_tokens(self) -> int:
    """The most <image> tokens one image brings (LLaVA-1.5: every image brings exactly this many)."""
    return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

  @property
  def max_newlines(self) -> int:
    """The most `image_newline` tokens one image brings (LLaVA-1.5: none)."""
    return 0

  @property
  def max_num_crops(self) -> int:
    """The most crops an image is encoded as (LLaVA-1.5: one)."""
    return 1

  @property
  def token_grid(self) -> tuple[int, int] | None:
    """(rows, cols) of the 2-D grid an image's tokens form in packed order: the patch grid ("full": none, CLS)."""
    g = self.vision.image_size // self.vision.patch_size
    return (g, g) if self.vision_feature_select_strategy == "default" else None


class LlavaMultiModalProjector(nnx.Module):
  """linear_1 -> act (`projector_hidden_act`, "gelu" = exact erf GELU) -> linear_2."""

  def __init__(self, config: LlavaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    din = config.vision.hidden_size * config.num_feature_layers
    d = config.text.hidden_size
    bias = config.multimodal_projector_bias
    self.act = config.projector_hidden_act
    self.linear_1 = nnx.Linear(din, d, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.linear_2 = nnx.Linear(d, d, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    """float[..., Dv] -> float[..., D]."""
    return self.linear_2(activations.ACTIVATIONS[self.act](self.linear_1(features)))


def check_image_tokens(input_ids, num_rows: int, image_token_id: int):
  """Raises ValueError when concrete `input_ids` hold a number of image tokens other than `num_rows`."""
  if isinstance(input_ids, jax.core.Tracer):
    return
  count = int(np.sum(np.asarray(input_ids) == image_token_id))
  if count != num_rows:
    raise ValueError(f"image features and image tokens do not match: {count} image tokens (id {image_token_id}) in "
                     f"input_ids, {num_rows} image feature rows")


def merge_image_features(input_ids: jax.Array, inputs_embeds: jax.Array, image_embeds: jax.Array,
                         image_token_id: int) -> jax.Array:
  """jit-safe masked_scatter: the k-th image token (row-major over [B, S]) takes row k of the image embeddings.

  Args:
    input_ids: int[B, S].
    inputs_embeds: float[B, S, D] text embeddings.
    image_embeds: float[I, N, D] or float[R, D] (rows in order).
    image_token_id: the placeholder id.

  Returns:
    float[B, S, D].
  """
  chex.assert_rank(input_ids, 2)
  chex.assert_rank(inputs_embeds, 3)
  rows = image_embeds.reshape(-1, image_embeds.shape[-1])
  if rows.shape[-1] != inputs_embeds.shape[-1]:
    raise ValueError(f"image embeddings have width {rows.shape[-1]}, text embeddings {inputs_embeds.shape[-1]}")
  check_image_tokens(input_ids, rows.shape[0], image_token_id)
  is_image = input_ids == image_token_id
  order = jnp.cumsum(is_image.reshape(-1)) - 1
  gathered = jnp.take(rows, jnp.clip(order, 0, rows.shape[0] - 1), axis=0).reshape(inputs_embeds.shape)
  return jnp.where(is_image[..., None], gathered.astype(inputs_embeds.dtype), inputs_embeds)


def single_crop_layout(num_images: int, num_tokens: int) -> anyres.PackLayout:
  """The trivial packing layout of LLaVA-1.5 (host numpy): every image is one crop of `num_tokens` tokens, packed in
  their own order, no newline, no padding."""
  tokens = np.broadcast_to(np.arange(num_tokens, dtype=np.int32), (num_images, num_tokens))
  return anyres.PackLayout(source=tokens.copy(), crop=np.zeros((num_images, num_tokens), np.int32),
                           newline=np.zeros((num_images, num_tokens), bool),
                           valid=np.ones((num_images, num_tokens), bool),
                           counts=np.full((num_images,), num_tokens, np.int32),
                           grid=np.zeros((num_images, 2), np.int32))


def relevance_of(vis: VisionOutput) -> dict[str, jax.Array]:
  """The relevance signals (`models.family.RELEVANCE`) a tower pass computed, by name: {"cls": cls_attention,
  "received": received}, each float32[..., N]."""
  return {name: a for name, a in (("cls", vis.cls_attention), ("received", vis.received)) if a is not None}


def last_logits(head, hidden: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
  """`head` at each row's last real position: float[B, S, D] -> float32[B, 1, V] (the LM head runs on B rows)."""
  if attention_mask is None:
    return head(hidden[:, -1:])
  mask = jnp.asarray(attention_mask).astype(bool)
  last = (mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=-1)).astype(jnp.int32)
  return head(jnp.take_along_axis(hidden, last[:, None, None], axis=1))


class Decoded(NamedTuple):
  logits: jax.Array                   # float32[B, S, V] (all_logits) or [B, 1, V] at each row's last real token
  hidden_states: jax.Array | None     # float[L + 1, B, S, D]: every layer's input and the last output
  last_hidden_state: jax.Array        # float[B, S, D] after the final norm
  cache: Any


def decode(model, x: jax.Array, position_ids: jax.Array, attention_mask: jax.Array | None, *, cache=None,
           cache_empty: bool = False, output_hidden_states: bool = False, all_logits: bool = False) -> Decoded:
  """Every family's forward after its embeddings: the decoder's layers, the final norm and the LM head
  (`model.language_model`, `model.lm_head`, `model.head`), as transformers' forward returns them."""
  seg = model.language_model.run_layers(x, position_ids, attention_mask, cache=cache, cache_empty=cache_empty,
                                        collect_hidden=output_hidden_states)
  hidden_states = None
  if output_hidden_states:
    hidden_states = jnp.concatenate([seg.hidden_states, seg.hidden[None]], axis=0)
  last = model.language_model.norm(seg.hidden)
  logits = (llama.lm_logits(model.language_model, model.lm_head, last) if all_logits
            else last_logits(model.head, seg.hidden, attention_mask))
  return Decoded(logits, hidden_states, last, seg.cache)


class LlavaForConditionalGeneration(nnx.Module):
  """vision_tower (CLIP), multi_modal_projector, language_model (LlamaModel), lm_head (None when tied)."""

  TOWER_RELEVANCE = ("cls", "received")   # the relevance signals `visual_tokens` provides (`models.family`)

  def __init__(self, config: LlavaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.vision_tower = clip.CLIPVisionModel(config.vision, dtype=dtype, rngs=rngs)
    self.multi_modal_projector = LlavaMultiModalProjector(config, dtype=dtype, rngs=rngs)
    self.language_model = llama.LlamaModel(config.text, dtype=dtype, rngs=rngs)
    self.lm_head = None if config.tie_word_embeddings else nnx.Linear(
        config.text.hidden_size, config.text.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

  def encode_images(self, pixel_values: jax.Array, *, cls_attention: bool = True, keys: bool = False,
                    cls: bool = False, last_qk: bool = False, received: bool = False) -> VisionOutput:
    """float[I, 3, H, W] (NCHW) -> VisionOutput(features float[I, N, Dv'], cls_attention float32[I, N] | None,
    keys float[I, N, Dh] | None, cls_features float[I, Dv'] | None, cls_keys float[I, Dh] | None,
    received float32[I, N] | None)."""
    return self.vision_tower.features(pixel_values, feature_layers=self.config.vision_feature_layer,
                                      select_strategy=self.config.vision_feature_select_strategy,
                                      cls_attention=cls_attention, keys=keys, cls=cls, last_qk=last_qk,
                                      received=received)

  def project(self, features: jax.Array) -> jax.Array:
    """float[..., Dv'] -> float[..., D] in the language model's embedding space."""
    return self.multi_modal_projector(features)

  def layout(self, image_sizes, num_images: int) -> anyres.PackLayout:
    """Where each image token sits (`anyres.PackLayout`); LLaVA-1.5: one crop of N tokens per image, whatever the
    image size (`image_sizes` is not read and may be None)."""
    del image_sizes
    return single_crop_layout(num_images, self.config.max_image_tokens)

  def visual_tokens(self, pixel_values: jax.Array, layout: anyres.PackLayout | None = None, *,
                    relevance: tuple[str, ...] = (), extras: tuple[str, ...] = ()) -> VisualTokens:
    """The batch's visual tokens and what pruners read about them (`models.family`): float[I, 3, H, W] ->
    `VisualTokens` with one group per image (N = T = the patches; `layout` is not read). relevance: "cls",
    "received" (both of the feature layer; the tower merges no tokens, so "received" is not pooled); extras: "keys",
    "cls_features" (the CLS position's features, and its key with "keys"), "last_qk"."""
    del layout
    family.check_request("LLaVA-1.5", relevance, extras, provides=self.TOWER_RELEVANCE, offers=family.EXTRAS)
    vis = self.encode_images(pixel_values, cls_attention="cls" in relevance, keys="keys" in extras,
                             cls="cls_features" in extras, last_qk="last_qk" in extras,
                             received="received" in relevance)
    embeds = self.project(vis.features)
    i, n = embeds.shape[:2]
    real = jnp.ones((i, n), bool)
    rel = relevance_of(vis)
    per_group = lambda a: None if a is None else a[:, None]
    named = dict(cls_features=per_group(vis.cls_features), cls_keys=per_group(vis.cls_keys),
                 last_query=vis.last_query, last_keys=vis.last_keys)
    return VisualTokens(embeds=embeds, valid=real, structural=~real, group=jnp.zeros((i, n), jnp.int32),
                        source=jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (i, n)), features=vis.features,
                        relevance=rel, keys=vis.keys, group_embeds=embeds[:, None],
                        group_features=vis.features[:, None], group_valid=jnp.ones((i, 1), bool),
                        group_relevance={k: v[:, None] for k, v in rel.items()}, group_keys=per_group(vis.keys),
                        grid=jnp.zeros((i, 2), jnp.int32),
                        extras={k: v for k, v in named.items() if v is not None})

  def positions(self, input_ids: jax.Array, attention_mask: jax.Array, layout: Any = None) -> jax.Array:
    """The prompt's RoPE positions, cumsum(mask) - 1 as transformers' generate: -> int32[1, B, S] (the layout is
    not read: 1-D positions do not depend on the images)."""
    del input_ids, layout
    return llama.position_ids_from_mask(attention_mask)[None]

  def embed(self, input_ids: jax.Array, image_embeds: jax.Array | None = None,
            valid: jax.Array | None = None) -> jax.Array:
    """Token embeddings with image rows merged at the image-token positions: int[B, S] -> float[B, S, D].

    image_embeds: float[I, N, D] (or float[R, D]) rows in order; valid: bool[I, N] real rows, a prefix of each image
    (None: every row is real). The k-th image token of the flattened batch takes the k-th real row.
    """
    x = self.language_model.embed(input_ids)
    if image_embeds is None:
      check_image_tokens(input_ids, 0, self.config.image_token_id)
      return x
    if valid is None:
      return merge_image_features(input_ids, x, image_embeds, self.config.image_token_id)
    return anyres.merge_into_embeddings(x, input_ids == self.config.image_token_id, image_embeds, jnp.asarray(valid))

  def head(self, hidden: jax.Array) -> jax.Array:
    """Final norm + lm_head: float[..., D] (output of the last layer) -> float32[..., V]."""
    return llama.lm_logits(self.language_model, self.lm_head, self.language_model.norm(hidden))

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
               attention_mask: jax.Array | None = None, position_ids: jax.Array | None = None,
               image_sizes: jax.Array | None = None, *, cache: llama.KVCache | None = None, cache_empty: bool = False,
               output_hidden_states: bool = False, all_logits: bool = False) -> LlavaOutput:
    """Full forward (see models/MODELS.md#llava for the pieces).

    Args:
      input_ids: int[B, S] with one image token per visual token (N per image).
      pixel_values: float[I, 3, H, W] or None (text only).
      attention_mask: bool/int[B, S] (left padding); None = all real.
      position_ids: int[B, S]; default cumsum(mask) - 1 (arange without a mask).
      image_sizes: ignored (LLaVA-1.5); accepted for a signature shared with LLaVA-NeXT.
      cache: optional `llama.KVCache` to write the keys/values into (prefill).
      cache_empty: static promise that `cache` holds nothing yet (`llama.LlamaModel.run_layers`).
      output_hidden_states: also return the per-layer hidden states.
      all_logits: logits at every position (float32[B, S, V], transformers' default); otherwise only at each row's
        last real position (float32[B, 1, V], transformers' `logits_to_keep=1` for left padding), so the LM head
        runs on B rows, not B x S.

    Returns:
      LlavaOutput with the logits and the intermediates.

    Raises:
      ValueError: empty input_ids or pixel_values, and (concrete inputs only) token ids outside the vocabulary or
        NaN/inf pixels (see `models.checks`).
    """
    del image_sizes
    checks.check_input_ids(input_ids, self.config.text.vocab_size)
    vis, image_embeds = None, None
    if pixel_values is not None:
      checks.check_pixel_values(pixel_values)
      vis = self.encode_images(pixel_values)
      image_embeds = self.project(vis.features)
    x = self.embed(input_ids, image_embeds)
    if position_ids is None:
      position_ids = llama.default_positions(input_ids.shape, attention_mask)
    dec = decode(self, x, position_ids, attention_mask, cache=cache, cache_empty=cache_empty,
                 output_hidden_states=output_hidden_states, all_logits=all_logits)
    return LlavaOutput(
        logits=dec.logits,
        image_features=None if vis is None else vis.features,
        cls_attention=None if vis is None else vis.cls_attention,
        image_embeds=image_embeds, inputs_embeds=x, hidden_states=dec.hidden_states,
        last_hidden_state=dec.last_hidden_state, cache=dec.cache)


def conversion_table(config: LlavaConfig) -> dict[str, conversion.Rule]:
  """Canonical checkpoint names (transformers-5 module tree) -> state paths of `LlavaForConditionalGeneration`."""
  Rule = conversion.Rule
  t = clip.conversion_table(config.vision, "model.vision_tower.", ("vision_tower",))
  for lin in ("linear_1", "linear_2"):
    t[f"model.multi_modal_projector.{lin}.weight"] = Rule(("multi_modal_projector", lin, "kernel"), "linear")
    if config.multimodal_projector_bias:
      t[f"model.multi_modal_projector.{lin}.bias"] = Rule(("multi_modal_projector", lin, "bias"))
  t.update(llama.conversion_table(config.text, "model.language_model.", ("language_model",)))
  if not config.tie_word_embeddings:
    t["lm_head.weight"] = Rule(("lm_head", "kernel"), "linear")
  return t
