"""LLaVA port vs transformers' LlavaForConditionalGeneration, stage by stage (tiny random models, CPU, float32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import model_factories as mf
import models
from models import llava

ATOL = 2e-5


def _batch(seed=0, b=2, s=230, pads=(0, 41), image_at=((10,), (57,)), num_images=2, num_patches=mf.NUM_PATCHES):
  """Left-padded prompts of a few hundred tokens with num_patches image tokens at the given offsets."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, mf.IMAGE_TOKEN_ID - 1, size=(b, s))
  mask = np.ones((b, s), np.int64)
  for row, pad in enumerate(pads):
    mask[row, :pad] = 0
    ids[row, :pad] = 0
  for row, starts in enumerate(image_at):
    for start in starts:
      ids[row, start:start + num_patches] = mf.IMAGE_TOKEN_ID
  px = rng.randn(num_images, 3, 28, 28).astype(np.float32)
  return ids, mask, px


def _positions(mask):
  return np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)


def _reference(hf, ids, mask, px, feature_layer=-2, strategy="default"):
  with torch.no_grad():
    tower = hf.model.vision_tower(torch.tensor(px), output_hidden_states=True, output_attentions=True)
    out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(_positions(mask)), output_hidden_states=True)
  layers = [feature_layer] if isinstance(feature_layer, int) else feature_layer
  first = 1 if strategy == "default" else 0
  features = np.concatenate([tower.hidden_states[l][:, first:].numpy() for l in layers], axis=-1)
  cls = tower.attentions[layers[-1]][:, :, 0, first:].mean(1).numpy()
  return features, cls, out


# One jitted forward for the whole module: models with equal configs and batches of equal shapes share a compile.
_FORWARD = jax.jit(lambda m, b: m(**b, output_hidden_states=True, all_logits=True))


def _run(model, ids, mask, px):
  with jax.default_matmul_precision("float32"):
    return _FORWARD(model, dict(input_ids=ids, pixel_values=px, attention_mask=mask, image_sizes=None))


def _image_rows(image_hidden_states, width: int) -> np.ndarray:
  """Projector outputs of every image as rows float[-1, D].

  transformers 5.23 returns one tensor [B, N, D]; 5.24 returns a list with one [N, D] tensor per image. Both read
  the same rows in the same order."""
  parts = image_hidden_states if isinstance(image_hidden_states, (list, tuple)) else [image_hidden_states]
  return np.concatenate([p.detach().numpy().reshape(-1, width) for p in parts])


def _check_all(out, features, cls, ref, mask, atol=ATOL):
  valid = mask.astype(bool)
  np.testing.assert_allclose(out.image_features, features, rtol=0, atol=atol)
  np.testing.assert_allclose(out.cls_attention, cls, rtol=0, atol=1e-6)
  image_rows = _image_rows(ref.image_hidden_states, out.image_embeds.shape[-1])
  np.testing.assert_allclose(np.asarray(out.image_embeds).reshape(image_rows.shape), image_rows, rtol=0, atol=atol)
  np.testing.assert_allclose(np.asarray(out.inputs_embeds)[valid], ref.hidden_states[0].numpy()[valid], rtol=0,
                             atol=atol)
  num_layers = len(ref.hidden_states) - 1
  assert out.hidden_states.shape[0] == num_layers + 1
  for layer in range(num_layers):
    np.testing.assert_allclose(np.asarray(out.hidden_states[layer])[valid], ref.hidden_states[layer].numpy()[valid],
                               rtol=0, atol=atol, err_msg=f"hidden state {layer}")
  np.testing.assert_allclose(np.asarray(out.last_hidden_state)[valid], ref.hidden_states[-1].numpy()[valid], rtol=0,
                             atol=atol)
  np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], rtol=0, atol=atol)
  assert out.logits.dtype == jnp.float32


_LINEAR_ROPE = dict(rope_parameters=dict(rope_type="linear", factor=2.5, rope_theta=500.0))


# The default (unscaled) RoPE path runs in the option tests below.
@pytest.mark.parametrize("text, text_overrides", [
    ("llama", _LINEAR_ROPE),
    pytest.param("mistral", dict(sliding_window=48), marks=pytest.mark.slow),
])
def test_matches_transformers_stage_by_stage(tmp_path, text, text_overrides):
  hf, path = mf.tiny_llava(tmp_path, text, text_overrides=text_overrides)
  model = models.load_pretrained(path)
  ids, mask, px = _batch()
  features, cls, ref = _reference(hf, ids, mask, px)
  _check_all(_run(model, ids, mask, px), features, cls, ref, mask)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    dict(vision_feature_layer=[-3, -1], vision_feature_select_strategy="default", projector_hidden_act="silu"),
    dict(vision_feature_layer=-1, vision_feature_select_strategy="full", multimodal_projector_bias=False,
         tie_word_embeddings=True),
])
def test_feature_layers_strategy_and_projector_options(tmp_path, overrides):
  hf, path = mf.tiny_llava(tmp_path, "llama", image_seq_length=mf.NUM_PATCHES + 1, **overrides)
  model = models.load_pretrained(path)
  assert (model.lm_head is None) == overrides.get("tie_word_embeddings", False)
  n = mf.NUM_PATCHES + (overrides["vision_feature_select_strategy"] == "full")
  ids, mask, px = _batch(seed=1, s=120, pads=(5, 0), image_at=((3, 40), ()), num_patches=n)
  features, cls, ref = _reference(hf, ids, mask, px, overrides["vision_feature_layer"],
                                  overrides["vision_feature_select_strategy"])
  _check_all(_run(model, ids, mask, px), features, cls, ref, mask)


def test_merge_matches_numpy_masked_scatter():
  rng = np.random.RandomState(0)
  ids = rng.randint(0, 9, size=(3, 11))
  ids[rng.rand(3, 11) < 0.4] = 9
  rows = int((ids == 9).sum())
  embeds = rng.randn(3, 11, 4).astype(np.float32)
  image = rng.randn(rows, 4).astype(np.float32)
  expected, k = embeds.copy(), 0
  for b in range(3):
    for s in range(11):
      if ids[b, s] == 9:
        expected[b, s], k = image[k], k + 1
  got = jax.jit(llava.merge_image_features, static_argnums=3)(ids, embeds, image, 9)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(llava.merge_image_features(ids, embeds, image[None], 9), expected)
  with pytest.raises(ValueError, match=f"{rows} image tokens .* {rows - 1} image feature rows"):
    llava.merge_image_features(ids, embeds, image[1:], 9)


@pytest.mark.slow
def test_composed_seam_equals_forward(tmp_path):
  """encode -> project -> merge -> two decoder segments -> head reproduces __call__."""
  _, path = mf.tiny_llava(tmp_path, "llama", text_overrides=_LINEAR_ROPE)     # shares _FORWARD's compile
  model = models.load_pretrained(path)
  ids, mask, px = _batch()
  pos = _positions(mask)

  def composed(m, ids, mask, px):
    vis = m.encode_images(px)
    x = m.embed(ids, m.project(vis.features))
    seg = m.language_model.run_layers(x, pos, mask, start=0, stop=1)
    seg = m.language_model.run_layers(seg.hidden, pos, mask, start=1)
    return m.head(seg.hidden)

  want = _run(model, ids, mask, px).logits
  with jax.default_matmul_precision("float32"):
    got = jax.jit(composed)(model, ids, mask, px)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_config_rejects_unsupported_fields():
  base = dict(model_type="llava", vision_config=dict(model_type="clip_vision_model"),
              text_config=dict(vocab_size=32064))
  assert llava.LlavaConfig.from_hf(base).text.num_hidden_layers == 32           # transformers' Llama defaults
  for bad, match in [
      (dict(vision_feature_select_strategy="cls_patch"), "vision_feature_select_strategy"),
      (dict(projector_hidden_act="swish_beta"), "projector_hidden_act"),
      (dict(vision_feature_layer=30), "vision feature layer 30 is out of range"),
      (dict(text_config=dict(model_type="qwen2")), "text_config.model_type='qwen2'"),
      (dict(vision_config=dict(model_type="siglip_vision_model")), "siglip"),
      (dict(vision_config=dict(hidden_act="mish")), "vision_config.hidden_act"),
  ]:
    with pytest.raises(ValueError, match=match):
      llava.LlavaConfig.from_hf({**base, **bad})


def test_config_is_static_and_hashable():
  config = llava.LlavaConfig()
  assert hash(config) == hash(dataclasses.replace(config))
