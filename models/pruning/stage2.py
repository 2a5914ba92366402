"""Stage II: prune the image tokens between decoder layers, scored from the layer's own attention rows.

Reads the decoder through `LlamaModel.query_keys` (post-RoPE queries of the few rows it needs and the keys of the
sequence: never the S x S map) and `norm`. Axes: B batch, S sequence, C candidates, K kept, A text tokens after the
image, Q query rows, H / Hkv query / key-value heads, Dh head width.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from models.pruning import sequence
from models.pruning.config import PruningConfig
from models.pruning.outputs import StageOutput
from tops_jax import prune
from tops_jax import relevance as relevance_lib

__all__ = ["Scores", "score", "rebuild"]


class Scores(NamedTuple):
  """What a Stage II step reads, gathered once at the scoring layer."""
  visual: jax.Array           # int32[B, C] sequence positions of the candidates
  visual_valid: jax.Array     # bool[B, C]
  relevance: jax.Array | None  # float32[B, C]
  text: jax.Array             # int32[B, A] sequence positions of the text after the image
  text_valid: jax.Array       # bool[B, A]
  keys: jax.Array | None      # float[B, S, Hkv * Dh] keys of the scoring layer (DART)


def score(model, config: PruningConfig, plan: sequence.Plan, seq: sequence.Seq, layer: int,
          num_candidates: int) -> Scores:
  """Stage II relevance from the attention rows of `layer` (its input is seq.hidden)."""
  lm = model.language_model
  visual, visual_valid = sequence.first(seq.visual, num_candidates)
  text, text_valid = sequence.text_after_image(seq.mask, seq.visual, plan.text_len)
  source = config.stage2_relevance
  if source == "none" and config.method2 != "dart":
    return Scores(visual, visual_valid, None, text, text_valid, None)
  last = sequence.last_real(seq.mask)[:, None]
  q, k = lm.query_keys(layer, seq.hidden, seq.positions, last if source == "last_token" else text)
  q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)          # [B, H, Q, Dh], [B, Hkv, S, Dh]
  rel = None
  if source == "raters":
    rel = relevance_lib.text_rater_attention(q, k, visual=visual, kv_valid=seq.mask, text_valid=text_valid,
                                             visual_valid=visual_valid, q_positions=sequence.take(seq.positions, text),
                                             k_positions=seq.positions)
  elif source == "last_token":
    rel = relevance_lib.last_token_attention(q[:, :, 0], k, visual=visual, kv_valid=seq.mask,
                                             q_position=sequence.take(seq.positions, last)[:, 0],
                                             k_positions=seq.positions)
    rel = jnp.where(visual_valid, rel, 0.0)
  keys = k.transpose(0, 2, 1, 3).reshape(*k.shape[:1], k.shape[2], -1) if config.method2 == "dart" else None
  return Scores(visual, visual_valid, rel, text, text_valid, keys)


def rebuild(model, config: PruningConfig, plan: sequence.Plan, seq: sequence.Seq, keep: int, scores: Scores, key,
            left, hp: dict[str, Any]):
  """Selects `keep` candidates from the hidden states entering the pruning layer -> (sequence, index, StageOutput)."""
  feats = sequence.take(seq.hidden, scores.visual)
  hp = dict(hp)
  if config.method2 == "dart":
    norm = model.language_model.norm
    feats = norm(feats)
    hp.setdefault("keys", sequence.take(scores.keys, scores.visual))
    hp.setdefault("text_features", norm(sequence.take(seq.hidden, scores.text)))
    hp.setdefault("text_keys", sequence.take(scores.keys, scores.text))
    hp.setdefault("text_valid", scores.text_valid)
  kept = prune.select(config.method2, feats, keep=keep, relevance=scores.relevance, valid=scores.visual_valid,
                      key=key, **hp)
  kept_at = jnp.take_along_axis(scores.visual, kept, axis=-1)
  rows = jnp.arange(kept.shape[0])[:, None]
  chosen = jnp.zeros(seq.mask.shape, bool).at[rows, kept_at].set(True)
  index, mask = sequence.compact(seq.mask & (~seq.visual | chosen), plan.text_len + keep, left)
  stage = StageOutput(candidates=jnp.where(scores.visual_valid, sequence.take(seq.packed, scores.visual), -1),
                      kept=sequence.take(seq.packed, kept_at), relevance=scores.relevance)
  return sequence.gather_seq(seq, index, mask, config.positions), index, stage
