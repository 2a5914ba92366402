"""FLOPs, KV-cache and weight bytes of LLaVA and Qwen2.5-VL prefill and decode under any token-pruning schedule.

Axes: L decoder layers, S tokens a layer processes (queries), Sk keys a query attends to, D width, H query heads, Hkv
key/value heads, Dh head width, M MLP width, V vocabulary; vision tower: P = N + 1 positions of a crop (CLS first),
N patches, Dv width, Mv MLP width, C channels, p patch size; Qwen2.5-VL: Np patches of a batch, E = C Tp p^2 the
flattened patch, Do the merger's output width.

Counted as the token-pruning papers count them (one multiply-add = 2 FLOPs; prefill Sk = S). Entry points:
`decoder_decode_flops`, `decoder_generate_flops`, `llava_prefill_flops` / `qwen_prefill_flops` (the whole pipeline),
`qwen_vision_flops` (the window / full-attention tower by part), `kv_cache_bytes`, `*_params` / `*_weight_bytes`,
`hlo_dot_flops` (the dot FLOPs of a compiled XLA module).

The formulas, what the port executes against what is counted, the whole pipeline, memory, the TOPS paper's 41.7
TFLOPs and the XLA count: experiments/EXPERIMENTS.md#flops.
"""

from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from experiments.analysis import hlo_cost
from models import clip

__all__ = ["layer_flops", "layer_prefill_flops", "decoder_prefill_flops", "lm_head_flops", "decoder_decode_flops",
           "decoder_generate_flops", "causal_keys", "schedule_seq_lens", "kv_cache_bytes", "decoder_params",
           "vision_params", "projector_params", "llava_params", "decoder_weight_bytes", "llava_weight_bytes",
           "vision_layers_run", "vision_flops", "projector_flops", "PipelineFlops", "llava_prefill_flops",
           "qwen_window_patches", "qwen_frame_patches", "qwen_frame_tile_pairs", "QwenVisionFlops",
           "qwen_vision_flops", "qwen_prefill_flops", "qwen_vision_params", "qwen_params", "qwen_weight_bytes",
           "hlo_dot_flops"]


# ---------------------------------------------------------------------------------------------------------------------
# Decoder


def _layer_matmul_weights(c) -> int:
  q_width = c.num_attention_heads * c.head_dim
  kv_width = c.num_key_value_heads * c.head_dim
  return c.hidden_size * (q_width + 2 * kv_width) + q_width * c.hidden_size + 3 * c.hidden_size * c.intermediate_size


def layer_flops(text_config, queries: float, keys: float) -> float:
  """FLOPs of one decoder layer on `queries` tokens, each attending to `keys` keys."""
  q_width = text_config.num_attention_heads * text_config.head_dim
  return 2.0 * queries * _layer_matmul_weights(text_config) + 4.0 * queries * keys * q_width


def layer_prefill_flops(text_config, seq_len: float) -> float:
  """FLOPs of one decoder layer on `seq_len` tokens (fractional means: averaged over a batch)."""
  return layer_flops(text_config, seq_len, seq_len)


def lm_head_flops(text_config, positions: float = 1) -> float:
  """The LM head (D x V) at `positions` positions."""
  return 2.0 * positions * text_config.hidden_size * text_config.vocab_size


def _check_layers(text_config, lens: Sequence[float], what: str):
  if len(lens) != text_config.num_hidden_layers:
    raise ValueError(f"{what} has {len(lens)} entries, the decoder has {text_config.num_hidden_layers} layers")


def decoder_prefill_flops(text_config, seq_lens: Sequence[float], lm_head_positions: int = 0) -> float:
  """Total over layers (`seq_lens[l]`: the tokens layer l processes) plus the LM head at `lm_head_positions`."""
  _check_layers(text_config, seq_lens, "seq_lens")
  return sum(layer_prefill_flops(text_config, s) for s in seq_lens) + lm_head_flops(text_config, lm_head_positions)


def decoder_decode_flops(text_config, kv_lens: Sequence[float], lm_head: bool = True) -> float:
  """One generated token through every layer (`kv_lens[l]`: the keys it attends to in layer l, its own included)
  and, with `lm_head`, its logits."""
  _check_layers(text_config, kv_lens, "kv_lens")
  return sum(layer_flops(text_config, 1, k) for k in kv_lens) + lm_head_flops(text_config, 1 if lm_head else 0)


def decoder_generate_flops(text_config, cache_lens: Sequence[float], new_tokens: int, lm_head: bool = True) -> float:
  """The decode steps of `new_tokens` greedy tokens after a prefill that left `cache_lens[l]` tokens in layer l's
  cache: the first token comes from the prefill's logits, step i = 1 .. n - 1 feeds token i, which attends to
  cache_lens[l] + i keys in layer l (`models.generate.decode`)."""
  return sum(decoder_decode_flops(text_config, [k + i for k in cache_lens], lm_head) for i in range(1, new_tokens))


def causal_keys(seq_len: int, block: int | None = None) -> float:
  """Mean keys per query of causal attention on `seq_len` tokens computed in query blocks of `block` rows, each
  block against keys [0, its last row]: None (one block, the full masked S x S scores) gives S, 1 gives (S + 1) / 2."""
  block = seq_len if block is None else block
  ends = [min(seq_len, start + block) for start in range(0, seq_len, block)]
  return sum(end * (end - start) for start, end in zip(range(0, seq_len, block), ends)) / seq_len


def schedule_seq_lens(num_layers: int, text_tokens: float, visual_tokens: float,
                      stage2: Sequence[tuple[int, int]] = (), timing: str = "before") -> list[float]:
  """Tokens each decoder layer processes under a pruning schedule.

  Args:
    num_layers: L.
    text_tokens: the prompt's non-visual tokens (system prompt, question, template), never pruned.
    visual_tokens: visual tokens entering the decoder (after Stage I, its budget: 2 x target for TOPS).
    stage2: ((layer, keep), ...) Stage II steps as `models.pruning.PruningConfig.steps`: `keep` visual tokens from
      `layer` on ("before": layer `layer` is the first to run on them) or from `layer + 1` on ("after").
    timing: "before" | "after" (`PruningConfig.stage2_timing`).

  Returns:
    L floats, text_tokens + the visual tokens of each layer (also each layer's KV-cache length after the prefill).
  """
  if timing not in ("before", "after"):
    raise ValueError(f"timing must be 'before' or 'after', got {timing!r}")
  shift = timing == "after"
  visual = [float(visual_tokens)] * num_layers
  for layer, keep in stage2:
    first = layer + shift
    if not 0 <= first < num_layers:
      raise ValueError(f"stage II step at layer {layer} ({timing}) is outside the {num_layers} layers")
    visual[first:] = [min(v, float(keep)) for v in visual[first:]]
  return [text_tokens + v for v in visual]


# ---------------------------------------------------------------------------------------------------------------------
# Memory


def _itemsize(dtype) -> int:
  return jnp.dtype(dtype).itemsize                     # jnp knows "bfloat16" by name


def kv_cache_bytes(text_config, kv_lens: Sequence[float], dtype="bfloat16", batch: int = 1) -> float:
  """Keys and values of `kv_lens[l]` tokens in every layer l, for `batch` rows."""
  _check_layers(text_config, kv_lens, "kv_lens")
  per_token = 2 * text_config.num_key_value_heads * text_config.head_dim * _itemsize(dtype)
  return float(batch * per_token * sum(kv_lens))


def decoder_params(text_config) -> int:
  """Parameters of `models.llama.LlamaForCausalLM` (or a Qwen2 decoder): embeddings, layers, final norm, LM head
  (unless tied)."""
  c = text_config
  q_width, kv_width = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
  layer = _layer_matmul_weights(c) + 2 * c.hidden_size                        # + input/post-attention norms
  if c.attention_bias:
    layer += q_width + 2 * kv_width
  if c.o_proj_bias:                                                           # LLaMA: as attention_bias; Qwen2: none
    layer += c.hidden_size
  if c.mlp_bias:
    layer += 2 * c.intermediate_size + c.hidden_size
  head = 0 if c.tie_word_embeddings else c.hidden_size * c.vocab_size
  return c.vocab_size * c.hidden_size + c.num_hidden_layers * layer + c.hidden_size + head


def vision_params(vision_config) -> int:
  """Parameters of `models.clip.CLIPVisionModel` (all layers and post_layernorm, which the checkpoint holds)."""
  v = vision_config
  d, m = v.hidden_size, v.intermediate_size
  embeddings = d + v.num_channels * v.patch_size ** 2 * d + (v.num_patches + 1) * d
  layer = 4 * (d * d + d) + (d * m + m) + (m * d + d) + 2 * 2 * d
  return embeddings + 2 * 2 * d + v.num_hidden_layers * layer


def _feature_width(config) -> int:
  return config.vision.hidden_size * config.num_feature_layers


def projector_params(config) -> int:
  """Parameters of `models.llava.LlavaMultiModalProjector` (linear_1: Dv' -> D, linear_2: D -> D)."""
  d = config.text.hidden_size
  bias = 2 * d if config.multimodal_projector_bias else 0
  return _feature_width(config) * d + d * d + bias


def llava_params(config) -> int:
  """Parameters of a LLaVA-1.5 or LLaVA-NeXT port (a family with structural newline slots adds `image_newline`)."""
  newline = config.text.hidden_size if config.max_newlines else 0
  return vision_params(config.vision) + projector_params(config) + decoder_params(config.text) + newline


def decoder_weight_bytes(text_config, dtype="bfloat16") -> float:
  return float(decoder_params(text_config) * _itemsize(dtype))


def llava_weight_bytes(config, dtype="bfloat16") -> float:
  return float(llava_params(config) * _itemsize(dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Vision tower, projector, whole pipeline


def _feature_layers(config) -> list[int]:
  layers = config.vision_feature_layer
  layers = (layers,) if isinstance(layers, int) else tuple(layers)
  return [clip.resolve_hidden_state_index(layer, config.vision.num_hidden_layers) for layer in layers]


def vision_layers_run(config) -> int:
  """Encoder layers `CLIPVisionModel.features` runs: hidden state h is layer h - 1's output, so the deepest feature
  layer h needs h layers (-2 of 24 layers: 23)."""
  return max(_feature_layers(config))


def vision_flops(config, cls_attention: bool = True) -> float:
  """One crop through the port's CLIP tower up to the feature layer; `cls_attention`: also the CLS attention of the
  layer that produced the last feature layer (`CLIPAttention.cls_attention`: the CLS row's q_proj and logits)."""
  v = config.vision
  d, n = v.hidden_size, v.num_patches
  p = n + 1
  patches = 2.0 * n * v.num_channels * v.patch_size ** 2 * d
  layer = 2.0 * p * (4 * d * d + 2 * d * v.intermediate_size) + 4.0 * p * p * d
  total = patches + vision_layers_run(config) * layer
  if cls_attention and _feature_layers(config)[-1] >= 1:
    total += 2.0 * d * d + 2.0 * p * d                # q_proj of the CLS row, its logits (XLA shares the k_proj)
  return total


def projector_flops(config, tokens: float) -> float:
  """The projector on `tokens` feature rows."""
  d = config.text.hidden_size
  return 2.0 * tokens * (_feature_width(config) * d + d * d)


class PipelineFlops(NamedTuple):
  """FLOPs of one prompt's prefill by part."""
  vision: float
  projector: float
  decoder: float
  lm_head: float

  @property
  def total(self) -> float:
    return self.vision + self.projector + self.decoder + self.lm_head


def llava_prefill_flops(config, seq_lens: Sequence[float], *, num_crops: int | None = None,
                        lm_head_positions: int = 1, cls_attention: bool = True) -> PipelineFlops:
  """A LLaVA / LLaVA-NeXT prefill: `num_crops` crops (default `config.max_num_crops`, what the port encodes per
  image) through the tower and projector (every patch of every crop: pruning comes after), then the decoder on
  `seq_lens` and the LM head at `lm_head_positions`."""
  crops = config.max_num_crops if num_crops is None else num_crops
  rows = config.vision.num_patches + (config.vision_feature_select_strategy == "full")
  decoder = decoder_prefill_flops(config.text, seq_lens)
  return PipelineFlops(vision=crops * vision_flops(config, cls_attention),
                       projector=crops * projector_flops(config, rows), decoder=decoder,
                       lm_head=lm_head_flops(config.text, lm_head_positions))


# ---------------------------------------------------------------------------------------------------------------------
# Qwen2.5-VL


def _grids(grid_thw) -> list[tuple[int, int, int]]:
  grid = np.asarray(grid_thw).reshape(-1, 3)
  if (grid < 1).any():
    raise ValueError(f"grid_thw rows must be positive (t, h, w) patch grids, got {grid.tolist()}")
  return [tuple(int(v) for v in row) for row in grid]


def qwen_window_patches(vision_config, grid_thw) -> list[int]:
  """Patches of each window of the window-attention blocks, image after image, frame after frame (transformers'
  `cu_window_seqlens`): each frame's merged grid (h / m x w / m) cut into windows of `window_tokens` x
  `window_tokens` merged tokens from the top-left corner, the last row and column of windows partial when the grid
  is not a multiple; m^2 patches per merged token."""
  v = vision_config
  m, ws = v.spatial_merge_size, v.window_tokens
  out = []
  for t, h, w in _grids(grid_thw):
    gh, gw = h // m, w // m
    rows = [min(ws, gh - i) for i in range(0, gh, ws)]
    cols = [min(ws, gw - j) for j in range(0, gw, ws)]
    out += [r * c * m * m for r in rows for c in cols] * t
  return out


def qwen_frame_patches(grid_thw) -> list[int]:
  """Patches of each frame (an image is one frame of t = 1): the segments of the full-attention blocks."""
  return [h * w for t, h, w in _grids(grid_thw) for _ in range(t)]


def qwen_frame_tile_pairs(frame_patches: Sequence[int], tile: int) -> int:
  """(query tile, key tile) pairs the port's tiled frame attention computes over frames laid end to end
  (`models.qwen2_5_vl_vision._frame_attention`): each tile of `tile` queries runs over the key tiles from the one
  holding its first row's frame start to the one holding its last row's frame end."""
  ends = np.cumsum(frame_patches)
  starts = ends - np.asarray(frame_patches)
  n = int(ends[-1]) if len(ends) else 0
  pairs = 0
  for first in range(0, n, tile):
    last = min(first + tile, n) - 1
    lo = starts[np.searchsorted(ends, first, side="right")] // tile
    hi = (ends[np.searchsorted(ends, last, side="right")] - 1) // tile + 1
    pairs += int(hi - lo)
  return pairs


class QwenVisionFlops(NamedTuple):
  """FLOPs of the Qwen2.5-VL tower on a batch's images, by part."""
  patch_embed: float         # the Conv3d patch embedding, 2 Np E Dv
  blocks: float              # every block's qkv, proj and SwiGLU MLP, depth x 2 Np (4 Dv^2 + 3 Dv Mv)
  window_attention: float    # scores and mix of the window blocks
  full_attention: float      # scores and mix of the full-attention blocks (per frame)
  received: float            # the received-attention relevance's second pass (the last full block's scores again)
  merger: float              # ln_q, fc1 (4 Dv -> 4 Dv), fc2 (4 Dv -> Do) on the Np / 4 merged tokens

  @property
  def tower(self) -> float:
    """Everything before the merger."""
    return self.patch_embed + self.blocks + self.window_attention + self.full_attention + self.received

  @property
  def total(self) -> float:
    return self.tower + self.merger


FRAME_TILE = 512     # `models.qwen2_5_vl_vision.FRAME_TILE`: the port's query / key tile of the full blocks


def qwen_vision_flops(vision_config, grid_thw, *, received: bool = False, executed: bool = False,
                      frame_tile: int = FRAME_TILE) -> QwenVisionFlops:
  """The tower on the images of int[I, 3] (t, h, w) patch grids (`image_grid_thw`).

  received: also the received-attention relevance of the last full-attention block (Stage I's signal on Qwen).
  executed: False counts attention as the architecture defines it (each window's and each frame's own n^2 scores,
    as the papers count); True counts what the port computes: each chunk of L = `window_patches` queries against
    the 3 L keys around it (`ceil(Np / L)` chunks), and the full blocks in `frame_tile` x `frame_tile` tiles over
    the key tiles each query tile's frames span (`qwen_frame_tile_pairs`, padding included).
  """
  v = vision_config
  d = v.hidden_size
  frames = qwen_frame_patches(grid_thw)
  n = sum(frames)
  full = sum(1 for i in range(v.depth) if i in v.fullatt_block_indexes)
  windowed = v.depth - full
  if received and not full:
    raise ValueError("received: the relevance reads the last full-attention block; this tower has none")
  if executed:
    length = v.window_patches
    window = 4.0 * -(-n // length) * length * 3 * length * d
    pairs = qwen_frame_tile_pairs(frames, frame_tile)
    frame, frame_received = 4.0 * pairs * frame_tile ** 2 * d, 2.0 * pairs * frame_tile ** 2 * d
  else:
    window = sum(4.0 * w * w * d for w in qwen_window_patches(v, grid_thw))
    frame = sum(4.0 * f * f * d for f in frames)
    frame_received = frame / 2
  return QwenVisionFlops(
      patch_embed=2.0 * n * v.patch_dim * d,
      blocks=v.depth * 2.0 * n * (4 * d * d + 3 * d * v.intermediate_size),
      window_attention=windowed * window, full_attention=full * frame,
      received=frame_received if received else 0.0,
      merger=2.0 * (n // v.merge_unit) * (v.merge_unit * d) * (v.merge_unit * d + v.out_hidden_size))


def qwen_prefill_flops(config, grid_thw, seq_lens: Sequence[float], *, lm_head_positions: int = 1,
                       received: bool = False, executed: bool = False) -> PipelineFlops:
  """A Qwen2.5-VL prefill: the tower on the images of `grid_thw` (every patch: pruning comes after the merger),
  the merger as the projector, the decoder on `seq_lens` (a pruning schedule's tokens per layer,
  `schedule_seq_lens`; M-RoPE and the q/k/v biases add no matmul, so the count is LLaMA's), the LM head at
  `lm_head_positions`. received / executed: as `qwen_vision_flops`."""
  vis = qwen_vision_flops(config.vision, grid_thw, received=received, executed=executed)
  return PipelineFlops(vision=vis.tower, projector=vis.merger, decoder=decoder_prefill_flops(config.text, seq_lens),
                       lm_head=lm_head_flops(config.text, lm_head_positions))


def qwen_vision_params(vision_config) -> int:
  """Parameters of `models.qwen2_5_vl_vision.VisionTransformer`: the patch kernel (no bias), the blocks (norms, qkv
  and proj with bias, the MLP with biases), the merger (ln_q, fc1, fc2 with biases)."""
  v = vision_config
  d, m, wide = v.hidden_size, v.intermediate_size, v.merge_unit * v.hidden_size
  block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * (d * m + m) + (m * d + d)
  merger = d + (wide * wide + wide) + (wide * v.out_hidden_size + v.out_hidden_size)
  return v.patch_dim * d + v.depth * block + merger


def qwen_params(config) -> int:
  """Parameters of a Qwen2.5-VL port: tower, merger, decoder (LM head unless tied)."""
  return qwen_vision_params(config.vision) + decoder_params(config.text)


def qwen_weight_bytes(config, dtype="bfloat16") -> float:
  return float(qwen_params(config) * _itemsize(dtype))


# ---------------------------------------------------------------------------------------------------------------------
# XLA


def hlo_dot_flops(hlo_text: str) -> float:
  """Matmul FLOPs (2 per multiply-add) of an HLO module's text (`jax.jit(f).lower(...).compile().as_text()`): every
  `dot` and `convolution` of the entry computation and of what it calls, a while body times its trip count
  (`experiments.analysis.hlo_cost`, which this reads).

  Raises ValueError for a while loop whose trip count cannot be read and for a conditional whose branches hold dots
  (the count would depend on the data). What XLA turned into something else is not counted: dots lowered to library
  calls (cuBLAS custom-calls on GPU: use it on CPU-compiled modules) or, for some small shapes, rewritten as
  multiply + reduce.
  """
  cost = hlo_cost.program_cost(hlo_text)
  if cost.unknown_trips:
    raise ValueError(f"{cost.unknown_trips} while loop(s) without a readable trip count: the count would depend on "
                     "the data")
  if cost.branch_flops:
    raise ValueError("a conditional branch holds dots: the executed count depends on the data")
  return cost.flops
