"""Streaming reads of a dataset repository snapshot (the parquet files a hub download writes).

A snapshot is the directory `huggingface-cli download <repo> --repo-type dataset --local-dir DIR` fills. Where its
README.md carries the hub's `configs:` yaml (every lmms-lab repository the benchmarks read does), that yaml is the
layout: each config lists `data_files` as (split, path glob) pairs relative to the repository root, e.g.

  configs:
  - config_name: default
    data_files:
    - split: test
      path: data/test-*
  - config_name: Full
    data_files:
    - split: adversarial
      path: Full/adversarial-*

Without that yaml the hub's own defaults apply, and `split_files` tries them in order: `{dir}/{split}-*.parquet`
(what `push_to_hub` writes, `{split}-00000-of-00003.parquet`), `{dir}/{split}.parquet`, and `{dir}/{split}/*.parquet`
(the layout of the hub's `refs/convert/parquet` branch, `Full/adversarial/0000.parquet`), where `dir` is the config's
folder, or for the default config `data/` and then the root.

A split's shard set is checked whichever way it was found: every card pattern must match a file (a path the card
names exactly must exist), and the shards named `{stem}-NNNNN-of-MMMMM.parquet` of one stem must be one complete
download: one count M and every index below it. A missing shard would shrink the split unseen, and an older download
left beside a newer one (`test-00000-of-00001` beside `test-0000{0,1}-of-00002`) would read every row twice.

Rows stream: `iter_rows` reads one small record batch of the needed columns at a time (pyarrow decodes one row group
of those columns beneath it), so memory does not grow with the split.
"""

import collections
import glob
import hashlib
import json
import os
import re
from typing import Any, Iterator, Mapping, Sequence

__all__ = ["BATCH_ROWS", "split_files", "iter_rows", "image_bytes"]

BATCH_ROWS = 16  # rows per record batch: a batch of images is a few MB, not the split

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.DOTALL)
_SHARD = re.compile(r"(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.parquet")


def _readme_configs(data_dir: str) -> list[Mapping[str, Any]] | None:
  """The `configs:` list of the snapshot's README.md front matter; None when there is none."""
  path = os.path.join(data_dir, "README.md")
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    match = _FRONT_MATTER.match(f.read())
  if match is None:
    return None
  import yaml  # pylint: disable=g-import-not-at-top  (pyyaml comes with transformers / huggingface_hub)
  try:
    meta = yaml.safe_load(match.group(1)) or {}
  except yaml.YAMLError as e:
    raise ValueError(f"{path}: the dataset card's yaml header does not parse: {e}") from None
  configs = meta.get("configs") if isinstance(meta, dict) else None
  return configs if isinstance(configs, list) else None


def _config_patterns(configs: Sequence[Mapping[str, Any]], config: str | None, split: str,
                     readme: str) -> tuple[list[str], bool]:
  """The data_files globs of (config, split) in the card's `configs:` yaml, and whether each must match a file (the
  card lists them; not so for the default names within a `data_dir:`); ValueError listing what the card has."""
  name = config or "default"
  by_name = {c.get("config_name", "default"): c for c in configs}
  if name not in by_name:
    raise ValueError(f"{readme}: no config {name!r} in the dataset card (configs: {sorted(by_name)})")
  data_files = by_name[name].get("data_files", [])
  if not data_files and by_name[name].get("data_dir"):  # `data_dir:` instead of globs: the default names within it
    folder = by_name[name]["data_dir"]
    return [f"{folder}/{split}-*.parquet", f"{folder}/{split}.parquet", f"{folder}/{split}/*.parquet"], False
  if isinstance(data_files, Mapping):  # {split: globs}
    entries = [{"split": k, "path": v} for k, v in data_files.items()]
  elif isinstance(data_files, str) or (data_files and not isinstance(data_files[0], Mapping)):
    entries = [{"split": "train", "path": data_files}]  # bare globs are the split "train" (the hub's convention)
  else:
    entries = data_files
  splits = {}
  for entry in entries:
    paths = entry.get("path", [])
    splits[entry.get("split", "train")] = [paths] if isinstance(paths, str) else list(paths)
  if split not in splits:
    raise ValueError(f"{readme}: config {name!r} has no split {split!r} (splits: {sorted(splits)})")
  return splits[split], True


def _default_patterns(config: str | None, split: str) -> list[list[str]]:
  """The hub's layouts without a card, most specific first; each entry is one alternative (a list of globs)."""
  dirs = [config] if config else ["data", "."]
  alternatives = []
  for d in dirs:
    alternatives += [[f"{d}/{split}-*.parquet"], [f"{d}/{split}.parquet"], [f"{d}/{split}/*.parquet"]]
  return alternatives


def _glob(data_dir: str, patterns: Sequence[str]) -> list[str]:
  files = set()
  for pattern in patterns:
    for path in glob.glob(os.path.join(data_dir, pattern), recursive=True):
      if os.path.isfile(path) and path.endswith(".parquet"):
        files.add(os.path.normpath(path))
  return sorted(files)


def _listing(data_dir: str, config: str | None) -> str:
  """What is there (the config's folder, the data/ folder and the root), for an error message."""
  seen = []
  for d in dict.fromkeys([config or "data", "."]):
    folder = os.path.join(data_dir, d)
    if os.path.isdir(folder):
      names = sorted(n + ("/" if os.path.isdir(os.path.join(folder, n)) else "") for n in os.listdir(folder))
      shown = ", ".join(names[:30]) + (f", ... ({len(names)} entries)" if len(names) > 30 else "")
      seen.append(f"{d}/: [{shown}]")
  return "; ".join(seen) if seen else "(the directory does not exist)"


def _check_shards(files: Sequence[str], data_dir: str, where: str) -> None:
  """ValueError naming `where` (the split), the missing shards and the extra ones unless each stem's
  `-NNNNN-of-MMMMM` shards are one complete set. Where a stem has shards of several counts, the count with the most
  of its shards present (then the larger) is the download; every other shard is extra."""
  found: dict[tuple[str, str], dict[int, set[int]]] = collections.defaultdict(lambda: collections.defaultdict(set))
  for path in files:
    match = _SHARD.fullmatch(os.path.basename(path))
    if match:
      found[(os.path.dirname(path), match["stem"])][int(match["count"])].add(int(match["index"]))
  missing, extra = [], []
  for (folder, stem), counts in sorted(found.items()):
    count = max(counts, key=lambda n: (len(counts[n] & set(range(n))), n))
    name = lambda i, n, folder=folder, stem=stem: os.path.relpath(
        os.path.join(folder, f"{stem}-{i:05d}-of-{n:05d}.parquet"), data_dir)
    missing += [name(i, count) for i in range(count) if i not in counts[count]]
    extra += [name(i, n) for n in sorted(counts) for i in sorted(counts[n]) if n != count or i >= count]
  if missing or extra:
    raise ValueError(f"{where}: the parquet shards are not one complete download: missing {missing}, extra {extra} "
                     "(a shard absent, or an older download's shards beside the newer ones); fix the snapshot "
                     "(re-download the split, delete the stale shards)")


def split_files(data_dir: str, config: str | None, split: str) -> list[str]:
  """The sorted parquet shards of (config, split) in a snapshot (config None: the default config).

  Reads the layout from the README.md `configs:` yaml where there is one, else tries the hub's default layouts (the
  module docstring). Shards sort by name, so `-00000-of-00003` comes first: the row order is the hub's.
  Raises ValueError naming the directory, the config and split, and what is there when nothing matches; naming the
  card's patterns that match nothing; naming the missing and the extra shards of an incomplete or mixed shard set.
  """
  where = f"{data_dir} (config {config or 'default'!r}, split {split!r})"
  configs = _readme_configs(data_dir)
  if configs is not None:
    patterns, every = _config_patterns(configs, config, split, os.path.join(data_dir, "README.md"))
    files = _glob(data_dir, patterns)
    if not files:
      raise ValueError(f"{where}: no parquet file matches the dataset card's data_files {patterns}; "
                       f"found {_listing(data_dir, config)}")
    unmatched = [p for p in patterns if every and not _glob(data_dir, [p])]
    if unmatched:
      raise ValueError(f"{where}: the dataset card's data_files {unmatched} match no parquet file (missing); "
                       f"found {_listing(data_dir, config)}")
    _check_shards(files, data_dir, where)
    return files
  for patterns in _default_patterns(config, split):
    files = _glob(data_dir, patterns)
    if files:
      _check_shards(files, data_dir, where)
      return files
  raise ValueError(f"{where}: no parquet shards (no README.md `configs:` yaml, and none of the hub's default layouts "
                   f"{{dir}}/{split}-*.parquet, {{dir}}/{split}.parquet, {{dir}}/{split}/*.parquet matches); "
                   f"found {_listing(data_dir, config)}")


def _undecodable(batch, path: str, first: int, error: UnicodeDecodeError) -> ValueError:
  """The row and column of a record batch whose string bytes are not UTF-8 (`to_pylist` names neither)."""
  for name in batch.schema.names:
    column = batch.column(name)
    for offset in range(batch.num_rows):
      try:
        column[offset].as_py()
      except UnicodeDecodeError as e:
        return ValueError(f"{path} row {first + offset}: field {name!r} is not valid UTF-8: {e}")
  return ValueError(f"{path}: rows {first}-{first + batch.num_rows - 1} are not valid UTF-8: {error}")


def iter_rows(files: Sequence[str], columns: Sequence[str],
              batch_rows: int = BATCH_ROWS) -> Iterator[tuple[str, int, dict[str, Any]]]:
  """Streams (file, row index within that file, {column: value}) over the shards in order.

  Reads only `columns`, `batch_rows` rows at a time. ValueError naming the file for a file that is not parquet or
  lacks a column (naming the missing columns and those it has), naming the file, row and field of a string that is
  not valid UTF-8, and naming the files when they hold no row at all.
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  if not files:
    raise ValueError("iter_rows: no parquet files given")
  total = 0
  for path in files:
    try:
      reader = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
      raise ValueError(f"{path}: not a readable parquet file: {e}") from None
    with reader:
      names = reader.schema_arrow.names
      missing = [c for c in columns if c not in names]
      if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has {names}")
      index = 0
      try:
        for batch in reader.iter_batches(batch_size=batch_rows, columns=list(columns)):
          try:
            rows = batch.to_pylist()
          except UnicodeDecodeError as e:
            raise _undecodable(batch, path, index, e) from None
          for row in rows:
            yield path, index, row
            index += 1
      except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: reading failed after row {index}: {e}") from None
      total += index
  if total == 0:
    raise ValueError(f"empty split: no rows in {list(files)}")


def image_bytes(cell: Any, where: str) -> bytes:
  """The encoded bytes of a hub image cell (the struct {"bytes": binary, "path": string}); ValueError naming `where`
  when the cell is null or carries no bytes (an image stored only by a path the snapshot does not contain)."""
  if isinstance(cell, Mapping):
    data = cell.get("bytes")
    if data:
      return data
    raise ValueError(f"{where}: the image cell has no bytes (path {cell.get('path')!r})")
  if isinstance(cell, (bytes, bytearray)) and cell:
    return bytes(cell)
  raise ValueError(f"{where}: no image (the cell is {type(cell).__name__})")
