"""CLIP tower vs transformers' CLIPVisionModel: every hidden state, every layer's CLS attention row, input checks."""

import jax
import numpy as np
import pytest
import torch

import model_factories as mf
import models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  hf, path = mf.tiny_llava(tmp_path_factory.mktemp("clip"), "llama", vision_overrides=dict(num_hidden_layers=4))
  return hf.model.vision_tower, models.load_pretrained(path).vision_tower


def test_hidden_states_and_cls_attention_of_every_layer(tiny):
  hf, tower = tiny
  num = tower.config.num_hidden_layers
  px = np.random.RandomState(0).randn(3, 3, 28, 28).astype(np.float32)

  def fn(t, px):
    every = t.features(px, feature_layers=tuple(range(num + 1)), select_strategy="full", cls_attention=False)
    states = jax.numpy.split(every.features, num + 1, axis=-1)
    full = [t.encoder.layer(layer - 1).cls_attention(states[layer - 1]) for layer in range(1, num + 1)]
    default = t.features(px, feature_layers=(-2, 1), select_strategy="default")
    return states, full, default, t.hidden_state(px, -1)

  with jax.default_matmul_precision("float32"):
    states, full, default, last = jax.jit(fn)(tower, px)
  with torch.no_grad():
    ref = hf(torch.tensor(px), output_hidden_states=True, output_attentions=True)
  assert len(ref.hidden_states) == num + 1
  for layer in range(num + 1):
    np.testing.assert_allclose(states[layer], ref.hidden_states[layer].numpy(), rtol=0, atol=2e-5)
  np.testing.assert_allclose(last, ref.hidden_states[-1].numpy(), rtol=0, atol=2e-5)
  for layer in range(1, num + 1):        # hidden state `layer` is produced by attention layer `layer - 1`
    want = ref.attentions[layer - 1][:, :, 0, :].mean(1).numpy()
    np.testing.assert_allclose(full[layer - 1], want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(full[layer - 1].sum(-1), 1.0, rtol=0, atol=1e-5)
  want = np.concatenate([ref.hidden_states[-2][:, 1:].numpy(), ref.hidden_states[1][:, 1:].numpy()], axis=-1)
  np.testing.assert_allclose(default.features, want, rtol=0, atol=2e-5)
  # With several feature layers the CLS attention is the last one's (layer 1 <- attention layer 0).
  np.testing.assert_allclose(default.cls_attention, ref.attentions[0][:, :, 0, 1:].mean(1).numpy(), rtol=0, atol=1e-6)


def test_input_and_layer_checks(tiny):
  _, tower = tiny
  with pytest.raises(ValueError, match="does not match the tower's 28x28"):
    tower.features(np.zeros((1, 3, 32, 32), np.float32))
  with pytest.raises(ValueError, match="NCHW"):
    tower.features(np.zeros((1, 28, 28, 3), np.float32))
  with pytest.raises(ValueError, match="out of range"):
    tower.features(np.zeros((1, 3, 28, 28), np.float32), feature_layers=5)
  with pytest.raises(ValueError, match="no attention layer produced it"):
    tower.features(np.zeros((1, 3, 28, 28), np.float32), feature_layers=0)
  with pytest.raises(ValueError, match="select_strategy"):
    tower.features(np.zeros((1, 3, 28, 28), np.float32), select_strategy="cls_patch")
