"""The contract every benchmark task of `experiments.benchmarks` implements (lmms-eval's task, as data).

A task streams `Example`s from a local snapshot of its dataset repository (the files a hub download writes), builds
the user text of each question for a protocol ("llava": the LLaVA repository's eval scripts; "lmms_eval": lmms-eval's
task code), parses a raw generation into an answer, and scores a run's rows. The runner wraps the user text in the
checkpoint's conversation template, generates, and stores one row per question: `Row` below, JSON.
"""

import dataclasses
import io
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from experiments.benchmarks import parquet
from experiments.runner import fingerprints

__all__ = ["PROTOCOLS", "IMAGE_TOKEN", "Example", "Task", "decode_image", "parser_by_protocol"]

PROTOCOLS = ("llava", "lmms_eval")
IMAGE_TOKEN = "<image>"   # the processors expand it into the image's features: no question may hold it


def decode_image(data: bytes, where: str) -> np.ndarray:
  """Encoded image bytes (the parquet image struct's `bytes`) -> uint8[H, W, 3] RGB; ValueError naming `where` (file
  and row) when the bytes are not a readable image."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, ValueError) as e:
    raise ValueError(f"{where}: the image cannot be decoded: {e}") from None


def parser_by_protocol(**parsers: Callable[[str], str]) -> Callable[[str, Mapping[str, Any], str], str]:
  """A `Task.parse` that reads only the generation, with one parser per protocol (keyword = protocol name)."""
  unknown = sorted(set(parsers) - set(PROTOCOLS))
  if unknown or set(parsers) != set(PROTOCOLS):
    raise ValueError(f"parsers must be given for exactly {PROTOCOLS}, got {sorted(parsers)}")

  def parse(generation: str, meta: Mapping[str, Any], protocol: str) -> str:
    del meta
    if protocol not in parsers:
      raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    return parsers[protocol](generation)

  return parse


@dataclasses.dataclass(frozen=True)
class Example:
  """One question of a task.

  question_id: the dataset's own unique id where it has one (POPE/TextVQA `question_id`, GQA `id`, MMBench `index`),
    else the row's position in the split in shard order; unique within the task.
  image: uint8[H, W, 3] RGB, or None when the examples were read without images (re-scoring).
  text: the user turn's text after the image for the protocol (question, options, hint, suffix), no template.
  target: what `Task.score` compares a prediction with (JSON-serialisable: a string, a list of answers, a letter).
  meta: everything else scoring or grouping needs (JSON-serialisable): category, split, image id, group index.
  source: where the example was read ("file row i"), for messages; no row stores it.
  """
  question_id: str
  image: np.ndarray | None
  text: str
  target: Any
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  source: str = ""


@dataclasses.dataclass(frozen=True)
class Task:
  """A benchmark task.

  name: the runner's `--tasks` name (e.g. "pope_adversarial").
  repo: the dataset repository ("lmms-lab/POPE"; the same files exist under "lmms-lab-encoder/").
  folder: its folder name under a `--data_dir` root holding several datasets (the repository's name, "POPE").
  config: the dataset config (None: the default config); split: the split; num_rows: rows of the full split.
  id_source: where `question_id` comes from: a column name, or "position" (the row's position in shard order).
  max_new_tokens: per protocol; stop: stop strings of the generation (cut from the raw text before parsing).
  image_aspect: per protocol, "original" where the official task overrides LLaVA-1.5's pad-to-square, else "pad".
  examples(data_dir, protocol, with_images) -> Iterator[Example]: streams the split (memory independent of length);
    raises ValueError naming the file (and column or row) for a missing split, an incomplete or mixed shard set, a
    missing column, a field that is null, of the wrong type or not UTF-8, a question holding "<image>", an id used
    twice, a corrupt image, an empty split (`rowio.split_rows`).
  parse(generation, example_meta, protocol) -> str: the answer the metric reads from a raw generation.
  score(rows, protocol) -> dict[str, float]: the task's metrics from rows {"question_id", "prediction" (raw
    generation), "target", "meta"}; the keys are what the summary tables and `experiments.score` print.
  judged: True when no local metric exists (MM-Vet): `score` then reports counts only, and the predictions file is
    what the judge scripts take.
  also_reads: the other (config, split)s `examples` reads with images (GQA's images config).
  length_from_wrapper: the lmms-eval yaml sets no max_new_tokens, so the "lmms_eval" value is the llava wrapper's
    default (1,024); another model wrapper brings its own default (`experiments.runner.inputs`: qwen2_5_vl 32,768).
  """
  name: str
  repo: str
  folder: str
  config: str | None
  split: str
  num_rows: int | None
  id_source: str
  max_new_tokens: Mapping[str, int]
  stop: tuple[str, ...]
  image_aspect: Mapping[str, str]
  examples: Callable[[str, str, bool], Iterator[Example]]
  parse: Callable[[str, Mapping[str, Any], str], str]
  score: Callable[[Sequence[Mapping[str, Any]], str], dict[str, float]]
  judged: bool = False
  also_reads: tuple[tuple[str | None, str], ...] = ()
  length_from_wrapper: bool = False

  def data_files(self, data_dir: str) -> list[str]:
    """Every parquet file `examples(data_dir, ...)` reads, its shard sets checked (`parquet.split_files`)."""
    return [path for config, split in ((self.config, self.split),) + self.also_reads
            for path in parquet.split_files(data_dir, config, split)]

  def fingerprint(self, data_dir: str) -> str:
    """The data files the task reads (name, size, mtime), hashed; nothing else under the snapshot (the hub's
    `.cache/`, an output folder, notes) changes a row, so nothing else may change it."""
    return fingerprints.of_files(data_dir, self.data_files(data_dir))
