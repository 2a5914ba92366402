"""How a backbone's examples become model inputs in the runner: the processor, the image it receives, the arrays of
a batch, their layout and the pruned prefill's image arguments. One object per kind of input (`INPUTS`), named by
the runner preset (`plan.Backbone.inputs`); `experiments.runner.evaluate` calls only these hooks, never asks which
family it runs.

Axes (`models` legend): B batch rows (one image each), N visual tokens per image (the bucket), E a flattened patch.

- `LLAVA` (LLaVA-1.5, LLaVA-NeXT, the testbed): the checkpoint's AutoProcessor; pixel_values float[B, 3, H, W] or
  float[B, P, 3, H, W] (crops padded to the most crops); `image_sizes`; every batch at the model's static bound of
  image tokens (`max_image_tokens`), so the image part of every program is one shape.
- `QWEN2_5_VL`: lmms-eval's `qwen2_5_vl` model wrapper (`lmms_eval/models/simple/qwen2_5_vl.py` at 75571cf, the
  commit ../shared/BACKBONES.md pins), what its requests carry:
  - the system message "You are a helpful assistant." and the user turn [image, text] through the checkpoint's chat
    template (`processor.apply_chat_template`);
  - each image encoded as a JPEG of quality 85 (`encode_image_to_data_url`, RGB), decoded and resized by
    `qwen_vl_utils.fetch_image` (`smart_resize` to multiples of 28 between min_pixels 256 x 28 x 28 and max_pixels
    1,605,632 = 2048 x 28 x 28, the wrapper's defaults; PIL bicubic), then the processor built with the same bounds
    (whose own resize then keeps the size): 256 to 2,048 merged tokens per image (a 640 x 480 image: 17 x 23 = 391).
    The wrapper's `min_pixels` / `max_pixels` model_args are the runner's `--min_pixels` / `--max_pixels`
    (`QwenInputs(min_pixels=, max_pixels=)`, `plan.backbone_of`): VLMEvalKit's 1280 / 16384 x 28 x 28 give the
    paper's 1,296 for a square image (640 x 480: 1,302);
  - greedy decoding, eos the tokenizer's, max_new_tokens the task yaml's, else the wrapper's default 32,768 (the
    llava wrapper's is 1,024: `base.Task.length_from_wrapper`); the stop strings are the yaml's `until` less "\\n\\n".
  Token counts vary per image, so each batch's N is a bucket of its largest image (`bucket`: at most four per
  doubling, under 25% padding): the processor's patch rows are padded per image to N x 4 rows
  (`models.qwen2_5_vl.pad_patches`, float[B, 4 N, E], sharded by row like LLaVA's pixel_values) and the layout reads
  them in blocks, the padding in windows and frames of its own, so the pruned results do not depend on the bucket
  (tests/experiments/test_qwen_runner.py). A batch's prompt length is its text bound + N: a benchmark compiles one
  program per (text bound, bucket) and run; the runner reports the buckets and programs it compiled.
"""

import dataclasses
import io
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from experiments.runner import images as images_lib

__all__ = ["LlavaInputs", "QwenInputs", "LLAVA", "QWEN2_5_VL", "INPUTS", "bucket", "smart_resize", "lmms_eval_image"]


def _round_up(n: int, step: int) -> int:
  return -(-n // step) * step


def bucket(n: int) -> int:
  """The static visual-token count of an image of `n` tokens: n rounded up to a multiple of a quarter of the power
  of two below it (at least 16): 391 -> 448, 1296 -> 1536, 2691 -> 3072; at most four buckets per doubling."""
  if n < 1:
    raise ValueError(f"an image has at least one token, got {n}")
  return _round_up(n, max(16, 2 ** (int(math.log2(n)) - 2)))


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
  """qwen_vl_utils' `smart_resize` (QwenLM's qwen-vl-utils): each side rounded to a multiple of `factor` (at least
  one), then scaled down (floor) over max_pixels or up (ceil) under min_pixels, keeping the aspect ratio."""
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"absolute aspect ratio must be at most 200, got {max(height, width) / min(height, width)}")
  h = max(factor, round(height / factor) * factor)
  w = max(factor, round(width / factor) * factor)
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
  return h, w


def lmms_eval_image(image: np.ndarray, min_pixels: int, max_pixels: int) -> np.ndarray:
  """uint8[H, W, 3] -> what lmms-eval's qwen2_5_vl wrapper hands its processor: a JPEG of quality 85 decoded, resized
  (PIL bicubic) to `smart_resize`'s size."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(image).convert("RGB").save(buffer, format="JPEG", quality=85)
  with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
    rgb = decoded.convert("RGB")
  h, w = smart_resize(rgb.height, rgb.width, min_pixels, max_pixels)
  if not h or not w:      # qwen_vl_utils floors a side to 0 (PIL then refuses the size)
    raise ValueError(f"a {rgb.width} x {rgb.height} image resizes to {w} x {h} under max_pixels={max_pixels}: "
                     "raise --max_pixels")
  return np.asarray(rgb.resize((w, h), Image.BICUBIC))


def _pad_ids(arrays: dict, length: int, tokenizer) -> dict:
  """input_ids / attention_mask padded to `length` on the tokenizer's padding side."""
  ids, mask = arrays["input_ids"], arrays["attention_mask"]
  if length < ids.shape[1]:
    raise ValueError(f"length={length} is shorter than the batch's {ids.shape[1]} tokens")
  pad = (length - ids.shape[1], 0) if tokenizer.padding_side == "left" else (0, length - ids.shape[1])
  return dict(arrays, input_ids=np.pad(ids, ((0, 0), pad), constant_values=tokenizer.pad_token_id or 0),
              attention_mask=np.pad(mask, ((0, 0), pad)))


def text_bound(arrays: Mapping[str, np.ndarray], image_token_id: int) -> int:
  """The static bound on real non-image tokens per row (a multiple of 8)."""
  real = np.asarray(arrays["attention_mask"]) & (np.asarray(arrays["input_ids"]) != image_token_id)
  return _round_up(int(real.sum(-1).max()), 8)


class LlavaInputs:
  """LLaVA-1.5 / LLaVA-NeXT (and the testbed): see the module docstring."""
  name = "llava"

  def load_processor(self, checkpoint: str, protocol: str | None):
    del protocol
    from transformers import AutoProcessor  # pylint: disable=g-import-not-at-top
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    return processor

  def configure(self, backbone: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """These hooks under the invocation's `--min_pixels` / `--max_pixels`: LLaVA's take no pixel bounds (its
    processors resize to fixed crops), so giving one is a ValueError naming it."""
    given = [f"--{name}" for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
             if value is not None]
    if given:
      raise ValueError(f"{' and '.join(given)}: --backbone={backbone}'s inputs take no pixel bounds (its processor "
                       "resizes to fixed crops); they apply to --backbone=qwen2_5_vl")
    return self

  def settings(self, protocol: str | None) -> dict[str, Any]:
    """What this input kind adds to the rows' hashed settings (`plan.run_hash_fields`): nothing."""
    del protocol
    return {}

  def system(self, protocol: str | None) -> str | None:
    del protocol
    return None

  def max_new_tokens(self, task) -> int | None:
    """The answer length when the task's yaml sets none (None: the task's own value)."""
    del task
    return None

  def stops(self, stops: Sequence[str]) -> tuple[str, ...]:
    return tuple(stops)

  def image(self, image: np.ndarray, aspect: str, processor, protocol: str | None) -> np.ndarray:
    del protocol
    return images_lib.prepare(image, aspect, getattr(processor.image_processor, "image_mean", None))

  def image_tokens(self, model, processor, image: np.ndarray) -> int:
    del processor
    h, w = image.shape[:2]
    return int(np.asarray(model.layout(np.array([[h, w]]), 1).counts)[0])

  def visual_len(self, model, counts: Sequence[int]) -> int:
    """Every batch at the model's static bound (one image shape for the whole run)."""
    del counts
    return model.config.max_image_tokens

  def encode(self, model, processor, texts, images, length: int | None, visual_len: int) -> dict[str, np.ndarray]:
    del visual_len
    enc = processor(images=list(images), text=list(texts), return_tensors="np", padding=True,
                    input_data_format="channels_last")
    arrays = dict(input_ids=enc["input_ids"].astype(np.int32), attention_mask=enc["attention_mask"].astype(bool),
                  pixel_values=enc["pixel_values"].astype(np.float32))
    arrays = _pad_ids(arrays, length or _round_up(arrays["input_ids"].shape[1], 32), processor.tokenizer)
    if "image_sizes" in enc:
      arrays["image_sizes"] = enc["image_sizes"].astype(np.int32)
    if arrays["pixel_values"].ndim == 5:   # crops per image: one crop count for every batch (one compile)
      from models import anyres  # pylint: disable=g-import-not-at-top
      arrays["pixel_values"] = anyres.pad_crops(arrays["pixel_values"], model.config.max_num_crops)
    return arrays

  def layout(self, model, arrays: Mapping[str, Any], visual_len: int | None = None):
    del visual_len
    return model.layout(arrays.get("image_sizes"), len(arrays["input_ids"]))

  def prefill_args(self, model, arrays: Mapping[str, Any], visual_len: int) -> dict[str, Any]:
    return dict(image_sizes=arrays.get("image_sizes"), visual_len=visual_len)


@dataclasses.dataclass(frozen=True)
class QwenInputs(LlavaInputs):
  """Qwen2.5-VL on lmms-eval's qwen2_5_vl wrapper: see the module docstring. min_pixels / max_pixels: the wrapper's
  model_args of those names (`--min_pixels` / `--max_pixels`; None: the protocol's `PIXELS`)."""
  min_pixels: int | None = None
  max_pixels: int | None = None
  name = "qwen2_5_vl"
  # (min_pixels, max_pixels) per protocol: lmms-eval's wrapper defaults (256 x 28 x 28, 1605632 = 2048 x 28 x 28).
  PIXELS = {"lmms_eval": (256 * 28 * 28, 1605632)}
  SYSTEM = "You are a helpful assistant."     # the wrapper's default system_prompt, sent as a system message
  MAX_NEW_TOKENS = 32768                      # the wrapper's default when the task's yaml sets none

  def __post_init__(self):
    # smart_resize (transformers' and qwen_vl_utils') takes any positive bounds, rounding each side to 28: no multiple
    # is needed. Under one merged token (28 x 28) qwen_vl_utils floors an image's sides to 0.
    for name, least, why in (("min_pixels", 1, "pixels"), ("max_pixels", 28 * 28, "one merged token, 28 x 28")):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
        raise ValueError(f"--{name} must be an integer >= {least} ({why}), got {value!r}")

  def configure(self, backbone: str, min_pixels: int | None = None, max_pixels: int | None = None) -> "QwenInputs":
    del backbone
    return dataclasses.replace(self, min_pixels=min_pixels, max_pixels=max_pixels)

  def pixels(self, protocol: str | None) -> tuple[int, int]:
    """(min_pixels, max_pixels): the flags', else the protocol's. ValueError for a protocol without Qwen inputs or
    min_pixels > max_pixels (qwen_vl_utils asserts max_pixels >= min_pixels)."""
    if protocol not in self.PIXELS:
      raise ValueError(f"--protocol={protocol}: Qwen2.5-VL runs the {', '.join(self.PIXELS)} protocol (lmms-eval's "
                       "qwen2_5_vl wrapper); the LLaVA repository's scripts have no Qwen path")
    low, high = self.PIXELS[protocol]
    low, high = self.min_pixels or low, self.max_pixels or high
    if low > high:
      said = lambda name, value: f"--{name}={value}" if getattr(self, name) else f"the {protocol} {name} {value}"
      raise ValueError(f"{said('min_pixels', low)} exceeds {said('max_pixels', high)}: qwen_vl_utils needs "
                       "min_pixels <= max_pixels")
    return low, high

  def load_processor(self, checkpoint: str, protocol: str | None):
    """The checkpoint's image processor (min / max pixels of the protocol) and tokenizer in transformers'
    Qwen2_5_VLProcessor, without its video processor (it needs torchvision, which the runtime lacks; images only)."""
    import transformers  # pylint: disable=g-import-not-at-top
    min_pixels, max_pixels = self.pixels(protocol)
    image_processor = transformers.AutoImageProcessor.from_pretrained(checkpoint, min_pixels=min_pixels,
                                                                      max_pixels=max_pixels)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.padding_side = "left"
    return _images_only_processor()(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                    chat_template=_chat_template(checkpoint, tokenizer))

  def settings(self, protocol: str | None) -> dict[str, Any]:
    min_pixels, max_pixels = self.pixels(protocol)
    return dict(min_pixels=min_pixels, max_pixels=max_pixels, image_encoding="jpeg85", system_prompt=self.SYSTEM)

  def system(self, protocol: str | None) -> str | None:
    self.pixels(protocol)
    return self.SYSTEM

  def max_new_tokens(self, task) -> int | None:
    return self.MAX_NEW_TOKENS if task.length_from_wrapper else None

  def stops(self, stops: Sequence[str]) -> tuple[str, ...]:
    return tuple(s for s in stops if s != "\n\n")       # the wrapper never cuts at "\n\n"

  def image(self, image: np.ndarray, aspect: str, processor, protocol: str | None) -> np.ndarray:
    if aspect != "native":
      raise ValueError(f"Qwen2.5-VL takes images at their native size, not {aspect!r}")
    return lmms_eval_image(image, *self.pixels(protocol))

  def image_tokens(self, model, processor, image: np.ndarray) -> int:
    """The merged tokens the processor gives `image` (its own smart_resize; transformers' rules)."""
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil  # pylint: disable=g-import-not-at-top
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    h, w = pil.smart_resize(image.shape[0], image.shape[1], factor, ip.size["shortest_edge"], ip.size["longest_edge"])
    return (h // factor) * (w // factor)

  def visual_len(self, model, counts: Sequence[int]) -> int:
    """The batch's bucket (`bucket` of its largest image), at most the model's bound."""
    return min(bucket(max(int(c) for c in counts)), model.config.max_image_tokens)

  def encode(self, model, processor, texts, images, length: int | None, visual_len: int) -> dict[str, np.ndarray]:
    from models import qwen2_5_vl  # pylint: disable=g-import-not-at-top
    enc = processor(images=list(images), text=list(texts), return_tensors="np", padding=True,
                    input_data_format="channels_last")
    grid = enc["image_grid_thw"].astype(np.int32)
    if len(grid) != len(texts):
      raise ValueError(f"{len(texts)} prompts hold {len(grid)} images: the runner feeds one image per prompt")
    block = visual_len * model.config.vision.merge_unit
    arrays = dict(input_ids=enc["input_ids"].astype(np.int32), attention_mask=enc["attention_mask"].astype(bool),
                  pixel_values=qwen2_5_vl.pad_patches(enc["pixel_values"].astype(np.float32), grid, block),
                  image_grid_thw=grid)
    # The prompt length follows the text bound and the bucket: one program per (bound, bucket).
    length = length or text_bound(arrays, model.config.image_token_id) + visual_len
    return _pad_ids(arrays, length, processor.tokenizer)

  def layout(self, model, arrays: Mapping[str, Any], visual_len: int | None = None):
    grid = np.asarray(arrays["image_grid_thw"])
    return model.layout(grid, len(grid), num_tokens=visual_len, block=arrays["pixel_values"].shape[1])

  def prefill_args(self, model, arrays: Mapping[str, Any], visual_len: int) -> dict[str, Any]:
    return dict(image_grid_thw=np.asarray(arrays["image_grid_thw"]), layout=self.layout(model, arrays, visual_len),
                visual_len=visual_len)


def _chat_template(checkpoint: str, tokenizer) -> str | None:
  """The checkpoint's processor chat template (chat_template.jinja, or chat_template.json's as older saves write it),
  else the tokenizer's (None: none; rendering then raises naming --conv_template)."""
  jinja, legacy = os.path.join(checkpoint, "chat_template.jinja"), os.path.join(checkpoint, "chat_template.json")
  if os.path.exists(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  if os.path.exists(legacy):
    with open(legacy, encoding="utf-8") as f:
      return json.load(f).get("chat_template")
  return getattr(tokenizer, "chat_template", None)


def _images_only_processor():
  """transformers' Qwen2_5_VLProcessor whose video slot may stay empty (the class's own image path: token
  expansion, mm_token_type_ids)."""
  import transformers  # pylint: disable=g-import-not-at-top

  class ImagesOnly(transformers.Qwen2_5_VLProcessor):

    def check_argument_for_proper_class(self, argument_name, argument):
      if argument_name == "video_processor" and argument is None:
        return None
      return super().check_argument_for_proper_class(argument_name, argument)

  return ImagesOnly


LLAVA, QWEN2_5_VL = LlavaInputs(), QwenInputs()
INPUTS = {"llava": LLAVA, "qwen2_5_vl": QWEN2_5_VL}
