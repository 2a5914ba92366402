"""The end-to-end speed benchmark's smoke mode runs (so the script cannot rot), and a sweep compiles once per shape."""

import json

import jax
import numpy as np
import pytest
import transformers
from flax import nnx
from PIL import Image

from experiments.analysis import flops
from experiments.bench import e2e
from models import pruning
from models import qwen2_5_vl
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


# --------------------------------------------------------------------------------------------------------- Qwen2.5-VL


def _abstract_qwen(name="tiny-qwen"):
  config = qwen2_5_vl.Qwen2_5_VLConfig.from_hf(shapes.hf_config(shapes.SHAPES[name]).to_dict())
  return nnx.eval_shape(lambda: qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(config, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name", ["tiny-qwen", "qwen2.5-vl-7b"])
def test_qwen_inputs_are_what_the_processor_gives(name):
  """Patches float[Np, E] and grids as transformers' Qwen2-VL image processor gives them for an image of the shape's
  size (the 7B's 1008 x 1008 under VLMEvalKit's min / max pixels: the papers' 1,296 tokens), one contiguous run of
  image tokens per row and no other special token."""
  model = _abstract_qwen(name)
  config = model.config
  h, w = shapes.SHAPES[name].image_size
  x = e2e.make_inputs(model, 2, (h, w), 26, 0)
  processor = transformers.Qwen2VLImageProcessorPil(min_pixels=1280 * 28 * 28, max_pixels=16384 * 28 * 28)
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
  want = processor(images=[image, image], return_tensors="np")
  if name == "qwen2.5-vl-7b":
    np.testing.assert_array_equal(x.grid, want["image_grid_thw"])
    assert x.visual == 1296
  assert x.pixels.shape == (int(np.prod(x.grid, 1).sum()), config.vision.patch_dim)
  assert x.grid.tolist() == [[1, h // 14, w // 14]] * 2 and x.visual == h * w // 28 ** 2
  image_tokens = x.ids == config.image_token_id
  assert (image_tokens.sum(1) == x.visual).all() and x.ids.shape == (2, 26 + x.visual)
  assert all(np.ptp(np.flatnonzero(row)) == x.visual - 1 for row in image_tokens)
  special = (config.video_token_id, config.vision_start_token_id, config.vision_end_token_id)
  assert not np.isin(x.ids, special).any()
  assert np.asarray(model.layout(x.layout_input, 2).counts).tolist() == [x.visual] * 2
  with pytest.raises(ValueError, match="multiples of 28"):
    e2e.make_inputs(model, 1, (100, 100), 26, 0)


def test_methods_without_a_protocol_become_skipped_rows_with_the_reason():
  """SparseVLM has no official setting at T = 8 (NoProtocol); DivPrune runs; TOPS either runs or names why not."""
  runs, skipped = e2e._configs(_abstract_qwen(), ["tops", "divprune", "sparsevlm"], [8],  # pylint: disable=protected-access
                               {"tops": dict(stage2_alpha=0.5, stage2_lam=0.5)})
  ran = {name for name, _, _ in runs}
  assert {"full", "divprune"} <= ran and "sparsevlm" not in ran
  reasons = {r["method"]: r["reason"] for r in skipped}
  assert reasons["sparsevlm"].startswith("NoProtocol: ")
  assert ("tops" in ran) != ("tops" in reasons)
  assert all(r["part"] == "skipped" and r["T"] == 8 for r in skipped)
  assert "skipped: sparsevlm at T=8: NoProtocol" in e2e.table(skipped)


@pytest.mark.slow
def test_qwen_smoke_rows(tmp_path):
  """tiny-qwen beside transformers' Qwen2_5_VLForConditionalGeneration: the full model and DivPrune at T = 8 (TOPS too
  once it has a Qwen protocol, else a skipped row), every shape compiled in its warm-up."""
  out = tmp_path / "rows.jsonl"
  rows = e2e.smoke(output=str(out), shape="tiny-qwen")
  assert [json.loads(line)["shape"] for line in out.read_text().splitlines()] == ["tiny-qwen"] * len(rows)
  jax_rows = {r["method"]: r for r in rows if r["impl"] == "jax" and r["part"] == "pipeline"}
  skipped = {r["method"] for r in rows if r["part"] == "skipped"}
  assert {"full", "divprune"} <= set(jax_rows) and ("tops" in jax_rows) != ("tops" in skipped)
  for method, r in jax_rows.items():
    assert r["compiles"] == 0 and r["generated"] == 2, method
    assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["memory_bytes"] > 0
    assert len(r["tokens_per_layer"]) == 28
  assert jax_rows["full"]["tokens_per_layer"] == [26 + 35] * 28
  assert jax_rows["divprune"]["tokens_per_layer"] == [26 + 8] * 28
  assert jax_rows["divprune"]["prefill_flops"] < jax_rows["full"]["prefill_flops"]
  vision = [r for r in rows if r["impl"] == "jax" and r["part"] == "vision"]
  config = qwen2_5_vl.Qwen2_5_VLConfig.from_hf(shapes.hf_config(shapes.SHAPES["tiny-qwen"]).to_dict())
  assert vision[0]["vision_flops"] == flops.qwen_vision_flops(config.vision, [[1, 10, 14]] * 2).total
  torch_rows = [r for r in rows if r["impl"] == "torch"]
  assert {r["part"] for r in torch_rows} == {"pipeline", "vision", "decoder_at_T"}
  assert all(r["batch"] == 2 for r in torch_rows)


def test_torch_qwen_decode_positions_are_generates():
  """The transformers side's cached decode (the bench's loop with `torch_decode_positions`) gives `generate`'s
  log-probs at every step on tiny-qwen (the random weights repeat one token, hence log-probs, not tokens)."""
  import torch  # pylint: disable=g-import-not-at-top
  hf = shapes.hf_config(shapes.SHAPES["tiny-qwen"])
  hf._attn_implementation = "sdpa"  # pylint: disable=protected-access
  torch.manual_seed(0)
  model = transformers.AutoModelForImageTextToText.from_config(hf).eval()
  x = e2e.make_inputs(_abstract_qwen(), 2, (140, 196), 26, 0)
  ids = torch.tensor(x.ids).long()
  batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.tensor(x.pixels),
               image_grid_thw=torch.tensor(x.grid), mm_token_type_ids=(ids == hf.image_token_id).long())
  threads = torch.get_num_threads()
  torch.set_num_threads(1)          # a tiny model: one thread is enough, and immune to a busy machine's other jobs
  try:
    want, got = _generate_and_bench_decode(model, batch, ids.shape[1])
  finally:
    torch.set_num_threads(threads)
  for i, logits in enumerate(got):
    np.testing.assert_allclose(logits.log_softmax(-1).numpy(), want[i + 1].log_softmax(-1).numpy(), rtol=0, atol=1e-5)


def _generate_and_bench_decode(model, batch, prompt_len):
  import torch  # pylint: disable=g-import-not-at-top
  got = []
  with torch.inference_mode():
    want = model.generate(**batch, max_new_tokens=5, do_sample=False, output_logits=True,
                          return_dict_in_generate=True).logits
    out = model(**batch, use_cache=True, logits_to_keep=1)
    cache, tok, mask = out.cache, out.logits[:, -1].argmax(-1), batch["attention_mask"]
    for i in range(4):
      mask = torch.cat([mask, torch.ones((2, 1), dtype=mask.dtype)], dim=1)
      step = model(input_ids=tok[:, None], attention_mask=mask, use_cache=True, cache=cache,
                   position_ids=e2e.torch_decode_positions(model, prompt_len, i))
      cache, tok = step.cache, step.logits[:, -1].argmax(-1)
      got.append(step.logits[:, -1])
  return want, got
