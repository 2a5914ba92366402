"""The testbed model: a small LLaVA-NeXT trained on the synthetic VQA benchmark (`experiments.vqa`), its data pipeline,
loss and evaluation.

Axes: B batch (one image per example), S sequence (padded), P crops per image (base + grid, padded), T patches per
crop (CLS dropped), Dv vision width, D text width, V vocabulary, N packed image tokens per image (padded),
K kept image tokens per image (padded), Q scored positions per row.

    hf = testbed.hf_config()                         # transformers-compatible LlavaNextConfig dict
    model = testbed.make_model(hf, seed=0)           # or models.load_pretrained("experiments/testbed_ckpt")
    proc = testbed.make_processor(hf)
    batch = testbed.encode(examples, proc, hf)       # numpy arrays, fixed shapes
    acc = testbed.evaluate(model, examples, batch_size=32)    # {"attribute": ..., "all": ...}

Architecture (`hf_config`): CLIP-style tower with a CLS token (48-px crops, 8-px patches -> 36 patches + CLS, width
96, 3 layers, 4 heads), 2-layer GELU projector, LLaMA decoder (width 128, 4 layers, 4 query / 2 key-value heads,
SwiGLU 384, vocabulary = the benchmark tokenizer, 65 words), anyres with the benchmark's pinpoints (base crop + up to
6 grid crops, `image_newline`): 192 to 270 visual tokens per image. Choices made here (no paper defines a testbed):
- `vision_feature_layer=-1` (not LLaVA's -2): in a 3-layer tower the last layer would otherwise be dead weight. The
  CLS attention Stage I reads (`cls_attention`) is then that of the last layer, whose CLS output feeds the pooled
  auxiliary head below, so the CLS query is trained to look at objects (as CLIP's is).
- 4 decoder layers: TOPS' Stage II layers at relative depths 12/32 and 24/32 are then distinct layers,
  `stage_ii_layers(4) = (2, 3)`. On this CPU the decoder's cost is its attention (B x H x S^2 softmax with S ~ 300),
  nearly independent of the width, so depth is what training time buys: 4 layers train twice as many steps per hour
  as 8, which mattered more than depth in the pilots (8 layers stayed at chance for the first 300 steps).
- Strategy "default" with `num_additional_image_tokens=1`: the processor counts CLS, the model drops it.

Training loss (`loss_fn`): cross entropy on the answer token and the "</s>" after it, plus auxiliary losses that make
the vision tower learn fast from dense labels derived from the `Scene` (fair game in a testbed; the heads are not
part of the checkpoint): per patch, the colour and shape of the object whose box contains the patch centre (or
background), whether the patch holds an object's centre, and at its centre patch in the grid crops (full scale) the
colour of the object's dot (or none); per crop, from the CLIP pooled output (post_layernorm of CLS), which colours
and shapes appear in the crop. In the decoder (`loss_fn`), a few heads are told where to look: question words at the
objects they name, the answer position at the evidence (for spatial questions one head per object, on the base
crop, whose tokens carry absolute position; with `encode(dot_head=True)`, for detail questions one head at the
grid-crop token holding the dot), and one or two counting heads at "<s>" plus one centre token per evidence object.
Patch geometry follows `LlavaNextImageProcessorPil`: the base crop is the whole image resized to the crop size; the
grid crops tile the image resized to fit the best pinpoint (transformers' `get_patch_output_size`) and centred with
zero padding.

Stage I random pruning (`evaluate(..., keep_fraction=...)`): before the merge, keep round(fraction * n) of each image's
n visual tokens (image_newline rows are not visual tokens and are dropped with the rest), chosen uniformly at random
per example from a seeded generator, in their original order; the "<image>" run of the prompt is shortened to match
and positions are re-indexed contiguously.
"""

import functools
import math
import os
import tempfile
from typing import Mapping, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import scenes
from experiments import vocab
from experiments import vqa
from models import anyres
from models import llama
from models import llava_next

__all__ = [
    "IMAGE_TOKEN_ID", "NUM_LABELS", "hf_config", "stage_ii_layers", "make_model", "make_processor", "seq_len",
    "patch_labels", "encode", "AuxHeads", "ForwardOutput", "forward", "aux_losses", "grounding_loss", "grounding_layers",
    "count_loss", "loss_fn", "predict", "evaluate", "transformers_answers",
    "DEFAULT_CKPT",
]

IMAGE_TOKEN_ID = vocab.words().index(vocab.IMAGE)
DEFAULT_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testbed_ckpt")
# Patch label columns: colour (0 = background, 1 + COLORS index), shape (0 = background, 1 + SHAPES index),
# centre (0/1), dot colour at grid-crop centre patches (0 = no dot, 1 + COLORS index; -1 = elsewhere), owner (index
# of the object in scene.objects, -1 = background).
NUM_LABELS = 5
_NUM_COLORS, _NUM_SHAPES = len(scenes.COLORS), len(scenes.SHAPES)
_GROUNDED_WORDS = 4   # the longest question ("is the red star left of the blue circle?") has 4 colour/shape words


def _word_matchers() -> dict:
  """token id -> predicate on a SceneObject, for the colour and shape words of the questions."""
  words = vocab.words()
  match = {words.index(c): (lambda o, c=c: o.color == c) for c in scenes.COLORS}
  for shape in scenes.SHAPES:
    for w in (shape, vqa.PLURALS[shape]):
      match[words.index(w)] = lambda o, shape=shape: o.shape == shape
  match[words.index("objects")] = lambda o: True
  return match


_WORD_MATCH = _word_matchers()
_WORD_IDS = {w: i for i, w in enumerate(vocab.words())}
_MAX_TEXT_TOKENS = 26  # longest benchmark prompt with its answer is 23 tokens (one of them the "<image>" placeholder)


def hf_config(*, vision: Mapping | None = None, text: Mapping | None = None, **top) -> dict:
  """The testbed's `LlavaNextConfig` as a config.json dict; `vision`/`text`/top-level entries override fields."""
  words = vocab.words()
  vision_config = dict(model_type="clip_vision_model", hidden_size=96, intermediate_size=384, num_hidden_layers=3,
                       num_attention_heads=4, image_size=vocab.CROP_SIZE, patch_size=vocab.PATCH_SIZE,
                       num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
                       projection_dim=96)
  text_config = dict(model_type="llama", vocab_size=len(words), hidden_size=128, intermediate_size=384,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=512,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_bias=False,
                     mlp_bias=False, tie_word_embeddings=False, pad_token_id=words.index(vocab.PAD),
                     bos_token_id=words.index(vocab.BOS), eos_token_id=words.index(vocab.EOS))
  vision_config.update(vision or {})
  text_config.update(text or {})
  if text_config["hidden_size"] % text_config["num_attention_heads"]:
    raise ValueError(f"text hidden_size {text_config['hidden_size']} is not a multiple of the heads")
  text_config["head_dim"] = text_config["hidden_size"] // text_config["num_attention_heads"]
  config = dict(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
                vision_config=vision_config, text_config=text_config, image_token_index=IMAGE_TOKEN_ID,
                image_grid_pinpoints=[list(p) for p in vocab.GRID_PINPOINTS], vision_feature_layer=-1,
                vision_feature_select_strategy="default", projector_hidden_act="gelu", multimodal_projector_bias=True,
                tie_word_embeddings=False, use_image_newline_parameter=True, image_seq_length=36)
  config.update(top)
  return config


def stage_ii_layers(num_layers: int) -> tuple[int, int]:
  """TOPS' Stage II pruning layers (12 and 24 of 32 in LLaVA-7B) scaled to a decoder of `num_layers` layers."""
  return round(num_layers * 12 / 32), round(num_layers * 24 / 32)


def make_model(hf: Mapping, seed: int = 0, dtype=jnp.float32) -> llava_next.LlavaNextForConditionalGeneration:
  """A randomly initialised testbed model for the config dict `hf`.

  The ports' default initialisers (Flax's: lecun-normal kernels, embeddings with std 1/sqrt(D)) are changed where it
  matters for training from scratch: token embeddings and `image_newline` get std 1 (the norm of a block output), so
  a question word is not drowned by the first residual update, and the residual-branch output projections (o_proj,
  down_proj) are scaled by 1/sqrt(2L) (GPT-2), so the stream starts close to the embeddings.
  """
  config = llava_next.LlavaNextConfig.from_hf(dict(hf))
  model = llava_next.LlavaNextForConditionalGeneration(config, dtype=dtype, rngs=nnx.Rngs(seed))
  key = jax.random.key(seed)
  lm = model.language_model
  lm.embed_tokens.embedding[...] = jax.random.normal(jax.random.fold_in(key, 1), lm.embed_tokens.embedding.shape, dtype)
  model.image_newline[...] = jax.random.normal(jax.random.fold_in(key, 2), model.image_newline.shape, dtype)
  positions = model.vision_tower.embeddings.position_embedding.embedding
  positions[...] = jnp.asarray(_sincos_2d(config.vision.image_size // config.vision.patch_size, positions.shape[-1]),
                               dtype)
  scale = (2 * config.text.num_hidden_layers) ** -0.5
  lm.layers.self_attn.o_proj.kernel[...] = lm.layers.self_attn.o_proj.kernel[...] * scale
  lm.layers.mlp.down_proj.kernel[...] = lm.layers.mlp.down_proj.kernel[...] * scale
  return model


def _sincos_2d(grid: int, width: int) -> np.ndarray:
  """float32[1 + grid * grid, width] 2-D sine-cosine position table (MAE), zeros for the CLS row, scaled to unit
  variance per entry: nearby patches get similar vectors, so attention starts with a locality bias."""
  quarter = width // 4
  freqs = 1.0 / 10000 ** (np.arange(quarter) / quarter)
  y, x = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  parts = [f(a.reshape(-1, 1) * freqs) for a in (y, x) for f in (np.sin, np.cos)]
  table = np.zeros((1 + grid * grid, width), np.float32)
  table[1:, :4 * quarter] = np.concatenate(parts, axis=1) * np.sqrt(2.0)
  return table


def make_processor(hf: Mapping | None = None, directory: str | None = None):
  """The `LlavaNextProcessor` matching `hf` (tokenizer from `directory`, else built from `experiments.vocab`)."""
  hf = hf_config() if hf is None else hf
  vision = hf["vision_config"]
  if directory is None:
    with tempfile.TemporaryDirectory() as tmp:
      tokenizer = vocab.load_tokenizer(vocab.save_tokenizer(tmp))
  else:
    tokenizer = vocab.load_tokenizer(directory)
  image_processor = vocab.make_image_processor(vision["image_size"], tuple(map(tuple, hf["image_grid_pinpoints"])))
  return vocab.make_processor(tokenizer, image_processor, patch_size=vision["patch_size"],
                              vision_feature_select_strategy=hf["vision_feature_select_strategy"],
                              num_additional_image_tokens=1)


def _geometry(hf: Mapping) -> tuple[tuple[tuple[int, int], ...], int, int]:
  vision = hf["vision_config"]
  return tuple(map(tuple, hf["image_grid_pinpoints"])), vision["image_size"], vision["patch_size"]


def seq_len(hf: Mapping) -> int:
  """The padded sequence length S: the most visual tokens an image can get plus the longest prompt."""
  pinpoints, crop, patch = _geometry(hf)
  return anyres.max_num_features(pinpoints, crop, patch) + _MAX_TEXT_TOKENS


# --- patch labels --------------------------------------------------------------------------------------------------

def _crop_grid(height: int, width: int, pinpoints, crop: int):
  """(rows, cols, resized height, resized width, pad top, pad left) of the processor's grid crops for an image."""
  pin_h, pin_w = anyres.select_best_resolution((height, width), pinpoints)
  scale_w, scale_h = pin_w / width, pin_h / height
  if scale_w < scale_h:   # transformers' get_patch_output_size
    new_h, new_w = min(math.ceil(height * scale_w), pin_h), pin_w
  else:
    new_h, new_w = pin_h, min(math.ceil(width * scale_h), pin_w)
  return pin_h // crop, pin_w // crop, new_h, new_w, (pin_h - new_h) // 2, (pin_w - new_w) // 2


def patch_labels(scene: scenes.Scene, hf: Mapping, num_crops: int | None = None,
                 image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Auxiliary labels of every patch of every crop the processor makes of `scene`'s image.

  Returns (labels int8[P, T, NUM_LABELS], crop_valid bool[P]); P = `num_crops` (default: the most any image gets),
  crops past the image's own count are padding (labels 0, -1 for the dot and owner columns, crop_valid False).
  Columns: see `NUM_LABELS`. A patch belongs to the object drawn on most of 4 x 4 sample points spread over it (at
  least 3 of the 16; else background): a pixel is drawn by object i when it lies in i's box and is not grey
  (backgrounds and clutter are grey by construction, see `experiments.scenes`). `image` is `scenes.render(scene)`
  (rendered when not given).
  """
  pinpoints, crop, patch = _geometry(hf)
  g = crop // patch
  height, width = scene.height, scene.width
  rows, cols, new_h, new_w, pad_y, pad_x = _crop_grid(height, width, pinpoints, crop)
  count = 1 + rows * cols
  num_crops = anyres.max_num_crops(pinpoints, crop) if num_crops is None else num_crops
  if count > num_crops:
    raise ValueError(f"a {height}x{width} image has {count} crops, more than num_crops={num_crops}")
  image = scenes.render(scene) if image is None else image
  if image.shape != (height, width, 3):
    raise ValueError(f"image has shape {image.shape}, expected the scene's {(height, width, 3)}")
  drawn = np.ptp(image.astype(np.int16), axis=-1) > 40
  owner = np.full((height, width), -1, np.int32)
  for i, obj in enumerate(scene.objects):
    x0, y0, x1, y1 = obj.box
    box = (slice(max(y0, 0), y1 + 1), slice(max(x0, 0), x1 + 1))
    owner[box] = np.where(drawn[box], i, -1)
  colour = np.array([0] + [1 + scenes.COLORS.index(o.color) for o in scene.objects], np.int8)
  shape = np.array([0] + [1 + scenes.SHAPES.index(o.shape) for o in scene.objects], np.int8)
  dot = np.array([0 if o.dot is None else 1 + scenes.COLORS.index(o.dot) for o in scene.objects], np.int8)

  sub = 4
  points = ((np.arange(g)[:, None] * sub + np.arange(sub)[None] + 0.5) * patch / sub).ravel()   # [g * sub] pixels
  labels = np.zeros((num_crops, g * g, NUM_LABELS), np.int8)
  labels[..., 3:] = -1
  # Original-image coordinates of each crop's sample points: rows and columns of [g * sub] points per crop.
  grid = [(r, c) for r in range(rows) for c in range(cols)]
  ys = [points * height / crop] + [(r * crop + points - pad_y) * height / new_h for r, _ in grid]
  xs = [points * width / crop] + [(c * crop + points - pad_x) * width / new_w for _, c in grid]
  votes = np.arange(len(scene.objects))[:, None, None]
  for p, (y, x) in enumerate(zip(ys, xs)):
    yy, xx = np.meshgrid(np.floor(y).astype(int), np.floor(x).astype(int), indexing="ij")
    inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
    who = np.where(inside, owner[np.clip(yy, 0, height - 1), np.clip(xx, 0, width - 1)], -1)
    who = who.reshape(g, sub, g, sub).transpose(0, 2, 1, 3).reshape(1, g * g, sub * sub)
    hits = np.sum(who == votes, axis=-1)                                     # [objects, T]
    best = np.where(hits.max(axis=0) >= 3, np.argmax(hits, axis=0), -1)
    labels[p, :, 0], labels[p, :, 1], labels[p, :, 4] = colour[best + 1], shape[best + 1], best
  for i, obj in enumerate(scene.objects):
    cy, cx = obj.cy + 0.5, obj.cx + 0.5
    labels[0, (int(cy * crop / height) // patch) * g + int(cx * crop / width) // patch, 2] = 1
    p, t = grid_centre(scene, i, hf)
    labels[p, t, 2], labels[p, t, 3] = 1, dot[i]   # the 5-px dot is only legible at full scale: grid crops only
  return labels, np.arange(num_crops) < count


def grid_centre(scene: scenes.Scene, i: int, hf: Mapping) -> tuple[int, int]:
  """(crop, token) of the grid-crop patch holding object i's centre (and its dot, when it has one); crop >= 1."""
  pinpoints, crop, patch = _geometry(hf)
  g = crop // patch
  _, cols, new_h, new_w, pad_y, pad_x = _crop_grid(scene.height, scene.width, pinpoints, crop)
  obj = scene.objects[i]
  y, x = (obj.cy + 0.5) * new_h / scene.height + pad_y, (obj.cx + 0.5) * new_w / scene.width + pad_x
  return 1 + int(y // crop) * cols + int(x // crop), (int(y % crop) // patch) * g + int(x % crop) // patch


# --- batches -------------------------------------------------------------------------------------------------------

def _shorten_image_run(ids: np.ndarray, keep: int) -> np.ndarray:
  """ids with its single contiguous run of image tokens cut to `keep` tokens."""
  where = np.flatnonzero(ids == IMAGE_TOKEN_ID)
  if len(where) == 0 or where[-1] - where[0] + 1 != len(where):
    raise ValueError("expected one contiguous run of image tokens in the prompt")
  return np.concatenate([ids[:where[0]], ids[where[0]:where[0] + keep], ids[where[-1] + 1:]])


def encode(examples: Sequence[vqa.Example], processor, hf: Mapping, *, with_answer: bool = False,
           labels: bool = False, keep_fraction: float | None = None, seed: int = 0, base_only: bool = False,
           count_sink: float = 1.0, dot_head: bool = False) -> dict:
  """Processor outputs of `examples`, padded to the fixed shapes of `hf` (one image per example).

  Returns a dict of numpy arrays:
    input_ids int32[B, S], attention_mask bool[B, S] (right padding), pixel_values float32[B, P, 3, C, C],
    image_sizes int32[B, 2], layout (`anyres.PackLayout` of int32/bool[B, N], counts int32[B], grid int32[B, 2]),
    last int32[B] (index of the last prompt token);
    with_answer: targets int32[B, 2] (answer, "</s>"), target_positions int32[B, 2] (the positions predicting them)
      and question_mask bool[B, S] (positions predicting the prompt text after the image, see `loss_fn`);
    labels: patch_labels int8[B, P, T, NUM_LABELS], crop_valid bool[B, P]; with with_answer also grounding_queries
      int32[B, 5], grounding_evidence bool[B, 5, S], head_evidence bool[B, 2, S], count_target float32[B, S] (see the
      comment in the code and `loss_fn`), caption_targets int32[B, S, 2] (word ids of the colour and shape of the
      object an image token shows; -1: none) and relation_target float32[B, 4] (row and column of the first and the
      second named object's centre, scaled to (0, 1); zeros for non-spatial rows, marked by relation_valid bool[B])
      and order_target float32[B, 2] (the same two centres' coordinate along the asked axis, oriented so that the
      answer is "yes" iff the first is smaller: column for "left", 1 - column for "right", row for "above", 1 - row
      for "below") and direction_evidence bool[B, S] (the token of the asked relation word; spatial rows only) and
      count_value float32[B] (a counting question's answer n as n / 6; zeros for other rows, marked by count_valid
      bool[B]);
    count_sink: the weight of "<s>" in count_target relative to one object's centre token (see the comment in the
      code);
    dot_head: on detail rows, head 1's evidence in head_evidence is the one grid-crop token that holds the dot
      (`grid_centre`) instead of all the object's tokens;
    keep_fraction: keep_index int32[B, K], keep_valid bool[B, K] (random Stage I pruning, see the module docstring;
      the input_ids then hold the shortened image runs);
    base_only: only the base crop (the whole image at crop resolution, 36 tokens, no grid crops, no image_newline):
      pixel_values float32[B, 1, ...], a layout of the base rows and image runs of 36 tokens. A cheap training view
      (`experiments.train_testbed`'s short phase), not a model input transformers would build.
  """
  if not examples:
    raise ValueError("encode needs at least one example")
  if keep_fraction is not None and not 0 < keep_fraction <= 1:
    raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
  if base_only and keep_fraction is not None:
    raise ValueError("base_only and keep_fraction cannot be combined")
  if not count_sink > 0:
    raise ValueError(f"count_sink must be positive, got {count_sink}")
  pinpoints, crop, patch = _geometry(hf)
  s, p_max, n = seq_len(hf), anyres.max_num_crops(pinpoints, crop), anyres.max_num_features(pinpoints, crop, patch)
  if base_only:
    s = (crop // patch) ** 2 + _MAX_TEXT_TOKENS
  b = len(examples)
  out = dict(input_ids=np.zeros((b, s), np.int32), attention_mask=np.zeros((b, s), bool),
             pixel_values=np.zeros((b, p_max, 3, crop, crop), np.float32), image_sizes=np.zeros((b, 2), np.int32),
             last=np.zeros((b,), np.int32))
  if with_answer:
    out.update(targets=np.zeros((b, 2), np.int32), target_positions=np.zeros((b, 2), np.int32),
               question_mask=np.zeros((b, s), bool))
  if labels:
    out.update(patch_labels=np.zeros((b, p_max, (crop // patch) ** 2, NUM_LABELS), np.int8),
               crop_valid=np.zeros((b, p_max), bool))
  ids_list = []
  for i, ex in enumerate(examples):
    text = vocab.prompt(ex.question, ex.answer if with_answer else None)
    enc = processor(images=[ex.image], text=[text], return_tensors="np")
    px = enc["pixel_values"][0]
    out["pixel_values"][i, :px.shape[0]] = px
    out["image_sizes"][i] = enc["image_sizes"][0]
    ids_list.append(enc["input_ids"][0].astype(np.int32))
    if labels:
      out["patch_labels"][i], out["crop_valid"][i] = patch_labels(ex.scene, hf, p_max, ex.image)
  layout = anyres.pack_layout(out["image_sizes"], pinpoints, crop, patch, n)
  if base_only:
    t = (crop // patch) ** 2
    layout = anyres.PackLayout(source=np.tile(np.arange(t, dtype=np.int32), (b, 1)), crop=np.zeros((b, t), np.int32),
                               newline=np.zeros((b, t), bool), valid=np.ones((b, t), bool),
                               counts=np.full((b,), t, np.int32), grid=np.zeros((b, 2), np.int32))
    out["pixel_values"] = out["pixel_values"][:, :1]
    ids_list = [_shorten_image_run(ids, t) for ids in ids_list]
  if labels and with_answer:
    # Grounding targets (see `loss_fn`): query positions int32[B, Q_WORDS + 1] = the question's colour and shape words
    # (in order, at most Q_WORDS; plurals count, "objects" names every object) and the answer position; per query,
    # the image tokens of the objects it names: a word names the objects of that colour / shape, the answer
    # position names every object of vqa.Example.evidence. Unused queries have no image tokens.
    out["grounding_queries"] = np.zeros((b, _GROUNDED_WORDS + 1), np.int32)
    out["grounding_evidence"] = np.zeros((b, _GROUNDED_WORDS + 1, s), bool)
    # head_evidence: per grounded answer head (0, 1), the same evidence, except for spatial questions, where head 0
    # looks at the first named object and head 1 at the second, on their base-crop tokens only (the base crop is the
    # whole image, so its tokens carry the absolute position the relation is decided by; a grid token knows only its
    # place within its crop), and, with dot_head, for detail questions, where head 1 looks at the one grid-crop token
    # holding the dot (the object's other tokens dilute a colour that lives in a few pixels). count_target: the
    # answer position's counting head attends to "<s>" (position 0, the sink) with weight count_sink and to the
    # base-crop centre token of every evidence object with weight 1 each, so the mass left on the sink is w / (w + n)
    # for n objects; for a "no" existence answer all of it. Spatial rows have none. Neighbouring counts differ in that
    # mass by w / ((w + n) (w + n + 1)): with w = 1 that is 1/42 between five and six objects; the gap of the largest
    # count pair (5, 6) is widest at w = sqrt(30) ~ 5.5, about twice it.
    out["head_evidence"] = np.zeros((b, 2, s), bool)
    out["count_target"] = np.zeros((b, s), np.float32)
    out["caption_targets"] = np.full((b, s, 2), -1, np.int32)
    out["relation_target"] = np.zeros((b, 4), np.float32)
    out["relation_valid"] = np.zeros((b,), bool)
    out["order_target"] = np.zeros((b, 2), np.float32)
    out["direction_evidence"] = np.zeros((b, s), bool)
    out["count_value"] = np.zeros((b,), np.float32)
    out["count_valid"] = np.zeros((b,), bool)
    t = (crop // patch) ** 2
    g = crop // patch
    for i, ex in enumerate(examples):
      ids = ids_list[i]
      rows = layout.source[i, :layout.counts[i]]
      owner = np.where(rows >= 0, out["patch_labels"][i, rows // t, rows % t, 4], -1)
      first = int(np.flatnonzero(ids == IMAGE_TOKEN_ID)[0])
      image = slice(first, first + len(rows))
      base = (rows >= 0) & (rows < t)
      centre = {}   # object -> index into the image run of its base-crop centre token (same rule as patch_labels)
      for obj in ex.evidence:
        o = ex.scene.objects[obj]
        row = (int((o.cy + 0.5) * crop / ex.scene.height) // patch) * g + int((o.cx + 0.5) * crop / ex.scene.width) // patch
        centre[obj] = int(np.flatnonzero(rows == row)[0])
      if ex.family == "spatial":   # a small object may own no base token (under 3 of 16 samples), never its centre
        for k, obj in enumerate(ex.evidence[:2]):
          mine = (owner == obj) & base
          mine[centre[obj]] = True
          out["head_evidence"][i, k, image] = mine
          o = ex.scene.objects[obj]
          out["relation_target"][i, 2 * k:2 * k + 2] = (o.cy + 0.5) / ex.scene.height, (o.cx + 0.5) / ex.scene.width
          along = out["relation_target"][i, 2 * k + (ex.subtype in ("left", "right"))]
          out["order_target"][i, k] = 1.0 - along if ex.subtype in ("right", "below") else along
        out["relation_valid"][i] = True
        out["direction_evidence"][i, :len(ids)] = ids == _WORD_IDS[ex.subtype]
      else:
        out["head_evidence"][i, :, image] = np.isin(owner, ex.evidence)[None]
        if dot_head and ex.family == "detail" and not base_only:
          p, tok = grid_centre(ex.scene, ex.evidence[0], hf)
          out["head_evidence"][i, 1] = False
          out["head_evidence"][i, 1, first + int(np.flatnonzero(rows == p * t + tok)[0])] = True
        out["count_target"][i, 0] = count_sink
        for obj in ex.evidence:
          out["count_target"][i, first + centre[obj]] += 1.0
        out["count_target"][i] /= out["count_target"][i].sum()
        if ex.family == "counting":
          out["count_value"][i] = len(ex.evidence) / (len(vqa.NUMBER_WORDS) - 1)
          out["count_valid"][i] = True
      words = [(j, _WORD_MATCH[ids[j]]) for j in range(len(ids) - 2) if ids[j] in _WORD_MATCH][:_GROUNDED_WORDS]
      for k, (j, match) in enumerate(words):
        named = [n for n, o in enumerate(ex.scene.objects) if match(o)]
        out["grounding_queries"][i, k] = j
        out["grounding_evidence"][i, k, image] = np.isin(owner, named)
      out["grounding_queries"][i, -1] = len(ids) - 3
      out["grounding_evidence"][i, -1, image] = np.isin(owner, ex.evidence)
      words_of = np.array([[_WORD_IDS[o.color], _WORD_IDS[o.shape]] for o in ex.scene.objects] + [[-1, -1]])
      out["caption_targets"][i, image] = words_of[owner]                   # owner -1 picks the last row
  if keep_fraction is not None:
    visual = layout.valid & ~layout.newline
    keeps = [max(1, round(keep_fraction * int(v.sum()))) for v in visual]
    k_max = max(keeps)
    out["keep_index"], out["keep_valid"] = np.zeros((b, k_max), np.int32), np.zeros((b, k_max), bool)
    for i, (row, k) in enumerate(zip(visual, keeps)):
      rng = np.random.default_rng([seed, i])
      out["keep_index"][i, :k] = np.sort(rng.choice(np.flatnonzero(row), size=k, replace=False))
      out["keep_valid"][i, :k] = True
      ids_list[i] = _shorten_image_run(ids_list[i], k)
  for i, ids in enumerate(ids_list):
    if len(ids) > s:
      raise ValueError(f"example {examples[i].scene_id} has {len(ids)} tokens, more than the sequence length {s}")
    out["input_ids"][i, :len(ids)], out["attention_mask"][i, :len(ids)] = ids, True
    out["last"][i] = len(ids) - 1
    if with_answer:
      out["targets"][i] = ids[-2:]
      out["target_positions"][i] = (len(ids) - 3, len(ids) - 2)
      # positions predicting the prompt text after the image, up to and including the ":" before the answer
      out["question_mask"][i, np.flatnonzero(ids == IMAGE_TOKEN_ID)[-1]:len(ids) - 3] = True
  out["layout"] = layout
  return out


# --- model pieces for training and evaluation ----------------------------------------------------------------------

class AuxHeads(nnx.Module):
  """Auxiliary linear heads (training only, not saved): per-patch labels and per-crop presence on the vision tower;
  the (row, column) of each base-crop token read from the tower's output (`position`) and, with `text_width`, from
  the projector's output (`text_position`; see `position_loss`); with `text_width`, the two named objects' (row,
  column) read from the decoder's residual stream at the answer position (`relation`; see `loss_fn`), their
  coordinates along the asked axis (`order`), and a counting question's answer (`count`)."""

  def __init__(self, vision_width: int, text_width: int | None = None, *, rngs: nnx.Rngs):
    self.patch = nnx.Linear(vision_width, 2 * (1 + _NUM_COLORS) + 1 + (1 + _NUM_SHAPES), rngs=rngs)
    self.crop = nnx.Linear(vision_width, _NUM_COLORS + _NUM_SHAPES, rngs=rngs)
    # Created after the heads above, so adding them leaves those heads' initialisation as it was.
    self.position = nnx.Linear(vision_width, 2, rngs=rngs)
    self.text_position = nnx.Linear(text_width, 2, rngs=rngs) if text_width else None
    self.relation = nnx.Linear(text_width, 4, rngs=rngs) if text_width else None
    self.order = nnx.Linear(text_width, 2, rngs=rngs) if text_width else None
    self.count = nnx.Linear(text_width, 1, rngs=rngs) if text_width else None

  def __call__(self, features: jax.Array, pooled: jax.Array):
    """features float[B, P, T, Dv], pooled float[B, P, Dv] -> (patch logits float[B, P, T, 24], crop [B, P, 14])."""
    return self.patch(features), self.crop(pooled)


class ForwardOutput(NamedTuple):
  """logits float32[B, Q, V]; features float[B, P, T, Dv] (vision features, CLS dropped); pooled float[B, P, Dv]
  (CLIP pooled output per crop) | None; attention float32[len(attention_layers), B, H, Q', S] (attention rows of the
  asked layers, in increasing layer order) | None; residuals float[L + 1, B, Q'', D] (the residual stream at
  `residual_positions` entering each of the L decoder layers and leaving the last, before the final norm) | None."""
  logits: jax.Array
  features: jax.Array
  pooled: jax.Array | None = None
  attention: jax.Array | None = None
  residuals: jax.Array | None = None


def forward(model: llava_next.LlavaNextForConditionalGeneration, batch: Mapping, positions: jax.Array | None,
            *, pooled: bool = False, attention_layers: Sequence[int] = (),
            attention_queries: jax.Array | None = None, train_vision: bool = True,
            residual_positions: jax.Array | None = None) -> ForwardOutput:
  """The testbed forward through the model's public seams, scoring only `positions`.

  Args:
    model: the LLaVA-NeXT port.
    batch: `encode` output (arrays); with keep_index/keep_valid, only those packed rows are merged (Stage I).
    positions: int32[B, Q] sequence positions whose next-token logits are returned; None: all (Q = S).
    pooled: also return the crops' CLIP pooled outputs (post_layernorm of CLS).
    attention_layers, attention_queries: also return the attention rows of the query positions int32[B, Q'] in
      these decoder layers.
    train_vision: False stops gradients at the vision tower's output (a frozen tower costs no backward pass).
    residual_positions: int32[B, Q''] | None: also return the residual stream at these positions around every
      decoder layer.

  Returns:
    ForwardOutput.
  """
  px = batch["pixel_values"]
  chex.assert_rank(px, 5)
  b, p = px.shape[:2]
  vis = model.vision_tower.features(px.reshape(b * p, *px.shape[2:]),
                                    feature_layers=model.config.vision_feature_layer, select_strategy="full",
                                    cls_attention=False)
  full = vis.features.reshape(b, p, *vis.features.shape[1:])
  if not train_vision:
    full = jax.lax.stop_gradient(full)
  features = full[:, :, 1:]                                   # "default": CLS dropped
  layout = anyres.PackLayout(*(jnp.asarray(a) for a in batch["layout"]))
  packed = model.pack(model.project(features), layout)        # [B, N, D]
  valid = layout.valid
  if "keep_index" in batch:
    packed = jnp.take_along_axis(packed, batch["keep_index"][..., None], axis=1)
    valid = jnp.asarray(batch["keep_valid"])
  ids, mask = batch["input_ids"], batch["attention_mask"]
  x = model.embed(ids, packed, valid)
  # The decoder layers one by one (`run_layers` without a cache, unrolled): XLA's CPU backward of the scanned stack
  # is markedly slower than of the unrolled layers at this depth.
  lm = model.language_model
  position_ids = llama.default_positions(ids.shape, mask)
  cos, sin = llama.rope_cos_sin(lm.config, position_ids, x.dtype)
  attention_mask = llama.make_attention_mask(jnp.arange(ids.shape[1]), jnp.asarray(mask, bool),
                                             lm.config.sliding_window)
  at = lambda h, where: jnp.take_along_axis(h, where[..., None], axis=1)
  attention, stream = [], []
  for i in range(lm.config.num_hidden_layers):
    if i in attention_layers:
      attention.append(lm.attention_probs(i, x, position_ids, mask, attention_queries))
    if residual_positions is not None:
      stream.append(at(x, residual_positions))
    x = lm.layer(i)(x, cos, sin, attention_mask)
  if residual_positions is not None:
    stream.append(at(x, residual_positions))
  hidden = x if positions is None else at(x, positions)
  pool = model.vision_tower.post_layernorm(full[:, :, 0]) if pooled else None
  return ForwardOutput(model.head(hidden), features, pool, jnp.stack(attention) if attention else None,
                       jnp.stack(stream) if stream else None)


def _masked_mean(values, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def aux_losses(heads: AuxHeads, features: jax.Array, pooled: jax.Array, batch: Mapping):
  """Auxiliary vision losses (see the module docstring) -> (sum, metrics dict).

  features float[B, P, T, Dv] (CLS dropped), pooled float[B, P, Dv]; batch holds patch_labels and crop_valid.
  """
  patch_logits, crop_logits = heads(features, pooled)
  lab = batch["patch_labels"].astype(jnp.int32)
  crop_valid = batch["crop_valid"]
  patch_valid = jnp.broadcast_to(crop_valid[:, :, None], lab.shape[:3])
  c0, c1, c2 = 1 + _NUM_COLORS, 2 + _NUM_COLORS, 2 + _NUM_COLORS + 1 + _NUM_SHAPES
  ce = optax.softmax_cross_entropy_with_integer_labels
  colour = _masked_mean(ce(patch_logits[..., :c0], lab[..., 0]), patch_valid)
  centre = _masked_mean(optax.sigmoid_binary_cross_entropy(patch_logits[..., c0], lab[..., 2]), patch_valid)
  on_object = patch_valid & (lab[..., 0] > 0)
  shape = _masked_mean(ce(patch_logits[..., c1:c2], lab[..., 1]), on_object)    # object vs background: colour head
  dot = _masked_mean(ce(patch_logits[..., c2:], jnp.maximum(lab[..., 3], 0)), patch_valid & (lab[..., 3] >= 0))
  present = jnp.concatenate([jax.nn.one_hot(lab[..., 0] - 1, _NUM_COLORS).max(axis=2),
                             jax.nn.one_hot(lab[..., 1] - 1, _NUM_SHAPES).max(axis=2)], axis=-1)   # [B, P, 14]
  crop = _masked_mean(optax.sigmoid_binary_cross_entropy(crop_logits, present).mean(-1), crop_valid)
  metrics = dict(colour=colour, shape=shape, centre=centre, dot=dot, crop=crop,
                 shape_accuracy=_masked_mean(jnp.argmax(patch_logits[..., c1:c2], -1) == lab[..., 1], on_object),
                 centre_shape_accuracy=_masked_mean(jnp.argmax(patch_logits[..., c1:c2], -1) == lab[..., 1],
                                                    on_object & (lab[..., 3] >= 0)),
                 colour_accuracy=_masked_mean(jnp.argmax(patch_logits[..., :c0], -1) == lab[..., 0], on_object))
  return colour + shape + centre + dot + crop, metrics


def position_targets(num_tokens: int) -> np.ndarray:
  """float32[T, 2]: (row, column) of each token of a square crop's patch grid, patch centres scaled to (0, 1)."""
  side = int(round(np.sqrt(num_tokens)))
  if side * side != num_tokens:
    raise ValueError(f"position targets need a square patch grid, got {num_tokens} tokens")
  rows, cols = np.divmod(np.arange(num_tokens), side)
  return ((np.stack([rows, cols], -1) + 0.5) / side).astype(np.float32)


def position_loss(head: nnx.Linear, tokens: jax.Array) -> jax.Array:
  """Mean squared error of `head(tokens)` against `position_targets`: tokens float[B, T, D] of the base crop (the whole
  image, so a token's place in the crop is its place in the image). Spatial questions compare two objects' places;
  nothing else in the objective asks the tokens to keep them (see `experiments.probe_testbed`)."""
  target = jnp.asarray(position_targets(tokens.shape[-2]))
  return jnp.mean(jnp.sum((head(tokens).astype(jnp.float32) - target) ** 2, -1))


def grounding_loss(attention: jax.Array, evidence: jax.Array) -> jax.Array:
  """-log of the attention mass on the evidence tokens, mean over the rows that have evidence.

  attention float32[..., S] (attention rows of one head), evidence bool[..., S].
  """
  mass = jnp.sum(jnp.where(evidence, attention, 0.0), axis=-1)
  return _masked_mean(-jnp.log(mass + 1e-6), jnp.broadcast_to(jnp.any(evidence, axis=-1), mass.shape))


def grounding_layers(num_layers: int) -> tuple[int, int, int]:
  """Grounded decoder layers: (question words, answer position, answer position) = (1, L // 2, L - 1); (1, 2, 3)
  for the testbed's L = 4."""
  return 1, num_layers // 2, num_layers - 1


def count_loss(attention: jax.Array, target: jax.Array) -> jax.Array:
  """Cross entropy of attention rows float32[B, S] against target distributions float32[B, S] (rows summing to 1;
  all-zero rows are ignored)."""
  ce = -jnp.sum(target * jnp.log(attention + 1e-6), axis=-1)
  return _masked_mean(ce, jnp.sum(target, axis=-1) > 0)


def loss_fn(model, heads: AuxHeads, batch: Mapping, aux_weight: float = 1.0, question_weight: float = 0.5,
            grounding_weight: float = 0.0, caption_weight: float = 0.0, count_weight: float = 0.0,
            position_weight: float = 0.0, relation_weight: float = 0.0, order_weight: float = 0.0,
            direction_weight: float = 0.0, count_read_weight: float = 0.0, count_heads: int = 1,
            train_vision: bool = True):
  """The training objective -> (loss, metrics dict). Terms:

  - cross entropy of the answer token and the "</s>" after it;
  - `question_weight` x next-token cross entropy on the prompt text after the image (the question words);
  - `aux_weight` x `aux_losses` (vision tower);
  - `grounding_weight` x `grounding_loss` in three decoder layers (`grounding_layers`): in the first, head 0 of each
    colour or shape word of the question looks at the objects of that colour or shape; in the other two, heads 0
    and 1 of the position that predicts the answer look at the objects the answer depends on (for spatial
    questions head 0 at the first named object and head 1 at the second, on their base-crop tokens: `encode`'s
    head_evidence). Learning to route attention from a word to a few of ~250 image tokens from the answer loss
    alone plateaus for long on this budget; these heads shortcut it;
  - `count_weight` x `count_loss` of head 2 of the answer position in the middle grounded layer against
    `encode`'s count_target: attention to "<s>" (weight `encode`'s count_sink) and equally to each evidence
    object's centre token, so the head's output encodes how many objects the question names (attention normalises,
    so without a sink a head cannot count); with `count_heads=2` head 2 of the last layer too (its own keys and
    values under GQA, so a second reading of the count, not a copy), the term the mean of the two;
  - `caption_weight` x cross entropy of the logits at each object image token against the words of the object's
    colour and shape (mean of the two): the output head learns to name what an image token shows. Image positions
    are never decoded from, so this competes with no next-token target;
  - `position_weight` x `position_loss` of the base-crop tokens after the projector (`heads.text_position`, needs
    `AuxHeads(text_width=...)`) and, when the tower trains, of the tower's own output (`heads.position`);
  - `relation_weight` x mean squared error of `heads.relation` read from the residual stream at the answer position
    entering the last decoder layer, against `encode`'s relation_target, on spatial rows: the grounded heads look at
    the two named objects, and this asks them to carry the objects' places to the answer, which the answer loss alone
    does not make them do (`experiments.probe_testbed`, probe 4); the last layer then only has to compare them with
    the asked relation;
  - `order_weight` x the same with `heads.order` against `encode`'s order_target: the two objects' coordinates along
    the asked axis, oriented by the asked direction, so the answer is "yes" iff the first is smaller, a linear read
    of that residual. The word-dependent part of the comparison (which axis, which sign) must then happen before the
    last layer, under a dense regression target rather than the yes/no loss alone;
  - `direction_weight` x `grounding_loss` of head 1 of the answer position in the first grounded layer against
    `encode`'s direction_evidence (the asked relation word), on spatial rows: nothing else makes the answer position
    fetch that word ("left" and "right" are equally likely after a named object, so the question loss does not
    carry them forward), and without it the answer cannot depend on the asked direction;
  - `count_read_weight` x mean squared error of `heads.count` read where the relation term reads, against `encode`'s
    count_value (n / 6), on counting rows: the answer cross entropy treats the seven number words as unrelated
    classes, so a count off by one costs what one off by five does; this regression target asks the layers below the
    last to carry the count as one ordered quantity.

  train_vision=False stops the gradient at the vision features (the tower is frozen; `aux_weight` is then ignored).
  """
  grounded = grounding_weight or count_weight or direction_weight
  layers = grounding_layers(model.config.text.num_hidden_layers) if grounded else ()
  if count_heads not in (1, 2):
    raise ValueError(f"count_heads must be 1 or 2, got {count_heads}")
  reads = relation_weight or order_weight or count_read_weight
  if reads and heads.relation is None:
    raise ValueError("relation_weight, order_weight and count_read_weight need AuxHeads(..., text_width=...): no head "
                     "reads the decoder's residual stream")
  out = forward(model, batch, None, pooled=train_vision, attention_layers=layers,
                attention_queries=batch["grounding_queries"] if grounded else None,
                train_vision=train_vision,
                residual_positions=batch["target_positions"][:, :1] if reads else None)
  # attention rows [B, H, Q', S] of grounding_layers' three layers, in that order (forward returns each distinct
  # layer once, in increasing order; the layers coincide when the decoder has fewer than 4)
  attention = [out.attention[sorted(set(layers)).index(layer)] for layer in layers]
  logits = out.logits                                                                     # [B, S, V]
  answer_logits = jnp.take_along_axis(logits, batch["target_positions"][..., None], axis=1)
  answer_loss = optax.softmax_cross_entropy_with_integer_labels(answer_logits, batch["targets"]).sum(-1).mean()
  ids = batch["input_ids"]
  ce = optax.softmax_cross_entropy_with_integer_labels
  question_loss = _masked_mean(ce(logits[:, :-1], ids[:, 1:]), batch["question_mask"][:, :-1])
  loss, metrics = answer_loss + question_weight * question_loss, {}
  if train_vision:
    aux, metrics = aux_losses(heads, out.features, out.pooled, batch)
    loss = loss + aux_weight * aux
  if grounding_weight:
    evidence = batch["grounding_evidence"]
    words = grounding_loss(attention[0][:, 0, :-1], evidence[:, :-1])
    answer = sum(grounding_loss(attention[k][:, :2, -1], batch["head_evidence"]) for k in (1, 2)) / 2
    loss = loss + grounding_weight * (words + answer)
    metrics = dict(metrics, grounding_words=words, grounding_answer=answer)
  if count_weight:
    count = sum(count_loss(attention[k][:, 2, -1], batch["count_target"]) for k in range(1, 1 + count_heads))
    count = count / count_heads
    loss = loss + count_weight * count
    metrics = dict(metrics, count=count)
  if direction_weight:
    direction = grounding_loss(attention[0][:, 1, -1], batch["direction_evidence"])
    loss = loss + direction_weight * direction
    metrics = dict(metrics, direction=direction)
  if caption_weight:
    targets = batch["caption_targets"]
    caption = jnp.stack([ce(logits, jnp.maximum(targets[..., k], 0)) for k in range(2)], -1).mean(-1)
    caption = _masked_mean(caption, targets[..., 0] >= 0)
    loss = loss + caption_weight * caption
    metrics = dict(metrics, caption=caption)
  if position_weight:
    if heads.text_position is None:
      raise ValueError("position_weight needs AuxHeads(..., text_width=...): no head reads the projector's output")
    base = out.features[:, 0]                                                             # [B, T, Dv] base crop
    position = position_loss(heads.text_position, model.project(base))
    if train_vision:
      position = position + position_loss(heads.position, base)
    loss = loss + position_weight * position
    metrics = dict(metrics, position=position)
  if relation_weight:
    read = heads.relation(out.residuals[-2][:, 0])                                          # [B, 4]
    relation = _masked_mean(jnp.mean(jnp.square(read - batch["relation_target"]), -1), batch["relation_valid"])
    loss = loss + relation_weight * relation
    metrics = dict(metrics, relation=relation)
  if order_weight:
    read = heads.order(out.residuals[-2][:, 0])                                             # [B, 2]
    order = _masked_mean(jnp.mean(jnp.square(read - batch["order_target"]), -1), batch["relation_valid"])
    loss = loss + order_weight * order
    metrics = dict(metrics, order=order)
  if count_read_weight:
    read = heads.count(out.residuals[-2][:, 0])[:, 0]                                       # [B]
    count_read = _masked_mean(jnp.square(read - batch["count_value"]), batch["count_valid"])
    loss = loss + count_read_weight * count_read
    metrics = dict(metrics, count_read=count_read)
  accuracy = jnp.mean(jnp.argmax(answer_logits[:, 0], -1) == batch["targets"][:, 0])
  return loss, dict(metrics, answer_loss=answer_loss, question_loss=question_loss, answer_accuracy=accuracy)


@jax.jit
def _answer_logits(model, batch):
  return forward(model, batch, batch["last"][:, None]).logits[:, 0]


def predict(model, batch: Mapping) -> np.ndarray:
  """Greedy first token of every row (the whole answer: answers are one token): int[B] token ids."""
  batch = {k: (v if k == "layout" else jnp.asarray(v)) for k, v in batch.items()}
  return np.asarray(jnp.argmax(_answer_logits(model, batch), axis=-1))


def evaluate(model, examples: Sequence[vqa.Example], batch_size: int = 32, *, processor=None,
             keep_fraction: float | None = None, seed: int = 0, return_predictions: bool = False):
  """Per-family exact-match accuracy of greedy answers (`vqa.accuracy_by_family`), full tokens or random Stage I.

  The last batch is padded with copies of its first example to keep one compiled shape. With `keep_fraction`, each
  image keeps that fraction of its visual tokens at random (seeded by `seed` and the example's batch row).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  hf_like = hf_from_model(model)
  processor = processor or make_processor(hf_like)
  words = vocab.words()
  predictions = []
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))
    batch = encode(padded, processor, hf_like, keep_fraction=keep_fraction, seed=seed + start)
    if keep_fraction is not None:   # one compiled shape per fraction: pad K to the most any image can keep
      k = max(1, round(keep_fraction * anyres.max_num_features(*_geometry(hf_like))))
      pad = k - batch["keep_index"].shape[1]
      batch["keep_index"] = np.pad(batch["keep_index"], ((0, 0), (0, pad)))
      batch["keep_valid"] = np.pad(batch["keep_valid"], ((0, 0), (0, pad)))
    predictions += [words[t] for t in predict(model, batch)[:len(chunk)]]
  accuracy = vqa.accuracy_by_family(examples, predictions)
  return (accuracy, predictions) if return_predictions else accuracy


def hf_from_model(model) -> dict:
  """The parts of a config dict that `encode`/`make_processor` read, from a loaded model's config."""
  c = model.config
  return dict(vision_config=dict(image_size=c.vision.image_size, patch_size=c.vision.patch_size),
              image_grid_pinpoints=[list(p) for p in c.image_grid_pinpoints],
              vision_feature_select_strategy=c.vision_feature_select_strategy)


def transformers_answers(path: str, examples: Sequence[vqa.Example], batch_size: int = 16) -> list[str]:
  """Greedy answers (first token) of transformers' `LlavaNextForConditionalGeneration` loaded from the checkpoint
  directory `path` (eager attention, float32, CPU), on the same padded batches as `evaluate`. Needs torch (the test
  extra); for checking that the port and transformers answer alike."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.LlavaNextForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
  hf = model.config.to_dict()
  hf = dict(hf, vision_config=model.config.vision_config.to_dict())
  processor = make_processor(hf, directory=path)
  words = vocab.words()
  answers = []
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    batch = encode(chunk, processor, hf)
    with torch.no_grad():
      logits = model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                     attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
                     pixel_values=torch.tensor(batch["pixel_values"]),
                     image_sizes=torch.tensor(batch["image_sizes"], dtype=torch.long)).logits
    last = logits[torch.arange(len(chunk)), torch.tensor(batch["last"], dtype=torch.long)]
    answers += [words[t] for t in last.argmax(-1).tolist()]
  return answers
