"""The runner on a mesh and on two processes (localhost coordinator, gloo CPU collectives): the results file is the
one a single process on one device writes, and a job cut short resumes without redoing or duplicating a row.

The reference is `experiments.run` in this process without a mesh; the two-process job runs as two subprocesses
(`jax.distributed` cannot be undone in-process), each with 2 CPU devices, on a data:2 x fsdp:2 mesh, so the batch
rows split over the processes and the weights over all four devices (their per-layer gathers cross the processes).
The testbed's 65-token vocabulary does not split over tensor:2 (`tests/models/test_sharding.py` covers tensor
meshes).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
from absl import app

import runner_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--limit=16", "--batch_size=8", "--method=tops,random", "--keep_ratio=0.111", "--pictures=1"]
TIMING = ("prefill_ms", "process")        # measured per invocation; every other field must agree


def _rows(out_dir):
  return [{k: v for k, v in row.items() if k not in TIMING} for row in runner_helpers.read_rows(out_dir)]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(out_dir, *extra):
  port = _free_port()
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-m", "experiments.run", *ARGS, *extra, f"--output_dir={out_dir}",
                             "--mesh=data:2,fsdp:2", f"--coordinator_address=localhost:{port}",
                             "--num_processes=2", f"--process_id={pid}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in (0, 1)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("one_process"))
  runner_helpers.run_main(*ARGS, f"--output_dir={out_dir}")
  return _rows(out_dir)


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes_and_resume_exactly(reference, tmp_path):
  out_dir = str(tmp_path / "two")
  outputs = _two_processes(out_dir)
  assert _rows(out_dir) == reference
  assert len(reference) == 16 * 3                                   # full + 2 methods, 16 examples each
  assert "synthvqa (16 examples" in outputs[0] and "synthvqa (16 examples" not in outputs[1]  # process 0 reports
  assert os.path.exists(os.path.join(out_dir, "kept_tokens.png"))

  # A job killed mid-batch leaves finished rows and a torn last line (the rows of a batch are written together
  # by process 0): the rerun keeps the finished rows, redoes the rest, and writes no row twice.
  path = os.path.join(out_dir, "results.jsonl")
  with open(path) as f:
    lines = f.read().splitlines()
  with open(path, "w") as f:
    f.write("\n".join(lines[:20]) + "\n" + lines[20][:40])
  _two_processes(out_dir)
  rows = runner_helpers.read_rows(out_dir)
  assert [r["process"] for r in rows[:20]] == [json.loads(line)["process"] for line in lines[:20]]   # kept
  assert len({r["key"] for r in rows}) == len(rows) == len(reference)
  assert _rows(out_dir) == reference


@pytest.mark.slow
def test_single_host_mesh_matches_one_device(reference, tmp_path):
  out_dir = str(tmp_path / "mesh")
  runner_helpers.run_main(*ARGS, f"--output_dir={out_dir}", "--mesh=data:4,fsdp:2")
  assert _rows(out_dir) == reference


@pytest.mark.parametrize("args, message", [
    (["--mesh=data:3"], r"mesh data 3 x fsdp 1 x tensor 1 has 3 devices, but 8 are available"),
    (["--mesh=pipeline:8"], r"unknown axis 'pipeline'"),
    (["--mesh=data:8", "--batch_size=4"], r"--batch_size=4 does not split over the mesh's data x fsdp = 8"),
    (["--mesh=data:4,tensor:2", "--batch_size=4"], r"mesh axis tensor=2 does not divide dimension 0 \('vocab', size 65\)"),
    (["--coordinator_address=localhost:1"], r"--coordinator_address, --num_processes and --process_id go together"),
])
def test_bad_distribution_flags_fail_at_start(args, message, tmp_path):
  with pytest.raises(app.UsageError, match=message):
    runner_helpers.run_main("--limit=4", f"--output_dir={tmp_path}", *args)
