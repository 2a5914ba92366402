"""CLIP vision tower (ViT-L/14-336 in LLaVA-1.5) in Flax NNX, numerically matching transformers' `CLIPVisionModel`.

Axes: I images, P = N + 1 positions (CLS first, then N = (image_size / patch_size)^2 patches in row-major order),
Dv width, H heads, Dh head width, L layers.

    tower = CLIPVisionModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))      # or filled by models.load_pretrained
    out = tower.features(pixel_values, feature_layers=(-2,), select_strategy="default", cls_attention=True)
    out.features        # float[I, N, Dv]  hidden state of layer -2, CLS dropped
    out.cls_attention   # float32[I, N]    CLS-to-patch attention of the layer that produced it, mean over heads
    # received=True: out.received float32[I, N], the attention each patch receives there (mean over heads, queries)

Architecture (transformers `CLIPVisionModel`): bias-free patch conv, class embedding, learned position embeddings,
`pre_layrnorm`, pre-LN encoder layers (LayerNorm -> MHA -> residual, LayerNorm -> fc1 -> act -> fc2 -> residual),
`post_layernorm` (only for the pooled output, which LLaVA never reads; its weights are loaded, not used).

Hidden-state indexing follows transformers: hidden state 0 is the `pre_layrnorm` output, hidden state h (1 <= h <= L)
is the output of encoder layer h - 1; negative indices count from L + 1 (so -2 is the output of layer L - 2).
`features` runs only the layers it needs (for -2 it skips the last layer; the numbers are identical).

CLS attention: computed from the CLS query row only (q of one token against the keys of all P tokens), never the
full P x P map, so the tower's own attention stays one schedule of `models.attention.bidirectional` (one
`jax.nn.dot_product_attention` call off CPU; per head on CPU). The received attention needs every query row: it
recomputes that layer's scores in query blocks (`tops_jax.relevance.received_attention`), never the whole P x P map.

Layers are stacked along a leading L axis (`nnx.vmap` at construction) and run with `jax.lax.scan` over a slice
[start, stop), so compile time does not grow with depth.

Inputs are `pixel_values: float[I, 3, H, W]` (NCHW, as transformers' image processors return them) with H = W =
`image_size`; position-embedding interpolation is not supported.
"""

import dataclasses
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from models import attention
from models import config_fields
from models import conversion
from models import sharding
from models.activations import ACTIVATIONS
from models.outputs import VisionOutput
from tops_jax import relevance

__all__ = ["CLIPVisionConfig", "CLIPVisionModel", "LayerNorm", "conversion_table",
           "resolve_hidden_state_index"]


def _check_fields(hf: dict[str, Any], unsupported: dict[str, Any], what: str):
  """Raises for config fields that the port does not implement and that differ from their neutral value."""
  bad = {k: hf[k] for k, neutral in unsupported.items() if k in hf and hf[k] != neutral}
  if bad:
    raise ValueError(f"{what}: unsupported config fields {bad} (the port implements only {unsupported})")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The fields of transformers' `CLIPVisionConfig` the tower reads (defaults are transformers' defaults)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "CLIPVisionConfig":
    """From a `vision_config` dict of a HF config.json; raises ValueError for what the port does not handle."""
    model_type = hf.get("model_type", "clip_vision_model")
    if model_type not in ("clip_vision_model", "clip"):
      raise ValueError(f"vision_config.model_type={model_type!r} is not supported (only CLIP vision towers)")
    _check_fields(hf, {"attention_dropout": 0.0}, "vision_config")
    config_fields.check_fields(hf, cls, "vision_config.", positive=True)       # every int field is a size
    fields = {f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf}
    config = cls(**fields)
    if config.hidden_act not in ACTIVATIONS:
      raise ValueError(f"vision_config.hidden_act={config.hidden_act!r} is not supported; "
                       f"supported: {sorted(ACTIVATIONS)}")
    if config.hidden_size % config.num_attention_heads:
      raise ValueError(f"vision_config.hidden_size={config.hidden_size} is not a multiple of "
                       f"num_attention_heads={config.num_attention_heads}")
    if config.image_size % config.patch_size:
      raise ValueError(f"vision_config.image_size={config.image_size} is not a multiple of "
                       f"patch_size={config.patch_size}")
    return config


def resolve_hidden_state_index(layer: int, num_layers: int) -> int:
  """transformers' hidden-state index (negative from the end of L + 1 states) -> index in [0, L]."""
  n = num_layers + 1
  if not -n <= layer < n:
    raise ValueError(f"vision feature layer {layer} is out of range for a tower with {num_layers} layers "
                     f"(hidden states {-n}..{n - 1})")
  return layer % n


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm: statistics in float32 (two-pass variance), result in the input dtype."""

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def _linear(din, dout, dtype, rngs, use_bias=True):
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class CLIPAttention(nnx.Module):
  """Bidirectional multi-head self-attention with biased q/k/v/out projections."""

  def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
    d = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.head_dim = config.head_dim
    self.q_proj = _linear(d, d, dtype, rngs)
    self.k_proj = _linear(d, d, dtype, rngs)
    self.v_proj = _linear(d, d, dtype, rngs)
    self.out_proj = _linear(d, d, dtype, rngs)

  def _heads(self, x):
    return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x: float[I, P, Dv] -> float[I, P, Dv]; mask: bool[I, 1, P, P] keys each query may see (default all)."""
    q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
    out = attention.bidirectional(q, k, v, mask)
    return self.out_proj(out.reshape(x.shape))

  def keys(self, x: jax.Array) -> jax.Array:
    """The keys of every position, mean over heads: float[I, P, Dv] (normed layer input) -> float[I, P, Dh]."""
    return self._heads(self.k_proj(x)).mean(axis=-2)

  def cls_attention(self, x: jax.Array) -> jax.Array:
    """Attention of the CLS query (position 0) over all keys, mean over heads: float[I, P, Dv] -> float32[I, P]."""
    q = self._heads(self.q_proj(x[:, :1]))[:, 0]                    # [I, H, Dh]
    k = self._heads(self.k_proj(x))                                 # [I, P, H, Dh]
    logits = jnp.einsum("ihd,iphd->ihp", q, k, preferred_element_type=jnp.float32) * self.head_dim ** -0.5
    return jax.nn.softmax(logits, axis=-1).astype(x.dtype).astype(jnp.float32).mean(axis=1)

  def received(self, x: jax.Array, block: int = relevance.RECEIVED_BLOCK) -> jax.Array:
    """Attention each position receives, mean over heads and over all P queries (CLS included), computed over
    blocks of at most `block` queries: float[I, P, Dv] -> float32[I, P]."""
    q = self._heads(self.q_proj(x)).swapaxes(1, 2)                 # [I, H, P, Dh]
    k = self._heads(self.k_proj(x)).swapaxes(1, 2)
    return relevance.received_attention(q, k, scale=self.head_dim ** -0.5, block=block)


class CLIPMLP(nnx.Module):

  def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
    self.act = config.hidden_act
    self.fc1 = _linear(config.hidden_size, config.intermediate_size, dtype, rngs)
    self.fc2 = _linear(config.intermediate_size, config.hidden_size, dtype, rngs)

  def __call__(self, x):
    return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):

  def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
    self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
    self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
    self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
    self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)

  def __call__(self, x, mask=None):
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))

  def cls_attention(self, x):
    """CLS attention of this layer given its input x: float[I, P, Dv] -> float32[I, P]."""
    return self.self_attn.cls_attention(self.layer_norm1(x))

  def received(self, x, block: int = relevance.RECEIVED_BLOCK):
    """Received attention of this layer given its input x: float[I, P, Dv] -> float32[I, P]."""
    return self.self_attn.received(self.layer_norm1(x), block)

  def keys(self, x):
    """This layer's attention keys given its input x, mean over heads: float[I, P, Dv] -> float[I, P, Dh]."""
    return self.self_attn.keys(self.layer_norm1(x))


class CLIPEncoder(nnx.Module):
  """`num_hidden_layers` encoder layers with parameters stacked on a leading L axis."""

  def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
    self.num_layers = config.num_hidden_layers

    @nnx.split_rngs(splits=config.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
      return CLIPEncoderLayer(config, dtype=dtype, rngs=r)

    self.layers = make(rngs)

  def layer(self, index: int) -> CLIPEncoderLayer:
    """The single (unstacked) layer `index` (a static Python int)."""
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))

  def run(self, x: jax.Array, start: int, stop: int, mask: jax.Array | None = None) -> jax.Array:
    """Runs layers [start, stop) (static ints): float[I, P, Dv] -> float[I, P, Dv]; `mask` as `CLIPAttention`."""
    if not 0 <= start <= stop <= self.num_layers:
      raise ValueError(f"layer segment [{start}, {stop}) is out of range for {self.num_layers} layers")
    if start == stop:
      return x
    graphdef, state = nnx.split(self.layers)
    state = jax.tree.map(lambda a: a[start:stop], state)

    def body(h, layer_state):
      h = sharding.constrain(h, "batch", "seq", None)          # under a mesh: images over (data, fsdp)
      return nnx.merge(graphdef, layer_state)(h, mask), None

    x, _ = jax.lax.scan(body, x, state)
    return x


class CLIPVisionEmbeddings(nnx.Module):

  def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
    self.config = config
    d = config.hidden_size
    self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), dtype))
    self.patch_embedding = nnx.Conv(config.num_channels, d, kernel_size=(config.patch_size,) * 2,
                                    strides=(config.patch_size,) * 2, padding="VALID", use_bias=False,
                                    dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.position_embedding = nnx.Embed(config.num_patches + 1, d, dtype=dtype, param_dtype=dtype, rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values: float[I, C, H, W] (NCHW) -> float[I, P, Dv]."""
    c = self.config
    if pixel_values.ndim != 4 or pixel_values.shape[1] != c.num_channels:
      raise ValueError(f"pixel_values must be float[I, {c.num_channels}, H, W] (NCHW), got shape {pixel_values.shape}")
    if pixel_values.shape[2:] != (c.image_size, c.image_size):
      raise ValueError(f"image size {pixel_values.shape[2:]} does not match the tower's "
                       f"{c.image_size}x{c.image_size} (position-embedding interpolation is not supported)")
    dtype = self.patch_embedding.kernel.dtype
    patches = self.patch_embedding(jnp.transpose(pixel_values.astype(dtype), (0, 2, 3, 1)))   # [I, h, w, Dv]
    patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])                        # row-major, as torch
    cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (patches.shape[0], 1, patches.shape[-1]))
    x = jnp.concatenate([cls, patches], axis=1)
    return x + self.position_embedding.embedding[...].astype(dtype)[None]


class CLIPVisionModel(nnx.Module):
  """transformers' `CLIPVisionModel` (5.x layout: embeddings, pre_layrnorm, encoder.layers, post_layernorm)."""

  def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = CLIPVisionEmbeddings(config, dtype=dtype, rngs=rngs)
    self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
    self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
    self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)

  def hidden_state(self, pixel_values: jax.Array, layer: int) -> jax.Array:
    """Hidden state `layer` (transformers indexing, negative allowed): float[I, C, H, W] -> float[I, P, Dv]."""
    h = resolve_hidden_state_index(layer, self.config.num_hidden_layers)
    return self.encoder.run(self.pre_layrnorm(self.embeddings(pixel_values)), 0, h)

  def features(self, pixel_values: jax.Array, *, feature_layers: int | Sequence[int] = -2,
               select_strategy: str = "default", cls_attention: bool = True, keys: bool = False,
               cls: bool = False, last_qk: bool = False, received: bool = False) -> VisionOutput:
    """LLaVA's image features and (optionally) the attention signals of the layer that produces them.

    Args:
      pixel_values: float[I, C, H, W] (NCHW), H = W = image_size.
      feature_layers: one hidden-state index or a sequence of them (concatenated along the width in that order).
      select_strategy: "default" drops the CLS position, "full" keeps it.
      cls_attention: also return the CLS attention of the layer producing the last entry of `feature_layers`.
      keys: also return that layer's keys, mean over heads (VisionZip's merge metric).
      cls: also return the CLS position of the features (and of the keys when asked), whatever `select_strategy`.
      last_qk: also return the last layer's full-width q_proj (CLS position) and k_proj (every position) of its
        normed input, hidden state -2 (PruMerge+'s attention hooks).
      received: also return the attention each position receives in the layer producing the last entry of
        `feature_layers` (mean over heads and over all P queries), aligned with `features`.

    Returns:
      VisionOutput(features float[I, N, Dv * len(feature_layers)] ("full": P rows), cls_attention float32[I, N]
      ("full": [I, P]) or None, keys float[I, N, Dh] or None, received float32[I, N] ("full": [I, P]) or None).
    """
    chex.assert_rank(pixel_values, 4)
    if select_strategy not in ("default", "full"):
      raise ValueError(f"select_strategy must be 'default' or 'full', got {select_strategy!r}")
    layers = (feature_layers,) if isinstance(feature_layers, int) else tuple(feature_layers)
    if not layers:
      raise ValueError("feature_layers is empty")
    num = self.config.num_hidden_layers
    wanted = [resolve_hidden_state_index(layer, num) for layer in layers]
    cls_at = wanted[-1] - 1          # layer whose attention is read; its input is hidden state cls_at
    attention = cls_attention or keys or received
    if attention and cls_at < 0:
      raise ValueError(f"feature layer {layers[-1]} is the embedding output: no attention layer produced it, "
                       "so there is no CLS attention, received attention or keys to return")

    x = self.pre_layrnorm(self.embeddings(pixel_values))
    last_in = num - 1                # the last layer's input: hidden state -2
    stops = sorted(set(wanted) | ({cls_at} if attention else set()) | ({last_in} if last_qk else set()))
    states, attn, key_rows, recv, done = {0: x}, None, None, None, 0
    for stop in stops:
      x = self.encoder.run(x, done, stop)
      states[stop], done = x, stop
      if attention and stop == cls_at:
        layer = self.encoder.layer(cls_at)
        attn = layer.cls_attention(x) if cls_attention else None
        key_rows = layer.keys(x) if keys else None
        recv = layer.received(x) if received else None
    first = 1 if select_strategy == "default" else 0
    features = jnp.concatenate([states[h][:, first:] for h in wanted], axis=-1)
    cls_features = jnp.concatenate([states[h][:, 0] for h in wanted], axis=-1) if cls else None
    last_query = last_keys = None
    if last_qk:
      layer = self.encoder.layer(num - 1)
      normed = layer.layer_norm1(states[last_in])
      last_query, last_keys = layer.self_attn.q_proj(normed[:, :1])[:, 0], layer.self_attn.k_proj(normed)
    return VisionOutput(features=features, cls_attention=None if attn is None else attn[:, first:],
                        keys=None if key_rows is None else key_rows[:, first:], cls_features=cls_features,
                        cls_keys=key_rows[:, 0] if cls and key_rows is not None else None,
                        last_query=last_query, last_keys=last_keys,
                        received=None if recv is None else recv[:, first:])

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """Last hidden state (before post_layernorm): float[I, C, H, W] -> float[I, P, Dv]."""
    return self.hidden_state(pixel_values, -1)


def conversion_table(config: CLIPVisionConfig, prefix: str, target: tuple[str, ...]) -> dict[str, "conversion.Rule"]:
  """Checkpoint names (transformers-5 layout, `prefix` + e.g. "encoder.layers.3.mlp.fc1.weight") -> state paths.

  Args:
    config: the tower's config.
    prefix: canonical checkpoint prefix of the tower, e.g. "model.vision_tower.".
    target: path of the tower inside the NNX model, e.g. ("vision_tower",).
  """
  Rule = conversion.Rule
  t = {
      prefix + "embeddings.class_embedding": Rule(target + ("embeddings", "class_embedding")),
      prefix + "embeddings.patch_embedding.weight": Rule(target + ("embeddings", "patch_embedding", "kernel"), "conv"),
      prefix + "embeddings.position_embedding.weight": Rule(target + ("embeddings", "position_embedding",
                                                                       "embedding")),
  }
  for norm in ("pre_layrnorm", "post_layernorm"):
    t[f"{prefix}{norm}.weight"] = Rule(target + (norm, "scale"))
    t[f"{prefix}{norm}.bias"] = Rule(target + (norm, "bias"))
  layers = target + ("encoder", "layers")
  for i in range(config.num_hidden_layers):
    p = f"{prefix}encoder.layers.{i}."
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      t[f"{p}self_attn.{proj}.weight"] = Rule(layers + ("self_attn", proj, "kernel"), "linear", i)
      t[f"{p}self_attn.{proj}.bias"] = Rule(layers + ("self_attn", proj, "bias"), "identity", i)
    for fc in ("fc1", "fc2"):
      t[f"{p}mlp.{fc}.weight"] = Rule(layers + ("mlp", fc, "kernel"), "linear", i)
      t[f"{p}mlp.{fc}.bias"] = Rule(layers + ("mlp", fc, "bias"), "identity", i)
    for norm in ("layer_norm1", "layer_norm2"):
      t[f"{p}{norm}.weight"] = Rule(layers + (norm, "scale"), "identity", i)
      t[f"{p}{norm}.bias"] = Rule(layers + (norm, "bias"), "identity", i)
  return t
