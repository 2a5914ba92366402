"""Tiny random Hugging Face models (transformers 5, PyTorch, CPU) saved with `save_pretrained`, for parity tests.

    path = make_tiny_llava(tmp_path, text="mistral", text_overrides=dict(sliding_window=None))
    torch_model, path = tiny_llava(tmp_path, text="llama")       # the reference model too (eval mode, eager, fp32)

Weights come from `torch.manual_seed(seed)` and the models' own initialisers, then every floating parameter is
re-drawn with std 0.5/sqrt(fan_in)-ish noise (`_randomize`) so that norms, biases and embeddings are not at their
trivial init (ones/zeros) and a wrong transpose or a dropped bias shows up in the numbers.

Tiny sizes: CLIP 3 layers, width 32, 4 heads, 28 px images with 7 px patches (N = 16 visual tokens); decoder
3 layers, width 64, 4 query heads / 2 key-value heads (GQA), vocabulary 256 with the image token 255.
"""

import pathlib
from typing import Any

import torch
import transformers

__all__ = ["IMAGE_TOKEN_ID", "NUM_PATCHES", "tiny_vision_config", "tiny_text_config", "tiny_llava_config",
           "tiny_llava", "make_tiny_llava", "tiny_llava_next", "TINY_PINPOINTS", "tiny_causal_lm", "save_tiny"]

IMAGE_TOKEN_ID = 255
NUM_PATCHES = 16
# LLaVA-1.6's pinpoints scaled to 28 px crops (up to 5 crops per image).
TINY_PINPOINTS = ((28, 56), (56, 28), (56, 56), (84, 28), (28, 84))


def tiny_vision_config(**overrides: Any) -> transformers.CLIPVisionConfig:
  kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
            patch_size=7, projection_dim=16, layer_norm_eps=1e-5)
  kw.update(overrides)
  return transformers.CLIPVisionConfig(**kw)


def tiny_text_config(text: str = "llama", **overrides: Any) -> transformers.PretrainedConfig:
  """A LlamaConfig or MistralConfig (GQA 4/2 heads, rms_norm_eps 1e-5, 1024 positions)."""
  kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
  if text == "llama":
    cls = transformers.LlamaConfig
  elif text == "mistral":
    cls = transformers.MistralConfig
    kw["sliding_window"] = None
  else:
    raise ValueError(f"text must be 'llama' or 'mistral', got {text!r}")
  kw.update(overrides)
  return cls(**kw)


def tiny_llava_config(text: str = "llama", *, vision_overrides: dict | None = None,
                      text_overrides: dict | None = None, **overrides: Any) -> transformers.LlavaConfig:
  kw = dict(image_token_index=IMAGE_TOKEN_ID, image_seq_length=NUM_PATCHES)
  kw.update(overrides)
  config = transformers.LlavaConfig(vision_config=tiny_vision_config(**(vision_overrides or {})),
                                    text_config=tiny_text_config(text, **(text_overrides or {})), **kw)
  return config


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Re-draws every floating parameter: norm weights 1 + N(0, 0.1), embeddings N(0, 0.5), biases N(0, 0.1),
  matrices N(0, 0.5 / sqrt(fan_in))."""
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "embed" in name:                                  # embed_tokens, position/patch/class embeddings
        fan_in = p[0].numel() if p.ndim == 4 else 1
        p.copy_(noise * 0.5 / fan_in ** 0.5)
      elif p.ndim == 1 and name.endswith(".weight"):      # every 1-D weight is a norm scale
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim == 1:
        p.copy_(0.1 * noise)
      else:
        p.copy_(noise * 0.5 / p.shape[-1] ** 0.5)


def save_tiny(model: transformers.PreTrainedModel, directory: pathlib.Path | str) -> pathlib.Path:
  directory = pathlib.Path(directory)
  model.save_pretrained(directory)
  return directory


def _finish(model, seed):
  _randomize(model, seed)
  return model.eval()


def tiny_llava(tmp_path, text: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32,
               name: str = "llava",
               **config_kw: Any) -> tuple[transformers.LlavaForConditionalGeneration, pathlib.Path]:
  """Builds, randomises and saves a tiny LlavaForConditionalGeneration; returns (torch model, directory).

  `config_kw` go to `tiny_llava_config` (vision_overrides=..., text_overrides=..., top-level LlavaConfig fields).
  """
  torch.manual_seed(seed)
  config = tiny_llava_config(text, **config_kw)
  config._attn_implementation = "eager"
  model = _finish(transformers.LlavaForConditionalGeneration(config), seed)
  model = model.to(dtype)
  return model, save_tiny(model, pathlib.Path(tmp_path) / name)


def make_tiny_llava(tmp_path, text: str = "llama", **kw: Any) -> pathlib.Path:
  """Like `tiny_llava` but returns only the checkpoint directory."""
  return tiny_llava(tmp_path, text, **kw)[1]


def tiny_llava_next(tmp_path, text: str = "llama", *, seed: int = 0, name: str = "llava_next",
                    pinpoints=TINY_PINPOINTS, **text_overrides: Any
                    ) -> tuple[transformers.LlavaNextForConditionalGeneration, pathlib.Path]:
  """A tiny LlavaNextForConditionalGeneration (28 px crops of 16 tokens, `pinpoints`), randomised and saved."""
  torch.manual_seed(seed)
  config = transformers.LlavaNextConfig(vision_config=tiny_vision_config(),
                                        text_config=tiny_text_config(text, **text_overrides),
                                        image_token_index=IMAGE_TOKEN_ID,
                                        image_grid_pinpoints=[list(p) for p in pinpoints])
  config._attn_implementation = "eager"
  model = _finish(transformers.LlavaNextForConditionalGeneration(config), seed)
  return model, save_tiny(model, pathlib.Path(tmp_path) / name)


def tiny_causal_lm(tmp_path, text: str = "llama", *, seed: int = 0, name: str = "lm",
                   **overrides: Any) -> tuple[transformers.PreTrainedModel, pathlib.Path]:
  """A tiny LlamaForCausalLM / MistralForCausalLM (eager attention, float32), saved; returns (model, directory)."""
  torch.manual_seed(seed)
  config = tiny_text_config(text, **overrides)
  config._attn_implementation = "eager"
  cls = transformers.LlamaForCausalLM if text == "llama" else transformers.MistralForCausalLM
  model = _finish(cls(config), seed)
  return model, save_tiny(model, pathlib.Path(tmp_path) / name)
