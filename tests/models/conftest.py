"""Tiny random LLaVA-1.5 / LLaVA-NeXT checkpoints (`model_factories`, LLaMA decoder, seed 0) and their ports, built
once per test module that asks for them."""

import pytest

import model_factories as mf
from models import loading


@pytest.fixture(scope="module")
def llava_pair(tmp_path_factory):
  """(transformers LlavaForConditionalGeneration, the port loaded from its save_pretrained directory)."""
  hf, path = mf.tiny_llava(tmp_path_factory.mktemp("llava"), "llama")
  return hf, loading.load_pretrained(path)


@pytest.fixture(scope="module")
def llava_next_pair(tmp_path_factory):
  """(transformers LlavaNextForConditionalGeneration, the port loaded from its save_pretrained directory)."""
  hf, path = mf.tiny_llava_next(tmp_path_factory.mktemp("llava_next"), "llama")
  return hf, loading.load_pretrained(path)


@pytest.fixture(scope="module")
def llava(llava_pair):
  return llava_pair[1]


@pytest.fixture(scope="module")
def llava_next(llava_next_pair):
  return llava_next_pair[1]
