"""The Qwen2 decoder of Qwen2.5-VL with multimodal rotary embeddings (M-RoPE), as hooks over `models.llama`,
matching transformers' `Qwen2_5_VLTextModel`.

Axes (`models` legend): R = 3 position components (t, h, w), B batch, S tokens, Dh head width.

    lm = Qwen2Model(config, rngs=nnx.Rngs(0))            # a models.llama.LlamaModel: run_layers, query_keys, ...
    lm.run_layers(x, positions, mask)                    # positions int32[3, B, S] (M-RoPE) or int[B, S] (text)

What differs from LLaMA (everything else is `models.llama`): q/k/v projections with bias and o_proj without
(`Qwen2TextConfig.o_proj_bias`), and the rotary: each of the three position components rotates its own chunk of the
Dh / 2 frequencies, `mrope_section` = (16, 24, 24) on the 7B: chunk i takes component i % 3 (transformers'
`Qwen2_5_VLRotaryEmbedding.recomposition_frequencies`; consecutive chunks, not Qwen3's interleaving). Positions
int[B, S] (or int[1, B, S]) are the same id on the three components, as transformers broadcasts them.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import config_fields
from models import llama
from models.activations import ACTIVATIONS

__all__ = ["Qwen2TextConfig", "Qwen2Model", "mrope_cos_sin", "mrope_positions"]

# transformers' Qwen2_5_VLTextConfig defaults (a config.json may omit any of them).
_DEFAULTS = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768,
                 rms_norm_eps=1e-5)
_DEFAULT_THETA = 1e6
_DEFAULT_MROPE_SECTION = (16, 24, 24)


@dataclasses.dataclass(frozen=True)
class Qwen2TextConfig(llama.TextConfig):
  """A `models.llama.TextConfig` (attention_bias = q/k/v bias) plus the M-RoPE sections."""
  mrope_section: tuple[int, ...] = _DEFAULT_MROPE_SECTION

  @property
  def o_proj_bias(self) -> bool:
    return False

  @classmethod
  def from_hf(cls, hf: dict[str, Any], prefix: str = "text_config.") -> "Qwen2TextConfig":
    """From the text fields of a Qwen2.5-VL config.json (its `text_config`, or the top level of a legacy flat hub
    config; `prefix` names them in errors). Raises ValueError for every field the port does not implement when it
    differs from transformers' default."""
    values = {k: hf.get(k, default) for k, default in _DEFAULTS.items()}
    for k, v in values.items():
      if v is None and k != "num_key_value_heads":
        raise ValueError(f"{prefix}{k} is null")
    config_fields.check_fields({k: v for k, v in values.items() if v is not None}, cls, prefix, positive=True)
    if values["num_key_value_heads"] is None:
      values["num_key_value_heads"] = values["num_attention_heads"]
    if values["hidden_size"] % values["num_attention_heads"]:
      raise ValueError(f"{prefix}hidden_size={values['hidden_size']} is not a multiple of "
                       f"num_attention_heads={values['num_attention_heads']}")
    if values["num_attention_heads"] % values["num_key_value_heads"]:
      raise ValueError(f"{prefix}num_attention_heads={values['num_attention_heads']} is not a multiple of "
                       f"num_key_value_heads={values['num_key_value_heads']}")
    head_dim = values["hidden_size"] // values["num_attention_heads"]
    # transformers' Qwen2_5_VLAttention always uses hidden_size // heads; a different head_dim would be ignored there.
    if hf.get("head_dim") not in (None, head_dim):
      raise ValueError(f"{prefix}head_dim={hf['head_dim']} differs from hidden_size // num_attention_heads = "
                       f"{head_dim}, which transformers' Qwen2.5-VL uses; the port does not implement another")
    if values["hidden_act"] not in ACTIVATIONS:
      raise ValueError(f"{prefix}hidden_act={values['hidden_act']!r} is not supported; "
                       f"supported: {sorted(ACTIVATIONS)}")
    use_sliding = hf.get("use_sliding_window", False)
    config_fields.check_field(use_sliding, bool, prefix + "use_sliding_window", nullable=True)
    if use_sliding:
      raise ValueError(f"{prefix}use_sliding_window=true is not supported (transformers' eager and sdpa Qwen2.5-VL "
                       "ignore it too; only full attention is implemented)")
    layer_types = hf.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
      raise ValueError(f"{prefix}layer_types={layer_types} (sliding layers) is not supported")
    dropout = hf.get("attention_dropout", 0.0)
    if dropout not in (0, 0.0, None):
      raise ValueError(f"{prefix}attention_dropout={dropout} is not supported (inference only: 0)")

    rope = hf.get("rope_parameters")
    if rope is None:
      rope = hf.get("rope_scaling")
    rope = {} if rope is None else rope
    if not isinstance(rope, dict):
      raise ValueError(f"{prefix}rope_parameters / rope_scaling must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):      # transformers maps the legacy "mrope" to "default"
      raise ValueError(f"{prefix}rope type {rope_type!r} is not supported (only 'default' / 'mrope')")
    unknown = sorted(set(rope) - {"rope_type", "type", "rope_theta", "mrope_section"})
    if unknown:
      raise ValueError(f"{prefix}rope_parameters fields {unknown} are not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA))
    config_fields.check_field(theta, float, prefix + "rope_theta")
    section = rope.get("mrope_section", _DEFAULT_MROPE_SECTION)
    if (not isinstance(section, (list, tuple)) or not section
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in section)):
      raise ValueError(f"{prefix}rope_parameters.mrope_section must be a list of positive integers, got {section!r}")
    if sum(section) != head_dim // 2:
      raise ValueError(f"{prefix}rope_parameters.mrope_section={list(section)} must sum to head_dim / 2 = "
                       f"{head_dim // 2}")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1.0):
      raise ValueError(f"{prefix}partial_rotary_factor={partial} is not supported (full rotary only)")
    tie = hf.get("tie_word_embeddings", False)
    config_fields.check_field(tie, bool, prefix + "tie_word_embeddings")
    return cls(model_type="qwen2_5_vl_text", head_dim=head_dim, rope_theta=float(theta), rope_type="default",
               attention_bias=True, mlp_bias=False, sliding_window=None, tie_word_embeddings=tie,
               mrope_section=tuple(section), **values)


def mrope_positions(positions: jax.Array, b: int, s: int) -> jax.Array:
  """int[B, S], int[1, B, S] (one id on every component) or int[3, B, S] -> int[3, B, S]."""
  if positions.ndim == 2:
    positions = positions[None]
  if positions.ndim != 3 or positions.shape[0] not in (1, 3) or positions.shape[1:] != (b, s):
    raise ValueError(f"M-RoPE positions must be int[3, B, S], int[1, B, S] or int[B, S] with (B, S) = {(b, s)}, "
                     f"got shape {positions.shape}")
  return jnp.broadcast_to(positions, (3, b, s))


def mrope_cos_sin(config: Qwen2TextConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """int[3, B, S] -> (cos, sin) float[B, S, Dh] in `dtype`: angles in float32 per component, chunk i of the Dh / 2
  frequencies (`mrope_section`) from component i % 3, halves duplicated (transformers' recomposition)."""
  inv = llama._inv_freq(config)  # pylint: disable=protected-access  (the same inverse frequencies as LLaMA's)
  component = np.concatenate([np.full((n,), i % 3) for i, n in enumerate(config.mrope_section)])
  # Angle of frequency j from its own component's position: pick the component per frequency, then scale.
  pos = jnp.moveaxis(positions.astype(jnp.float32), 0, -1)                # [B, S, 3]
  freqs = pos[..., component] * jnp.asarray(inv)                           # [B, S, Dh / 2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class Qwen2Model(llama.LlamaModel):
  """transformers' Qwen2_5_VLTextModel: `models.llama.LlamaModel` with the M-RoPE rotary."""

  def rotary(self, positions: jax.Array, b: int, s: int, dtype) -> tuple[jax.Array, jax.Array]:
    return mrope_cos_sin(self.config, mrope_positions(positions, b, s), dtype)
