"""CLIP text tower and image-side projections for CDPruner's relevance, in Flax NNX; numerically matching
transformers' `CLIPTextModelWithProjection` and `CLIPVisionModelWithProjection.visual_projection`.

Axes: B questions, C chunks (rows of the text encoder), S chunk positions (S <= max_position_embeddings, 77 for
OpenAI CLIP), D text width, Dv vision width, E projection width, N visual tokens (patches of one or more crops).

    relevance = ClipTextRelevance("/ckpt/clip-vit-large-patch14-336")           # float32 by default
    text = relevance.encode(questions)                    # float32[B, E] (host array)
    image = relevance.image_embeds(vision_features)       # float[..., N, Dv] (vision layer -2 patches) -> [..., N, E]
    r = tops_jax.relevance.clip_text_relevance(image, text, valid)           # float32[B, N]

Official code: Theia-4869/CDPruner @9541616c40fcd5625de1cdb8ea6c33c129eb7864 (clip_encoder.py, llava_arch.py, the
eval scripts). What CDPruner computes, pooling, the chunk mean and the deviations: models/MODELS.md#clip_text.
"""

import dataclasses
import os
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import checks
from models import clip
from models import config_fields
from models import conversion
from models import loading
from models.activations import ACTIVATIONS

__all__ = ["CLIPTextConfig", "CLIPConfig", "CLIPTextModelWithProjection", "CLIPVisionProjection", "CLIPForRelevance",
           "conversion_table", "load_clip", "INSTRUCTION_SUFFIXES", "question_text", "chunk_token_ids",
           "ClipTextRelevance"]

_LEGACY_EOS_ID = 2   # transformers pools at argmax(input_ids) for this eos_token_id (configs before PR #24773)
_MIN_CHUNK_ROWS = 4  # smallest chunk batch: one compiled shape covers every question of up to 4 chunks


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of transformers' `CLIPTextConfig` the tower reads (defaults are transformers' defaults)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  eos_token_id: int = 49407

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "CLIPTextConfig":
    """From the `text_config` dict of a CLIP config.json; raises ValueError for what the port does not handle."""
    model_type = hf.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
      raise ValueError(f"text_config.model_type={model_type!r} is not supported (only 'clip_text_model')")
    if hf.get("attention_dropout", 0.0) != 0.0:
      raise ValueError(f"text_config: unsupported attention_dropout={hf['attention_dropout']!r} (the port "
                       "implements only 0.0)")
    if "eos_token_id" in hf and (isinstance(hf["eos_token_id"], bool) or not isinstance(hf["eos_token_id"], int)):
      raise ValueError(f"text_config.eos_token_id must be one integer (the pooling position depends on it), got "
                       f"{hf['eos_token_id']!r}")
    config_fields.check_fields(hf, cls, "text_config.")
    config = cls(**{f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf})
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings"):
      if getattr(config, name) < 1:
        raise ValueError(f"text_config.{name} must be positive, got {getattr(config, name)!r}")
    if config.hidden_act not in ACTIVATIONS:
      raise ValueError(f"text_config.hidden_act={config.hidden_act!r} is not supported; "
                       f"supported: {sorted(ACTIVATIONS)}")
    if config.hidden_size % config.num_attention_heads:
      raise ValueError(f"text_config.hidden_size={config.hidden_size} is not a multiple of "
                       f"num_attention_heads={config.num_attention_heads}")
    return config


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A CLIP config.json (`model_type: "clip"`): the text tower, the vision tower (for the width and epsilon of
  `post_layernorm`) and the shared projection width E."""
  text: CLIPTextConfig
  vision: clip.CLIPVisionConfig
  projection_dim: int = 512

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "CLIPConfig":
    if hf.get("model_type") != "clip":
      raise ValueError(f"model_type={hf.get('model_type')!r}: a CLIP checkpoint (model_type 'clip', e.g. "
                       "openai/clip-vit-large-patch14-336) is needed for the text tower")
    for name in ("text_config", "vision_config"):
      if not isinstance(hf.get(name), dict):
        raise ValueError(f"{name} must be an object, got {hf.get(name)!r}")
    projection_dim = hf.get("projection_dim", cls.projection_dim)
    config_fields.check_field(projection_dim, int, "projection_dim", positive=True)
    # The official code builds CLIPTextModelWithProjection / CLIPVisionModelWithProjection from the sub-configs,
    # whose own projection_dim sizes each projection; CLIPModel uses the top-level one. They must agree.
    for name in ("text_config", "vision_config"):
      sub = hf[name].get("projection_dim", projection_dim)
      if sub != projection_dim:
        raise ValueError(f"{name}.projection_dim={sub!r} differs from projection_dim={projection_dim!r}")
    return cls(text=CLIPTextConfig.from_hf(hf["text_config"]),
               vision=clip.CLIPVisionConfig.from_hf(hf["vision_config"]), projection_dim=projection_dim)


class CLIPTextEmbeddings(nnx.Module):

  def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
    d = config.hidden_size
    self.token_embedding = nnx.Embed(config.vocab_size, d, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.position_embedding = nnx.Embed(config.max_position_embeddings, d, dtype=dtype, param_dtype=dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    """input_ids: int[C, S] -> float[C, S, D] (positions 0..S-1 in every row)."""
    s = input_ids.shape[1]
    return self.token_embedding(input_ids) + self.position_embedding.embedding[...][:s][None]


class CLIPTextTransformer(nnx.Module):
  """transformers' `CLIPTextTransformer`: embeddings, causal pre-LN encoder, final_layer_norm, pooled output."""

  def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, rngs=rngs)
    self.encoder = clip.CLIPEncoder(config, dtype=dtype, rngs=rngs)     # reads the same fields from either config
    self.final_layer_norm = clip.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)

  def pool_positions(self, input_ids: jax.Array) -> jax.Array:
    """Where transformers pools each row: int[C, S] -> int32[C] (see models/MODELS.md#clip_text)."""
    if self.config.eos_token_id == _LEGACY_EOS_ID:
      return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
    return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1).astype(jnp.int32)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """input_ids: int[C, S], attention_mask: int|bool[C, S] or None -> (last_hidden_state float[C, S, D] after
    final_layer_norm, pooled float[C, D])."""
    c, s = input_ids.shape
    mask = jnp.tril(jnp.ones((s, s), bool))[None, None]                         # [1, 1, S, S] causal
    if attention_mask is not None:
      mask = mask & (attention_mask.astype(bool)[:, None, None, :])             # [C, 1, S, S] and padding keys
    mask = jnp.broadcast_to(mask, (c, 1, s, s))
    x = self.encoder.run(self.embeddings(input_ids), 0, self.encoder.num_layers, mask)
    x = self.final_layer_norm(x)
    pooled = x[jnp.arange(c), self.pool_positions(input_ids)]
    return x, pooled


def _linear(din, dout, dtype, rngs):
  return nnx.Linear(din, dout, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


class CLIPTextModelWithProjection(nnx.Module):
  """transformers' `CLIPTextModelWithProjection`: `text_projection(pooled)`, a bias-free D -> E linear."""

  def __init__(self, config: CLIPTextConfig, projection_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.text_model = CLIPTextTransformer(config, dtype=dtype, rngs=rngs)
    self.text_projection = _linear(config.hidden_size, projection_dim, dtype, rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """input_ids: int[C, S] (S <= max_position_embeddings), attention_mask: int|bool[C, S] or None
    -> text_embeds float[C, E]."""
    chex.assert_rank(input_ids, 2)
    checks.check_input_ids(input_ids, self.config.vocab_size)
    if input_ids.shape[1] > self.config.max_position_embeddings:
      raise ValueError(f"input_ids have {input_ids.shape[1]} positions, more than max_position_embeddings="
                       f"{self.config.max_position_embeddings}; cut the text into chunks (`chunk_token_ids`)")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
      raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                       f"{tuple(attention_mask.shape)}")
    _, pooled = self.text_model(input_ids, attention_mask)
    return self.text_projection(pooled)


class CLIPVisionProjection(nnx.Module):
  """The CLIP image head CDPruner applies to every patch: `visual_projection(post_layernorm(features))`."""

  def __init__(self, config: clip.CLIPVisionConfig, projection_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.post_layernorm = clip.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
    self.visual_projection = _linear(config.hidden_size, projection_dim, dtype, rngs)

  @property
  def width(self) -> int:
    """Dv: the width of the vision features it reads (the LLaVA tower's must be the same)."""
    return self.post_layernorm.scale[...].shape[0]

  def __call__(self, features: jax.Array) -> jax.Array:
    """features: float[..., N, Dv] (LLaVA's vision features: layer -2, CLS dropped) -> float32[..., N, E]."""
    width = self.width
    if features.ndim < 2 or features.shape[-1] != width:
      raise ValueError(f"features must be float[..., N, {width}] (the vision tower's width), got shape "
                       f"{tuple(features.shape)}")
    x = self.post_layernorm(features).astype(self.visual_projection.kernel.dtype)
    return self.visual_projection(x).astype(jnp.float32)


class CLIPForRelevance(nnx.Module):
  """The parts of a CLIP checkpoint CDPruner reads: the text tower with its projection and the image head."""

  def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.text = CLIPTextModelWithProjection(config.text, config.projection_dim, dtype=dtype, rngs=rngs)
    self.vision = CLIPVisionProjection(config.vision, config.projection_dim, dtype=dtype, rngs=rngs)

  def text_embeds(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """int[C, S], int|bool[C, S] -> float[C, E] (unnormalised, as transformers' `text_embeds`)."""
    return self.text(input_ids, attention_mask)

  def image_embeds(self, features: jax.Array) -> jax.Array:
    """float[..., N, Dv] -> float32[..., N, E]."""
    return self.vision(features)


def conversion_table(config: CLIPConfig) -> dict[str, conversion.Rule]:
  """CLIP checkpoint names (transformers' `CLIPModel` tree) of the tensors read -> state paths of `CLIPForRelevance`."""
  Rule = conversion.Rule
  text = ("text", "text_model")
  layers = clip.conversion_table(config.text, "text_model.", text)       # the encoder layers share CLIP's names
  t = {name: rule for name, rule in layers.items() if name.startswith("text_model.encoder.layers.")}
  t.update({
      "text_model.embeddings.token_embedding.weight": Rule(text + ("embeddings", "token_embedding", "embedding")),
      "text_model.embeddings.position_embedding.weight": Rule(text + ("embeddings", "position_embedding",
                                                                      "embedding")),
      "text_model.final_layer_norm.weight": Rule(text + ("final_layer_norm", "scale")),
      "text_model.final_layer_norm.bias": Rule(text + ("final_layer_norm", "bias")),
      "text_projection.weight": Rule(("text", "text_projection", "kernel"), "linear"),
      "vision_model.post_layernorm.weight": Rule(("vision", "post_layernorm", "scale")),
      "vision_model.post_layernorm.bias": Rule(("vision", "post_layernorm", "bias")),
      "visual_projection.weight": Rule(("vision", "visual_projection", "kernel"), "linear"),
  })
  return t


def _skipped(name: str) -> bool:
  """Checkpoint tensors deliberately not read: the vision encoder (LLaVA's tower supplies the features), the
  contrastive temperature, and non-persistent buffers old checkpoints saved."""
  return (name.startswith("vision_model.") and not name.startswith("vision_model.post_layernorm.")) \
      or name == "logit_scale" or name.endswith(conversion.IGNORED_SUFFIXES)


def _clip_weight_files(path: str) -> list[str]:
  has_safetensors = any(os.path.isfile(os.path.join(path, f))
                        for f in ("model.safetensors", "model.safetensors.index.json"))
  if not has_safetensors and os.path.isfile(os.path.join(path, "pytorch_model.bin")):
    raise ValueError(f"CLIP checkpoint {path!r} holds only pytorch_model.bin; the loader reads safetensors only. "
                     "Convert it once with torch: `transformers.CLIPModel.from_pretrained(path)"
                     ".save_pretrained(path)` (writes model.safetensors)")
  return loading._weight_files(path)


def load_clip(path: str | os.PathLike, dtype=jnp.float32) -> CLIPForRelevance:
  """Reads the text tower, text_projection, visual_projection and vision post_layernorm of a local CLIP checkpoint.

  Args:
    path: a directory laid out like openai/clip-vit-large-patch14-336: config.json (`model_type: "clip"`) and
      model.safetensors (or shards with model.safetensors.index.json); the tokenizer files are read by
      `ClipTextRelevance`, not here.
    dtype: parameter and compute dtype (a floating dtype); the official code runs the text tower in float32.

  Returns:
    `CLIPForRelevance`, its parameters on the default device.

  Raises:
    ValueError naming the file or field: missing directory or config.json; a model_type other than "clip";
    unsupported or mistyped config fields; only pytorch_model.bin present; one error listing every missing,
    unexpected, mis-shaped or non-floating tensor; one listing tensors that are not finite after the cast.
  """
  np_dtype = loading._floating_dtype(dtype)
  path = os.fspath(path)
  hf = loading.read_config(path)
  try:
    config = CLIPConfig.from_hf(hf)
  except ValueError as e:
    raise ValueError(f"config.json in {path!r}: {e}") from None
  abstract = nnx.eval_shape(lambda: CLIPForRelevance(config, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  leaves = {tuple(str(k) for k in key): var for key, var in nnx.to_flat_state(abstract_state)}
  table = conversion_table(config)

  found: dict[str, tuple[str, tuple[int, ...], str]] = {}          # name -> (file, shape, safetensors dtype)
  unexpected, duplicated = [], []
  for file in _clip_weight_files(path):
    with loading._open_shard(file) as f:
      for name in f.keys():
        if _skipped(name):
          continue
        if name not in table:
          unexpected.append(name)
        elif name in found:
          duplicated.append(name)
        else:
          info = f.get_slice(name)
          found[name] = (file, tuple(info.get_shape()), info.get_dtype())

  missing = sorted(name for name in table if name not in found)
  misshaped, mistyped = [], []
  for name, (_, shape, st_dtype) in found.items():
    rule = table[name]
    if st_dtype not in loading._FLOAT_DTYPES:
      mistyped.append(f"{name}: dtype {st_dtype} (expected floating point)")
      continue
    problem = loading._shape_problem(name, shape, rule, leaves)
    if problem:
      misshaped.append(problem)
  problems = [(t, items) for t, items in (("missing", missing), ("unexpected", sorted(unexpected)),
                                          ("duplicated", duplicated), ("wrong shape", misshaped),
                                          ("wrong dtype", mistyped)) if items]
  if problems:
    raise ValueError(f"CLIP checkpoint {path!r} does not match its config.json:\n"
                     + "\n".join(loading._listing(t, items) for t, items in problems))

  by_target: dict = {}
  for name, (file, _, _) in found.items():
    by_target.setdefault(table[name].target, {})[table[name].layer] = (file, name, table[name])
  unfilled = sorted("/".join(key) for key in leaves if key not in by_target)
  if unfilled:
    raise ValueError(f"conversion table bug: parameters not filled by any checkpoint tensor: {unfilled}")
  non_finite = loading._fill(leaves, by_target, np_dtype)
  if non_finite:
    raise ValueError(f"CLIP checkpoint {path!r} holds weights that are not finite as {np_dtype.name}:\n"
                     + loading._listing("tensors with NaN/inf", non_finite))
  return nnx.merge(graphdef, abstract_state)


# The answer-format instructions LLaVA's eval scripts append, which CDPruner's scripts keep out of the CLIP text
# (model_vqa_loader.py, model_vqa_science.py, model_vqa_mmbench.py), and the image placeholder model_vqa_science.py
# removes. Removed wherever they occur (str.replace, as the official code does).
INSTRUCTION_SUFFIXES = (
    "\nAnswer the question using a single word or phrase.",
    "\nAnswer with the option's letter from the given choices directly.",
    "\n请直接回答选项字母。",
    "<image>\n",
)


def question_text(prompt: str) -> str:
  """The text CDPruner encodes for a user prompt: the prompt without `INSTRUCTION_SUFFIXES`."""
  for suffix in INSTRUCTION_SUFFIXES:
    prompt = prompt.replace(suffix, "")
  return prompt


def chunk_token_ids(ids: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
  """The official chunking of one tokenized text (BOS ... EOS): right-pad with id 0 / mask 0 to a multiple of
  `length` and cut into rows. ids: int[n] -> (input_ids int32[C, length], attention_mask int32[C, length]) with
  C = (n - 1) // length + 1."""
  ids = np.asarray(ids, np.int32)
  if ids.ndim != 1 or ids.size == 0:
    raise ValueError(f"ids must be a non-empty int[n] token sequence, got shape {ids.shape}")
  chunks = (ids.size - 1) // length + 1
  pad = chunks * length - ids.size
  input_ids = np.concatenate([ids, np.zeros(pad, np.int32)]).reshape(chunks, length)
  mask = np.concatenate([np.ones(ids.size, np.int32), np.zeros(pad, np.int32)]).reshape(chunks, length)
  return input_ids, mask


def _text_embeds(model: CLIPForRelevance, input_ids, attention_mask):
  return model.text_embeds(input_ids, attention_mask)


def _image_embeds(model: CLIPForRelevance, features):
  return model.image_embeds(features)


class ClipTextRelevance:
  """Host-side CDPruner text encoder: tokenizer + `CLIPForRelevance` of one CLIP checkpoint directory.

  `encode(questions)` gives one float32[E] text vector per question (mean of the unit chunk embeddings);
  `image_embeds(features)` the per-patch image embeddings; `tops_jax.relevance.clip_text_relevance` combines them.
  """

  def __init__(self, path: str | os.PathLike, dtype=jnp.float32, *, strip_instructions: bool = True):
    import transformers                                     # tokenizers only; no torch

    path = os.fspath(path)
    has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer.json")) or all(
        os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))
    if os.path.isdir(path) and not has_tokenizer:
      raise ValueError(f"CLIP checkpoint {path!r} has no tokenizer files (tokenizer.json, or vocab.json and "
                       "merges.txt)")
    self.model = load_clip(path, dtype)
    self.tokenizer = transformers.CLIPTokenizer.from_pretrained(path)
    self.chunk_length = self.model.config.text.max_position_embeddings
    self.strip_instructions = strip_instructions
    self._text_fn = jax.jit(_text_embeds)
    self._image_fn = jax.jit(_image_embeds)

  def text(self, question: str) -> str:
    """The text that is encoded for `question`."""
    return question_text(question) if self.strip_instructions else question

  def chunks(self, question: str) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32[C, S], attention_mask int32[C, S]) of one question, S = max_position_embeddings."""
    ids = self.tokenizer(self.text(question), truncation=False, add_special_tokens=True)["input_ids"]
    return chunk_token_ids(ids, self.chunk_length)

  def chunk_embeds(self, questions: Sequence[str]) -> list[np.ndarray]:
    """Per question, its chunks' `text_embeds` (float32[C_b, E], unnormalised), from one batched encoder call."""
    if isinstance(questions, str) or not all(isinstance(q, str) for q in questions):
      raise ValueError(f"questions must be a list of strings, got {questions!r:.80}")
    if not questions:
      raise ValueError("questions is empty")
    parts = [self.chunks(q) for q in questions]
    ids = np.concatenate([p[0] for p in parts])
    mask = np.concatenate([p[1] for p in parts])
    rows = ids.shape[0]
    bucket = max(_MIN_CHUNK_ROWS, 1 << (rows - 1).bit_length())     # a power of two: few compiled shapes
    ids = np.concatenate([ids, np.repeat(ids[:1], bucket - rows, axis=0)])
    mask = np.concatenate([mask, np.repeat(mask[:1], bucket - rows, axis=0)])
    embeds = np.asarray(self._text_fn(self.model, ids, mask), np.float32)[:rows]
    bounds = np.cumsum([0] + [p[0].shape[0] for p in parts])
    return [embeds[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

  def encode(self, questions: Sequence[str]) -> np.ndarray:
    """questions: B strings -> float32[B, E], per question the mean over its chunks of the unit text embeddings."""
    out = []
    for e in self.chunk_embeds(questions):
      unit = e / np.linalg.norm(e, axis=-1, keepdims=True)
      out.append(unit.mean(axis=0))
    return np.stack(out).astype(np.float32)

  def image_embeds(self, features: jax.Array) -> jax.Array:
    """features: float[..., N, Dv] (vision layer -2, CLS dropped) -> float32[..., N, E] (jitted)."""
    return self._image_fn(self.model, features)
