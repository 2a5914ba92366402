"""The testbed model: a small LLaVA-NeXT for the synthetic VQA benchmark (`experiments.synthvqa.vqa`), its config, its
initialisation for training from scratch, its processor, and the forward the testbed's training and evaluation run.

Axes: B batch (one image per example), S sequence (padded), P crops per image (base + grid, padded), T patches per
crop (CLS dropped), Dv vision width, D text width, V vocabulary, Q scored positions per row, L decoder layers.

    hf = model.hf_config()                           # transformers-compatible LlavaNextConfig dict
    net = model.make_model(hf, seed=0)               # or models.load_pretrained(model.DEFAULT_CKPT)
    proc = model.make_processor(hf)                  # LlavaNextProcessor over the benchmark tokenizer (`vocab`)

Architecture (`hf_config`): CLIP-style tower with a CLS token (48-px crops, 8-px patches -> 36 patches + CLS, width
96, 3 layers, 4 heads), 2-layer GELU projector, LLaMA decoder (width 128, 4 layers, 4 query / 2 key-value heads,
SwiGLU 384, vocabulary = the benchmark tokenizer, 65 words), anyres with the benchmark's pinpoints (base crop + up to
6 grid crops, `image_newline`): 192 to 270 visual tokens per image. Choices made here (no paper defines a testbed):
- `vision_feature_layer=-1` (not LLaVA's -2): in a 3-layer tower the last layer would otherwise be dead weight. The
  CLS attention Stage I reads (`cls_attention`) is then that of the last layer, whose CLS output feeds the pooled
  auxiliary head (`experiments.testbed.heads`), so the CLS query is trained to look at objects (as CLIP's is).
- 4 decoder layers: TOPS' Stage II layers at relative depths 12/32 and 24/32 are then distinct layers,
  `models.pruning.tops_layers(4) = (2, 3)`. On this CPU the decoder's cost is its attention (B x H x S^2 softmax
  with S ~ 300), nearly independent of the width, so depth is what training time buys: 4 layers train twice as many
  steps per hour as 8, which mattered more than depth in the pilots (8 layers stayed at chance for the first 300
  steps).
- Strategy "default" with `num_additional_image_tokens=1`: the processor counts CLS, the model drops it.
"""

import os
import tempfile
from typing import Mapping, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.testbed import vocab
from models import anyres
from models import llama
from models import llava_next

__all__ = [
    "IMAGE_TOKEN_ID", "DEFAULT_CKPT", "MAX_TEXT_TOKENS", "hf_config", "make_model", "make_processor",
    "hf_from_model", "geometry", "seq_len", "ForwardOutput", "forward",
]

IMAGE_TOKEN_ID = vocab.words().index(vocab.IMAGE)
# The shipped checkpoint, beside this package (experiments/testbed_ckpt).
DEFAULT_CKPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "testbed_ckpt")
MAX_TEXT_TOKENS = 26  # longest benchmark prompt with its answer is 23 tokens (one of them the "<image>" placeholder)


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
  """The `LlavaNextProcessor` matching `hf` (tokenizer from `directory`, else built from `vocab`)."""
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


def hf_from_model(model) -> dict:
  """The parts of a config dict that `make_processor` and `batches.encode` read, from a loaded model's config."""
  c = model.config
  return dict(vision_config=dict(image_size=c.vision.image_size, patch_size=c.vision.patch_size),
              image_grid_pinpoints=[list(p) for p in c.image_grid_pinpoints],
              vision_feature_select_strategy=c.vision_feature_select_strategy)


def geometry(hf: Mapping) -> tuple[tuple[tuple[int, int], ...], int, int]:
  """(pinpoints, crop size, patch size) of a config dict."""
  vision = hf["vision_config"]
  return tuple(map(tuple, hf["image_grid_pinpoints"])), vision["image_size"], vision["patch_size"]


def seq_len(hf: Mapping) -> int:
  """The padded sequence length S: the most visual tokens an image can get plus the longest prompt."""
  pinpoints, crop, patch = geometry(hf)
  return anyres.max_num_features(pinpoints, crop, patch) + MAX_TEXT_TOKENS


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
    batch: `batches.encode` output (arrays); with keep_index/keep_valid, only those packed rows are merged (Stage I).
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
