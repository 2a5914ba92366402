"""Checkpoint conversion rules: where each Hugging Face tensor goes in an NNX model, how it is transposed, and the
canonical names both checkpoint layouts map to. A leaf: every model family imports it, nothing here imports a family.

`Rule(target, transform, layer)`: `target` is the path in `nnx.state(model)`, `transform` a `TRANSFORMS` key
("linear": torch Linear [out, in] -> Flax kernel [in, out]; "conv": OIHW -> HWIO), `layer` the index along the leading
axis of a stacked (scanned) parameter, or None. `INVERSE_TRANSFORMS` undoes each transform (`models.saving`).
Checkpoint names are canonicalised by `LEGACY_PREFIXES` (first matching prefix wins) to the transformers-5 module
tree; names ending in `IGNORED_SUFFIXES` (non-persistent buffers old checkpoints saved) are skipped.
"""

from typing import Callable, NamedTuple

import numpy as np

__all__ = ["Rule", "AXES", "TRANSFORMS", "INVERSE_TRANSFORMS", "TRANSFORM_RANK", "transformed_shape", "checkpoint_shape",
           "LEGACY_PREFIXES", "IGNORED_SUFFIXES", "canonical_name"]


class Rule(NamedTuple):
  """Where one checkpoint tensor goes: `target` path in nnx.state, a `TRANSFORMS` key, and the stacked-layer index."""
  target: tuple[str, ...]
  transform: str = "identity"
  layer: int | None = None


# Each transform is an axis permutation: checkpoint axis AXES[t][i] becomes model axis i. Everything below (the
# forward and inverse transposes, both shape maps, the expected rank) derives from this one table.
AXES: dict[str, tuple[int, ...] | None] = {
    "identity": None,
    "linear": (1, 0),            # torch Linear [out, in] -> Flax kernel [in, out]
    "conv": (2, 3, 1, 0),        # torch Conv2d OIHW -> Flax HWIO
    "conv3d": (1, 2, 3, 4, 0),   # torch Conv3d [O, C, T, H, W] -> [C, T, H, W, O] (a patch matmul: reshape to [C*T*H*W, O])
}
TRANSFORM_RANK = {name: len(axes) for name, axes in AXES.items() if axes is not None}


def _inverse(axes: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(int(i) for i in np.argsort(axes))


def _transpose(axes):
  return (lambda a: a) if axes is None else (lambda a: np.transpose(a, axes))


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {name: _transpose(axes) for name, axes in AXES.items()}
INVERSE_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    name: _transpose(None if axes is None else _inverse(axes)) for name, axes in AXES.items()}


def transformed_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
  """The model-side shape of a checkpoint tensor of `shape` under `transform`."""
  axes = AXES[transform]
  return tuple(shape) if axes is None else tuple(shape[i] for i in axes)


def checkpoint_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
  """Inverse of `transformed_shape`: the checkpoint shape that converts to `shape`."""
  axes = AXES[transform]
  return tuple(shape) if axes is None else tuple(shape[i] for i in _inverse(axes))


# (checkpoint prefix, canonical prefix); the first match wins, canonical names match none of them.
LEGACY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)
IGNORED_SUFFIXES: tuple[str, ...] = (".rotary_emb.inv_freq", "embeddings.position_ids")


def canonical_name(name: str, prefixes: tuple[tuple[str, str], ...] | None = None) -> str:
  """Checkpoint tensor name -> canonical (transformers-5 module tree) name, by `prefixes` (default
  `LEGACY_PREFIXES`; a family whose hub names would clash with another family's canonical names brings its own,
  `models.backbones.Backbone.legacy_prefixes`)."""
  for old, new in LEGACY_PREFIXES if prefixes is None else prefixes:
    if name.startswith(old):
      return new + name[len(old):]
  return name
