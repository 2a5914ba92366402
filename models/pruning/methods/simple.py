"""The methods without an official LLaVA-NeXT layout: TrimTokenator (its code is not public), random and spatial
pooling (the sanity floors). `target` per image, globally."""

from models.pruning.methods import base
from models.pruning.modes import Stage1

__all__ = ["TRIMTOKENATOR", "RANDOM", "POOLING"]


def _trimtokenator(target: int, family: str, num_layers: int, o: dict) -> tuple[Stage1, None]:
  return base.stage1(target, o, relevance="text"), None


def _random(target: int, family: str, num_layers: int, o: dict) -> tuple[Stage1, None]:
  return base.stage1(target, o, relevance="none"), None


def _pooling(target: int, family: str, num_layers: int, o: dict) -> tuple[Stage1, None]:
  if base.family(family) in base.VARIABLE_GRID and "grid" not in o.get("hparams", {}):
    raise base.NoProtocol(f"pooling on {family}: its windows partition one static grid, and this family's merged "
                          "grids vary per image (the runner's buckets pad them to one row length); pass "
                          "hparams={'grid': (1, N)} for 1-D windows over a row of N tokens")
  return Stage1(budget=target, relevance="none", params=o.get("hparams", {})), None


def _text(config, hp, text, text_valid):
  """TrimTokenator aligns the tokens with the text after the image (the LLM's input embeddings)."""
  hp.setdefault("text", text)
  hp.setdefault("text_valid", text_valid)
  return hp


TRIMTOKENATOR = base.Method(protocol=_trimtokenator, overrides=base.LAYOUT_OVERRIDES, stage1_hparams=_text)
RANDOM = base.Method(protocol=_random, overrides=base.LAYOUT_OVERRIDES, budget_free=True, variable_count=True)
POOLING = base.Method(protocol=_pooling, overrides=("hparams",))
