"""experiments.benchmarks.parquet: the snapshot layouts, streaming reads and the bad-data errors."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lmms_fixtures
from experiments.benchmarks import base, parquet
from experiments.runner import fingerprints


def _pope_rows(n, start=0):
  return [{"id": str(i), "question_id": str(1000 + i), "question": f"q{i}", "answer": "yes" if i % 2 else "no",
           "image_source": f"COCO_{i}", "image": lmms_fixtures.image_cell(i), "category": "adversarial"}
          for i in range(start, start + n)]


def test_split_files_follows_the_card_for_default_and_named_configs(tmp_path):
  root = str(tmp_path)
  test = lmms_fixtures.write_split(root, None, "test", _pope_rows(5), lmms_fixtures.SCHEMAS["POPE"], num_shards=3)
  adv = lmms_fixtures.write_split(root, "Full", "adversarial", _pope_rows(2), lmms_fixtures.SCHEMAS["POPE"])
  assert parquet.split_files(root, None, "test") == test
  assert [os.path.basename(p) for p in test] == [f"test-0000{i}-of-00003.parquet" for i in range(3)]
  assert parquet.split_files(root, "Full", "adversarial") == adv


def test_split_files_reads_the_cards_globs_not_the_default_layout(tmp_path):
  root = str(tmp_path)
  os.makedirs(tmp_path / "elsewhere")
  pq.write_table(pa.Table.from_pylist(_pope_rows(1), schema=lmms_fixtures.SCHEMAS["POPE"]),
                 tmp_path / "elsewhere" / "part.parquet")
  lmms_fixtures.write_split(root, None, "test", _pope_rows(1), lmms_fixtures.SCHEMAS["POPE"])  # data/test-*
  (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n"
                                      "    path: elsewhere/*\n---\n")
  assert parquet.split_files(root, None, "test") == [str(tmp_path / "elsewhere" / "part.parquet")]


def test_split_files_reads_a_cards_data_dir(tmp_path):
  path = tmp_path / "sub" / "val-00000-of-00001.parquet"
  path.parent.mkdir()
  pq.write_table(pa.Table.from_pylist(_pope_rows(1), schema=lmms_fixtures.SCHEMAS["POPE"]), path)
  (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: x\n  data_dir: sub\n---\n")
  assert parquet.split_files(str(tmp_path), "x", "val") == [str(path)]


@pytest.mark.parametrize("config, layout", [(None, "data/{split}-00000-of-00001.parquet"),
                                            (None, "{split}-00000-of-00001.parquet"),
                                            ("Full", "Full/{split}-00000-of-00001.parquet"),
                                            ("Full", "Full/{split}/0000.parquet"),
                                            ("Full", "Full/{split}.parquet")])
def test_split_files_without_a_card_tries_the_hubs_default_layouts(tmp_path, config, layout):
  path = tmp_path / layout.format(split="random")
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(_pope_rows(1), schema=lmms_fixtures.SCHEMAS["POPE"]), path)
  assert parquet.split_files(str(tmp_path), config, "random") == [str(path)]
  with pytest.raises(ValueError, match="split 'popular'"):
    parquet.split_files(str(tmp_path), config, "popular")


def test_a_missing_split_names_the_directory_config_split_and_what_is_there(tmp_path):
  root = str(tmp_path)
  lmms_fixtures.write_split(root, "Full", "adversarial", _pope_rows(1), lmms_fixtures.SCHEMAS["POPE"])
  with pytest.raises(ValueError, match=r"config 'Full' has no split 'random' \(splits: \['adversarial'\]\)"):
    parquet.split_files(root, "Full", "random")
  with pytest.raises(ValueError, match=r"no config 'default' in the dataset card \(configs: \['Full'\]\)"):
    parquet.split_files(root, None, "test")
  os.remove(tmp_path / "Full" / "adversarial-00000-of-00001.parquet")  # the card names a shard that is gone
  with pytest.raises(ValueError, match=r"split 'adversarial'.*Full/adversarial-\*.*Full/: \[\]"):
    parquet.split_files(root, "Full", "adversarial")
  with pytest.raises(ValueError, match="does not exist"):
    parquet.split_files(str(tmp_path / "nowhere"), None, "test")


def test_a_missing_shard_is_named(tmp_path):
  root = str(tmp_path)
  lmms_fixtures.write_split(root, None, "test", _pope_rows(6), lmms_fixtures.SCHEMAS["POPE"], num_shards=3)
  os.remove(tmp_path / "data" / "test-00001-of-00003.parquet")
  with pytest.raises(ValueError, match=r"split 'test'\): the parquet shards are not one complete download: missing "
                                       r"\['data/test-00001-of-00003.parquet'\], extra \[\]"):
    parquet.split_files(root, None, "test")
  os.remove(tmp_path / "README.md")                 # the hub's default layout is checked alike
  with pytest.raises(ValueError, match=r"missing \['data/test-00001-of-00003.parquet'\]"):
    parquet.split_files(root, None, "test")


def test_an_older_downloads_shards_beside_the_new_ones_are_named(tmp_path):
  root = str(tmp_path)
  lmms_fixtures.write_split(root, None, "test", _pope_rows(2), lmms_fixtures.SCHEMAS["POPE"], num_shards=1)
  lmms_fixtures.write_split(root, None, "test", _pope_rows(2), lmms_fixtures.SCHEMAS["POPE"], num_shards=2)
  with pytest.raises(ValueError, match=r"split 'test'\): .*missing \[\], extra \['data/test-00000-of-00001.parquet'\]"):
    parquet.split_files(root, None, "test")          # was read whole: every row twice
  pq.write_table(pa.Table.from_pylist(_pope_rows(1), schema=lmms_fixtures.SCHEMAS["POPE"]),
                 tmp_path / "data" / "test-00002-of-00002.parquet")   # an index past the count
  with pytest.raises(ValueError, match=r"extra \['data/test-00000-of-00001.parquet', 'data/test-00002-of-00002"):
    parquet.split_files(root, None, "test")


def test_the_files_a_card_names_must_all_be_there(tmp_path):
  root = str(tmp_path)
  files = lmms_fixtures.write_split(root, None, "test", _pope_rows(4), lmms_fixtures.SCHEMAS["POPE"], num_shards=2)
  names = [os.path.relpath(f, root) for f in files]
  (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n"
                                      f"    path: [{names[0]}, {names[1]}, data/test-extra.parquet]\n---\n")
  with pytest.raises(ValueError, match=r"split 'test'\): the dataset card's data_files \['data/test-extra.parquet'\] "
                                       r"match no parquet file \(missing\)"):
    parquet.split_files(root, None, "test")
  (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n"
                                      f"    path: [{names[0]}, {names[1]}]\n---\n")
  lmms_fixtures.write_split(root, None, "test", _pope_rows(1), lmms_fixtures.SCHEMAS["POPE"], card=False)
  assert parquet.split_files(root, None, "test") == files   # a file the card does not name is not read


def test_the_fingerprint_reads_only_the_data_files(tmp_path):
  root = str(tmp_path)
  files = lmms_fixtures.write_split(root, None, "test", _pope_rows(4), lmms_fixtures.SCHEMAS["POPE"], num_shards=2)
  before = fingerprints.of_files(root, files)
  for stray in ("out/results.jsonl", "out/.lock", ".cache/huggingface/download/data/x.metadata", "notes.md"):
    os.makedirs(os.path.dirname(tmp_path / stray) or root, exist_ok=True)
    (tmp_path / stray).write_text("x")
  assert fingerprints.of_files(root, parquet.split_files(root, None, "test")) == before
  os.utime(files[1], ns=(1, 1))                     # a shard re-downloaded in place
  assert fingerprints.of_files(root, files) != before


def test_iter_rows_streams_shards_in_order_with_row_indices_and_only_the_asked_columns(tmp_path):
  rows = _pope_rows(7)
  files = lmms_fixtures.write_split(str(tmp_path), None, "test", rows, lmms_fixtures.SCHEMAS["POPE"], num_shards=3)
  out = list(parquet.iter_rows(files, ["question_id", "answer"], batch_rows=2))
  assert [r["question_id"] for _, _, r in out] == [r["question_id"] for r in rows]
  assert all(set(r) == {"question_id", "answer"} for _, _, r in out)
  sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
  expected = [(f, i) for f, n in zip(files, sizes) for i in range(n)]
  assert [(f, i) for f, i, _ in out] == expected


def test_iter_rows_is_lazy_and_reads_batches(tmp_path, monkeypatch):
  files = lmms_fixtures.write_split(str(tmp_path), None, "test", _pope_rows(10), lmms_fixtures.SCHEMAS["POPE"])
  asked = []
  original = pq.ParquetFile.iter_batches

  def spy(self, *args, **kwargs):
    asked.append(kwargs)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
  rows = parquet.iter_rows(files, ["id"], batch_rows=3)
  assert not asked  # a generator: nothing is read before the first row is asked for
  assert next(rows)[2] == {"id": "0"}
  assert asked == [{"batch_size": 3, "columns": ["id"]}]


def test_a_missing_column_names_the_file_and_the_column(tmp_path):
  files = lmms_fixtures.write_split(str(tmp_path), None, "test", _pope_rows(2), lmms_fixtures.SCHEMAS["POPE"])
  with pytest.raises(ValueError, match=rf"{files[0]}: missing column\(s\) \['label'\]"):
    list(parquet.iter_rows(files, ["question", "label"]))


def test_an_empty_split_names_the_files(tmp_path):
  files = lmms_fixtures.write_split(str(tmp_path), None, "test", [], lmms_fixtures.SCHEMAS["POPE"], num_shards=2)
  with pytest.raises(ValueError, match=r"empty split: no rows in .*test-00000-of-00002.parquet.*test-00001"):
    list(parquet.iter_rows(files, ["question"]))


def test_a_file_that_is_not_parquet_is_named(tmp_path):
  bad = tmp_path / "test-00000-of-00001.parquet"
  bad.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer instead of the file
  with pytest.raises(ValueError, match=rf"{bad}: not a readable parquet file"):
    list(parquet.iter_rows([str(bad)], ["question"]))


def test_image_bytes_and_decoding():
  cell = lmms_fixtures.image_cell(3)
  np.testing.assert_array_equal(base.decode_image(parquet.image_bytes(cell, "f row 0"), "f row 0"),
                                lmms_fixtures.decoded(3))
  with pytest.raises(ValueError, match=r"f row 4: the image cell has no bytes \(path 'x.png'\)"):
    parquet.image_bytes({"bytes": None, "path": "x.png"}, "f row 4")
  with pytest.raises(ValueError, match="f row 5: no image"):
    parquet.image_bytes(None, "f row 5")
  with pytest.raises(ValueError, match="f row 6: the image cannot be decoded"):
    base.decode_image(b"\x89PNG broken", "f row 6")


def test_invalid_utf8_names_the_file_row_and_field(tmp_path):
  path = tmp_path / "test-00000-of-00001.parquet"
  question = pa.array([b"ok", b"ok", b"\xff bad"], pa.binary()).view(pa.string())
  pq.write_table(pa.table({"id": ["0", "1", "2"], "question": question}), path, row_group_size=2)
  with pytest.raises(ValueError, match=rf"{path} row 2: field 'question' is not valid UTF-8"):
    list(parquet.iter_rows([str(path)], ["id", "question"], batch_rows=2))
