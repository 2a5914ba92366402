"""The Qwen2.5-VL vision tower in Flax NNX, matching transformers' `Qwen2_5_VisionTransformerPretrainedModel`.

Axes (`models` legend, plus): Np patches of a batch (every image's t x h x w patches, concatenated in the
processor's order), M = Np / 4 merged tokens (2 x 2 patches each), I images (or videos), E = C * Tp * P * P the
flattened patch (1,176 on the hub checkpoints), Dv vision width, D text width, Dh head width, H heads.

    tower = VisionTransformer(config, rngs=nnx.Rngs(0))
    layout = vision_layout(config, image_grid_thw, num_patches)      # host numpy: windows, segments, rotary ids
    out = tower(pixel_values, layout)        # out.merged float[M, D] in raster order, image after image

The forward, step by step (transformers' order):
1. patch embedding: the processor's float[Np, E] rows times a Conv3d kernel without bias, as one matmul (the conv's
   stride equals its kernel, so it is a linear map of each flattened patch).
2. window order: the merged tokens (groups of 4 consecutive patches) are permuted so each window of
   `window_size // merge // patch` x the same merged tokens (4 x 4 on the hub checkpoints, edge windows smaller) is
   contiguous (`vision_layout.window_index`, transformers' `get_vision_window_index`).
3. 2-D axial rotary (theta 1e4): (h, w) patch ids, block-major over the 2 x 2 merge groups, each rotating Dh / 4
   frequencies, laid out [h, w, h, w]; applied in float32.
4. blocks: RMSNorm, fused qkv with bias, non-causal attention inside each window (or each frame in
   `fullatt_block_indexes`), proj; RMSNorm, SiLU-gated MLP with biases.
   Window blocks are computed per chunk of L = (window tokens) patches against the 3 L keys around it (a window is
   contiguous and at most L long, so it lies within them), masked to the query's own window: 3 L scores per patch,
   never Np x Np. Full blocks attend inside each frame, flash-style: a tile of queries loops over the key tiles its
   frames span (`_frame_attention`), so a batch of images never forms Np x Np scores; the received relevance is a
   second tiled pass over the same tiles (`_frame_received`).
5. merger: RMSNorm, the 4 patches of a merged token concatenated, Linear, exact GELU, Linear; then back to raster
   order (`argsort(window_index)`).
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import config_fields
from models import conversion
from models import llama
from models.activations import ACTIVATIONS

__all__ = ["VisionConfig", "VisionLayout", "VisionTowerOutput", "VisionTransformer", "vision_layout",
           "layout_shapes", "conversion_table"]

# transformers' Qwen2_5_VLVisionConfig defaults (note hidden_size 3584: the hub checkpoints set 1280).
_DEFAULTS = dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16, in_channels=3,
                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=4, window_size=112,
                 out_hidden_size=3584)
_DEFAULT_FULLATT = (7, 15, 23, 31)
_RMS_EPS = 1e-6        # transformers hard-codes the vision norms' eps


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 3584
  hidden_act: str = "silu"
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  tokens_per_second: int = 4
  window_size: int = 112
  out_hidden_size: int = 3584
  fullatt_block_indexes: tuple[int, ...] = _DEFAULT_FULLATT
  rope_theta: float = 10000.0

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "VisionConfig":
    """From `vision_config` (model_type "qwen2_5_vl_vision", or "qwen2_5_vl" in the legacy hub files). Raises
    ValueError naming every field the port does not implement."""
    p = "vision_config."
    if hf.get("model_type", "qwen2_5_vl_vision") not in ("qwen2_5_vl_vision", "qwen2_5_vl"):
      raise ValueError(f"{p}model_type={hf.get('model_type')!r} is not a Qwen2.5-VL vision tower")
    values = {k: hf.get(k, default) for k, default in _DEFAULTS.items()}
    # The legacy hub files also spell the channels `in_chans` and the patch `spatial_patch_size`.
    for legacy, field in (("in_chans", "in_channels"), ("spatial_patch_size", "patch_size")):
      if legacy in hf and hf[legacy] != values[field]:
        raise ValueError(f"{p}{legacy}={hf[legacy]!r} differs from {field}={values[field]!r}; transformers reads "
                         f"only {field}")
    config_fields.check_fields(values, cls, p, positive=True)
    if values["hidden_act"] not in ACTIVATIONS:
      raise ValueError(f"{p}hidden_act={values['hidden_act']!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    if values["hidden_size"] % values["num_heads"] or (values["hidden_size"] // values["num_heads"]) % 4:
      raise ValueError(f"{p}hidden_size={values['hidden_size']} / num_heads={values['num_heads']} must give a head "
                       "width divisible by 4 (the axial rotary splits it in h and w halves of cos/sin pairs)")
    if values["window_size"] // values["spatial_merge_size"] // values["patch_size"] < 1:
      raise ValueError(f"{p}window_size={values['window_size']} is smaller than one merged token "
                       f"(spatial_merge_size x patch_size = {values['spatial_merge_size'] * values['patch_size']})")
    full = hf.get("fullatt_block_indexes", _DEFAULT_FULLATT)
    if (not isinstance(full, (list, tuple))
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < values["depth"] for i in full)):
      raise ValueError(f"{p}fullatt_block_indexes must be a list of block indices in [0, depth={values['depth']}), "
                       f"got {full!r}")
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "axial") != "axial" or set(rope) - {"rope_type",
                                                                                            "rope_theta"}:
      raise ValueError(f"{p}rope_parameters={rope!r} is not supported (only the axial rotary, rope_theta)")
    theta = rope.get("rope_theta", 10000.0)
    config_fields.check_field(theta, float, p + "rope_parameters.rope_theta")
    return cls(**values, fullatt_block_indexes=tuple(sorted(set(full))), rope_theta=float(theta))

  @property
  def num_patches(self) -> int:
    """The seam's T, the papers' N of one image: 1,296 merged tokens (`models.qwen2_5_vl.NOMINAL_TOKENS`; an
    image's own count is its grid's)."""
    return 1296

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """E: the processor's flattened patch (channels x temporal x patch x patch)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size ** 2

  @property
  def window_tokens(self) -> int:
    """Merged tokens along a window side (112 // 2 // 14 = 4 on the hub checkpoints)."""
    return self.window_size // self.spatial_merge_size // self.patch_size

  @property
  def window_patches(self) -> int:
    """L: the most patches one window holds (4 x 4 merged tokens x 4 = 64)."""
    return self.window_tokens ** 2 * self.merge_unit


class VisionLayout(NamedTuple):
  """Where each patch goes, computed on the host from the grids (`vision_layout`); static shapes from Np and I.

  window_index: int32[M] the merged token (raster order, image after image) at each window-order slot.
  window_segment: int32[Np] the window of each patch in window order (consecutive ids, one per window).
  frame_segment: int32[Np] the frame (image, or video frame) of each patch in window order: full blocks' segments.
  rotary: int32[Np, 2] (h, w) rotary ids of each patch in window order.
  token_image: int32[M] the image (index into the grids) of each merged token in raster order (I: padding).
  """
  window_index: Any
  window_segment: Any
  frame_segment: Any
  rotary: Any
  token_image: Any


def vision_layout(config: VisionConfig, grid_thw, num_patches: int | None = None,
                  block: int | None = None) -> VisionLayout:
  """The layout for concrete grids int[I, 3] (t, h, w in patches), as numpy (transformers' `get_vision_window_index`
  and `get_vision_position_ids`). `num_patches`: Np of pixel_values, checked against the grids.

  block: None, the images' patches back to back (the processor's rows; Np = their sum); or the patches of one
  image's block (a bucket, `models.qwen2_5_vl.pad_patches`): image i's patches start at i x block and padding fills
  its block (Np = I x block). Padding merged tokens follow their image in window order, in windows (and frames) of
  their own, at most a window's tokens each, rotary ids 0 and `token_image` I (no image): they never attend to an
  image's patches nor an image's to them, so the images' outputs do not depend on the block."""
  grid = np.asarray(grid_thw).astype(np.int64).reshape(-1, 3)
  m, ws = config.spatial_merge_size, config.window_tokens
  if (grid < 1).any() or (grid[:, 1:] % m).any():
    raise ValueError(f"image_grid_thw rows must be positive (t, h, w) with h and w multiples of the merge size {m}, "
                     f"got {grid.tolist()}")
  sizes = np.prod(grid, axis=1)
  total = int(np.sum(sizes)) if block is None else len(grid) * int(block)
  if block is not None and (block % config.merge_unit or (sizes > block).any()):
    raise ValueError(f"block={block} must be a multiple of {config.merge_unit} holding each image's patches "
                     f"(the largest has {int(sizes.max())})")
  if num_patches is not None and total != num_patches:
    what = "describes" if block is None else f"in blocks of {block} describes"
    raise ValueError(f"image_grid_thw {grid.tolist()} {what} {total} patches, pixel_values holds {num_patches}")
  window_index, window_of, frame_of, rotary, token_image = [], [], [], [], []
  offset = windows = frames = 0

  def add_window(tokens, frame):
    nonlocal windows
    window_index.append(tokens)
    window_of.append(np.full(tokens.size * m * m, windows))
    frame_of.append(np.full(tokens.size * m * m, frame))
    windows += 1

  for image, (t, h, w) in enumerate(grid.tolist()):
    gh, gw = h // m, w // m
    index = np.arange(t * gh * gw).reshape(t, gh, gw)
    nh, nw = -(-gh // ws), -(-gw // ws)
    padded = np.full((t, nh * ws, nw * ws), -1)
    padded[:, :gh, :gw] = index
    blocks = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, ws * ws)
    for window in blocks:
      kept = window[window >= 0]
      if kept.size:              # transformers' unique_consecutive drops empty windows
        add_window(kept + offset, frames + int(kept[0]) // (gh * gw))
    # (h, w) ids of the patches, block-major over the merge groups, repeated per frame.
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block_major = lambda a: a.reshape(gh, m, gw, m).transpose(0, 2, 1, 3).reshape(-1)
    rotary.append(np.tile(np.stack([block_major(hh), block_major(ww)], -1), (t, 1)))
    token_image.append(np.full(t * gh * gw, image))
    offset += t * gh * gw
    frames += t
    if block is not None:          # this image's padding: windows and frames of their own
      end = (image + 1) * block // config.merge_unit
      for start in range(offset, end, ws * ws):
        add_window(np.arange(start, min(start + ws * ws, end)), frames)
        frames += 1
      rotary.append(np.zeros((block - t * h * w, 2), np.int64))
      token_image.append(np.full(end - offset, len(grid)))
      offset = end
  window_index = np.concatenate(window_index).astype(np.int32)
  rotary = np.concatenate(rotary).reshape(-1, m * m, 2)[window_index].reshape(-1, 2)
  return VisionLayout(window_index=window_index, window_segment=np.concatenate(window_of).astype(np.int32),
                      frame_segment=np.concatenate(frame_of).astype(np.int32), rotary=rotary.astype(np.int32),
                      token_image=np.concatenate(token_image).astype(np.int32))


def layout_shapes(config: VisionConfig, num_patches: int) -> VisionLayout:
  """The layout's shapes and dtypes for `num_patches` patches (what `jax.pure_callback` needs)."""
  mtok = num_patches // config.merge_unit
  s = jax.ShapeDtypeStruct
  return VisionLayout(window_index=s((mtok,), jnp.int32), window_segment=s((num_patches,), jnp.int32),
                      frame_segment=s((num_patches,), jnp.int32), rotary=s((num_patches, 2), jnp.int32),
                      token_image=s((mtok,), jnp.int32))


class VisionTowerOutput(NamedTuple):
  """merged float[M, D] the merger's output in raster order (image after image; transformers' pooler_output);
  hidden float[Np, Dv] the last block's output in window order (transformers' last_hidden_state); received
  float32[M] | None the attention each merged token receives in the last full-attention block (mean over heads and
  over the queries of its frame, averaged over its 2 x 2 patches; raster order); keys float[M, Dh] | None that
  block's post-rotary keys, mean over heads and the 2 x 2 patches."""
  merged: jax.Array
  hidden: jax.Array
  received: jax.Array | None = None
  keys: jax.Array | None = None


def _rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def _rope(x, cos, sin):
  """transformers' apply_rotary_pos_emb_vision: float32 rotation, cast back. x float[Np, H, Dh], cos/sin [Np, Dh]."""
  xf = x.astype(jnp.float32)
  return (xf * cos[:, None] + _rotate_half(xf) * sin[:, None]).astype(x.dtype)


def rotary_tables(config: VisionConfig, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(h, w) ids int[Np, 2] -> (cos, sin) float32[Np, Dh]: each axis rotates Dh / 4 frequencies of
  theta^(-2j / (Dh / 2)); laid out [h, w, h, w] (transformers' `Qwen2_5_VLVisionRotaryEmbedding`)."""
  spatial = config.head_dim // 2
  inv = (np.float32(1.0) / (np.float32(config.rope_theta)
                            ** (np.arange(0, spatial, 2).astype(np.float32) / np.float32(spatial))))
  freqs = ids.astype(jnp.float32)[..., None] * jnp.asarray(inv.astype(np.float32))      # [Np, 2, Dh / 4]
  table = lambda f: jnp.concatenate([f[:, 0], f[:, 1], f[:, 0], f[:, 1]], axis=-1)
  return table(jnp.cos(freqs)), table(jnp.sin(freqs))


def _linear(din, dout, dtype, rngs, use_bias=True):
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _window_attention(q, k, v, segment, length: int):
  """Block-diagonal attention over contiguous windows of at most `length` rows: q/k/v float[Np, H, Dh], segment
  int32[Np] -> float[Np, H, Dh]. Each chunk of `length` queries sees the keys of its own chunk and its two
  neighbours, masked to its window."""
  n = q.shape[0]
  chunks = -(-n // length)
  pad = chunks * length - n
  seg = jnp.pad(segment, (0, pad), constant_values=-1)
  chunk = lambda a: jnp.pad(a, ((0, pad), (0, 0), (0, 0))).reshape(chunks, length, *a.shape[1:])
  around = lambda a, fill: jnp.concatenate([jnp.pad(a, ((1, 0),) + ((0, 0),) * (a.ndim - 1),
                                                    constant_values=fill)[:-1], a,
                                            jnp.pad(a, ((0, 1),) + ((0, 0),) * (a.ndim - 1),
                                                    constant_values=fill)[1:]], axis=1)
  qc, kc, vc = chunk(q), around(chunk(k), 0), around(chunk(v), 0)
  seg_q = seg.reshape(chunks, length)
  seg_k = around(seg_q, -2)                                     # -2: a pad key never matches a pad query (-1)
  mask = (seg_q[:, :, None] == seg_k[:, None, :]) | (jnp.arange(length)[:, None] + length
                                                      == jnp.arange(3 * length)[None, :])
  out = jax.nn.dot_product_attention(qc, kc.astype(q.dtype), vc.astype(q.dtype), mask=mask[:, None])
  return out.reshape(chunks * length, *q.shape[1:])[:n]


FRAME_TILE = 512     # query rows per tile and keys per step of the full blocks' frame attention


def _frame_attention(q, k, v, frames, tile: int | None = None):
  """Non-causal attention inside each frame (frames are contiguous runs of `frames` ids): q/k/v float[Np, H, Dh],
  frames int32[Np] -> (float[Np, H, Dh], the log-sum-exp of each query's scores float32[Np, H]).

  Flash attention in tiles: each tile of queries loops only over the key tiles its frames span (a dynamic range:
  frame starts and ends come from the ids), with a running max and denominator in float32. A batch of several
  images never forms the Np x Np scores (41,472 patches of 8 images: 108 GB in float32 on 16 heads), only what each
  frame needs (plus the partial tiles at its edges)."""
  tile = FRAME_TILE if tile is None else tile
  n, h, dh = q.shape
  tiles, qp, kp, vp, fq, fk, span = _tiled(q, k, v, frames, tile)

  def one(i):
    rows = jax.lax.dynamic_slice_in_dim(qp, i * tile, tile)                            # [C, H, Dh]
    rows_frame = jax.lax.dynamic_slice_in_dim(fq, i * tile, tile)

    def step(j, carry):
      top, den, acc = carry
      logits = _tile_logits(rows, rows_frame, kp, fk, j, tile)                         # [H, C, C]
      new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
      p = jnp.exp(logits - new_top[..., None])
      scale = jnp.exp(top - new_top)
      values = jax.lax.dynamic_slice_in_dim(vp, j * tile, tile)
      acc = acc * scale[..., None] + jnp.einsum("hqk,khd->hqd", p.astype(values.dtype), values,
                                                preferred_element_type=jnp.float32)
      return new_top, den * scale + jnp.sum(p, axis=-1), acc

    init = (jnp.full((h, tile), _MASKED, jnp.float32), jnp.zeros((h, tile), jnp.float32),
            jnp.zeros((h, tile, dh), jnp.float32))
    top, den, acc = jax.lax.fori_loop(*span(i), step, init)
    den = jnp.maximum(den, 1e-30)
    return (acc / den[..., None]).transpose(1, 0, 2).astype(q.dtype), (top + jnp.log(den)).T

  out, lse = jax.lax.map(one, jnp.arange(tiles))
  return out.reshape(tiles * tile, h, dh)[:n], lse.reshape(tiles * tile, h)[:n]


def _frame_received(q, k, frames, lse, tile: int | None = None):
  """The attention each key receives inside its frame, mean over heads and the frame's queries: the second pass of
  `_frame_attention` (its log-sum-exps), over the query tiles each key tile's frames span -> float32[Np]."""
  tile = FRAME_TILE if tile is None else tile
  n, h, _ = q.shape
  tiles, qp, kp, _, fq, fk, span = _tiled(q, k, k, frames, tile)
  lse_p = jnp.pad(lse, ((0, tiles * tile - n), (0, 0)))

  def one(j):
    def step(i, total):
      rows = jax.lax.dynamic_slice_in_dim(qp, i * tile, tile)
      rows_frame = jax.lax.dynamic_slice_in_dim(fq, i * tile, tile)
      logits = _tile_logits(rows, rows_frame, kp, fk, j, tile)                         # [H, Cq, Ck]
      top = jax.lax.dynamic_slice_in_dim(lse_p, i * tile, tile).T[..., None]           # [H, Cq, 1]
      return total + jnp.sum(jnp.exp(logits - top), axis=(0, 1))
    return jax.lax.fori_loop(*span(j), step, jnp.zeros((tile,), jnp.float32))

  total = jax.lax.map(one, jnp.arange(tiles)).reshape(-1)[:n]
  size = (_run_ends(frames) - _run_starts(frames)).astype(jnp.float32)                  # queries of each frame
  return total / (h * size)


def _tiled(q, k, v, frames, tile: int):
  """Padded operands of the tiled frame attention and `span(i)`: the tiles [lo, hi) that tile i's frames span."""
  n, _, dh = q.shape
  tiles = -(-n // tile)
  pad = tiles * tile - n
  starts, ends = _run_starts(frames), _run_ends(frames)
  padded = lambda a: jnp.pad(a, ((0, pad), (0, 0), (0, 0)))
  qp, kp, vp = padded(q * jnp.asarray(dh ** -0.5, q.dtype)), padded(k.astype(q.dtype)), padded(v.astype(q.dtype))
  fq = jnp.pad(frames, (0, pad), constant_values=-1)
  fk = jnp.pad(frames, (0, pad), constant_values=-2)

  def span(i):
    first, last = i * tile, jnp.minimum((i + 1) * tile, n) - 1
    return starts[first] // tile, (ends[last] - 1) // tile + 1

  return tiles, qp, kp, vp, fq, fk, span


def _tile_logits(rows, rows_frame, kp, fk, j, tile: int):
  """Scores of a query tile against key tile j, masked to each query's frame: float32[H, C, C]."""
  keys = jax.lax.dynamic_slice_in_dim(kp, j * tile, tile)
  seen = rows_frame[:, None] == jax.lax.dynamic_slice_in_dim(fk, j * tile, tile)[None, :]
  logits = jnp.einsum("qhd,khd->hqk", rows, keys, preferred_element_type=jnp.float32)
  return jnp.where(seen[None], logits, _MASKED)


def _run_starts(frames):
  """int32[Np] -> int32[Np] the first index of each position's (contiguous) run of equal ids."""
  idx = jnp.arange(frames.shape[0])
  first = jnp.concatenate([jnp.ones((1,), bool), frames[1:] != frames[:-1]])
  return jax.lax.cummax(jnp.where(first, idx, 0), axis=0)


_MASKED = -1e30     # finite: a key outside the frame gives exp(_MASKED - max) = 0, never inf - inf


def _run_ends(frames):
  """int32[Np] -> int32[Np] one past the last index of each position's (contiguous) run of equal ids."""
  n = frames.shape[0]
  last = jnp.concatenate([frames[1:] != frames[:-1], jnp.ones((1,), bool)])
  idx = jnp.arange(n)
  # The next run end at or after each position: a reversed cumulative min over the run ends.
  return jax.lax.cummin(jnp.where(last, idx, n), axis=0, reverse=True) + 1


class VisionAttention(nnx.Module):

  def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
    self.num_heads, self.head_dim = config.num_heads, config.head_dim
    self.qkv = _linear(config.hidden_size, 3 * config.hidden_size, dtype, rngs)
    self.proj = _linear(config.hidden_size, config.hidden_size, dtype, rngs)

  def qkv_heads(self, x, cos, sin):
    """float[Np, Dv] (normed) -> q, k, v float[Np, H, Dh] (rotary on q and k)."""
    qkv = self.qkv(x).reshape(x.shape[0], 3, self.num_heads, self.head_dim)
    return _rope(qkv[:, 0], cos, sin), _rope(qkv[:, 1], cos, sin), qkv[:, 2]

  def output(self, heads):
    return self.proj(heads.reshape(heads.shape[0], -1))


class VisionMLP(nnx.Module):

  def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
    self.act = config.hidden_act
    self.gate_proj = _linear(config.hidden_size, config.intermediate_size, dtype, rngs)
    self.up_proj = _linear(config.hidden_size, config.intermediate_size, dtype, rngs)
    self.down_proj = _linear(config.intermediate_size, config.hidden_size, dtype, rngs)

  def __call__(self, x):
    return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):

  def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
    self.norm1 = llama.RMSNorm(config.hidden_size, eps=_RMS_EPS, dtype=dtype)
    self.norm2 = llama.RMSNorm(config.hidden_size, eps=_RMS_EPS, dtype=dtype)
    self.attn = VisionAttention(config, dtype=dtype, rngs=rngs)
    self.mlp = VisionMLP(config, dtype=dtype, rngs=rngs)

  def finish(self, x, heads):
    x = x + self.attn.output(heads)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """ln_q, then each merged token's 4 patches concatenated -> fc1 (transformers' mlp.0) -> exact GELU -> fc2
  (mlp.2)."""

  def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
    width = config.hidden_size * config.merge_unit
    self.ln_q = llama.RMSNorm(config.hidden_size, eps=_RMS_EPS, dtype=dtype)
    self.fc1 = _linear(width, width, dtype, rngs)
    self.fc2 = _linear(width, config.out_hidden_size, dtype, rngs)

  def __call__(self, x):
    x = self.ln_q(x).reshape(-1, self.fc1.in_features)
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTransformer(nnx.Module):
  """patch_embed (a Conv3d kernel float[C, Tp, P, P, Dv], no bias), stacked blocks, merger."""

  def __init__(self, config: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    c = config
    shape = (c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size, c.hidden_size)
    self.patch_embed = nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * c.patch_dim ** -0.5)

    @nnx.split_rngs(splits=c.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
      return VisionBlock(c, dtype=dtype, rngs=r)

    self.blocks = make(rngs)
    self.merger = PatchMerger(c, dtype=dtype, rngs=rngs)

  def embed_patches(self, pixel_values: jax.Array) -> jax.Array:
    """float[Np, E] -> float[Np, Dv] (raster order)."""
    kernel = self.patch_embed[...]
    if pixel_values.ndim != 2 or pixel_values.shape[1] != self.config.patch_dim:
      raise ValueError(f"pixel_values must be float[Np, {self.config.patch_dim}] (the Qwen2-VL image processor's "
                       f"flattened patches), got shape {pixel_values.shape}")
    return pixel_values.astype(kernel.dtype) @ kernel.reshape(-1, kernel.shape[-1])

  def to_window_order(self, x: jax.Array, window_index: jax.Array) -> jax.Array:
    """float[Np, X] raster order -> window order (merge groups of 4 rows move together)."""
    unit = self.config.merge_unit
    return x.reshape(-1, unit, *x.shape[1:])[window_index].reshape(x.shape)

  def run_blocks(self, x: jax.Array, cos: jax.Array, sin: jax.Array, layout: VisionLayout, start: int = 0,
                 stop: int | None = None) -> jax.Array:
    """Blocks [start, stop) on window-ordered hidden states float[Np, Dv] (cos/sin float32[Np, Dh] of
    `rotary_tables`, in window order): window attention, or per frame in `fullatt_block_indexes` (one scan, the
    two kinds under `lax.cond`)."""
    c = self.config
    stop = c.depth if stop is None else stop
    if start >= stop:
      return x
    full = np.isin(np.arange(start, stop), c.fullatt_block_indexes)
    graphdef, state = nnx.split(self.blocks)

    def body(h, xs):
      block_state, is_full = xs
      blk = nnx.merge(graphdef, block_state)
      q, k, v = blk.attn.qkv_heads(blk.norm1(h), cos, sin)
      heads = jax.lax.cond(
          is_full, lambda: _frame_attention(q, k, v, layout.frame_segment)[0],
          lambda: _window_attention(q, k, v, layout.window_segment, c.window_patches))
      return blk.finish(h, heads), None

    xs = (jax.tree.map(lambda a: a[start:stop], state), jnp.asarray(full))
    return jax.lax.scan(body, x, xs)[0]

  def block(self, index: int) -> VisionBlock:
    """The single (unstacked) block `index` (a static Python int)."""
    graphdef, state = nnx.split(self.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))

  def __call__(self, pixel_values: jax.Array, layout: VisionLayout, *, received: bool = False,
               keys: bool = False) -> VisionTowerOutput:
    """The processor's float[Np, E] patches and their `VisionLayout` -> `VisionTowerOutput` (received / keys: the
    last full-attention block's signals, raster order)."""
    c = self.config
    layout = VisionLayout(*(jnp.asarray(a) for a in layout))
    x = self.to_window_order(self.embed_patches(pixel_values), layout.window_index)
    cos, sin = rotary_tables(c, layout.rotary)
    relevance = key_means = None
    if received or keys:
      if not c.fullatt_block_indexes:
        raise ValueError("the received-attention relevance reads the last full-attention block; this tower has none "
                         "(vision_config.fullatt_block_indexes is empty)")
      last = c.fullatt_block_indexes[-1]
      x = self.run_blocks(x, cos, sin, layout, 0, last)
      x, relevance, key_means = _full_block_with_received(self.block(last), x, cos, sin, layout.frame_segment)
      x = self.run_blocks(x, cos, sin, layout, last + 1)
      # Per merged token (the mean of its 4 patches), back in raster order.
      pool = lambda a: a.reshape(-1, c.merge_unit, *a.shape[1:]).mean(1)
      raster = lambda a: jnp.zeros_like(a).at[layout.window_index].set(a)
      relevance = raster(pool(relevance)) if received else None
      key_means = raster(pool(key_means)) if keys else None
    else:
      x = self.run_blocks(x, cos, sin, layout)
    merged = self.merger(x)
    merged = jnp.zeros_like(merged).at[layout.window_index].set(merged)        # back to raster order
    return VisionTowerOutput(merged=merged, hidden=x, received=relevance, keys=key_means)


def _full_block_with_received(blk: VisionBlock, x, cos, sin, frames):
  """A full-attention block with its received attention: -> (output float[Np, Dv], received float32[Np]: the mean
  over heads and over its frame's queries of the attention each patch receives, keys float[Np, Dh]: mean over
  heads). Two tiled passes (`_frame_attention`, `_frame_received`): no Np x Np probabilities."""
  q, k, v = blk.attn.qkv_heads(blk.norm1(x), cos, sin)
  heads, lse = _frame_attention(q, k, v, frames)
  return blk.finish(x, heads), _frame_received(q, k, frames, lse), jnp.mean(k, axis=1)


def conversion_table(config: VisionConfig, prefix: str, target: tuple[str, ...]) -> dict[str, conversion.Rule]:
  """Checkpoint names of the tower under `prefix` ("model.visual.") -> paths under `target`."""
  Rule = conversion.Rule
  t = {prefix + "patch_embed.proj.weight": Rule(target + ("patch_embed",), "conv3d"),
       prefix + "merger.ln_q.weight": Rule(target + ("merger", "ln_q", "scale"))}
  for name, ours in (("mlp.0", "fc1"), ("mlp.2", "fc2")):
    t[f"{prefix}merger.{name}.weight"] = Rule(target + ("merger", ours, "kernel"), "linear")
    t[f"{prefix}merger.{name}.bias"] = Rule(target + ("merger", ours, "bias"))
  blocks = target + ("blocks",)
  for i in range(config.depth):
    p = f"{prefix}blocks.{i}."
    for norm in ("norm1", "norm2"):
      t[f"{p}{norm}.weight"] = Rule(blocks + (norm, "scale"), "identity", i)
    for module, proj in (("attn", "qkv"), ("attn", "proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
                         ("mlp", "down_proj")):
      t[f"{p}{module}.{proj}.weight"] = Rule(blocks + (module, proj, "kernel"), "linear", i)
      t[f"{p}{module}.{proj}.bias"] = Rule(blocks + (module, proj, "bias"), "identity", i)
  return t
