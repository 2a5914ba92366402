"""What the multiple-choice, HallusionBench and MM-Vet tasks share: a split's rows with their decoded images, the
row's position in the split, and a run row's generation.

Axes: H image height, W image width (pixels).
"""

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from experiments.benchmarks import base, parquet

__all__ = ["check_protocol", "split_rows", "generation"]


def check_protocol(protocol: str) -> str:
  if protocol not in base.PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(base.PROTOCOLS)}")
  return protocol


def split_rows(data_dir: str, config: str | None, split: str, columns: Sequence[str], with_images: bool,
               image_column: str = "image") -> Iterator[tuple[int, str, dict[str, Any], np.ndarray | None]]:
  """Streams (position in the split in shard order, "file row i", {column: value}, uint8[H, W, 3] or None).

  The errors are parquet's (a missing split, shard or column, an empty split) and the image's (a null cell, bytes
  that do not decode), each naming the file and row.
  """
  names = list(columns) + ([image_column] if with_images else [])
  files = parquet.split_files(data_dir, config, split)
  for position, (path, index, row) in enumerate(parquet.iter_rows(files, names)):
    where = f"{path} row {index}"
    image = base.decode_image(parquet.image_bytes(row[image_column], where), where) if with_images else None
    yield position, where, row, image


def generation(row: Mapping[str, Any]) -> str:
  """The generation of a run row: base.py's "prediction", or the runner's "generation" (cut at the stop strings)."""
  for key in ("prediction", "generation"):
    if key in row:
      return str(row[key])
  raise KeyError(f"question {row.get('question_id')!r}: the row has no 'prediction' or 'generation' "
                 f"(keys: {sorted(row)})")
