"""The testbed: a small LLaVA-NeXT trained on the synthetic VQA benchmark (`experiments.synthvqa.vqa`), and the research
that trains and probes it.

This face exports what product code (the runner and its tests) uses: the model, its processor, its checkpoint and
its prompt. It imports only `model` and `vocab`: never the training code (targets, heads, losses, `train`, probes),
nor optax.

    from experiments import testbed
    hf = testbed.hf_config()                          # transformers-compatible LlavaNextConfig dict
    model = testbed.make_model(hf, seed=0)            # or models.load_pretrained(testbed.DEFAULT_CKPT)
    processor = testbed.make_processor(testbed.hf_from_model(model), directory=testbed.DEFAULT_CKPT)
    text = testbed.PROMPT.format(question="what color is the star?")

Modules, one job each:
  model        the model: config, initialisation for training from scratch, processor, the instrumented forward
  vocab        the word-level tokenizer, the prompt template and the image-size assumptions
  batches      `encode`: examples -> fixed-shape numpy batches (training targets, base-crop view, random Stage I)
  targets      dense training targets derived from each scene (patch labels, grounding, counting, relations)
  heads        the auxiliary heads (training only, not saved)
  losses       `LossWeights` and the training objective
  evaluation   greedy answers and per-family accuracy; transformers' answers for the parity check
  train        `python -m experiments.testbed.train`: trains and saves the checkpoint
  probes       linear probes of what the visual tokens encode; `python -m experiments.testbed.probe` runs them
"""

from experiments.testbed.model import DEFAULT_CKPT
from experiments.testbed.model import IMAGE_TOKEN_ID
from experiments.testbed.model import hf_config
from experiments.testbed.model import hf_from_model
from experiments.testbed.model import make_model
from experiments.testbed.model import make_processor
from experiments.testbed.vocab import PROMPT

__all__ = ["DEFAULT_CKPT", "IMAGE_TOKEN_ID", "PROMPT", "hf_config", "hf_from_model", "make_model", "make_processor"]
