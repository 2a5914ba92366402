"""experiments.analysis.flops for Qwen2.5-VL against transformers' window and frame segments, the port's parameters,
XLA's count of the compiled port, a brute-force count of the port's frame tiles, and the paper's Table 10.

XLA: the whole compiled forward cannot be read by `hlo_dot_flops`, which raises on both of its features. The tower's
blocks run under one `lax.scan` whose body picks window or full attention with a `lax.cond` (program_cost counts
both branches in every block), and the full blocks' flash attention loops over a dynamic range of key tiles (a trip
count XLA cannot know; program_cost counts it once). The test therefore reads `hlo_cost.program_cost` on a batch
whose patches fit one frame tile (so every query tile runs exactly one key tile: the one counted trip is the real
one) and checks, exactly, the port's executed count plus the branch each block did not take. Tile counts past one
tile are checked against a brute-force count; the decoder under a pruning schedule with M-RoPE ids is checked with
`hlo_dot_flops` exactly, as LLaVA's.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import vision_utils

from experiments.analysis import flops
from experiments.analysis import hlo_cost
from models import qwen2_5_vl
from models import qwen2_5_vl_vision as vision_lib
from models import shapes


@pytest.fixture(scope="module")
def tiny():
  """tiny-qwen (`models.shapes`): 4 blocks (full attention in 1 and 3), 56 px windows, a 28-layer decoder."""
  return qwen2_5_vl.Qwen2_5_VLConfig.from_hf(shapes.hf_config(shapes.SHAPES["tiny-qwen"]).to_dict())


def _abstract(config):
  return nnx.eval_shape(lambda: qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(config, rngs=nnx.Rngs(0)))


# Odd merged grids (partial windows at the bottom and right), a 2-frame video, a grid smaller than one window.
GRIDS = np.array([[1, 10, 14], [2, 6, 10], [1, 2, 2], [1, 16, 8]])


@pytest.mark.parametrize("window_size", [56, 84, 112])
def test_window_and_frame_segments_are_transformers(tiny, window_size):
  vision = dataclasses.replace(tiny.vision, window_size=window_size)
  _, cu = vision_utils.get_vision_window_index(torch.tensor(GRIDS), vision.spatial_merge_size, window_size,
                                               vision.patch_size)
  want = np.diff(torch.unique_consecutive(cu).numpy())                           # patches per window
  assert flops.qwen_window_patches(vision, GRIDS) == want.tolist()
  frames = np.diff(vision_utils.get_vision_cu_seqlens(torch.tensor(GRIDS)).numpy())
  assert flops.qwen_frame_patches(GRIDS) == frames.tolist()
  # And the port's layout (the segments its blocks attend in).
  layout = vision_lib.vision_layout(vision, GRIDS)
  assert np.bincount(layout.window_segment).tolist() == want.tolist()
  assert np.bincount(layout.frame_segment).tolist() == frames.tolist()


def test_window_partition_by_hand(tiny):
  """112 px windows are 4 x 4 merged tokens: a 10 x 14 patch grid (5 x 7 merged) has windows of 4 x 4, 4 x 3,
  1 x 4 and 1 x 3 merged tokens, 4 patches each."""
  vision = dataclasses.replace(tiny.vision, window_size=112)
  assert flops.qwen_window_patches(vision, [[1, 10, 14]]) == [64, 48, 16, 12]
  v = flops.qwen_vision_flops(vision, [[1, 10, 14]])
  windows = tiny.vision.depth - len(tiny.vision.fullatt_block_indexes)
  assert v.window_attention == windows * 4 * (64 ** 2 + 48 ** 2 + 16 ** 2 + 12 ** 2) * vision.hidden_size
  assert v.full_attention == 2 * 4 * 140 ** 2 * vision.hidden_size
  with pytest.raises(ValueError, match="positive"):
    flops.qwen_window_patches(vision, [[0, 4, 4]])


def _tile_pairs_brute_force(frames, tile):
  frame_of = np.repeat(np.arange(len(frames)), frames)
  pairs = 0
  for first in range(0, len(frame_of), tile):
    own = np.unique(frame_of[first:first + tile])
    keys = np.flatnonzero(np.isin(frame_of, own))
    pairs += len(np.unique(keys // tile))
  return pairs


@pytest.mark.parametrize("frames, tile", [([5184], 512), ([5184, 1302, 40], 512), ([60, 48], 512), ([700, 20, 900], 64),
                                          ([3] * 50, 16), ([512, 512], 512)])
def test_frame_tile_pairs_are_the_key_tiles_each_query_tile_spans(frames, tile):
  assert flops.qwen_frame_tile_pairs(frames, tile) == _tile_pairs_brute_force(frames, tile)


@pytest.mark.parametrize("tie", [False, True])
def test_qwen_params_count_every_parameter_of_the_port(tiny, tie):
  config = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, tie_word_embeddings=tie),
                               tie_word_embeddings=tie)
  leaves = jax.tree.leaves(nnx.state(_abstract(config), nnx.Param))
  assert flops.qwen_params(config) == sum(p.size for p in leaves)
  assert flops.qwen_weight_bytes(config, np.float32) == sum(p.size * p.dtype.itemsize for p in leaves)
  tower = jax.tree.leaves(nnx.state(_abstract(config).visual, nnx.Param))
  assert flops.qwen_vision_params(config.vision) == sum(p.size for p in tower)


@pytest.mark.slow
def test_qwen_prefill_flops_match_xla(tiny):
  """One row with two images (6 x 10 and 8 x 6 patches: 108 patches, one frame tile), logits at its last token."""
  grid = np.array([[1, 6, 10], [1, 8, 6]])
  counts = np.prod(grid, 1) // tiny.vision.merge_unit
  ids = np.concatenate([np.full(5, 3), np.full(counts[0], tiny.image_token_id), np.full(4, 3),
                        np.full(counts[1], tiny.image_token_id), np.full(6, 3)])[None].astype(np.int32)
  pixels = jax.ShapeDtypeStruct((int(np.prod(grid, 1).sum()), tiny.vision.patch_dim), jnp.float32)
  forward = lambda m, i, p: m(i, pixel_values=p, image_grid_thw=grid).logits
  text = jax.jit(forward).lower(_abstract(tiny), jnp.asarray(ids), pixels).compile().as_text()
  with pytest.raises(ValueError, match="trip count"):
    flops.hlo_dot_flops(text)                          # the frame attention's dynamic key-tile loop (docstring)
  cost = hlo_cost.program_cost(text)
  assert cost.unknown_trips == 1                       # that loop, one trip per query tile: its real count here
  want = flops.qwen_prefill_flops(tiny, grid, [ids.shape[1]] * tiny.text.num_hidden_layers, executed=True)
  vis = flops.qwen_vision_flops(tiny.vision, grid, executed=True)
  full = len(tiny.vision.fullatt_block_indexes)
  window = tiny.vision.depth - full
  not_taken = full * vis.window_attention / window + window * vis.full_attention / full
  assert cost.flops == want.total + not_taken
  assert want.vision + want.projector == vis.total
  # The architecture's count: each window's and frame's own scores (the port pads chunks and tiles).
  exact = flops.qwen_vision_flops(tiny.vision, grid)
  assert exact.blocks == vis.blocks and exact.merger == vis.merger and exact.total < vis.total


@pytest.mark.slow
def test_qwen_decoder_under_a_pruning_schedule_matches_xla(tiny):
  """The M-RoPE decoder (q/k/v biases, [3, B, S] ids) in three segments cut as TOPS' Table 10 schedule cuts them
  (Stage I 2T, layer 12 -> b1, layer 16 -> b2), then the LM head at the last token: exactly the LLaMA count."""
  text, s1, b1, b2 = 20, 24, 13, 4
  lens = flops.schedule_seq_lens(tiny.text.num_hidden_layers, text, s1, ((12, b1), (16, b2)))
  assert lens == [text + s1] * 12 + [text + b1] * 4 + [text + b2] * 12

  def run(model, x):
    for start, stop in ((0, 12), (12, 16), (16, 28)):
      s = int(lens[start])
      x = x[:, :s]
      positions = jnp.broadcast_to(jnp.arange(s)[None, None] + jnp.arange(3)[:, None, None], (3, 1, s))
      x = model.language_model.run_layers(x, positions, None, start=start, stop=stop).hidden
    return model.head(x[:, -1:])

  x = jax.ShapeDtypeStruct((1, int(lens[0]), tiny.text.hidden_size), jnp.float32)
  compiled = jax.jit(run).lower(_abstract(tiny), x).compile()
  assert flops.hlo_dot_flops(compiled.as_text()) == flops.decoder_prefill_flops(tiny.text, lens, lm_head_positions=1)


def test_qwen_7b_counts_and_table_10():
  """Qwen2.5-VL-7B (`models.shapes`), one 1008 x 1008 image (72 x 72 patches, the papers' 1,296 tokens), a 60-token
  prompt. 8.29e9 parameters (0.68e9 in the tower and merger). Prefill 25.70 TFLOPs: tower 7.15 (blocks' dense
  layers 6.53, full attention 0.55, windows 0.048, patch embedding 0.016), merger 0.116, decoder 18.43, LM head at
  the last token 0.001. TOPS' Table 10 schedule (Stage I 2T, L12 -> b1, L16 -> b2; layers counted from 0, "before")
  feeds the 28 layers 16/28 x 2T visual tokens on average (12 S1 + 4 b1 + 12 b2 = 16 S1, the identity of BACKBONES.md
  1.2), 14% more than T: decoder 4.67 vs 4.16 TFLOPs for a one-shot method at T = 256, 2.71 vs 2.47 at 128. Pruning
  leaves the tower: at T = 256 it is 60% of the pruned prefill.
  """
  config = qwen2_5_vl.Qwen2_5_VLConfig.from_hf(shapes.hf_config(shapes.SHAPES["qwen2.5-vl-7b"]).to_dict())
  assert flops.qwen_params(config) == 8_292_166_656
  grid = [[1, 72, 72]]
  assert sum(flops.qwen_frame_patches(grid)) // config.vision.merge_unit == 1296
  layers, text = config.text.num_hidden_layers, 60
  full = flops.qwen_prefill_flops(config, grid, [text + 1296] * layers)
  assert round(full.total / 1e12, 2) == 25.70 and round(full.decoder / 1e12, 2) == 18.43
  vis = flops.qwen_vision_flops(config.vision, grid)
  assert (round(vis.blocks / 1e12, 2), round(vis.full_attention / 1e12, 2), round(vis.window_attention / 1e12, 3),
          round(vis.merger / 1e12, 3)) == (6.53, 0.55, 0.048, 0.116)
  for target, s1, b1, b2, tops_tf, one_tf in ((256, 512, 281, 77, 4.67, 4.16), (128, 256, 139, 39, 2.71, 2.47)):
    assert 12 * s1 + 4 * b1 + 12 * b2 == 16 * s1
    lens = flops.schedule_seq_lens(layers, text, s1, ((12, b1), (16, b2)))
    assert np.mean(lens) - text == 16 / 28 * s1
    tops = flops.decoder_prefill_flops(config.text, lens)
    assert round(tops / 1e12, 2) == tops_tf
    assert round(flops.decoder_prefill_flops(config.text, [text + target] * layers) / 1e12, 2) == one_tf
  pruned = flops.qwen_prefill_flops(config, grid, flops.schedule_seq_lens(layers, text, 512, ((12, 281), (16, 77))))
  assert 0.59 < pruned.vision / pruned.total < 0.61
