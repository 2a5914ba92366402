"""The testbed tokenizer: a word-level vocabulary closed over the benchmark's prompts, questions and answers.

Axes: S text tokens of a sequence.

`save_tokenizer(directory)` writes tokenizer.json, tokenizer_config.json and special_tokens_map.json; transformers'
`AutoTokenizer.from_pretrained(directory)` (or `PreTrainedTokenizerFast`) loads it, and `make_processor` wraps it with
a LLaVA-NeXT image processor into a `LlavaNextProcessor`, which expands each "<image>" into the model's visual tokens.

Tokenization: lowercase, then split into runs of word characters and runs of punctuation (the `Whitespace`
pre-tokenizer: "star?" -> "star", "?"), each run one token; "<image>" and the other special tokens are matched first,
so "<image><image>" is two tokens. Unknown words map to "<unk>". A "<s>" is prepended to every sequence (LLaMA
style); "</s>" is not appended: training text ends with the literal "</s>" (see `prompt`). Every answer of
`vqa.answer_vocab()` is a single token, so the model answers in one decoding step.

Ids are fixed by construction: <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4, then the prompt words, question words and
answers in `vqa`'s fixed order. Padding side is the transformers default (right); set `tokenizer.padding_side =
"left"` for batched generation.

Prompt template (LLaVA/vicuna-style, one line per turn; `PROMPT`, the testbed backbone's one definition of it):
    "USER: <image>\n{question} Answer with one word. ASSISTANT:"          (evaluation; the model continues)
    "USER: <image>\n{question} Answer with one word. ASSISTANT: {answer}</s>"   (training; loss on the last 2 tokens)
"""

import json
import os

import tokenizers
from tokenizers import normalizers, pre_tokenizers, processors

from experiments.synthvqa import vqa

__all__ = [
    "PAD", "BOS", "EOS", "UNK", "IMAGE", "SPECIAL_TOKENS", "PROMPT", "CROP_SIZE", "PATCH_SIZE", "GRID_PINPOINTS",
    "words", "build_tokenizer", "save_tokenizer", "load_tokenizer", "prompt", "make_image_processor",
    "make_processor",
]

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
PROMPT = "USER: <image>\n{question} Answer with one word. ASSISTANT:"

# Image-size assumptions of the testbed (see experiments.synthvqa.scenes): a 48-px vision crop, 8-px patches (6x6 = 36
# tokens per crop) and anyres pinpoints (height, width) that the default scene sizes fit exactly (96x128 / 128x96 get padded).
CROP_SIZE = 48
PATCH_SIZE = 8
GRID_PINPOINTS = ((96, 96), (96, 144), (144, 96))


def _split_words(text: str) -> list[str]:
  return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())]


def words() -> tuple[str, ...]:
  """The vocabulary in id order: special tokens, prompt-template words, question words, answers."""
  template = _split_words(PROMPT.replace(IMAGE, " ").replace("{question}", " "))
  return tuple(dict.fromkeys(SPECIAL_TOKENS + tuple(template) + vqa.question_words() + vqa.answer_vocab()))


def build_tokenizer() -> tokenizers.Tokenizer:
  """The word-level `tokenizers.Tokenizer` (see the module docstring for the rules)."""
  vocab = {w: i for i, w in enumerate(words())}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=UNK))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                     special_tokens=[(BOS, vocab[BOS])])
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  return tok


def save_tokenizer(directory: str) -> str:
  """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`; returns it."""
  os.makedirs(directory, exist_ok=True)
  build_tokenizer().save(os.path.join(directory, "tokenizer.json"))
  special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      **special,
      "image_token": IMAGE,  # read by LlavaNextProcessor as tokenizer.image_token
      "model_max_length": 4096,
      "padding_side": "right",
      "clean_up_tokenization_spaces": False,
  }
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump({**special, "additional_special_tokens": [IMAGE]}, f, indent=2)
  return directory


def load_tokenizer(directory: str):
  """`AutoTokenizer.from_pretrained(directory)` (a transformers fast tokenizer)."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(directory, "tokenizer.json")):
    raise ValueError(f"no tokenizer.json in {directory}; write one with experiments.testbed.vocab.save_tokenizer")
  return AutoTokenizer.from_pretrained(directory)


def prompt(question: str, answer: str | None = None) -> str:
  """The chat prompt for `question`; with `answer`, the full training text ending in " {answer}</s>"."""
  if IMAGE in question or "\n" in question:
    raise ValueError(f"question must be plain text without {IMAGE} or newlines, got {question!r}")
  text = PROMPT.format(question=question)
  if answer is None:
    return text
  if answer not in vqa.answer_vocab():
    raise ValueError(f"answer {answer!r} is not in vqa.answer_vocab()")
  return f"{text} {answer}{EOS}"


def make_image_processor(crop_size: int = CROP_SIZE, pinpoints=GRID_PINPOINTS):
  """A LLaVA-NeXT (anyres) image processor for `crop_size`-px crops and (height, width) `pinpoints`.

  The PIL backend is used (the default backend needs torchvision, which the project does not install); CLIP's
  normalisation constants are the processor's defaults.
  """
  from transformers import LlavaNextImageProcessorPil  # pylint: disable=g-import-not-at-top
  bad = [p for p in pinpoints if len(p) != 2 or p[0] % crop_size or p[1] % crop_size]
  if bad:
    raise ValueError(f"pinpoints must be (height, width) multiples of crop_size={crop_size}, got {bad}")
  return LlavaNextImageProcessorPil(size={"shortest_edge": crop_size}, crop_size={"height": crop_size,
                                    "width": crop_size}, image_grid_pinpoints=[list(p) for p in pinpoints])


def make_processor(tokenizer, image_processor=None, patch_size: int = PATCH_SIZE,
                   vision_feature_select_strategy: str = "full", num_additional_image_tokens: int = 0):
  """`LlavaNextProcessor` over `tokenizer` (a loaded transformers tokenizer) and `image_processor`.

  The defaults describe a vision tower without a CLS token whose patch features are all kept ("full"); match them
  to the testbed model's config, since they decide how many "<image>" tokens each image expands into.
  """
  from transformers import LlavaNextProcessor  # pylint: disable=g-import-not-at-top
  return LlavaNextProcessor(image_processor=image_processor or make_image_processor(), tokenizer=tokenizer,
                            patch_size=patch_size, vision_feature_select_strategy=vision_feature_select_strategy,
                            num_additional_image_tokens=num_additional_image_tokens)
