"""Reading tpu_compile's rows (no libtpu): resuming, the summary's ratios and cells, the largest-batch line."""

import json

import pytest

from experiments.analysis import tpu_report

_POINT = dict(backbone="llava_next", shape="s", topology="v5e:2x4", mesh="fsdp:8", batch=8, dtype="bfloat16",
              overrides=[])


def _run(method, target, program, total, flops, seconds, fits=True, **extra):
  return dict(_POINT, method=method, target=target, program=program, total_bytes=total, fits=fits, loop_flops=flops,
              roofline_s=seconds, **extra)


def test_done_runs_need_both_programs_or_an_error():
  rows = [_run("full", None, "prefill", 1, 1, 1), _run("full", None, "decode_step", 1, 1, 1),
          _run("tops", 320, "prefill", 1, 1, 1),                             # interrupted before its decode step
          dict(_POINT, method="divprune", target=320, program="prefill", error="RESOURCE_EXHAUSTED: ..."),
          dict(_POINT, mesh="data:8", method="visionzip", target=320, program="prefill", error="x")]
  key = ("llava_next", "s", "v5e:2x4", "fsdp:8", 8, "bfloat16")
  assert tpu_report.done_runs(rows, *key) == {("full", None), ("divprune", 320)}
  assert tpu_report.done_runs(rows, *key, overrides=["tops.x=1"]) == set()      # other overrides: another point


def test_summary_cells_and_ratios():
  rows = [_run("full", None, "prefill", 10 * 2**30, 40e12, 0.4), _run("full", None, "decode_step", 3 * 2**30, 1, 1),
          _run("tops", 320, "prefill", 4 * 2**30, 10e12, 0.1), _run("tops", 320, "decode_step", 20 * 2**30, 1, 1,
                                                                     fits=False),
          dict(_POINT, method="visionzip", target=320, program="prefill",
               error="JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM")]
  table = tpu_report.summary(rows, ["tops", "visionzip"])
  head, _, line = table.splitlines()
  cells = dict(zip([c.strip() for c in head.split("|")[1:-1]], [c.strip() for c in line.split("|")[1:-1]]))
  assert cells["full prefill GiB"] == "10.00" and cells["full decode GiB"] == "3.00"
  assert cells["tops@320 decode GiB"] == "20.00 NO" and cells["visionzip@320 prefill GiB"] == "OOM"
  assert cells["tops@320 / full TFLOPs"] == "0.250" and cells["tops@320 / full roofline"] == "0.250"
  assert cells["visionzip@320 / full TFLOPs"] == "—"


def test_affine_batch_and_the_largest_batch_line():
  # 2 GiB fixed + 1 GiB per 8 rows: 16 GiB holds 112 rows, in steps of 8.
  assert tpu_report.affine_batch(3 * 2**30, 8, 4 * 2**30, 16, 16 * 2**30, 8) == 112
  assert tpu_report.affine_batch(3 * 2**30, 8, 3 * 2**30, 16, 16 * 2**30, 8) == 16      # flat: no guess past 16
  row = dict(kind="largest_batch", shape="s", topology="v5e:2x4", mesh="fsdp:8", method="tops", target=320,
             largest=104, prefill_bytes=2**30, decode_bytes=2**31, next=112, why_not="RESOURCE_EXHAUSTED", compiles=4,
             bracketed=True)
  line = tpu_report.largest_batch_table([row, _run("full", None, "prefill", 1, 1, 1)]).splitlines()
  assert len(line) == 3 and "| tops@320 | 104 | 1.00 | 2.00 | 112 | RESOURCE_EXHAUSTED | 4 |" in line[2]
  over = dict(row, why_not=f"{17 * 2**30} / {2**31} bytes over {16 * 2**30}")
  assert "| prefill 17.00 / decode 2.00 GiB over 16.00 |" in tpu_report.largest_batch_table([over])
  oom = dict(row, why_not="JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                          "for HLO temporaries (16.25G) exceeds available HBM (15.75G).")
  assert "| compiler: 16.25G needed, 15.75G available |" in tpu_report.largest_batch_table([oom])


def test_a_broken_line_names_the_file_and_line(tmp_path):
  path = tmp_path / "rows.jsonl"
  path.write_text(json.dumps(_POINT) + "\n" + '{"shape": "s", "mesh' + "\n")
  with pytest.raises(ValueError, match=r"rows.jsonl:2: not a JSON row.*resumes"):
    tpu_report.load(str(path))
  assert tpu_report.load(str(tmp_path / "missing.jsonl")) == []
