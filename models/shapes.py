"""Random-weight model shapes: the transformers configs of LLaVA models at named sizes, without a checkpoint.

    hf = shapes.hf_config(shapes.SHAPES["llava-next-7b"])     # a transformers LlavaNextConfig
    model_type = hf.to_dict()["model_type"]                    # -> models.backbones.BACKBONES

The speed benchmark (`experiments.bench.e2e`) builds models at these shapes with random weights, and the memory
model (`experiments.bench.shard_memory`) sizes them on meshes; the tests use "tiny-next".
"""

import dataclasses
from typing import Any

__all__ = ["Shape", "SHAPES", "hf_config"]


_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
_VIT_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=336, patch_size=14, projection_dim=768)
_VICUNA_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
# Vicuna-13B v1.5: the text tower of LLaVA-1.5-13B and LLaVA-NeXT-13B (no grouped-query attention).
_VICUNA_13B = dict(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                   num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096)


@dataclasses.dataclass(frozen=True)
class Shape:
  """A random-weight model: transformers config fields of the two towers, the family and the image size."""
  model_type: str                 # its `models.backbones` family: "llava_next" | "llava"
  vision: dict[str, Any]
  text: dict[str, Any]
  image_size: tuple[int, int]     # (height, width) of every image; 672 x 672 is 5 crops on LLaVA-NeXT
  pinpoints: tuple[tuple[int, int], ...] = _NEXT_PINPOINTS


SHAPES = {
    # The CPU shape: CLIP 256 wide x 6 layers at 336 px, LLaMA 512 wide x 8 layers, one 672 x 672 image.
    "scaled-next": Shape("llava_next", dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                            num_attention_heads=4, image_size=336, patch_size=14, projection_dim=256),
                         dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096),
                         (672, 672)),
    "llava-next-7b": Shape("llava_next", _VIT_L, _VICUNA_7B, (672, 672)),
    "llava-next-13b": Shape("llava_next", _VIT_L, _VICUNA_13B, (672, 672)),
    "llava-1.5-7b": Shape("llava", _VIT_L, dict(_VICUNA_7B, vocab_size=32000), (336, 336), ()),
    "llava-1.5-13b": Shape("llava", _VIT_L, dict(_VICUNA_13B, vocab_size=32000), (336, 336), ()),
    # Smoke: 56 px crops of 16 tokens (88 packed at 112 x 112), a narrow 32-layer decoder (the papers' schedules).
    "tiny-next": Shape("llava_next", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
                       dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=32,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
                       (112, 112), tuple((h // 6, w // 6) for h, w in _NEXT_PINPOINTS)),
}


def hf_config(shape: Shape):
  """The transformers config of a random-weight shape (image token = the last id of the vocabulary)."""
  import transformers  # pylint: disable=g-import-not-at-top
  text = dict(shape.text)
  vision = transformers.CLIPVisionConfig(**shape.vision)
  text_config = transformers.LlamaConfig(**text)
  image_token = text["vocab_size"] - 1
  if shape.model_type == "llava_next":
    return transformers.LlavaNextConfig(vision_config=vision, text_config=text_config, image_token_index=image_token,
                                        image_grid_pinpoints=[list(p) for p in shape.pinpoints])
  tokens = (shape.vision["image_size"] // shape.vision["patch_size"]) ** 2
  return transformers.LlavaConfig(vision_config=vision, text_config=text_config, image_token_index=image_token,
                                  image_seq_length=tokens)
