"""experiments.benchmarks.registry: the literal registry names every benchmark module's tasks once, by name."""

import pytest

from experiments.benchmarks import registry


def test_registry_holds_every_module_task_under_its_name():
  defined = [(name, task) for module in registry.MODULES for name, task in module.TASKS.items()]
  assert len({name for name, _ in defined}) == len(defined), "a task name is defined twice"
  assert list(registry.TASKS) == [name for name, _ in defined]
  for name, task in defined:
    assert registry.TASKS[name] is task and task.name == name


# One scorable example per task: (meta, target); a question per image pair for MME. Every task of the registry.
_EXAMPLES = {
    "pope": ({"category": "random"}, "yes"), "pope_adversarial": ({"category": "adversarial"}, "yes"),
    "pope_popular": ({"category": "popular"}, "yes"), "pope_random": ({"category": "random"}, "yes"),
    "gqa": ({"image_id": "n1"}, "right"), "mme": ({"category": "existence", "image": "a.png"}, "yes"),
    "textvqa_val": ({"image_id": "i"}, ["right"] * 5 + ["yes"] * 5),
    "textvqa_val_ocr": ({"image_id": "i"}, ["right"] * 5 + ["yes"] * 5),
    "vqav2_val": ({}, ["right"] * 5 + ["Yes"] * 5), "vqav2_val_lite": ({}, ["right"] * 5 + ["Yes"] * 5),
    "scienceqa_img": ({"num_choices": 2}, "A"),
    "mmbench_en_dev": ({"index": 0, "options": {"A": "right", "B": "left"}, "category": "c", "l2_category": "l"}, "A"),
    "mmbench_cn_dev": ({"index": 0, "options": {"A": "right", "B": "left"}, "category": "c", "l2_category": "l"}, "A"),
    "mmstar": ({"category": "c", "l2_category": "l"}, "A"), "ai2d": ({"num_options": 2}, "A"),
    "hallusionbench_image": ({"category": "VD", "l2_category": "chart", "set_id": "0", "figure_id": "0",
                              "dataset_question_id": "0"}, "Yes"),
    "mmvet": ({"capability": ["rec"]}, "right"),
}


@pytest.mark.parametrize("generation", [" right ", "Yes\n", "\tA. right\n"])
@pytest.mark.parametrize("name", list(registry.TASKS))
def test_lmms_eval_parsers_read_the_stripped_generation(name, generation):
  """lmms-eval strips every generate_until result before any task's metric (`api/task.py`,
  `ConfigurableTask.process_results`; filters, where a yaml names one, run before it on the raw text): under that
  protocol each task parses and scores a generation exactly as it does the stripped one."""
  task = registry.TASKS[name]
  meta, target = _EXAMPLES[name]
  # Two rows: MME scores image pairs; MMBench's rows need their own index.
  rows = lambda text: [{"question_id": str(i), "prediction": text, "target": target,
                        "meta": dict(meta, index=i) if "index" in meta else meta} for i in range(2)]
  stripped = generation.strip()
  assert task.parse(generation, meta, "lmms_eval") == task.parse(stripped, meta, "lmms_eval")
  assert task.score(rows(generation), "lmms_eval") == task.score(rows(stripped), "lmms_eval")


def test_every_task_has_a_strip_case():
  assert set(_EXAMPLES) == set(registry.TASKS)
