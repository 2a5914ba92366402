"""TrimTokenator: mutual-information alignment, then Greedy RepMax (Zhang et al. 2025, arXiv 2509.00320).

Axes: N visual tokens, A text tokens, D width, K kept, P stage-1 survivors.

Only the outline of the method is public, so each step below is a documented choice with a parameter.

Stage 1, cross-modal alignment. Each valid visual token v_i is scored by its mutual information with the text
tokens t_1..t_A (`text`, embeddings in the same width D as the visual tokens, e.g. the LLM input embeddings of the
prompt). The paper approximates the mutual information through an L2 distance between embeddings; the estimator
is `mi_estimator`:
- "l2" (default): mean over valid text tokens of -||v_i - t||^2. With `normalize=True` (default) both sides are
  L2-normalised first, because projector outputs and text embeddings have very different norms and the raw
  distance would rank tokens by their norm alone. Normalised, this is 2 * mean cosine - 2.
- "gaussian": log of the mean Gaussian kernel exp(-||v_i - t||^2 / (2 sigma^2)) over valid text tokens, a
  kernel-density estimate of how likely v_i is under the text (the Gaussian-channel form of the pointwise MI, up
  to a per-text-token constant). Unlike "l2", being close to a few text tokens outweighs being average to all.
The P best-scored valid tokens survive, with P = `stage1_keep` (static: it fixes no output shape but it bounds the
candidate set; default min(N, 2 K), i.e. stage 1 keeps twice the final keep). To derive it from a ratio, pass
stage1_keep = min(N, max(K, ceil(ratio * N))).
Without `text`, `relevance` (larger = better aligned) is the stage-1 score; with neither, ValueError.

Stage 2, Greedy RepMax. Max-sum diversification over the survivors with the cosine distance d = 1 - F of the
visual features: the seed is the best stage-1 token; each step adds the survivor that most increases the sum of
pairwise distances of the kept set, i.e. argmax_i sum_{k in S} d[i, k]. The running sum is updated with one row
of d per step. Ties go to the lowest index.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tops_jax import greedy
from tops_jax import similarity

__all__ = ["MI_ESTIMATORS", "alignment_scores", "order"]

MI_ESTIMATORS = ("l2", "gaussian")


class _Carry(NamedTuple):
  chosen: jax.Array  # bool[N]
  dist_sum: jax.Array  # float32[N], sum_{k in S} d[i, k]


def alignment_scores(features: jax.Array, text: jax.Array, text_valid: jax.Array | None = None, *,
                     mi_estimator: str = "l2", sigma: float = 0.5, normalize: bool = True) -> jax.Array:
  """Stage-1 score of every visual token: its estimated mutual information with the text (larger = better).

  features: float[N, D], text: float[A, D], text_valid: bool[A] or None (all valid) -> float32[N]. With no valid
  text token every score is 0.
  """
  if mi_estimator not in MI_ESTIMATORS:
    raise ValueError(f"trimtokenator: mi_estimator must be one of {MI_ESTIMATORS}, got {mi_estimator!r}")
  if np.ndim(text) != 2 or np.shape(text)[-1] != np.shape(features)[-1]:
    raise ValueError(f"trimtokenator: text must be float[A, D] per example with D = {np.shape(features)[-1]} "
                     f"(float[B, A, D] when features are batched), got shape {np.shape(text)}")
  a = np.shape(text)[0]
  if text_valid is None:
    text_valid = jnp.ones((a,), bool)
  elif np.shape(text_valid) != (a,) or jnp.result_type(text_valid) != jnp.bool_:
    raise ValueError(f"trimtokenator: text_valid must be bool[A] per example with A = {a}, got "
                     f"{jnp.result_type(text_valid)}{list(np.shape(text_valid))}")
  if normalize:
    v, t = similarity.l2_normalize(features), similarity.l2_normalize(text)
  else:
    v, t = features.astype(jnp.float32), text.astype(jnp.float32)
  # ||v - t||^2 from norms and one [N, A] matmul, without an [N, A, D] temporary.
  dot = jnp.einsum("nd,td->nt", v, t, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.maximum(jnp.sum(v * v, -1)[:, None] + jnp.sum(t * t, -1)[None, :] - 2.0 * dot, 0.0)
  count = jnp.sum(text_valid)
  if mi_estimator == "l2":
    score = -jnp.sum(jnp.where(text_valid[None, :], sq, 0.0), axis=1) / jnp.maximum(count, 1)
  else:
    logk = jnp.where(text_valid[None, :], -sq / (2.0 * sigma * sigma), -jnp.inf)
    score = jax.nn.logsumexp(logk, axis=1) - jnp.log(jnp.maximum(count, 1).astype(jnp.float32))
  return jnp.where(count > 0, score, 0.0)


def order(features: jax.Array, relevance: jax.Array | None, valid: jax.Array, key=None, *, keep: int,
          text: jax.Array | None = None, text_valid: jax.Array | None = None, stage1_keep: int | None = None,
          mi_estimator: str = "l2", sigma: float = 0.5, normalize: bool = True) -> jax.Array:
  """TrimTokenator order for one example.

  Args:
    features: float[N, D] visual token features (projector outputs).
    relevance: float32[N] or None; the stage-1 score when `text` is not given (larger = better aligned).
    valid: bool[N]; invalid tokens never survive stage 1.
    key: unused (deterministic).
    keep: K.
    text: float[A, D] text token embeddings (float[B, A, D] through `prune.select` on a batch).
    text_valid: bool[A] mask of real text tokens (default all).
    stage1_keep: P, static, keep <= P <= N; default min(N, 2 * keep).
    mi_estimator: "l2" or "gaussian" (see the module docstring).
    sigma: Gaussian kernel width for mi_estimator="gaussian".
    normalize: L2-normalise visual and text embeddings before the distance.
  Returns:
    int32[K] indices in pick order: the best stage-1 token, then the Greedy RepMax picks.
  """
  del key
  n = features.shape[0]
  p = min(n, 2 * keep) if stage1_keep is None else stage1_keep
  if not isinstance(p, (int, np.integer)) or isinstance(p, bool) or not keep <= p <= n:
    raise ValueError(f"trimtokenator: stage1_keep must be a static int with keep <= stage1_keep <= N "
                     f"(keep={keep}, N={n}), got {stage1_keep!r}")
  if text is not None:
    score = alignment_scores(features, text, text_valid, mi_estimator=mi_estimator, sigma=sigma, normalize=normalize)
  elif relevance is not None:
    score = relevance.astype(jnp.float32)
  else:
    raise ValueError("trimtokenator: stage 1 needs text embeddings (text=float[A, D], or float[B, A, D] when "
                     "batched) or, as a fallback, a relevance vector (relevance=float[..., N])")

  top = greedy.topk_order(score, valid, int(p))
  survivor = jnp.zeros((n,), bool).at[top].set(True) & valid
  sim = similarity.cosine_similarity(features)
  no_one = jnp.zeros((n,), bool)
  seed = greedy.pick(score, survivor, no_one)  # = top[0] whenever a valid token exists
  start = _Carry(chosen=no_one.at[seed].set(True), dist_sum=1.0 - sim[seed])

  def step(carry: _Carry, _) -> tuple[_Carry, jax.Array]:
    i = greedy.pick(carry.dist_sum, survivor & ~carry.chosen, carry.chosen)
    return _Carry(chosen=carry.chosen.at[i].set(True), dist_sum=carry.dist_sum + (1.0 - sim[i])), i

  _, rest = jax.lax.scan(step, start, None, length=keep - 1)
  return jnp.concatenate([seed[None], rest]).astype(jnp.int32)
