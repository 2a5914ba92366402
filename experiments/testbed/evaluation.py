"""Evaluation of a testbed model: greedy answers (one token each) and per-family exact-match accuracy on the
benchmark, with all visual tokens or random Stage I pruning (`batches.encode(keep_fraction=...)`), and the same
answers from transformers for the parity check.

Axes: B batch, K kept image tokens per image (padded).
"""

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.synthvqa import vqa
from experiments.testbed import batches
from experiments.testbed import model as model_lib
from experiments.testbed import vocab
from models import anyres

__all__ = ["predict", "evaluate", "transformers_answers"]


@jax.jit
def _answer_logits(model, batch):
  return model_lib.forward(model, batch, batch["last"][:, None]).logits[:, 0]


def predict(model, batch: Mapping) -> np.ndarray:
  """Greedy first token of every row (the whole answer: answers are one token): int[B] token ids."""
  batch = {k: (v if k == "layout" else jnp.asarray(v)) for k, v in batch.items()}
  return np.asarray(jnp.argmax(_answer_logits(model, batch), axis=-1))


def evaluate(model, examples: Sequence[vqa.Example], batch_size: int = 32, *, processor=None,
             keep_fraction: float | None = None, seed: int = 0, return_predictions: bool = False):
  """Per-family exact-match accuracy of greedy answers (`vqa.accuracy_by_family`), full tokens or random Stage I.

  The last batch is padded with copies of its first example to keep one compiled shape. With `keep_fraction`, each
  image keeps that fraction of its visual tokens at random (seeded by `seed` and the example's batch row).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  hf_like = model_lib.hf_from_model(model)
  processor = processor or model_lib.make_processor(hf_like)
  words = vocab.words()
  predictions = []
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))
    batch = batches.encode(padded, processor, hf_like, keep_fraction=keep_fraction, seed=seed + start)
    if keep_fraction is not None:   # one compiled shape per fraction: pad K to the most any image can keep
      k = max(1, round(keep_fraction * anyres.max_num_features(*model_lib.geometry(hf_like))))
      pad = k - batch["keep_index"].shape[1]
      batch["keep_index"] = np.pad(batch["keep_index"], ((0, 0), (0, pad)))
      batch["keep_valid"] = np.pad(batch["keep_valid"], ((0, 0), (0, pad)))
    predictions += [words[t] for t in predict(model, batch)[:len(chunk)]]
  accuracy = vqa.accuracy_by_family(examples, predictions)
  return (accuracy, predictions) if return_predictions else accuracy


def transformers_answers(path: str, examples: Sequence[vqa.Example], batch_size: int = 16) -> list[str]:
  """Greedy answers (first token) of transformers' `LlavaNextForConditionalGeneration` loaded from the checkpoint
  directory `path` (eager attention, float32, CPU), on the same padded batches as `evaluate`. Needs torch (the test
  extra); for checking that the port and transformers answer alike."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.LlavaNextForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
  hf = model.config.to_dict()
  hf = dict(hf, vision_config=model.config.vision_config.to_dict())
  processor = model_lib.make_processor(hf, directory=path)
  words = vocab.words()
  answers = []
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    batch = batches.encode(chunk, processor, hf)
    with torch.no_grad():
      logits = model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                     attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
                     pixel_values=torch.tensor(batch["pixel_values"]),
                     image_sizes=torch.tensor(batch["image_sizes"], dtype=torch.long)).logits
    last = logits[torch.arange(len(chunk)), torch.tensor(batch["last"], dtype=torch.long)]
    answers += [words[t] for t in last.argmax(-1).tolist()]
  return answers
