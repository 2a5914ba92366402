"""models.llava_next against transformers 5.23's LlavaNextForConditionalGeneration (PyTorch CPU, float32, eager).

Inputs come from the real `LlavaNextProcessor` (PIL image processor `LlavaNextImageProcessorPil`, a WordLevel tokenizer
built with `tokenizers`), so the <image> expansion, crops, padding crops and image_sizes are the processor's own.
The tiny model: CLIP 28 px / patch 7 (T = 16 tokens per crop), pinpoints = LLaVA-1.6's scaled to 28 px (up to 5
crops), the decoder of `tests.model_factories` (3 layers, GQA), every weight re-drawn so nothing sits at its init.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

from models import anyres
from models import generate
from models import llava_next
from models import conversion
from models import loading
import model_factories

IMAGE_TOKEN_ID = model_factories.IMAGE_TOKEN_ID
CROP, PATCH = 28, 7
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
# (50, 70): wide, 2x2 grid, rows cut by unpad; (100, 20): tall, 3x1 grid, columns cut. 5 and 4 crops.
IMAGE_SIZES = [(50, 70), (100, 20)]
pytestmark = pytest.mark.usefixtures("float32_matmul")


def _tokenizer(padding_side: str) -> transformers.PreTrainedTokenizerFast:
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
  vocab.update({f"w{i}": i for i in range(4, IMAGE_TOKEN_ID)})
  vocab["<image>"] = IMAGE_TOKEN_ID
  tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      extra_special_tokens={"image_token": "<image>"}, padding_side=padding_side)


def _processor(padding_side: str = "right", pinpoints=PINPOINTS, crop=CROP, patch=PATCH):
  image_processor = transformers.LlavaNextImageProcessorPil(
      size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints)
  return transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=_tokenizer(padding_side),
                                         patch_size=patch, vision_feature_select_strategy="default",
                                         num_additional_image_tokens=1)


def _inputs(padding_side: str, seed: int = 0) -> dict[str, np.ndarray]:
  """Two prompts of ~230 and ~320 tokens, one image each, of different sizes, crop counts and unpad directions."""
  rng = np.random.default_rng(seed)
  images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
  words = lambda n: " ".join(f"w{i}" for i in rng.integers(4, IMAGE_TOKEN_ID, size=n))
  prompts = [f"<s> {words(150)} <image> {words(100)}", f"<s> {words(60)} <image> {words(120)}"]
  return dict(_processor(padding_side)(images=images, text=prompts, padding=True, return_tensors="np"))


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Every parameter re-drawn: 1-D weights (norm scales) 1 + N(0, .1), other 1-D N(0, .1), matrices N(0, .5/fan_in)."""
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1:
        p.copy_((1.0 if name.endswith(".weight") else 0.0) + 0.1 * noise)
      else:
        p.copy_(noise * 0.5 / p[0].numel() ** 0.5)


def _tiny_llava_next(tmp_path, text: str, seed: int = 0, vision_feature_layer=-2, **text_overrides):
  torch.manual_seed(seed)
  config = transformers.LlavaNextConfig(
      vision_config=model_factories.tiny_vision_config(image_size=CROP, patch_size=PATCH),
      text_config=model_factories.tiny_text_config(text, **text_overrides),
      image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=PINPOINTS, vision_feature_layer=vision_feature_layer)
  config._attn_implementation = "eager"
  model = transformers.LlavaNextForConditionalGeneration(config)
  _randomize(model, seed)
  model.eval()
  path = pathlib.Path(tmp_path) / f"llava_next_{text}"
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
  """(text, **text_overrides) -> (torch model, our model loaded from its save_pretrained directory); built once."""
  cache = {}

  def get(text: str, **overrides):
    key = (text, repr(sorted(overrides.items())))
    if key not in cache:
      hf_model, path = _tiny_llava_next(tmp_path_factory.mktemp("llava_next"), text, **overrides)
      cache[key] = hf_model, loading.load_pretrained(path, dtype=jnp.float32)
    return cache[key]

  return get


def _hf_reference(model, batch, position_ids):
  """transformers' stage outputs: per-crop features/CLS attention/projector rows (valid crops), packed rows, forward."""
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  num_crops = [anyres.num_crops(s, PINPOINTS, CROP) for s in batch["image_sizes"]]
  crops = torch.cat([t["pixel_values"][i, :n] for i, n in enumerate(num_crops)])
  feature_layers = model.config.vision_feature_layer
  feature_layers = [feature_layers] if isinstance(feature_layers, int) else feature_layers
  num_states = model.config.vision_config.num_hidden_layers + 1
  with torch.no_grad():
    vis = model.model.vision_tower(crops, output_hidden_states=True, output_attentions=True)
    feats = torch.cat([vis.hidden_states[layer][:, 1:] for layer in feature_layers], dim=-1)
    # CLS attention of the encoder layer that produces the (last) feature layer's hidden state.
    cls_attn = vis.attentions[feature_layers[-1] % num_states - 1][:, :, 0, 1:].mean(1)
    proj = model.model.multi_modal_projector(feats)
    packed = model.model.get_image_features(t["pixel_values"], t["image_sizes"]).pooler_output
    out = model(**t, position_ids=torch.from_numpy(position_ids).long(), output_hidden_states=True)
  split = lambda x: torch.split(x, num_crops)
  return dict(features=split(feats), cls_attention=split(cls_attn), image_embeds=split(proj), packed=packed,
              hidden_states=out.hidden_states, logits=out.logits)


@pytest.mark.parametrize("text,padding_side,overrides", [
    ("llama", "right", {}),
    pytest.param("mistral", "left", {"sliding_window": 128}, marks=pytest.mark.slow),   # window < the ~330 tokens
    pytest.param("llama", "left", {"vision_feature_layer": [-3, -1]}, marks=pytest.mark.slow),
])
def test_matches_transformers_stage_by_stage(tiny_pair, text, padding_side, overrides):
  hf_model, model = tiny_pair(text, **overrides)
  assert isinstance(model, llava_next.LlavaNextForConditionalGeneration)
  batch = _inputs(padding_side)
  mask = batch["attention_mask"]
  assert batch["pixel_values"].shape[:2] == (2, 5) and mask.shape[1] > 300 and not mask.all()
  position_ids = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)     # transformers' generate convention
  want = _hf_reference(hf_model, batch, position_ids)

  # Jitted, with image_sizes traced (the layout comes from the host through pure_callback).
  fwd = jax.jit(lambda m, b: m(**b, output_hidden_states=True, all_logits=True))
  got = fwd(model, {k: jnp.asarray(v) for k, v in batch.items()})
  tol = dict(rtol=1e-5, atol=1e-5)
  layout = model.pack_layout(batch["image_sizes"])
  for i, (h, w) in enumerate(IMAGE_SIZES):
    n = anyres.num_crops((h, w), PINPOINTS, CROP)
    np.testing.assert_array_equal(np.asarray(got.crop_valid[i]), np.arange(5) < n)
    np.testing.assert_allclose(got.image_features[i, :n], want["features"][i], **tol)
    np.testing.assert_allclose(got.cls_attention[i, :n], want["cls_attention"][i], **tol)
    np.testing.assert_allclose(got.image_embeds[i, :n], want["image_embeds"][i], **tol)
    count = len(want["packed"][i])
    assert int(got.layout.counts[i]) == count == int((batch["input_ids"][i] == IMAGE_TOKEN_ID).sum())
    np.testing.assert_allclose(got.packed_embeds[i, :count], want["packed"][i], **tol)
    np.testing.assert_array_equal(np.asarray(got.packed_embeds[i, count:]), 0.0)
    # Packed vision features / CLS attention are the per-crop rows gathered by the layout.
    flat_f = np.asarray(got.image_features[i]).reshape(-1, got.image_features.shape[-1])
    flat_a = np.asarray(got.cls_attention[i]).reshape(-1)
    src = layout.source[i]
    np.testing.assert_array_equal(np.asarray(got.packed_features[i])[src >= 0], flat_f[src[src >= 0]])
    np.testing.assert_array_equal(np.asarray(got.packed_cls_attention[i])[src >= 0], flat_a[src[src >= 0]])
    np.testing.assert_array_equal(np.asarray(got.packed_cls_attention[i])[src < 0], 0.0)
  for field in layout._fields:
    np.testing.assert_array_equal(np.asarray(getattr(got.layout, field)), getattr(layout, field))

  real = mask.astype(bool)
  np.testing.assert_allclose(got.inputs_embeds, want["hidden_states"][0], **tol)
  num_layers = model.config.text.num_hidden_layers
  for layer in range(1, num_layers):
    np.testing.assert_allclose(np.asarray(got.hidden_states[layer])[real], want["hidden_states"][layer][real],
                               rtol=1e-5, atol=2e-5, err_msg=f"decoder layer {layer} input")
  np.testing.assert_allclose(np.asarray(got.last_hidden_state)[real], want["hidden_states"][num_layers][real],
                             rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(got.logits)[real], want["logits"].numpy()[real], rtol=1e-5, atol=5e-5)


@pytest.mark.slow
def test_layout_paths_and_crop_padding_agree(tiny_pair):
  """Traced image_sizes (pure_callback) and a precomputed `layout=` with pixel_values padded past max_num_crops give
  the same numbers."""
  _, model = tiny_pair("llama")
  batch = _inputs("right", seed=1)
  traced = jax.jit(lambda m, b: m(**b, all_logits=True))(model, batch)
  layout = model.pack_layout(batch["image_sizes"])
  padded = dict(batch, pixel_values=anyres.pad_crops(batch["pixel_values"], model.config.max_num_crops + 2))
  padded.pop("image_sizes")
  given = jax.jit(lambda m, b, lay: m(**b, layout=lay, all_logits=True))(model, padded, layout)
  np.testing.assert_allclose(given.logits, traced.logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(given.packed_embeds, traced.packed_embeds, rtol=1e-6, atol=1e-6)
  assert given.image_embeds.shape[1] == model.config.max_num_crops + 2
  np.testing.assert_array_equal(np.asarray(given.crop_valid), np.arange(7) < np.array([[5], [4]]))


def test_processor_writes_num_image_features_tokens():
  """The processor's <image> expansion equals anyres.num_image_features (LLaVA-1.6 geometry and the tiny one)."""
  rng = np.random.default_rng(0)
  sizes = [tuple(int(v) for v in rng.integers(1, 2000, size=2)) for _ in range(200)] + [(672, 672), (336, 1008)]
  for pinpoints, crop, patch in ((PINPOINTS, CROP, PATCH),
                                 ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], 336, 14)):
    proc = _processor(pinpoints=pinpoints, crop=crop, patch=patch)
    want = proc._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [anyres.num_image_features(s, pinpoints, crop, patch) for s in sizes] == want
  # LLaVA-1.6 at 336 px: a 672x672 image packs into 2928 tokens, the most any size can reach.
  assert want[-2] == 2928 == anyres.max_num_features(pinpoints, crop, patch)
  batch = _inputs("right")
  counts = anyres.pack_layout(batch["image_sizes"], PINPOINTS, CROP, PATCH).counts
  np.testing.assert_array_equal(counts, (batch["input_ids"] == IMAGE_TOKEN_ID).sum(-1))


@pytest.mark.slow
def test_greedy_generation_matches_transformers(tiny_pair):
  hf_model, model = tiny_pair("llama")
  batch = _inputs("left", seed=2)
  with torch.no_grad():
    want = hf_model.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, max_new_tokens=6,
                             do_sample=False, eos_token_id=None, pad_token_id=0)[:, batch["input_ids"].shape[1]:]
  got = generate.greedy(model, batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                        image_sizes=batch["image_sizes"], max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(got.tokens), want.numpy())


def _hf_config(**overrides) -> dict:
  config = transformers.LlavaNextConfig(vision_config=model_factories.tiny_vision_config(),
                                        text_config=model_factories.tiny_text_config("llama"),
                                        image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=PINPOINTS)
  return {**config.to_dict(), **overrides}


def test_config_from_hf():
  config = llava_next.LlavaNextConfig.from_hf(_hf_config())
  assert config.image_grid_pinpoints == tuple(map(tuple, PINPOINTS))
  assert (config.max_num_crops, config.max_num_features) == (5, 16 + 8 * 9)
  # transformers' defaults are llava-v1.6 at 336 px (the hub checkpoints extend the vocabulary past the image token).
  hf_default = transformers.LlavaNextConfig(text_config=transformers.LlamaConfig(vocab_size=32064)).to_dict()
  default = llava_next.LlavaNextConfig.from_hf(hf_default)
  assert (default.max_num_crops, default.max_num_features, default.vision.image_size) == (5, 2928, 336)
  table = llava_next.conversion_table(config)
  assert table["model.image_newline"] == conversion.Rule(("image_newline",))


@pytest.mark.parametrize("overrides,match", [
    (dict(vision_feature_select_strategy="full"), "not supported by LLaVA-NeXT"),
    (dict(image_grid_pinpoints=[[28, 56], [30, 60]]), "not positive multiples"),
    (dict(image_grid_pinpoints=[[28]]), "pairs"),
    (dict(use_image_newline_parameter=False), "use_image_newline_parameter"),
    (dict(multimodal_patch_merge_type="flat"), "multimodal_patch_merge_type"),
    (dict(model_type="llava"), "model_type"),
])
def test_config_from_hf_rejects_unsupported(overrides, match):
  with pytest.raises(ValueError, match=match):
    llava_next.LlavaNextConfig.from_hf(_hf_config(**overrides))


def test_bad_calls_raise(tiny_pair):
  _, model = tiny_pair("llama")
  ids = jnp.full((1, 20), 5)
  with pytest.raises(ValueError, match="float\\[I, P, 3, H, W\\]"):
    model(ids, pixel_values=jnp.zeros((1, 3, CROP, CROP)), image_sizes=np.array([[28, 28]]))
  with pytest.raises(ValueError, match="needs image_sizes"):
    model(ids, pixel_values=jnp.zeros((1, 3, 3, CROP, CROP)))
  with pytest.raises(ValueError, match="image_sizes must be int"):
    model(ids, pixel_values=jnp.zeros((1, 3, 3, CROP, CROP)), image_sizes=np.array([28, 28]))
  with pytest.raises(ValueError, match="image tokens"):   # 20 text tokens, no <image>
    model(ids, pixel_values=jnp.zeros((1, 3, 3, CROP, CROP)), image_sizes=np.array([[28, 56]]))
