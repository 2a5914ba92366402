"""Placeholder: being written."""

__all__ = ["order", "merge"]


def order(features, relevance, valid, key, *, keep, **hparams):
  raise NotImplementedError("visionzip")


def merge(features, relevance, valid, key, *, keep, **hparams):
  raise NotImplementedError("visionzip")
