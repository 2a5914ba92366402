"""Qwen2.5-VL (`models.qwen2_5_vl`) against transformers' Qwen2_5_VLForConditionalGeneration (float32, eager), on
tiny random checkpoints in the hub layout fed through transformers' own processor (`qwen_factories`): stage by stage
(patch embedding, window index, rotary tables, a window block, a full block, merger, rope index), then logits of the
whole model on a left-padded batch and greedy generation; the config parser's errors.

Configurations (`CONFIGS`): window sizes 56 / 84 / 112 px (2, 3, 4 merged tokens a side), full-attention blocks first,
in the middle and last, odd merged grids (an 84 x 140 image: 3 x 5 merged), the legacy flat config.json, tied and
untied heads, transformers 5's module-tree weight names.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import vision_utils

import qwen_factories as qf
from models import backbones
from models import generate
from models import loading
from models import qwen2_5_vl
from models import qwen2_5_vl_vision as vision_lib

TOL = dict(rtol=1e-4, atol=1e-4)
# Images (height, width): odd merged grids (3 x 5), a square, a tall one; the second prompt holds two images.
SIZES = ((84, 140), (56, 56), (112, 84))
QUESTIONS = ("What colour is the large object on the left side of the picture?", "Describe both images.")


@dataclasses.dataclass(frozen=True)
class Case:
  window_size: int = 56
  fullatt: tuple[int, ...] = (1,)
  tie: bool = False
  flat: bool = False
  v5_names: bool = False


CONFIGS = {
    "w56_full_middle": Case(),
    "w84_full_first_tied_v5names": Case(window_size=84, fullatt=(0,), tie=True, v5_names=True),
    "w112_full_last_flat": Case(window_size=112, fullatt=(2,), flat=True),
}


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("float32"):
    yield


def _build(tmp_path_factory, case: Case):
  hf, directory = qf.tiny_qwen(tmp_path_factory.mktemp("qwen"), window_size=case.window_size, fullatt=case.fullatt,
                               tie=case.tie)
  if case.flat:
    qf.flatten_config(directory)
  if case.v5_names:
    qf.to_v5_names(directory)
  proc = qf.processor(directory)
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
  texts = [qf.chat_prompt(QUESTIONS[0]), qf.chat_prompt(QUESTIONS[1], images=2)]
  batch = {k: np.asarray(v) for k, v in proc(images=images, text=texts, return_tensors="np", padding=True).items()}
  return hf, loading.load_pretrained(directory), batch, directory


# The quick loop checks the first configuration; the others (same code, other geometry and files) run in the full
# suite.
@pytest.fixture(scope="module", params=[name if i == 0 else pytest.param(name, marks=pytest.mark.slow)
                                        for i, name in enumerate(CONFIGS)])
def setup(request, tmp_path_factory):
  """(case, transformers model, port, processor outputs of a left-padded batch of two prompts, three images)."""
  case = CONFIGS[request.param]
  return (case,) + _build(tmp_path_factory, case)


@pytest.fixture(scope="module")
def default(tmp_path_factory):
  return _build(tmp_path_factory, CONFIGS["w56_full_middle"])


def _torch(batch):
  return {k: torch.from_numpy(v) for k, v in batch.items()}


def _grid(batch):
  return torch.from_numpy(batch["image_grid_thw"])


def test_config_reads_the_checkpoint(setup):
  case, hf, model, _, directory = setup
  config = model.config
  raw = json.loads((directory / "config.json").read_text())
  assert ("text_config" in raw) != case.flat
  assert config.vision.window_size == case.window_size and config.vision.fullatt_block_indexes == case.fullatt
  assert config.tie_word_embeddings == case.tie and (model.lm_head is None) == case.tie
  assert config.text.rms_norm_eps == hf.config.text_config.rms_norm_eps == 1e-6
  assert config.text.mrope_section == (2, 3, 3) and config.text.o_proj_bias is False


def test_patch_embedding(default):
  hf, model, batch, _ = default
  with torch.no_grad():
    want = hf.model.visual.patch_embed(torch.from_numpy(batch["pixel_values"])).numpy()
  np.testing.assert_allclose(np.asarray(model.visual.embed_patches(jnp.asarray(batch["pixel_values"]))), want, **TOL)


@pytest.mark.parametrize("window_size", [56, 84, 112])
def test_window_index_and_segments(window_size):
  """window_index, the windows (cu_window_seqlens) and the frames (cu_seqlens) of images and a 3-frame video."""
  config = vision_lib.VisionConfig(window_size=window_size, hidden_size=32, num_heads=2)
  grid = np.array([[1, 6, 10], [1, 4, 4], [3, 8, 6], [1, 16, 18]])
  layout = vision_lib.vision_layout(config, grid, int(np.prod(grid, 1).sum()))
  index, cu_windows = vision_utils.get_vision_window_index(torch.from_numpy(grid), 2, window_size, 14)
  np.testing.assert_array_equal(layout.window_index, index.numpy())
  boundaries = lambda seg: np.concatenate([[0], np.flatnonzero(np.diff(seg)) + 1, [seg.size]])
  np.testing.assert_array_equal(boundaries(layout.window_segment), cu_windows.numpy())
  np.testing.assert_array_equal(boundaries(layout.frame_segment), vision_utils.get_vision_cu_seqlens(
      torch.from_numpy(grid)).numpy())
  assert np.array_equal(np.unique(layout.window_segment), np.arange(len(cu_windows) - 1))
  with pytest.raises(ValueError, match="pixel_values holds"):
    vision_lib.vision_layout(config, grid, 7)


def test_rotary_tables(default):
  hf, model, batch, _ = default
  grid = _grid(batch)
  visual = hf.model.visual
  ids = vision_utils.get_vision_position_ids(grid, 2)
  index, _ = vision_utils.get_vision_window_index(grid, 2, model.config.vision.window_size, 14)
  n = ids.shape[0]
  with torch.no_grad():
    cos, sin = visual.rotary_pos_emb(torch.zeros(n, 1), ids)
    want = [visual.permute_input_for_window_attn(t, index, n).numpy() for t in (cos, sin)]
  layout = model.vision_layout(batch["image_grid_thw"], n)
  got = vision_lib.rotary_tables(model.config.vision, jnp.asarray(layout.rotary))
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-6)


def _tower_inputs(hf, model, batch):
  """(layout, window-ordered patch embeddings, cos/sin) of both implementations for the batch's images."""
  grid = _grid(batch)
  visual = hf.model.visual
  n = batch["pixel_values"].shape[0]
  ids = vision_utils.get_vision_position_ids(grid, 2)
  index, cu_windows = vision_utils.get_vision_window_index(grid, 2, model.config.vision.window_size, 14)
  with torch.no_grad():
    x = visual.permute_input_for_window_attn(visual.patch_embed(torch.from_numpy(batch["pixel_values"])), index, n)
    pe = tuple(visual.permute_input_for_window_attn(t, index, n) for t in visual.rotary_pos_emb(x, ids))
  cu_frames = vision_utils.get_vision_cu_seqlens(grid)
  return x, pe, cu_windows, cu_frames


@pytest.mark.parametrize("kind", ["window", "full"])
def test_one_block(default, kind):
  """Block 1 (full attention in this config) and block 0 (windows) on the same window-ordered input."""
  hf, model, batch, _ = default
  index = 1 if kind == "full" else 0
  assert (index in model.config.vision.fullatt_block_indexes) == (kind == "full")
  x, pe, cu_windows, cu_frames = _tower_inputs(hf, model, batch)
  with torch.no_grad():
    want = hf.model.visual.blocks[index](x, cu_seqlens=cu_frames if kind == "full" else cu_windows,
                                         position_embeddings=pe).numpy()
  layout = model.vision_layout(batch["image_grid_thw"], x.shape[0])
  cos, sin = vision_lib.rotary_tables(model.config.vision, jnp.asarray(layout.rotary))
  got = jax.jit(lambda m, x: m.visual.run_blocks(x, cos, sin, layout, index, index + 1))(model, jnp.asarray(x.numpy()))
  np.testing.assert_allclose(np.asarray(got), want, **TOL)


def test_merger_and_tower(default):
  hf, model, batch, _ = default
  x = np.random.default_rng(1).normal(size=(batch["pixel_values"].shape[0], 32)).astype(np.float32)
  with torch.no_grad():
    want_merger = hf.model.visual.merger(torch.from_numpy(x)).numpy()
    want = hf.model.visual(torch.from_numpy(batch["pixel_values"]), grid_thw=_grid(batch))
  np.testing.assert_allclose(np.asarray(model.visual.merger(jnp.asarray(x))), want_merger, **TOL)
  got = jax.jit(lambda m, p, g: m.encode_images(p, g))(model, jnp.asarray(batch["pixel_values"]),
                                                        jnp.asarray(batch["image_grid_thw"]))
  np.testing.assert_allclose(np.asarray(got.merged), want.pooler_output.numpy(), **TOL)
  np.testing.assert_allclose(np.asarray(got.hidden), want.last_hidden_state.numpy(), **TOL)


def test_rope_index_on_a_left_padded_batch(default):
  """Images of different sizes, a prompt with two images, left padding: ids and rope_deltas."""
  hf, model, batch, _ = default
  mask = batch["attention_mask"]
  assert (mask[:, 0] == 0).any() and len(batch["image_grid_thw"]) == 3
  want, want_deltas = hf.model.get_rope_index(
      torch.from_numpy(batch["input_ids"]), mm_token_type_ids=torch.from_numpy(batch["mm_token_type_ids"]),
      image_grid_thw=_grid(batch), attention_mask=torch.from_numpy(mask))
  got, deltas = jax.jit(lambda i, a, g: qwen2_5_vl.rope_index(model.config, i, a, g))(
      jnp.asarray(batch["input_ids"]), jnp.asarray(mask), jnp.asarray(batch["image_grid_thw"]))
  np.testing.assert_array_equal(np.asarray(got), want.numpy())
  np.testing.assert_array_equal(np.asarray(deltas), want_deltas.numpy()[:, 0])
  # The hook: from the image tokens alone (no mm_token_type_ids) and the layout's grids, the same ids.
  layout = model.layout(batch["image_grid_thw"], len(batch["image_grid_thw"]))
  np.testing.assert_array_equal(np.asarray(model.positions(jnp.asarray(batch["input_ids"]), jnp.asarray(mask),
                                                           layout)), want.numpy())


def test_rope_index_with_videos(default):
  """Token types as the processor writes them for a video (3 frames at 1.5 s per grid) next to an image, no mask."""
  hf, model, _, _ = default
  image, video = [1, 4, 6], [3, 4, 4]           # image 2 x 3 merged; video 3 frames of 2 x 2 merged
  types = [0] * 3 + [1] * 6 + [0] * 2 + [2] * 12 + [0] * 4
  ids = np.where(np.array(types) == 1, model.config.image_token_id,
                 np.where(np.array(types) == 2, model.config.video_token_id, 5))[None]
  kw = dict(image_grid_thw=np.array([image]), video_grid_thw=np.array([video]), second_per_grid_ts=np.array([1.5]))
  want, want_deltas = hf.model.get_rope_index(torch.from_numpy(ids), mm_token_type_ids=torch.tensor([types]),
                                              **{k: torch.from_numpy(v) for k, v in kw.items()})
  got, deltas = qwen2_5_vl.rope_index(model.config, jnp.asarray(ids), None,
                                      mm_token_type_ids=jnp.asarray([types]), **{k: jnp.asarray(v)
                                                                                  for k, v in kw.items()})
  np.testing.assert_array_equal(np.asarray(got), want.numpy())
  np.testing.assert_array_equal(np.asarray(deltas), want_deltas.numpy()[:, 0])


def test_logits_match_transformers(setup):
  """model(**processor outputs, all_logits=True) at every real position of both rows, and the merged tokens."""
  _, hf, model, batch, _ = setup
  with torch.no_grad():
    want = hf(**_torch(batch)).logits.numpy()
  got = jax.jit(lambda m, b: m(**b, all_logits=True))(model, {k: jnp.asarray(v) for k, v in batch.items()})
  real = batch["attention_mask"] > 0
  np.testing.assert_allclose(np.asarray(got.logits)[real], want[real], **TOL)
  last = jax.jit(lambda m, b: m(**b).logits)(model, {k: jnp.asarray(v) for k, v in batch.items()})
  np.testing.assert_allclose(np.asarray(last)[:, 0], want[:, -1], **TOL)


def test_greedy_generation_matches_transformers(setup):
  """Greedy tokens equal `generate`'s, and the log-probabilities of every decoded token (through the KV cache, the
  positions continuing at the prompt's largest id + 1) equal its step logits'; the tokens alone would not see a
  wrong decode position on random weights."""
  _, hf, model, batch, _ = setup
  steps = 6
  with torch.no_grad():
    res = hf.generate(**_torch(batch), max_new_tokens=steps, do_sample=False, output_logits=True,
                      return_dict_in_generate=True)
  want = res.sequences[:, batch["input_ids"].shape[1]:]
  eos = hf.generation_config.eos_token_id
  got = generate.greedy(model, batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                        image_grid_thw=batch["image_grid_thw"], max_new_tokens=steps, eos_token_ids=eos,
                        pad_token_id=hf.generation_config.pad_token_id)
  np.testing.assert_array_equal(np.asarray(got.tokens)[:, :want.shape[1]], want.numpy())
  logp = torch.stack([torch.log_softmax(step.float(), -1) for step in res.logits], 1)
  want_logp = torch.gather(logp, 2, want[..., None])[..., 0].numpy()
  inputs = {k: jnp.asarray(v) for k, v in batch.items()}
  start = generate.prefill(model, inputs, capacity=batch["input_ids"].shape[1] + steps, cache_dtype=jnp.float32)
  got_logp = generate.score_tokens(model, start, jnp.asarray(want.numpy()))
  np.testing.assert_allclose(np.asarray(got_logp), want_logp, **TOL)


def test_registry_and_sharding_cover_the_family(default):
  _, model, _, _ = default
  backbone = backbones.get("qwen2_5_vl")
  assert backbones.of_model(model) is backbone
  from models import sharding  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  specs = sharding.logical_specs(nnx.state(model))     # raises naming a parameter without a layout
  assert specs[("visual", "patch_embed")] == ("conv",) * 4 + ("embed",)
  assert specs[("visual", "blocks", "attn", "qkv", "kernel")] == ("layers", "embed", "heads")
  assert specs[("visual", "blocks", "norm1", "scale")] == ("layers", "norm")
  assert specs[("visual", "merger", "fc1", "kernel")] == ("embed", "mlp")
  assert specs[("language_model", "layers", "self_attn", "q_proj", "bias")] == ("layers", "heads")
  assert ("language_model", "layers", "self_attn", "o_proj", "bias") not in specs


_BASE = dict(model_type="qwen2_5_vl", vision_config=dict(hidden_size=32, num_heads=2, out_hidden_size=64, depth=2,
                                                        fullatt_block_indexes=[1]),
             text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                              rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}),
             image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293)


def _with(section, **fields):
  hf = json.loads(json.dumps(_BASE))
  (hf if section is None else hf[section]).update(fields)
  return hf


@pytest.mark.parametrize("hf, field", [
    (_with("text_config", use_sliding_window=True), "use_sliding_window"),
    (_with("text_config", rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope type"),
    (_with("text_config", rope_parameters={"rope_type": "default", "mrope_section": [4, 4, 4]}), "mrope_section"),
    (_with("text_config", layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    (_with("text_config", head_dim=32), "head_dim"),
    (_with("text_config", rms_norm_eps="1e-6"), "rms_norm_eps"),
    (_with("text_config", hidden_act="swish"), "hidden_act"),
    (_with(None, tie_word_embeddings=1), "tie_word_embeddings"),
    (_with("vision_config", rope_parameters={"rope_type": "default"}), "rope_parameters"),
    (_with("vision_config", fullatt_block_indexes=[2]), "fullatt_block_indexes"),
    (_with("vision_config", window_size=14), "window_size"),
    (_with("vision_config", patch_size=[14, 14]), "patch_size"),
    (_with("vision_config", in_chans=4), "in_chans"),
    (_with("vision_config", out_hidden_size=48), "out_hidden_size"),
    (_with(None, image_token_id=400), "image_token_id"),
    (_with(None, model_type="qwen2_vl"), "model_type"),
])
def test_unsupported_config_fields_raise(hf, field):
  with pytest.raises(ValueError, match=field):
    qwen2_5_vl.Qwen2_5_VLConfig.from_hf(hf)


def test_tie_word_embeddings_in_text_config_ties_the_head():
  """Pre-v5 saves put tie_word_embeddings in text_config (the 3B's flat file: at the top level); either ties."""
  nested = qwen2_5_vl.Qwen2_5_VLConfig.from_hf(_with("text_config", tie_word_embeddings=True))
  flat = dict(_BASE, **_BASE["text_config"], tie_word_embeddings=True)
  del flat["text_config"]
  assert nested.tie_word_embeddings and qwen2_5_vl.Qwen2_5_VLConfig.from_hf(flat).tie_word_embeddings
  assert not qwen2_5_vl.Qwen2_5_VLConfig.from_hf(_BASE).tie_word_embeddings
  # The class defaults that differ from the hub files: rms_norm_eps 1e-5 when the file says nothing.
  assert qwen2_5_vl.Qwen2_5_VLConfig.from_hf(_BASE).text.rms_norm_eps == transformers.Qwen2_5_VLTextConfig().rms_norm_eps


def _last_full_block_reference(hf, batch, last: int):
  """transformers' own modules: block `last`'s input captured by a hook, its attention recomputed per frame
  (cu_seqlens) -> (received float[M], keys float[M, Dh]): mean over heads and the frame's queries (keys: over heads),
  averaged over each merged token's 4 patches, in raster order."""
  visual = hf.model.visual
  block = visual.blocks[last]
  captured = {}
  hook = block.register_forward_pre_hook(lambda _, args, kwargs: captured.update(x=args[0], kw=kwargs),
                                         with_kwargs=True)
  with torch.no_grad():
    visual(torch.from_numpy(batch["pixel_values"]), grid_thw=_grid(batch))
    hook.remove()
    x, kw = captured["x"], captured["kw"]
    n, heads = x.shape[0], block.attn.num_heads
    q, k, _ = block.attn.qkv(block.norm1(x)).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.apply_rotary_pos_emb_vision(
        q, k, *kw["position_embeddings"])
    received = torch.zeros(n)
    bounds = kw["cu_seqlens"].tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
      probs = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * block.attn.scaling, -1)
      received[a:b] = probs.mean((0, 1))
    index, _ = vision_utils.get_vision_window_index(_grid(batch), 2, visual.window_size, 14)
    pooled_rel, pooled_keys = received.view(-1, 4).mean(1), k.mean(1).reshape(n // 4, 4, -1).mean(1)
    rel, keys = torch.empty_like(pooled_rel), torch.empty_like(pooled_keys)
    rel[index], keys[index] = pooled_rel, pooled_keys
  return rel.numpy(), keys.numpy()


def test_visual_tokens_seam(setup):
  """`visual_tokens` per image (one group, raster order): embeddings equal transformers' merged tokens, received
  relevance and keys equal the reference on transformers' last full block, `project(features)` equals the
  embeddings, `embed` equals the forward's merged input, `positions` equals get_rope_index."""
  case, hf, model, batch, _ = setup
  grid = batch["image_grid_thw"]
  num_images, np_ = len(grid), batch["pixel_values"].shape[0]
  layout = model.layout(grid, num_images, np_)
  tokens = jax.jit(lambda m, p, l: m.visual_tokens(p, l, relevance=("received",), extras=("keys",)))(
      model, jnp.asarray(batch["pixel_values"]), layout)
  counts = np.prod(grid, 1) // 4
  assert tokens.embeds.shape[:2] == (num_images, counts.max())
  np.testing.assert_array_equal(np.asarray(tokens.valid).sum(1), counts)
  with torch.no_grad():
    merged = hf.model.visual(torch.from_numpy(batch["pixel_values"]), grid_thw=_grid(batch)).pooler_output.numpy()
  want_rel, want_keys = _last_full_block_reference(hf, batch, case.fullatt[-1])
  offsets = np.concatenate([[0], np.cumsum(counts)])
  rel, keys = np.asarray(tokens.relevance["received"]), np.asarray(tokens.keys)
  for i in range(num_images):
    rows = slice(offsets[i], offsets[i + 1])
    np.testing.assert_allclose(np.asarray(tokens.embeds)[i, :counts[i]], merged[rows], **TOL)
    np.testing.assert_allclose(rel[i, :counts[i]], want_rel[rows], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(keys[i, :counts[i]], want_keys[rows], **TOL)
    assert (rel[i, counts[i]:] == 0).all() and (rel[i, :counts[i]] > 0).all()
  np.testing.assert_allclose(np.asarray(model.project(tokens.features))[np.asarray(tokens.valid)],
                             np.asarray(tokens.embeds)[np.asarray(tokens.valid)], **TOL)
  ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
  inputs = {k: jnp.asarray(v) for k, v in batch.items()}
  want = jax.jit(lambda m, b: m(**b).inputs_embeds)(model, inputs)
  np.testing.assert_allclose(np.asarray(model.embed(ids, tokens.embeds, tokens.valid)), np.asarray(want), **TOL)
  positions, _ = hf.model.get_rope_index(torch.from_numpy(batch["input_ids"]), image_grid_thw=_grid(batch),
                                         mm_token_type_ids=torch.from_numpy(batch["mm_token_type_ids"]),
                                         attention_mask=torch.from_numpy(batch["attention_mask"]))
  np.testing.assert_array_equal(np.asarray(model.positions(ids, mask, layout)), positions.numpy())
  with pytest.raises(ValueError, match="cls"):
    model.visual_tokens(jnp.asarray(batch["pixel_values"]), layout, relevance=("cls",))


@pytest.mark.slow
def test_mesh_computes_what_one_device_computes(tmp_path_factory):
  """The tiny Qwen sharded on data:2,fsdp:2,tensor:2 (each device reading its shards): the forward's logits and the
  greedy tokens of a 4-row batch equal one device's."""
  from models import sharding  # pylint: disable=g-import-not-at-top
  _, directory = qf.tiny_qwen(tmp_path_factory.mktemp("qwen_mesh"), window_size=56, fullatt=(1,))
  rng = np.random.default_rng(2)
  sizes = ((84, 140), (56, 56), (112, 84), (56, 112))
  images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
  texts = [qf.chat_prompt(q) for q in ("How many?", "Describe both images.", "What colour is it?", "yes or no?")]
  batch = {k: np.asarray(v) for k, v in qf.processor(directory)(images=images, text=texts, return_tensors="np",
                                                               padding=True).items()}

  def run(model):
    logits = jax.jit(lambda m, b: m(**b, all_logits=True).logits)(model, {k: jnp.asarray(v) for k, v in batch.items()})
    tokens = generate.greedy(model, batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                             image_grid_thw=batch["image_grid_thw"], max_new_tokens=3).tokens
    return np.asarray(logits), np.asarray(tokens)

  want_logits, want_tokens = run(loading.load_pretrained(directory))
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2", jax.devices()[:8])
  with jax.set_mesh(mesh):
    model = loading.load_pretrained(directory, mesh=mesh)
    qkv = model.visual.blocks.attn.qkv.kernel[...]
    assert qkv.addressable_shards[0].data.shape[1:] == (qkv.shape[1] // 2, qkv.shape[2] // 2)   # embed x heads split
    got_logits, got_tokens = run(model)
  real = batch["attention_mask"] > 0
  np.testing.assert_allclose(got_logits[real], want_logits[real], **TOL)
  np.testing.assert_array_equal(got_tokens, want_tokens)


def test_stage1_keeps_the_original_mrope_ids(default):
  """TOPS' Stage I on Qwen (received relevance): the pruned logits equal transformers' decoder fed the kept tokens
  (its own merged embeddings) with their own get_rope_index ids, never renumbered; decoding continues after the
  prompt's largest id."""
  from models import pruning  # pylint: disable=g-import-not-at-top
  hf, model, batch, _ = default
  cfg = pruning.tops_schedule(4, 4, stage2_alpha=0.5, stage2_lam=0.5)
  cfg = dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, budget=3, relevance="received"), stage2=None)
  inputs = {k: jnp.asarray(v) for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
  out = pruning.forward(model, cfg, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), **inputs)
  kept = np.asarray(out.stage1.kept)                                    # [I, 3] merged-token slots of each image
  assert kept.shape == (3, 3) and (kept >= 0).all()
  ids, mask = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])
  image_id = model.config.image_token_id
  with torch.no_grad():
    embeds = hf.model.get_input_embeddings()(ids)
    merged = torch.cat(hf.model.get_image_features(torch.from_numpy(batch["pixel_values"]), _grid(batch)).pooler_output)
    embeds[ids == image_id] = merged
    positions, _ = hf.model.get_rope_index(ids, mm_token_type_ids=torch.from_numpy(batch["mm_token_type_ids"]),
                                           image_grid_thw=_grid(batch), attention_mask=mask)
  counts = np.prod(batch["image_grid_thw"], 1) // 4
  rows, image = [], 0
  for r in range(ids.shape[0]):
    keep, seen = [], 0
    for p in np.flatnonzero(batch["attention_mask"][r]):
      if batch["input_ids"][r, p] != image_id:
        keep.append(p)
        continue
      if seen == counts[image]:
        image, seen = image + 1, 0
      if seen in set(kept[image]):
        keep.append(p)
      seen += 1
    image += 1
    rows.append(keep)
  length = max(map(len, rows))
  pick = torch.zeros(len(rows), length, dtype=torch.long)
  new_mask = torch.zeros(len(rows), length, dtype=torch.long)
  for r, keep in enumerate(rows):
    pick[r, length - len(keep):], new_mask[r, length - len(keep):] = torch.tensor(keep), 1
  with torch.no_grad():
    hidden = hf.model.language_model(inputs_embeds=embeds[torch.arange(len(rows))[:, None], pick],
                                     position_ids=positions[:, torch.arange(len(rows))[:, None], pick],
                                     attention_mask=new_mask).last_hidden_state
    want = hf.lm_head(hidden[:, -1]).numpy()
  np.testing.assert_allclose(np.asarray(out.logits)[:, 0], want, **TOL)
  np.testing.assert_array_equal(np.asarray(out.last_positions)[:, 0], positions.amax((0, 2)).numpy())


@pytest.mark.parametrize("tile", [16, 40])
def test_frame_attention_over_tiles(tile):
  """The full blocks' tiled frame attention and its received-attention pass against a NumPy softmax per frame
  (frames across and inside tiles)."""
  rng = np.random.default_rng(3)
  lengths = [5, 37, 1, 20, 64, 3, 16]
  frames = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
  n, h, dh = frames.size, 2, 8
  q, k, v = (rng.normal(size=(n, h, dh)).astype(np.float32) for _ in range(3))
  args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(frames))
  got, lse = vision_lib._frame_attention(*args, tile)                      # pylint: disable=protected-access
  received = vision_lib._frame_received(args[0], args[1], args[3], lse, tile)  # pylint: disable=protected-access
  want, want_received = np.zeros_like(q), np.zeros(n)
  for f in range(len(lengths)):
    rows = frames == f
    logits = np.einsum("qhd,khd->hqk", q[rows], k[rows]) / np.sqrt(dh)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want[rows] = np.einsum("hqk,khd->qhd", probs, v[rows])
    want_received[rows] = probs.mean((0, 1))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(received), want_received, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_tower_with_small_frame_tiles(default, monkeypatch):
  """The whole tower with 32-row frame tiles (the batch's 3 images span several tiles each) equals transformers'."""
  hf, model, batch, _ = default
  monkeypatch.setattr(vision_lib, "FRAME_TILE", 32)
  with torch.no_grad():
    want = hf.model.visual(torch.from_numpy(batch["pixel_values"]), grid_thw=_grid(batch)).pooler_output.numpy()
  got = jax.jit(lambda m, p, g: m.encode_images(p, g, received=True))(model, jnp.asarray(batch["pixel_values"]),
                                                                       jnp.asarray(batch["image_grid_thw"]))
  np.testing.assert_allclose(np.asarray(got.merged), want, **TOL)
  want_rel, _ = _last_full_block_reference(hf, batch, model.config.vision.fullatt_block_indexes[-1])
  np.testing.assert_allclose(np.asarray(got.received), want_rel, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_logits_with_a_video(default):
  """A left-padded batch with a 3-frame video (1.5 s per grid) in one row and an image in the other: transformers'
  forward with pixel_values_videos (the video processor needs torchvision: its outputs are built here with the
  processor's shapes: t x h x w rows of C x Tp x P x P values)."""
  hf, model, _, _ = default
  c = model.config
  rng = np.random.default_rng(4)
  image, video = np.array([[1, 4, 6]]), np.array([[3, 4, 4]])             # 6 image tokens; 3 frames x 4 tokens
  text = lambda n: list(rng.integers(10, 200, n))
  rows = [text(5) + [c.vision_start_token_id] + [c.video_token_id] * 12 + [c.vision_end_token_id] + text(7),
          text(3) + [c.vision_start_token_id] + [c.image_token_id] * 6 + [c.vision_end_token_id] + text(4)]
  s = max(map(len, rows))
  ids = np.zeros((2, s), np.int64)
  mask = np.zeros((2, s), np.int64)
  for r, row in enumerate(rows):
    ids[r, s - len(row):], mask[r, s - len(row):] = row, 1
  types = np.where(ids == c.image_token_id, 1, np.where(ids == c.video_token_id, 2, 0))
  batch = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
               pixel_values=rng.normal(size=(24, 1176)).astype(np.float32), image_grid_thw=image,
               pixel_values_videos=rng.normal(size=(48, 1176)).astype(np.float32), video_grid_thw=video,
               second_per_grid_ts=np.array([1.5], np.float32))
  with torch.no_grad():
    want = hf(**_torch(batch)).logits.numpy()
  got = jax.jit(lambda m, b: m(**b, all_logits=True).logits)(model, {k: jnp.asarray(v) for k, v in batch.items()})
  real = mask > 0
  np.testing.assert_allclose(np.asarray(got)[real], want[real], **TOL)
