"""VisPruner: important tokens by CLS attention, then diverse tokens by iterative duplicate removal.

Axes: N visual tokens (patches; the CLS token is not one of them), D width, K kept, I important, M = N - I residual
slots, R residual tokens still in play.

`order` returns important (relevance descending) then diverse (final residual order); `prune.select` sorts them into
spatial order, as the official mask does. `default_important` gives the official split I = int(K * important_ratio).

Official code: Theia-4869/VisPruner @aefa01a, llava/model/llava_arch.py (`LlavaMetaForCausalLM.encode_images`) and
llava/model/multimodal_encoder/clip_encoder.py (`CLIPVisionTower.feature_select`). Facts read from that code
(inputs, the split of `keep`, the duplicate-removal loop, LLaVA-NeXT) and the deviations: tops_jax/METHODS.md#vispruner.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tops_jax import greedy
from tops_jax import similarity

__all__ = ["order", "default_important", "IMPORTANT_RATIO", "REMOVALS"]

IMPORTANT_RATIO = 0.5  # argparse default of the official eval scripts
REMOVALS = 8           # tokens dropped per iteration in the official loop


def default_important(keep: int, important_ratio: float = IMPORTANT_RATIO) -> int:
  """Important-token count for a keep: int(keep * important_ratio), the official expression (Python floats)."""
  return int(keep * important_ratio)


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"vispruner: {name} must be a static int, got {value!r}")
  if hi is None and value < lo:
    raise ValueError(f"vispruner: {name}={value} must be >= {lo}")
  if hi is not None and not lo <= value <= hi:
    raise ValueError(f"vispruner: {name}={value} must lie in [{lo}, {hi}]")
  return int(value)


class _Carry(NamedTuple):
  residual: jax.Array  # int32[M] token ids; the first `length` are in play, in the official order
  length: jax.Array    # int32[] R


def _remove_duplicates(sim: jax.Array, residual: jax.Array, length: jax.Array, diverse: int,
                       removals: int, steps: int) -> jax.Array:
  """The official iterative matching loop; returns the final residual (its first `diverse` entries are kept)."""
  m = residual.shape[0]
  n_a, n_b = (m + 1) // 2, m // 2
  a_slot, b_slot = jnp.arange(n_a), jnp.arange(n_b)

  def step(carry: _Carry, _) -> tuple[_Carry, None]:
    res, rlen = carry
    r = jnp.minimum(removals, rlen - diverse)
    a_tok, b_tok = res[0::2], res[1::2]
    a_live = 2 * a_slot < rlen
    b_live = 2 * b_slot + 1 < rlen
    block = sim[a_tok[:, None], b_tok[None, :]]                              # float32[ceil(M/2), M // 2]
    score = jnp.max(jnp.where(b_live[None, :], block, -jnp.inf), axis=1)
    ranked = jnp.argsort(jnp.where(a_live, -score, jnp.inf), stable=True)     # a slots, most duplicated first
    survivors = jnp.maximum((rlen + 1) // 2 - r, 0)          # r can exceed the a tokens when R < 2r
    j = jnp.arange(m)
    from_a = a_tok[ranked[jnp.clip(r + j, 0, n_a - 1)]]
    from_b = b_tok[jnp.clip(j - survivors, 0, max(n_b - 1, 0))] if n_b else from_a
    new_length = survivors + rlen // 2
    new = jnp.where(j < survivors, from_a, jnp.where(j < new_length, from_b, res))
    active = r > 0
    return _Carry(jnp.where(active, new, res), jnp.where(active, new_length, rlen)), None

  out, _ = jax.lax.scan(step, _Carry(residual, length), None, length=steps)
  return out.residual


def order(features: jax.Array, relevance: jax.Array, valid: jax.Array, key: jax.Array | None = None, *,
          keep: int, important: int | None = None, removals: int = REMOVALS) -> jax.Array:
  """VisPruner's kept tokens: important (relevance descending), then diverse (final residual order).

  Args:
    features: float[N, D] vision hidden states of layer -2, CLS dropped, before the projector.
    relevance: float32[N] CLS-to-patch attention of the same layer (mean or sum over heads).
    valid: bool[N] padding False.
    key: unused (deterministic).
    keep: static K (the official per-crop layout: the crop's quota, target // 5 on LLaVA-NeXT).
    important: static important count I (default `default_important(keep)` = int(K * 0.5)); K - I diverse.
    removals: static tokens removed per iteration (official 8).

  Returns:
    int32[K].
  """
  del key
  if relevance is None:
    raise ValueError("vispruner: needs relevance=float[N] (CLS attention, see tops_jax.relevance.cls_attention)")
  n = features.shape[0]
  imp = _check_int("important", default_important(keep) if important is None else important, 0, keep)
  removals = _check_int("removals", removals, 1)
  diverse = keep - imp
  score = jnp.where(valid, relevance.astype(jnp.float32), -jnp.inf)
  ranked = greedy.topk_order(score, valid, n)               # valid by relevance descending, then padding
  if diverse == 0:
    return ranked[:keep]
  residual = ranked[imp:]
  length = jnp.sum(valid).astype(jnp.int32) - imp
  # Every active iteration removes r tokens while R >= 2r, then at least one: a static bound on the iterations.
  steps = min(n - keep, math.ceil((n - keep) / removals) + 2 * removals)
  if steps:
    residual = _remove_duplicates(similarity.cosine_similarity(features), residual, length, diverse,
                                  removals, steps)
  return jnp.concatenate([ranked[:imp], residual[:diverse]]).astype(jnp.int32)
