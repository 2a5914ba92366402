"""Fixture snapshots of the lmms-lab dataset repositories for the benchmark tests (a helper module, not a test).

`write_split(root, config, split, rows, schema, num_shards)` writes a split the way `push_to_hub` lays it out
(`data/{split}-00000-of-00002.parquet` for the default config, `{config}/{split}-...` for a named one) and records it
in the README.md `configs:` yaml, as every real lmms-lab card does. Images are the hub's image struct
{"bytes": PNG bytes, "path": name}; `image_cell(seed)` makes one.

The schemas follow the datasets' cards (`dataset_info.features`, read from the card or a duplicate of it):
  POPE (giobin/POPE, a copy of lmms-lab/POPE): all strings plus the image; the `Full` config is assumed to have the
    same features [unverified].
  MME (lmms-lab/MME card): question_id, image, question, answer, category.
  GQA (lmms-lab/GQA card): images configs id, image; instructions configs id, imageId, question, isBalanced (the test
    configs' card entry); the testdev configs also carry answer and fullAnswer, read by lmms-eval [the remaining
    testdev columns unverified, so not written].
  textvqa (pppop7/textvqa, a duplicate of lmms-lab/textvqa): question_id int32, answers and ocr_tokens list<string>.
  VQAv2 (lmms-lab/VQAv2 card): answers list<struct<answer, answer_confidence, answer_id int64>>, ids int64.
"""

import io
import os
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_STRINGS = pa.list_(pa.string())

SCHEMAS = {
    "POPE": pa.schema([("id", pa.string()), ("question_id", pa.string()), ("question", pa.string()),
                       ("answer", pa.string()), ("image_source", pa.string()), ("image", IMAGE),
                       ("category", pa.string())]),
    "MME": pa.schema([("question_id", pa.string()), ("image", IMAGE), ("question", pa.string()),
                      ("answer", pa.string()), ("category", pa.string())]),
    "GQA/images": pa.schema([("id", pa.string()), ("image", IMAGE)]),
    "GQA/instructions": pa.schema([("id", pa.string()), ("imageId", pa.string()), ("question", pa.string()),
                                   ("answer", pa.string()), ("fullAnswer", pa.string()), ("isBalanced", pa.bool_())]),
    "textvqa": pa.schema([("image_id", pa.string()), ("question_id", pa.int32()), ("question", pa.string()),
                          ("question_tokens", _STRINGS), ("image", IMAGE), ("image_width", pa.int32()),
                          ("image_height", pa.int32()), ("flickr_original_url", pa.string()),
                          ("flickr_300k_url", pa.string()), ("answers", _STRINGS), ("image_classes", _STRINGS),
                          ("set_name", pa.string()), ("ocr_tokens", _STRINGS)]),
    "VQAv2": pa.schema([("question_type", pa.string()), ("multiple_choice_answer", pa.string()),
                        ("answers", pa.list_(pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()),
                                                        ("answer_id", pa.int64())]))),
                        ("image_id", pa.int64()), ("answer_type", pa.string()), ("question_id", pa.int64()),
                        ("question", pa.string()), ("image", IMAGE)]),
}


def png(seed: int, size: tuple[int, int] = (6, 8)) -> bytes:
  """A small random RGB PNG, a pure function of seed; uint8[H, W, 3] = `decoded(seed)`."""
  buffer = io.BytesIO()
  Image.fromarray(decoded(seed, size)).save(buffer, format="PNG")
  return buffer.getvalue()


def decoded(seed: int, size: tuple[int, int] = (6, 8)) -> np.ndarray:
  """The pixels `png(seed, size)` encodes: uint8[H, W, 3]."""
  return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def image_cell(seed: int, size: tuple[int, int] = (6, 8)) -> dict[str, Any]:
  """The hub's image struct holding `png(seed, size)`."""
  return {"bytes": png(seed, size), "path": f"{seed}.png"}


def _update_card(root: str, config: str, split: str, pattern: str) -> None:
  path = os.path.join(root, "README.md")
  configs = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      configs = yaml.safe_load(f.read().split("---")[1])["configs"]
  entry = next((c for c in configs if c["config_name"] == config), None)
  if entry is None:
    entry = {"config_name": config, "data_files": []}
    configs.append(entry)
  entry["data_files"] = [d for d in entry["data_files"] if d["split"] != split] + [{"split": split, "path": pattern}]
  with open(path, "w", encoding="utf-8") as f:
    f.write("---\n" + yaml.safe_dump({"configs": configs}, sort_keys=False) + "---\n\n# fixture card\n")


def write_split(root: str, config: str | None, split: str, rows: Sequence[Mapping[str, Any]], schema: pa.Schema,
                num_shards: int = 1, row_group_size: int = 2, card: bool = True) -> list[str]:
  """Writes rows as `num_shards` contiguous parquet shards in the hub's layout; returns their paths in order.

  card: record (config, split) in README.md's `configs:` yaml (False: a snapshot without a card, which
  `parquet.split_files` reads by the hub's default layouts).
  """
  folder = config or "data"
  os.makedirs(os.path.join(root, folder), exist_ok=True)
  bounds = np.linspace(0, len(rows), num_shards + 1).round().astype(int)
  paths = []
  for i in range(num_shards):
    path = os.path.join(root, folder, f"{split}-{i:05d}-of-{num_shards:05d}.parquet")
    chunk = list(rows[bounds[i]:bounds[i + 1]])
    table = pa.Table.from_pylist(chunk, schema=schema) if chunk else schema.empty_table()
    pq.write_table(table, path, row_group_size=row_group_size)
    paths.append(path)
  if card:
    _update_card(root, config or "default", split, f"{folder}/{split}-*")
  return paths
