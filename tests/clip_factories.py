"""Tiny random CLIP checkpoints for CDPruner's CLIP text relevance (a helper module, not a test).

    path = tiny_clip(tmp_path / "clip", vision_hidden_size=32)     # vision width = the LLaVA tower's width

A `transformers.CLIPModel` (text tower of 2 layers, width 32, 16 positions per chunk; projection width 12) with every
parameter re-drawn by `model_factories._randomize`, saved with `save_pretrained`, plus a CLIP BPE tokenizer in the
OpenAI layout (vocab.json + merges.txt: the 256 byte characters, their end-of-word forms, a few merges, then
<|startoftext|> and <|endoftext|> as the two highest ids), as `models.clip_text.ClipTextRelevance` and transformers'
`CLIPTokenizerFast` read it. The vision width must equal the LLaVA vision tower's: CDPruner's image head
(`post_layernorm` + `visual_projection`) reads that tower's layer -2 features.
"""

import functools
import json
import pathlib

import numpy as np
import torch
import transformers

import model_factories as mf

__all__ = ["CHUNK", "MERGES", "VOCAB", "tiny_clip", "write_tokenizer", "text_tower",
           "official_text_embeds", "official_image_embeds"]

CHUNK = 16                     # max_position_embeddings of the tiny text tower (77 in OpenAI CLIP)
MERGES = (("t", "h"), ("th", "e</w>"), ("i", "s</w>"), ("a", "t</w>"), ("w", "h"), ("c", "at</w>"))


def _byte_chars() -> list[str]:
  """The 256 printable stand-ins of GPT-2/CLIP byte-level BPE, in the order their table builds them."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs, extra = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + extra)
      extra += 1
  return [chr(c) for c in cs]


VOCAB = 2 * 256 + len(MERGES) + 2


def write_tokenizer(directory: pathlib.Path) -> int:
  """vocab.json + merges.txt in the OpenAI CLIP layout (BOS, EOS = the two highest ids); returns the vocab size."""
  chars = _byte_chars()
  vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
  assert len(vocab) == VOCAB
  (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
  return len(vocab)


def tiny_clip(directory, *, vision_hidden_size: int, seed: int = 0, eos_token_id: int = 2,
              vision_layers: int = 1) -> pathlib.Path:
  """Writes a tiny random CLIP checkpoint and its tokenizer into `directory`; returns the directory.

  vision_hidden_size: width Dv of the vision side (post_layernorm, visual_projection's input).
  eos_token_id: the text config's (2, the legacy value of OpenAI's configs: pooling at argmax(input_ids)).
  vision_layers: the vision tower's depth (its weights are drawn before post_layernorm's, so it changes those).
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  write_tokenizer(directory)
  text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=CHUNK, eos_token_id=eos_token_id, bos_token_id=VOCAB - 2, pad_token_id=1,
              projection_dim=12)
  vision = dict(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                num_hidden_layers=vision_layers, num_attention_heads=4, image_size=28, patch_size=7, projection_dim=12,
                layer_norm_eps=1e-5)
  config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  for i, part in enumerate((model.text_model, model.vision_model, model.text_projection, model.visual_projection)):
    mf._randomize(part, seed + 10 * i)          # every parameter but the scalar logit_scale (never read)
  model.save_pretrained(directory)
  return directory


# --- CDPruner's official CLIP code (Theia-4869/CDPruner llava/model/multimodal_encoder/clip_encoder.py), in torch ---


@functools.cache
def text_tower(path) -> transformers.CLIPTextModelWithProjection:
  """transformers' text tower of the checkpoint at `path` (eager attention, eval), loaded once per path."""
  return transformers.CLIPTextModelWithProjection.from_pretrained(path, attn_implementation="eager").eval()


@functools.cache
def _tokenizer(path) -> transformers.CLIPTokenizerFast:
  return transformers.CLIPTokenizerFast.from_pretrained(path)


@functools.cache
def _image_head(path) -> transformers.CLIPVisionModelWithProjection:
  return transformers.CLIPVisionModelWithProjection.from_pretrained(path, attn_implementation="eager").eval()


def official_text_embeds(path, text: str) -> np.ndarray:
  """`CLIPVisionTower.forward`, the text stream, on the checkpoint at `path`: the question tokenized whole,
  zero-padded to a multiple of max_position_embeddings, cut into chunks, one batch through
  CLIPTextModelWithProjection: float32[M chunks, E]."""
  tokenizer = _tokenizer(path)
  tower = text_tower(path)
  p = tower.config.max_position_embeddings
  text_inputs = tokenizer(text=text, return_tensors="pt")
  segment = (text_inputs.input_ids.shape[1] - 1) // p + 1
  padding = p * segment - text_inputs.input_ids.shape[1]
  text_inputs = {k: torch.cat([v, v.new_zeros((v.shape[0], padding))], dim=1).reshape(-1, p)
                 for k, v in text_inputs.items()}
  with torch.no_grad():
    return tower(**text_inputs).text_embeds.numpy()


def official_image_embeds(path, features: np.ndarray) -> np.ndarray:
  """visual_projection(post_layernorm(features)) of the checkpoint at `path` (CLIPVisionModelWithProjection):
  float[..., N, Dv] -> float32[..., N, E]."""
  head = _image_head(path)
  with torch.no_grad():
    x = head.vision_model.post_layernorm(torch.tensor(features, dtype=torch.float32))
    return head.visual_projection(x.float()).numpy()
