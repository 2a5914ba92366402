"""Stage I's official LLaVA-NeXT layouts (CDPruner, DivPrune, SCOPE) against NumPy references in the official form.

Each reference rebuilds what the method's official `prepare_inputs_labels_for_multimodal` hands to the LLM: the
per-crop picks as boolean masks over the crop's T tokens, the grid crops tiled into one canvas
(view(nh, nw, g, g) -> permute(0, 2, 1, 3) -> (nh*g, nw*g)), LLaVA's `unpad_image` (PIL (width, height) order,
`int()` rounding), the newline column, row-major flattening. The references read only the model's per-crop
intermediates (`visual_tokens`: projector outputs, vision features, CLS attention; the CLIP image head for CDPruner's
relevance) and never `models.pruning.stage1`. Selection is `prune.select_order` on ONE crop (DivPrune: one packed
image) at a time: the selection rules are tested in tests/tops_jax, the layouts here.

Official code read (reading only):
- CDPruner: Theia-4869/CDPruner llava/model/llava_arch.py @ ed9c12d (`encode_images`: one DPP per crop of
  `visual_token_num` tokens, relevance min-max over everything encoded at once;
  `prepare_inputs_labels_for_multimodal`: base crop `base_image_feature[base_index_mask]`, grid masks tiled,
  unpadded, a True newline column, flattened) and README (LLaVA-NeXT: `visual_token_num` = T / 5 per crop).
- DivPrune: vbdi/divprune LLaVA/llava/model/llava_arch.py @ 799e2d9 (`DivPrune`: int(round(ratio * L)) of the
  whole image sequence L, newlines included; kept indices sorted back into sequence order).
- SCOPE: kinredon/SCOPE scope/clip_encoder.py, scope/llava_arch.py, scope/main.py @ a01b98f
  (`CLIPVisionTower_SCOPE.forward`: int(num_token / crops) per crop over layer -2 features, CLS attention
  saliency, picks in index order; `restore_image_features_sorted_scope`: 576-slot scatter per grid crop, canvas
  view/permute, masked row-major, no unpadding, no newlines; the projector runs on the kept tokens).

Tiny geometry (tests/model_factories.py): 28 px crops of 7 px patches, g = 4, T = 16 tokens per crop, at most 5
crops, so the papers' 2880 = 5 x 576 is NOMINAL = 5 x 16 = 80 here. Two images with different grids, both cut by
unpadding: 29x47 -> 2x2 grid, canvas rows 2..5 of 8 kept (52 packed tokens); 10x13 -> 1x2 grid, canvas columns
1..6 of 8 kept (44 packed tokens; 3 real crops of the 5 in pixel_values, so two padding crops).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_factories as mf
from models import clip_text
from models import pruning
from tops_jax import prumerge
from tops_jax import prune

IMAGE = mf.IMAGE_TOKEN_ID
PINPOINTS = mf.TINY_PINPOINTS
CROP, PATCH = 28, 7
G = CROP // PATCH
T = G * G
NOMINAL = 5 * T
SIZES = ((29, 47), (10, 13))            # (height, width)
GRIDS = ((2, 2), (1, 2))                # (rows nh, cols nw) of grid crops, hand-checked for the tiny pinpoints
BUDGET = 24                             # SCOPE int(24 / 5) = 4, int(24 / 3) = 8 per crop; DivPrune 16 and 13
CDPRUNER_BUDGET = 14                    # 14 // 5 = 2 per crop: some unpadded canvas rows keep no token
TOL = dict(rtol=1e-5, atol=1e-5)
# The models are llava and llava_next: ports of tiny random checkpoints, from tests/models/conftest.py.
pytestmark = pytest.mark.usefixtures("float32_matmul")

_TOKENS = jax.jit(lambda m, px, layout: m.visual_tokens(px, layout, relevance=("cls",)))


def _clip(model, seed=0, width=8):
  """A random CLIP image head (post_layernorm + visual_projection) and one text direction per row (B = 2)."""
  head = clip_text.CLIPVisionProjection(model.config.vision, width, rngs=nnx.Rngs(seed))
  text = np.random.RandomState(seed).randn(2, width).astype(np.float32)
  return pruning.ClipText(image_head=head, text_embeds=jnp.asarray(text / np.linalg.norm(text, axis=-1,
                                                                                          keepdims=True)))


def _next_batch(side, seed):
  rng = np.random.RandomState(seed)
  counts = [len(_packed_ids(size, grid)) for size, grid in zip(SIZES, GRIDS)]
  ids, mask = mf.prompt_rows(rng, (7, 20), counts, (30, 12), side)
  return ids, mask, rng.randn(2, 5, 3, CROP, CROP).astype(np.float32), np.array(SIZES)


# ------------------------------------------------------------------------------ the official layout, in NumPy


def _unpad(canvas, size):
  """LLaVA's `unpad_image` on a [H, W, ...] map (the official reads PIL's (width, height); `size` is (h, w))."""
  original_width, original_height = size[1], size[0]
  current_height, current_width = canvas.shape[:2]
  if original_width / original_height > current_width / current_height:
    new_height = int(original_height * (current_width / original_width))
    padding = (current_height - new_height) // 2
    return canvas[padding:current_height - padding]
  new_width = int(original_width * (current_height / original_height))
  padding = (current_width - new_width) // 2
  return canvas[:, padding:current_width - padding]


def _canvas(grid_crops, grid):
  """[nh * nw, T, ...] grid crops -> [nh * g, nw * g, ...]: view(nh, nw, g, g) -> permute(0, 2, 1, 3)."""
  nh, nw = grid
  x = grid_crops.reshape(nh, nw, G, G, *grid_crops.shape[2:])
  return np.swapaxes(x, 1, 2).reshape(nh * G, nw * G, *grid_crops.shape[2:])


def _crop_ids(grid):
  """int[crops, T]: the flat index crop * T + token of every token of an image's real crops."""
  return np.arange((1 + grid[0] * grid[1]) * T).reshape(-1, T)


def _packed_ids(size, grid):
  """The image sequence LLaVA-NeXT builds, as crop * T + token ids (-1 = image_newline): the base crop, then the
  unpadded canvas row by row, each row ended by a newline column."""
  ids = _crop_ids(grid)
  canvas = _unpad(_canvas(ids[1:], grid), size)
  canvas = np.concatenate([canvas, np.full((canvas.shape[0], 1), -1)], axis=1)
  return np.concatenate([ids[0], canvas.reshape(-1)])


def _embeds_of(ids, crop_embeds, newline):
  """Rows of flat ids: crop_embeds float[P, T, D] at ids >= 0, `newline` float[D] at -1."""
  flat = crop_embeds.reshape(-1, crop_embeds.shape[-1])
  return np.where((ids >= 0)[:, None], flat[np.maximum(ids, 0)], newline[None])


def _pick_masks(order, crops):
  """Per-crop greedy orders (lists of token indices) -> bool[crops, T] index masks (the official scatter_)."""
  masks = np.zeros((crops, T), bool)
  for c, picks in enumerate(order):
    masks[c, np.asarray(picks, int)] = True
  return masks


def _cdpruner_llm(masks, size, grid):
  """CDPruner's LLM sequence from bool[crops, T] index masks: (flat ids, packed slots) in LLM order."""
  packed = _packed_ids(size, grid)
  base = masks[0]
  grid_mask = _unpad(_canvas(masks[1:], grid), size)
  grid_mask = np.concatenate([grid_mask, np.ones((grid_mask.shape[0], 1), bool)], axis=1).reshape(-1)
  slots = np.arange(len(packed))
  keep = np.concatenate([base, grid_mask])
  return packed[keep], slots[keep]


def _scope_llm(masks, size, grid):
  """SCOPE's LLM sequence from bool[crops, T] masks: (flat ids, packed slot or -1 where unpadding cuts the token)."""
  ids = _crop_ids(grid)
  llm = np.concatenate([ids[0][masks[0]], _canvas(ids[1:], grid)[_canvas(masks[1:], grid)]])
  packed = _packed_ids(size, grid)
  slot_of = {int(i): s for s, i in enumerate(packed) if i >= 0}
  return llm, np.array([slot_of.get(int(i), -1) for i in llm])


# --------------------------------------------------------------------------------------------- the checks


def _check(out, model, ids, mask, side, *, image_rows, kept, slots=None):
  """The decoder input of a Stage I forward against the reference LLM sequence.

  image_rows: per row float[n_r, D], the embeddings the LLM receives in order; kept: per row the expected
  `stage1.kept` prefix (-1 after it); slots: per row the packed slots of the rows when they are a subset of the
  packed sequence (their own <image> positions stay), None when the rows take the first n_r positions of the run.
  """
  seg = out.segments[0]
  size = seg.source.shape[1]
  counts = [len(x) for x in image_rows]
  if slots is None:
    accept = [range(n) for n in counts]
  else:
    for s in slots:
      assert list(s) == sorted(s), "a packed-order layout must hand the rows over in packed order"
    accept = [frozenset(int(x) for x in s) for s in slots]
  source = mf.padded_rows(mf.kept_positions(ids, mask, accept), size, side == "left")
  np.testing.assert_array_equal(np.asarray(seg.source), source)
  real = source >= 0
  np.testing.assert_array_equal(np.asarray(seg.mask), real)
  np.testing.assert_array_equal(np.asarray(seg.positions)[0][real], (np.cumsum(real, axis=-1) - 1)[real])
  new_ids = np.where(real, np.take_along_axis(ids, np.maximum(source, 0), 1), -1)
  visual = new_ids == IMAGE
  np.testing.assert_array_equal(np.asarray(seg.visual), visual)
  np.testing.assert_array_equal(np.asarray(out.visual_per_layer[:, 0]), counts)
  emb = np.asarray(out.inputs_embeds)
  table = np.asarray(model.language_model.embed_tokens.embedding[...])
  for r in range(ids.shape[0]):
    np.testing.assert_allclose(emb[r][visual[r]], image_rows[r], **TOL)
    text = real[r] & ~visual[r]
    np.testing.assert_array_equal(emb[r][text], table[new_ids[r][text]])
  got = np.asarray(out.stage1.kept)
  for r in range(ids.shape[0]):
    assert len(kept[r]) <= got.shape[1]
    np.testing.assert_array_equal(got[r], np.pad(np.asarray(kept[r], int), (0, got.shape[1] - len(kept[r])),
                                                 constant_values=-1), err_msg=f"stage1.kept, row {r}")


def _intermediates(model, px, sizes):
  tokens = _TOKENS(model, jnp.asarray(px), model.layout(sizes, 2))
  return (np.asarray(tokens.group_embeds), np.asarray(tokens.group_features), np.asarray(tokens.group_relevance["cls"]),
          np.asarray(tokens.embeds), np.asarray(model.image_newline[...]))


@pytest.mark.slow
def test_reference_sequence_is_the_model_packing(llava_next):
  """The official NumPy build (canvas, unpad, newline column) gives the model's packed sequence, the anchor every
  reference below stands on."""
  _, _, px, sizes = _next_batch("left", 0)
  crop_embeds, _, _, packed, newline = _intermediates(llava_next, px, sizes)
  layout = llava_next.layout(sizes, 2)
  np.testing.assert_array_equal(np.asarray(layout.grid), GRIDS)
  for r, (size, grid) in enumerate(zip(SIZES, GRIDS)):
    seq = _packed_ids(size, grid)
    assert int(layout.counts[r]) == len(seq)
    np.testing.assert_array_equal(np.asarray(layout.source)[r, :len(seq)], seq)
    np.testing.assert_allclose(packed[r, :len(seq)], _embeds_of(seq, crop_embeds[r], newline), **TOL)
  assert len(_packed_ids(SIZES[0], GRIDS[0])) == 16 + 4 * 9 and len(_packed_ids(SIZES[1], GRIDS[1])) == 16 + 4 * 7


@pytest.mark.slow
def test_cdpruner_unpadded_variant_layout(llava_next):
  """The padded_unpad variant (what CDPruner's `unpad` branch would do, were it not stripped; the official layout is
  tested in test_cdpruner_clip.py): T // 5 per crop over its 16 tokens before unpadding (relevance: negated CLIP
  cosine, min-max over all the image's crops), masks tiled + unpadded, every newline of the unpadded rows kept; base
  crop, then the grid rows."""
  model = llava_next
  cfg = pruning.method_config("cdpruner", family="llava-next", target=CDPRUNER_BUDGET, num_layers=3,
                              grid="padded_unpad", newlines="keep")
  assert (cfg.stage1_scope, cfg.stage1_grid, cfg.newlines, cfg.stage1_relevance) == (
      "crop_fixed", "padded_unpad", "keep", "clip_text")
  ids, mask, px, sizes = _next_batch("left", 1)
  clip = _clip(model)
  out = pruning.forward(model, cfg, ids, mask, px, sizes, clip=clip)

  crop_embeds, crop_features, _, _, newline = _intermediates(model, px, sizes)
  image_embeds = np.asarray(clip.image_head(jnp.asarray(crop_features)))
  text = np.asarray(clip.text_embeds)
  hp = dict(cfg.stage1_hparams, rescale=False)
  rows, kept, slots, cut, empty = [], [], [], 0, 0
  for r, (size, grid) in enumerate(zip(SIZES, GRIDS)):
    crops = 1 + grid[0] * grid[1]
    unit = image_embeds[r, :crops] / np.linalg.norm(image_embeds[r, :crops], axis=-1, keepdims=True)
    score = -(unit @ text[r])                                            # [crops, T], one text direction
    rel = (score - score.min() + 1e-6) / (score.max() - score.min())       # over every crop of the image
    seq = _packed_ids(size, grid)
    got_rel = np.asarray(out.stage1.relevance)[r, :len(seq)]
    np.testing.assert_allclose(got_rel[seq >= 0], rel.reshape(-1)[seq[seq >= 0]], rtol=1e-4, atol=1e-6)
    order = [np.asarray(prune.select_order("cdpruner", crop_embeds[r, c], keep=CDPRUNER_BUDGET // 5,
                                           relevance=rel[c], **hp)) for c in range(crops)]
    masks = _pick_masks(order, crops)
    empty += (~_unpad(_canvas(masks[1:], grid), size).any(axis=1)).sum()
    llm_ids, llm_slots = _cdpruner_llm(masks, size, grid)
    rows.append(_embeds_of(llm_ids, crop_embeds[r], newline))
    kept.append(llm_slots[llm_ids >= 0])
    slots.append(llm_slots)
    cut += masks.sum() - (llm_ids >= 0).sum()
  assert cut > 0 and empty > 0, "the case must have picks that unpadding removes and rows that keep no token"
  _check(out, model, ids, mask, "left", image_rows=rows, kept=kept, slots=slots)


@pytest.mark.slow
def test_divprune_official_layout(llava_next):
  """The whole packed sequence (newlines too) is one candidate set; int(round(T / 2880 * L)) kept, packed order."""
  model = llava_next
  cfg = pruning.method_config("divprune", family="llava-next", target=BUDGET, num_layers=3)
  assert (cfg.stage1_scope, cfg.newlines) == ("ratio", "candidates")
  ids, mask, px, sizes = _next_batch("right", 2)
  out = pruning.forward(model, cfg, ids, mask, px, sizes)

  crop_embeds, _, _, _, newline = _intermediates(model, px, sizes)
  rows, kept = [], []
  for r, (size, grid) in enumerate(zip(SIZES, GRIDS)):
    seq = _packed_ids(size, grid)
    feats = _embeds_of(seq, crop_embeds[r], newline)                      # the image's part of new_input_embeds
    count = int(round(BUDGET / NOMINAL * len(seq)))
    picks = np.sort(np.asarray(prune.select_order("divprune", feats, keep=count, **dict(cfg.stage1_hparams))))
    rows.append(feats[picks])
    kept.append(picks)
  assert [len(k) for k in kept] == [16, 13]                              # round(15.6), round(13.2)
  _check(out, model, ids, mask, "right", image_rows=rows, kept=kept, slots=kept)


@pytest.mark.slow
def test_scope_official_layout(llava_next):
  """int(T / crops) per real crop over its 16 layer -2 tokens (CLS attention saliency), no unpadding, no newlines;
  base crop ascending, then the grid picks row-major over the padded canvas."""
  model = llava_next
  cfg = pruning.method_config("scope", family="llava-next", target=BUDGET, num_layers=3)
  assert (cfg.stage1_scope, cfg.stage1_grid, cfg.stage1_features, cfg.newlines) == (
      "crop_divided", "padded", "vision", "drop")
  ids, mask, px, sizes = _next_batch("left", 3)
  out = pruning.forward(model, cfg, ids, mask, px, sizes)

  crop_embeds, crop_features, cls, _, newline = _intermediates(model, px, sizes)
  rows, kept, crossing, cut = [], [], False, 0
  for r, (size, grid) in enumerate(zip(SIZES, GRIDS)):
    crops = 1 + grid[0] * grid[1]
    per_crop = int(BUDGET / crops)
    order = [np.asarray(prune.select_order("scope", crop_features[r, c], keep=per_crop, relevance=cls[r, c],
                                           **dict(cfg.stage1_hparams))) for c in range(crops)]
    llm_ids, llm_slots = _scope_llm(_pick_masks(order, crops), size, grid)
    assert len(llm_ids) == per_crop * crops
    rows.append(_embeds_of(llm_ids, crop_embeds[r], newline))
    kept.append(llm_slots)
    cut += (llm_slots < 0).sum()
    grid_crop = llm_ids[per_crop:] // T
    crossing |= bool(np.any(np.diff(grid_crop) < 0))                      # canvas rows interleave the crops
  assert cut > 0 and crossing, "the case must keep tokens that unpadding would cut and interleave crops"
  _check(out, model, ids, mask, "left", image_rows=rows, kept=kept)


# ------------------------------------------------------------------------------------------- LLaVA-1.5


def _llava_batch(seed):
  rng = np.random.RandomState(seed)
  ids, mask = mf.prompt_rows(rng, (6, 25), (mf.NUM_PATCHES, mf.NUM_PATCHES), (30, 11), "left")
  return ids, mask, rng.randn(2, 3, CROP, CROP).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cdpruner", "divprune", "scope"])
def test_llava_official_layouts_keep_the_global_selection(llava, method):
  """One crop, no padding, no newlines: the NeXT layout of each method keeps what one global selection keeps. The
  LLaVA-1.5 protocol is that global selection (run for CDPruner, whose global path rescales the CLIP relevance on
  its own; the plain global paths are tests/models/test_pruning.py's)."""
  model = llava
  budget = 6
  ids, mask, px = _llava_batch(4)
  nxt = pruning.method_config(method, family="llava-next", target=budget, num_layers=3, crops=1)   # one crop
  one = pruning.method_config(method, family="llava-1.5", target=budget, num_layers=3)
  assert one.stage1_scope == "global" and nxt.stage1_scope != "global"
  clip = _clip(model) if method == "cdpruner" else None

  tokens = jax.jit(lambda m, x: m.visual_tokens(x, None, relevance=("cls",)))(model, jnp.asarray(px))
  proj, feats, cls = (np.asarray(a) for a in (tokens.embeds, tokens.features, tokens.relevance["cls"]))
  hp = dict(one.stage1_hparams)
  if method == "cdpruner":
    emb = np.asarray(clip.image_head(jnp.asarray(feats)))
    score = -np.einsum("bne,be->bn", emb / np.linalg.norm(emb, axis=-1, keepdims=True), np.asarray(clip.text_embeds))
    lo, hi = score.min(-1, keepdims=True), score.max(-1, keepdims=True)
    want = prune.select(method, proj, keep=budget, relevance=(score - lo + 1e-6) / (hi - lo), rescale=False, **hp)
  elif method == "scope":
    want = prune.select(method, feats, keep=budget, relevance=cls, **hp)
  else:
    want = prune.select(method, proj, keep=budget, **hp)
  want = np.asarray(want)
  rows = [proj[r, want[r]] for r in range(2)]
  for cfg in (nxt, one) if method == "cdpruner" else (nxt,):
    out = pruning.forward(model, cfg, ids, mask, px, clip=clip)
    # SCOPE's canvas layout hands its rows to the first n <image> positions; the others keep their own positions.
    slots = None if cfg.stage1_grid == "padded" else list(want)
    _check(out, model, ids, mask, "left", image_rows=rows, kept=list(want), slots=slots)


@pytest.mark.parametrize("dedup", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_prumerge_plus_hands_the_llm_its_official_rows(llava, dedup):
  """PruMerge+ (LLaVA-1.5): the decoder gets the K merged rows in the official order (a strided position that is
  also a top token twice, unless dedup), then the extra token; `stage1.kept` lists the K indices, duplicates too.
  The merge itself is tests/tops_jax/test_prumerge.py's (a NumPy transcription of the official function)."""
  model, budget = llava, 8
  ids, mask, px = _llava_batch(4)
  cfg = pruning.method_config("prumerge_plus", family="llava-1.5", target=budget, num_layers=3, dedup=dedup)
  tokens = jax.jit(lambda m, x: m.visual_tokens(x, None, extras=("last_qk",)))(model, jnp.asarray(px))
  q, k = tokens.extras["last_query"], tokens.extras["last_keys"]
  seq = jax.vmap(lambda f, r, kk: prumerge.merge_sequence(f, r, keep=budget, dedup=dedup, keys=kk))(
      tokens.features, prumerge.cls_attention(q, k), k[:, 1:])
  rows = np.asarray(model.project(seq.tokens))
  want = np.asarray(seq.indices)
  assert np.asarray(seq.mask).all()
  assert any(len(set(w.tolist())) < budget for w in want) != dedup       # the case holds a duplicate
  out = pruning.forward(model, cfg, ids, mask, px)
  _check(out, model, ids, mask, "left", image_rows=list(rows), kept=list(want))


# ---------------------------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="cdpruner", stage1_budget=20, stage1_relevance="cls", stage1_scope="crop_fixed",
          stage1_grid="padded", newlines="keep"), "stage1_grid='padded'.*newlines must be 'drop'"),
    (dict(method="visionzip", stage1_budget=20, stage1_scope="ratio"), "stage1_scope='ratio'"),
    (dict(method="pooling", stage1_budget=20, stage1_relevance="none", stage1_scope="crop_fixed"),
     "merges tokens"),
    (dict(method="scope", stage1_budget=20, stage1_grid="padded"), "needs stage1_scope 'crop_fixed' or"),
    (dict(method="divprune", stage1_budget=20, stage1_relevance="none", stage1_scope="per_crop",
          newlines="candidates"), "newlines='candidates'"),
    (dict(method="tops", stage1_budget=20, stage1_relevance="clip_text"), "clip_text.*CDPruner"),
    (dict(method="scope", stage1_budget=20, stage1_features="pixels"), "stage1_features must be one of"),
    (dict(method="scope", stage1_budget=20, stage1_grid="canvas"), "stage1_grid must be one of"),
])
def test_bad_layouts_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pruning.PruningConfig.flat(**kwargs)


@pytest.mark.slow
def test_bad_official_protocols_and_inputs_raise(llava_next):
  with pytest.raises(ValueError, match="newlines must be 'drop'"):
    pruning.method_config("scope", family="llava-next", target=BUDGET, num_layers=3, newlines="keep")
  with pytest.raises(ValueError, match="unknown override"):
    pruning.method_config("divprune", family="llava-next", target=BUDGET, num_layers=3, dominant=3)
  ids, mask, px, sizes = _next_batch("left", 0)
  with pytest.raises(ValueError, match="needs `clip`"):
    pruning.forward(llava_next, pruning.method_config("cdpruner", family="llava-next", target=BUDGET, num_layers=3),
                    ids, mask, px, sizes)
  # int(45 / 3) = 15 of the 16 tokens of each of image 1's 3 crops: 45 rows, more than its 44 <image> tokens
  # (image 0: int(45 / 5) * 5 = 45 rows of its 52 fit).
  with pytest.raises(ValueError, match="image 1 has 44 <image> tokens, fewer than the 45 rows its crop_divided"):
    pruning.forward(llava_next, pruning.method_config("scope", family="llava-next", target=45, num_layers=3),
                    ids, mask, px, sizes)
