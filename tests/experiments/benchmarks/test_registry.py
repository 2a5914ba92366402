"""experiments.benchmarks.registry: the literal registry names every benchmark module's tasks once, by name."""

from experiments.benchmarks import registry


def test_registry_holds_every_module_task_under_its_name():
  defined = [(name, task) for module in registry.MODULES for name, task in module.TASKS.items()]
  assert len({name for name, _ in defined}) == len(defined), "a task name is defined twice"
  assert list(registry.TASKS) == [name for name, _ in defined]
  for name, task in defined:
    assert registry.TASKS[name] is task and task.name == name
