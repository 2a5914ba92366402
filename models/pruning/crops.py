"""Stage I's crop arithmetic: the nominal crops behind a budget, a crop's quota, each crop token's packed slot.

Axes and counts: the legend of `models` (here the groups P are crops, T tokens per crop).
"""

import jax
import jax.numpy as jnp

from models.family import VisualTokens

__all__ = ["nominal_crops", "per_crop_quota", "nominal_tokens", "slot_of_source"]


def nominal_crops(config, model_config) -> int:
  """The crops behind the budget: `stage1_crops`, else the model's most crops per image."""
  return config.stage1_crops or model_config.max_num_crops


def per_crop_quota(config, model_config) -> int:
  """A crop's quota: the budget // the nominal crops."""
  return config.stage1_budget // nominal_crops(config, model_config)


def nominal_tokens(config, model_config) -> int:
  return nominal_crops(config, model_config) * model_config.vision.num_patches


def slot_of_source(images: VisualTokens) -> jax.Array:
  """The packed slot of each crop token (-1: unpadding removed it, or a padding crop): int32[B, P * T]."""
  b, p, t = images.group_embeds.shape[:3]
  n = images.source.shape[1]
  src = jnp.where(images.source >= 0, images.source, p * t)
  return jnp.full((b, p * t), -1, jnp.int32).at[jnp.arange(b)[:, None], src].set(
      jnp.arange(n, dtype=jnp.int32), mode="drop")
