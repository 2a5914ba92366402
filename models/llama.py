"""LLaMA / Vicuna / Mistral decoders in Flax NNX, numerically matching transformers' `LlamaModel` / `MistralModel`.

Axes (`models` legend): B batch, S tokens of this call (keys: the same S without a cache, the W cache slots with
one), W cache capacity, Q chosen query rows, D width, H query heads, Hkv key/value heads (GQA: H % Hkv == 0), Dh head
width, L layers, V vocabulary.

    lm = LlamaModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))     # or filled by models.load_pretrained
    seg = lm.run_layers(x, pos, mask, start=0, stop=12)                # DecoderOutput(hidden=float[B, S, D], ...)
    # ... prune the sequence to S' rows (new x, positions re-indexed or kept, mask) ...
    seg = lm.run_layers(x2, pos2, mask2, start=12, stop=config.num_hidden_layers)

The architecture, the decoder segments (the Stage II seam: `run_layers`, `query_keys`), attention masks and the KV
cache (`KVCache`): models/MODELS.md#llama.

(Over 400 lines on purpose, like transformers' modeling_llama.py: config, RoPE, masks, layer, decoder, KV cache and
the checkpoint table are one port whose numerics are checked together against transformers.)
"""

import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import attention
from models import checks
from models import config_fields
from models import conversion
from models import sharding
from models.activations import ACTIVATIONS
from models.outputs import DecoderOutput

__all__ = ["TextConfig", "KVCache", "init_cache", "RMSNorm", "LlamaModel", "LlamaForCausalLM", "CausalLMOutput",
           "position_ids_from_mask", "rotary_positions", "rope_cos_sin", "apply_rope", "make_attention_mask",
           "conversion_table", "causal_lm_conversion_table", "default_positions", "lm_logits"]

# transformers' defaults per model_type, for the fields a sparse config.json (llava-1.5's text_config) may omit.
_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  rms_norm_eps=1e-6, max_position_embeddings=2048, attention_bias=False, mlp_bias=False,
                  sliding_window=None, tie_word_embeddings=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    rms_norm_eps=1e-6, max_position_embeddings=4096 * 32, attention_bias=False, mlp_bias=False,
                    sliding_window=4096, tie_word_embeddings=False),
}
_DEFAULT_ROPE_THETA = 10000.0
_ROPE_TYPES = ("default", "linear")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The decoder fields the port reads; build it with `from_hf` (transformers' per-model_type defaults apply)."""
  model_type: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int = 128
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = _DEFAULT_ROPE_THETA
  rope_type: str = "default"
  rope_factor: float = 1.0
  attention_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "TextConfig":
    """From a HF text config dict (a `text_config`, or a LlamaForCausalLM/MistralForCausalLM config.json).

    Accepts transformers-5 `rope_parameters` ({"rope_type", "rope_theta", "factor"}) and the legacy top-level
    `rope_theta` + `rope_scaling` ({"type" or "rope_type", "factor"}). Raises ValueError for anything else the port
    does not implement.
    """
    model_type = hf.get("model_type", "llama")
    if model_type not in _DEFAULTS:
      raise ValueError(f"text_config.model_type={model_type!r} is not supported; supported: {sorted(_DEFAULTS)}")
    values = {k: hf.get(k, default) for k, default in _DEFAULTS[model_type].items()}
    for k, v in values.items():
      if v is None and k not in ("num_key_value_heads", "head_dim", "sliding_window"):
        raise ValueError(f"text_config.{k} is null")
    # Every int field is a size (sliding_window too: null disables it).
    config_fields.check_fields({k: v for k, v in values.items() if v is not None}, cls, "text_config.", positive=True)
    if values["num_key_value_heads"] is None:
      values["num_key_value_heads"] = values["num_attention_heads"]
    if values["head_dim"] is None:
      values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]

    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
      raise ValueError(f"text_config.rope_parameters must be a dict, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
      raise ValueError(f"unsupported rope type {rope_type!r} (text_config.rope_parameters/rope_scaling); "
                       f"the port implements {_ROPE_TYPES}")
    theta = rope.get("rope_theta", hf.get("rope_theta", _DEFAULT_ROPE_THETA))
    config_fields.check_field(theta, float, "text_config rope_theta")
    if rope_type == "linear" and "factor" not in rope:
      raise ValueError("linear rope scaling needs a `factor` in text_config.rope_parameters")
    if rope_type == "linear":
      config_fields.check_field(rope["factor"], float, "text_config.rope_parameters.factor")
    factor = float(rope["factor"]) if rope_type == "linear" else 1.0
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    config_fields.check_field(partial, float, "text_config partial_rotary_factor", nullable=True)
    if partial not in (None, 1.0):
      raise ValueError(f"text_config partial_rotary_factor={partial} is not supported (full rotary only)")
    if hf.get("layer_types") is not None and any(t != "full_attention" for t in hf["layer_types"]):
      raise ValueError(f"text_config.layer_types={hf['layer_types']} (mixed attention types) is not supported")
    if values["hidden_act"] not in ACTIVATIONS:
      raise ValueError(f"text_config.hidden_act={values['hidden_act']!r} is not supported; "
                       f"supported: {sorted(ACTIVATIONS)}")
    if values["num_attention_heads"] % values["num_key_value_heads"]:
      raise ValueError(f"num_attention_heads={values['num_attention_heads']} is not a multiple of "
                       f"num_key_value_heads={values['num_key_value_heads']}")
    return cls(model_type=model_type, rope_theta=float(theta), rope_type=rope_type, rope_factor=factor, **values)

  @property
  def o_proj_bias(self) -> bool:
    """Whether o_proj has a bias (LLaMA/Mistral: as q/k/v, `attention_bias`; Qwen2 overrides: q/k/v only)."""
    return self.attention_bias


class CausalLMOutput(NamedTuple):
  """logits float32[B, 1, V] (all_logits: [B, S, V]); hidden_states float[L + 1, B, S, D] (see
  `models.outputs.LlavaOutput`) when asked; last_hidden_state float[B, S, D] after the final norm; cache when one was
  given."""
  logits: jax.Array
  hidden_states: jax.Array | None = None
  last_hidden_state: jax.Array | None = None
  cache: Any = None


class KVCache(NamedTuple):
  """Preallocated per-layer key/value cache (see models/MODELS.md#llama)."""
  k: jax.Array        # dtype[L, B, W, Hkv, Dh]
  v: jax.Array        # dtype[L, B, W, Hkv, Dh]
  valid: jax.Array    # bool[L, B, W]
  end: jax.Array      # int32[L]

  @property
  def capacity(self) -> int:
    return self.k.shape[2]


def init_cache(config: TextConfig, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
  """An empty cache for `batch` rows and `capacity` slots (static)."""
  shape = (config.num_hidden_layers, batch, capacity, config.num_key_value_heads, config.head_dim)
  return _constrain_cache(KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                                  valid=jnp.zeros(shape[:3], bool),
                                  end=jnp.zeros((config.num_hidden_layers,), jnp.int32)))


def _constrain_cache(cache: KVCache) -> KVCache:
  """Under a mesh, the cache is sharded like the activations: rows over (data, fsdp), key/value heads over tensor."""
  kv = ("layers", "batch", "seq", "cache_heads", "head_dim")
  return cache._replace(k=sharding.constrain(cache.k, *kv), v=sharding.constrain(cache.v, *kv),
                        valid=sharding.constrain(cache.valid, "layers", "batch", "seq"))


def position_ids_from_mask(attention_mask: jax.Array) -> jax.Array:
  """transformers' generate: cumsum(mask) - 1, padding positions set to 1. bool/int[B, S] -> int32[B, S]."""
  m = attention_mask.astype(jnp.int32)
  return jnp.where(m > 0, jnp.cumsum(m, axis=-1) - 1, 1).astype(jnp.int32)


def rotary_positions(positions: jax.Array, b: int, s: int) -> jax.Array:
  """The decoder's 1-D rotary positions from int[B, S] or int[1, B, S] (`models.family`'s [R, B, S] with R = 1):
  -> int[B, S]. M-RoPE positions (R = 3) need a decoder with a multimodal rotary."""
  if positions.ndim == 3:
    if positions.shape[0] != 1:
      raise ValueError(f"the LLaMA decoder's rotary is 1-D: positions must be int[B, S] or int[1, B, S], got shape "
                       f"{positions.shape}")
    positions = positions[0]
  chex.assert_shape(positions, (b, s))
  return positions


def _inv_freq(config: TextConfig) -> np.ndarray:
  dim = config.head_dim
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv = np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)
  return (inv / np.float32(config.rope_factor)).astype(np.float32)


def rope_cos_sin(config: TextConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """int[B, S] positions -> (cos, sin) float[B, S, Dh] in `dtype` (angles in float32, halves duplicated)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(_inv_freq(config))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE: x float[B, S, heads, Dh], cos/sin float[B, S, Dh]."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return x * cos + _rotate_half(x) * sin


def make_attention_mask(query_slots: jax.Array, key_valid: jax.Array, sliding_window: int | None) -> jax.Array:
  """Which keys each query sees. query_slots int[S] (index of each query among the keys), key_valid bool[B, Sk] ->
  bool[B, 1, S, Sk] (broadcast over heads): `models.attention.visible` with the keys at slots 0..Sk-1."""
  return attention.visible(query_slots, jnp.arange(key_valid.shape[-1]), key_valid, sliding_window)


def _linear(din, dout, dtype, rngs, use_bias):
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class RMSNorm(nnx.Module):
  """transformers' LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) in float32, cast to the input dtype, times the weight."""

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
    return self.scale[...] * y


class LlamaAttention(nnx.Module):

  def __init__(self, config: TextConfig, *, dtype, rngs: nnx.Rngs):
    c = config
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    self.q_proj = _linear(c.hidden_size, c.num_attention_heads * c.head_dim, dtype, rngs, c.attention_bias)
    self.k_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim, dtype, rngs, c.attention_bias)
    self.v_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim, dtype, rngs, c.attention_bias)
    self.o_proj = _linear(c.num_attention_heads * c.head_dim, c.hidden_size, dtype, rngs, c.o_proj_bias)

  def qkv(self, x, cos, sin):
    """x float[B, S, D] (normed) -> q float[B, S, H, Dh], k, v float[B, S, Hkv, Dh] (RoPE applied to q and k)."""
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def attend(self, q, k, v, mask, implementation: str = "auto"):
    """q float[B, S, H, Dh], k/v float[B, Sk, Hkv, Dh] (Sk: S, or the W cache slots), mask bool[B, 1, S, Sk] ->
    float[B, S, D]."""
    return self.output(attention.masked(q, k, v, mask, implementation))

  def output(self, heads):
    """float[B, S, H, Dh] attention output -> float[B, S, D] (o_proj)."""
    return self.o_proj(heads.reshape(*heads.shape[:2], -1))

  def probs(self, q, k, mask):
    """Attention probabilities float32[B, H, S, S] (transformers' eager: float32 softmax, cast to the dtype)."""
    groups = self.num_heads // self.num_kv_heads
    k = jnp.repeat(k, groups, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * self.head_dim ** -0.5
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1).astype(q.dtype).astype(jnp.float32)


class LlamaMLP(nnx.Module):

  def __init__(self, config: TextConfig, *, dtype, rngs: nnx.Rngs):
    c = config
    self.act = c.hidden_act
    self.gate_proj = _linear(c.hidden_size, c.intermediate_size, dtype, rngs, c.mlp_bias)
    self.up_proj = _linear(c.hidden_size, c.intermediate_size, dtype, rngs, c.mlp_bias)
    self.down_proj = _linear(c.intermediate_size, c.hidden_size, dtype, rngs, c.mlp_bias)

  def __call__(self, x):
    return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """One pre-norm decoder layer, split in two halves so a KV cache can be written between them."""

  def __init__(self, config: TextConfig, *, dtype, rngs: nnx.Rngs):
    self.self_attn = LlamaAttention(config, dtype=dtype, rngs=rngs)
    self.mlp = LlamaMLP(config, dtype=dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

  def qkv(self, x, cos, sin):
    return self.self_attn.qkv(self.input_layernorm(x), cos, sin)

  def finish(self, x, heads):
    """The residual stream after attention (heads: float[B, S, H, Dh], its output before o_proj) and the MLP."""
    x = x + self.self_attn.output(heads)
    return x + self.mlp(self.post_attention_layernorm(x))

  def __call__(self, x, cos, sin, mask, implementation: str = "auto"):
    q, k, v = self.qkv(x, cos, sin)
    return self.finish(x, attention.masked(q, k, v, mask, implementation))


class LlamaModel(nnx.Module):
  """transformers' LlamaModel / MistralModel: embed_tokens, stacked layers, norm (no lm_head)."""

  def __init__(self, config: TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, attention_impl: str = "auto"):
    self.config = config
    # The attention schedule of the layers (`models.attention.IMPLEMENTATIONS`); a static attribute: setting it
    # (lm.attention_impl = "xla") recompiles the programs that take the model.
    attention.resolve(attention_impl)      # checks the name
    self.attention_impl = attention_impl
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)

    @nnx.split_rngs(splits=config.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
      return LlamaDecoderLayer(config, dtype=dtype, rngs=r)

    self.layers = make(rngs)
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

  @property
  def dtype(self):
    return self.embed_tokens.embedding.dtype

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """int[B, S] -> float[B, S, D]."""
    return jnp.take(self.embed_tokens.embedding[...], input_ids, axis=0)

  def layer(self, index: int) -> LlamaDecoderLayer:
    """The single (unstacked) layer `index` (a static Python int)."""
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))

  def rotary(self, positions: jax.Array, b: int, s: int, dtype) -> tuple[jax.Array, jax.Array]:
    """The rotary tables of a call: positions int[B, S] or int[1, B, S] -> (cos, sin) float[B, S, Dh] in `dtype`.
    The hook a decoder variant with another rotary overrides (`models.qwen2`: M-RoPE, int[3, B, S])."""
    return rope_cos_sin(self.config, rotary_positions(positions, b, s), dtype)

  def _segment(self, start: int, stop: int | None) -> tuple[int, int]:
    n = self.config.num_hidden_layers
    stop = n if stop is None else stop
    if not 0 <= start < stop <= n:
      raise ValueError(f"layer segment [{start}, {stop}) is empty or out of range for {n} layers")
    return start, stop

  def run_layers(self, x: jax.Array, positions: jax.Array, attention_mask: jax.Array | None = None, *,
                 start: int = 0, stop: int | None = None, cache: KVCache | None = None,
                 cache_empty: bool = False, collect_hidden: bool = False) -> DecoderOutput:
    """Runs decoder layers [start, stop) on hidden states.

    Args:
      x: float[B, S, D] input of layer `start`.
      positions: int[B, S] or int[1, B, S] RoPE position ids.
      attention_mask: bool/int[B, S], True/1 for real tokens; None means all real.
      start, stop: static layer segment (stop=None: to the last layer).
      cache: a `KVCache`; the S tokens are written at each segment layer's `end` and attend to the cached slots.
      cache_empty: a static promise that the segment's layers hold nothing in `cache` yet (a prefill, where each layer
        runs once): the tokens go to slots [0, S) and attend among themselves like the no-cache call, so attention
        skips the key blocks the causal mask hides (`models.attention.causal`) instead of reading all W slots.
      collect_hidden: also return the input of every layer of the segment.

    Returns:
      DecoderOutput(hidden float[B, S, D] (before the final norm), hidden_states float[stop - start, B, S, D] | None,
      cache with `end` advanced by S for the segment's layers | None).
    """
    start, stop = self._segment(start, stop)
    chex.assert_rank(x, 3)
    b, t, _ = x.shape
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    chex.assert_shape(valid, (b, t))
    cos, sin = self.rotary(positions, b, t, x.dtype)
    window, impl = self.config.sliding_window, self.attention_impl
    graphdef, stack = nnx.split(self.layers)
    whole = (start, stop) == (0, self.config.num_hidden_layers)
    # A segment's layers are read from the whole stack inside the loop, one layer a step (as the scan over the whole
    # stack reads them): slicing the stack to [start, stop) first materialises a copy of the segment's weights (XLA
    # copies a slice that feeds a loop), which for a 7B model split at TOPS' Stage II layers is 9 GiB per device.
    state = stack if whole else jnp.arange(start, stop)
    layer_at = ((lambda s: s) if whole else
                (lambda i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stack)))

    def self_attention(layer, h):
      q, k, v = layer.qkv(h, cos, sin)
      return q, k, v, attention.causal(q, k, v, valid, sliding_window=window, implementation=impl)

    if cache is None:

      def body(h, layer_state):
        h = sharding.constrain(h, "batch", "seq", None)        # under a mesh: rows over (data, fsdp)
        layer = nnx.merge(graphdef, layer_at(layer_state))
        return layer.finish(h, self_attention(layer, h)[3]), h if collect_hidden else None

      x, inputs = jax.lax.scan(body, x, state)
      return DecoderOutput(hidden=x, hidden_states=inputs)

    if cache.k.shape[:2] != (self.config.num_hidden_layers, b):
      raise ValueError(f"cache holds {cache.k.shape[:2]} (layers, batch), expected "
                       f"{(self.config.num_hidden_layers, b)}")
    if cache_empty and t > cache.capacity:
      raise ValueError(f"{t} tokens do not fit a cache of {cache.capacity} slots")
    ends = jnp.zeros((stop - start,), jnp.int32) if cache_empty else cache.end[start:stop]
    old_valid = cache.valid[start:stop]
    seg_valid = jax.vmap(lambda vl, e: jax.lax.dynamic_update_slice(vl, valid, (0, e)))(old_valid, ends)
    new_valid = cache.valid.at[start:stop].set(seg_valid)
    new_visible = attention.visible(jnp.arange(t), jnp.arange(t), valid, window)

    # The cache is read, never carried: each layer attends over its cached slots (read-only) and the S new tokens,
    # the two parts merged through their logsumexps; the new keys/values leave the scan and are scattered into the
    # cache once, so a decode step writes B x S slots per layer instead of copying the cache in every layer.
    def cached_body(h, xs):
      layer_state, k_old, v_old, end, valid_old = xs
      h = sharding.constrain(h, "batch", "seq", None)
      layer = nnx.merge(graphdef, layer_at(layer_state))
      if not cache_empty and not whole:      # this layer's cached keys and values, read in place (no segment copy)
        k_old, v_old = (jax.lax.dynamic_index_in_dim(c, layer_state, keepdims=False) for c in (cache.k, cache.v))
      if cache_empty:
        q, k, v, heads = self_attention(layer, h)
      else:
        q, k, v = layer.qkv(h, cos, sin)
        old_visible = valid_old[:, None, None, :]                # cached slots are all before the new tokens
        if window is not None:
          delta = (end + jnp.arange(t))[:, None] - jnp.arange(cache.capacity)[None, :]
          old_visible = old_visible & (delta < window)[None, None]
        heads = attention.with_cache(q, k_old, v_old, old_visible, k, v, new_visible, impl)
      return layer.finish(h, heads), (k, v, h if collect_hidden else None)

    xs = ((state, ends, ends, ends, ends) if cache_empty else
          (state, cache.k, cache.v, ends, old_valid) if whole else (state, ends, ends, ends, old_valid))
    x, (ks, vs, inputs) = jax.lax.scan(cached_body, x, xs)
    if cache_empty:
      # Slots [0, S) of every segment layer: one contiguous block, a dynamic_update_slice that a mesh keeps split
      # along the rows (GSPMD resolves the index scatter below by gathering the whole cache on every device).
      write = lambda c, new: jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (start, 0, 0, 0, 0))
    else:
      where = (jnp.arange(start, stop)[:, None, None], jnp.arange(b)[None, :, None],
               (ends[:, None] + jnp.arange(t)[None, :])[:, None, :])           # [Lseg, B, S] layer, row, slot
      write = lambda c, new: c.at[where].set(new.astype(c.dtype), mode="drop")
    new_cache = _constrain_cache(KVCache(
        k=write(cache.k, ks), v=write(cache.v, vs), valid=new_valid,
        end=cache.end.at[start:stop].set(t) if cache_empty else cache.end.at[start:stop].add(t)))
    return DecoderOutput(hidden=x, hidden_states=inputs, cache=new_cache)

  def query_keys(self, layer: int, x: jax.Array, positions: jax.Array,
                 queries: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Decoder layer `layer`'s post-RoPE queries of chosen rows and keys of every token (no cache): the one way
    attention rows are read (`attention_probs`, in-LLM pruning scorers).

    Args:
      layer: static layer index.
      x: float[B, S, D] the INPUT hidden states of that layer.
      positions: int[B, S] or int[1, B, S] RoPE position ids.
      queries: int[B, Q] token indices of the query rows (clipped to [0, S)).

    Returns:
      (q float[B, Q, H, Dh], k float[B, S, Hkv, Dh]); the projections run on the Q query rows only.
    """
    c = self.config
    chex.assert_rank(queries, 2)
    block = self.layer(layer)
    b, s, _ = x.shape
    rows = jnp.clip(queries, 0, s - 1)
    pick = lambda a: jnp.take_along_axis(a, rows.reshape(rows.shape + (1,) * (a.ndim - 2)), axis=1)
    normed = block.input_layernorm(x)
    cos, sin = self.rotary(positions, b, s, x.dtype)
    k = block.self_attn.k_proj(normed).reshape(b, s, c.num_key_value_heads, c.head_dim)
    q = block.self_attn.q_proj(pick(normed)).reshape(b, rows.shape[1], c.num_attention_heads, c.head_dim)
    return apply_rope(q, pick(cos), pick(sin)), apply_rope(k, cos, sin)

  def attention_probs(self, layer: int, x: jax.Array, positions: jax.Array, attention_mask: jax.Array | None,
                      queries: jax.Array) -> jax.Array:
    """Attention probabilities of decoder layer `layer` for selected query tokens (no cache).

    Args:
      layer: static layer index.
      x: float[B, S, D] the INPUT hidden states of that layer (`run_layers(..., stop=layer)` or hidden_states[layer]).
      positions: int[B, S]; attention_mask: bool[B, S] | None as in `run_layers`.
      queries: int[B, Q] token indices of the query rows (e.g. text raters, the last token).

    Returns:
      float32[B, H, Q, S], each row a softmax over the keys the query may see (masked keys get 0).
    """
    b, t, _ = x.shape
    chex.assert_rank(queries, 2)
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    q, k = self.query_keys(layer, x, positions, queries)
    mask = make_attention_mask(jnp.arange(t), valid, self.config.sliding_window)     # [B, 1, S, S]
    mask = jnp.take_along_axis(mask, queries[:, None, :, None], axis=2)
    return self.layer(layer).self_attn.probs(q, k, mask)

  def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array | None = None, *,
               cache: KVCache | None = None, cache_empty: bool = False, output_hidden_states: bool = False):
    """All layers then the final norm: -> (last_hidden_state float[B, S, D], hidden_states float[L + 1, B, S, D] |
    None, cache | None). `cache_empty` as in `run_layers`."""
    out = self.run_layers(inputs_embeds, positions, attention_mask, cache=cache, cache_empty=cache_empty,
                          collect_hidden=output_hidden_states)
    hidden_states = None
    if output_hidden_states:
      hidden_states = jnp.concatenate([out.hidden_states, out.hidden[None]], axis=0)
    return self.norm(out.hidden), hidden_states, out.cache


class LlamaForCausalLM(nnx.Module):
  """transformers' LlamaForCausalLM / MistralForCausalLM: `model` + `lm_head` (absent when tied)."""

  def __init__(self, config: TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.model = LlamaModel(config, dtype=dtype, rngs=rngs)
    self.lm_head = None if config.tie_word_embeddings else _linear(config.hidden_size, config.vocab_size, dtype,
                                                                    rngs, False)

  @property
  def language_model(self) -> LlamaModel:
    """The decoder, under the name LLaVA uses (the `models.generate` protocol)."""
    return self.model

  def head(self, hidden: jax.Array) -> jax.Array:
    """Final norm + lm_head: float[..., D] (output of the last layer) -> float32[..., V]."""
    return lm_logits(self.model, self.lm_head, self.model.norm(hidden))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, *, cache: KVCache | None = None, cache_empty: bool = False,
               output_hidden_states: bool = False, all_logits: bool = False) -> CausalLMOutput:
    """input_ids int[B, S]; position_ids default to `position_ids_from_mask(attention_mask)` (arange without one).
    Logits at each row's last real position, float32[B, 1, V], unless `all_logits` (float32[B, S, V]).
    `cache_empty` as in `LlamaModel.run_layers`. Empty input_ids, and concrete ids outside the vocabulary, raise
    ValueError (`models.checks`)."""
    checks.check_input_ids(input_ids, self.config.vocab_size)
    if position_ids is None:
      position_ids = default_positions(input_ids.shape, attention_mask)
    h, hidden_states, cache = self.model(self.model.embed(input_ids), position_ids, attention_mask, cache=cache,
                                         cache_empty=cache_empty, output_hidden_states=output_hidden_states)
    if all_logits:
      logits = lm_logits(self.model, self.lm_head, h)
    else:
      last = (h.shape[1] - 1 if attention_mask is None
              else h.shape[1] - 1 - jnp.argmax(jnp.asarray(attention_mask).astype(bool)[:, ::-1], axis=-1))
      last = jnp.broadcast_to(jnp.asarray(last, jnp.int32), (h.shape[0],))
      logits = lm_logits(self.model, self.lm_head, jnp.take_along_axis(h, last[:, None, None], axis=1))
    return CausalLMOutput(logits=logits, hidden_states=hidden_states,
                          last_hidden_state=h, cache=cache)


def default_positions(shape: tuple[int, int], attention_mask: jax.Array | None) -> jax.Array:
  """Position ids for a fresh prompt: from the mask (left padding aware) or arange. -> int32[B, S]."""
  if attention_mask is None:
    return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
  return position_ids_from_mask(attention_mask)


def lm_logits(model: LlamaModel, lm_head: nnx.Linear | None, h: jax.Array) -> jax.Array:
  """float[..., D] normed hidden states -> float32[..., V] through lm_head or the tied embedding."""
  if lm_head is None:
    return jnp.einsum("...d,vd->...v", h, model.embed_tokens.embedding[...]).astype(jnp.float32)
  return lm_head(h).astype(jnp.float32)


def conversion_table(config: TextConfig, prefix: str, target: tuple[str, ...]) -> dict[str, "conversion.Rule"]:
  """Checkpoint names of a LlamaModel under `prefix` (e.g. "model.language_model.") -> paths under `target`."""
  Rule = conversion.Rule
  t = {prefix + "embed_tokens.weight": Rule(target + ("embed_tokens", "embedding")),
       prefix + "norm.weight": Rule(target + ("norm", "scale"))}
  layers = target + ("layers",)
  for i in range(config.num_hidden_layers):
    p = f"{prefix}layers.{i}."
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      t[f"{p}self_attn.{proj}.weight"] = Rule(layers + ("self_attn", proj, "kernel"), "linear", i)
      if config.o_proj_bias if proj == "o_proj" else config.attention_bias:
        t[f"{p}self_attn.{proj}.bias"] = Rule(layers + ("self_attn", proj, "bias"), "identity", i)
    for proj in ("gate_proj", "up_proj", "down_proj"):
      t[f"{p}mlp.{proj}.weight"] = Rule(layers + ("mlp", proj, "kernel"), "linear", i)
      if config.mlp_bias:
        t[f"{p}mlp.{proj}.bias"] = Rule(layers + ("mlp", proj, "bias"), "identity", i)
    for norm in ("input_layernorm", "post_attention_layernorm"):
      t[f"{p}{norm}.weight"] = Rule(layers + (norm, "scale"), "identity", i)
  return t


def causal_lm_conversion_table(config: TextConfig) -> dict[str, "conversion.Rule"]:
  """The family table for a text-only LlamaForCausalLM / MistralForCausalLM checkpoint."""
  t = conversion_table(config, "model.", ("model",))
  if not config.tie_word_embeddings:
    t["lm_head.weight"] = conversion.Rule(("lm_head", "kernel"), "linear")
  return t
