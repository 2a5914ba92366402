"""Checkpoint loading: both key layouts, shards, bfloat16, and one clear error for every kind of bad checkpoint."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import model_factories as mf
import models
from models import conversion
from models import loading


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  hf, path = mf.tiny_llava(tmp_path_factory.mktemp("ckpt"), "llama")
  return hf, path


def _copy(src, dst, edit_tensors=None, edit_config=None):
  """Copies a checkpoint directory, optionally rewriting its tensors / config."""
  shutil.copytree(src, dst)
  if edit_tensors is not None:
    tensors = edit_tensors(load_file(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    save_file(tensors, dst / "model.safetensors")
  if edit_config is not None:
    config = json.loads((dst / "config.json").read_text())
    edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
  return dst


def _params(model):
  return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def test_weights_land_where_transformers_has_them(checkpoint):
  hf, path = checkpoint
  model = models.load_pretrained(path)
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  lm = model.language_model.layers
  np.testing.assert_array_equal(lm.self_attn.k_proj.kernel[2],
                                sd["model.language_model.layers.2.self_attn.k_proj.weight"].T)
  np.testing.assert_array_equal(lm.post_attention_layernorm.scale[1],
                                sd["model.language_model.layers.1.post_attention_layernorm.weight"])
  conv = sd["model.vision_tower.embeddings.patch_embedding.weight"]                        # OIHW
  np.testing.assert_array_equal(model.vision_tower.embeddings.patch_embedding.kernel[...], conv.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(model.vision_tower.encoder.layers.mlp.fc1.bias[0],
                                sd["model.vision_tower.encoder.layers.0.mlp.fc1.bias"])
  np.testing.assert_array_equal(model.lm_head.kernel[...], sd["lm_head.weight"].T)


def test_hub_layout_sharded_with_ignored_buffers(checkpoint, tmp_path):
  """llava-hf hub names (vision_tower.vision_model.*), split over two shards with an index, plus old buffers."""
  _, path = checkpoint
  tensors = load_file(path / "model.safetensors")
  hub = {}
  for name, value in tensors.items():
    if name.startswith("vision_tower."):
      name = "vision_tower.vision_model." + name[len("vision_tower."):]
    hub[name] = value
  hub["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
  hub["vision_tower.vision_model.embeddings.position_ids"] = np.arange(17)[None]
  out = _sharded(path, tmp_path / "hub", hub)
  assert any(n.startswith("vision_tower.vision_model.") for n in hub)
  want, got = _params(models.load_pretrained(path)), _params(models.load_pretrained(out))
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.slow
def test_bfloat16_checkpoint(tmp_path):
  hf, path = mf.tiny_llava(tmp_path, "mistral", dtype=torch.bfloat16)
  assert load_file(path / "model.safetensors")["language_model.lm_head.weight"].dtype == ml_dtypes.bfloat16
  model = models.load_pretrained(path, dtype=jnp.bfloat16)
  ref = hf.state_dict()["model.language_model.layers.1.mlp.down_proj.weight"].float().numpy().T
  kernel = model.language_model.layers.mlp.down_proj.kernel[1]
  assert kernel.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(kernel, np.float32), ref)
  as_f32 = models.load_pretrained(path, dtype=jnp.float32).language_model.layers.mlp.down_proj.kernel[1]
  assert as_f32.dtype == jnp.float32
  np.testing.assert_array_equal(as_f32, ref)
  ids = np.full((1, 20), 7)
  ids[0, 2:18] = mf.IMAGE_TOKEN_ID
  out = jax.jit(lambda m, b: m(**b))(model, dict(input_ids=ids, pixel_values=np.zeros((1, 3, 28, 28), np.float32)))
  assert out.logits.dtype == jnp.float32 and out.image_embeds.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(out.logits)).all()


def test_bad_weights_are_listed_in_one_error(checkpoint, tmp_path):
  _, path = checkpoint

  def edit(t):
    del t["language_model.model.layers.1.mlp.up_proj.weight"]
    t["language_model.model.layers.1.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    t["multi_modal_projector.linear_2.weight"] = np.zeros((64, 63), np.float32)
    t["vision_tower.post_layernorm.bias"] = np.zeros((32,), np.int32)
    return t

  bad = _copy(path, tmp_path / "bad", edit_tensors=edit)
  with pytest.raises(ValueError) as e:
    models.load_pretrained(bad)
  msg = str(e.value)
  assert "missing (1, transformers-5 names):\n    model.language_model.layers.1.mlp.up_proj.weight" in msg
  assert "unexpected (1):\n    language_model.model.layers.1.mlp.extra.weight" in msg
  assert "multi_modal_projector.linear_2.weight: shape [64, 63], expected [64, 64]" in msg
  assert "vision_tower.post_layernorm.bias: dtype I32 (expected floating point)" in msg


@pytest.mark.parametrize("name, edit, match", [
    ("missing", lambda t: {k: v for k, v in t.items() if k != "language_model.lm_head.weight"},
     r"missing \(1, transformers-5 names\):\n    lm_head.weight"),
    ("extra", lambda t: {**t, "vision_tower.head.weight": np.zeros(3, np.float32)},
     r"unexpected \(1\):\n    vision_tower.head.weight"),
    ("shape", lambda t: {**t, "vision_tower.embeddings.patch_embedding.weight": np.zeros((32, 3, 14, 7), np.float32)},
     r"patch_embedding.weight: shape \[32, 3, 14, 7\], expected \[32, 3, 7, 7\]"),
    ("duplicate", lambda t: {**t, "model.language_model.norm.weight": t["language_model.model.norm.weight"]},
     r"duplicated \(1\)"),
])
def test_each_bad_weight_kind(checkpoint, tmp_path, name, edit, match):
  _, path = checkpoint
  bad = _copy(path, tmp_path / name, edit_tensors=edit)
  with pytest.raises(ValueError, match=match):
    models.load_pretrained(bad)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["text_config"].update(rope_parameters=dict(rope_type="llama3", factor=8.0)),
     "unsupported rope type 'llama3'"),
    (lambda c: c.update(model_type="qwen2_vl"), "unknown model_type 'qwen2_vl'"),
    (lambda c: c.update(vision_feature_select_strategy="cls"), "vision_feature_select_strategy='cls'"),
    (lambda c: c["vision_config"].update(hidden_act="swish"), "vision_config.hidden_act='swish'"),
    (lambda c: c["text_config"].update(model_type="mistral", sliding_window=0), "sliding_window must be positive"),
])
def test_unsupported_config_fields(checkpoint, tmp_path, edit, match):
  _, path = checkpoint
  bad = _copy(path, tmp_path / "cfg", edit_config=edit)
  with pytest.raises(ValueError, match=match):
    models.load_pretrained(bad)


def test_missing_config_and_weights(checkpoint, tmp_path):
  _, path = checkpoint
  no_config = _copy(path, tmp_path / "a")
  (no_config / "config.json").unlink()
  with pytest.raises(ValueError, match="missing config.json"):
    models.load_pretrained(no_config)
  no_weights = _copy(path, tmp_path / "b")
  (no_weights / "model.safetensors").unlink()
  with pytest.raises(ValueError, match="no weights in .*model.safetensors.index.json"):
    models.load_pretrained(no_weights)
  with pytest.raises(ValueError, match="does not exist"):
    models.load_pretrained(tmp_path / "nowhere")


def test_canonical_names():
  assert conversion.canonical_name("language_model.model.layers.3.mlp.up_proj.weight") == \
      "model.language_model.layers.3.mlp.up_proj.weight"
  assert conversion.canonical_name("language_model.lm_head.weight") == "lm_head.weight"
  assert conversion.canonical_name("vision_tower.vision_model.pre_layrnorm.bias") == "model.vision_tower.pre_layrnorm.bias"
  assert conversion.canonical_name("image_newline") == "model.image_newline"
  assert conversion.canonical_name("model.multi_modal_projector.linear_1.bias") == \
      "model.multi_modal_projector.linear_1.bias"


# ------------------------------------------------------------------- malformed files: one error naming file and field


def _sharded(path, out, tensors=None):
  """The checkpoint at `path` (its config and `tensors`, by default its own weights) split over two shards with an
  index in `out`; -> out."""
  tensors = load_file(path / "model.safetensors") if tensors is None else tensors
  names = sorted(tensors)
  out.mkdir()
  shutil.copy(path / "config.json", out / "config.json")
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file, part in shards.items():
    save_file({n: tensors[n] for n in part}, out / file)
  index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
  (out / "model.safetensors.index.json").write_text(json.dumps(index))
  return out


@pytest.mark.parametrize("text, kind", [("[1, 2]", "array"), ('"llava"', "string"), ("null", "null")])
def test_config_that_is_not_an_object(checkpoint, tmp_path, text, kind):
  _, path = checkpoint
  bad = _copy(path, tmp_path / "cfg")
  (bad / "config.json").write_text(text)
  with pytest.raises(ValueError, match=rf"config.json in '{re.escape(str(bad))}' must hold a JSON object \(\{{...\}}\), got a JSON "
                                       rf"{kind}$"):
    models.load_pretrained(bad)


@pytest.mark.parametrize("index, match", [
    ("{not json", r"model.safetensors.index.json in '.*' is not valid JSON: Expecting property name"),
    ("[]", r"model.safetensors.index.json in '.*' must hold a JSON object .*, got a JSON array"),
    ('{"metadata": {}}', r"model.safetensors.index.json in '.*' has no `weight_map` .*keys: \['metadata'\]"),
    ('{"weight_map": ["a.weight"]}', r"`weight_map` must be a non-empty object .*, got a JSON array"),
    ('{"weight_map": {}}', r"`weight_map` must be a non-empty object .*, got empty"),
    ('{"weight_map": {"lm_head.weight": 3}}', r"`weight_map` values must be shard file names:\n  bad entries \(1\):\n"
                                              r"    lm_head.weight: 3"),
])
def test_malformed_index(checkpoint, tmp_path, index, match):
  _, path = checkpoint
  bad = _sharded(path, tmp_path / "sharded")
  (bad / "model.safetensors.index.json").write_text(index)
  with pytest.raises(ValueError, match=match):
    models.load_pretrained(bad)


@pytest.mark.parametrize("cut, reason", [(0.5, "incomplete metadata"), (0.0, "header too small"),
                                         (0.001, "invalid header length")])
def test_truncated_or_empty_shard_is_named(checkpoint, tmp_path, cut, reason):
  _, path = checkpoint
  bad = _sharded(path, tmp_path / "sharded")
  shard = bad / "model-00002-of-00002.safetensors"
  data = shard.read_bytes()
  shard.write_bytes(data[:int(len(data) * cut)])
  with pytest.raises(ValueError, match=rf"safetensors shard '{re.escape(str(shard))}' cannot be read \(truncated, empty or not a "
                                       rf"safetensors file\): .*{reason}"):
    models.load_pretrained(bad)


def _set(section, field, value):
  def edit(c):
    (c if section is None else c[section])[field] = value
  return edit


@pytest.mark.parametrize("section, field, value, message", [
    ("text_config", "hidden_size", "64", "text_config.hidden_size must be an integer, got '64' (a JSON string)"),
    ("text_config", "num_hidden_layers", 3.0, "text_config.num_hidden_layers must be an integer, got 3.0 (a JSON "
                                              "number)"),
    ("text_config", "rms_norm_eps", "1e-5", "text_config.rms_norm_eps must be a number, got '1e-5' (a JSON string)"),
    ("text_config", "attention_bias", 0, "text_config.attention_bias must be true or false, got 0 (a JSON integer)"),
    ("text_config", "num_attention_heads", 0, "text_config.num_attention_heads must be positive, got 0"),
    ("vision_config", "patch_size", "7", "vision_config.patch_size must be an integer, got '7' (a JSON string)"),
    ("vision_config", "layer_norm_eps", True, "vision_config.layer_norm_eps must be a number, got True (a JSON "
                                              "boolean)"),
    (None, "image_token_index", "255", "image_token_index must be an integer, got '255' (a JSON string)"),
    (None, "multimodal_projector_bias", "false", "multimodal_projector_bias must be true or false, got 'false' (a "
                                                 "JSON string)"),
    (None, "vision_feature_layer", ["-2"], "vision_feature_layer must be an int or a non-empty list of ints, got "
                                           "['-2']"),
    (None, "text_config", "llama", "text_config must be a JSON object, got 'llama'"),
])
def test_config_fields_of_the_wrong_type(checkpoint, tmp_path, section, field, value, message):
  """Strings for numbers (and numbers for booleans) are rejected, not coerced, naming config.json and the field."""
  _, path = checkpoint
  bad = _copy(path, tmp_path / "cfg", edit_config=_set(section, field, value))
  with pytest.raises(ValueError) as e:
    models.load_pretrained(bad)
  assert str(e.value) == f"config.json in {str(bad)!r}: {message}"


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["text_config"]["rope_parameters"].update(rope_theta="10000"),
     "text_config rope_theta must be a number, got '10000' (a JSON string)"),
    (lambda c: c["text_config"].update(rope_parameters=dict(rope_type="linear", factor="2")),
     "text_config.rope_parameters.factor must be a number, got '2' (a JSON string)"),
    (lambda c: c.update(model_type="llava_next", image_grid_pinpoints=[["28", "56"]]),
     "image_grid_pinpoints must be a list of [height, width] integer pairs, got [['28', '56']]"),
])
def test_nested_config_fields_of_the_wrong_type(checkpoint, tmp_path, edit, message):
  _, path = checkpoint
  bad = _copy(path, tmp_path / "cfg", edit_config=edit)
  with pytest.raises(ValueError) as e:
    models.load_pretrained(bad)
  assert str(e.value) == f"config.json in {str(bad)!r}: {message}"


@pytest.mark.parametrize("dtype, match", [(jnp.int32, "dtype=int32 is not a floating dtype"),
                                          (np.bool_, "dtype=bool is not a floating dtype"),
                                          ("float33", "dtype='float33' is not a dtype")])
def test_non_floating_dtype(checkpoint, dtype, match):
  _, path = checkpoint
  with pytest.raises(ValueError, match=match):
    models.load_pretrained(path, dtype=dtype)


def test_non_finite_weights_are_listed(checkpoint, tmp_path):
  _, path = checkpoint

  def edit(t):
    t["language_model.lm_head.weight"][3, 1:3] = np.nan
    t["multi_modal_projector.linear_1.bias"][0] = -np.inf
    return t

  bad = _copy(path, tmp_path / "nan", edit_tensors=edit)
  with pytest.raises(ValueError) as e:
    models.load_pretrained(bad)
  assert str(e.value) == (
      f"checkpoint {str(bad)!r} holds weights that are not finite as float32:\n"
      "  tensors with NaN/inf (2):\n"
      "    language_model.lm_head.weight (model.safetensors): 2 NaN, 0 inf of 16384 values\n"
      "    multi_modal_projector.linear_1.bias (model.safetensors): 0 NaN, 1 inf of 64 values")


def test_weights_that_overflow_the_dtype_are_listed(checkpoint, tmp_path):
  _, path = checkpoint
  big = _copy(path, tmp_path / "big",
              edit_tensors=lambda t: t | {"language_model.model.norm.weight": np.full(64, 1e6, np.float32)})
  models.load_pretrained(big, dtype=jnp.bfloat16)              # 1e6 fits bfloat16's range
  with pytest.raises(ValueError, match=r"language_model.model.norm.weight \(model.safetensors\): finite in the "
                                       r"checkpoint, overflows float16"):
    models.load_pretrained(big, dtype=jnp.float16)


def test_conversion_transforms_invert_and_predict_shapes():
  rng = np.random.default_rng(0)
  for transform, shape in (("identity", (3, 5)), ("linear", (3, 5)), ("conv", (8, 3, 4, 2))):
    a = rng.normal(size=shape)
    b = conversion.TRANSFORMS[transform](a)
    assert b.shape == conversion.transformed_shape(shape, transform)
    assert conversion.checkpoint_shape(b.shape, transform) == shape
    np.testing.assert_array_equal(conversion.INVERSE_TRANSFORMS[transform](b), a)
  # torch Linear [out, in] -> Flax kernel [in, out]; torch Conv2d OIHW -> Flax HWIO.
  np.testing.assert_array_equal(conversion.TRANSFORMS["linear"](np.arange(6).reshape(2, 3)),
                                np.arange(6).reshape(2, 3).T)
  assert conversion.transformed_shape((8, 3, 4, 2), "conv") == (4, 2, 3, 8)
