"""The family conformance suite: every multimodal backbone of `models.backbones.BACKBONES` against transformers and
the pruning stages' contract (`models.family`), on a tiny random checkpoint written in the hub layout with its
tokenizer and processor files, fed through the family's own Hugging Face processor.

A new family joins by one `CONFORMANCE` entry (a checkpoint writer and image sizes); `test_every_backbone_has_an_entry`
fails until it does.
"""

import dataclasses
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import model_factories as mf
import qwen_factories as qf
from models import backbones
from models import family
from models import loading
from models import pruning
from models.pruning import driver

TOL = dict(rtol=2e-4, atol=2e-4)


def _mask_positions(_, batch):
  """1-D RoPE: the positions transformers' generate gives a left-padded batch, int[1, B, S]."""
  return _positions(batch["attention_mask"])[None]


def _rope_index(hf, batch):
  """M-RoPE: transformers' own get_rope_index, int[3, B, S]."""
  pos, _ = hf.model.get_rope_index(torch.from_numpy(batch["input_ids"]),
                                   mm_token_type_ids=torch.from_numpy(batch["mm_token_type_ids"]),
                                   image_grid_thw=torch.from_numpy(batch["image_grid_thw"]),
                                   attention_mask=torch.from_numpy(batch["attention_mask"]))
  return pos.numpy()


def _original_positions(cfg):
  """M-RoPE families prune with the kept tokens' own ids and the received-attention relevance (no CLS token)."""
  return dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, relevance="received"),
                             stage2=dataclasses.replace(cfg.stage2, positions="original"))


@dataclasses.dataclass(frozen=True)
class Entry:
  """How the suite builds a family: a tiny checkpoint directory with processor files, and the test images' sizes
  (height, width), which should give the images different token counts where the family packs by size.

  processor: the directory's Hugging Face processor. layout_input: the processor output `model.layout` reads.
  relevance: the signals the family provides. positions: transformers' position ids of the batch (hf, batch) ->
  int[R, B, S] (None: transformers computes its own in the logits test). prune: the family's changes to a TOPS
  schedule (relevance, positions)."""
  write: Callable[[pathlib.Path], pathlib.Path]
  sizes: tuple[tuple[int, int], ...]
  processor: Callable = transformers.AutoProcessor.from_pretrained
  layout_input: str = "image_sizes"
  relevance: tuple[str, ...] = ("cls", "received")
  positions: Callable = _mask_positions
  prune: Callable = lambda cfg: cfg


CONFORMANCE = {
    "llava": Entry(lambda d: mf.tiny_llava_hf(d, "llava", crop=56), ((60, 80), (90, 40))),
    "llava_next": Entry(lambda d: mf.tiny_llava_hf(d, "llava_next", crop=56), ((60, 130), (120, 50))),
    # AutoProcessor would build Qwen's video processor, which needs torchvision: the image processor and tokenizer.
    "qwen2_5_vl": Entry(lambda d: qf.tiny_qwen(d, text_layers=4)[1], ((84, 140), (112, 84)), processor=qf.processor,
                        layout_input="image_grid_thw", relevance=("received",), positions=_rope_index,
                        prune=_original_positions),
}
MULTIMODAL = tuple(name for name, b in backbones.BACKBONES.items() if b.multimodal)


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("float32"):
    yield


# The quick loop checks the first family; the others share the seam's code and run in the full suite.
@pytest.fixture(scope="module", params=[name if i == 0 else pytest.param(name, marks=pytest.mark.slow)
                                        for i, name in enumerate(MULTIMODAL)])
def setup(request, tmp_path_factory):
  """(backbone, transformers model, our model, processor outputs as numpy: a left-padded batch of two prompts)."""
  name = request.param
  directory = CONFORMANCE[name].write(tmp_path_factory.mktemp(name))
  hf = transformers.AutoModelForImageTextToText.from_pretrained(directory, attn_implementation="eager").eval()
  processor = CONFORMANCE[name].processor(directory)
  processor.tokenizer.padding_side = "left"
  backbone = backbones.get(name)
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in CONFORMANCE[name].sizes]
  questions = ["What colour is the large object on the left side of the picture?", "How many?"]
  prompts = [backbone.prompt.format(question=q) for q in questions]
  inputs = processor(images=images, text=prompts, return_tensors="np", padding=True)
  return backbone, hf, loading.load_pretrained(directory), {k: np.asarray(v) for k, v in inputs.items()}


def _entry(backbone):
  return CONFORMANCE[backbone.name]


def _positions(mask):
  return np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)


def _pixels(batch):
  """The image inputs (the models read the token types from input_ids)."""
  return {k: jnp.asarray(v) for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}


def test_every_backbone_has_an_entry():
  assert set(MULTIMODAL) == set(CONFORMANCE)


def test_implements_the_family_interface(setup):
  backbone, _, model, _ = setup
  assert isinstance(model, backbone.model)
  assert isinstance(model, family.VisionLanguageModel)
  assert backbone.nominal_groups <= model.config.max_num_crops
  assert backbone.nominal_tokens(model.config) <= model.config.max_image_tokens


def test_logits_match_transformers(setup):
  """model(**processor outputs, all_logits=True) against transformers, at every position of both rows."""
  backbone, hf, model, batch = setup
  position_ids = _entry(backbone).positions(hf, batch)
  with torch.no_grad():
    want = hf(**{k: torch.from_numpy(v) for k, v in batch.items()},
              position_ids=torch.from_numpy(position_ids if position_ids.shape[0] > 1 else position_ids[0])).logits
  got = jax.jit(lambda m, b: m(**b, all_logits=True).logits)(model, {k: jnp.asarray(v) for k, v in batch.items()})
  real = batch["attention_mask"] > 0
  np.testing.assert_allclose(np.asarray(got)[real], want.numpy()[real], **TOL)


def test_visual_tokens_record(setup):
  """The record the pruners read: a valid prefix per image, structural slots inside it, groups and sources that
  name each token's per-group row, relevance by name, and embeddings exactly the packed per-group rows."""
  backbone, _, model, batch = setup
  entry = _entry(backbone)
  b = batch["input_ids"].shape[0]
  layout = model.layout(batch.get(entry.layout_input), b)
  tokens = model.visual_tokens(jnp.asarray(batch["pixel_values"]), layout, relevance=entry.relevance)
  valid, structural = np.asarray(tokens.valid), np.asarray(tokens.structural)
  group, source = np.asarray(tokens.group), np.asarray(tokens.source)
  i, n = valid.shape
  g, t = tokens.group_embeds.shape[1:3]
  counts = valid.sum(-1)
  assert (valid == (np.arange(n) < counts[:, None])).all()
  np.testing.assert_array_equal(counts, (batch["input_ids"] == model.config.image_token_id).sum(-1))
  assert not (structural & ~valid).any()
  content = valid & ~structural
  assert ((group >= 0) == content).all() and (group < g).all()
  assert ((source >= 0) == content).all() and (source // t == np.where(content, group, -1)).all()
  assert np.asarray(tokens.group_valid)[np.arange(i)[:, None], np.maximum(group, 0)][content].all()
  flat = np.asarray(tokens.group_embeds).reshape(i, g * t, -1)
  rows = np.take_along_axis(flat, np.maximum(source, 0)[..., None], 1)
  np.testing.assert_array_equal(np.asarray(tokens.embeds)[content], rows[content])
  assert set(tokens.relevance) == set(tokens.group_relevance) == set(entry.relevance)
  for name in entry.relevance:
    rel = np.asarray(tokens.relevance[name])
    assert rel.shape == (i, n) and (rel[~content] == 0).all() and (rel[content] > 0).all(), name
  with pytest.raises(ValueError, match="saliency"):
    model.visual_tokens(jnp.asarray(batch["pixel_values"]), layout, relevance=("received", "saliency"))


def test_positions_hook(setup):
  backbone, hf, model, batch = setup
  entry = _entry(backbone)
  layout = model.layout(batch.get(entry.layout_input), batch["input_ids"].shape[0])
  pos = np.asarray(model.positions(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), layout))
  assert pos.ndim == 3 and pos.shape[1:] == batch["input_ids"].shape and pos.dtype == np.int32
  real = batch["attention_mask"] > 0
  np.testing.assert_array_equal(pos[:, real], entry.positions(hf, batch)[:, real])


def test_unpruned_configuration_is_the_full_model(setup):
  _, _, model, batch = setup
  ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
  out = pruning.forward(model, pruning.PruningConfig(method="tops"), ids, mask, **_pixels(batch))
  want = model(ids, attention_mask=mask, **_pixels(batch)).logits
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(want), **TOL)
  assert out.stage1 is None and out.stage2 == ()


def test_kept_tokens_lie_within_the_candidates(setup):
  """TOPS' schedule: Stage I keeps 2T of the image's candidates, each Stage II step a subset of what it received."""
  backbone, _, model, batch = setup
  target = 4
  cfg = _entry(backbone).prune(pruning.tops_schedule(model.config.text.num_hidden_layers, target, stage2_alpha=0.5,
                                                     stage2_lam=0.5))
  out = pruning.forward(model, cfg, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                        **_pixels(batch))
  candidates = np.asarray(out.stage1.candidates)
  previous = [set(row[row >= 0]) for row in np.asarray(out.stage1.kept)]
  for row, kept in enumerate(previous):
    assert len(kept) == 2 * target and kept <= set(candidates[row][candidates[row] >= 0])
  for step, keep in zip(out.stage2, (target, target // 4)):
    for row, kept in enumerate(np.asarray(step.kept)):
      kept = set(kept[kept >= 0])
      assert len(kept) == keep and kept <= previous[row]
      previous[row] = kept


@pytest.mark.slow
def test_cached_decoding_equals_uncached(setup):
  """Greedy tokens through the pruned prefill and the KV cache (no pruning) equal an argmax loop over full
  forwards of the growing prompt."""
  _, _, model, batch = setup
  ids, mask = batch["input_ids"], batch["attention_mask"]
  got = pruning.greedy(model, pruning.PruningConfig(method="tops"), jnp.asarray(ids), jnp.asarray(mask),
                       max_new_tokens=4, **_pixels(batch))
  full = jax.jit(lambda m, i, a, p: m(i, attention_mask=a, **p).logits)
  want = []
  for _ in range(4):
    token = np.asarray(jnp.argmax(full(model, jnp.asarray(ids), jnp.asarray(mask), _pixels(batch))[:, -1], -1))
    want.append(token)
    ids = np.concatenate([ids, token[:, None]], 1)
    mask = np.concatenate([mask, np.ones_like(mask[:, :1])], 1)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.stack(want, 1))


@pytest.mark.slow
def test_one_compile_per_shape(setup):
  """A second batch of the same shapes with other values (pixels, TOPS' traced alpha) reuses the compiled pruned
  forward of the first."""
  backbone, _, model, batch = setup
  sizes = []
  for seed, alpha in ((1, 0.5), (2, 0.7)):
    cfg = _entry(backbone).prune(pruning.tops_schedule(model.config.text.num_hidden_layers, 4, stage2_alpha=alpha,
                                                       stage2_lam=0.5))
    px = dict(_pixels(batch))
    px["pixel_values"] = jnp.asarray(np.random.default_rng(seed).normal(size=batch["pixel_values"].shape),
                                     jnp.float32)
    pruning.forward(model, cfg, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), **px)
    sizes.append(driver._forward._cache_size())  # pylint: disable=protected-access
  assert sizes[1] == sizes[0]
