"""CLIP text tower and image head vs transformers (tiny random CLIPModel with a real CLIP BPE tokenizer), CDPruner's
text rules (chunking, instruction stripping) against the official code's loop, and the loader's errors."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

import clip_factories
from clip_factories import CHUNK, VOCAB
from models import clip_text
from tops_jax import relevance as relevance_lib

GQA_SUFFIX = "\nAnswer the question using a single word or phrase."
MEDIUM = "What is the cat on the mat doing at the window?"                  # 2 chunks of 16 (tiny vocabulary)
LONG = ("What is the cat on the mat doing while the other cat sits at the window and what is the weather like "
        "outside?")                                                          # 4 chunks


BOS, EOS = VOCAB - 2, VOCAB - 1


def _make_clip(directory: pathlib.Path, *, eos_token_id: int, seed: int = 0) -> pathlib.Path:
  return clip_factories.tiny_clip(directory, vision_hidden_size=24, seed=seed, eos_token_id=eos_token_id,
                                  vision_layers=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """eos_token_id 2, as in the OpenAI checkpoints' config.json (transformers' legacy argmax pooling)."""
  return _make_clip(tmp_path_factory.mktemp("clip") / "ckpt", eos_token_id=2)


@pytest.fixture(scope="module")
def rel(ckpt):
  return clip_text.ClipTextRelevance(ckpt)


@pytest.fixture(scope="module")
def eos_ckpt(tmp_path_factory):
  """eos_token_id = the tokenizer's EOS id (transformers' first-EOS pooling)."""
  return _make_clip(tmp_path_factory.mktemp("clip") / "ckpt", eos_token_id=EOS, seed=1)


@pytest.fixture(scope="module")
def eos_rel(eos_ckpt):
  return clip_text.ClipTextRelevance(eos_ckpt)


@pytest.fixture(params=["legacy", "eos"])
def either(request):
  """(checkpoint, ClipTextRelevance) for each pooling rule."""
  if request.param == "legacy":
    return request.getfixturevalue("ckpt"), request.getfixturevalue("rel")
  return request.getfixturevalue("eos_ckpt"), request.getfixturevalue("eos_rel")


_hf_text = clip_factories.text_tower
_official_text_embeds = clip_factories.official_text_embeds      # float32[M chunks, E]
_official_image_embeds = clip_factories.official_image_embeds    # float32[..., N, E]


def _official_relevance(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
  """llava_arch.py `encode_images`: image_embeds [B crops, N, E], text_embeds [M chunks, E] -> [B, N], min/max over
  the whole tensor."""
  image_embeds = torch.tensor(image_embeds)
  text_embeds = torch.tensor(text_embeds)
  image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
  text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
  relevance = torch.matmul(image_embeds, text_embeds.t())
  relevance = (-relevance).mean(dim=-1)
  relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
  return relevance.numpy()


# ------------------------------------------------------------------------------------------------------ parity


@pytest.mark.slow
@pytest.mark.parametrize("text", ["a cat", MEDIUM, LONG])
def test_text_embeds_match_transformers_per_chunk(either, text):
  ckpt, rel = either
  ids, mask = rel.chunks(text)
  assert ids.shape[1] == CHUNK
  with torch.no_grad():
    want = _hf_text(ckpt)(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long)).text_embeds.numpy()
  with jax.default_matmul_precision("float32"):
    got = rel.chunk_embeds([text])[0]
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_pool_positions_follow_eos_token_id(either):
  _, rel = either
  ids, _ = rel.chunks(LONG)
  c = ids.shape[0]
  assert c >= 3
  assert ids[0, 0] == BOS and (ids[1:] != BOS).all()
  assert (ids[:-1] != EOS).all() and (ids[-1] == EOS).sum() == 1
  last = int(np.flatnonzero(ids[-1] == EOS)[0])
  got = np.asarray(rel.model.text.text_model.pool_positions(jnp.asarray(ids)))
  if rel.model.config.text.eos_token_id == 2:       # argmax of the ids: BOS, the highest-id word, EOS
    middle = [int(np.argmax(row)) for row in ids[1:-1]]
    assert any(middle)
    want = [0, *middle, last]
  else:                                             # first EOS, position 0 where there is none
    want = [0] * (c - 1) + [last]
  np.testing.assert_array_equal(got, want)


def test_image_embeds_match_transformers(ckpt, rel):
  features = np.random.default_rng(1).normal(size=(3, 16, 24)).astype(np.float32) * 2.0
  want = _official_image_embeds(ckpt, features)
  with jax.default_matmul_precision("float32"):
    got = rel.image_embeds(features)
  assert got.dtype == jnp.float32 and got.shape == (3, 16, 12)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("question", ["What is the cat?" + GQA_SUFFIX, LONG + GQA_SUFFIX])
def test_relevance_end_to_end_matches_official_next_layout(ckpt, rel, question):
  """A LLaVA-NeXT image of 3 crops: one min-max over all crops' tokens, text from the stripped question."""
  crops, n = 3, 16
  features = np.random.default_rng(2).normal(size=(crops, n, 24)).astype(np.float32)
  official_text = question.replace(GQA_SUFFIX, "")                      # model_vqa_loader.py
  want = _official_relevance(_official_image_embeds(ckpt, features), _official_text_embeds(ckpt, official_text))
  with jax.default_matmul_precision("float32"):
    text = rel.encode([question])                                       # [1, E]
    image = rel.image_embeds(features).reshape(1, crops * n, -1)        # the row holds every crop
    got = relevance_lib.clip_text_relevance(image, text, jnp.ones((1, crops * n), bool))
  np.testing.assert_allclose(np.asarray(got).reshape(crops, n), want, rtol=1e-4, atol=1e-4)


def test_encode_is_mean_of_unit_chunk_embeddings_and_batch_independent(ckpt, rel):
  questions = ["a cat", MEDIUM, "What is the cat?" + GQA_SUFFIX]
  together = rel.encode(questions)
  assert together.shape == (3, 12) and together.dtype == np.float32
  for i, q in enumerate(questions):
    chunks = _official_text_embeds(ckpt, clip_text.question_text(q))
    want = (chunks / np.linalg.norm(chunks, axis=-1, keepdims=True)).mean(0)
    np.testing.assert_allclose(together[i], want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(rel.encode([q])[0], together[i], rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(together[0]), 1.0, rtol=1e-6)   # one chunk: a unit vector


# ------------------------------------------------------------------------------------------------- text rules


def _official_chunks(ids: list[int], p: int) -> tuple[np.ndarray, np.ndarray]:
  """The official padding loop on a [1, n] tokenizer output, in NumPy."""
  inputs = {"input_ids": np.asarray([ids]), "attention_mask": np.ones((1, len(ids)), np.int64)}
  segment = (inputs["input_ids"].shape[1] - 1) // p + 1
  padding = p * segment - inputs["input_ids"].shape[1]
  out = {k: np.concatenate([v, np.zeros((v.shape[0], padding), v.dtype)], axis=1).reshape(-1, p)
         for k, v in inputs.items()}
  return out["input_ids"], out["attention_mask"]


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 31, 32, 33, 50])
def test_chunk_token_ids_match_official_padding(n):
  ids = list(range(100, 100 + n))
  got_ids, got_mask = clip_text.chunk_token_ids(ids, CHUNK)
  want_ids, want_mask = _official_chunks(ids, CHUNK)
  np.testing.assert_array_equal(got_ids, want_ids)
  np.testing.assert_array_equal(got_mask, want_mask)
  assert got_ids.shape[0] == (n - 1) // CHUNK + 1


def test_chunk_token_ids_rejects_empty():
  with pytest.raises(ValueError, match="non-empty"):
    clip_text.chunk_token_ids([], CHUNK)


@pytest.mark.parametrize("prompt,want", [
    ("Is there a dog?" + GQA_SUFFIX, "Is there a dog?"),                                  # GQA / POPE
    ("what is it?\nReference OCR token: A, B" + GQA_SUFFIX, "what is it?\nReference OCR token: A, B"),   # TextVQA
    ("Is this a cat? Please answer yes or no.", "Is this a cat? Please answer yes or no."),  # MME: kept
    ("<image>\nContext: x\nA. a\nB. b\nAnswer with the option's letter from the given choices directly.",
     "Context: x\nA. a\nB. b"),                                                           # ScienceQA
    ("hint\nq\nA. a\nB. b\n请直接回答选项字母。", "hint\nq\nA. a\nB. b"),                    # MMBench-CN
    ("Describe the image in detail.", "Describe the image in detail."),                   # MM-Vet: as is
])
def test_question_text_follows_the_official_scripts(prompt, want):
  assert clip_text.question_text(prompt) == want


def test_strip_instructions_flag(ckpt, rel):
  ids, _ = rel.chunks("a cat" + GQA_SUFFIX)
  assert ids.shape[0] == 1 and (ids[0] != 0).sum() == len(rel.tokenizer("a cat")["input_ids"])
  raw = clip_text.ClipTextRelevance(ckpt, strip_instructions=False)
  assert raw.chunks("a cat" + GQA_SUFFIX)[0].shape[0] > 1


# --------------------------------------------------------------------------------------------------------- errors


def _config(path):
  return json.loads((path / "config.json").read_text())


def _write_config(path, config):
  (path / "config.json").write_text(json.dumps(config))


@pytest.fixture
def fresh(tmp_path):
  return _make_clip(tmp_path / "ckpt", eos_token_id=EOS)


def test_load_reads_only_the_text_tower_and_heads(fresh):
  weights = safetensors.numpy.load_file(fresh / "model.safetensors")
  kept = {k: v for k, v in weights.items() if not k.startswith("vision_model.") or "post_layernorm" in k}
  safetensors.numpy.save_file(kept, fresh / "model.safetensors")
  model = clip_text.load_clip(fresh, jnp.bfloat16)
  assert model.text.text_projection.kernel[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(model.vision.visual_projection.kernel[...], np.float32),
                                weights["visual_projection.weight"].T.astype(jnp.bfloat16).astype(np.float32))


def test_missing_directory_and_config(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    clip_text.load_clip(tmp_path / "nope")
  with pytest.raises(ValueError, match="missing config.json"):
    clip_text.load_clip(tmp_path)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(model_type="llava"), "model_type='llava'"),
    (lambda c: c.pop("text_config"), "text_config must be an object"),
    (lambda c: c["text_config"].update(eos_token_id=[2, 3]), "eos_token_id must be one integer"),
    (lambda c: c["text_config"].update(hidden_act="swish"), "hidden_act='swish'"),
    (lambda c: c["text_config"].update(attention_dropout=0.1), "attention_dropout"),
    (lambda c: c["text_config"].update(hidden_size="32"), "text_config.hidden_size must be an integer"),
    (lambda c: c["vision_config"].update(projection_dim=7), "vision_config.projection_dim=7 differs"),
])
def test_config_errors_name_the_field(fresh, edit, match):
  config = _config(fresh)
  edit(config)
  _write_config(fresh, config)
  with pytest.raises(ValueError, match=match) as e:
    clip_text.load_clip(fresh)
  assert "config.json" in str(e.value)


def test_weight_errors_are_listed(fresh):
  weights = safetensors.numpy.load_file(fresh / "model.safetensors")
  del weights["text_projection.weight"]
  weights["visual_projection.weight"] = weights["visual_projection.weight"][:, :5].copy()
  weights["text_model.encoder.layers.7.mlp.fc1.weight"] = np.zeros((2, 2), np.float32)
  weights["text_model.final_layer_norm.bias"] = weights["text_model.final_layer_norm.bias"].astype(np.int32)
  safetensors.numpy.save_file(weights, fresh / "model.safetensors")
  with pytest.raises(ValueError) as e:
    clip_text.load_clip(fresh)
  message = str(e.value)
  for part in ("missing (1", "text_projection.weight", "unexpected (1", "layers.7.mlp.fc1.weight",
               "wrong shape (1", "visual_projection.weight: shape [12, 5], expected [12, 24]", "wrong dtype (1",
               "final_layer_norm.bias: dtype I32"):
    assert part in message, (part, message)


def test_only_pytorch_bin(fresh):
  os.remove(fresh / "model.safetensors")
  (fresh / "pytorch_model.bin").write_bytes(b"\0")
  with pytest.raises(ValueError, match="only pytorch_model.bin.*safetensors only"):
    clip_text.load_clip(fresh)


def test_no_weights_and_no_tokenizer(fresh):
  os.remove(fresh / "vocab.json")
  with pytest.raises(ValueError, match="no tokenizer files"):
    clip_text.ClipTextRelevance(fresh)
  os.remove(fresh / "model.safetensors")
  with pytest.raises(ValueError, match="expected model.safetensors"):
    clip_text.load_clip(fresh)


def test_input_errors(rel):
  with pytest.raises(ValueError, match="list of strings"):
    rel.encode("a cat")
  with pytest.raises(ValueError, match="questions is empty"):
    rel.encode([])
  with pytest.raises(ValueError, match="more than max_position_embeddings=16"):
    rel.model.text_embeds(np.zeros((1, CHUNK + 1), np.int32))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    rel.model.text_embeds(np.full((1, 4), VOCAB, np.int32))
  with pytest.raises(ValueError, match="the vision tower's width"):
    rel.image_embeds(np.zeros((2, 16, 23), np.float32))
