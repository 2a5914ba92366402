"""Every benchmark task by its `--tasks` name (each module's `TASKS`)."""

import importlib

from experiments.benchmarks import base

__all__ = ["TASKS", "MODULES"]

MODULES = ("pope", "gqa", "mme", "textvqa", "vqav2", "scienceqa", "mmbench", "mmstar", "ai2d", "hallusionbench",
           "mmvet")


def _collect() -> dict[str, base.Task]:
  tasks: dict[str, base.Task] = {}
  for name in MODULES:
    module = importlib.import_module(f"experiments.benchmarks.{name}")
    for task_name, task in module.TASKS.items():
      if task_name in tasks:
        raise ValueError(f"benchmark task {task_name!r} is defined twice")
      tasks[task_name] = task
  return tasks


TASKS = _collect()
