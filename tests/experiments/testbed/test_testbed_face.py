"""The experiments.testbed package's face: product code finds what it uses there (the checkpoint, processor and
prompt), and importing the product modules loads none of the testbed's training code."""

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest

from experiments import testbed
from experiments.testbed import vocab

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TRAINING = ("train", "losses", "heads", "targets", "optimizer", "batches", "evaluation", "probes", "probe")


@pytest.mark.slow
def test_product_modules_do_not_load_training_code():
  code = textwrap.dedent("""
      import json, sys
      import experiments.testbed, experiments.run, experiments.score
      import experiments.analysis.report, experiments.analysis.flops, experiments.runner.results, experiments.synthvqa.vqa
      print(json.dumps(sorted(m for m in sys.modules if m.startswith("experiments"))))
  """)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded = set(json.loads(proc.stdout.splitlines()[-1]))
  assert {"experiments.testbed", "experiments.testbed.model", "experiments.testbed.vocab"} <= loaded
  assert not loaded & {f"experiments.testbed.{m}" for m in TRAINING}, sorted(loaded)


def test_face_modules_do_not_import_optax():
  """optax is training machinery; the face's own modules never import it (flax.nnx itself loads it, so this reads
  the sources rather than sys.modules)."""
  for name in ("__init__", "model", "vocab"):
    with open(os.path.join(REPO, "experiments", "testbed", f"{name}.py")) as f:
      tree = ast.parse(f.read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] == "optax"}, (name, imported)
    assert not {m for m in imported if m.startswith("experiments.testbed.") and m.rsplit(".", 1)[-1] in TRAINING}


def test_face_exports_what_the_runner_uses():
  assert testbed.PROMPT is vocab.PROMPT
  assert testbed.PROMPT == "USER: <image>\n{question} Answer with one word. ASSISTANT:"
  assert testbed.DEFAULT_CKPT == os.path.join(REPO, "experiments", "testbed_ckpt")
  assert os.path.exists(os.path.join(testbed.DEFAULT_CKPT, "model.safetensors"))
  processor = testbed.make_processor(testbed.hf_config(), directory=testbed.DEFAULT_CKPT)
  ids = processor.tokenizer(testbed.PROMPT.format(question="what color is the star?"))["input_ids"]
  assert processor.tokenizer.unk_token_id not in ids and ids.count(testbed.IMAGE_TOKEN_ID) == 1
  assert set(testbed.__all__) >= {"DEFAULT_CKPT", "PROMPT", "make_processor", "hf_from_model", "hf_config",
                                  "make_model"}
