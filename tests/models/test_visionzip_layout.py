"""VisionZip's official protocol (`pruning.method_config("visionzip", ...)`) against transformers and the official
VisionZip loop written in NumPy.

The reference never reads the port: transformers' tiny LLaVA-NeXT / LLaVA-1.5 give, per crop, the hidden states of
vision layer -2 (CLS included), that layer's CLS attention and its keys; the official loop compresses each crop to
[CLS, dominant, contextual]; transformers' projector projects them; the official LLaVA-NeXT code orders the crops'
outputs. The port's pruned forward must hand exactly those rows to the LLM (`PruneOutput.inputs_embeds` at the image
positions: the row count and every row).

Official code read (dvlab-research/VisionZip @ 3151f6df4fca36a4cd1c985e5956e725b1f9ad02, reading only):
- visionzip/main.py `visionzip(model, dominant, contextual)`: `apply_info(..., dominant_num=dominant - 1, ...)`, so
  `topk(dominant - 1)` patches plus the CLS token.
- visionzip/utils.py `CLIPAttention_forward`: `metric` = the raw keys (k_proj of the normed layer input, before any
  scaling) MEAN over heads; `apply_info` sets r = 1 at layer index 22 of 24 (= layers[-2]), whose output is
  `hidden_states[-2]`.
- visionzip/clip_encoder.py `CLIPVisionTower_VisionZip.forward`: CLS attention `attentions[-2][:, :, 0, 1:]` SUMMED
  over heads, topk indices + 1 with 0 prepended (`all_indices`); dominant tokens = `masked_select` of the hidden
  states at those indices (index order: CLS, then the dominant patches ascending); the R remaining tokens' metric
  normalised, targets `arange(0, R, max(1, R // C))[:C]`, every other remaining token assigned to the target of
  highest cosine (argmax), target hidden state + sum(assigned) / max(count, 1); output cat([dominant, contextual]).
- visionzip/llava_arch.py `prepare_inputs_labels_for_multimodal_visionzip` / `restore_image_features_sorted`
  (LLaVA-NeXT, spatial_unpad): the projector runs on every crop's output; the base crop's [CLS, dominant,
  contextual] first; the grid crops' dominant tokens scattered into their crops' 576 (here T) slots at the sorted
  `all_indices[1:] - 1`, viewed (nh, nw, g, g), permuted (0, 2, 1, 3) and masked row-major over the padded canvas
  (no unpadding, no newline); then the grid crops' CLS tokens (`image_feature[:, 0]`, crop order); then their
  contextual tokens (`image_feature[:, -num_extra:]`, crop by crop). LLaVA-1.5: the image's [CLS, dominant,
  contextual], projected.

Tiny geometry (tests/model_factories.py): 28 px crops of 7 px patches, g = 4, T = 16 tokens per crop, vision
layers 3 (layer -2 = layers[1]), up to 5 crops. NeXT budget 50: 50 // 5 = 10 per crop, split 54 : 10 -> official
`dominant` 8 (CLS + 7 patches) and 2 contextual, so R = 16 - 7 = 9 remaining tokens, step 4, targets 0 and 4.
Images: 29x47 (2x2 grid, 5 crops, 50 rows) and 10x13 (1x2 grid, 3 real crops of the 5 in pixel_values, 30 rows);
unpadding cuts the 10x13 canvas, which VisionZip's layout ignores.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.llava_next import modeling_llava_next as hf_next

import model_factories as mf
from models import pruning

IMAGE = mf.IMAGE_TOKEN_ID
CROP, PATCH = 28, 7
G = CROP // PATCH
T = G * G
SIZES = ((29, 47), (10, 13))                  # (height, width)
NEXT_TARGET = 50
LLAVA_TARGET = 12                             # split 54 : 10 of 12 -> dominant 10 (CLS + 9), contextual 2
TOL = dict(rtol=1e-4, atol=1e-4)
# The models are llava_pair and llava_next_pair: (transformers, port), from tests/models/conftest.py.
pytestmark = pytest.mark.usefixtures("float32_matmul")


# ------------------------------------------------------------------------------------------ the official loop


def _hf_layer(tower, pixel_values):
  """transformers' vision layer -2 of a batch of crops: (hidden float[P, T + 1, Dv] CLS first, CLS attention to
  the patches summed over heads float[P, T], metric = keys mean over heads float[P, T + 1, Dh])."""
  encoder = tower.encoder                                       # transformers 5: no .vision_model level
  with torch.no_grad():
    out = tower(torch.tensor(pixel_values), output_hidden_states=True, output_attentions=True)
    layer = encoder.layers[-2]                                  # its output is hidden_states[-2]
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))
    metric = keys.view(*keys.shape[:-1], layer.self_attn.num_heads, -1).mean(-2)
    return (out.hidden_states[-2].numpy().astype(np.float64), out.attentions[-2][:, :, 0, 1:].sum(1).numpy(),
            metric.numpy().astype(np.float64))


def _visionzip_crop(hidden, cls_attention_sum, metric, dominant, contextual):
  """`CLIPVisionTower_VisionZip.forward` on one crop -> (tokens float[dominant + contextual, Dv], all_indices
  int[dominant]: 0 then the top-(dominant - 1) patches + 1, in topk order)."""
  dominant_num = dominant - 1                                   # main.py: dominant_num = dominant - 1
  topk = np.argsort(-cls_attention_sum, kind="stable")[:dominant_num] + 1
  all_indices = np.concatenate([[0], topk])
  mask = np.ones(hidden.shape[0], bool)
  mask[all_indices] = False
  dominant_tokens = hidden[~mask]                               # masked_select: index order, CLS first
  metric_filtered = metric[mask]
  hidden_filtered = hidden[mask]
  metric_normalized = metric_filtered / np.linalg.norm(metric_filtered, axis=-1, keepdims=True)
  step = max(1, metric_normalized.shape[0] // contextual)
  target_indices = np.arange(0, metric_normalized.shape[0], step)[:contextual]
  target_tokens = metric_normalized[target_indices]
  others = ~np.isin(np.arange(metric_normalized.shape[0]), target_indices)
  similarity = metric_normalized[others] @ target_tokens.T
  assign_one_hot = np.zeros((others.sum(), contextual))
  assign_one_hot[np.arange(others.sum()), similarity.argmax(axis=1)] = 1
  counts = np.maximum(assign_one_hot.sum(axis=0), 1)[:, None]
  aggregated_hidden = assign_one_hot.T @ hidden_filtered[others] / counts
  contextual_tokens = hidden_filtered[target_indices] + aggregated_hidden
  return np.concatenate([dominant_tokens, contextual_tokens]), all_indices


def _project(hf, x):
  with torch.no_grad():
    return hf.model.multi_modal_projector(torch.tensor(x, dtype=torch.float32)).numpy()


def _official_crops(hf, pixel_values, dominant, contextual):
  """Every crop through VisionZip, then transformers' projector: (float[P, K, D], all_indices int[P, dominant])."""
  hidden, cls, metric = _hf_layer(hf.model.vision_tower, pixel_values)
  outs = [_visionzip_crop(hidden[c], cls[c], metric[c], dominant, contextual) for c in range(hidden.shape[0])]
  return _project(hf, np.stack([o[0] for o in outs])), np.stack([o[1] for o in outs])


def _restore_image_features_sorted(image_feature, cur_keep_idx, width, height):
  """llava_arch.py `restore_image_features_sorted` on the grid crops: float[nh * nw, K, D], int[nh * nw, dominant]
  -> [grid dominant tokens row-major over the padded canvas; grid CLS tokens; grid contextual tokens]."""
  num_img, total_patches, dim = image_feature.shape
  num_keep = cur_keep_idx.shape[1]
  num_extra = total_patches - num_keep
  restore = np.sort(cur_keep_idx, axis=1)[:, 1:] - 1
  restored = np.zeros((num_img, T, dim), image_feature.dtype)
  mask = np.zeros((num_img, T), bool)
  mask[np.arange(num_img)[:, None], restore] = True
  restored[mask] = image_feature[:, 1:num_keep].reshape(-1, dim)       # crop by crop, ascending slots
  assert width * height == num_img
  restored = restored.reshape(height, width, G, G, dim).transpose(0, 2, 1, 3, 4).reshape(height * G, width * G, dim)
  mask = mask.reshape(height, width, G, G).transpose(0, 2, 1, 3).reshape(height * G, width * G)
  return np.concatenate([restored[mask], image_feature[:, 0], image_feature[:, -num_extra:].reshape(-1, dim)])


def _official_next_rows(hf, pixel_values, size, dominant, contextual):
  """The image's rows in `prepare_inputs_labels_for_multimodal_visionzip` (spatial_unpad, anyres): float[R, D]."""
  nh, nw = hf_next.get_anyres_image_grid_shape(list(size), hf.config.image_grid_pinpoints, CROP)
  crops = 1 + nh * nw                                           # the official code sees the real crops only
  feats, keep = _official_crops(hf, pixel_values[:crops], dominant, contextual)
  grid = _restore_image_features_sorted(feats[1:], keep[1:], nw, nh)
  return np.concatenate([feats[0], grid]), keep, (nh, nw)


def _packed_ids(hf, size, grid):
  """transformers' LLaVA-NeXT packing of an index map: int[L] with crop * T + token per slot, -1 at newline slots."""
  return mf.packed_slot_ids(hf, size, 1 + grid[0] * grid[1])


# --------------------------------------------------------------------------------------------------- checks


def _check_llm_input(hf, out, ids, mask, image_rows):
  """The decoder input: every text token in order, then each image's rows at the first positions of its <image>
  run, and nothing else; the rows equal `image_rows[r]` (count and values)."""
  seg = out.segments[0]
  source, real = np.asarray(seg.source), np.asarray(seg.mask)
  visual = np.asarray(seg.visual) & real
  emb = np.asarray(out.inputs_embeds)
  with torch.no_grad():
    table = hf.model.language_model.embed_tokens.weight.numpy()
  for r in range(ids.shape[0]):
    image_at = np.flatnonzero((ids[r] == IMAGE) & (mask[r] > 0))
    keep = [p for p in np.flatnonzero(mask[r]) if ids[r, p] != IMAGE or p in image_at[:len(image_rows[r])]]
    np.testing.assert_array_equal(source[r][real[r]], keep, err_msg=f"row {r}: positions of the pruned prompt")
    assert visual[r].sum() == len(image_rows[r]), (r, visual[r].sum(), len(image_rows[r]))
    np.testing.assert_allclose(emb[r][visual[r]], image_rows[r], **TOL, err_msg=f"row {r}: image rows")
    text = real[r] & ~visual[r]
    np.testing.assert_allclose(emb[r][text], table[ids[r][source[r][text]]], rtol=0, atol=1e-6)


def _protocol(family, target):
  """`method_config("visionzip", ...)` on the 3-layer tiny models: (config, dominant, contextual)."""
  cfg = pruning.method_config("visionzip", family=family, target=target, num_layers=3)
  assert cfg.visionzip_cls
  hp = dict(cfg.stage1_hparams)
  return cfg, hp["dominant"], hp["contextual"]


# ---------------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_llava_next_official_layout(llava_next_pair):
  hf, model = llava_next_pair
  cfg, dominant, contextual = _protocol("llava-next", NEXT_TARGET)
  assert (dominant, contextual) == (8, 2)                      # 50 // 5 = 10 per crop, 54 : 10 (hand-checked)
  rng = np.random.RandomState(3)
  px = rng.randn(2, 5, 3, CROP, CROP).astype(np.float32)
  want, counts, interleaved, ignored_cut = [], [], False, False
  for r, size in enumerate(SIZES):
    rows, keep, grid = _official_next_rows(hf, px[r], size, dominant, contextual)
    crops = 1 + grid[0] * grid[1]
    assert rows.shape[0] == crops * (dominant + contextual)
    want.append(rows)
    packed = _packed_ids(hf, size, grid)
    counts.append(len(packed))
    # The canvas order interleaves the crops (rows of patches cross crop borders) ...
    picks = np.sort(keep[1:], axis=1)[:, 1:] - 1
    owner = np.zeros((crops - 1, T), int)
    owner[np.arange(crops - 1)[:, None], picks] = np.arange(1, crops)[:, None]
    canvas = owner.reshape(grid[0], grid[1], G, G).transpose(0, 2, 1, 3).reshape(-1)
    canvas = canvas[canvas > 0]
    interleaved |= bool(np.any(np.diff(canvas) < 0))
    # ... and keeps dominant patches that unpadding would have cut.
    survived = {int(i) for i in packed if i >= 0}
    ignored_cut |= any((c + 1) * T + int(p) not in survived for c in range(crops - 1) for p in picks[c])
  assert [len(w) for w in want] == [50, 30]
  assert counts == [16 + 4 * 9, 16 + 4 * 7]                     # 2x2 grid rows 2..5 of 8; 1x2 columns 1..6 of 8
  assert interleaved and ignored_cut, "the case must interleave crops and keep patches that unpadding cuts"

  ids, mask = mf.prompt_rows(rng, (7, 20), counts, (30, 12))
  out = pruning.forward(model, cfg, ids, mask, px, np.array(SIZES))
  _check_llm_input(hf, out, ids, mask, want)


@pytest.mark.slow
def test_llava_official_layout(llava_pair):
  """LLaVA-1.5: the image's [CLS, dominant ascending, contextual], projected, at the first positions of the run."""
  hf, model = llava_pair
  cfg, dominant, contextual = _protocol("llava-1.5", LLAVA_TARGET)
  assert (dominant, contextual) == (10, 2)                     # round(12 * 54 / 64) = 10 (hand-checked)
  rng = np.random.RandomState(5)
  px = rng.randn(2, 3, CROP, CROP).astype(np.float32)
  feats, _ = _official_crops(hf, px, dominant, contextual)     # the whole batch in one tower call, as official
  want = [feats[r] for r in range(2)]
  assert all(w.shape[0] == LLAVA_TARGET for w in want)
  ids, mask = mf.prompt_rows(rng, (6, 25), (mf.NUM_PATCHES, mf.NUM_PATCHES), (30, 11))
  out = pruning.forward(model, cfg, ids, mask, px)
  _check_llm_input(hf, out, ids, mask, want)


def test_official_loop_hand_checked():
  """The NumPy loop on a hand-made crop: T = 6 patches, dominant 3 (CLS + 2), contextual 2."""
  hidden = np.arange(7, dtype=np.float64)[:, None] * np.array([[1.0, 10.0]])          # token i = (i, 10 i)
  cls_sum = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.0])                                 # patches 2 and 4 dominate
  metric = np.array([[9, 9], [1, 0], [5, 5], [1, 0.1], [6, 6], [0, 1], [0.1, 1]], np.float64)
  tokens, all_indices = _visionzip_crop(hidden, cls_sum, metric, dominant=3, contextual=2)
  np.testing.assert_array_equal(all_indices, [0, 2, 4])
  # Remaining tokens 1, 3, 5, 6 (R = 4, step 2): targets 1 and 5; token 3 joins 1, token 6 joins 5.
  want = np.array([hidden[0], hidden[2], hidden[4], hidden[1] + hidden[3], hidden[5] + hidden[6]])
  np.testing.assert_allclose(tokens, want)
