"""Compares the packages installed in this interpreter with a lock file; exits 1 naming every difference.

    python scripts/env_check.py lock/test.txt                          # exactly the test set
    python scripts/env_check.py lock/runtime.txt --also lock/test.txt  # the runtime set, test packages tolerated
    python scripts/env_check.py lock/test.txt --extraneous             # names of installed packages to remove

A lock line is `name==version` (hash lines and comments are skipped). Names compare in PEP 503 form, versions as
written, local labels included (torch 2.13.0+cpu is not torch 2.13.0). The project's own editable install is not a
locked package and is ignored. Standard library only: it runs before anything else is trusted.
"""

import argparse
import importlib.metadata
import re
import sys

__all__ = ["normalize", "read_lock", "installed", "differences", "main"]

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
PROJECT = "tops-jax"


def normalize(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str) -> dict[str, str]:
  """{normalized name: version} of a requirements-style lock; a line that is neither a pin nor a hash is an error."""
  pins = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      text = line.strip()
      if not text or text.startswith("#") or text.startswith("--hash") or text.startswith("--"):
        continue
      m = _PIN.match(text)
      if not m:
        raise ValueError(f"{path}:{number}: not an exact pin (name==version): {text!r}")
      name = normalize(m.group(1))
      if name in pins:
        raise ValueError(f"{path}:{number}: {name} is pinned twice")
      pins[name] = m.group(2)
  if not pins:
    raise ValueError(f"{path}: no pinned packages")
  return pins


def installed(path: list[str] | None = None) -> dict[str, list[str]]:
  """{normalized name: [versions]} of the distributions on `path` (default sys.path); more than one is a broken
  install and is reported as such."""
  found: dict[str, list[str]] = {}
  for dist in importlib.metadata.distributions(path=path if path is not None else sys.path):
    name = dist.metadata["Name"]
    if name is None:
      continue
    found.setdefault(normalize(name), []).append(dist.version)
  found.pop(PROJECT, None)
  return found


def differences(lock: dict[str, str], have: dict[str, list[str]],
                also: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
  """(problems, extraneous names). `also`: packages tolerated beyond `lock` when installed at its versions."""
  problems, extraneous = [], []
  for name, version in sorted(lock.items()):
    versions = have.get(name)
    if not versions:
      problems.append(f"{name}: missing (lock has {version})")
    elif len(versions) > 1:
      problems.append(f"{name}: installed more than once ({', '.join(sorted(versions))}); lock has {version}")
    elif versions[0] != version:
      problems.append(f"{name}: installed {versions[0]}, lock has {version}")
  also = also or {}
  for name, versions in sorted(have.items()):
    if name in lock:
      continue
    if name in also and versions == [also[name]]:
      continue
    extraneous.append(name)
    problems.append(f"{name} {', '.join(versions)}: installed but not in the lock")
  return problems, extraneous


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("lock")
  parser.add_argument("--also", help="a second lock whose packages may be installed as well (at its versions)")
  parser.add_argument("--extraneous", action="store_true", help="print installed packages outside the lock(s)")
  parser.add_argument("--path", action="append", help="site directory to inspect (default: this interpreter's)")
  args = parser.parse_args(argv)
  lock = read_lock(args.lock)
  also = read_lock(args.also) if args.also else None
  problems, extraneous = differences(lock, installed(args.path), also)
  if args.extraneous:
    print(" ".join(extraneous))
    return 0
  if problems:
    print(f"the installed packages differ from {args.lock} ({len(problems)} difference(s)):", file=sys.stderr)
    for p in problems:
      print(f"  {p}", file=sys.stderr)
    print("rebuild with scripts/venv.sh (or rm -rf .venv first); refresh the lock with scripts/lock.sh",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
