"""LLaVA-NeXT (llava-v1.6: CLIP ViT + MLP projector + anyres crops + LLaMA/Vicuna or Mistral) in Flax NNX, matching
transformers' `LlavaNextForConditionalGeneration`.

Axes: B batch, S sequence, I images (all images of the batch in order), P crops per image (base crop + grid crops,
padded), T vision tokens per crop (CLS dropped), N packed image tokens per image (padded), Dv vision width, D text
width, V vocabulary, L decoder layers.

    model = models.load_pretrained(path, dtype=jnp.bfloat16)
    out = jax.jit(lambda m, b: m(**b))(model, batch)   # batch: LlavaNextProcessor(..., return_tensors="np") outputs
    out.logits                                  # float32[B, 1, V] (all_logits=True: [B, S, V])
    out.packed_embeds, out.layout               # packed: float[I, N, D] + where each token comes from

The forward is LLaVA-1.5's chain (`models.llava`) with two extra steps (`pack_layout`, `pack`). The processor setup,
the seams step by step, packing, the host geometry, padding crops, what is not supported and image preprocessing:
models/MODELS.md#llava_next.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import anyres
from models import checks
from models import conversion
from models import family
from models import llama
from models import llava
from models.family import VisualTokens
from models.outputs import VisionOutput

__all__ = ["LlavaNextConfig", "LlavaNextOutput", "LlavaNextForConditionalGeneration", "pack_layout", "crop_valid",
           "conversion_table"]

_DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(llava.LlavaConfig):
  """LLaVA's config plus the anyres pinpoints ((height, width) pairs, multiples of the vision image size)."""
  image_grid_pinpoints: tuple[tuple[int, int], ...] = _DEFAULT_PINPOINTS

  @classmethod
  def from_hf(cls, hf: dict[str, Any], model_type: str = "llava_next") -> "LlavaNextConfig":
    """From a parsed llava_next config.json; raises ValueError for what the port does not implement."""
    base = llava.LlavaConfig.from_hf(hf, model_type=model_type)
    if base.vision_feature_select_strategy != "default":
      raise ValueError(f"vision_feature_select_strategy={base.vision_feature_select_strategy!r} is not supported by "
                       "LLaVA-NeXT (anyres packing needs the CLS token dropped: 'default')")
    if hf.get("use_image_newline_parameter", True) is not True:
      raise ValueError("use_image_newline_parameter=False is not supported (the port always appends image_newline)")
    merge = hf.get("multimodal_patch_merge_type", "spatial_unpad")
    if merge != "spatial_unpad":
      raise ValueError(f"multimodal_patch_merge_type={merge!r} is not supported (only 'spatial_unpad')")
    raw = hf.get("image_grid_pinpoints") or _DEFAULT_PINPOINTS
    is_pair = lambda p: (isinstance(p, (list, tuple)) and len(p) == 2
                         and all(isinstance(v, int) and not isinstance(v, bool) for v in p))
    if not isinstance(raw, (list, tuple)) or not all(is_pair(p) for p in raw):
      raise ValueError(f"image_grid_pinpoints must be a list of [height, width] integer pairs, got {raw!r}")
    pinpoints = tuple((h, w) for h, w in raw)
    crop = base.vision.image_size
    bad = [p for p in pinpoints if min(p) <= 0 or p[0] % crop or p[1] % crop]
    if bad:
      raise ValueError(f"image_grid_pinpoints {bad} are not positive multiples of the vision image size {crop}")
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(llava.LlavaConfig)}
    return cls(**fields, image_grid_pinpoints=pinpoints)

  @property
  def crop_size(self) -> int:
    return self.vision.image_size

  @property
  def max_num_features(self) -> int:
    """Packed length N that fits every image size (the default padding bucket)."""
    return anyres.max_num_features(self.image_grid_pinpoints, self.vision.image_size, self.vision.patch_size)

  @property
  def max_num_crops(self) -> int:
    return anyres.max_num_crops(self.image_grid_pinpoints, self.vision.image_size)

  @property
  def max_image_tokens(self) -> int:
    return self.max_num_features

  @property
  def token_grid(self) -> tuple[int, int]:
    """The packed tokens (base crop, then the unpadded grid rows with newlines) form no single 2-D grid: one row of
    the packing bucket, so grid methods (pooling) work on 1-D windows of consecutive packed tokens."""
    return (1, self.max_num_features)

  @property
  def max_newlines(self) -> int:
    """The most `image_newline` tokens one image brings: one per feature row of the tallest grid."""
    g = self.vision.image_size // self.vision.patch_size
    return max(h // self.vision.image_size * g for h, _ in self.image_grid_pinpoints)


class LlavaNextOutput(NamedTuple):
  """Everything a LLaVA-NeXT forward computes (None where not computed).

  logits: float32[B, S, V].
  image_features: float[I, P, T, Dv] vision features per crop (feature layer, CLS dropped), fed to the projector.
  cls_attention: float32[I, P, T] CLS-to-patch attention per crop (mean over heads, softmax over T + 1 keys).
  image_embeds: float[I, P, T, D] projector output per crop.
  crop_valid: bool[I, P] real crops (False for the processor's padding crops).
  packed_embeds: float[I, N, D] per-image packed tokens (base crop, unpadded grid + image_newline); zero padding.
  packed_features: float[I, N, Dv] `image_features` in packed order (zeros at newline and padding slots).
  packed_cls_attention: float32[I, N] `cls_attention` in packed order (zeros at newline and padding slots).
  layout: `anyres.PackLayout` as arrays: source/crop int32[I, N], newline/valid bool[I, N], counts int32[I],
    grid int32[I, 2].
  inputs_embeds: float[B, S, D] decoder input (text embeddings with the packed image tokens merged in).
  hidden_states: float[L + 1, B, S, D] when asked (see `models.outputs.LlavaOutput`).
  last_hidden_state: float[B, S, D] after the final norm.
  cache: `models.llama.KVCache` when the call was given one.
  """
  logits: jax.Array
  image_features: jax.Array | None = None
  cls_attention: jax.Array | None = None
  image_embeds: jax.Array | None = None
  crop_valid: jax.Array | None = None
  packed_embeds: jax.Array | None = None
  packed_features: jax.Array | None = None
  packed_cls_attention: jax.Array | None = None
  layout: anyres.PackLayout | None = None
  inputs_embeds: jax.Array | None = None
  hidden_states: jax.Array | None = None
  last_hidden_state: jax.Array | None = None
  cache: Any = None


class LlavaNextForConditionalGeneration(llava.LlavaForConditionalGeneration):
  """LLaVA's vision_tower, multi_modal_projector, language_model, lm_head, plus `image_newline` float[D]."""

  def __init__(self, config: LlavaNextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    if not isinstance(config, LlavaNextConfig):
      raise ValueError(f"expected a LlavaNextConfig, got {type(config).__name__}")
    super().__init__(config, dtype=dtype, rngs=rngs)
    d = config.text.hidden_size
    self.image_newline = nnx.Param(jax.random.normal(rngs.params(), (d,), dtype) * d ** -0.5)

  def pack_layout(self, image_sizes, num_tokens: int | None = None) -> anyres.PackLayout:
    """Host-side packing layout (numpy) for int[I, 2] original (height, width) sizes; N defaults to the bucket."""
    return pack_layout(self.config, image_sizes, num_tokens)

  def layout(self, image_sizes, num_images: int) -> anyres.PackLayout:
    """The layout for concrete (numpy result) or traced image sizes (arrays, computed on the host through
    pure_callback): int[I, 2] (height, width) per image."""
    if image_sizes is None:
      raise ValueError("LLaVA-NeXT needs image_sizes (or a precomputed layout)")
    if np.shape(image_sizes) != (num_images, 2):
      raise ValueError(f"image_sizes must be int[I={num_images}, 2] (height, width per image), got shape "
                       f"{np.shape(image_sizes)}")
    config = self.config
    if not isinstance(image_sizes, jax.core.Tracer):
      return pack_layout(config, image_sizes)
    n = config.max_num_features
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    shapes = anyres.PackLayout(
        source=spec((num_images, n), jnp.int32), crop=spec((num_images, n), jnp.int32),
        newline=spec((num_images, n), jnp.bool_), valid=spec((num_images, n), jnp.bool_),
        counts=spec((num_images,), jnp.int32), grid=spec((num_images, 2), jnp.int32))
    return jax.pure_callback(lambda sizes: pack_layout(config, sizes), shapes, image_sizes)

  def encode_images(self, pixel_values: jax.Array, *, cls_attention: bool = True, keys: bool = False,
                    cls: bool = False, received: bool = False) -> VisionOutput:
    """float[I, P, 3, H, W] crops -> VisionOutput(features float[I, P, T, Dv], cls_attention float32[I, P, T] | None,
    keys float[I, P, T, Dh] | None, cls_features float[I, P, Dv] | None, cls_keys float[I, P, Dh] | None,
    received float32[I, P, T] | None)."""
    if pixel_values.ndim != 5:
      raise ValueError(f"pixel_values must be float[I, P, 3, H, W] (crops per image, as LlavaNextImageProcessor "
                       f"returns them), got shape {pixel_values.shape}")
    i, p = pixel_values.shape[:2]
    vis = super().encode_images(pixel_values.reshape(i * p, *pixel_values.shape[2:]), cls_attention=cls_attention,
                                keys=keys, cls=cls, received=received)
    per_crop = lambda a: None if a is None else a.reshape(i, p, *a.shape[1:])
    return VisionOutput(*(per_crop(a) for a in vis))

  def visual_tokens(self, pixel_values: jax.Array, layout: anyres.PackLayout | None = None, *,
                    relevance: tuple[str, ...] = (), extras: tuple[str, ...] = ()) -> VisualTokens:
    """The batch's visual tokens in packed order (`models.family`): float[I, P, 3, H, W] crops + `layout` ->
    `VisualTokens`, one group per crop, the newlines structural. relevance: "cls", "received" (per crop, each
    crop's own tower pass, then packed); extras: "keys", "cls_features" (each crop's CLS features, and its key with
    "keys")."""
    if layout is None:
      raise ValueError("LLaVA-NeXT visual tokens need the packing layout (model.layout(image_sizes, num_images))")
    family.check_request("LLaVA-NeXT", relevance, extras, provides=self.TOWER_RELEVANCE,
                         offers=("keys", "cls_features"))
    layout = anyres.PackLayout(*(jnp.asarray(a) for a in layout))
    vis = self.encode_images(pixel_values, cls_attention="cls" in relevance, keys="keys" in extras,
                             cls="cls_features" in extras, received="received" in relevance)
    img = self.project(vis.features)
    pack = lambda a: self.pack(a, layout, jnp.zeros(a.shape[-1:], a.dtype))
    group_rel = llava.relevance_of(vis)
    named = dict(cls_features=vis.cls_features, cls_keys=vis.cls_keys)
    return VisualTokens(embeds=self.pack(img, layout), valid=layout.valid, structural=layout.newline,
                        group=layout.crop, source=layout.source, features=pack(vis.features),
                        relevance={k: pack(v[..., None])[..., 0] for k, v in group_rel.items()},
                        keys=None if vis.keys is None else pack(vis.keys), group_embeds=img,
                        group_features=vis.features, group_valid=crop_valid(layout, img.shape[1]),
                        group_relevance=group_rel, group_keys=vis.keys, grid=layout.grid,
                        extras={k: v for k, v in named.items() if v is not None})

  def pack(self, per_crop: jax.Array, layout: anyres.PackLayout, newline: jax.Array | None = None) -> jax.Array:
    """float[I, P, T, X] per-crop rows -> float[I, N, X] packed rows; newline slots take `newline` (default the
    learned `image_newline`, which needs X = D)."""
    if newline is None:
      newline = self.image_newline[...]
    return anyres.pack_features(per_crop, jnp.asarray(layout.source), jnp.asarray(layout.newline),
                                jnp.asarray(layout.valid), newline)

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
               attention_mask: jax.Array | None = None, position_ids: jax.Array | None = None,
               image_sizes: jax.Array | None = None, *, layout: anyres.PackLayout | None = None,
               cache: llama.KVCache | None = None, cache_empty: bool = False, output_hidden_states: bool = False,
               all_logits: bool = False) -> LlavaNextOutput:
    """Full forward.

    Args:
      input_ids: int[B, S] with `layout.counts[i]` image tokens for image i (as the processor expands them).
      pixel_values: float[I, P, 3, H, W] crops (processor output) or None (text only).
      attention_mask: bool/int[B, S]; None = all real.
      position_ids: int[B, S]; default cumsum(mask) - 1 (arange without a mask), as `models.llava`.
      image_sizes: int[I, 2] original (height, width) per image; concrete or traced (see models/MODELS.md#llava_next).
      layout: precomputed `pack_layout(image_sizes)` (arrays); when given, `image_sizes` is not read.
      cache: optional `llama.KVCache` to write the keys/values into (prefill).
      cache_empty: static promise that `cache` holds nothing yet (`llama.LlamaModel.run_layers`).
      output_hidden_states: also return the per-layer hidden states.
      all_logits: logits at every position float32[B, S, V]; otherwise at each row's last real one, float32[B, 1, V].

    Returns:
      LlavaNextOutput with the logits and the intermediates.

    Raises:
      ValueError: as `models.llava.LlavaForConditionalGeneration.__call__`, plus layout and crop-shape errors.
    """
    checks.check_input_ids(input_ids, self.config.text.vocab_size)
    out = {}
    if pixel_values is not None:
      if pixel_values.ndim != 5:
        raise ValueError(f"pixel_values must be float[I, P, 3, H, W] (crops per image, as LlavaNextImageProcessor "
                         f"returns them), got shape {pixel_values.shape}")
      checks.check_pixel_values(pixel_values)
      num_images, num_crops = pixel_values.shape[:2]
      if layout is None:
        if image_sizes is None:
          raise ValueError("LLaVA-NeXT needs image_sizes (or a precomputed layout) with pixel_values")
        layout = self.layout(image_sizes, num_images)
      layout = anyres.PackLayout(*(jnp.asarray(a) for a in layout))
      if not isinstance(layout.counts, jax.core.Tracer):     # fail before running the tower
        llava.check_image_tokens(input_ids, int(np.sum(layout.counts)), self.config.image_token_id)
      vis = self.encode_images(pixel_values)
      img = self.project(vis.features)
      packed = self.pack(img, layout)
      out.update(
          image_features=vis.features, cls_attention=vis.cls_attention, image_embeds=img,
          crop_valid=crop_valid(layout, num_crops), packed_embeds=packed,
          packed_features=self.pack(vis.features, layout, jnp.zeros(vis.features.shape[-1:], vis.features.dtype)),
          packed_cls_attention=self.pack(vis.cls_attention[..., None], layout, jnp.zeros((1,), jnp.float32))[..., 0],
          layout=layout)
      x = self.embed(input_ids, packed, layout.valid)
    else:
      x = self.embed(input_ids)
    if position_ids is None:
      position_ids = llama.default_positions(input_ids.shape, attention_mask)
    dec = llava.decode(self, x, position_ids, attention_mask, cache=cache, cache_empty=cache_empty,
                       output_hidden_states=output_hidden_states, all_logits=all_logits)
    return LlavaNextOutput(logits=dec.logits, inputs_embeds=x, hidden_states=dec.hidden_states,
                           last_hidden_state=dec.last_hidden_state, cache=dec.cache, **out)


def crop_valid(layout: anyres.PackLayout, num_crops: int) -> jax.Array:
  """Real crops of each image: the base crop and its rows x cols grid crops -> bool[I, P]."""
  grid = jnp.asarray(layout.grid)
  return jnp.arange(num_crops)[None, :] < 1 + grid[:, :1] * grid[:, 1:]


def pack_layout(config: LlavaNextConfig, image_sizes, num_tokens: int | None = None) -> anyres.PackLayout:
  """`anyres.pack_layout` with the config's pinpoints, crop and patch sizes; N defaults to `config.max_num_features`."""
  return anyres.pack_layout(np.asarray(image_sizes), config.image_grid_pinpoints, config.vision.image_size,
                            config.vision.patch_size, num_tokens or config.max_num_features)


def conversion_table(config: LlavaNextConfig) -> dict[str, conversion.Rule]:
  """LLaVA's table (canonical transformers-5 names) plus `model.image_newline`."""
  table = llava.conversion_table(config)
  table["model.image_newline"] = conversion.Rule(("image_newline",))
  return table
