"""The seam between a model family and the pruning stages: what a family hands the pruners (`VisualTokens`) and the
interface its model implements (`VisionLanguageModel`). The stages (`models.pruning`) read models only through it.

Axes (`models` legend): I images of a batch, N visual slots per image in LLM order, P groups per image (the budget
unit: crops, tiles or frames), T tokens per group, R position components (1: RoPE, 3: M-RoPE), B batch, S sequence,
D text width, Dv vision width, Dh head width.

A family is one model file (its config, model, `conversion_table`, and the methods below) plus one entry in
`models.backbones.BACKBONES`; BUILD.md "Adding a backbone" walks through it.
"""

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax

__all__ = ["VisualTokens", "VisionLanguageModel", "RELEVANCE", "EXTRAS", "check_request"]

# Relevance signals a family may provide by name (`VisualTokens.relevance`): "cls" the CLS token's attention to
# each token in the feature layer (towers with a CLS token); "received" the mean attention each token receives in the
# feature layer, over heads and all queries, pooled as the tokens are merged (every tower: the signal of towers
# without a CLS token; `tops_jax.relevance.received_attention`).
RELEVANCE = ("cls", "received")
# Named extras a method may ask for (`VisualTokens.extras`): "cls_features" float[I, P, Dv] and "cls_keys"
# float[I, P, Dh] the CLS position per group (VisionZip); "last_query" float[I, Dv] / "last_keys" float[I, T + 1, Dv]
# the last vision layer's CLS query and keys (PruMerge+). "keys" (the feature layer's keys, mean over heads) fills
# `VisualTokens.keys` / `group_keys`.
EXTRAS = ("keys", "cls_features", "last_qk")


class VisualTokens(NamedTuple):
  """The visual tokens of a batch as the decoder will receive them, and what pruners read about them.

  embeds: float[I, N, D] projector outputs in LLM order (structural slots hold their own embedding, padding zeros).
  valid: bool[I, N] real slots (tokens and structural slots; a prefix of each image).
  structural: bool[I, N] slots that carry no image content (LLaVA-NeXT's newline; `<img>` / `</img>` markers); the
    Stage I `newlines` policy keeps or drops them.
  group: int32[I, N] the group of each slot (0 .. P - 1; LLaVA-NeXT: 0 the base crop, 1.. the grid crops); -1 at
    structural and padding slots.
  source: int32[I, N] index of each slot in the image's flattened per-group tokens [P * T]; -1 structural / padding.
  features: float[I, N, Dv] pre-projector features (zeros at structural and padding slots).
  relevance: {name: float32[I, N]} the relevance signals asked for (`RELEVANCE`; 0 at structural / padding slots).
  keys: float[I, N, Dh] | None the feature layer's keys, mean over heads, when asked.
  group_embeds: float[I, P, T, D] projector outputs per group, before packing (LLaVA-1.5: P = 1, T = N).
  group_features: float[I, P, T, Dv] pre-projector features per group (padding groups included).
  group_valid: bool[I, P] real groups (False for a processor's padding crops).
  group_relevance: {name: float32[I, P, T]} the relevance signals per group.
  group_keys: float[I, P, T, Dh] | None keys per group, when asked.
  grid: int32[I, 2] (rows, cols) of the grid groups of each image (LLaVA-1.5: (0, 0), one group and no grid).
  extras: {name: array} the named extras asked for (`EXTRAS`).
  """
  embeds: jax.Array
  valid: jax.Array
  structural: jax.Array
  group: jax.Array
  source: jax.Array
  features: jax.Array
  relevance: dict[str, jax.Array]
  keys: jax.Array | None
  group_embeds: jax.Array
  group_features: jax.Array
  group_valid: jax.Array
  group_relevance: dict[str, jax.Array]
  group_keys: jax.Array | None
  grid: jax.Array
  extras: dict[str, jax.Array]


@runtime_checkable
class VisionLanguageModel(Protocol):
  """What the pruning stages call on a model. LLaVA-1.5 (`models.llava`), LLaVA-NeXT (`models.llava_next`) and
  Qwen2.5-VL (`models.qwen2_5_vl`) implement it.

  `config` exposes: `image_token_id`; `text` (the decoder config: `num_hidden_layers`, `vocab_size`,
  `max_position_embeddings`, `sliding_window`); `vision.num_patches` (T); `max_image_tokens` (the most slots one
  image brings to the LLM), `max_newlines` (the most structural slots), `max_num_crops` (the most groups) and
  `token_grid`.
  `language_model` is the decoder (`models.llama.LlamaModel`: `embed`, `run_layers`, `query_keys`, `norm`).
  """
  config: Any
  language_model: Any

  def layout(self, image_sizes, num_images: int) -> Any:
    """Where each visual token sits (`models.anyres.PackLayout`), from the image sizes (numpy or traced)."""

  def visual_tokens(self, pixel_values: jax.Array, layout: Any, *, relevance: tuple[str, ...] = (),
                    extras: tuple[str, ...] = ()) -> VisualTokens:
    """One tower pass -> the batch's `VisualTokens`, with the named relevance signals and extras."""

  def project(self, features: jax.Array) -> jax.Array:
    """float[..., Dv] -> float[..., D] (merged tokens are projected after merging)."""

  def embed(self, input_ids: jax.Array, image_embeds: jax.Array | None = None,
            valid: jax.Array | None = None) -> jax.Array:
    """Token embeddings with the image rows merged at the image-token positions: int[B, S] -> float[B, S, D]."""

  def positions(self, input_ids: jax.Array, attention_mask: jax.Array, layout: Any = None) -> jax.Array:
    """Position ids of the prompt: int32[R, B, S] (R = 1 for RoPE, 3 for M-RoPE, whose image ids read the images'
    grids from `layout`). The decoder also takes int[B, S] for positions that are equal in every component (text
    tokens, decoding). A family whose ids must survive pruning unchanged (M-RoPE) sets `KEEPS_POSITIONS = True`:
    Stage I then gathers each kept token's id instead of re-indexing the rebuilt prompt. A family also declares
    `TOWER_RELEVANCE` (the `RELEVANCE` signals `visual_tokens` provides) and, when its images' token grids differ
    from one another beyond one padded layout, `STATIC_TOKEN_GRID = False`; the method protocols read these traits
    (`models.pruning.methods.base`), never the family's name."""

  def head(self, hidden: jax.Array) -> jax.Array:
    """Final norm + LM head: float[..., D] -> float32[..., V]."""


def check_request(family: str, relevance: tuple[str, ...], extras: tuple[str, ...], *,
                  provides: tuple[str, ...], offers: tuple[str, ...]):
  """Raises ValueError naming a relevance signal or extra that `family` does not provide."""
  for kind, asked, have in (("relevance signal", relevance, provides), ("extra", extras, offers)):
    unknown = sorted(set(asked) - set(have))
    if unknown:
      raise ValueError(f"{family} does not provide the {kind}(s) {', '.join(unknown)}; it provides: "
                       f"{', '.join(have) or 'none'}")
