"""Write a Flax NNX model as a Hugging Face checkpoint directory: the inverse of `models.loading.load_pretrained`.

    saving.save_pretrained(model, hf_config, "/ckpt/testbed", tokenizer_dir=processor_files)
    models.load_pretrained("/ckpt/testbed")                                   # the same model back, bit for bit
    transformers.LlavaNextForConditionalGeneration.from_pretrained("/ckpt/testbed")    # the same logits

The family's conversion table (`backbones.BACKBONES[model_type].conversion_table`) is the single source of truth: every
rule `canonical name -> Rule(target, transform, layer)` is run backwards (take the state leaf at `target`, the
`layer`-th slice of a stacked parameter, undo `transform` with `conversion.INVERSE_TRANSFORMS`) and the tensor is
written under its canonical (transformers-5 module tree) name, which both loaders read. Tensors keep the model's
dtype.

Files written: config.json (`hf_config` as given), model.safetensors (metadata format "pt", as transformers expects),
and every file of `tokenizer_dir` (e.g. what `processor.save_pretrained` wrote: tokenizer and processor configs).
"""

import json
import os
import shutil
from typing import Any, Mapping

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from models import backbones
from models import conversion

__all__ = ["checkpoint_tensors", "save_pretrained"]

_RESERVED = ("config.json", "model.safetensors", "model.safetensors.index.json")


def checkpoint_tensors(model: nnx.Module, hf_config: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Canonical checkpoint name -> numpy tensor (HF layout) for every rule of the family's conversion table.

  Raises ValueError when `hf_config` does not describe `model` (another config, another family) or when a model
  parameter is not covered by the table (it would be lost on save).
  """
  model_type = hf_config.get("model_type")
  if model_type not in backbones.BACKBONES:
    raise ValueError(f"unknown model_type {model_type!r} in hf_config; supported: {', '.join(backbones.BACKBONES)}")
  family = backbones.BACKBONES[model_type]
  config = family.config.from_hf(dict(hf_config))
  if not isinstance(model, family.model):
    raise ValueError(f"hf_config describes a {family.model.__name__} (model_type {model_type!r}), got a "
                     f"{type(model).__name__}")
  if getattr(model, "config", None) != config:
    raise ValueError(f"hf_config does not match the model's config:\n  from hf_config: {config}\n  model: "
                     f"{getattr(model, 'config', None)}")
  leaves = {tuple(str(k) for k in key): var for key, var in nnx.to_flat_state(nnx.state(model))}
  table = family.conversion_table(config)
  used: set[tuple[str, ...]] = set()
  tensors = {}
  for name, rule in table.items():
    if rule.target not in leaves:
      raise ValueError(f"conversion table bug: {name} -> {rule.target}, which is not a parameter of the model")
    array = np.asarray(leaves[rule.target].get_value())
    if rule.layer is not None:
      array = array[rule.layer]
    tensors[name] = np.ascontiguousarray(conversion.INVERSE_TRANSFORMS[rule.transform](array))
    used.add(rule.target)
  lost = sorted("/".join(k) for k in leaves if k not in used)
  if lost:
    raise ValueError(f"model parameters not covered by the {model_type} conversion table (they would not be "
                     f"saved): {lost}")
  return tensors


def save_pretrained(model: nnx.Module, hf_config: Mapping[str, Any], path: str | os.PathLike,
                    tokenizer_dir: str | os.PathLike | None = None) -> str:
  """Writes config.json, model.safetensors and the tokenizer/processor files into `path` (created); returns it.

  Args:
    model: a model of a `backbones.BACKBONES` family (e.g. `models.llava_next.LlavaNextForConditionalGeneration`).
    hf_config: the config.json dict that `load_pretrained` parses into `model.config` (checked).
    path: the checkpoint directory; existing files of the same names are overwritten.
    tokenizer_dir: a directory whose files (tokenizer, processor configs) are copied in; None: none.
  """
  tensors = checkpoint_tensors(model, hf_config)
  path = os.fspath(path)
  if tokenizer_dir is not None:
    tokenizer_dir = os.fspath(tokenizer_dir)
    if not os.path.isdir(tokenizer_dir):
      raise ValueError(f"tokenizer_dir {tokenizer_dir!r} is not a directory")
  os.makedirs(path, exist_ok=True)
  if tokenizer_dir is not None:
    for name in sorted(os.listdir(tokenizer_dir)):
      source = os.path.join(tokenizer_dir, name)
      if os.path.isfile(source) and name not in _RESERVED:
        shutil.copyfile(source, os.path.join(path, name))
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(dict(hf_config), f, indent=2, sort_keys=True)
    f.write("\n")
  return path
