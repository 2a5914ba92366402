"""DART: keep a few pivot tokens and, for each pivot, the tokens that duplicate it least.

Axes: N visual tokens, D width, Dk key width, T text tokens, P pivots, K kept.

Source: DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More", EMNLP 2025), official code `ZichenWen1/DART` and the llmc port. Facts read from that code:
- Pruning happens before LLM layer 2. Pivots are the `pivot_image_token = 4` visual tokens with the largest L1 norm
  of their layer-1 keys (after RoPE, heads concatenated) plus `pivot_text_token = 4` text tokens chosen the same way
  among the tokens after the image.
- Similarity is the cosine of the hidden states entering layer 2 passed through the model's final RMSNorm.
- Candidates are the visual tokens that are not visual pivots. Pivot by pivot, the TOKEN_TOPK candidates with the
  lowest cosine similarity to that pivot are kept and leave the candidate set; TOKEN_TOPK =
  ceil(budget // (pivot_image_token + pivot_text_token)). The kept visual set is the visual pivots plus every pick
  (text pivots are not visual tokens and are not returned).

Here `features` is the similarity space (the normed layer-2 input states), `keys` (float[N, Dk], default the
features) only chooses the visual pivots, and the text pivots are optional: `text_features` float[T, D] with
`text_keys` float[T, Dk] (default the text features) and `text_valid` bool[T].

Choices where the code is silent or inexact:
- Exact budget: the official quota overshoots (4 + 8 * 16 = 132 tokens for a budget of 128). Here the K - P picks
  are shared as evenly as possible over the active pivots, earlier pivots taking the remainder, so exactly K tokens
  are kept.
- Pivot order: the official loop visits pivots in Python set order (effectively arbitrary). Here visual pivots go
  first, in descending key norm, then text pivots in descending key norm.
- Ties (equal norms, equal similarities) go to the lowest index. Padding is never a pivot, never picked and never a
  text pivot; with fewer than `text_pivots` valid text tokens the quota is shared among the ones there are. If an
  outer jit hides that fewer than K visual tokens are valid, the last slots hold the lowest-index unused padding.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tops_jax import greedy
from tops_jax import similarity

__all__ = ["order", "PIVOT_IMAGE_TOKENS", "PIVOT_TEXT_TOKENS"]

PIVOT_IMAGE_TOKENS = 4
PIVOT_TEXT_TOKENS = 4


class _Carry(NamedTuple):
  chosen: jax.Array   # bool[N]


def _l1(x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.abs(x.astype(jnp.float32)), axis=-1)


def _check(name: str, x, rows: int, what: str):
  if x is not None and (jnp.ndim(x) != 2 or x.shape[0] != rows):
    raise ValueError(f"dart: {name} must be {what}, got shape {tuple(jnp.shape(x))}")


def _slot(step: jax.Array, picks: int, active: jax.Array) -> jax.Array:
  """Which active pivot owns pick `step` when `picks` picks are shared by `active` pivots, earlier pivots first."""
  base = picks // active
  extra = picks % active
  head = extra * (base + 1)
  return jnp.where(step < head, step // (base + 1), extra + (step - head) // jnp.maximum(base, 1))


def order(features: jax.Array, relevance: jax.Array | None, valid: jax.Array, key: jax.Array | None = None, *,
          keep: int, pivots: int = PIVOT_IMAGE_TOKENS, keys: jax.Array | None = None,
          text_features: jax.Array | None = None, text_keys: jax.Array | None = None,
          text_valid: jax.Array | None = None, text_pivots: int = PIVOT_TEXT_TOKENS) -> jax.Array:
  """DART's kept tokens: visual pivots (descending key L1 norm), then the picks in pick order.

  Args:
    features: float[N, D] similarity space (DART: final-norm hidden states entering the pruning layer).
    relevance: unused (DART ranks by duplication, not importance).
    valid: bool[N] padding False.
    key: unused.
    keep: static budget K.
    pivots: static number of visual pivots P (official 4); min(P, K) are used.
    keys: float[N, Dk] visual keys whose L1 norm picks the pivots (default `features`).
    text_features: float[T, D] text states in the same space, or None for visual pivots only.
    text_keys: float[T, Dk] text keys for the text pivots (default `text_features`).
    text_valid: bool[T] real text tokens (default all).
    text_pivots: static number of text pivots (official 4); used only with `text_features`.

  Returns:
    int32[K].
  """
  del relevance, key
  n = features.shape[0]
  if isinstance(pivots, bool) or not isinstance(pivots, int) or pivots < 1:
    raise ValueError(f"dart: pivots must be a static int >= 1, got {pivots!r}")
  if isinstance(text_pivots, bool) or not isinstance(text_pivots, int) or text_pivots < 0:
    raise ValueError(f"dart: text_pivots must be a static int >= 0, got {text_pivots!r}")
  _check("keys", keys, n, f"float[N={n}, Dk]")
  if text_features is None and (text_keys is not None or text_valid is not None):
    raise ValueError("dart: text_keys / text_valid need text_features")

  p = min(pivots, keep)
  norm = _l1(features if keys is None else keys)
  pivot_idx = greedy.topk_order(jnp.where(valid, norm, -jnp.inf), valid, p)
  rows = [similarity.cosine_similarity(features[pivot_idx], features)]         # float32[P, N]
  active = jnp.int32(p)
  if text_features is not None and text_pivots > 0:
    if jnp.ndim(text_features) != 2 or text_features.shape[1] != features.shape[1]:
      raise ValueError(f"dart: text_features must be float[T, D={features.shape[1]}], "
                       f"got shape {tuple(jnp.shape(text_features))}")
    t = text_features.shape[0]
    _check("text_keys", text_keys, t, f"float[T={t}, Dk]")
    tv = jnp.ones(t, dtype=bool) if text_valid is None else text_valid
    if jnp.shape(tv) != (t,) or jnp.result_type(tv) != jnp.bool_:
      raise ValueError(f"dart: text_valid must be bool[T={t}], got {jnp.result_type(tv)}{tuple(jnp.shape(tv))}")
    tp = min(text_pivots, t)
    tnorm = _l1(text_features if text_keys is None else text_keys)
    text_idx = greedy.topk_order(jnp.where(tv, tnorm, -jnp.inf), tv, tp)     # valid text pivots come first
    rows.append(similarity.cosine_similarity(text_features[text_idx], features))
    active = active + jnp.sum(tv[text_idx]).astype(jnp.int32)
  sim = jnp.concatenate(rows)                                                  # float32[P + Pt, N]

  picks = keep - p
  if picks == 0:
    return pivot_idx
  idx = jnp.arange(n)
  chosen = jnp.zeros(n, dtype=bool).at[pivot_idx].set(True)

  def step(carry: _Carry, s):
    candidates = valid & ~carry.chosen
    least_duplicate = greedy.masked_argmax(-sim[_slot(s, picks, active)], ~candidates)
    lowest_unused = greedy.masked_argmax(-idx.astype(jnp.float32), carry.chosen)
    pick = jnp.where(jnp.any(candidates), least_duplicate, lowest_unused)
    return _Carry(carry.chosen.at[pick].set(True)), pick

  _, picked = jax.lax.scan(step, _Carry(chosen), jnp.arange(picks))
  return jnp.concatenate([pivot_idx, picked.astype(jnp.int32)])
