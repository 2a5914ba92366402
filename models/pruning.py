"""Visual token pruning inside the LLaVA-1.5 / LLaVA-NeXT ports, driven by a `PruningConfig`, through the models'
public seams (encode_images -> project -> [pack] -> Stage I -> embed -> run_layers segments -> Stage II -> head).

Axes: B batch (one image per row), S sequence, N packed image slots per image (LLaVA-1.5: the patches; NeXT: the
anyres packing bucket incl. newline and padding slots), P crops, T tokens per crop, K kept, C candidates, D text
width, Dv vision width, H / Hkv query / key heads, Dh head width, L decoder layers, G layer segments (one more than
the Stage II steps), V vocabulary, M new tokens.

    cfg = pruning.tops_schedule(num_layers=32, target=128)             # 576 -> 256 | L12: -> 128 | L24: -> 32
    out = pruning.forward(model, cfg, input_ids, attention_mask, pixel_values, image_sizes)
    out.logits                        # float32[B, S', V] over the final (shortest) sequence
    out.stage1.kept, out.stage2[0].kept   # int32[B, K] packed image positions kept by each stage
    out.tokens_per_layer              # int32[B, L] real tokens each layer processed (FLOPs, "mean kept tokens")
    gen = pruning.greedy(model, cfg, input_ids, attention_mask, pixel_values=px, max_new_tokens=32)

Stage I (after the projector, before the merge). Candidates are the image tokens of each image (NeXT: the packed
tokens, newline slots excluded). What each method reads:
- every method except visionzip: features = projector outputs (`model.project`), float[B, N, D];
- visionzip: features = the vision feature-layer hidden states (pre-projector, Dv) and `keys` = that layer's
  attention keys of the same encoder layer whose CLS attention is the relevance (mean over heads, VisionZip's
  `metric`); the merged tokens are then projected. Needs a single `vision_feature_layer` and the "default" strategy;
- trimtokenator: also `text` = the LLM input embeddings of the text after the image, with `text_valid`;
- relevance "cls": the CLS -> patch attention of the layer producing the features (`VisionOutput.cls_attention`);
  "text": `tops_jax.relevance.text_embedding_cosine` between the projector outputs and the LLM input embeddings of
  the text after the image (the port has no CLIP text tower, so this stands in for CDPruner's CLIP text-image
  similarity); "none": no relevance.
Selection is `prune.select` (merging methods: `prune.merge`, the merged tokens replace the kept rows), batched over
the images with per-row `valid`. Kept rows stay in ascending (spatial / packing) order. input_ids and the mask are
rebuilt so that each image's <image> run holds exactly its kept tokens; the static budget gives static shapes.
Stage I always re-indexes positions from 0 (`cumsum(mask) - 1`): the LLM sees the pruned prompt as its input.

LLaVA-NeXT choices:
- Newlines (`newlines`): never candidates, never counted in the budget. "drop" (default) removes every
  `image_newline` token, so the image run has exactly K tokens; "rows" keeps the newline of every grid row that
  keeps at least one token; "keep" keeps them all (with K = every token this is the unpruned sequence).
- Scope (`stage1_scope`): "global" selects K among all packed tokens of the image (DivPrune, TOPS); "per_crop"
  splits K evenly over the image's valid crops (base crop first takes the remainder) capped by what each crop still
  holds after unpadding (water-filling: a crop that has fewer tokens than its share keeps them all and the rest is
  spread over the others), then selects within each crop (VisionZip, CDPruner style). The shares are data dependent,
  so each crop is ranked with the method's greedy order and its share taken from the front: per_crop accepts only
  methods whose first k picks do not depend on the budget (`PER_CROP_METHODS`).
- The CLS token is never kept (LLaVA's "default" strategy drops it); budgets count patch tokens only. VisionZip's
  official 64-token LLaVA-1.5 setting keeps CLS + 53 + 10; here 64 means 54 dominant + 10 contextual patches.

Stage II (inside the LLM, at `stage2` layers l, each with a static budget). Run layers [0, l); the candidates are
every token at an <image> position of the current sequence (after Stage I: the kept tokens; NeXT without Stage I:
newline tokens included). Relevance:
- "raters" (TOPS, SparseVLM): `relevance.text_rater_attention` at layer l, with the queries of the real text tokens
  after the image and the keys of the whole sequence, post-RoPE, causal and padding masked (the rows of the
  layer's own attention map, never the S x S map);
- "last_token" (FastV): `relevance.last_token_attention` of the last real token at layer l - 1, as FastV scores
  at layer K - 1 and prunes before layer K;
- "none" (DivPrune/DART/random in the LLM).
Features are the hidden states entering layer l of the candidates; DART reads the final-norm hidden states as
features, the layer l - 1 keys (post-RoPE, heads concatenated) as `keys`, and the same for the text after the image
as `text_features` / `text_keys`. The sequence is rebuilt [prefix; kept visual; suffix] per row, the mask rebuilt
and positions either re-indexed from 0 ("contiguous", TOPS) or kept ("original", FastV); left/right padding is
preserved (right when some row ends in padding, else left).

Static lengths. Every sequence after a stage has `text_len + budget` slots (NeXT "rows"/"keep": plus the most
newlines an image has), where `text_len` is the largest number of real non-image tokens in a row. `forward` and
`greedy` read it from concrete inputs (exact); under an outer jit it is bounded from the shapes (S - N for
LLaVA-1.5, S - T for NeXT), or pass `text_len=`. The jitted programs are cached per (config, shapes, text_len):
pass a bucketed `text_len` to share one compile across batches whose prompts differ.

Generation (`greedy`): the prefill runs the pruned schedule and writes each layer's kept sequence into the KV cache
from slot 0 (so layers after a pruning point hold shorter caches; `llama.KVCache.end` is per layer). Decoding runs
the G layer segments one after the other; the new token of step t sits at position last_g + 1 + t in segment g,
where last_g is the position of the row's last real token in that segment (contiguous: segment length - 1;
original: the original last position). Decoding is exact for the kept sequences.

Limits: one image per row (I = B); the attention relevance does not model a sliding window, so Stage II attention
relevance rejects models that have one.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models import checks
from models import clip
from models import llama
from models import llava_next
from tops_jax import prune
from tops_jax import relevance as relevance_lib

__all__ = ["PruningConfig", "tops_schedule", "tops_layers", "PER_CROP_METHODS", "StageOutput", "Segment", "PruneOutput",
           "PrunedGeneration", "forward", "greedy", "decode_step", "crop_quotas", "row_newlines", "text_length"]

STAGE1_RELEVANCE = ("cls", "text", "none")
STAGE2_RELEVANCE = ("raters", "last_token", "none")
SCOPES = ("global", "per_crop")
POSITIONS = ("contiguous", "original")
NEWLINES = ("drop", "rows", "keep")
# Methods whose first k greedy picks are the same for every budget >= k (per-crop shares are data dependent).
PER_CROP_METHODS = ("tops", "fastv", "divprune", "cdpruner", "scope", "random")

# TOPS Stage II (alpha, lambda) from the paper, by (family, decoder layers) and then target T.
_TOPS_STAGE2 = {
    ("llava-1.5", 32): {128: (0.5, 0.5), 64: (0.5, 1.0), 32: (0.5, 1.0)},
    ("llava-1.5", 40): {128: (0.5, 0.4), 64: (0.5, 0.4), 32: (0.5, 0.4)},
    ("llava-next", 32): {640: (0.5, 0.5), 320: (0.5, 0.4), 160: (0.5, 0.5)},
    ("llava-next", 40): {640: (0.5, 0.5), 320: (0.5, 0.5), 160: (0.5, 0.5)},
}


def _hparams(name: str, value) -> tuple[tuple[str, Any], ...]:
  """A dict or (name, value) pairs -> sorted hashable pairs."""
  try:
    items = list(dict(value).items())
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a dict or (name, value) pairs, got {value!r}") from None
  out = []
  for k, v in items:
    if isinstance(v, list):
      v = tuple(v)
    if hasattr(v, "shape"):
      raise ValueError(f"{name}: hyperparameter {k} is an array; the config is static (hashable), pass Python values")
    out.append((str(k), v))
  return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class PruningConfig:
  """What to prune, where and how (hashable: a static argument of the jitted forward).

  method: a `tops_jax.prune` method name (Stage I, and Stage II unless `stage2_method`).
  stage1_budget: visual tokens kept per image before the LLM, or None (no Stage I).
  stage1_scope: LLaVA-NeXT "global" | "per_crop" (see the module docstring); LLaVA-1.5 has one crop.
  stage1_relevance: "cls" | "text" | "none".
  stage1_hparams: keyword arguments of the method (dict or pairs), e.g. {"alpha": 0.5, "lam": 0.5}.
  newlines: LLaVA-NeXT Stage I newline policy "drop" | "rows" | "keep".
  stage2: ((layer, keep), ...) pruning steps inside the LLM: layers increasing in [1, L), budgets non-increasing.
  stage2_method: method of Stage II (default `method`).
  stage2_relevance: "raters" | "last_token" | "none".
  stage2_hparams: keyword arguments of the Stage II method (shared by the steps).
  positions: position ids after Stage II: "contiguous" (re-indexed from 0) | "original".
  """
  method: str
  stage1_budget: int | None = None
  stage1_scope: str = "global"
  stage1_relevance: str = "cls"
  stage1_hparams: Any = ()
  newlines: str = "drop"
  stage2: tuple[tuple[int, int], ...] = ()
  stage2_method: str | None = None
  stage2_relevance: str = "raters"
  stage2_hparams: Any = ()
  positions: str = "contiguous"

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_("stage1_hparams", _hparams("stage1_hparams", self.stage1_hparams))
    set_("stage2_hparams", _hparams("stage2_hparams", self.stage2_hparams))
    try:
      set_("stage2", tuple((int(layer), int(keep)) for layer, keep in self.stage2))
    except (TypeError, ValueError):
      raise ValueError(f"stage2 must be a sequence of (layer, keep) pairs, got {self.stage2!r}") from None
    for name, value, allowed in (("stage1_scope", self.stage1_scope, SCOPES),
                                 ("stage1_relevance", self.stage1_relevance, STAGE1_RELEVANCE),
                                 ("stage2_relevance", self.stage2_relevance, STAGE2_RELEVANCE),
                                 ("positions", self.positions, POSITIONS), ("newlines", self.newlines, NEWLINES)):
      if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    for name, method in (("method", self.method), ("stage2_method", self.stage2_method)):
      if method is not None and method not in prune.METHODS:
        raise ValueError(f"unknown {name} {method!r}; known methods: {', '.join(prune.METHODS)}")
    budget = self.stage1_budget
    # Hyperparameters are checked here, where the config is built (a NaN alpha from a flag would otherwise reach
    # the jitted forward as a traced value that nothing can reject).
    if budget is not None:
      prune.check_hparams(self.method, want="merge" if prune.METHODS[self.method].merge else "order",
                          **dict(self.stage1_hparams))
    if self.stage2:
      prune.check_hparams(self.stage2_method or self.method, **dict(self.stage2_hparams))
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
      raise ValueError(f"stage1_budget must be a positive int or None, got {budget!r}")
    if budget is not None:
      if prune.needs_relevance(self.method, **dict(self.stage1_hparams)) and self.stage1_relevance == "none":
        raise ValueError(f"{self.method} needs a relevance vector; stage1_relevance is 'none'")
      if self.stage1_scope == "per_crop" and self.method not in PER_CROP_METHODS:
        raise ValueError(f"stage1_scope='per_crop' needs a method whose greedy order does not depend on the budget "
                         f"({', '.join(PER_CROP_METHODS)}); {self.method} is not one")
    previous = None if self.newlines == "keep" else budget    # kept newlines add to Stage II's candidates
    for i, (layer, keep) in enumerate(self.stage2):
      if layer < 1:
        raise ValueError(f"stage2 step {i}: layer {layer} must be >= 1 (prune between decoder layers)")
      if i and layer <= self.stage2[i - 1][0]:
        raise ValueError(f"stage2 layers must increase, got {[s[0] for s in self.stage2]}")
      if keep < 1:
        raise ValueError(f"stage2 step {i}: keep must be >= 1, got {keep}")
      if previous is not None and keep > previous:
        raise ValueError(f"stage2 step {i} keeps {keep} tokens, more than the {previous} it receives "
                         "(budgets must not increase)")
      previous = keep
    if self.stage2:
      m2 = self.stage2_method or self.method
      if prune.METHODS[m2].merge is not None:
        raise ValueError(f"{m2} merges tokens; merging methods run in Stage I only")
      if prune.needs_relevance(m2, **dict(self.stage2_hparams)) and self.stage2_relevance == "none":
        raise ValueError(f"{m2} needs a relevance vector; stage2_relevance is 'none'")

  @property
  def method2(self) -> str:
    return self.stage2_method or self.method

  def segments(self, num_layers: int) -> tuple[tuple[int, int], ...]:
    """The G layer segments [start, stop) between the Stage II pruning points."""
    bounds = (0,) + tuple(layer for layer, _ in self.stage2) + (num_layers,)
    return tuple(zip(bounds[:-1], bounds[1:]))

  def score_layer(self, layer: int) -> int:
    """The decoder layer whose attention (or keys) scores a Stage II step at `layer`."""
    return layer - 1 if self.stage2_relevance == "last_token" or self.method2 == "dart" else layer

  def check_model(self, model):
    """Raises ValueError when the schedule does not fit `model` (a LLaVA or LLaVA-NeXT port)."""
    text = model.config.text
    num_layers = text.num_hidden_layers
    for layer, _ in self.stage2:
      if layer >= num_layers:
        raise ValueError(f"stage2 layer {layer} is out of range for a decoder with {num_layers} layers "
                         f"(pruning layers lie in [1, {num_layers}))")
    if self.stage1_budget is not None and not _is_next(model):
      n = model.config.vision.num_patches
      if self.stage1_budget > n:
        raise ValueError(f"stage1_budget={self.stage1_budget} exceeds the {n} visual tokens per image")
    if self.stage2 and not self.stage1_budget and not _is_next(model):
      if self.stage2[0][1] > model.config.vision.num_patches:
        raise ValueError(f"stage2 keeps {self.stage2[0][1]} tokens, more than the "
                         f"{model.config.vision.num_patches} visual tokens per image")
    if self.stage1_budget is not None and self.method == "visionzip":
      c = model.config
      if not isinstance(c.vision_feature_layer, int) or c.vision_feature_select_strategy != "default":
        raise ValueError("visionzip needs a single int vision_feature_layer and the 'default' strategy")
    if self.stage2 and self.stage2_relevance != "none" and text.sliding_window is not None:
      raise ValueError("Stage II attention relevance ignores sliding windows; this model has sliding_window="
                       f"{text.sliding_window}")


def tops_layers(num_layers: int) -> tuple[int, int]:
  """TOPS' two Stage II layers for an L-layer decoder: round(12/32 L) and round(24/32 L) (the paper's 12 and 24 of
  32). Raises ValueError when they are not distinct layers inside (0, L)."""
  l1, l2 = round(num_layers * 12 / 32), round(num_layers * 24 / 32)
  if not 1 <= l1 < l2 < num_layers:
    raise ValueError(f"a decoder of {num_layers} layers is too shallow for the TOPS schedule (layers {l1}, {l2})")
  return l1, l2


def tops_schedule(num_layers: int, target: int, *, family: str = "llava-1.5", stage1_alpha: float = 0.5,
                  stage1_lam: float = 0.5, stage2_alpha: float | None = None, stage2_lam: float | None = None,
                  stage1_scope: str = "global", newlines: str = "drop") -> PruningConfig:
  """The TOPS schedule for target T: Stage I N -> 2T, layer round(12/32 L): -> T, layer round(24/32 L): -> T // 4.

  Stage I uses (alpha, lambda) = (0.5, 0.5) and CLS relevance; Stage II the paper's per-model values (LLaVA-1.5-7B:
  (0.5, 0.5) at T=128, (0.5, 1.0) at 64 and 32; 13B (0.5, 0.4); NeXT-7B (0.5, 0.5) / (0.5, 0.4) / (0.5, 0.5) at
  640 / 320 / 160; NeXT-13B (0.5, 0.5)) with text-rater relevance and contiguous positions. Other models and
  targets need `stage2_alpha` and `stage2_lam`.
  """
  if not isinstance(target, int) or target < 4:
    raise ValueError(f"target T must be an int >= 4 (the last Stage II step keeps T // 4), got {target!r}")
  l1, l2 = tops_layers(num_layers)
  paper = _TOPS_STAGE2.get((family, num_layers), {}).get(target)
  if stage2_alpha is None or stage2_lam is None:
    if paper is None:
      raise ValueError(f"no paper Stage II setting for family={family!r}, {num_layers} layers, T={target}; "
                       "pass stage2_alpha and stage2_lam")
    stage2_alpha = paper[0] if stage2_alpha is None else stage2_alpha
    stage2_lam = paper[1] if stage2_lam is None else stage2_lam
  return PruningConfig(method="tops", stage1_budget=2 * target, stage1_scope=stage1_scope, stage1_relevance="cls",
                       stage1_hparams={"alpha": float(stage1_alpha), "lam": float(stage1_lam)}, newlines=newlines,
                       stage2=((l1, target), (l2, target // 4)), stage2_relevance="raters",
                       stage2_hparams={"alpha": float(stage2_alpha), "lam": float(stage2_lam)}, positions="contiguous")


class StageOutput(NamedTuple):
  """One pruning step. Packed positions index the image's tokens (LLaVA-1.5: patch index; NeXT: packing slot).

  candidates: int32[B, C] packed position of each candidate (-1: none), the order `relevance` follows.
  kept: int32[B, K] packed positions kept, ascending.
  relevance: float32[B, C] the relevance the method read, or None.
  """
  candidates: jax.Array
  kept: jax.Array
  relevance: jax.Array | None


class Segment(NamedTuple):
  """The sequence one layer segment ran on.

  index: int32[B, S_g] row of the previous segment's sequence each slot came from (segment 0: of input_ids); -1 pad.
  source: int32[B, S_g] position in input_ids (-1: padding).
  positions: int32[B, S_g] RoPE position ids.
  mask: bool[B, S_g] real tokens.
  visual: bool[B, S_g] tokens at <image> positions.
  """
  index: jax.Array
  source: jax.Array
  positions: jax.Array
  mask: jax.Array
  visual: jax.Array


class PruneOutput(NamedTuple):
  """logits: float32[B, S_G, V] over the last segment's sequence (`greedy`: float32[B, 1, V] of the last token).
  stage1: StageOutput | None; stage2: one StageOutput per Stage II step; segments: G Segments.
  inputs_embeds: float[B, S_0, D] decoder input (after Stage I).
  tokens_per_layer / visual_per_layer: int32[B, L] real (visual) tokens each decoder layer processed.
  last_positions: int32[B, G] position of each row's last real token per segment (decoding continues from +1).
  cache: the prefill `llama.KVCache`, or None.
  """
  logits: jax.Array
  stage1: StageOutput | None
  stage2: tuple[StageOutput, ...]
  segments: tuple[Segment, ...]
  inputs_embeds: jax.Array
  tokens_per_layer: jax.Array
  visual_per_layer: jax.Array
  last_positions: jax.Array
  cache: Any = None


class PrunedGeneration(NamedTuple):
  tokens: jax.Array       # int32[B, M]
  num_tokens: jax.Array   # int32[B]
  prefill: PruneOutput    # logits of the last prompt token only: float32[B, 1, V]


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static lengths of a batch (see "Static lengths" in the module docstring)."""
  text_len: int        # most real non-image tokens in a row
  visual: int          # most image tokens in a row before pruning
  newlines: int        # most newline tokens an image keeps in Stage I ("rows"/"keep"), else 0


class _Seq(NamedTuple):
  hidden: jax.Array     # float[B, S, D]
  positions: jax.Array  # int32[B, S]
  mask: jax.Array       # bool[B, S]
  visual: jax.Array     # bool[B, S]
  source: jax.Array     # int32[B, S]
  packed: jax.Array     # int32[B, S] packed position of visual tokens, -1 otherwise


def _is_next(model) -> bool:
  return isinstance(model, llava_next.LlavaNextForConditionalGeneration)


def _concrete(*xs) -> bool:
  return all(x is not None and not isinstance(x, jax.core.Tracer) for x in xs)


# ----------------------------------------------------------------------------------------------- row bookkeeping


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
  """Rows of x: float/int[B, S, ...] at int[B, R] (clipped) -> [B, R, ...]."""
  idx = jnp.clip(idx, 0, x.shape[1] - 1)
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _first(flag: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """The first `size` positions where flag is True, in order: (int32[B, size], bool[B, size] real entries)."""
  if size > flag.shape[1]:
    flag = jnp.pad(flag, ((0, 0), (0, size - flag.shape[1])))
  idx = jnp.argsort(~flag, axis=-1, stable=True)[:, :size].astype(jnp.int32)
  return idx, jnp.take_along_axis(flag, idx, axis=-1)


def _compact(keep: jax.Array, size: int, left: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Gather map that packs each row's kept positions, in order, into `size` slots.

  keep: bool[B, S]; left: bool[] left padding (kept rows end at the last slot) or right padding.
  Returns (index int32[B, size] with -1 for padding slots, mask bool[B, size]).
  """
  idx, _ = _first(keep, size)
  count = jnp.sum(keep, axis=-1, dtype=jnp.int32)
  slot = jnp.arange(size)[None, :] - jnp.where(left, size - count, 0)[:, None]
  valid = (slot >= 0) & (slot < count[:, None])
  index = jnp.take_along_axis(idx, jnp.clip(slot, 0, size - 1), axis=-1)
  return jnp.where(valid, index, -1), valid


def _gather_seq(seq: _Seq, index: jax.Array, mask: jax.Array, positions: str) -> _Seq:
  """The rows of `seq` at index int32[B, S'] (-1 padding) with mask bool[B, S']; positions re-indexed or kept."""
  pick = lambda x, fill: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 2)), _take(x, index), fill)
  pos = llama.position_ids_from_mask(mask) if positions == "contiguous" else pick(seq.positions, 1)
  return _Seq(hidden=pick(seq.hidden, 0), positions=pos, mask=mask, visual=pick(seq.visual, False),
              source=pick(seq.source, -1), packed=pick(seq.packed, -1))


def _last_real(mask: jax.Array) -> jax.Array:
  """Index of each row's last real slot: bool[B, S] -> int32[B]."""
  return (mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=-1)).astype(jnp.int32)


def _text_after_image(mask: jax.Array, visual: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """Positions of the real text tokens after each row's image: (int32[B, size], bool[B, size])."""
  s = mask.shape[1]
  last_visual = jnp.max(jnp.where(visual, jnp.arange(s), -1), axis=-1)
  return _first(mask & ~visual & (jnp.arange(s)[None, :] > last_visual[:, None]), size)


def text_length(input_ids, attention_mask, image_token_id: int) -> int:
  """The most real non-image tokens in a row (host numpy): the static `text_len` of a batch."""
  ids = np.asarray(input_ids)
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  return int(np.max(np.sum(mask & (ids != image_token_id), axis=-1)))


# ------------------------------------------------------------------------------------------------------- Stage I


def crop_quotas(capacity: jax.Array, budget: int) -> jax.Array:
  """Splits `budget` evenly over crops, capped by capacity (water-filling): int[B, P] -> int32[B, P].

  Every crop gets min(capacity, level) for the largest level whose total fits the budget; the remainder goes one
  token each to the first crops (in crop order) that still have room. The quotas sum to `budget` whenever the
  capacities allow it.
  """
  capacity = capacity.astype(jnp.int32)
  levels = jnp.arange(budget + 1, dtype=jnp.int32)                              # a quota never exceeds the budget
  filled = jnp.sum(jnp.minimum(capacity[:, None, :], levels[None, :, None]), axis=-1)    # [B, levels]
  level = jnp.sum(filled <= budget, axis=-1, dtype=jnp.int32) - 1
  base = jnp.minimum(capacity, level[:, None])
  room = capacity > level[:, None]
  extra = room & (jnp.cumsum(room, axis=-1) <= (budget - jnp.sum(base, axis=-1))[:, None])
  return base + extra.astype(jnp.int32)


def row_newlines(selected: jax.Array, newline: jax.Array, crop: jax.Array) -> jax.Array:
  """Newline slots to keep under newlines="rows": those ending a grid row that keeps at least one token.

  selected: bool[B, N] kept packed tokens; newline: bool[B, N]; crop: int32[B, N] (0 base crop, > 0 grid, -1
  newline/padding). Returns bool[B, N].
  """
  count = jnp.cumsum(selected, axis=-1, dtype=jnp.int32)
  # A row starts after the previous newline, or after the last base-crop token for the first row.
  base_end = (crop == 0) & (jnp.pad(crop, ((0, 0), (0, 1)), constant_values=-1)[:, 1:] != 0)
  marks = jnp.where(newline | base_end, count, 0)
  before = jax.lax.cummax(jnp.pad(marks, ((0, 0), (1, 0)))[:, :-1], axis=1)
  return newline & (count > before)


class _Images(NamedTuple):
  """Image tokens of the batch in packed order (LLaVA-1.5: N = patches, one crop)."""
  embeds: jax.Array            # float[B, N, D] projector outputs (NeXT: newline slots hold image_newline)
  valid: jax.Array             # bool[B, N] real slots (image or newline)
  newline: jax.Array           # bool[B, N]
  crop: jax.Array              # int32[B, N] crop of each slot (-1 newline/padding)
  cls: jax.Array | None        # float32[B, N] CLS attention (0 at newline/padding)
  features: jax.Array | None   # float[B, N, Dv] vision features (visionzip)
  keys: jax.Array | None       # float[B, N, Dv] vision keys, mean over heads (visionzip)
  per_crop: Any = None         # NeXT per_crop: (embeds float[B, P, T, D], cls float32[B, P, T] | None, source)


def _vision_with_keys(model, pixel_values):
  """One tower pass -> (features float[I, T, Dv], CLS attention float32[I, T], keys float[I, T, Dv]) of the
  feature layer (single int, "default" strategy): VisionZip's inputs."""
  tower = model.vision_tower
  c = tower.config
  at = clip.resolve_hidden_state_index(model.config.vision_feature_layer, c.num_hidden_layers) - 1
  x = tower.hidden_state(pixel_values, at)                  # input of the encoder layer producing the features
  layer = tower.encoder.layer(at)
  k = layer.self_attn.k_proj(layer.layer_norm1(x))
  keys = k.reshape(*k.shape[:-1], c.num_attention_heads, c.head_dim).mean(axis=-2)
  return layer(x)[:, 1:], layer.cls_attention(x)[:, 1:], keys[:, 1:]


def _vision(model, pixel_values, *, cls: bool, keys: bool):
  """(features, CLS attention | None, keys | None) per image (LLaVA-1.5) or per crop (NeXT, [I, P, T, ...])."""
  lead = pixel_values.shape[:-3]
  if not keys:
    vis = model.encode_images(pixel_values, cls_attention=cls)
    return vis.features, vis.cls_attention, None
  out = _vision_with_keys(model, pixel_values.reshape(-1, *pixel_values.shape[-3:]))
  return tuple(a.reshape(*lead, *a.shape[1:]) for a in out)


def _images(model, config: PruningConfig, pixel_values, layout, stage1: bool) -> _Images:
  zip_ = stage1 and config.method == "visionzip"
  feats, cls, keys = _vision(model, pixel_values, cls=stage1 and config.stage1_relevance == "cls", keys=zip_)
  img = model.project(feats)
  if not _is_next(model):
    full = jnp.ones(img.shape[:2], bool)
    return _Images(embeds=img, valid=full, newline=~full, crop=jnp.zeros(img.shape[:2], jnp.int32), cls=cls,
                   features=feats if zip_ else None, keys=keys)
  pack = lambda a: model.pack(a, layout, jnp.zeros(a.shape[-1:], a.dtype))
  per_crop = (img, cls, jnp.asarray(layout.source)) if stage1 and config.stage1_scope == "per_crop" else None
  return _Images(embeds=model.pack(img, layout), valid=jnp.asarray(layout.valid), newline=jnp.asarray(layout.newline),
                 crop=jnp.asarray(layout.crop), cls=None if cls is None else pack(cls[..., None])[..., 0],
                 features=pack(feats) if zip_ else None, keys=pack(keys) if zip_ else None, per_crop=per_crop)


def _select_per_crop(config: PruningConfig, images: _Images, text, text_valid, key, hp):
  """NeXT per-crop selection -> (selected bool[B, N] packed slots, relevance float32[B, N] | None)."""
  img, cls, source = images.per_crop
  b, p, t, d = img.shape
  budget = config.stage1_budget
  candidate = images.valid & ~images.newline
  slot = jnp.where(candidate, source, p * t)
  token_valid = jnp.zeros((b, p * t), bool).at[jnp.arange(b)[:, None], slot].set(True, mode="drop")
  token_valid = token_valid.reshape(b * p, t)
  feats = img.reshape(b * p, t, d)
  rel = None
  if config.stage1_relevance == "cls":
    rel = cls.reshape(b * p, t)
  elif config.stage1_relevance == "text":
    rel = relevance_lib.text_embedding_cosine(feats, jnp.repeat(text, p, axis=0), jnp.repeat(text_valid, p, axis=0))
  quota = crop_quotas(jnp.sum(token_valid, axis=-1).reshape(b, p), budget).reshape(b * p, 1)
  order = prune.select_order(config.method, feats, keep=min(t, budget), relevance=rel, valid=token_valid, key=key,
                             **hp)
  rank = jnp.full((b * p, t), t, jnp.int32).at[jnp.arange(b * p)[:, None], order].set(
      jnp.arange(order.shape[1], dtype=jnp.int32))
  chosen = ((rank < quota) & token_valid).reshape(b, p * t, 1)
  from_crop = lambda x: _take(x, jnp.maximum(source, 0))[..., 0]
  selected = from_crop(chosen) & candidate
  packed_rel = None if rel is None else jnp.where(candidate, from_crop(rel.reshape(b, p * t, 1)), 0.0)
  return selected, packed_rel


def _select_stage1(model, config: PruningConfig, images: _Images, text, text_valid, key):
  """-> (selected bool[B, N], kept int32[B, K], embeds float[B, N, D] with merged rows, relevance | None)."""
  budget = config.stage1_budget
  hp = dict(config.stage1_hparams)
  if config.method == "trimtokenator":
    hp.setdefault("text", text)
    hp.setdefault("text_valid", text_valid)
  candidate = images.valid & ~images.newline
  embeds = images.embeds
  if images.per_crop is not None:
    selected, rel = _select_per_crop(config, images, text, text_valid, key, hp)
    kept, _ = _first(selected, budget)
    return selected, kept, embeds, rel
  rel = None
  if config.stage1_relevance == "cls":
    rel = images.cls
  elif config.stage1_relevance == "text":
    rel = relevance_lib.text_embedding_cosine(embeds, text, text_valid)
  rows = jnp.arange(embeds.shape[0])[:, None]
  if config.method == "visionzip":            # merged in the vision space, then projected
    hp.setdefault("keys", images.keys)
    tokens, kept = prune.merge("visionzip", images.features, keep=budget, relevance=rel, valid=candidate, key=key,
                               **hp)
    embeds = embeds.at[rows, kept].set(model.project(tokens))
  elif prune.METHODS[config.method].merge is not None:
    tokens, kept = prune.merge(config.method, embeds, keep=budget, relevance=rel, valid=candidate, key=key, **hp)
    embeds = embeds.at[rows, kept].set(tokens)
  else:
    kept = prune.select(config.method, embeds, keep=budget, relevance=rel, valid=candidate, key=key, **hp)
  selected = jnp.zeros(candidate.shape, bool).at[rows, kept].set(True)
  return selected, kept, embeds, rel


def _embed(model, ids, rows, rows_valid):
  """Decoder input: text embeddings with image rows float[B, R, D] (valid bool[B, R], a prefix) merged in."""
  if _is_next(model):
    return model.embed(ids, rows, rows_valid)
  return model.embed(ids, rows)


def _stage1(model, config: PruningConfig, plan: _Plan, ids, mask, images: _Images, key, left):
  """Stage I -> (sequence entering layer 0, StageOutput)."""
  budget = config.stage1_budget
  image_id = model.config.image_token_id
  is_image = (ids == image_id) & mask
  text_idx, text_valid = _text_after_image(mask, is_image, plan.text_len)
  text = _take(model.language_model.embed(ids), text_idx)
  selected, kept, embeds, rel = _select_stage1(model, config, images, text, text_valid, key)
  if config.newlines == "keep":
    selected = selected | images.newline
  elif config.newlines == "rows":
    selected = selected | row_newlines(selected, images.newline, images.crop)
  rows, rows_valid = _first(selected, budget + plan.newlines)

  packed = jnp.where(is_image, jnp.cumsum(is_image, axis=-1, dtype=jnp.int32) - 1, -1)
  keep = mask & (~is_image | _take(selected[..., None], jnp.maximum(packed, 0))[..., 0])
  index, new_mask = _compact(keep, plan.text_len + budget + plan.newlines, left)
  new_ids = jnp.where(new_mask, _take(ids, index), 0 if image_id else 1)
  seq = _Seq(hidden=_embed(model, new_ids, _take(embeds, rows), rows_valid),
             positions=llama.position_ids_from_mask(new_mask), mask=new_mask, visual=new_ids == image_id,
             source=index, packed=jnp.where(new_mask, _take(packed, index), -1))
  candidate = images.valid & ~images.newline
  candidates = jnp.where(candidate, jnp.arange(candidate.shape[1], dtype=jnp.int32), -1)
  return seq, StageOutput(candidates=candidates, kept=kept.astype(jnp.int32), relevance=rel)


# ------------------------------------------------------------------------------------------------------ Stage II


def _layer_qk(lm: llama.LlamaModel, layer: int, hidden, positions, rows):
  """Post-RoPE queries of `rows` and keys of every token at decoder `layer`, from the layer's input.

  hidden float[B, S, D], positions int32[B, S], rows int32[B, R] -> (q float[B, H, R, Dh], k float[B, Hkv, S, Dh]).
  """
  c = lm.config
  block = lm.layer(layer)
  b, s, _ = hidden.shape
  normed = block.input_layernorm(hidden)
  cos, sin = llama.rope_cos_sin(c, positions, hidden.dtype)
  k = block.self_attn.k_proj(normed).reshape(b, s, c.num_key_value_heads, c.head_dim)
  q = block.self_attn.q_proj(_take(normed, rows)).reshape(b, rows.shape[1], c.num_attention_heads, c.head_dim)
  q = llama.apply_rope(q, _take(cos, rows), _take(sin, rows))
  return q.transpose(0, 2, 1, 3), llama.apply_rope(k, cos, sin).transpose(0, 2, 1, 3)


class _Scores(NamedTuple):
  visual: jax.Array           # int32[B, C] sequence positions of the candidates
  visual_valid: jax.Array     # bool[B, C]
  relevance: jax.Array | None  # float32[B, C]
  text: jax.Array             # int32[B, T] sequence positions of the text after the image
  text_valid: jax.Array       # bool[B, T]
  keys: jax.Array | None      # float[B, S, Hkv * Dh] keys of the scoring layer (DART)


def _score(model, config: PruningConfig, plan: _Plan, seq: _Seq, layer: int, num_candidates: int) -> _Scores:
  """Stage II relevance from the attention rows of `layer` (its input is seq.hidden)."""
  lm = model.language_model
  visual, visual_valid = _first(seq.visual, num_candidates)
  text, text_valid = _text_after_image(seq.mask, seq.visual, plan.text_len)
  source = config.stage2_relevance
  if source == "none" and config.method2 != "dart":
    return _Scores(visual, visual_valid, None, text, text_valid, None)
  last = _last_real(seq.mask)[:, None]
  q, k = _layer_qk(lm, layer, seq.hidden, seq.positions, last if source == "last_token" else text)
  rel = None
  if source == "raters":
    rel = relevance_lib.text_rater_attention(q, k, visual=visual, kv_valid=seq.mask, text_valid=text_valid,
                                             visual_valid=visual_valid, q_positions=_take(seq.positions, text),
                                             k_positions=seq.positions)
  elif source == "last_token":
    rel = relevance_lib.last_token_attention(q[:, :, 0], k, visual=visual, kv_valid=seq.mask,
                                             q_position=_take(seq.positions, last)[:, 0], k_positions=seq.positions)
    rel = jnp.where(visual_valid, rel, 0.0)
  keys = k.transpose(0, 2, 1, 3).reshape(*k.shape[:1], k.shape[2], -1) if config.method2 == "dart" else None
  return _Scores(visual, visual_valid, rel, text, text_valid, keys)


def _stage2(model, config: PruningConfig, plan: _Plan, seq: _Seq, keep: int, scores: _Scores, key, left):
  """Selects `keep` candidates from the hidden states entering the pruning layer -> (sequence, index, StageOutput)."""
  feats = _take(seq.hidden, scores.visual)
  hp = dict(config.stage2_hparams)
  if config.method2 == "dart":
    norm = model.language_model.norm
    feats = norm(feats)
    hp.setdefault("keys", _take(scores.keys, scores.visual))
    hp.setdefault("text_features", norm(_take(seq.hidden, scores.text)))
    hp.setdefault("text_keys", _take(scores.keys, scores.text))
    hp.setdefault("text_valid", scores.text_valid)
  kept = prune.select(config.method2, feats, keep=keep, relevance=scores.relevance, valid=scores.visual_valid,
                      key=key, **hp)
  kept_at = jnp.take_along_axis(scores.visual, kept, axis=-1)
  rows = jnp.arange(kept.shape[0])[:, None]
  chosen = jnp.zeros(seq.mask.shape, bool).at[rows, kept_at].set(True)
  index, mask = _compact(seq.mask & (~seq.visual | chosen), plan.text_len + keep, left)
  stage = StageOutput(candidates=jnp.where(scores.visual_valid, _take(seq.packed, scores.visual), -1),
                      kept=_take(seq.packed, kept_at), relevance=scores.relevance)
  return _gather_seq(seq, index, mask, config.positions), index, stage


# -------------------------------------------------------------------------------------------------------- drivers


def _run(model, seq: _Seq, start: int, stop: int, cache):
  if start == stop:
    return seq, cache
  out = model.language_model.run_layers(seq.hidden, seq.positions, seq.mask, start=start, stop=stop, cache=cache)
  return seq._replace(hidden=out.hidden), out.cache


def _segment(seq: _Seq, index) -> Segment:
  return Segment(index=index, source=seq.source, positions=seq.positions, mask=seq.mask, visual=seq.visual)


def _prefill(model, config: PruningConfig, plan: _Plan, batch: dict, key, cache, all_logits: bool) -> PruneOutput:
  ids = batch["input_ids"]
  mask = batch["attention_mask"].astype(bool)
  left = ~jnp.any(~mask[:, -1])
  num_layers = model.config.text.num_hidden_layers
  image_id = model.config.image_token_id
  keys = [None] * (len(config.stage2) + 1) if key is None else [jax.random.fold_in(key, i)
                                                                  for i in range(len(config.stage2) + 1)]
  stage1 = config.stage1_budget is not None
  images = _images(model, config, batch["pixel_values"], batch.get("layout"), stage1)
  if stage1:
    seq, stage1_out = _stage1(model, config, plan, ids, mask, images, keys[0], left)
    candidates = config.stage1_budget + plan.newlines
  else:
    is_image = (ids == image_id) & mask
    seq = _Seq(hidden=_embed(model, ids, images.embeds, images.valid),
               positions=llama.position_ids_from_mask(mask), mask=mask, visual=is_image,
               source=jnp.where(mask, jnp.arange(ids.shape[1]), -1),
               packed=jnp.where(is_image, jnp.cumsum(is_image, axis=-1, dtype=jnp.int32) - 1, -1))
    stage1_out, candidates = None, plan.visual
  inputs_embeds = seq.hidden
  segments, stages, done, index = [], [], 0, seq.source
  for step, (layer, keep) in enumerate(config.stage2):
    segments.append(_segment(seq, index))
    scoring = config.score_layer(layer)
    seq, cache = _run(model, seq, done, scoring, cache)
    scores = _score(model, config, plan, seq, scoring, candidates)
    seq, cache = _run(model, seq, scoring, layer, cache)
    seq, index, stage = _stage2(model, config, plan, seq, keep, scores, keys[step + 1], left)
    stages.append(stage)
    done, candidates = layer, keep
  segments.append(_segment(seq, index))
  seq, cache = _run(model, seq, done, num_layers, cache)

  hidden = seq.hidden if all_logits else _take(seq.hidden, _last_real(seq.mask)[:, None])
  bounds = config.segments(num_layers)
  per_layer = lambda flag: jnp.stack([jnp.sum(flag(s), axis=-1, dtype=jnp.int32)
                                      for s, (a, b) in zip(segments, bounds) for _ in range(a, b)], axis=-1)
  last = jnp.stack([jnp.take_along_axis(s.positions, _last_real(s.mask)[:, None], axis=-1)[:, 0]
                    for s in segments], axis=-1)
  return PruneOutput(logits=model.head(hidden), stage1=stage1_out, stage2=tuple(stages), segments=tuple(segments),
                     inputs_embeds=inputs_embeds, tokens_per_layer=per_layer(lambda s: s.mask),
                     visual_per_layer=per_layer(lambda s: s.visual & s.mask), last_positions=last.astype(jnp.int32),
                     cache=cache)


@functools.partial(jax.jit, static_argnames=("config", "plan", "cache_capacity"))
def _forward(model, batch, key, *, config, plan, cache_capacity):
  cache = None
  if cache_capacity is not None:
    cache = llama.init_cache(model.config.text, batch["input_ids"].shape[0], cache_capacity, model.language_model.dtype)
  return _prefill(model, config, plan, batch, key, cache, all_logits=True)


def _prepare(model, config: PruningConfig, input_ids, attention_mask, pixel_values, image_sizes, layout,
             text_len, visual_len=None) -> tuple[dict, _Plan]:
  """Host-side checks and the static plan; -> (batch of arrays, plan)."""
  config.check_model(model)
  if pixel_values is None:
    raise ValueError("pruning needs pixel_values: one image per row")
  checks.check_input_ids(input_ids, model.config.text.vocab_size)
  checks.check_pixel_values(pixel_values)
  ids = jnp.asarray(input_ids)
  b, s = ids.shape
  mask = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  if mask.shape != (b, s):
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {(b, s)}")
  if np.shape(pixel_values)[0] != b:
    raise ValueError(f"pruning takes exactly one image per row: {np.shape(pixel_values)[0]} images for {b} rows")
  batch = dict(input_ids=ids, attention_mask=mask, pixel_values=jnp.asarray(pixel_values))
  image_id = model.config.image_token_id
  vc = model.config.vision
  patches = vc.num_patches
  if _is_next(model):
    if layout is None:
      if image_sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes (or a precomputed layout)")
      layout = model.pack_layout(image_sizes) if _concrete(image_sizes) else model._layout(image_sizes, b)
    batch["layout"] = layout
    counts = np.asarray(layout.counts) if _concrete(layout.counts) else None
    visual = int(counts.max()) if counts is not None else np.shape(layout.valid)[1]
    newlines = 0
    if config.stage1_budget is not None and config.newlines != "drop":
      if _concrete(layout.newline):
        newlines = int(np.asarray(layout.newline).sum(-1).max())
      else:
        g = vc.image_size // vc.patch_size
        newlines = max(h // vc.image_size * g for h, _ in model.config.image_grid_pinpoints)
    if counts is not None:
      real = counts - np.asarray(layout.newline).sum(-1)
      if config.stage1_budget is not None and config.stage1_budget > real.min():
        raise ValueError(f"stage1_budget={config.stage1_budget} exceeds the {int(real.min())} image tokens of "
                         f"image {int(real.argmin())} (newlines excluded)")
      available = counts
      if config.stage1_budget is not None:
        available = config.stage1_budget + np.asarray(layout.newline).sum(-1) * (config.newlines == "keep")
      if config.stage2 and config.stage2[0][1] > available.min():
        raise ValueError(f"stage2 keeps {config.stage2[0][1]} tokens, more than the {int(available.min())} image "
                         f"tokens image {int(available.argmin())} brings to the LLM")
    expected = counts
  else:
    visual, newlines, expected = patches, 0, np.full((b,), patches)
  if _concrete(input_ids) and (attention_mask is None or _concrete(attention_mask)):
    ids_np, mask_np = np.asarray(ids), np.asarray(mask)
    image = (ids_np == image_id) & mask_np
    for row in range(b):
      where = np.flatnonzero(image[row])
      if expected is not None and len(where) != expected[row]:
        raise ValueError(f"row {row} holds {len(where)} image tokens, its image has {int(expected[row])}")
      if len(where) and where[-1] - where[0] + 1 != len(where):
        raise ValueError(f"row {row}: the image tokens are not one contiguous run (one image per row)")
    actual = text_length(ids_np, mask_np, image_id)
    if text_len is not None and text_len < actual:
      raise ValueError(f"text_len={text_len} is smaller than the {actual} text tokens of the longest row")
    text_len = actual if text_len is None else int(text_len)
  elif text_len is None:
    text_len = s - vc.num_patches          # every image holds at least one crop of tokens
  if visual_len is not None:
    if int(visual_len) < visual:
      raise ValueError(f"visual_len={visual_len} is smaller than the {visual} image tokens of the longest row")
    visual = int(visual_len)
  return batch, _Plan(text_len=int(text_len), visual=int(visual), newlines=int(newlines))


def forward(model, config: PruningConfig, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, *,
            layout=None, key=None, text_len: int | None = None, visual_len: int | None = None,
            cache_capacity: int | None = None) -> PruneOutput:
  """The pruned forward of a LLaVA / LLaVA-NeXT port (jitted per config and static lengths).

  Args:
    model: `llava.LlavaForConditionalGeneration` or `llava_next.LlavaNextForConditionalGeneration`.
    config: the PruningConfig.
    input_ids: int[B, S] with one contiguous <image> run per row (the processor's expansion).
    attention_mask: bool/int[B, S] (left or right padding); None = all real.
    pixel_values: float[B, 3, H, W] (LLaVA-1.5) or float[B, P, 3, H, W] (NeXT).
    image_sizes: int[B, 2] (NeXT) unless `layout` (the host `model.pack_layout(image_sizes)`) is given.
    key: PRNG key for random methods (folded with the stage index).
    text_len: static bound on real non-image tokens per row (default: read from concrete inputs).
    visual_len: static bound on image tokens per row (default: read from concrete inputs). Fixing `text_len` and
      `visual_len` across batches (e.g. to `model.config.max_num_features`) lets one compiled program serve them all.
    cache_capacity: when given, a KV cache of that many slots is filled (the prefill of `decode_step`); it must
      hold the longest segment plus the tokens to decode.

  Returns:
    PruneOutput (see its docstring).

  Raises:
    ValueError: a schedule that does not fit the model or the batch, an empty batch, image-token counts that do not
      match the images, and (concrete arrays) token ids outside the vocabulary or NaN/inf pixel_values.
  """
  batch, plan = _prepare(model, config, input_ids, attention_mask, pixel_values, image_sizes, layout, text_len,
                         visual_len)
  return _forward(model, batch, key, config=config, plan=plan, cache_capacity=cache_capacity)


# ----------------------------------------------------------------------------------------------------- generation


def decode_step(model, config: PruningConfig, cache: llama.KVCache, tokens: jax.Array, positions: jax.Array):
  """One token per row through the G layer segments: tokens int[B], positions int32[B, G] (segment g's position of
  the token) -> (logits float32[B, V], cache)."""
  lm = model.language_model
  x = lm.embed(tokens[:, None])
  for g, (start, stop) in enumerate(config.segments(lm.config.num_hidden_layers)):
    out = lm.run_layers(x, positions[:, g:g + 1], None, start=start, stop=stop, cache=cache)
    x, cache = out.hidden, out.cache
  return model.head(x)[:, 0], cache


class _Loop(NamedTuple):
  step: jax.Array         # int32[]
  tokens: jax.Array       # int32[B, M]
  done: jax.Array         # bool[B]
  num_tokens: jax.Array   # int32[B]
  position: jax.Array     # int32[B, G] position of the last token in each segment
  cache: llama.KVCache


@functools.partial(jax.jit, static_argnames=("config", "plan", "max_new_tokens", "eos_token_ids", "pad_token_id",
                                             "cache_dtype"))
def _greedy(model, batch, key, *, config, plan, max_new_tokens, eos_token_ids, pad_token_id, cache_dtype):
  b, s = batch["input_ids"].shape
  longest = max([s if config.stage1_budget is None else plan.text_len + config.stage1_budget + plan.newlines]
                + [plan.text_len + keep for _, keep in config.stage2])
  cache = llama.init_cache(model.config.text, b, longest + max_new_tokens, cache_dtype)
  out = _prefill(model, config, plan, batch, key, cache, all_logits=False)
  eos = jnp.asarray(eos_token_ids or (-1,), jnp.int32)

  def emit(state: _Loop, logits) -> _Loop:
    token = jnp.where(state.done, pad_token_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return state._replace(step=state.step + 1, tokens=state.tokens.at[:, state.step].set(token),
                          done=state.done | jnp.isin(token, eos),
                          num_tokens=state.num_tokens + (~state.done).astype(jnp.int32))

  def body(state: _Loop) -> _Loop:
    position = state.position + 1
    logits, cache = decode_step(model, config, state.cache, state.tokens[:, state.step - 1], position)
    return emit(state._replace(position=position, cache=cache), logits)

  init = _Loop(step=jnp.int32(0), tokens=jnp.full((b, max_new_tokens), pad_token_id, jnp.int32),
               done=jnp.zeros((b,), bool), num_tokens=jnp.zeros((b,), jnp.int32), position=out.last_positions,
               cache=out.cache)
  state = jax.lax.while_loop(lambda st: (st.step < max_new_tokens) & ~jnp.all(st.done), body,
                             emit(init, out.logits[:, 0]))
  return PrunedGeneration(tokens=state.tokens, num_tokens=state.num_tokens, prefill=out._replace(cache=None))


def _prompt_len(config: PruningConfig, plan: _Plan, mask) -> int:
  """The most positions a row's prompt takes after the pruned prefill (decoding continues after them): Stage I
  re-indexes from 0 over at most text_len + budget (+ newlines) tokens, Stage II only shortens; without Stage I the
  longest real row (the padded length when the mask is traced)."""
  if config.stage1_budget is not None:
    return plan.text_len + config.stage1_budget + plan.newlines
  if checks.is_concrete(mask):
    return int(np.asarray(mask).sum(axis=-1).max())
  return mask.shape[1]


def greedy(model, config: PruningConfig, input_ids, attention_mask=None, *, pixel_values, image_sizes=None,
           layout=None, max_new_tokens: int, eos_token_ids=(), pad_token_id: int = 0, key=None,
           text_len: int | None = None, visual_len: int | None = None, cache_dtype=None) -> PrunedGeneration:
  """Greedy decoding with the pruned prefill (`models.generate.greedy` semantics: tokens after a row's stop token
  are `pad_token_id`; the loop stops when every row has stopped). Arguments as `forward`, plus max_new_tokens M (a
  positive int; the pruned prompt plus M must fit max_position_embeddings), eos_token_ids, pad_token_id and
  cache_dtype (default the model's dtype)."""
  batch, plan = _prepare(model, config, input_ids, attention_mask, pixel_values, image_sizes, layout, text_len,
                         visual_len)
  max_new_tokens = checks.check_max_new_tokens(max_new_tokens, _prompt_len(config, plan, batch["attention_mask"]),
                                               model.config.text.max_position_embeddings)
  eos = (int(eos_token_ids),) if isinstance(eos_token_ids, (int, np.integer)) else tuple(int(e) for e in eos_token_ids)
  dtype = jnp.dtype(cache_dtype or model.language_model.dtype)
  return _greedy(model, batch, key, config=config, plan=plan, max_new_tokens=max_new_tokens, eos_token_ids=eos,
                 pad_token_id=int(pad_token_id), cache_dtype=dtype)
