"""Qwen2.5-VL (window-attention ViT + PatchMerger + Qwen2 decoder with M-RoPE) in Flax NNX, matching transformers'
`Qwen2_5_VLForConditionalGeneration`.

Axes (`models` legend): B batch, S sequence, R = 3 position components (t, h, w), I images, Np patches of the batch
(the processor's rows), M = Np / 4 merged tokens (the image tokens of the prompt, image after image), D text width,
V vocabulary.

    model = models.load_pretrained("/ckpt/Qwen2.5-VL-7B-Instruct", dtype=jnp.bfloat16)
    batch = processor(images=..., text=..., return_tensors="np")      # input_ids, attention_mask, pixel_values,
    out = jax.jit(lambda m, b: m(**b))(model, batch)                  # image_grid_thw (mm_token_type_ids)
    out.logits, out.position_ids, out.rope_deltas                    # float32[B, 1, V], int32[3, B, S], int32[B]

The vision tower is `models.qwen2_5_vl_vision`, the decoder `models.qwen2` (LLaMA with q/k/v bias and M-RoPE). Position
ids follow transformers' `get_rope_index` (`rope_index`): text tokens count on all three components; an image's
merged tokens take t = start (+ frame x tokens_per_second x second_per_grid_t for videos), h = start + row,
w = start + col; the text after it continues at start + max(rows, cols). Decoding continues at the prompt's largest id
+ 1 (`rope_deltas` = that id + 1 - the prompt's real length, what `models.generate.prefill` adds).

Checkpoint names: the hub files' `visual.*`, `model.{embed_tokens,layers,norm}.*`, `lm_head.weight` and transformers
5's `model.visual.*`, `model.language_model.*` both load (`LEGACY_PREFIXES`: the family's own renames, which would
clash with LLaMA's canonical `model.layers.*`).
"""

import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import anyres
from models import checks
from models import config_fields
from models import conversion
from models import family
from models import llama
from models import llava
from models import qwen2
from models import qwen2_5_vl_vision as vision_lib
from models.family import VisualTokens

__all__ = ["Qwen2_5_VLConfig", "Qwen2_5_VLOutput", "Qwen2_5_VLForConditionalGeneration", "QwenLayout",
           "image_layout", "pad_patches", "rope_index", "conversion_table", "LEGACY_PREFIXES"]

LEGACY_PREFIXES = (
    ("visual.", "model.visual."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
)
# The seam's nominal tokens per image (the papers' N: 36 x 36 merged tokens, a square image under VLMEvalKit's
# min_pixels 1280 x 28 x 28) and the most one image brings under its max_pixels 16384 x 28 x 28.
NOMINAL_TOKENS = 1296
MAX_IMAGE_TOKENS = 16384
# Top-level fields of transformers' Qwen2_5_VLConfig with their defaults.
_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
               vision_end_token_id=151653)


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
  vision: vision_lib.VisionConfig = dataclasses.field(default_factory=vision_lib.VisionConfig)
  text: qwen2.Qwen2TextConfig = dataclasses.field(default_factory=lambda: qwen2.Qwen2TextConfig.from_hf({}))
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  tie_word_embeddings: bool = False

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "Qwen2_5_VLConfig":
    """From a parsed config.json: transformers 5's nested `text_config`, or the hub's legacy flat file (text fields
    at the top level, `vision_config.model_type` "qwen2_5_vl"). Raises ValueError for every field the port does not
    implement."""
    if hf.get("model_type") != "qwen2_5_vl":
      raise ValueError(f"expected model_type 'qwen2_5_vl', got {hf.get('model_type')!r}")
    for name in ("vision_config", "text_config"):
      if hf.get(name) is not None and not isinstance(hf[name], dict):
        raise ValueError(f"{name} must be a JSON object, got {hf[name]!r}")
    vision = vision_lib.VisionConfig.from_hf(hf.get("vision_config") or {})
    # transformers reads the text fields from the top level only when there is no text_config.
    nested = hf.get("text_config") is not None
    text = qwen2.Qwen2TextConfig.from_hf(hf["text_config"] if nested else hf, "text_config." if nested else "")
    tie = hf.get("tie_word_embeddings", False)
    config_fields.check_field(tie, bool, "tie_word_embeddings")
    tie = tie or text.tie_word_embeddings     # pre-v5 saves put it in text_config; transformers lifts it
    text = dataclasses.replace(text, tie_word_embeddings=tie)
    tokens = {}
    for name, default in _TOKENS.items():
      value = hf.get(name, default)
      config_fields.check_field(value, int, name)
      if not 0 <= value < text.vocab_size:
        raise ValueError(f"{name}={value} is outside the vocabulary (vocab_size={text.vocab_size})")
      tokens[name] = value
    if vision.out_hidden_size != text.hidden_size:
      raise ValueError(f"vision_config.out_hidden_size={vision.out_hidden_size} differs from the text hidden_size="
                       f"{text.hidden_size}: the merged tokens would not fit the decoder")
    return cls(vision=vision, text=text, tie_word_embeddings=tie, **tokens)

  @property
  def merge_size(self) -> int:
    return self.vision.spatial_merge_size

  # The seam's static bounds (`models.family`). An image's token count is the processor's (min_pixels / max_pixels
  # are not in config.json): the bounds are the evaluation protocol's.
  @property
  def max_image_tokens(self) -> int:
    """The most merged tokens one image brings: VLMEvalKit's max_pixels 16384 x 28 x 28 (BACKBONES.md 2a)."""
    return MAX_IMAGE_TOKENS

  @property
  def max_newlines(self) -> int:
    return 0

  @property
  def max_num_crops(self) -> int:
    return 1

  @property
  def token_grid(self) -> tuple[int, int]:
    """Images have their own merged grids (the layout's `thw`): one row of the bucket, as LLaVA-NeXT's packing."""
    return (1, self.max_image_tokens)


class Qwen2_5_VLOutput(NamedTuple):
  """logits float32[B, 1, V] (all_logits: [B, S, V]); image_embeds float[M, D] the merger's rows in prompt order;
  received float32[M] | None; inputs_embeds float[B, S, D]; position_ids int32[3, B, S]; rope_deltas int32[B] (the
  decoding offset, None when position ids were given); hidden_states float[L + 1, B, S, D] when asked;
  last_hidden_state float[B, S, D] after the final norm; cache when one was given."""
  logits: jax.Array
  image_embeds: jax.Array | None = None
  received: jax.Array | None = None
  inputs_embeds: jax.Array | None = None
  position_ids: jax.Array | None = None
  rope_deltas: jax.Array | None = None
  hidden_states: jax.Array | None = None
  last_hidden_state: jax.Array | None = None
  cache: Any = None


class QwenLayout(NamedTuple):
  """Where each visual token sits (the seam's layout, `models.family`): the `models.anyres.PackLayout` fields, one
  group per image (P = 1, T = N: an image's merged tokens in raster order, padded to N), plus what the tower and the
  position ids need.

  source / crop / newline / valid / counts / grid: as `PackLayout` (crop 0 at every real slot; no newlines; grid
    (0, 0): no grid groups).
  thw: int32[I, 3] the images' (t, h, w) patch grids (`image_grid_thw`), for the M-RoPE ids.
  vision: the tower's `VisionLayout` over the batch's Np patches.
  slot: int32[M] the slot (< N) of each merged token (raster order, image after image) in its image's row.
    (0 at block padding, whose `vision.token_image` is I).
  """
  source: Any
  crop: Any
  newline: Any
  valid: Any
  counts: Any
  grid: Any
  thw: Any
  vision: vision_lib.VisionLayout
  slot: Any


def image_layout(config: Qwen2_5_VLConfig, grid_thw, num_patches: int, num_tokens: int | None = None,
                 block: int | None = None) -> QwenLayout:
  """The layout for concrete grids int[I, 3] (numpy, host); N defaults to the most merged tokens of an image.
  block: pixel rows in per-image blocks (`pad_patches`; `vision_lib.vision_layout`)."""
  grid = np.asarray(grid_thw).astype(np.int64).reshape(-1, 3)
  vision = vision_lib.vision_layout(config.vision, grid, num_patches, block)
  unit = config.vision.merge_unit
  counts = (np.prod(grid, axis=1) // unit).astype(np.int32)
  n = int(counts.max()) if num_tokens is None else int(num_tokens)
  if n < counts.max():
    raise ValueError(f"num_tokens={n} is smaller than the {int(counts.max())} merged tokens of an image")
  slots = np.arange(n)[None, :]
  valid = slots < counts[:, None]
  source = np.where(valid, slots, -1).astype(np.int32)
  room = counts if block is None else np.full_like(counts, block // unit)     # merged rows of each image's block
  slot = np.concatenate([np.where(np.arange(r) < c, np.arange(r), 0) for c, r in zip(counts, room)]).astype(np.int32)
  return QwenLayout(source=source, crop=np.where(valid, 0, -1).astype(np.int32), newline=np.zeros_like(valid),
                    valid=valid, counts=counts, grid=np.zeros((len(counts), 2), np.int32), thw=grid.astype(np.int32),
                    vision=vision, slot=slot)


def pad_patches(pixel_values: np.ndarray, grid_thw, block: int) -> np.ndarray:
  """The processor's rows float[Np, E] (images back to back) -> float[I, block, E]: each image's patches, then zeros
  up to `block` (host numpy). The tower reads them with `layout(..., block=block)`; the padding is isolated
  (`vision_lib.vision_layout`), so a larger block changes no image's output beyond float rounding."""
  sizes = np.prod(np.asarray(grid_thw).reshape(-1, 3), axis=1)
  if int(sizes.sum()) != len(pixel_values):
    raise ValueError(f"image_grid_thw describes {int(sizes.sum())} patches, pixel_values holds {len(pixel_values)}")
  if (sizes > block).any():
    raise ValueError(f"block={block} is smaller than an image's {int(sizes.max())} patches")
  out = np.zeros((len(sizes), block, pixel_values.shape[-1]), pixel_values.dtype)
  for i, (start, size) in enumerate(zip(np.cumsum(sizes) - sizes, sizes)):
    out[i, :size] = pixel_values[start:start + size]
  return out


def _layout_shapes(config: Qwen2_5_VLConfig, num_images: int, num_patches: int, n: int) -> QwenLayout:
  s = jax.ShapeDtypeStruct
  per_image = lambda dtype: s((num_images, n), dtype)
  return QwenLayout(source=per_image(jnp.int32), crop=per_image(jnp.int32), newline=per_image(jnp.bool_),
                    valid=per_image(jnp.bool_), counts=s((num_images,), jnp.int32), grid=s((num_images, 2), jnp.int32),
                    thw=s((num_images, 3), jnp.int32), vision=vision_lib.layout_shapes(config.vision, num_patches),
                    slot=s((num_patches // config.vision.merge_unit,), jnp.int32))


def rope_index(config: Qwen2_5_VLConfig, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               image_grid_thw: jax.Array | None = None, video_grid_thw: jax.Array | None = None,
               second_per_grid_ts: jax.Array | None = None,
               mm_token_type_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """transformers' `get_rope_index`, vectorised (jit-safe; grids may be traced).

  Args:
    input_ids: int[B, S]; attention_mask: bool/int[B, S] | None (padding gets position 0 and is skipped).
    image_grid_thw: int[I, 3]; video_grid_thw: int[Iv, 3]: (t, h, w) in patches, consumed in row-major prompt
      order over the batch. second_per_grid_ts: float[Iv] (default 1 each).
    mm_token_type_ids: int[B, S] 0 text / 1 image / 2 video (the processor's); default from the image / video ids.

  Returns:
    (position_ids int32[3, B, S], rope_deltas int32[B]: the largest id + 1 - the row's real length).
  """
  chex.assert_rank(input_ids, 2)
  b, s = input_ids.shape
  mask = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  if mm_token_type_ids is None:
    types = jnp.where(input_ids == config.image_token_id, 1, jnp.where(input_ids == config.video_token_id, 2, 0))
  else:
    types = jnp.asarray(mm_token_type_ids)
  types = types.astype(jnp.int32)
  # Real tokens first, in order (transformers drops the masked ones before grouping).
  order = jnp.argsort(~mask, axis=1, stable=True)
  count = jnp.sum(mask, axis=1)
  slots = jnp.arange(s)
  real = slots[None, :] < count[:, None]
  kind = jnp.where(real, jnp.take_along_axis(types, order, axis=1), -1)
  before = jnp.pad(kind, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  after = jnp.pad(kind, ((0, 0), (0, 1)), constant_values=-1)[:, 1:]
  visual = kind > 0
  run_start, run_end = visual & (kind != before), visual & (kind != after)

  def grids(modality, grid):
    """Each token's run's grid int[B, S, 3] and run index int[B, S] among this modality's runs of the batch."""
    index = jnp.cumsum((run_start & (kind == modality)).reshape(-1)).reshape(b, s) - 1
    if grid is None:
      return jnp.ones((b, s, 3), jnp.int32), index
    grid = jnp.asarray(grid).astype(jnp.int32).reshape(-1, 3)
    return grid[jnp.clip(index, 0, grid.shape[0] - 1)], index

  image_grid, _ = grids(1, image_grid_thw)
  video_grid, video_index = grids(2, video_grid_thw)
  grid = jnp.where((kind == 2)[..., None], video_grid, image_grid)
  m = config.merge_size
  gh, gw = grid[..., 1] // m, grid[..., 2] // m
  first = jax.lax.cummax(jnp.where(run_start, slots[None, :], -1), axis=1)
  k = slots[None, :] - first                                # index inside the run
  advance = jnp.where(visual, jnp.where(run_end, jnp.maximum(gh, gw), 0), real.astype(jnp.int32))
  start = jnp.cumsum(advance, axis=1) - advance
  if second_per_grid_ts is None:
    interval = jnp.full((b, s), float(config.vision.tokens_per_second), jnp.float32)
  else:
    seconds = jnp.asarray(second_per_grid_ts, jnp.float32).reshape(-1)
    interval = jnp.float32(config.vision.tokens_per_second) * seconds[jnp.clip(video_index, 0, seconds.shape[0] - 1)]
  interval = jnp.where(kind == 2, interval, 1.0)
  frame = k // jnp.maximum(gh * gw, 1)
  t = start + (frame.astype(jnp.float32) * interval).astype(jnp.int32)
  h = start + (k // jnp.maximum(gw, 1)) % jnp.maximum(gh, 1)
  w = start + k % jnp.maximum(gw, 1)
  compact = jnp.where(visual[None], jnp.stack([t, h, w]), start[None])
  compact = jnp.where(real[None], compact, 0).astype(jnp.int32)
  deltas = jnp.max(jnp.where(real, jnp.max(compact, axis=0), -1), axis=1) + 1 - count
  back = jnp.argsort(order, axis=1)
  positions = jnp.take_along_axis(compact, jnp.broadcast_to(back[None], (3, b, s)), axis=2)
  return positions.astype(jnp.int32), deltas.astype(jnp.int32)


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
  """visual (`models.qwen2_5_vl_vision.VisionTransformer`), language_model (`models.qwen2.Qwen2Model`), lm_head
  (absent when tied)."""

  KEEPS_POSITIONS = True      # M-RoPE: pruning gathers the kept tokens' own ids (`models.family`)
  TOWER_RELEVANCE = ("received",)   # no CLS token: the attention each merged token receives (`visual_tokens`)
  STATIC_TOKEN_GRID = False   # each image's merged grid is its own (`config.token_grid` is only a row bound)

  def __init__(self, config: Qwen2_5_VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    if not isinstance(config, Qwen2_5_VLConfig):
      raise ValueError(f"expected a Qwen2_5_VLConfig, got {type(config).__name__}")
    self.config = config
    self.visual = vision_lib.VisionTransformer(config.vision, dtype=dtype, rngs=rngs)
    self.language_model = qwen2.Qwen2Model(config.text, dtype=dtype, rngs=rngs)
    self.lm_head = None if config.tie_word_embeddings else nnx.Linear(
        config.text.hidden_size, config.text.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

  def vision_layout(self, grid_thw, num_patches: int) -> vision_lib.VisionLayout:
    """The tower's layout for int[I, 3] grids, concrete (numpy) or traced (computed on the host through
    pure_callback; the shapes come from `num_patches`)."""
    config = self.config.vision
    if grid_thw is None:
      raise ValueError("Qwen2.5-VL needs image_grid_thw (int[I, 3]) with pixel_values")
    if np.ndim(grid_thw) != 2 or np.shape(grid_thw)[1] != 3:
      raise ValueError(f"image_grid_thw must be int[I, 3] (t, h, w per image), got shape {np.shape(grid_thw)}")
    if not isinstance(grid_thw, jax.core.Tracer):
      return vision_lib.vision_layout(config, np.asarray(grid_thw), num_patches)
    return jax.pure_callback(lambda g: vision_lib.vision_layout(config, g, num_patches),
                             vision_lib.layout_shapes(config, num_patches), grid_thw)

  def encode_images(self, pixel_values: jax.Array, image_grid_thw: jax.Array, *,
                    layout: vision_lib.VisionLayout | None = None,
                    received: bool = False) -> vision_lib.VisionTowerOutput:
    """float[Np, E] patches + int[I, 3] grids -> the tower's output (merged tokens float[M, D] in prompt order)."""
    checks.check_pixel_values(pixel_values)
    if layout is None:
      layout = self.vision_layout(image_grid_thw, pixel_values.shape[0])
    return self.visual(pixel_values, layout, received=received)

  def layout(self, image_grid_thw, num_images: int, num_patches: int | None = None,
             num_tokens: int | None = None, block: int | None = None) -> QwenLayout:
    """The seam's layout (`QwenLayout`) of int[I, 3] image grids: concrete (numpy; N the most tokens of an image
    unless `num_tokens`) or traced (through pure_callback; N = `num_tokens`, default every merged token of the
    batch). num_patches: Np of pixel_values (default: the grids' sum, or I x block, concrete grids only). block: the
    pixel rows come in per-image blocks of `block` patches (`pad_patches`: a bucket; pixel_values
    float[I, block, E])."""
    if image_grid_thw is None:
      raise ValueError("Qwen2.5-VL needs image_grid_thw (int[I, 3]) for its layout")
    if np.shape(image_grid_thw) != (num_images, 3):
      raise ValueError(f"image_grid_thw must be int[I={num_images}, 3] (t, h, w per image), got shape "
                       f"{np.shape(image_grid_thw)}")
    config = self.config
    if num_patches is None and block is not None:
      num_patches = num_images * int(block)
    if not isinstance(image_grid_thw, jax.core.Tracer):
      grid = np.asarray(image_grid_thw)
      return image_layout(config, grid, int(np.prod(grid, 1).sum()) if num_patches is None else num_patches,
                          num_tokens, block)
    if num_patches is None:
      raise ValueError("traced image_grid_thw: pass num_patches (pixel_values.shape[0])")
    n = num_patches // config.vision.merge_unit if num_tokens is None else num_tokens
    return jax.pure_callback(lambda g: image_layout(config, g, num_patches, n, block),
                             _layout_shapes(config, num_images, num_patches, n), image_grid_thw)

  def visual_tokens(self, pixel_values: jax.Array, layout: QwenLayout, *, relevance: tuple[str, ...] = (),
                    extras: tuple[str, ...] = ()) -> VisualTokens:
    """The batch's visual tokens (`models.family`): float[Np, E] patches (or float[I, block, E], per-image blocks
    read with a layout of that `block`) + `layout` -> `VisualTokens`, one group per image, the merged tokens in raster
    order. features float[I, N, 4 Dv]: the merger's input (a merged token's 4
    patches of the last block, concatenated; `project` maps them to the embeddings). relevance "received": the
    attention each merged token receives in the last full-attention block (mean over heads and its frame's
    queries, averaged over its 4 patches). extras "keys": that block's keys, mean over heads and the 4 patches."""
    if layout is None:
      raise ValueError("Qwen2.5-VL visual tokens need the layout (model.layout(image_grid_thw, num_images))")
    family.check_request("Qwen2.5-VL", relevance, extras, provides=self.TOWER_RELEVANCE, offers=("keys",))
    layout = jax.tree.map(jnp.asarray, layout)
    checks.check_pixel_values(pixel_values)
    if pixel_values.ndim == 3:       # per-image blocks (`pad_patches`): the layout places them
      pixel_values = pixel_values.reshape(-1, pixel_values.shape[-1])
    vis = self.visual(pixel_values, layout.vision, received="received" in relevance, keys="keys" in extras)
    c = self.config.vision
    unit = c.merge_unit
    features = vis.hidden.reshape(-1, unit * c.hidden_size)                          # window order
    features = jnp.zeros_like(features).at[layout.vision.window_index].set(features)  # raster order
    image, slot = layout.vision.token_image, layout.slot
    i, n = layout.valid.shape

    def per_image(rows, fill=0.0):      # padding rows (image I) are dropped
      return jnp.full((i, n) + rows.shape[1:], fill, rows.dtype).at[image, slot].set(rows, mode="drop")

    embeds, feats = per_image(vis.merged), per_image(features)
    valid = layout.valid
    rel = {} if vis.received is None else {"received": per_image(vis.received)}
    keys = None if vis.keys is None else per_image(vis.keys)
    return VisualTokens(embeds=embeds, valid=valid, structural=layout.newline, group=layout.crop,
                        source=layout.source, features=feats, relevance=rel, keys=keys, group_embeds=embeds[:, None],
                        group_features=feats[:, None], group_valid=jnp.ones((i, 1), bool),
                        group_relevance={k: v[:, None] for k, v in rel.items()},
                        group_keys=None if keys is None else keys[:, None], grid=layout.grid, extras={})

  def project(self, features: jax.Array) -> jax.Array:
    """The merger on merged features: float[..., 4 Dv] (a merged token's 4 patches concatenated) -> float[..., D]."""
    lead = features.shape[:-1]
    return self.visual.merger(features.reshape(-1, self.config.vision.hidden_size)).reshape(*lead, -1)

  def embed(self, input_ids: jax.Array, image_embeds: jax.Array | None = None,
            valid: jax.Array | None = None) -> jax.Array:
    """Token embeddings with image rows merged at the image-token positions: int[B, S] -> float[B, S, D].
    image_embeds: float[M, D] or float[I, N, D] rows in order; valid: bool[I, N] real rows (a prefix of each
    image; None: every row is real). The k-th image token of the flattened batch takes the k-th real row."""
    x = self.language_model.embed(input_ids)
    if image_embeds is None:
      llava.check_image_tokens(input_ids, 0, self.config.image_token_id)
      return x
    if valid is None:
      return llava.merge_image_features(input_ids, x, image_embeds, self.config.image_token_id)
    return anyres.merge_into_embeddings(x, input_ids == self.config.image_token_id, image_embeds, jnp.asarray(valid))

  def positions(self, input_ids: jax.Array, attention_mask: jax.Array | None, layout: QwenLayout | None = None,
                **videos) -> jax.Array:
    """M-RoPE position ids int32[3, B, S] of a prompt (`rope_index`), the image grids from `layout.thw` (a prompt
    without images needs none). videos: video_grid_thw, second_per_grid_ts, mm_token_type_ids."""
    grid = None if layout is None else layout.thw
    return rope_index(self.config, input_ids, attention_mask, grid, **videos)[0]

  def head(self, hidden: jax.Array) -> jax.Array:
    """Final norm + lm_head (or the tied embedding): float[..., D] -> float32[..., V]."""
    return llama.lm_logits(self.language_model, self.lm_head, self.language_model.norm(hidden))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               pixel_values: jax.Array | None = None, image_grid_thw: jax.Array | None = None,
               position_ids: jax.Array | None = None, mm_token_type_ids: jax.Array | None = None,
               pixel_values_videos: jax.Array | None = None, video_grid_thw: jax.Array | None = None,
               second_per_grid_ts: jax.Array | None = None, *, cache: llama.KVCache | None = None,
               cache_empty: bool = False, output_hidden_states: bool = False, all_logits: bool = False,
               received: bool = False) -> Qwen2_5_VLOutput:
    """Full forward (the processor's names).

    Args:
      input_ids: int[B, S] with M image tokens (the processor expands each image to t x h x w / 4).
      attention_mask: bool/int[B, S]; None = all real.
      pixel_values: float[Np, E] the processor's patches, or None (text only); image_grid_thw: int[I, 3].
      position_ids: int[3, B, S] (or int[B, S]); default `rope_index` of the prompt.
      mm_token_type_ids: int[B, S] (the processor's); default from the image / video token ids.
      pixel_values_videos, video_grid_thw, second_per_grid_ts: videos, encoded like images (frames of 2 patches).
      cache, cache_empty: as `models.llama.LlamaModel.run_layers`.
      output_hidden_states: also return the per-layer hidden states.
      all_logits: logits at every position float32[B, S, V]; otherwise at each row's last real one.
      received: also return the tower's received-attention relevance (`VisionTowerOutput.received`).
    """
    checks.check_input_ids(input_ids, self.config.text.vocab_size)
    x = self.language_model.embed(input_ids)
    image_embeds = relevance = None
    if pixel_values is not None:
      vis = self.encode_images(pixel_values, image_grid_thw, received=received)
      image_embeds, relevance = vis.merged, vis.received
      x = llava.merge_image_features(input_ids, x, image_embeds, self.config.image_token_id)
    if pixel_values_videos is not None:
      video = self.encode_images(pixel_values_videos, video_grid_thw).merged
      x = llava.merge_image_features(input_ids, x, video, self.config.video_token_id)
    deltas = None
    if position_ids is None:
      position_ids, deltas = rope_index(self.config, input_ids, attention_mask, image_grid_thw, video_grid_thw,
                                        second_per_grid_ts, mm_token_type_ids)
    dec = llava.decode(self, x, position_ids, attention_mask, cache=cache, cache_empty=cache_empty,
                       output_hidden_states=output_hidden_states, all_logits=all_logits)
    return Qwen2_5_VLOutput(logits=dec.logits, image_embeds=image_embeds, received=relevance, inputs_embeds=x,
                            position_ids=qwen2.mrope_positions(position_ids, *input_ids.shape), rope_deltas=deltas,
                            hidden_states=dec.hidden_states, last_hidden_state=dec.last_hidden_state,
                            cache=dec.cache)


def conversion_table(config: Qwen2_5_VLConfig) -> dict[str, conversion.Rule]:
  """Canonical (transformers-5) checkpoint names -> parameter paths."""
  table = vision_lib.conversion_table(config.vision, "model.visual.", ("visual",))
  table.update(llama.conversion_table(config.text, "model.language_model.", ("language_model",)))
  if not config.tie_word_embeddings:
    table["lm_head.weight"] = conversion.Rule(("lm_head", "kernel"), "linear")
  return table
