"""models.anyres against transformers 5.23's own LLaVA-NeXT geometry, packing and merge (identical integers/values)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next import modeling_llava_next as hf

from models import anyres

# Pinpoint sets: the LLaVA-1.6 default, its 672-max variant, a 28-px toy version, and a set with duplicates and
# non-multiples of the crop size (only geometry that does not need whole crops runs on it).
PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
PINPOINTS_SETS = {
    "llava16": (PINPOINTS_336, 336, 14),
    "llava16_wide": (PINPOINTS_336 + [[336, 336], [1344, 336], [336, 1344]], 336, 14),
    "toy28": ([[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]], 28, 7),
    "toy56_ties": ([[56, 112], [112, 56], [112, 56], [56, 56], [112, 112]], 56, 14),
}
RAGGED_PINPOINTS = [[300, 500], [500, 300], [400, 400], [336, 336], [400, 400]]


def _image_sizes(seed: int, n: int) -> list[tuple[int, int]]:
  """Random sizes from tiny to huge, extreme aspect ratios, plus exact pinpoint-shaped sizes (ties)."""
  rng = np.random.default_rng(seed)
  sizes = [tuple(int(v) for v in rng.integers(1, 2000, size=2)) for _ in range(n)]
  sizes += [(int(h), int(h * r)) for h, r in zip(rng.integers(10, 800, size=n // 4), rng.uniform(0.05, 20, n // 4))
            if int(h * r) > 0]
  sizes += [(h, w) for h in (1, 2, 28, 56, 111, 336, 337, 672, 1008) for w in (1, 3, 28, 56, 84, 336, 672, 1009)]
  return sizes


@pytest.mark.parametrize("name", sorted(PINPOINTS_SETS) + ["ragged"])
def test_select_best_resolution_grid_and_crops_match_transformers(name):
  pinpoints, crop, _ = PINPOINTS_SETS.get(name, (RAGGED_PINPOINTS, 336, 14))
  for size in _image_sizes(seed=len(name), n=400):
    best = anyres.select_best_resolution(size, pinpoints)
    assert best == tuple(hf_select_best_resolution(size, pinpoints)), size
    assert anyres.grid_shape(size, pinpoints, crop) == tuple(hf.get_anyres_image_grid_shape(size, pinpoints, crop))
    n = anyres.num_crops(np.array(size), pinpoints, crop)
    assert n == hf.image_size_to_num_patches(np.array(size), pinpoints, crop), size
    assert n <= anyres.max_num_crops(pinpoints, crop)


@pytest.mark.parametrize("name", sorted(PINPOINTS_SETS))
def test_unpad_image_matches_transformers(name):
  pinpoints, crop, patch = PINPOINTS_SETS[name]
  g = crop // patch
  rng = np.random.default_rng(0)
  for size in _image_sizes(seed=1, n=60):
    rows, cols = anyres.grid_shape(size, pinpoints, crop)
    fmap = rng.standard_normal((rows * g, cols * g, 3)).astype(np.float32)
    want = hf.unpad_image(torch.from_numpy(fmap).permute(2, 0, 1), torch.tensor(size)).permute(1, 2, 0).numpy()
    got = anyres.unpad_image(fmap, size)
    np.testing.assert_array_equal(got, want)
    top, bottom, left, right = anyres.unpad_bounds(size, fmap.shape[:2])
    assert (bottom - top, right - left) == want.shape[:2]


def _tiny_hf_model(pinpoints, crop, patch, width=8):
  """A tiny LlavaNextModel: its pack_image_features only reads the config and image_newline."""
  config = LlavaNextConfig(
      vision_config=CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=crop, patch_size=patch),
      text_config=LlamaConfig(hidden_size=width, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=2, vocab_size=64),
      image_grid_pinpoints=pinpoints, image_token_index=63)
  torch.manual_seed(0)
  return hf.LlavaNextModel(config).eval()


@pytest.mark.parametrize("name", ["llava16", "toy28", "toy56_ties"])
def test_pack_features_matches_transformers_pack_image_features(name):
  pinpoints, crop, patch = PINPOINTS_SETS[name]
  width = 8
  model = _tiny_hf_model(pinpoints, crop, patch, width)
  g = crop // patch
  sizes = _image_sizes(seed=3, n=12)[::3] + [(crop, 2 * crop), (3 * crop, crop), (100, 1000), (1000, 100)]
  layout = anyres.pack_layout(np.array(sizes), pinpoints, crop, patch)
  assert layout.source.shape[1] == anyres.max_num_features(pinpoints, crop, patch)
  p = anyres.max_num_crops(pinpoints, crop)
  rng = np.random.default_rng(1)
  crop_feats = rng.standard_normal((len(sizes), p, g * g, width)).astype(np.float32)
  newline = model.image_newline.detach().numpy()

  hf_input = [torch.from_numpy(crop_feats[i, :anyres.num_crops(s, pinpoints, crop)]) for i, s in enumerate(sizes)]
  with torch.no_grad():
    want, want_lens = model.pack_image_features(hf_input, torch.tensor(sizes), "default", model.image_newline)
  got = jax.jit(anyres.pack_features)(jnp.asarray(crop_feats), layout.source, layout.newline, layout.valid,
                                      jnp.asarray(newline))
  np.testing.assert_array_equal(layout.counts, want_lens.numpy())
  for i, s in enumerate(sizes):
    n = int(layout.counts[i])
    assert n == anyres.num_image_features(s, pinpoints, crop, patch)
    np.testing.assert_array_equal(np.asarray(got[i, :n]), want[i].numpy())
    np.testing.assert_array_equal(np.asarray(got[i, n:]), 0.0)
    # Newline slots hold image_newline, every other valid slot names its crop, padding names none.
    np.testing.assert_array_equal(np.asarray(got[i, :n])[layout.newline[i, :n]],
                                  np.broadcast_to(newline, (int(layout.newline[i].sum()), width)))
    assert np.all((layout.crop[i] >= 0) == (layout.valid[i] & ~layout.newline[i]))
    rows, cols = layout.grid[i]
    assert (rows, cols) == anyres.grid_shape(s, pinpoints, crop)
    assert np.all(layout.crop[i, :g * g] == 0) and layout.crop[i].max() <= rows * cols
    assert np.all(layout.source[i][layout.crop[i] >= 0] // (g * g) == layout.crop[i][layout.crop[i] >= 0])


def test_tile_unpad_newline_compose_to_the_packed_row():
  pinpoints, crop, patch = PINPOINTS_SETS["toy28"]
  g, size = crop // patch, (40, 90)
  rows, cols = anyres.grid_shape(size, pinpoints, crop)
  feats = np.random.default_rng(2).standard_normal((1 + rows * cols, g * g, 5)).astype(np.float32)
  newline = np.arange(5, dtype=np.float32)
  fmap = anyres.unpad_image(anyres.tile_crops(feats[1:], rows, cols), size)
  want = np.concatenate([feats[0], anyres.add_image_newline(fmap, newline)])
  layout = anyres.pack_layout(np.array([size]), pinpoints, crop, patch)
  got = anyres.pack_features(jnp.asarray(feats[None]), layout.source, layout.newline, layout.valid,
                             jnp.asarray(newline))
  np.testing.assert_array_equal(np.asarray(got[0, :len(want)]), want)
  # tile_crops is the transpose HF does with view/permute: crop (r, c) token (y, x) lands at (r*g + y, c*g + x).
  tiled = anyres.tile_crops(feats[1:], rows, cols)
  for r, c, y, x in itertools.product(range(rows), range(cols), range(g), range(g)):
    np.testing.assert_array_equal(tiled[r * g + y, c * g + x], feats[1 + r * cols + c, y * g + x])


@pytest.mark.parametrize("image_counts", [(1, 1, 1), (2, 0, 1), (0, 3, 0)])
def test_merge_into_embeddings_matches_masked_scatter(image_counts):
  """Several, one or no images per sequence; the k-th <image> slot gets the k-th valid packed token."""
  rng = np.random.default_rng(sum(image_counts))
  d, n, s = 4, 9, 40
  lens = rng.integers(3, n + 1, size=sum(image_counts))
  packed = rng.standard_normal((len(lens), n, d)).astype(np.float32)
  valid = np.arange(n)[None] < lens[:, None]
  embeds = rng.standard_normal((len(image_counts), s, d)).astype(np.float32)
  mask = np.zeros((len(image_counts), s), bool)
  lens_iter = iter(lens)
  for row, k in enumerate(image_counts):
    total = sum(next(lens_iter) for _ in range(k))
    mask[row, rng.choice(s, size=total, replace=False)] = True
  want = torch.from_numpy(embeds).masked_scatter(torch.from_numpy(mask)[..., None],
                                                 torch.from_numpy(packed[valid])).numpy()
  got = jax.jit(anyres.merge_into_embeddings)(jnp.asarray(embeds), jnp.asarray(mask), jnp.asarray(packed),
                                              jnp.asarray(valid))
  np.testing.assert_array_equal(np.asarray(got), want)


def test_bad_inputs_raise():
  pinpoints, crop, patch = PINPOINTS_SETS["toy28"]
  with pytest.raises(ValueError, match="image_sizes must be int"):
    anyres.pack_layout(np.array([28, 28]), pinpoints, crop, patch)
  with pytest.raises(ValueError, match="positive"):
    anyres.select_best_resolution((0, 10), pinpoints)
  with pytest.raises(ValueError, match="non-empty"):
    anyres.select_best_resolution((10, 10), [])
  with pytest.raises(ValueError, match="not a multiple of the crop size"):
    anyres.num_image_features((10, 10), [[30, 60]], crop, patch)
  with pytest.raises(ValueError, match="more than num_tokens"):
    anyres.pack_layout(np.array([[56, 56]]), pinpoints, crop, patch, num_tokens=20)
  layout = anyres.pack_layout(np.array([[56, 56]]), pinpoints, crop, patch)
  feats = jnp.zeros((1, 2, 16, 3))  # fewer crops than the 2x2 grid needs
  with pytest.raises(ValueError, match="pad pixel_values"):
    anyres.pack_features(feats, layout.source, layout.newline, layout.valid, jnp.zeros(3))
  with pytest.raises(ValueError, match="<image> tokens"):
    anyres.merge_into_embeddings(jnp.zeros((1, 5, 3)), jnp.ones((1, 5), bool), jnp.zeros((1, 4, 3)),
                                 jnp.ones((1, 4), bool))


@pytest.mark.parametrize("name", sorted(PINPOINTS_SETS) + ["testbed"])
def test_crop_grid_matches_transformers_resize_and_pad(name):
  """crop_grid against transformers' own integers (`get_patch_output_size`, the processor's `_get_padding_size`) and
  against what the PIL processor does to an all-white image: the resized image is the white block of the padded
  pinpoint, at (pad_top, pad_left)."""
  from transformers import LlavaNextImageProcessorPil  # pylint: disable=g-import-not-at-top
  from transformers.image_processing_utils import get_patch_output_size  # pylint: disable=g-import-not-at-top
  from transformers.image_utils import ChannelDimension, PILImageResampling  # pylint: disable=g-import-not-at-top
  if name == "testbed":
    pinpoints, crop = [[96, 96], [96, 144], [144, 96]], 48
  else:
    pinpoints, crop, _ = PINPOINTS_SETS[name]
  processor = LlavaNextImageProcessorPil()
  sizes = _image_sizes(seed=len(name), n=200)
  for k, size in enumerate(sizes):
    got = anyres.crop_grid(size, pinpoints, crop)
    best = tuple(hf_select_best_resolution(size, pinpoints))
    assert (got.rows, got.cols) == tuple(hf.get_anyres_image_grid_shape(size, pinpoints, crop)), size
    image = np.full((3, *size), 255, np.uint8)
    assert (got.height, got.width) == get_patch_output_size(image, best, ChannelDimension.FIRST), size
    (top, _), (left, _) = processor._get_padding_size((got.height, got.width), best)  # pylint: disable=protected-access
    assert (got.pad_top, got.pad_left) == (top, left), size
    if k % 8 == 0 and max(best) <= 1344:   # the processor's pixels, on a sample of the sizes
      resized = processor._resize_for_patching(image, best, PILImageResampling.BICUBIC)  # pylint: disable=protected-access
      padded = processor._pad_for_patching(resized, best)  # pylint: disable=protected-access
      assert padded.shape[1:] == best
      ys, xs = np.nonzero(padded[0])
      assert (ys.min(), xs.min(), ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) == (
          got.pad_top, got.pad_left, got.height, got.width), size
  with pytest.raises(ValueError, match="positive"):
    anyres.crop_grid((0, 10), pinpoints, crop)
