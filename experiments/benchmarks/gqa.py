"""GQA testdev-balanced (12,578 questions) on lmms-lab/GQA: instructions joined with their images on imageId.

Layout (lmms-lab/GQA tree and card): one folder per config,
`testdev_balanced_instructions/testdev-00000-of-00001.parquet`
(columns id, imageId, question, answer, fullAnswer, isBalanced, ...) and `testdev_balanced_images/testdev-*.parquet`
(columns id, image); both splits are named `testdev`.

The join streams: the instructions are read batch by batch; the images config is indexed once by its `id` column only
(a few hundred ids), and an image is read on demand with the rest of its parquet row group into a small
least-recently-used cache bounded in bytes (`IMAGE_CACHE_BYTES`), so memory holds one row group of images and the
cache, never the images config. lmms-eval's `gqa_process_docs` instead decodes every image into a dict up front.

Protocols (read at LLaVA c121f04 and lmms-eval 75571cf):
  prompt: the same for both: the question (not stripped) then "\\nAnswer the question using a single word or phrase."
    (lmms-eval `tasks/gqa/utils.py` + gqa.yaml; LLaVA's `llava_gqa_testdev_balanced.jsonl` lives in eval.zip and
    follows docs/Evaluation.md's short-answer format [unverified]).
  max_new_tokens: lmms_eval 16 (gqa.yaml); llava 128 (`model_vqa_loader.py` default; `scripts/v1_5/eval/gqa.sh` sets
    none). Stop strings: none.
  parser "llava": `scripts/convert_gqa_for_eval.py` takes the (stripped) text, `rstrip('.')`, lowercases; the official
    GQA `eval.py --tier testdev_balanced` then scores `predicted == gold` on the raw gold answer. We report its
    accuracy only (its consistency, validity, plausibility and distribution need the scene-graph and choices files).
  parser "lmms_eval": the generation stripped (`api/task.py` `ConfigurableTask.process_results` strips every
    generate_until result before any metric; the yaml has no filter_list), then the yaml's `exact_match` with
    ignore_case and ignore_punctuation: lowercase, then delete every `string.punctuation` character, on both sides
    (`api/metrics.py`, which strips nothing: "right ." stays wrong, the gold answer is not stripped).
"""

import collections
from typing import Any, Iterator, Mapping, Sequence

from experiments.benchmarks import base, choices, parquet, rowio

__all__ = ["SUFFIX", "IMAGE_CACHE_BYTES", "TASKS", "parse_llava", "parse_lmms_eval", "ImageLookup"]

SUFFIX = "\nAnswer the question using a single word or phrase."
INSTRUCTIONS, IMAGES, SPLIT = "testdev_balanced_instructions", "testdev_balanced_images", "testdev"
IMAGE_CACHE_BYTES = 256 << 20
_COLUMNS = {"id": rowio.ID, "imageId": rowio.TEXT, "question": rowio.PROMPT, "answer": rowio.TEXT}


def parse_llava(generation: str) -> str:
  return generation.strip().rstrip(".").lower()


def parse_lmms_eval(generation: str) -> str:
  return choices.exact_match_form(generation.strip())


_parse = base.parser_by_protocol(llava=parse_llava, lmms_eval=parse_lmms_eval)


def _score(rows: Sequence[Mapping[str, Any]], protocol: str) -> dict[str, float]:
  if not rows:
    raise ValueError("GQA: no rows to score")
  # the official scorers transform the gold answer as lmms-eval does (both sides) or not at all (GQA's eval.py)
  gold = choices.exact_match_form if protocol == "lmms_eval" else (lambda answer: answer)
  correct = [_parse(r["prediction"], r["meta"], protocol) == gold(r["target"]) for r in rows]
  return {"accuracy": sum(correct) / len(correct)}


class ImageLookup:
  """imageId -> encoded image bytes of the images config, read by row group on demand, cached up to `max_bytes`."""

  def __init__(self, files: Sequence[str], max_bytes: int = IMAGE_CACHE_BYTES):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self._files, self._max_bytes = list(files), max_bytes
    self._where: dict[str, tuple[str, int, int]] = {}  # id -> (file, row group, first row of that group in the file)
    for path in self._files:
      first = 0
      try:
        reader = pq.ParquetFile(path)
      except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: not a readable parquet file: {e}") from None
      missing = [c for c in ("id", "image") if c not in reader.schema_arrow.names]
      if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has {reader.schema_arrow.names}")
      for group in range(reader.metadata.num_row_groups):
        ids = reader.read_row_group(group, columns=["id"]).column("id").to_pylist()
        for offset, image_id in enumerate(ids):
          if image_id in self._where:
            raise ValueError(f"{path} row {first + offset}: duplicate image id {image_id!r} in the images config")
          self._where[image_id] = (path, group, first)
        first += len(ids)
    if not self._where:
      raise ValueError(f"empty split: no rows in {self._files}")
    self._cache: collections.OrderedDict[str, bytes] = collections.OrderedDict()
    self._cached_bytes = 0

  def __call__(self, image_id: str, asked_by: str) -> bytes:
    if image_id in self._cache:
      self._cache.move_to_end(image_id)
      return self._cache[image_id]
    if image_id not in self._where:
      raise ValueError(f"{asked_by}: imageId {image_id!r} is not in the images config {self._files}")
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    path, group, first = self._where[image_id]
    table = pq.ParquetFile(path).read_row_group(group, columns=["id", "image"])
    for offset, (other, cell) in enumerate(zip(table.column("id").to_pylist(), table.column("image").to_pylist())):
      self._put(other, parquet.image_bytes(cell, f"{path} row {first + offset} (image {other!r})"))
    found = self._cache[image_id]
    self._cache.move_to_end(image_id)
    while self._cached_bytes > self._max_bytes and len(self._cache) > 1:
      _, evicted = self._cache.popitem(last=False)
      self._cached_bytes -= len(evicted)
    return found

  def _put(self, image_id: str, data: bytes) -> None:
    if image_id not in self._cache:
      self._cache[image_id] = data
      self._cached_bytes += len(data)


def _examples(data_dir: str, protocol: str, with_images: bool) -> Iterator[base.Example]:
  rowio.check_protocol(protocol)
  images = ImageLookup(parquet.split_files(data_dir, IMAGES, SPLIT)) if with_images else None
  for _, where, row, _ in rowio.split_rows(data_dir, INSTRUCTIONS, SPLIT, _COLUMNS, False, "id"):
    image = None
    if images is not None:
      image = base.decode_image(images(row["imageId"], where), f"{where} (imageId {row['imageId']!r})")
    yield base.Example(question_id=row["id"], image=image, text=row["question"] + SUFFIX, target=row["answer"],
                       meta={"image_id": row["imageId"]}, source=where)


TASKS = {
    "gqa": base.Task(
        name="gqa", repo="lmms-lab/GQA", folder="GQA", config=INSTRUCTIONS, split=SPLIT, num_rows=12578,
        id_source="id", max_new_tokens={"llava": 128, "lmms_eval": 16}, stop=(),
        image_aspect={"llava": "pad", "lmms_eval": "pad"}, examples=_examples, parse=_parse, score=_score,
        also_reads=((IMAGES, SPLIT),)),
}
