"""Placeholder: being written."""

__all__ = ["random_order", "pooling_order", "pooling_merge"]


def random_order(features, relevance, valid, key, *, keep, **hparams):
  raise NotImplementedError("random")


def pooling_order(features, relevance, valid, key, *, keep, **hparams):
  raise NotImplementedError("pooling")


def pooling_merge(features, relevance, valid, key, *, keep, **hparams):
  raise NotImplementedError("pooling")
