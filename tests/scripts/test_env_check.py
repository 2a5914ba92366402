"""The lock and its checker: scripts/env_check.py names every package that differs from a lock."""

import importlib.util
import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("env_check", os.path.join(ROOT, "scripts", "env_check.py"))
env_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(env_check)


def _site(tmp_path, packages: dict[str, str]) -> str:
  """A site directory holding only the .dist-info metadata of `packages` (name -> version)."""
  site = tmp_path / "site"
  for name, version in packages.items():
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
  return str(site)


def _lock(tmp_path, text: str, name="lock.txt") -> str:
  path = tmp_path / name
  path.write_text(text)
  return str(path)


_LOCK = """# comment
numpy==2.4.6 \\
    --hash=sha256:00
Typing_Extensions==4.16.0 \\
    --hash=sha256:11
    # via x
torch==2.13.0+cpu \\
    --hash=sha256:22
"""


def test_read_lock_normalizes_names_and_keeps_local_labels(tmp_path):
  assert env_check.read_lock(_lock(tmp_path, _LOCK)) == {
      "numpy": "2.4.6", "typing-extensions": "4.16.0", "torch": "2.13.0+cpu"}


@pytest.mark.parametrize("line, problem", [("numpy>=2", "not an exact pin"), ("numpy==1\nnumpy==2", "pinned twice")])
def test_read_lock_rejects_what_is_not_a_lock(tmp_path, line, problem):
  path = _lock(tmp_path, line + "\n")
  with pytest.raises(ValueError, match=re.escape(path) + ".*" + problem):
    env_check.read_lock(path)


def test_matching_set_passes(tmp_path):
  site = _site(tmp_path, {"numpy": "2.4.6", "typing_extensions": "4.16.0", "torch": "2.13.0+cpu", "tops-jax": "0.1"})
  assert env_check.main([_lock(tmp_path, _LOCK), "--path", site]) == 0


def test_every_difference_is_named(tmp_path, capsys):
  # numpy at another version, torch's CUDA build instead of +cpu, typing-extensions missing, rich not in the lock.
  site = _site(tmp_path, {"numpy": "2.5.0", "torch": "2.13.0", "rich": "15.0.0"})
  assert env_check.main([_lock(tmp_path, _LOCK), "--path", site]) == 1
  err = capsys.readouterr().err
  assert "4 difference(s)" in err
  assert "numpy: installed 2.5.0, lock has 2.4.6" in err
  assert "torch: installed 2.13.0, lock has 2.13.0+cpu" in err
  assert "typing-extensions: missing (lock has 4.16.0)" in err
  assert "rich 15.0.0: installed but not in the lock" in err


def test_also_tolerates_the_second_lock_at_its_versions_only(tmp_path, capsys):
  runtime = _lock(tmp_path, "numpy==2.4.6\n", "runtime.txt")
  test = _lock(tmp_path, "numpy==2.4.6\npytest==9.2.0\n", "test.txt")
  assert env_check.main([runtime, "--also", test, "--path", _site(tmp_path, {"numpy": "2.4.6",
                                                                              "pytest": "9.2.0"})]) == 0
  other = tmp_path / "other"
  other.mkdir()
  assert env_check.main([runtime, "--also", test, "--path", _site(other, {"numpy": "2.4.6", "pytest": "9.0.0"})]) == 1
  assert "pytest 9.0.0: installed but not in the lock" in capsys.readouterr().err


def test_extraneous_lists_the_packages_to_remove(tmp_path, capsys):
  site = _site(tmp_path, {"numpy": "2.4.6", "boto3": "1.0", "rich": "15.0.0"})
  assert env_check.main([_lock(tmp_path, "numpy==2.4.6\n"), "--path", site, "--extraneous"]) == 0
  assert capsys.readouterr().out.split() == ["boto3", "rich"]


def test_command_line_exit_status(tmp_path):
  site = _site(tmp_path, {"numpy": "2.5.0"})
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "env_check.py"),
                         _lock(tmp_path, "numpy==2.4.6\n"), "--path", site], capture_output=True, text=True)
  assert proc.returncode == 1
  assert "numpy: installed 2.5.0, lock has 2.4.6" in proc.stderr


# The committed locks themselves.

def _project():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def test_locks_pin_every_declared_dependency_inside_its_range():
  project = _project()
  runtime = env_check.read_lock(os.path.join(ROOT, "lock", "runtime.txt"))
  test = env_check.read_lock(os.path.join(ROOT, "lock", "test.txt"))
  for lock, reqs in ((runtime, project["dependencies"]),
                     (test, project["dependencies"] + project["optional-dependencies"]["test"])):
    for req in map(Requirement, reqs):
      name = env_check.normalize(req.name)
      assert name in lock, f"{name} is declared in pyproject.toml but not locked"
      assert req.specifier.contains(lock[name], prereleases=True), (name, lock[name], str(req.specifier))
  assert "pyarrow" in runtime  # the parquet reader of the benchmark data


def test_runtime_lock_is_the_test_lock_restricted():
  runtime = env_check.read_lock(os.path.join(ROOT, "lock", "runtime.txt"))
  test = env_check.read_lock(os.path.join(ROOT, "lock", "test.txt"))
  assert {name: test.get(name) for name in runtime} == runtime
  assert test["torch"].endswith("+cpu") and "torch" not in runtime


def test_every_pin_carries_a_hash():
  for name in ("runtime.txt", "test.txt"):
    with open(os.path.join(ROOT, "lock", name)) as f:
      blocks = re.split(r"\n(?=[A-Za-z0-9])", f.read())
    pins = [b for b in blocks if "==" in b.split("\n")[0]]
    assert pins and all("--hash=sha256:" in b for b in pins), name
