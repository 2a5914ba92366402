"""Tiny random Qwen2.5-VL checkpoints (transformers 5, PyTorch, CPU) in the hub layout, with the tokenizer and
processor files `AutoProcessor.from_pretrained` reads.

    hf, path = tiny_qwen(tmp_path, window_size=56, fullatt=(0,), tie=False, flat=False)
    proc = processor(path)     # AutoProcessor needs torchvision for Qwen's video processor

Tiny sizes: ViT 3 blocks, width 32, 2 heads (Dh 16), 14 px patches, merge 2; decoder 2 layers, width 64, 4 query / 2
key-value heads (Dh 16, mrope_section (2, 3, 3)); a byte-level BPE vocabulary with Qwen's special tokens. The
processor's min_pixels / max_pixels keep images between 4 and 80 merged tokens. Weights re-drawn as
`model_factories._randomize` does, so biases and norms are not trivial.
"""

import json
import pathlib
from typing import Any

import torch
import transformers

import model_factories as mf

__all__ = ["QWEN_SPECIALS", "MIN_PIXELS", "MAX_PIXELS", "CHAT_TEMPLATE", "tiny_qwen", "chat_prompt", "to_v5_names",
           "flatten_config", "processor", "save_chat_template"]

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 80 * 28 * 28
_CORPUS = ("system You are a helpful assistant. user assistant What colour is the large object on the left side of "
           "the picture? How many? Describe both images. Answer the question using a single word or phrase. yes no "
           "red green blue 0123456789")


def _tokenizer(directory: pathlib.Path) -> transformers.PreTrainedTokenizerFast:
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models as tok_models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([_CORPUS] * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIALS,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                              extra_special_tokens={"image_token": "<|image_pad|>",
                                                                    "video_token": "<|video_pad|>"})
  fast.padding_side = "left"
  fast.save_pretrained(directory)
  return fast


# The chat template of the hub's Qwen2-VL / Qwen2.5-VL Instruct checkpoints (a default system message when the first
# message is not one; images and videos as vision_start, pad, vision_end; add_vision_id numbering).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_chat_template(directory) -> None:
  """Adds the hub chat template to a `tiny_qwen` directory, written by transformers (the tokenizer's save)."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  tokenizer.chat_template = CHAT_TEMPLATE
  tokenizer.save_pretrained(directory)


def chat_prompt(question: str, images: int = 1) -> str:
  """The Qwen2.5-VL chat template's user turn with `images` images, then the assistant header."""
  vision = "<|vision_start|><|image_pad|><|vision_end|>" * images
  return (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{vision}{question}"
          "<|im_end|>\n<|im_start|>assistant\n")


def tiny_qwen(tmp_path, *, seed: int = 0, name: str = "qwen2_5_vl", window_size: int = 56,
              fullatt: tuple[int, ...] = (1,), depth: int = 3, tie: bool = False, text_layers: int = 2,
              vision_overrides: dict[str, Any] | None = None, text_overrides: dict[str, Any] | None = None
              ) -> tuple[transformers.Qwen2_5_VLForConditionalGeneration, pathlib.Path]:
  """Builds, randomises and saves a tiny Qwen2_5_VLForConditionalGeneration with its tokenizer and processor
  (eager attention, float32); returns (torch model, directory)."""
  directory = pathlib.Path(tmp_path) / name
  directory.mkdir(parents=True, exist_ok=True)
  tokenizer = _tokenizer(directory)
  ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
  vision = dict(depth=depth, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
                window_size=window_size, fullatt_block_indexes=list(fullatt), tokens_per_second=2)
  vision.update(vision_overrides or {})
  text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=text_layers,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
              rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
              bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
  text.update(text_overrides or {})
  torch.manual_seed(seed)
  config = transformers.Qwen2_5_VLConfig(
      vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
      tie_word_embeddings=tie)
  config._attn_implementation = "eager"
  model = mf._finish(transformers.Qwen2_5_VLForConditionalGeneration(config), seed)  # pylint: disable=protected-access
  if tie:
    model.tie_weights()
  model.save_pretrained(directory)
  image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                                          patch_size=14, merge_size=2, temporal_patch_size=2)
  image_processor.save_pretrained(directory)
  return model, directory


class _ImageProcessorOnly(transformers.Qwen2_5_VLProcessor):
  """transformers' Qwen2_5_VLProcessor without its video processor, which needs torchvision (not in this
  environment): the image path (token expansion, mm_token_type_ids) is the class's own code."""

  def check_argument_for_proper_class(self, argument_name, argument):
    if argument_name == "video_processor" and argument is None:
      return None
    return super().check_argument_for_proper_class(argument_name, argument)


def processor(directory) -> transformers.Qwen2_5_VLProcessor:
  """The processor of a `tiny_qwen` directory (its saved image processor and tokenizer), left padding."""
  proc = _ImageProcessorOnly(image_processor=transformers.AutoImageProcessor.from_pretrained(directory),
                             tokenizer=transformers.AutoTokenizer.from_pretrained(directory), video_processor=None)
  proc.tokenizer.padding_side = "left"
  return proc


def to_v5_names(directory: pathlib.Path) -> None:
  """Rewrites the checkpoint with transformers 5's module-tree names (model.visual.*, model.language_model.*)."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  file = pathlib.Path(directory) / "model.safetensors"
  tensors = load_file(str(file))
  rename = lambda k: ("model." + k if k.startswith("visual.") else
                      k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k)
  save_file({rename(k): v for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


def flatten_config(directory: pathlib.Path) -> dict:
  """Rewrites config.json as the hub's legacy flat file (text fields at the top level, rope_scaling type "mrope",
  vision model_type "qwen2_5_vl", tie_word_embeddings inside the text fields); returns it."""
  path = pathlib.Path(directory) / "config.json"
  config = json.loads(path.read_text())
  text = config.pop("text_config")
  rope = text.pop("rope_parameters")
  text["rope_theta"] = rope.pop("rope_theta")
  text["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
  text.pop("model_type")
  config.update(text)
  config["vision_config"]["model_type"] = "qwen2_5_vl"
  config["vision_config"].pop("rope_parameters")
  path.write_text(json.dumps(config, indent=2))
  return config
