"""The backbone registry: one entry per model family, keyed by its checkpoints' config.json `model_type` (the one
spelling of a family along the whole path), holding what is true only of that family outside its model file.

    backbone = backbones.get("llava_next")            # also the older spellings: "llava-next", "llava_1_5", ...
    backbone.model, backbone.config, backbone.conversion_table   # what `models.load_pretrained` builds and fills
    backbone.nominal_tokens(model.config)             # the papers' N behind --keep_ratio (LLaVA-NeXT: 5 x 576)

A family joins by one entry here, its model file (config with `from_hf`, the model implementing
`models.family.VisionLanguageModel`, `conversion_table`) and one conformance-suite entry (BUILD.md "Adding a
backbone"). The methods' per-backbone settings (TOPS' Stage II table, ...) live with each method
(`models.pruning.methods`), keyed by these names.
"""

import dataclasses
from typing import Any, Callable

from models import conversion
from models import llama
from models import llava
from models import llava_next
from models import qwen2_5_vl

__all__ = ["Backbone", "BACKBONES", "get", "names", "of_model"]

# The papers' short-answer instruction (LLaVA's eval scripts and lmms-eval's default post_prompt).
_SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A model family.

  name: the checkpoints' `model_type` (the registry key).
  title: how tables and messages name it.
  config / model / conversion_table: the family's config class (`from_hf`), model class and checkpoint table.
  aliases: older spellings still accepted by `get` (the runner's flag and `pruning.method_config` took them).
  prompt: the papers' prompt for a question, with {question} and "<image>" where the image goes ("" for text-only
    families).
  protocol: the benchmark harness whose numbers the papers report for it ("llava" | "lmms_eval"); None: none.
  square_pad: images are padded to a square before the processor unless a task keeps their aspect (LLaVA-1.5).
  max_new_tokens: the answer length the papers' short-answer benchmarks generate.
  pixel_crops: the processor's pixel_values carry a crops axis, float[I, P, 3, H, W] (LLaVA-NeXT) rather than
    float[I, 3, H, W], and the model reads `image_sizes`.
  nominal_groups: the groups behind the papers' N of a full image (LLaVA-NeXT: 5 crops, the most its LLaVA-1.6
    pinpoints give; LLaVA-1.5: 1): N = nominal_groups x the tokens of a group, and a group's quota is
    target // this.
  legacy_prefixes: the family's own (checkpoint prefix, canonical prefix) renames, first match wins
    (`models.conversion.canonical_name`); None: the shared `models.conversion.LEGACY_PREFIXES`.
  """
  name: str
  title: str
  config: Any
  model: Any
  conversion_table: Callable[[Any], dict[str, conversion.Rule]]
  aliases: tuple[str, ...] = ()
  prompt: str = ""
  protocol: str | None = None
  square_pad: bool = False
  max_new_tokens: int = 8
  pixel_crops: bool = False
  nominal_groups: int = 1
  legacy_prefixes: tuple[tuple[str, str], ...] | None = None

  def nominal_tokens(self, model_config) -> int:
    """The papers' N of a full image, the reference of keep ratios: groups x tokens per group before unpadding or
    structural slots (LLaVA-1.5: 576; LLaVA-NeXT at 336 px: 5 x 576 = 2880; the testbed: 5 x 36)."""
    return self.nominal_groups * model_config.vision.num_patches

  @property
  def multimodal(self) -> bool:
    return bool(self.prompt)


BACKBONES: dict[str, Backbone] = {
    "llava": Backbone("llava", "LLaVA-1.5", llava.LlavaConfig, llava.LlavaForConditionalGeneration,
                      llava.conversion_table, aliases=("llava-1.5", "llava_1_5"),
                      prompt="USER: <image>\n{question}" + _SHORT_ANSWER + " ASSISTANT:", protocol="llava",
                      square_pad=True),
    "llava_next": Backbone("llava_next", "LLaVA-NeXT", llava_next.LlavaNextConfig,
                           llava_next.LlavaNextForConditionalGeneration, llava_next.conversion_table,
                           aliases=("llava-next",), prompt="USER: <image>\n{question}" + _SHORT_ANSWER + " ASSISTANT:",
                           protocol="lmms_eval", pixel_crops=True, nominal_groups=5),
    # The prompt: the checkpoint's chat template around one image and the papers' short-answer instruction.
    "qwen2_5_vl": Backbone("qwen2_5_vl", "Qwen2.5-VL", qwen2_5_vl.Qwen2_5_VLConfig,
                           qwen2_5_vl.Qwen2_5_VLForConditionalGeneration, qwen2_5_vl.conversion_table,
                           aliases=("qwen2.5-vl", "qwen2_5-vl"),
                           prompt=("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                   "<|vision_start|><|image_pad|><|vision_end|>{question}" + _SHORT_ANSWER
                                   + "<|im_end|>\n<|im_start|>assistant\n"),
                           protocol="lmms_eval", legacy_prefixes=qwen2_5_vl.LEGACY_PREFIXES),
    # Text-only decoders load too (the LLaVA decoders' parity tests).
    "llama": Backbone("llama", "LLaMA", llama.TextConfig, llama.LlamaForCausalLM, llama.causal_lm_conversion_table),
    "mistral": Backbone("mistral", "Mistral", llama.TextConfig, llama.LlamaForCausalLM,
                        llama.causal_lm_conversion_table),
}

_BY_ALIAS = {alias: b.name for b in BACKBONES.values() for alias in b.aliases}


def names() -> tuple[str, ...]:
  """Every spelling `get` accepts."""
  return tuple(BACKBONES) + tuple(_BY_ALIAS)


def get(name: Any) -> Backbone:
  """The backbone named by its `model_type` or an alias; ValueError listing the known names otherwise."""
  if isinstance(name, str):
    if name in BACKBONES:
      return BACKBONES[name]
    if name in _BY_ALIAS:
      return BACKBONES[_BY_ALIAS[name]]
  raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)} (also: {', '.join(_BY_ALIAS)})")


def of_model(model) -> Backbone:
  """The registry entry of a model instance (by its class); ValueError for a class no family registers."""
  for backbone in BACKBONES.values():
    if type(model) is backbone.model:  # pylint: disable=unidiomatic-typecheck  (subclasses are other families)
      return backbone
  raise ValueError(f"{type(model).__name__} is not the model class of any family in models.backbones.BACKBONES")
