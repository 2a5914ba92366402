"""The end-to-end speed benchmark's smoke mode runs (so the script cannot rot), and a sweep compiles once per shape."""

import json

import jax
import numpy as np
import pytest

from experiments.bench import e2e
from models import pruning
from models import shapes


@pytest.mark.slow
def test_smoke_rows(tmp_path):
  out = tmp_path / "rows.jsonl"
  rows = e2e.smoke(output=str(out))
  assert len(out.read_text().splitlines()) == len(rows)
  assert all(json.loads(line)["shape"] == "tiny-next" for line in out.read_text().splitlines())
  jax_rows = {(r["method"], r["batch"]): r for r in rows if r["impl"] == "jax" and r["part"] == "pipeline"}
  assert set(jax_rows) == {(m, 2) for m in ("full", "tops", "visionzip", "divprune")}
  for (method, b), r in jax_rows.items():
    assert r["compiles"] == 0, (method, b)           # every shape compiled in its warm-up call, none in the loop
    assert r["generated"] == 2
    assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["memory_bytes"] > 0
    assert len(r["tokens_per_layer"]) == 32
    if method != "full":
      assert r["prefill_flops"] < jax_rows[("full", b)]["prefill_flops"]
      assert r["selection_ms"] > 0
  tops = jax_rows[("tops", 2)]["tokens_per_layer"]
  assert tops[0] > tops[12] > tops[24] and np.all(np.diff(tops) <= 0)      # 2T -> T -> T/4
  full = jax_rows[("full", 2)]["tokens_per_layer"]
  assert full[0] == full[-1] == 26 + 88
  torch_rows = [r for r in rows if r["impl"] == "torch"]
  assert {(r["part"], r["batch"]) for r in torch_rows} == {(p, 2) for p in ("pipeline", "vision", "decoder_at_T")}
  assert "| jax | tops | 40 | 2 |" in e2e.table(rows)


@pytest.mark.slow
def test_sweep_compiles_once_per_shape():
  """New batches of the same shapes and new float hyperparameters reuse the compiled prefill (counted compiles)."""
  model = e2e.build_jax(shapes.hf_config(shapes.SHAPES["tiny-next"]).to_dict(), np.float32, 0)
  counter = e2e.CompileCounter()
  configs = [pruning.method_config("tops", family="llava-next", target=40, num_layers=32, stage2_alpha=a,
                                   stage2_lam=0.5, stage1_alpha=a) for a in (0.5, 1.0)]
  layout = model.layout(np.array([[112, 112]] * 2), 2)

  def call(config, seed):
    x = e2e.make_inputs(model, 2, (112, 112), 26, seed)
    return jax.block_until_ready(pruning.forward(model, config, x.ids, x.mask, x.pixels, layout=layout,
                                                 text_len=26, visual_len=x.visual).logits)

  call(configs[0], 0)
  counter.active = True
  for seed, config in enumerate(configs * 2):
    call(config, seed + 1)
  counter.active = False
  assert counter.count == 0
  counter.active = True
  call(pruning.method_config("tops", family="llava-next", target=20, num_layers=32, stage2_alpha=0.5,
                             stage2_lam=0.5), 9)
  counter.active = False
  assert counter.count >= 1          # a new budget is a new shape: the counter does see compiles


@pytest.mark.slow
def test_command_line_defines_its_flags_only_as_a_script():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  # absl prints the help and exits with status 1.
  out = subprocess.run([sys.executable, "-m", "experiments.bench.e2e", "--helpshort"], capture_output=True, text=True,
                       check=False).stdout
  assert "--shape" in out and "--attention" in out and "--overrides" in out
  from absl import flags  # pylint: disable=g-import-not-at-top
  assert "shape" not in flags.FLAGS        # importing the module (as this test does) defines none
