"""Relevance signals for visual tokens, computed from the few attention rows they need.

Axes: ... leading batch axes, H query heads, Hkv key/value heads (GQA: Hkv divides H; query head h reads key head
h // (H // Hkv), the Hugging Face `repeat_kv` layout), Dh head width, S keys (the whole sequence), Q query rows, A
text queries (text tokens after the image), N visual tokens, D width.

Every attention signal takes the queries of its raters only and the keys of the whole sequence (never the S x S
map); its rows equal the rows of the model's own attention map. `received_attention` needs every query row and takes
them in blocks, so the S x S map still never exists whole. Signals: `cls_attention`, `received_attention`,
`last_token_attention`, `text_rater_attention` (with `sparsevlm_rater_scores` / `select_raters`),
`text_embedding_cosine`, `clip_text_relevance` (CDPruner, official Theia-4869/CDPruner llava/model/llava_arch.py
`encode_images`).

What each signal computes, the methods that read it and the deviations: tops_jax/METHODS.md#relevance.
"""

import jax
import jax.numpy as jnp
import numpy as np

from tops_jax import similarity

__all__ = ["cls_attention", "received_attention", "RECEIVED_BLOCK", "last_token_attention", "text_rater_attention",
           "text_visual_attention", "rater_relevance", "select_raters",
           "sparsevlm_rater_scores", "text_embedding_cosine", "clip_text_relevance",
           "cdpruner_rescale"]

_TINY = 1e-30
# Query rows per block of `received_attention`: float32[..., H, 128, S] scores at a time (CLIP-L/336, 16 heads:
# 4.3 MB per image); CLIP's 577 queries run as 5 blocks of 116 rows.
RECEIVED_BLOCK = 128


def _shape(x):
  return tuple(np.shape(x))


def _check_qk(name: str, q, k, q_rank_tail: int):
  """Checks q: float[..., H, (A,) Dh] against k: float[..., Hkv, S, Dh]; returns (lead, h, hkv, s, dh)."""
  qs, ks = _shape(q), _shape(k)
  if len(qs) < q_rank_tail:
    raise ValueError(f"{name}: queries need at least {q_rank_tail} axes, got shape {qs}")
  if len(ks) < 3:
    raise ValueError(f"{name}: keys must be float[..., Hkv, S, Dh], got shape {ks}")
  lead = qs[:-q_rank_tail]
  if ks[:-3] != lead:
    raise ValueError(f"{name}: queries and keys must share leading (batch) axes, got {lead} and {ks[:-3]}")
  for label, x in (("queries", q), ("keys", k)):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"{name}: {label} must be floating point, got dtype {jnp.result_type(x)}")
  h, dh = qs[-q_rank_tail], qs[-1]
  hkv, s, dhk = ks[-3:]
  if dh != dhk:
    raise ValueError(f"{name}: query head width {dh} != key head width {dhk}")
  if hkv == 0 or h % hkv:
    raise ValueError(f"{name}: key heads Hkv={hkv} must divide query heads H={h}")
  return lead, h, hkv, s, dh


def _check_mask(name: str, label: str, mask, shape):
  if mask is None:
    return
  if _shape(mask) != tuple(shape):
    raise ValueError(f"{name}: {label} must have shape {tuple(shape)}, got {_shape(mask)}")
  if jnp.result_type(mask) != jnp.bool_:
    raise ValueError(f"{name}: {label} must be a bool mask, got dtype {jnp.result_type(mask)}")


def _check_positions(name: str, q_positions, k_positions, q_shape, k_shape):
  if (q_positions is None) != (k_positions is None):
    raise ValueError(f"{name}: give both query and key positions for causal masking, or neither")
  if q_positions is None:
    return
  for label, x, shape in (("query positions", q_positions, q_shape), ("key positions", k_positions, k_shape)):
    if _shape(x) != tuple(shape):
      raise ValueError(f"{name}: {label} must have shape {tuple(shape)}, got {_shape(x)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
      raise ValueError(f"{name}: {label} must be integers, got dtype {jnp.result_type(x)}")


def _check_visual(name: str, visual, lead, s):
  vs = _shape(visual)
  if len(vs) != len(lead) + 1 or vs[:-1] != lead:
    raise ValueError(f"{name}: visual must be int[..., N] with leading axes {lead}, got shape {vs}")
  if not jnp.issubdtype(jnp.result_type(visual), jnp.integer):
    raise ValueError(f"{name}: visual must hold integer key positions, got dtype {jnp.result_type(visual)}")
  if not isinstance(visual, jax.core.Tracer):
    v = np.asarray(visual)
    if v.size and (v.min() < 0 or v.max() >= s):
      raise ValueError(f"{name}: visual positions must lie in [0, S={s}), got range [{v.min()}, {v.max()}]")
  return vs[-1]


def _masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to `mask`; rows with no allowed entry become zeros."""
  top = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  e = jnp.where(mask, jnp.exp(logits - top), 0.0)
  return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), _TINY)


def _attention_rows(q, k, *, scale, kv_valid, q_positions, k_positions) -> jax.Array:
  """Head-averaged attention rows. q: float[..., H, Q, Dh], k: float[..., Hkv, S, Dh] -> float32[..., Q, S].

  kv_valid: bool[..., S] or None; q_positions: int[..., Q] and k_positions: int[..., S] (both or neither) allow
  key j for query i only when k_positions[j] <= q_positions[i].
  """
  *lead, h, tq, dh = q.shape
  hkv, s = k.shape[-3], k.shape[-2]
  scale = dh ** -0.5 if scale is None else scale
  qg = q.reshape(*lead, hkv, h // hkv, tq, dh)
  logits = jnp.einsum("...kgtd,...ksd->...kgts", qg, k, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)
  logits = logits.astype(jnp.float32).reshape(*lead, h, tq, s) * jnp.asarray(scale, jnp.float32)
  mask = jnp.ones((*lead, 1, tq, s), dtype=bool)
  if kv_valid is not None:
    mask = mask & kv_valid[..., None, None, :]
  if q_positions is not None:
    mask = mask & (k_positions[..., None, None, :] <= q_positions[..., None, :, None])
  return jnp.mean(_masked_softmax(logits, mask), axis=-3)


def _gather_keys(rows: jax.Array, visual: jax.Array) -> jax.Array:
  """rows: float[..., Q, S], visual: int[..., N] -> float[..., Q, N]."""
  idx = jnp.broadcast_to(visual[..., None, :], (*rows.shape[:-1], visual.shape[-1]))
  return jnp.take_along_axis(rows, idx.astype(jnp.int32), axis=-1)


def cls_attention(q_cls: jax.Array, k: jax.Array, *, scale: float | None = None, kv_valid: jax.Array | None = None,
                  cls_index: int | None = 0) -> jax.Array:
  """CLS -> patch attention of one vision layer, mean over heads.

  Args:
    q_cls: float[..., H, Dh] the CLS query of the layer (after its projection; before RoPE if any).
    k: float[..., Hkv, S, Dh] the keys of every token of that layer, CLS included (S = N + 1 for CLIP).
    scale: logit scale; default Dh ** -0.5.
    kv_valid: bool[..., S] keys the CLS may attend to (default all).
    cls_index: static position of the CLS key in `k`; its column is dropped after the softmax. None keeps every
      column (S = N), e.g. when `k` holds only the patches.

  Returns:
    float32[..., N] with N = S - 1 (or S when cls_index is None).
  """
  lead, _, _, s, _ = _check_qk("cls_attention", q_cls, k, 2)
  _check_mask("cls_attention", "kv_valid", kv_valid, (*lead, s))
  if cls_index is not None and not -s <= cls_index < s:
    raise ValueError(f"cls_attention: cls_index={cls_index} out of range for S={s} keys")
  rows = _attention_rows(q_cls[..., None, :], k, scale=scale, kv_valid=kv_valid, q_positions=None,
                         k_positions=None)[..., 0, :]
  if cls_index is None:
    return rows
  c = cls_index % s
  return jnp.concatenate([rows[..., :c], rows[..., c + 1:]], axis=-1)


def received_attention(q: jax.Array, k: jax.Array, *, scale: float | None = None, block: int = RECEIVED_BLOCK,
                       pool=None) -> jax.Array:
  """The mean attention each token receives in one bidirectional layer: for every key, the mean over heads and over
  all S queries of softmax(q . k * scale) (towers without a CLS token, whose CLS row cannot rate the patches).

  The queries run in blocks of at most `block` rows (`lax.scan`), so memory is float32[..., H, block, S], never the
  S x S map. A block holds whole rows, so each row's softmax is exact within its block; the block sums of the
  probabilities accumulate in float32.

  Args:
    q: float[..., H, S, Dh] the queries of every token of the layer (after its projection; before RoPE if any).
    k: float[..., Hkv, S, Dh] the keys of the same S tokens.
    scale: logit scale; default Dh ** -0.5.
    block: static, the most query rows per block; the blocks are made equal (ceil(S / ceil(S / block)) rows each,
      the padding rows add nothing).
    pool: how the family merges its tokens, applied to the per-key signal: float32[..., S] -> float32[..., M]
      (e.g. the mean of each 2 x 2 merge of consecutive keys, `lambda r: r.reshape(*r.shape[:-1], -1, 4).mean(-1)`;
      a merge over a spatial grid reshapes to (rows / 2, 2, cols / 2, 2) and means over the pairs). None: every key
      is a token.

  Returns:
    float32[..., S] summing to 1 over the keys (each query row sums to 1), or pool's float32[..., M].
  """
  lead, h, hkv, s, dh = _check_qk("received_attention", q, k, 3)
  if _shape(q)[-2] != s:
    raise ValueError(f"received_attention: every token queries: {_shape(q)[-2]} queries for {s} keys")
  if isinstance(block, bool) or not isinstance(block, int) or block < 1:
    raise ValueError(f"received_attention: block must be a positive int, got {block!r}")
  scale = dh ** -0.5 if scale is None else scale
  blocks = -(-s // block)
  rows = -(-s // blocks)
  g = h // hkv
  qg = q.reshape(*lead, hkv, g, s, dh)
  qg = jnp.pad(qg, [(0, 0)] * (qg.ndim - 2) + [(0, blocks * rows - s), (0, 0)])
  qb = jnp.moveaxis(qg.reshape(*lead, hkv, g, blocks, rows, dh), -3, 0)      # [blocks, ..., Hkv, G, rows, Dh]
  real = (jnp.arange(blocks * rows) < s).reshape(blocks, rows, 1)

  def add_block(total, xs):
    qi, ri = xs
    logits = jnp.einsum("...kgcd,...ksd->...kgcs", qi, k, preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST).astype(jnp.float32) * jnp.asarray(scale, jnp.float32)
    probs = jnp.where(ri, jax.nn.softmax(logits, axis=-1), 0.0)
    return total + jnp.sum(probs, axis=(-4, -3, -2)), None

  total, _ = jax.lax.scan(add_block, jnp.zeros((*lead, s), jnp.float32), (qb, real))
  received = total / (h * s)
  return received if pool is None else pool(received)


def last_token_attention(q_last: jax.Array, k: jax.Array, *, visual: jax.Array, scale: float | None = None,
                         kv_valid: jax.Array | None = None, q_position: jax.Array | None = None,
                         k_positions: jax.Array | None = None) -> jax.Array:
  """FastV's signal: attention of the last query row to the visual tokens, mean over heads.

  Args:
    q_last: float[..., H, Dh] the query of the last (valid) token at the layer before pruning (after RoPE).
    k: float[..., Hkv, S, Dh] the keys of the whole sequence at that layer (after RoPE).
    visual: int[..., N] key positions of the visual tokens (distinct).
    scale: logit scale; default Dh ** -0.5.
    kv_valid: bool[..., S] key mask (padding False).
    q_position, k_positions: int[...] and int[..., S], both or neither: causal masking (key j visible when
      k_positions[j] <= q_position). Needed only when keys after the last valid token are not masked otherwise.

  Returns:
    float32[..., N].
  """
  lead, _, _, s, _ = _check_qk("last_token_attention", q_last, k, 2)
  _check_mask("last_token_attention", "kv_valid", kv_valid, (*lead, s))
  _check_positions("last_token_attention", q_position, k_positions, lead, (*lead, s))
  _check_visual("last_token_attention", visual, lead, s)
  rows = _attention_rows(q_last[..., None, :], k, scale=scale, kv_valid=kv_valid,
                         q_positions=None if q_position is None else q_position[..., None], k_positions=k_positions)
  return _gather_keys(rows, visual)[..., 0, :]


def select_raters(scores: jax.Array, text_valid: jax.Array | None = None) -> jax.Array:
  """SparseVLM's dynamic rater set: valid text tokens scoring strictly above the mean over valid text tokens.

  scores: float[..., A], text_valid: bool[..., A] -> bool[..., A]. When no token passes (all scores equal) every
  valid text token is a rater.
  """
  s = scores.astype(jnp.float32)
  valid = jnp.ones(s.shape, dtype=bool) if text_valid is None else text_valid
  mean = jnp.sum(jnp.where(valid, s, 0.0), axis=-1, keepdims=True) / jnp.maximum(
      jnp.sum(valid, axis=-1, keepdims=True), 1)
  raters = valid & (s > mean)
  return jnp.where(jnp.any(raters, axis=-1, keepdims=True), raters, valid)


def text_visual_attention(q_text: jax.Array, k: jax.Array, *, visual: jax.Array, scale: float | None = None,
                          kv_valid: jax.Array | None = None, text_valid: jax.Array | None = None,
                          visual_valid: jax.Array | None = None, q_positions: jax.Array | None = None,
                          k_positions: jax.Array | None = None, name: str = "text_visual_attention") -> jax.Array:
  """The text -> visual block of one layer's attention map, mean over heads: float32[..., A, N].

  Arguments as `text_rater_attention` (without `rater_scores`). The softmax runs over every key the model lets the
  query see, so the rows equal the model's own attention map; invalid text rows and invalid visual columns are 0.
  SparseVLM's rank-based count reads this block (`tops_jax.sparsevlm`); `rater_relevance` averages it over raters.
  """
  lead, _, _, s, _ = _check_qk(name, q_text, k, 3)
  a = _shape(q_text)[-2]
  _check_mask(name, "kv_valid", kv_valid, (*lead, s))
  _check_mask(name, "text_valid", text_valid, (*lead, a))
  _check_positions(name, q_positions, k_positions, (*lead, a), (*lead, s))
  n = _check_visual(name, visual, lead, s)
  _check_mask(name, "visual_valid", visual_valid, (*lead, n))
  rows = _attention_rows(q_text, k, scale=scale, kv_valid=kv_valid, q_positions=q_positions, k_positions=k_positions)
  block = _gather_keys(rows, visual)                                       # float32[..., A, N]
  if text_valid is not None:
    block = jnp.where(text_valid[..., :, None], block, 0.0)
  if visual_valid is not None:
    block = jnp.where(visual_valid[..., None, :], block, 0.0)
  return block


def rater_relevance(block: jax.Array, text_valid: jax.Array | None = None,
                    rater_scores: jax.Array | None = None) -> jax.Array:
  """Mean over the raters of a text -> visual attention block float32[..., A, N] -> float32[..., N]; raters by
  `select_raters` of `rater_scores` (default each text row's attention mass to the visual tokens)."""
  scores = jnp.sum(block, axis=-1) if rater_scores is None else rater_scores
  raters = select_raters(scores, text_valid)
  weight = raters.astype(jnp.float32) / jnp.maximum(jnp.sum(raters, axis=-1, keepdims=True), 1)
  return jnp.einsum("...t,...tn->...n", weight, block, precision=jax.lax.Precision.HIGHEST)


def text_rater_attention(q_text: jax.Array, k: jax.Array, *, visual: jax.Array, scale: float | None = None,
                         kv_valid: jax.Array | None = None, text_valid: jax.Array | None = None,
                         visual_valid: jax.Array | None = None, q_positions: jax.Array | None = None,
                         k_positions: jax.Array | None = None,
                         rater_scores: jax.Array | None = None) -> jax.Array:
  """Stage II relevance: attention of the text raters to the visual tokens, averaged over raters and heads.

  Args:
    q_text: float[..., H, A, Dh] the queries of the text tokens only (after RoPE).
    k: float[..., Hkv, S, Dh] the keys of the whole sequence at the same layer (after RoPE).
    visual: int[..., N] key positions of the visual tokens (distinct).
    scale: logit scale; default Dh ** -0.5.
    kv_valid: bool[..., S] key mask (padding False).
    text_valid: bool[..., A] which text queries are real (padding never rates).
    visual_valid: bool[..., N] which entries of `visual` are real; padded entries get relevance 0 and add nothing
      to the rater scores.
    q_positions, k_positions: int[..., A] and int[..., S], both or neither: causal masking, key j visible to text
      query i when k_positions[j] <= q_positions[i] (the model's own positions, so the softmax denominator is the
      one the model uses).
    rater_scores: float[..., A] scores that choose the raters (e.g. `sparsevlm_rater_scores`); default: each text
      token's attention mass to the visual tokens, mean over heads.

  Returns:
    float32[..., N].
  """
  name = "text_rater_attention"
  block = text_visual_attention(q_text, k, visual=visual, scale=scale, kv_valid=kv_valid, text_valid=text_valid,
                                visual_valid=visual_valid, q_positions=q_positions, k_positions=k_positions,
                                name=name)                              # checks the shapes first
  if rater_scores is not None and _shape(rater_scores) != block.shape[:-1]:
    raise ValueError(f"{name}: rater_scores must have shape {block.shape[:-1]}, got {_shape(rater_scores)}")
  return rater_relevance(block, text_valid, rater_scores)


def sparsevlm_rater_scores(visual: jax.Array, text: jax.Array, *, visual_valid: jax.Array | None = None,
                           text_valid: jax.Array | None = None) -> jax.Array:
  """SparseVLM's text-token scores: softmax over text of visual . text, averaged over visual tokens.

  visual: float[..., N, D], text: float[..., A, D] (the hidden states entering the LLM), masks bool[..., N] /
  bool[..., A] -> float32[..., A]; padded text tokens score 0 and padded visual tokens are left out of the mean.
  """
  vs, ts = _shape(visual), _shape(text)
  if len(vs) < 2 or len(ts) < 2 or vs[:-2] != ts[:-2] or vs[-1] != ts[-1]:
    raise ValueError(f"sparsevlm_rater_scores: need visual float[..., N, D] and text float[..., A, D], got {vs}, {ts}")
  _check_mask("sparsevlm_rater_scores", "visual_valid", visual_valid, vs[:-1])
  _check_mask("sparsevlm_rater_scores", "text_valid", text_valid, ts[:-1])
  logits = jnp.einsum("...nd,...td->...nt", visual, text, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST).astype(jnp.float32)
  tmask = jnp.ones(logits.shape, dtype=bool) if text_valid is None else jnp.broadcast_to(
      text_valid[..., None, :], logits.shape)
  probs = _masked_softmax(logits, tmask)
  if visual_valid is None:
    return jnp.mean(probs, axis=-2)
  w = visual_valid.astype(jnp.float32)
  return jnp.einsum("...n,...nt->...t", w, probs, precision=jax.lax.Precision.HIGHEST) / jnp.maximum(
      jnp.sum(w, axis=-1, keepdims=True), 1.0)


def text_embedding_cosine(visual: jax.Array, text: jax.Array, text_valid: jax.Array | None = None, *,
                          reduce: str = "mean") -> jax.Array:
  """Cosine between each visual token and the text tokens, reduced over valid text tokens.

  visual: float[..., N, D], text: float[..., A, D], text_valid: bool[..., A]; reduce: "mean" or "max" (static).
  Returns float32[..., N]; with no valid text token the result is 0.
  """
  vs, ts = _shape(visual), _shape(text)
  if len(vs) < 2 or len(ts) < 2 or vs[:-2] != ts[:-2] or vs[-1] != ts[-1]:
    raise ValueError(f"text_embedding_cosine: need visual float[..., N, D] and text float[..., A, D], got {vs}, {ts}")
  _check_mask("text_embedding_cosine", "text_valid", text_valid, ts[:-1])
  if reduce not in ("mean", "max"):
    raise ValueError(f"text_embedding_cosine: reduce must be 'mean' or 'max', got {reduce!r}")
  cos = similarity.cosine_similarity(visual, text)                         # float32[..., N, A]
  valid = jnp.ones(ts[:-1], dtype=bool) if text_valid is None else text_valid
  valid = valid[..., None, :]
  if reduce == "mean":
    return jnp.sum(jnp.where(valid, cos, 0.0), axis=-1) / jnp.maximum(jnp.sum(valid, axis=-1), 1)
  best = jnp.max(jnp.where(valid, cos, -jnp.inf), axis=-1)
  return jnp.where(jnp.isfinite(best), best, 0.0)


_CDPRUNER_FLOOR = 1e-6  # the official offset: the least relevant token keeps a nonzero kernel diagonal
_CDPRUNER_TINY = 1e-12  # a span at or below this is a constant row


def clip_text_relevance(image_embeds: jax.Array, text_embeds: jax.Array, valid: jax.Array | None = None, *,
                        normalize: bool = True) -> jax.Array:
  """CDPruner's query relevance of each visual token.

  Args:
    image_embeds: float[..., N, E] CLIP image embeddings of the tokens, `visual_projection(post_layernorm(f))` of
      the vision features f (layer -2, CLS dropped) of every crop of the row's image.
    text_embeds: float[..., E] the question's text direction: the mean over its C text chunks of the unit-norm
      chunk embeddings (`models.clip_text.ClipTextRelevance.encode`). Used as given, NOT renormalised, so that
      -(unit image) . text_embeds equals the official mean over chunks of the negated cosines (one chunk: a unit
      vector, the plain negated cosine).
    valid: bool[..., N] the tokens of the row (default all); min and max are taken over them, the others get 0.
    normalize: False returns the raw negated mean cosine (for a selector that rescales by itself).

  Returns:
    float32[..., N]: (s - min + 1e-6) / (max - min) with s = -cos over the valid tokens (1 where max == min).
  """
  vs, ts = _shape(image_embeds), _shape(text_embeds)
  if len(vs) < 2 or len(ts) < 1 or vs[:-2] != ts[:-1] or vs[-1] != ts[-1]:
    raise ValueError(f"clip_text_relevance: need image_embeds float[..., N, E] and text_embeds float[..., E] with "
                     f"the same leading axes and E, got {vs} and {ts}")
  for label, x in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"clip_text_relevance: {label} must be floating point, got dtype {jnp.result_type(x)}")
  _check_mask("clip_text_relevance", "valid", valid, vs[:-1])
  unit = similarity.l2_normalize(image_embeds)
  score = -jnp.einsum("...ne,...e->...n", unit, text_embeds.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  if not normalize:
    return score if valid is None else jnp.where(valid, score, 0.0)
  return cdpruner_rescale(score, jnp.ones(vs[:-1], bool) if valid is None else valid)


def cdpruner_rescale(x: jax.Array, valid: jax.Array) -> jax.Array:
  """CDPruner's relevance rescaling over each row's valid entries: (x - min + 1e-6) / (max - min), 1 where the row
  is constant (the official code divides by zero), 0 at invalid entries: float[..., N], bool[..., N] -> float32."""
  x = x.astype(jnp.float32)
  lo = jnp.min(jnp.where(valid, x, jnp.inf), axis=-1, keepdims=True)
  hi = jnp.max(jnp.where(valid, x, -jnp.inf), axis=-1, keepdims=True)
  span = hi - lo
  ok = span > _CDPRUNER_TINY
  return jnp.where(valid, jnp.where(ok, (x - lo + _CDPRUNER_FLOOR) / jnp.where(ok, span, 1.0), 1.0), 0.0)
