"""The "received" relevance signal: the mean attention each token receives in the vision feature layer.

References: transformers' eager attention probabilities (output_attentions=True) of the tiny random CLIP towers of
LLaVA-1.5 and LLaVA-NeXT (tests/models/conftest.py), reduced by a Python loop; the one-block path for the blockwise
computation; the packed layout for LLaVA-NeXT; `visual_tokens` for what Stage I reads.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import model_factories as mf
from models import anyres
from models import pruning
from tops_jax import relevance

IMAGE = mf.IMAGE_TOKEN_ID
CROP, PATCH = 28, 7
pytestmark = pytest.mark.usefixtures("float32_matmul")


def _received_loop(attentions: np.ndarray) -> np.ndarray:
  """float[I, H, P, P] attention probabilities (query, key) -> float64[I, P]: for each head and key, the mean over
  the queries; then the mean over the heads."""
  images, heads, queries, keys = attentions.shape
  out = np.zeros((images, keys))
  for i in range(images):
    for key in range(keys):
      per_head = [float(np.mean(attentions[i, h, :, key], dtype=np.float64)) for h in range(heads)]
      out[i, key] = sum(per_head) / heads
  return out


def _hf_tower(hf, pixel_values: np.ndarray):
  """transformers' CLIP tower of `hf` on float[I, 3, H, W]: (hidden states, attentions), numpy."""
  with torch.no_grad():
    out = hf.model.vision_tower(torch.tensor(pixel_values), output_hidden_states=True, output_attentions=True)
  return [h.numpy() for h in out.hidden_states], [a.numpy() for a in out.attentions]


# ---------------------------------------------------------------------------------------------- the computation


@pytest.mark.parametrize("block", [1, 4, 5, 16, 64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_blockwise_equals_one_block(block, heads, kv_heads):
  """17 queries in blocks that do not divide them (5: 4 blocks of 5, 3 padding rows) equal one block of 17."""
  rng = np.random.default_rng(block)
  q = jnp.asarray(rng.standard_normal((2, heads, 17, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, kv_heads, 17, 8)), jnp.float32)
  fn = jax.jit(relevance.received_attention, static_argnames="block")
  got, one = fn(q, k, block=block), fn(q, k, block=17)
  np.testing.assert_allclose(got, one, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(np.sum(got, axis=-1), 1.0, rtol=0, atol=1e-6)
  # The GQA layout of the other signals: query head h reads key head h // (H // Hkv).
  kr = np.repeat(np.asarray(k), heads // kv_heads, axis=1)
  logits = np.einsum("ihqd,ihkd->ihqk", np.asarray(q, np.float64), kr) / np.sqrt(8)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(got, _received_loop(probs / probs.sum(-1, keepdims=True)), rtol=1e-5, atol=1e-7)


def test_no_whole_score_map_and_pooling_hook():
  """Blocks of 5 queries never build a 17 x 17 array; `pool` maps the keys to merged tokens (2 x 2 groups of 4
  consecutive keys here)."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((3, 4, 17, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 4, 17, 8)), jnp.float32)
  program = str(jax.make_jaxpr(lambda a, b: relevance.received_attention(a, b, block=5))(q, k))
  shapes = [tuple(int(d) for d in m.split(",")) for m in re.findall(r"\[([\d,]+)\]", program)]
  assert (3, 4, 1, 5, 17) in shapes                              # one block's scores: [I, Hkv, G, 5 rows, 17 keys]
  assert not [s for s in shapes if s[-2:] == (17, 17)]
  patches = lambda r: r[..., 1:]                                 # drop a CLS key, then merge 4 consecutive patches
  pooled = relevance.received_attention(q, k, block=5, pool=lambda r: patches(r).reshape(3, 4, 4).mean(-1))
  plain = np.asarray(relevance.received_attention(q, k, block=5))
  np.testing.assert_allclose(pooled, plain[:, 1:].reshape(3, 4, 4).mean(-1), rtol=1e-6, atol=0)


def test_argument_checks():
  q = jnp.zeros((1, 4, 17, 8))
  with pytest.raises(ValueError, match="17 queries for 16 keys"):
    relevance.received_attention(q, jnp.zeros((1, 4, 16, 8)))
  with pytest.raises(ValueError, match="block must be a positive int"):
    relevance.received_attention(q, q, block=0)


# ------------------------------------------------------------------------------------------- CLIP vs transformers


def test_every_layer_matches_transformers(llava_pair):
  """`CLIPEncoderLayer.received` of every layer (blocks of 5 of the 17 positions) against transformers' attention
  probabilities of that layer; `features(received=True)` reads the feature layer's, CLS dropped or kept."""
  hf, model = llava_pair
  tower = model.vision_tower
  num = tower.config.num_hidden_layers
  px = np.random.RandomState(0).randn(3, 3, CROP, CROP).astype(np.float32)

  def fn(t, px):
    every = t.features(px, feature_layers=tuple(range(num + 1)), select_strategy="full", cls_attention=False)
    states = jnp.split(every.features, num + 1, axis=-1)
    blocked = [t.encoder.layer(layer).received(states[layer], block=5) for layer in range(num)]
    default = t.features(px, feature_layers=-2, select_strategy="default", received=True)
    full = t.features(px, feature_layers=-2, select_strategy="full", cls_attention=False, received=True)
    return blocked, default, full

  blocked, default, full = jax.jit(fn)(tower, px)
  _, attentions = _hf_tower(hf, px)
  for layer in range(num):
    np.testing.assert_allclose(blocked[layer], _received_loop(attentions[layer]), rtol=1e-5, atol=1e-7,
                               err_msg=f"layer {layer}")
  want = _received_loop(attentions[-2])                  # hidden state -2 is produced by attention layer L - 2
  np.testing.assert_allclose(full.received, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(default.received, want[:, 1:], rtol=1e-5, atol=1e-7)
  assert full.cls_attention is None and default.cls_attention is not None


# ------------------------------------------------------------------------------------------------ visual_tokens


def _next_batch(seed=0, sizes=((50, 70), (100, 20))):
  """Two prompts with one image each, of 5 and 4 real crops (NeXT's padding crop included in pixel_values)."""
  rng = np.random.RandomState(seed)
  counts = [anyres.num_image_features(s, mf.TINY_PINPOINTS, CROP, PATCH) for s in sizes]
  ids, mask = mf.prompt_rows(rng, (7, 20), counts, (30, 12), "left")
  return ids, mask, rng.randn(2, 5, 3, CROP, CROP).astype(np.float32), np.array(sizes)


def test_llava_visual_tokens(llava_pair):
  hf, model = llava_pair
  px = np.random.RandomState(1).randn(2, 3, CROP, CROP).astype(np.float32)
  tokens = jax.jit(lambda m, x: m.visual_tokens(x, None, relevance=("cls", "received")))(model, jnp.asarray(px))
  want = _received_loop(_hf_tower(hf, px)[1][-2])[:, 1:]
  np.testing.assert_allclose(tokens.relevance["received"], want, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(tokens.group_relevance["received"], np.asarray(tokens.relevance["received"])[:, None])
  assert set(tokens.relevance) == set(tokens.group_relevance) == {"cls", "received"}


def test_llava_next_visual_tokens_pack_the_per_crop_signal(llava_next_pair):
  """Per crop as transformers' tower computes it on each crop; packed at `source`; zeros at newline and padding."""
  hf, model = llava_next_pair
  _, _, px, sizes = _next_batch()
  layout = model.layout(sizes, 2)
  tokens = jax.jit(lambda m, x, lay: m.visual_tokens(x, lay, relevance=("received",)))(model, jnp.asarray(px), layout)
  assert set(tokens.relevance) == set(tokens.group_relevance) == {"received"}
  per_crop = np.asarray(tokens.group_relevance["received"])                        # [I, P, T]
  want = _received_loop(_hf_tower(hf, px.reshape(-1, 3, CROP, CROP))[1][-2])[:, 1:].reshape(per_crop.shape)
  np.testing.assert_allclose(per_crop, want, rtol=1e-5, atol=1e-7)
  packed, source = np.asarray(tokens.relevance["received"]), np.asarray(tokens.source)
  content = source >= 0
  assert np.asarray(tokens.structural).any() and (~np.asarray(tokens.valid)).any()   # both kinds of empty slot
  np.testing.assert_array_equal(packed[~content], 0.0)
  flat = per_crop.reshape(2, -1)
  np.testing.assert_array_equal(packed[content], np.take_along_axis(flat, np.maximum(source, 0), 1)[content])


# ----------------------------------------------------------------------------------------------------- Stage I


# A pruned forward compiles for about 15 s on the 2-core CPU: both scopes are left out of the quick loop (the
# signal's own parity tests stay in it).
@pytest.mark.slow
@pytest.mark.parametrize("scope", ["official", "per_crop"])
def test_stage1_reads_the_received_signal(llava_next_pair, scope):
  """TOPS with stage1_relevance="received" (globally: `_packed_relevance`; per crop: `_crop_relevance`) runs, and
  its Stage I relevance is the received signal at the candidates."""
  _, model = llava_next_pair
  ids, mask, px, sizes = _next_batch(seed=2)
  cfg = pruning.method_config("tops", family="llava_next", target=4, num_layers=model.config.text.num_hidden_layers,
                              stage2_alpha=0.5, stage2_lam=0.5, scope=scope)
  cfg = dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, relevance="received"))
  assert cfg.stage1_relevance == "received"
  out = pruning.forward(model, cfg, ids, mask, px, sizes)
  tokens = model.visual_tokens(jnp.asarray(px), model.layout(sizes, 2), relevance=("received",))
  cand = np.asarray(out.stage1.candidates)
  received = np.take_along_axis(np.asarray(tokens.relevance["received"]), np.maximum(cand, 0), 1)
  real = cand >= 0
  np.testing.assert_allclose(np.asarray(out.stage1.relevance)[real], received[real], rtol=1e-6, atol=1e-8)
  kept = np.asarray(out.stage1.kept)
  for r in range(2):
    assert set(kept[r][kept[r] >= 0]) <= set(cand[r][real[r]])
  assert np.isfinite(np.asarray(out.logits)).all()


def test_config_accepts_received():
  cfg = pruning.PruningConfig.flat("tops", stage1_budget=8, stage1_relevance="received",
                                   stage1_hparams={"alpha": 0.5, "lam": 0.5})
  assert cfg.stage1.relevance == "received" and "received" in pruning.STAGE1_RELEVANCE
  assert pruning.PruningConfig.flat("tops", stage1_budget=8).stage1_relevance == "cls"      # the default stays
  with pytest.raises(ValueError, match="stage1_relevance"):
    pruning.PruningConfig.flat("tops", stage1_budget=8, stage1_relevance="recieved")
