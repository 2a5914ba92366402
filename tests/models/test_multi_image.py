"""Rows of several images through the pruned forward (LLaVA-1.5 / LLaVA-NeXT, tiny random models, CPU, float32).

References: transformers' own multi-image forward (the unpruned path), `prune.select` per image on transformers'
vision numbers and transformers' decoder fed the kept rows (Stage I), and the unpruned model for a Stage II step that
keeps its per-image budget of every image (the per-row count must scale with the row's images).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import model_factories as mf
from models import anyres
from models import pruning
from tops_jax import prune

IMAGE = mf.IMAGE_TOKEN_ID
N = mf.NUM_PATCHES
PINPOINTS = mf.TINY_PINPOINTS
CROP, PATCH = 28, 7
TOL = dict(rtol=1e-4, atol=1e-4)
pytestmark = pytest.mark.usefixtures("float32_matmul")


def _rows(rng, rows, side):
  """Prompts [text; (<image> x count; text) per image] padded on `side`: rows = per row, the image token counts.
  -> (ids int64[B, S], mask int64[B, S])."""
  built = []
  for counts in rows:
    parts = [rng.randint(3, IMAGE - 1, 5)]
    for c in counts:
      parts += [np.full(c, IMAGE), rng.randint(3, IMAGE - 1, 4)]
    built.append(np.concatenate(parts + [rng.randint(3, IMAGE - 1, 9)]))
  s = max(len(r) for r in built)
  ids, mask = np.zeros((len(built), s), np.int64), np.zeros((len(built), s), np.int64)
  for r, row in enumerate(built):
    at = s - len(row) if side == "left" else 0
    ids[r, at:at + len(row)], mask[r, at:at + len(row)] = row, 1
  return ids, mask


def _hf_full(hf, ids, mask, px, sizes=None):
  kw = {} if sizes is None else dict(image_sizes=torch.tensor(sizes))
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px),
              **kw).logits.numpy()


def test_rows_of_several_llava_images_match_transformers(llava_pair):
  hf, model = llava_pair
  rng = np.random.RandomState(0)
  ids, mask = _rows(rng, [(N, N), (N,)], "left")
  px = rng.randn(3, 3, 28, 28).astype(np.float32)
  out = pruning.forward(model, pruning.FULL, ids, mask, px, all_logits=True)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out.logits)[real], _hf_full(hf, ids, mask, px)[real], **TOL)
  # Image m of a row is at packed slots m * N + slot.
  seg = out.segments[0]
  packed = np.asarray(pruning.forward(model, pruning.PruningConfig.flat("tops", stage2=((1, N),)), ids, mask, px)
                      .stage2[0].candidates)
  np.testing.assert_array_equal(packed[0], np.arange(2 * N))
  np.testing.assert_array_equal(packed[1, :N], np.arange(N))
  assert np.all(packed[1, N:] == -1) and np.asarray(seg.visual).sum(-1).tolist() == [2 * N, N]


def test_rows_of_several_llava_next_images_match_transformers(llava_next_pair):
  hf, model = llava_next_pair
  rng = np.random.RandomState(1)
  sizes = np.array([(50, 70), (100, 20), (40, 40)])
  counts = [anyres.num_image_features(s, PINPOINTS, CROP, PATCH) for s in sizes]
  ids, mask = _rows(rng, [counts[:1], counts[1:]], "right")
  px = rng.randn(3, 5, 3, CROP, CROP).astype(np.float32)
  out = pruning.forward(model, pruning.FULL, ids, mask, px, sizes, all_logits=True)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out.logits)[real], _hf_full(hf, ids, mask, px, sizes)[real], **TOL)


def _hf_vision(hf, px):
  """transformers' feature layer (-2): CLS attention float[I, N] and projector output float[I, N, D]."""
  tower = hf.model.vision_tower
  with torch.no_grad():
    out = tower(torch.tensor(px), output_hidden_states=True, output_attentions=True)
    return (out.attentions[-2][:, :, 0, 1:].mean(1).numpy(),
            hf.model.multi_modal_projector(out.hidden_states[-2][:, 1:]).numpy())


def _hf_logits(hf, ids, mask, rows):
  """transformers' decoder on `ids` whose <image> positions take `rows[r]` in order."""
  with torch.no_grad():
    emb = hf.model.language_model.embed_tokens(torch.tensor(ids)).clone()
    for r in range(ids.shape[0]):
      emb[r, torch.tensor(ids[r] == IMAGE)] = torch.as_tensor(rows[r], dtype=emb.dtype)
    h = hf.model.language_model(inputs_embeds=emb, attention_mask=torch.tensor(mask),
                                position_ids=torch.tensor(mf.mask_positions(mask))).last_hidden_state
    return hf.lm_head(h).numpy()


@pytest.mark.parametrize("side", ["left", pytest.param("right", marks=pytest.mark.slow)])
def test_stage1_selects_each_image_on_its_own(llava_pair, side):
  """Three images over two rows (2 + 1): each image keeps its own budget by its own relevance, and the rows hold the
  kept tokens of their images in prompt order."""
  hf, model = llava_pair
  rng = np.random.RandomState(2)
  ids, mask = _rows(rng, [(N, N), (N,)], side)
  px = rng.randn(3, 3, 28, 28).astype(np.float32)
  budget, hp = 5, {"alpha": 0.5, "lam": 1.0}
  cfg = pruning.PruningConfig.flat("tops", stage1_budget=budget, stage1_relevance="cls", stage1_hparams=hp)
  out = pruning.forward(model, cfg, ids, mask, px, all_logits=True)

  cls, proj = _hf_vision(hf, px)
  kept = np.asarray(prune.select("tops", proj, keep=budget, relevance=cls, **hp))      # per image [I, K]
  np.testing.assert_array_equal(np.asarray(out.stage1.kept), kept)
  np.testing.assert_allclose(np.asarray(out.stage1.relevance), cls, rtol=1e-4, atol=1e-6)

  images_of = [(0, 1), (2,)]
  ranks = [set(m * N + k for m, i in enumerate(own) for k in kept[i].tolist()) for own in images_of]
  rows = [np.concatenate([proj[i][np.sort(kept[i])] for i in own]) for own in images_of]
  source = mf.padded_rows(mf.kept_positions(ids, mask, ranks), out.segments[0].source.shape[1], side == "left")
  np.testing.assert_array_equal(np.asarray(out.segments[0].source), source)
  new_ids = np.where(source >= 0, np.take_along_axis(ids, np.maximum(source, 0), 1), 0)
  new_mask = (source >= 0).astype(np.int64)
  real = new_mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out.logits)[real], _hf_logits(hf, new_ids, new_mask, rows)[real], **TOL)


@pytest.mark.slow
def test_stage2_keeps_its_budget_for_every_image(llava_pair):
  """A step that keeps N per image keeps everything: the rows' counts scale with their images, so the logits are
  the unpruned model's; a smaller step keeps keep x images of each row."""
  _, model = llava_pair
  rng = np.random.RandomState(3)
  ids, mask = _rows(rng, [(N, N), (N,)], "left")
  px = rng.randn(3, 3, 28, 28).astype(np.float32)
  real = mask.astype(bool)
  full = pruning.forward(model, pruning.FULL, ids, mask, px, all_logits=True)
  out = pruning.forward(model, pruning.PruningConfig.flat("tops", stage2=((1, N),)), ids, mask, px, all_logits=True)
  np.testing.assert_allclose(np.asarray(out.logits)[real], np.asarray(full.logits)[real], rtol=1e-5, atol=1e-5)

  cfg = pruning.PruningConfig.flat("tops", stage1_budget=6, stage2=((1, 4),))
  out = pruning.forward(model, cfg, ids, mask, px)
  np.testing.assert_array_equal(np.asarray(out.visual_per_layer), [[12, 8, 8], [6, 4, 4]])
  kept = np.asarray(out.stage2[0].kept)
  candidates = np.asarray(out.stage2[0].candidates)
  for r in range(2):
    assert set(kept[r][kept[r] >= 0]) <= set(candidates[r][candidates[r] >= 0])


def test_images_per_row_is_read_or_checked(llava_pair):
  _, model = llava_pair
  rng = np.random.RandomState(4)
  ids, mask = _rows(rng, [(N, N), (N,)], "left")
  px = rng.randn(3, 3, 28, 28).astype(np.float32)
  cfg = pruning.PruningConfig.flat("tops", stage1_budget=4)
  a = pruning.forward(model, cfg, ids, mask, px)
  b = pruning.forward(model, cfg, ids, mask, px, images_per_row=[2, 1])
  np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
  with pytest.raises(ValueError, match="images_per_row sums to 2 images, pixel_values holds 3"):
    pruning.forward(model, cfg, ids, mask, px, images_per_row=[1, 1])
  with pytest.raises(ValueError, match="row 0 holds 32 image tokens, its images \\(0\\) have 16"):
    pruning.forward(model, cfg, ids, mask, px, images_per_row=[1, 2])
  with pytest.raises(ValueError, match="images_per_row must be B=2"):
    pruning.forward(model, cfg, ids, mask, px, images_per_row=[3])
  with pytest.raises(ValueError, match="own Stage II step takes one image per row"):
    pruning.forward(model, pruning.PruningConfig.flat(
        "sparsevlm", stage2=((0, N), (1, N)), stage2_relevance="raters", stage2_raters="sparsevlm",
        stage2_timing="after", stage2_hparams={"version": "v1", "budget": 64}), ids, mask, px)
  with pytest.raises(ValueError, match="fill 3 of the 4 images"):
    pruning.forward(model, cfg, ids, mask, jnp.concatenate([px, px[:1]]))
