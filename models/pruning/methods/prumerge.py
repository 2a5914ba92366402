"""PruMerge+: the last CLIP layer's full-width CLS attention keeps target / 2 tokens by attention and target / 2
strided (its fixed-count branch), each merged with its nearest tokens by key, then one extra token for the rest;
LLaVA-1.5 only.

Source: 42Shawn/LLaVA-PruMerge `clip_encoder.py` (`tops_jax.prumerge` reads it). A strided position that is also
a top token is kept twice, as the official concatenation does (`dedup=True`: once, the slot refilled by attention).
`mode="adaptive"`: the released inference path's IQR-adaptive count, the target its static upper bound.
"""

import jax
import jax.numpy as jnp

from models.family import VisualTokens
from models.pruning.methods import base
from models.pruning.modes import Stage1
from models.pruning.outputs import Rows
from tops_jax import prumerge as prumerge_lib

__all__ = ["METHOD", "protocol"]


def protocol(target: int, family: str, num_layers: int, o: dict) -> tuple[Stage1, None]:
  """The fixed branch with the official duplicates (`dedup=False`, named in the config so that rows computed when
  the default was dedup are never reused); `dedup=True`: each token once; `mode="adaptive"` has no duplicates."""
  mode = o.get("mode", "fixed")
  if mode == "adaptive" and "dedup" in o:
    raise ValueError("prumerge_plus: dedup applies to the fixed branch (the adaptive branch filters its samples)")
  params = {"mode": mode} if mode == "adaptive" else {"mode": mode, "dedup": o.get("dedup", False)}
  return Stage1(budget=target, relevance="cls", features="vision", params=dict(params, **o.get("hparams", {}))), None


def _merge_sequence(model, images: VisualTokens, hp) -> tuple[Rows, jax.Array]:
  """PruMerge+'s official output (LLaVA-1.5): the merged kept tokens in its order, then the extra token
  (`tops_jax.prumerge.merge_sequence`), projected. Relevance: the last CLIP layer's full-width CLS attention."""
  if "last_query" not in images.extras:
    raise ValueError("prumerge_plus needs the last vision layer's q/k "
                     "(the family's visual_tokens(extras=('last_qk',)))")
  rel = prumerge_lib.cls_attention(images.extras["last_query"], images.extras["last_keys"])
  keys = images.extras["last_keys"][:, 1:]
  hp = dict(hp)
  keep = hp.pop("keep")
  seq = jax.vmap(lambda f, r, v, k_: prumerge_lib.merge_sequence(f, r, v, keep=keep, keys=k_, **hp))(
      images.features, rel, images.valid & ~images.structural, keys)
  packed = jnp.concatenate([seq.indices, jnp.full(seq.indices.shape[:1] + (1,), -1, jnp.int32)], axis=-1)
  packed = jnp.where(seq.mask & (jnp.arange(keep + 1) < jnp.minimum(seq.count, keep)[:, None]), packed, -1)
  return Rows(embeds=model.project(seq.tokens), valid=seq.mask, packed=packed.astype(jnp.int32)), rel


def _stage1_rows(model, config, images: VisualTokens, key, hp):
  del key
  budget = config.stage1_budget
  rows, rel = _merge_sequence(model, images, dict(hp, keep=budget))
  return rows, rows.packed[:, :budget], rel


METHOD = base.Method(protocol=protocol, overrides=("mode", "dedup", "hparams"),
                     unsupported=("llava_next", "testbed", "qwen2_5_vl"),
                     unsupported_reason={"qwen2_5_vl": "PruMerge+ reads the CLIP CLS token's full-width attention and "
                                                       "its official code runs LLaVA-1.5 only; Qwen2.5-VL's tower has "
                                                       "no CLS token and no port gives a substitute"},
                     tower=lambda config: ("last_qk",),
                     capacity=lambda config, model_config: config.stage1_budget + 1,   # the kept and the extra token
                     stage1_rows=_stage1_rows)
