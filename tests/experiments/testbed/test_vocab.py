"""Tests for experiments.testbed.vocab: the saved tokenizer round-trips through transformers and feeds a
LlavaNextProcessor."""

import json
import os
import re

import numpy as np
import pytest
from transformers import AutoTokenizer, LlavaNextProcessor, PreTrainedTokenizerFast

from experiments.synthvqa import vqa
from experiments.testbed import vocab


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return vocab.save_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def examples():
  return vqa.make_split("validation", 70, seed=0)


def _reference_ids(tok_dir, text):
  """Lowercase, special tokens first, then runs of word chars / runs of punctuation, looked up in tokenizer.json."""
  with open(os.path.join(tok_dir, "tokenizer.json")) as f:
    table = json.load(f)["model"]["vocab"]
  ids = [table["<s>"]]
  for piece in re.split(r"(<pad>|<s>|</s>|<unk>|<image>)", text):
    if piece in vocab.SPECIAL_TOKENS:
      ids.append(table[piece])
    else:
      ids += [table.get(w, table["<unk>"]) for w in re.findall(r"\w+|[^\w\s]+", piece.lower())]
  return ids


def test_files_written(tok_dir):
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    assert os.path.exists(os.path.join(tok_dir, name))
  with open(os.path.join(tok_dir, "special_tokens_map.json")) as f:
    assert json.load(f)["eos_token"] == "</s>"


def test_auto_tokenizer_round_trip(tok_dir, examples):
  tok = AutoTokenizer.from_pretrained(tok_dir)
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
  assert tok.image_token == "<image>" and tok.convert_tokens_to_ids("<image>") == 4
  assert len(tok) == len(vocab.words())
  for ex in examples:
    text = vocab.prompt(ex.question, ex.answer)
    ids = tok(text)["input_ids"]
    assert ids == _reference_ids(tok_dir, text)
    assert tok.unk_token_id not in ids
    assert ids[-2:] == [tok.convert_tokens_to_ids(ex.answer), tok.eos_token_id]
    words = re.findall(r"\w+|[^\w\s]+", text.replace("<image>", " ").replace("</s>", " ").lower())
    assert tok.decode(ids, skip_special_tokens=True) == " ".join(words)
  assert tok.convert_ids_to_tokens(tok("ASSISTANT: zebra")["input_ids"]) == ["<s>", "assistant", ":", "<unk>"]


def test_fast_tokenizer_class_loads_too(tok_dir):
  tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
  assert tok("<image><image> red")["input_ids"] == _reference_ids(tok_dir, "<image><image> red")


def test_every_answer_is_one_token(tok_dir):
  tok = AutoTokenizer.from_pretrained(tok_dir)
  for answer in vqa.answer_vocab():
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 and ids[0] != tok.unk_token_id, answer


def test_prompt_template():
  assert vocab.prompt("what color is the star?") == \
      "USER: <image>\nwhat color is the star? Answer with one word. ASSISTANT:"
  assert vocab.prompt("how many rings are there?", "two").endswith("ASSISTANT: two</s>")
  with pytest.raises(ValueError, match="answer_vocab"):
    vocab.prompt("what color is the star?", "magenta")
  with pytest.raises(ValueError, match="<image>"):
    vocab.prompt("<image> what?")


def test_llava_next_processor_expands_image_tokens(tok_dir, examples):
  tok = AutoTokenizer.from_pretrained(tok_dir)
  processor = vocab.make_processor(tok)
  assert isinstance(processor, LlavaNextProcessor)
  crop, patch = vocab.CROP_SIZE, vocab.PATCH_SIZE
  exact = [ex for ex in examples if tuple(ex.image.shape[:2]) in vocab.GRID_PINPOINTS][:4]
  assert len({ex.image.shape for ex in exact}) >= 2
  out = processor(text=[vocab.prompt(ex.question) for ex in exact], images=[ex.image for ex in exact],
                  return_tensors="np", padding=True)
  for row, ex in zip(out["input_ids"], exact):
    h, w = ex.image.shape[:2]
    # Base view + the anyres grid at full resolution (no padding for exact pinpoints) + one newline per grid row.
    expected = (crop // patch) ** 2 + (h // patch) * (w // patch) + h // patch
    assert int(np.sum(row == tok.image_token_id)) == expected
  np.testing.assert_array_equal(out["image_sizes"], [ex.image.shape[:2] for ex in exact])
  assert out["pixel_values"].shape[-3:] == (3, crop, crop)


def test_image_processor_rejects_bad_pinpoints():
  with pytest.raises(ValueError, match="multiples"):
    vocab.make_image_processor(48, ((96, 100),))
