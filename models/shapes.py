"""Random-weight model shapes: the transformers configs of LLaVA and Qwen2.5-VL models at named sizes, without a
checkpoint.

    hf = shapes.hf_config(shapes.SHAPES["llava-next-7b"])     # a transformers LlavaNextConfig
    model_type = hf.to_dict()["model_type"]                    # -> models.backbones.BACKBONES

The speed benchmark (`experiments.bench.e2e`) builds models at these shapes with random weights, and the memory
model (`experiments.bench.shard_memory`) sizes them on meshes; the tests use "tiny-next" and "tiny-qwen".

Qwen2.5-VL shapes are the hub checkpoints' config.json values (Qwen/Qwen2.5-VL-7B-Instruct, -3B-Instruct; the
legacy flat files, read as transformers 5 nests them), checked against ../shared/BACKBONES.md section 2 and
transformers' `configuration_qwen2_5_vl.py`, whose class defaults differ (text: the 72B; vision hidden_size 3584,
tokens_per_second 4; rms_norm_eps 1e-5): every field is spelled out here.
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
# The Qwen2.5-VL ViT of the 3B and 7B checkpoints (32 blocks, 1280 wide, full attention in 7, 15, 23, 31; 112 px
# windows = 4 x 4 merged tokens); out_hidden_size is the decoder's width.
_QWEN_VIT = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                 temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                 tokens_per_second=2, hidden_act="silu")
_MROPE = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}
# Qwen2.5-7B / -3B decoders (q/k/v bias, no o bias, GQA, M-RoPE). 7B untied, 3B tied.
_QWEN_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=128000,
                rope_parameters=_MROPE, tie_word_embeddings=False)
_QWEN_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128000,
                rope_parameters=_MROPE, tie_word_embeddings=True)


@dataclasses.dataclass(frozen=True)
class Shape:
  """A random-weight model: transformers config fields of the two towers, the family and the image size."""
  model_type: str                 # its `models.backbones` family: "llava_next" | "llava" | "qwen2_5_vl"
  vision: dict[str, Any]
  text: dict[str, Any]
  image_size: tuple[int, int]     # (height, width) of every image; 672 x 672 is 5 crops on LLaVA-NeXT; on Qwen a
                                  # multiple of 28 (the processor's output): 1008 x 1008 is the papers' 1,296 tokens
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
    # Qwen2.5-VL at the papers' 1008 x 1008 image: 72 x 72 patches, 1,296 merged tokens (VLMEvalKit's min_pixels).
    "qwen2.5-vl-7b": Shape("qwen2_5_vl", dict(_QWEN_VIT, out_hidden_size=3584), _QWEN_7B, (1008, 1008), ()),
    "qwen2.5-vl-3b": Shape("qwen2_5_vl", dict(_QWEN_VIT, out_hidden_size=2048), _QWEN_3B, (1008, 1008), ()),
    # Smoke: a 4-block ViT (full attention in blocks 1 and 3) with 56 px windows (2 x 2 merged tokens) on a 140 x 196
    # image (5 x 7 merged tokens: 12 windows, partial ones at the bottom and right edges), a 28-layer decoder (the
    # 7B's depth: the papers' Stage II layers).
    "tiny-qwen": Shape("qwen2_5_vl", dict(_QWEN_VIT, depth=4, hidden_size=32, intermediate_size=48, num_heads=2,
                                          window_size=56, fullatt_block_indexes=[1, 3], out_hidden_size=64),
                       dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=28,
                            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                            max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None,
                            eos_token_id=None, rope_parameters=dict(_MROPE, mrope_section=[2, 3, 3])),
                       (140, 196), ()),
}

# transformers' Qwen2_5_VLConfig token ids (the hub checkpoints'): image, video, vision start, vision end.
_QWEN_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653)


def hf_config(shape: Shape):
  """The transformers config of a random-weight shape (LLaVA: image token = the last id of the vocabulary; Qwen:
  the hub's token ids, or the last four ids of a vocabulary too small for them)."""
  import transformers  # pylint: disable=g-import-not-at-top
  text = dict(shape.text)
  if shape.model_type == "qwen2_5_vl":
    vocab = text["vocab_size"]
    tokens = _QWEN_TOKENS if max(_QWEN_TOKENS.values()) < vocab else {
        name: vocab - 1 - i for i, name in enumerate(_QWEN_TOKENS)}
    return transformers.Qwen2_5_VLConfig(vision_config=dict(shape.vision), text_config=text,
                                         tie_word_embeddings=text["tie_word_embeddings"], **tokens)
  vision = transformers.CLIPVisionConfig(**shape.vision)
  text_config = transformers.LlamaConfig(**text)
  image_token = text["vocab_size"] - 1
  if shape.model_type == "llava_next":
    return transformers.LlavaNextConfig(vision_config=vision, text_config=text_config, image_token_index=image_token,
                                        image_grid_pinpoints=[list(p) for p in shape.pinpoints])
  tokens = (shape.vision["image_size"] // shape.vision["patch_size"]) ** 2
  return transformers.LlavaConfig(vision_config=vision, text_config=text_config, image_token_index=image_token,
                                  image_seq_length=tokens)
