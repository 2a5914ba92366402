"""models.pruning on tiny random LLaVA-1.5 / LLaVA-NeXT models (CPU, float32, batch of 2).

References are independent of the hook: transformers fed the pruned tokens (Stage I), a NumPy full attention map
and `prune.select` on the reference numbers (Stage II), Python loops for the rebuilt sequences, per-crop quotas and
row newlines, and cache-free recomputation of the kept sequences (decoding).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import model_factories as mf
from models import anyres
from models import llama
from models import pruning
from tops_jax import prune

IMAGE = mf.IMAGE_TOKEN_ID
N = mf.NUM_PATCHES
PINPOINTS = mf.TINY_PINPOINTS
CROP, PATCH, T = 28, 7, 16
TOL = dict(rtol=1e-4, atol=1e-4)
# The models are llava_pair and llava_next_pair: (transformers, port), from tests/models/conftest.py.
pytestmark = pytest.mark.usefixtures("float32_matmul")


# Jitted references (one compile per shape and segment, shared by the tests).
_FULL = jax.jit(lambda m, b: m(**b, all_logits=True))
_LAYERS = jax.jit(lambda m, h, p, mask, start, stop: m.language_model.run_layers(h, p, mask, start=start, stop=stop),
                  static_argnames=("start", "stop"))
_DECODE = jax.jit(pruning.decode_step, static_argnames="config")


def _unpruned(model, ids, mask, px, sizes=None):
  batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(px))
  if sizes is not None:
    batch["image_sizes"] = jnp.asarray(sizes)
  return _FULL(model, batch)


def _llava_batch(side="left", seed=0, post=(60, 41)):
  rng = np.random.RandomState(seed)
  ids, mask = mf.prompt_rows(rng, (6, 25), (N, N), post, side)
  return ids, mask, rng.randn(2, 3, 28, 28).astype(np.float32)


def _next_batch(side="left", seed=0, sizes=((50, 70), (100, 20))):
  """Two images of different crop grids (5 and 4 crops, rows resp. columns cut by unpadding)."""
  rng = np.random.RandomState(seed)
  counts = [anyres.num_image_features(s, PINPOINTS, CROP, PATCH) for s in sizes]
  ids, mask = mf.prompt_rows(rng, (7, 20), counts, (30, 12), side)
  px = rng.randn(2, 5, 3, CROP, CROP).astype(np.float32)
  return ids, mask, px, np.array(sizes)


_positions = mf.mask_positions
_layout_rows = mf.padded_rows       # Python reference of the rebuilt rows: source positions int[B, size] (-1 padding)


def _hf_logits(hf, ids, mask, image_rows):
  """transformers' decoder fed embeddings of `ids` whose <image> positions take `image_rows[r]` in order."""
  with torch.no_grad():
    emb = hf.model.language_model.embed_tokens(torch.tensor(ids)).clone()
    for r in range(ids.shape[0]):
      emb[r, torch.tensor(ids[r] == IMAGE)] = torch.as_tensor(np.asarray(image_rows[r]), dtype=emb.dtype)
    h = hf.model.language_model(inputs_embeds=emb, attention_mask=torch.tensor(mask),
                                position_ids=torch.tensor(_positions(mask))).last_hidden_state
    return hf.lm_head(h).numpy()


def _hf_vision(hf, pixel_values):
  """transformers' feature layer (-2) per image/crop: (features, CLS attention, keys mean over heads, projector)."""
  tower = hf.model.vision_tower
  with torch.no_grad():
    out = tower(torch.tensor(pixel_values), output_hidden_states=True, output_attentions=True)
    layer = tower.encoder.layers[-2]                               # produces hidden state -2
    k = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))
    keys = k.view(*k.shape[:-1], layer.self_attn.num_heads, -1).mean(-2)[:, 1:]
    feats = out.hidden_states[-2][:, 1:]
    return (feats.numpy(), out.attentions[-2][:, :, 0, 1:].mean(1).numpy(), keys.numpy(),
            hf.model.multi_modal_projector(feats).numpy())


def _cosine_relevance(features, ids, mask):
  """Mean cosine of each visual row with the LLM input embeddings of the text after the image (NumPy)."""
  out = []
  for r in range(ids.shape[0]):
    last = np.flatnonzero(ids[r] == IMAGE).max()
    text = [p for p in np.flatnonzero(mask[r]) if p > last and ids[r, p] != IMAGE]
    emb = features[1][ids[r, text]]
    v = features[0][r] / np.linalg.norm(features[0][r], axis=-1, keepdims=True)
    e = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    out.append((v @ e.T).mean(-1))
  return np.stack(out).astype(np.float32)


def _check_stage1(out, hf, ids, mask, kept_slots, image_rows, image_slots, side):
  """Sequence layout, masks and positions of the Stage I output, and its logits against transformers.

  image_slots: the static image run length (budget, plus the most newlines an image has when they are kept).
  """
  seg = out.segments[0]
  size = seg.source.shape[1]
  assert size == ((ids != IMAGE) & (mask > 0)).sum(-1).max() + image_slots
  want_rows = mf.kept_positions(ids, mask, kept_slots)
  source = _layout_rows(want_rows, size, side == "left")
  np.testing.assert_array_equal(np.asarray(seg.source), source)
  np.testing.assert_array_equal(np.asarray(seg.mask), source >= 0)
  np.testing.assert_array_equal(np.asarray(seg.positions), _positions(source >= 0)[None])   # [R = 1, B, S]
  new_ids = np.where(source >= 0, np.take_along_axis(ids, np.maximum(source, 0), 1), 0)
  new_mask = (source >= 0).astype(np.int64)
  np.testing.assert_array_equal(np.asarray(out.visual_per_layer[:, 0]), (new_ids == IMAGE).sum(-1))
  want = _hf_logits(hf, new_ids, new_mask, image_rows)
  real = new_mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out.logits)[real], want[real], **TOL)


# ------------------------------------------------------------------------------------------------ keep everything


def test_keep_all_equals_unpruned_llava(llava_pair):
  _, model = llava_pair
  ids, mask, px = _llava_batch("left")
  cfg = pruning.PruningConfig.flat("tops", stage1_budget=N, stage2=((1, N), (2, N)))
  out = pruning.forward(model, cfg, ids, mask, px, all_logits=True)
  full = _unpruned(model, ids, mask, px)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out.logits)[real], np.asarray(full.logits)[real], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.tokens_per_layer), np.repeat(mask.sum(-1)[:, None], 3, axis=1))
  np.testing.assert_array_equal(np.asarray(out.stage1.kept), np.tile(np.arange(N), (2, 1)))


@pytest.mark.slow
def test_keep_all_equals_unpruned_llava_next(llava_next_pair):
  """Equal image sizes (equal counts); newlines kept outside the budget; Stage II keeps every image token."""
  _, model = llava_next_pair
  ids, mask, px, sizes = _next_batch("right", sizes=((50, 70), (50, 70)))
  count = int((ids[0] == IMAGE).sum())
  newlines = int(model.pack_layout(sizes).newline[0].sum())
  cfg = pruning.PruningConfig.flat("divprune", stage1_budget=count - newlines, stage1_relevance="none", newlines="keep",
                                   stage2=((1, count), (2, count)), stage2_relevance="none")
  out = pruning.forward(model, cfg, ids, mask, px, sizes, all_logits=True)
  full = _unpruned(model, ids, mask, px, sizes)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out.logits)[real], np.asarray(full.logits)[real], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.visual_per_layer), np.full((2, 3), count))


# -------------------------------------------------------------------------------------------------------- Stage I


@pytest.mark.slow
@pytest.mark.parametrize("method,relevance,side", [("tops", "cls", "left"), ("cdpruner", "text", "right"),
                                                   ("visionzip", "cls", "left")])
def test_stage1_llava_matches_transformers(llava_pair, method, relevance, side):
  hf, model = llava_pair
  ids, mask, px = _llava_batch(side, seed=1)
  budget = 6
  hp = {"alpha": 0.5, "lam": 1.0} if method == "tops" else {}
  cfg = pruning.PruningConfig.flat(method, stage1_budget=budget, stage1_relevance=relevance, stage1_hparams=hp)
  out = pruning.forward(model, cfg, ids, mask, px, all_logits=True)

  feats, cls, keys, proj = _hf_vision(hf, px)
  with torch.no_grad():
    table = hf.model.language_model.embed_tokens.weight.numpy()
  rel = cls if relevance == "cls" else _cosine_relevance((proj, table), ids, mask)
  if method == "visionzip":
    tokens, kept = prune.merge("visionzip", feats, keep=budget, relevance=rel, keys=keys)
    with torch.no_grad():
      rows = hf.model.multi_modal_projector(torch.tensor(np.asarray(tokens))).numpy()
  else:
    kept = prune.select(method, proj, keep=budget, relevance=rel, **hp)
    rows = np.take_along_axis(proj, np.asarray(kept)[..., None], 1)
  np.testing.assert_allclose(np.asarray(out.stage1.relevance), rel, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.stage1.kept), np.asarray(kept))
  _check_stage1(out, hf, ids, mask, [set(k.tolist()) for k in np.asarray(kept)], rows, budget, side)


def _quotas(caps, budget):
  """Round-robin reference: one token per crop with room, crops in order, until the budget is spent."""
  q = [0] * len(caps)
  while budget:
    for c, cap in enumerate(caps):
      if budget and q[c] < cap:
        q[c], budget = q[c] + 1, budget - 1
  return q


def _row_newlines(selected, newline, crop):
  """Loop reference of newlines="rows": keep a newline when its grid row keeps a token."""
  keep = np.zeros_like(newline)
  for r in range(selected.shape[0]):
    any_kept = False
    for n in range(selected.shape[1]):
      if crop[r, n] == 0:
        continue                                    # base crop: not part of a grid row
      if newline[r, n]:
        keep[r, n], any_kept = any_kept, False
      elif selected[r, n]:
        any_kept = True
  return keep


@pytest.mark.slow
@pytest.mark.parametrize("scope,newlines,side", [("global", "drop", "left"), ("per_crop", "rows", "right")])
def test_stage1_llava_next_matches_transformers(llava_next_pair, scope, newlines, side):
  hf, model = llava_next_pair
  ids, mask, px, sizes = _next_batch(side, seed=2)
  budget = 10
  method, hp = ("divprune", {}) if scope == "global" else ("tops", {"alpha": 0.5, "lam": 0.5})
  relevance = "none" if scope == "global" else "cls"
  cfg = pruning.PruningConfig.flat(method, stage1_budget=budget, stage1_scope=scope, stage1_relevance=relevance,
                                   stage1_hparams=hp, newlines=newlines)
  out = pruning.forward(model, cfg, ids, mask, px, sizes, all_logits=True)

  layout = anyres.pack_layout(sizes, PINPOINTS, CROP, PATCH)
  with torch.no_grad():
    packed = hf.model.get_image_features(torch.tensor(px), torch.tensor(sizes)).pooler_output
  packed = [p.numpy() for p in packed]
  candidate = layout.valid & ~layout.newline
  if scope == "global":
    feats = np.zeros((2, layout.valid.shape[1], packed[0].shape[-1]), np.float32)
    for r, p in enumerate(packed):
      feats[r, :len(p)] = p
    kept = np.asarray(prune.select("divprune", feats, keep=budget, valid=candidate))
    selected = np.zeros_like(candidate)
    np.put_along_axis(selected, kept, True, 1)
  else:
    selected = np.zeros_like(candidate)
    for r in range(2):
      n_crops = anyres.num_crops(sizes[r], PINPOINTS, CROP)
      _, cls, _, proj = _hf_vision(hf, px[r, :n_crops])
      valid = np.zeros((n_crops, T), bool)
      src = layout.source[r][candidate[r]]
      valid[src // T, src % T] = True
      for c, q in enumerate(_quotas(valid.sum(-1).tolist(), budget)):
        if q:
          for tok in np.asarray(prune.select("tops", proj[c], keep=q, relevance=cls[c], valid=valid[c], **hp)):
            selected[r, np.flatnonzero(layout.source[r] == c * T + tok)] = True
    kept = np.stack([np.flatnonzero(s) for s in selected])
  np.testing.assert_array_equal(np.asarray(out.stage1.kept), kept)
  if newlines == "rows":
    selected = selected | _row_newlines(selected, layout.newline, layout.crop)
  slots = [set(np.flatnonzero(s).tolist()) for s in selected]
  rows = [packed[r][sorted(slots[r])] for r in range(2)]
  extra = layout.newline.sum(-1).max() if newlines == "rows" else 0
  _check_stage1(out, hf, ids, mask, slots, rows, budget + extra, side)


def test_crop_quotas_and_row_newlines_match_loops():
  rng = np.random.RandomState(0)
  caps = rng.randint(0, 9, size=(40, 5))
  for budget in (1, 7, 13, 20):
    fits = caps.sum(-1) >= budget
    got = np.asarray(pruning.crop_quotas(jnp.asarray(caps[fits]), budget))
    np.testing.assert_array_equal(got, [_quotas(c.tolist(), budget) for c in caps[fits]])
  layout = anyres.pack_layout(np.array([[50, 70], [100, 20], [70, 50]]), PINPOINTS, CROP, PATCH)
  selected = (rng.rand(*layout.valid.shape) < 0.15) & layout.valid & ~layout.newline
  got = pruning.row_newlines(jnp.asarray(selected), jnp.asarray(layout.newline), jnp.asarray(layout.crop))
  want = _row_newlines(selected, layout.newline, layout.crop)
  assert want.any() and (layout.newline & ~want).any()
  np.testing.assert_array_equal(np.asarray(got), want)


# ------------------------------------------------------------------------------------------------------- Stage II


_np_attention = mf.np_attention


def _np_relevance(probs, mask, visual, source):
  """Per row: (visual positions, relevance) from the head-mean map: text raters after the image or the last token."""
  a = probs.mean(1)
  out = []
  for r in range(a.shape[0]):
    vis = np.flatnonzero(visual[r] & mask[r])
    real = np.flatnonzero(mask[r])
    if source == "last_token":
      out.append((vis, a[r, real[-1], vis]))
      continue
    text = [p for p in real if p > vis[-1] and not visual[r, p]]
    score = a[r][np.ix_(text, vis)].sum(-1)
    raters = [t for t, sc in zip(text, score) if sc > score.mean()] or text
    out.append((vis, a[r][np.ix_(raters, vis)].mean(0)))
  return out


def _np_rmsnorm(model, x):
  c = model.config.text
  x = np.asarray(x, np.float64)
  scale = np.asarray(model.language_model.norm.scale[...], np.float64)
  return (x / np.sqrt((x ** 2).mean(-1, keepdims=True) + c.rms_norm_eps) * scale).astype(np.float32)


def _run(model, h, positions, mask, start, stop):
  if start == stop:
    return h
  return np.asarray(_LAYERS(model, jnp.asarray(h), jnp.asarray(positions), jnp.asarray(mask), start, stop).hidden)


@pytest.mark.slow
@pytest.mark.parametrize("family,method,relevance,positions,side,steps", [
    ("llava", "tops", "raters", "contiguous", "left", ((1, 9), (2, 4))),
    ("llava_next", "fastv", "last_token", "original", "right", ((2, 20),)),
    ("llava", "dart", "none", "contiguous", "right", ((2, 7),)),
])
def test_stage2_matches_reference(request, family, method, relevance, positions, side, steps):
  hf, model = request.getfixturevalue(f"{family}_pair")
  if family == "llava":
    ids, mask, px = _llava_batch(side, seed=3)
    sizes = None
  else:
    ids, mask, px, sizes = _next_batch(side, seed=3)
  hp = {"alpha": 0.5, "lam": 0.5} if method == "tops" else {}
  cfg = pruning.PruningConfig.flat(method, stage2=steps, stage2_relevance=relevance, stage2_hparams=hp,
                                   positions=positions)
  out = pruning.forward(model, cfg, ids, mask, px, sizes, all_logits=True)
  num_layers = model.config.text.num_hidden_layers

  ref = _unpruned(model, ids, mask, px, sizes)
  h, pos, msk = np.asarray(ref.inputs_embeds), _positions(mask), mask.astype(bool)
  visual = (ids == IMAGE) & msk
  packed = np.where(visual, np.cumsum(visual, -1) - 1, -1)
  done, left = 0, side == "left"
  for step, (layer, keep) in enumerate(steps):
    scoring = layer - 1 if relevance == "last_token" or method == "dart" else layer
    h = _run(model, h, pos, msk, done, scoring)
    probs, keys = _np_attention(model, scoring, h, pos, msk)
    h = _run(model, h, pos, msk, scoring, layer)
    got = out.stage2[step]
    kept_rows = []
    for r, (vis, rel) in enumerate(_np_relevance(probs, msk, visual, relevance)):
      np.testing.assert_array_equal(np.asarray(got.candidates[r])[:len(vis)], packed[r, vis])
      if relevance != "none":
        np.testing.assert_allclose(np.asarray(got.relevance[r])[:len(vis)], rel, rtol=1e-4, atol=1e-6)
      if method == "tops":
        kept = np.asarray(prune.select("tops", h[r, vis], keep=keep, relevance=rel.astype(np.float32), **hp))
      elif method == "fastv":
        kept = np.sort(np.argsort(-rel, kind="stable")[:keep])
      else:
        text = [p for p in np.flatnonzero(msk[r]) if p > vis[-1] and not visual[r, p]]
        flat = keys[r].reshape(keys.shape[1], -1).astype(np.float32)
        kept = np.asarray(prune.select("dart", _np_rmsnorm(model, h[r, vis]), keep=keep, keys=flat[vis],
                                       text_features=_np_rmsnorm(model, h[r, text]), text_keys=flat[text],
                                       positions=pos[r, vis], text_positions=pos[r, text]))
      np.testing.assert_array_equal(np.asarray(got.kept[r]), packed[r, vis[kept]])
      kept_rows.append([p for p in np.flatnonzero(msk[r]) if not visual[r, p] or p in set(vis[kept])])
    index = _layout_rows(kept_rows, out.segments[step + 1].source.shape[1], left)
    new_mask = index >= 0
    take = lambda x: np.take_along_axis(x, np.maximum(index, 0).reshape(index.shape + (1,) * (x.ndim - 2)), 1)
    new_pos = _positions(new_mask) if positions == "contiguous" else np.where(new_mask, take(pos), 1)
    np.testing.assert_array_equal(np.asarray(out.segments[step + 1].index), index)
    np.testing.assert_array_equal(np.asarray(out.segments[step + 1].positions), new_pos[None])
    h, pos, msk = take(h), new_pos, new_mask
    visual, packed = take(visual) & new_mask, np.where(new_mask, take(packed), -1)
    done = layer
  h = _run(model, h, pos, msk, done, num_layers)
  want = np.asarray(model.head(jnp.asarray(h)))
  np.testing.assert_allclose(np.asarray(out.logits)[msk], want[msk], **TOL)
  counts = [int(s.mask.sum()) for s in out.segments]
  assert np.asarray(out.tokens_per_layer).sum() == sum(
      c * (b - a) for c, (a, b) in zip(counts, cfg.segments(num_layers)))


# ----------------------------------------------------------------------------------------------------- generation


def _recompute(model, cfg, pre, generated, steps):
  """Logits float32[B, V] after `generated` int[B, t] (1 <= t <= steps), without a cache, on the prefill's kept
  sequences: each segment runs on [its kept prompt rows; the generated tokens] with positions last_g + 1 + i (one
  shape for every t: the slots of tokens not generated yet are masked and come last, so causality hides them)."""
  lm = model.language_model
  b, t = generated.shape
  tokens = np.zeros((b, steps), np.int64)
  tokens[:, :t] = generated
  new_mask = np.broadcast_to(np.arange(steps) < t, (b, steps))
  h, prompt = None, None
  for g, (start, stop) in enumerate(cfg.segments(model.config.text.num_hidden_layers)):
    seg = pre.segments[g]
    if g == 0:
      rows, new = np.asarray(pre.inputs_embeds), np.asarray(lm.embed(jnp.asarray(tokens)))
    else:
      index = np.asarray(seg.index)
      rows = np.take_along_axis(h[:, :prompt], np.maximum(index, 0)[..., None], 1) * (index >= 0)[..., None]
      new = h[:, prompt:]
    seg_mask, seg_pos = np.asarray(seg.mask), np.asarray(seg.positions)[0]
    last = np.where(seg_mask, seg_pos, -1).max(-1)
    pos = np.concatenate([seg_pos, last[:, None] + 1 + np.arange(steps)], 1)
    prompt = rows.shape[1]
    h = _run(model, np.concatenate([rows, new], 1), pos, np.concatenate([seg_mask, new_mask], 1), start, stop)
  return np.asarray(model.head(jnp.asarray(h[:, prompt + t - 1])))


@pytest.mark.slow
@pytest.mark.parametrize("family,positions", [("llava", "contiguous"), ("llava_next", "original")])
def test_decoding_with_cache_matches_recomputation(request, family, positions):
  """Prefill with a cache, then `decode_step` token by token; LLaVA-1.5 also runs the jitted `greedy` loop."""
  _, model = request.getfixturevalue(f"{family}_pair")
  if family == "llava":
    ids, mask, px = _llava_batch("left", seed=4)
    sizes = None
  else:
    ids, mask, px, sizes = _next_batch("left", seed=4)
  cfg = pruning.PruningConfig.flat("tops", stage1_budget=10, stage2=((1, 6), (2, 3)), positions=positions,
                                   newlines="rows")
  steps = 4
  pre = pruning.forward(model, cfg, ids, mask, px, sizes, cache_capacity=ids.shape[1] + steps)
  seg_mask = np.asarray(pre.segments[-1].mask)
  last = seg_mask.shape[1] - 1 - np.argmax(seg_mask[:, ::-1], -1)
  every = pruning.forward(model, cfg, ids, mask, px, sizes, all_logits=True)   # the prefill's logits are the last row's
  np.testing.assert_allclose(np.asarray(pre.logits)[:, 0], np.asarray(every.logits)[np.arange(2), last], **TOL)
  generated = np.asarray(pre.logits)[:, 0].argmax(-1)[:, None]
  cache, position = pre.cache, pre.last_positions
  for _ in range(steps - 1):
    position = position + 1
    logits, cache = _DECODE(model, cfg, cache, jnp.asarray(generated[:, -1]), position)
    want = _recompute(model, cfg, pre, generated, steps)
    np.testing.assert_allclose(np.asarray(logits), want, **TOL)
    generated = np.concatenate([generated, want.argmax(-1)[:, None]], 1)
  if family == "llava":
    gen = pruning.greedy(model, cfg, ids, mask, pixel_values=px, max_new_tokens=steps)
    np.testing.assert_array_equal(np.asarray(gen.tokens), generated)
    np.testing.assert_array_equal(np.asarray(gen.num_tokens), [steps, steps])
    np.testing.assert_array_equal(np.asarray(gen.prefill.stage2[1].kept), np.asarray(pre.stage2[1].kept))


# ----------------------------------------------------------------------------------------------------- bad configs


def test_tops_schedule():
  cfg = pruning.tops_schedule(32, 128)
  assert (cfg.method, cfg.stage1_budget, cfg.steps) == ("tops", 256, ((12, 128), (24, 32)))
  assert dict(cfg.stage1_hparams) == {"alpha": 0.5, "lam": 0.5} == dict(cfg.stage2_hparams)
  assert (cfg.stage1_relevance, cfg.stage2_relevance, cfg.positions) == ("cls", "raters", "contiguous")
  assert dict(pruning.tops_schedule(32, 64).stage2_hparams) == {"alpha": 0.5, "lam": 1.0}
  big = pruning.tops_schedule(40, 32)
  assert big.steps == ((15, 32), (30, 8)) and dict(big.stage2_hparams) == {"alpha": 0.5, "lam": 0.4}
  nxt = pruning.tops_schedule(32, 320, family="llava-next")
  assert nxt.stage1_budget == 640 and nxt.steps == ((12, 320), (24, 80))
  assert dict(nxt.stage2_hparams) == {"alpha": 0.5, "lam": 0.4}
  assert pruning.tops_schedule(3, 8, stage2_alpha=0.5, stage2_lam=0.5).steps == ((1, 8), (2, 2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="nope"), "unknown method 'nope'"),
    (dict(method="tops", stage2_method="nope"), "unknown stage2_method"),
    (dict(method="tops", stage1_scope="crop"), "stage1_scope must be one of"),
    (dict(method="tops", positions="shifted"), "positions must be one of"),
    (dict(method="tops", stage1_budget=0), "stage1_budget must be a positive int"),
    (dict(method="tops", stage2=((2, 8), (2, 4))), "layers must increase"),
    (dict(method="tops", stage2=((0, 8),)), "must be >= 1"),
    (dict(method="tops", stage2=((1, 8), (2, 9))), "must not increase"),
    (dict(method="tops", stage1_budget=8, stage2=((1, 9),)), "more than the 8"),
    (dict(method="visionzip", stage1_budget=8, stage1_scope="per_crop"), "per_crop"),
    (dict(method="fastv", stage2=((2, 4),), stage2_relevance="none"), "needs a relevance vector"),
    (dict(method="cdpruner", stage1_budget=4, stage1_relevance="none"), "needs a relevance vector"),
    (dict(method="pooling", stage2=((2, 4),), stage2_relevance="none"), "Stage I only"),
    (dict(method="tops", stage1_budget=4, stage1_hparams={"alpha": np.ones(2)}), "array"),
    (dict(method="tops", stage2=(3,)), "\\(layer, keep\\) pairs"),
])
def test_bad_configs_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pruning.PruningConfig.flat(**kwargs)


@pytest.mark.slow
def test_bad_schedules_and_inputs_raise(llava_pair, llava_next_pair):
  with pytest.raises(ValueError, match="too shallow"):
    pruning.tops_schedule(2, 64, stage2_alpha=0.5, stage2_lam=0.5)
  with pytest.raises(ValueError, match="no paper Stage II setting"):
    pruning.tops_schedule(32, 100)
  with pytest.raises(ValueError, match="target"):
    pruning.tops_schedule(32, 3)
  _, model = llava_pair
  ids, mask, px = _llava_batch()
  run = lambda cfg, *a, **kw: pruning.forward(model, cfg, *a, **kw)
  with pytest.raises(ValueError, match="out of range for a decoder with 3 layers"):
    run(pruning.PruningConfig.flat("tops", stage2=((3, 4),)), ids, mask, px)
  with pytest.raises(ValueError, match="exceeds the 16 visual tokens"):
    run(pruning.PruningConfig.flat("tops", stage1_budget=17), ids, mask, px)
  cfg = pruning.PruningConfig.flat("tops", stage1_budget=4)
  with pytest.raises(ValueError, match="no run of the next images fills"):
    run(cfg, ids, mask, px[:1])
  short = ids.copy()
  short[0, np.flatnonzero(short[0] == IMAGE)[0]] = 7
  with pytest.raises(ValueError, match="holds 15 image tokens"):
    run(cfg, short, mask, px)
  split = ids.copy()
  at = np.flatnonzero(split[0] == IMAGE)
  split[0, at[3]], split[0, at[-1] + 1] = 7, IMAGE
  with pytest.raises(ValueError, match="contiguous"):
    run(cfg, split, mask, px)
  with pytest.raises(ValueError, match="text_len=10 is smaller"):
    run(cfg, ids, mask, px, text_len=10)
  with pytest.raises(ValueError, match="unknown hyperparameter"):
    run(pruning.PruningConfig.flat("tops", stage1_budget=4, stage1_hparams={"beta": 1.0}), ids, mask, px)
  _, next_model = llava_next_pair
  ids, mask, px, sizes = _next_batch()
  layout = anyres.pack_layout(sizes, PINPOINTS, CROP, PATCH)
  tokens = (layout.valid & ~layout.newline).sum(-1)
  assert tokens[1] < tokens[0]
  with pytest.raises(ValueError, match=f"exceeds the {tokens[1]} image tokens of image 1"):
    pruning.forward(next_model, pruning.PruningConfig.flat("tops", stage1_budget=int(tokens[1]) + 1), ids, mask, px,
                    sizes)
  with pytest.raises(ValueError, match="LLaVA-NeXT needs image_sizes"):
    pruning.forward(next_model, pruning.PruningConfig.flat("tops", stage1_budget=4), ids, mask, px)


@pytest.mark.slow
def test_a_hyperparameter_sweep_reuses_one_compile(llava_next_pair):
  """Float hyperparameters are traced: alpha 0.3 and 0.9 share a program, yet each gets its own picks (those of a
  program compiled afresh for it)."""
  from models.pruning import driver  # pylint: disable=g-import-not-at-top
  _, model = llava_next_pair
  ids, mask, px, sizes = _next_batch("left", seed=5)
  cfg = lambda alpha: pruning.PruningConfig.flat("tops", stage1_budget=8, stage1_hparams={"alpha": alpha, "lam": 0.5},
                                                 stage2=((1, 4),), stage2_hparams={"alpha": alpha, "lam": 0.5})
  kept = lambda out: (np.asarray(out.stage1.kept), np.asarray(out.stage2[0].kept))
  low = kept(pruning.forward(model, cfg(0.3), ids, mask, px, sizes))
  compiled = driver._forward._cache_size()  # pylint: disable=protected-access
  high = kept(pruning.forward(model, cfg(0.9), ids, mask, px, sizes))
  assert driver._forward._cache_size() == compiled  # pylint: disable=protected-access
  assert cfg(0.3).static() == cfg(0.9).static() and cfg(0.3) != cfg(0.9)
  jax.clear_caches()
  fresh = kept(pruning.forward(model, cfg(0.9), ids, mask, px, sizes))
  for a, b in zip(high, fresh):
    np.testing.assert_array_equal(a, b)
  assert any((a != b).any() for a, b in zip(low, high)), "alpha must change the picks for this test to mean anything"
  # A structural change (another budget, another string option) is another program.
  wider = dataclasses.replace(cfg(0.9), stage1=dataclasses.replace(cfg(0.9).stage1, budget=9))
  pruning.forward(model, wider, ids, mask, px, sizes)
  assert driver._forward._cache_size() == 2  # pylint: disable=protected-access


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_both_families_expose_one_visual_token_interface(request, family):
  """`visual_tokens` / `layout` / `embed` are what pruning reads; LLaVA-1.5 gives the trivial one-crop layout."""
  _, model = request.getfixturevalue(f"{family}_pair")
  if family == "llava":
    ids, mask, px = _llava_batch("left")
    sizes = None
  else:
    ids, mask, px, sizes = _next_batch("left")
  layout = model.layout(sizes, 2)
  tokens = model.visual_tokens(jnp.asarray(px), layout, relevance=("cls",), extras=("keys",))
  vis = model.encode_images(jnp.asarray(px), cls_attention=True, keys=True)
  n = tokens.embeds.shape[1]
  if family == "llava":
    np.testing.assert_array_equal(layout.source, np.tile(np.arange(N), (2, 1)))
    assert not layout.newline.any() and layout.valid.all() and (layout.crop == 0).all()
    np.testing.assert_array_equal(layout.counts, [N, N])
    assert tokens.group_embeds.shape[:3] == (2, 1, N)
  else:
    assert tokens.group_embeds.shape[:3] == (2, px.shape[1], T)
  # Every packed slot holds the per-crop row that `source` names (zeros at newline and padding slots).
  src = np.asarray(tokens.source)
  real = src >= 0
  assert (real == (np.asarray(tokens.valid) & ~np.asarray(tokens.structural))).all()
  flat = lambda a: np.asarray(a).reshape(2, -1, *np.shape(a)[3:])
  for got, per_crop in ((tokens.embeds, tokens.group_embeds), (tokens.features, vis.features),
                        (tokens.keys, vis.keys), (tokens.relevance["cls"], vis.cls_attention)):
    per_crop = np.asarray(per_crop).reshape(2, 1, N, -1) if family == "llava" else np.asarray(per_crop)
    want = np.take_along_axis(flat(per_crop.reshape(*per_crop.shape[:3], -1)), np.maximum(src, 0)[..., None], 1)
    got = np.asarray(got).reshape(2, n, -1)
    np.testing.assert_array_equal(got[real], want[real])
  if family == "llava_next":
    newline = np.asarray(tokens.structural)
    assert newline.any()
    np.testing.assert_array_equal(np.asarray(tokens.embeds)[newline],
                                  np.broadcast_to(np.asarray(model.image_newline[...]), (newline.sum(), model.config.text.hidden_size)))
    for side_channel in (tokens.features, tokens.keys, tokens.relevance["cls"]):     # read at candidates only: zeros
      np.testing.assert_array_equal(np.asarray(side_channel)[~real], 0)
  # One embed: the k-th image token of the batch takes the k-th real packed row, for both families.
  x = np.asarray(model.embed(jnp.asarray(ids), tokens.embeds, tokens.valid))
  rows = np.asarray(tokens.embeds)[np.asarray(tokens.valid)]
  np.testing.assert_array_equal(x[ids == IMAGE], rows)
  assert model.config.max_image_tokens >= int(np.asarray(layout.counts).max())
