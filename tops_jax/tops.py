"""Placeholder: being written."""

__all__ = ["order"]


def order(features, relevance, valid, key, *, keep, **hparams):
  raise NotImplementedError("tops")
