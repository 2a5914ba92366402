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

import numpy as np
import torch
import transformers

__all__ = ["IMAGE_TOKEN_ID", "NUM_PATCHES", "tiny_vision_config", "tiny_text_config", "tiny_llava_config",
           "tiny_llava", "make_tiny_llava", "tiny_llava_next", "TINY_PINPOINTS", "tiny_causal_lm", "save_tiny",
           "tiny_llava_hf", "prompt_rows", "mask_positions", "padded_rows", "kept_positions",
           "packed_slot_ids", "np_attention"]

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


# --- a llava-hf checkpoint directory at the real geometry: weights, tokenizer and processor files --------------

_CORPUS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
           "detailed, and polite answers to the user's questions. USER: ASSISTANT: [INST] [/INST] Is there a "
           "dog in the image? Answer the question using a single word or phrase. yes no Yes No What color is the "
           "car? Answer with the option's letter from the given choices directly. A. B. C. D. Context: 0123456789")


def _byte_level_tokenizer(directory: pathlib.Path) -> transformers.PreTrainedTokenizerFast:
  """A byte-level BPE tokenizer (any text encodes) trained on a few prompts, with <s>, </s>, <unk>, <pad> and the
  <image> token, saved as a llava-hf tokenizer (tokenizer.json + tokenizer_config.json)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models as tok_models, pre_tokenizers, processors, trainers  # pylint: disable=g-import-not-at-top
  specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
  tok = tokenizers.Tokenizer(tok_models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([_CORPUS] * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                     special_tokens=[("<s>", tok.token_to_id("<s>"))])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>", pad_token="<pad>",
                                              extra_special_tokens={"image_token": "<image>"})
  fast.padding_side = "left"
  fast.save_pretrained(directory)
  return fast


def tiny_llava_hf(tmp_path, family: str = "llava_next", *, seed: int = 0, text: str = "llama",
                  name: str | None = None, text_layers: int = 4, crop: int = 336) -> pathlib.Path:
  """A llava-hf checkpoint directory at the real geometry (CLIP 336 px, 14 px patches: 576 tokens per crop; NeXT
  with the LLaVA-1.6 pinpoints: 2,880 nominal tokens) with tiny widths, random weights, and its tokenizer and
  processor files, as `AutoProcessor.from_pretrained` and `models.load_pretrained` read them. `crop` (a multiple
  of 14) scales the geometry down for fast tests: the pinpoints scale with it."""
  directory = pathlib.Path(tmp_path) / (name or f"{family}_hf")
  directory.mkdir(parents=True, exist_ok=True)
  tokenizer = _byte_level_tokenizer(directory)
  image_token = tokenizer.convert_tokens_to_ids("<image>")
  torch.manual_seed(seed)
  vision = tiny_vision_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=crop, patch_size=14)
  lm = tiny_text_config(text, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
  mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
  if family == "llava_next":
    pinpoints = [[h * crop // 336, w * crop // 336] for h, w in ((336, 672), (672, 336), (672, 672), (1008, 336),
                                                                   (336, 1008))]
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=lm, image_token_index=image_token,
                                          image_grid_pinpoints=pinpoints)
    model = _finish(transformers.LlavaNextForConditionalGeneration(config), seed)
    image_processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints,
        image_mean=mean, image_std=std)
    processor = transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                                vision_feature_select_strategy="default",
                                                num_additional_image_tokens=1)
  elif family == "llava":
    config = transformers.LlavaConfig(vision_config=vision, text_config=lm, image_token_index=image_token,
                                      image_seq_length=(crop // 14) ** 2)
    model = _finish(transformers.LlavaForConditionalGeneration(config), seed)
    image_processor = transformers.LlavaImageProcessorPil(size={"shortest_edge": crop},
                                                          crop_size={"height": crop, "width": crop},
                                                          image_mean=mean, image_std=std)
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                            vision_feature_select_strategy="default",
                                            num_additional_image_tokens=1)
  else:
    raise ValueError(f"family must be 'llava' or 'llava_next', got {family!r}")
  model.save_pretrained(directory)
  processor.save_pretrained(directory)
  return directory


# --- batches for the tiny models and NumPy references of the port's decoder, shared by the pruning tests ---------


def prompt_rows(rng: np.random.RandomState, pre, counts, post, side: str = "left") -> tuple[np.ndarray, np.ndarray]:
  """Rows [pre text tokens; <image> x count; post text tokens] padded on `side`, text ids drawn from `rng` in
  [3, IMAGE_TOKEN_ID - 1): (ids int64[B, S], mask int64[B, S])."""
  lens = [a + c + b for a, c, b in zip(pre, counts, post)]
  s = max(lens)
  ids, mask = np.zeros((len(lens), s), np.int64), np.zeros((len(lens), s), np.int64)
  for r, (a, c, b) in enumerate(zip(pre, counts, post)):
    row = np.concatenate([rng.randint(3, IMAGE_TOKEN_ID - 1, a), np.full(c, IMAGE_TOKEN_ID),
                          rng.randint(3, IMAGE_TOKEN_ID - 1, b)])
    at = s - lens[r] if side == "left" else 0
    ids[r, at:at + lens[r]], mask[r, at:at + lens[r]] = row, 1
  return ids, mask


def mask_positions(mask: np.ndarray) -> np.ndarray:
  """Position ids of a padded batch: 0, 1, ... over the real tokens, 1 at padding (transformers' convention)."""
  return np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)


def padded_rows(rows, size: int, left: bool) -> np.ndarray:
  """Per-row lists -> int[B, size], -1 padding, packed to the right end (`left` padding) or the left."""
  out = np.full((len(rows), size), -1)
  for r, row in enumerate(rows):
    at = size - len(row) if left else 0
    out[r, at:at + len(row)] = row
  return out


def kept_positions(ids: np.ndarray, mask: np.ndarray, kept_ranks) -> list[list[int]]:
  """Per row, the input positions a pruned sequence holds: every real text token, plus the <image> positions whose
  rank in the row's image run is `in kept_ranks[r]` (a set of ranks, or range(n) for the first n)."""
  rows = []
  for r in range(ids.shape[0]):
    rank, row = 0, []
    for p in np.flatnonzero(mask[r]):
      if ids[r, p] == IMAGE_TOKEN_ID:
        if rank in kept_ranks[r]:
          row.append(p)
        rank += 1
      else:
        row.append(p)
    rows.append(row)
  return rows


def packed_slot_ids(hf: transformers.LlavaNextForConditionalGeneration, size, crops: int) -> np.ndarray:
  """transformers' LLaVA-NeXT packing (`pack_image_features`: canvas, unpad_image, newline column) of an index map
  over `crops` crops of NUM_PATCHES tokens: int[L] holding crop * NUM_PATCHES + token per slot, -1 at newlines."""
  ids = torch.arange(crops * NUM_PATCHES, dtype=torch.float32).reshape(crops, NUM_PATCHES, 1)
  with torch.no_grad():
    packed, _ = hf.model.pack_image_features([ids], torch.tensor([size]), "default",
                                             image_newline=torch.tensor([-1.0]))
  return packed[0][:, 0].numpy().astype(int)


def np_attention(model, layer: int, hidden, positions, mask) -> tuple[np.ndarray, np.ndarray]:
  """NumPy reference of the port's decoder `layer`'s full attention over its input hidden float[B, S, D]:
  (probs float64[B, H, S, S], causal + padding masked; post-RoPE keys float64[B, S, Hkv, Dh])."""
  c = model.config.text
  block = model.language_model.layer(layer)
  w = lambda lin: np.asarray(lin.kernel[...], np.float64)
  x = np.asarray(hidden, np.float64)
  b, s, _ = x.shape
  xn = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + c.rms_norm_eps) * np.asarray(block.input_layernorm.scale[...])
  q = (xn @ w(block.self_attn.q_proj)).reshape(b, s, c.num_attention_heads, c.head_dim)
  k = (xn @ w(block.self_attn.k_proj)).reshape(b, s, c.num_key_value_heads, c.head_dim)
  inv = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)
  angle = np.asarray(positions, np.float64)[..., None] * inv
  cos, sin = (np.concatenate([f(angle)] * 2, -1)[:, :, None] for f in (np.cos, np.sin))
  rot = lambda v: np.concatenate([-v[..., c.head_dim // 2:], v[..., :c.head_dim // 2]], -1)
  q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
  kk = np.repeat(k, c.num_attention_heads // c.num_key_value_heads, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, kk) / np.sqrt(c.head_dim)
  allowed = np.asarray(mask, bool)[:, None, None, :] & np.tril(np.ones((s, s), bool))[None, None]
  logits = np.where(allowed, logits, -np.inf)
  top = np.max(logits, -1, keepdims=True)
  e = np.where(allowed, np.exp(logits - np.where(np.isfinite(top), top, 0)), 0)
  return e / np.maximum(e.sum(-1, keepdims=True), 1e-300), k
