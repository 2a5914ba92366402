"""The runner on Qwen2.5-VL (`--backbone=qwen2_5_vl`, lmms-eval's qwen2_5_vl wrapper): the prompts, images and
lengths it sends, the token-count buckets, and a tiny hub-layout checkpoint (tokenizer, image processor and chat
template written by transformers) end to end on a POPE snapshot in the lmms-lab layout."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen_image

import lmms_fixtures
import qwen_factories as qf
import runner_helpers
from experiments.benchmarks import registry
from experiments.runner import evaluate
from experiments.runner import inputs
from experiments.runner import plan
from experiments.runner import tasks
from models import loading
from models import pruning

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# lmms-eval's qwen2_5_vl request for a POPE question and an MME question, written out from its rules: the wrapper's
# system message, the hub chat template, the image then the task's text (POPE: the question stripped + the default
# post_prompt; MME: stripped, " Please answer yes or no." deleted, the post_prompt appended).
POPE_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               "<|vision_start|><|image_pad|><|vision_end|>Is there a dog in the image 1?\n"
               "Answer the question using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n")
MME_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              "<|vision_start|><|image_pad|><|vision_end|>Is this photo taken in a place of worship? \n"
              "Answer the question using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n")


def _pope(root, n):
  rows = [dict(id=str(i), question_id=str(100 + i), question=f" Is there a dog in the image {i}? ",
               answer="yes" if i % 2 else "no", image_source=f"COCO_val2014_{i:012d}",
               image=lmms_fixtures.image_cell(i, (60 + 7 * i, 90 - 5 * i)),
               category=("adversarial", "popular", "random")[i % 3]) for i in range(n)]
  lmms_fixtures.write_split(os.path.join(root, "POPE"), None, "test", rows, lmms_fixtures.SCHEMAS["POPE"],
                            num_shards=2)


def _mme(root):
  rows = [dict(question_id="artwork/1.jpg", image=lmms_fixtures.image_cell(7, (40, 50)), category="artwork",
               question="Is this photo taken in a place of worship?  Please answer yes or no.", answer="Yes"),
          dict(question_id="artwork/1.jpg", image=lmms_fixtures.image_cell(7, (40, 50)), category="artwork",
               question="Is this a painting? Please answer yes or no.", answer="No")]
  lmms_fixtures.write_split(os.path.join(root, "MME"), None, "test", rows, lmms_fixtures.SCHEMAS["MME"])


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
  _, directory = qf.tiny_qwen(tmp_path_factory.mktemp("ckpt"))
  qf.save_chat_template(directory)
  return str(directory)


@pytest.fixture(scope="module")
def model(qwen_ckpt):
  return loading.load_pretrained(qwen_ckpt)


def _resolve(model, checkpoint, **kw):
  config = plan.RunConfig(**dict(dict(backbone="qwen2_5_vl", checkpoint=checkpoint, tasks=("pope",),
                                      data_dir="/nonesuch", methods=("divprune",)), **kw))
  return config, *plan.resolve(config, model)


def test_prompts_lengths_and_images_follow_lmms_eval(qwen_ckpt, model, tmp_path):
  root = str(tmp_path)
  _pope(root, 2)
  _mme(root)
  config, resolved, _ = _resolve(model, qwen_ckpt, tasks=("pope", "mme"), data_dir=root)
  backbone = plan.BACKBONES["qwen2_5_vl"]
  processor = backbone.inputs.load_processor(qwen_ckpt, "lmms_eval")
  assert (resolved.protocol, resolved.conv_template) == ("lmms_eval", "chat_template")
  pope = tasks.task_run("pope", config, resolved, backbone, processor)
  mme = tasks.task_run("mme", config, resolved, backbone, processor)
  pope_example = list(pope.examples)[1]
  assert pope.prompt(pope_example) == POPE_PROMPT
  assert mme.prompt(next(iter(mme.examples))) == MME_PROMPT
  assert (pope.max_new_tokens, mme.max_new_tokens) == (128, 16)             # the yamls' generation_kwargs
  # A yaml without max_new_tokens takes the wrapper's 32,768 (the llava wrapper's 1,024 elsewhere).
  assert inputs.QWEN2_5_VL.max_new_tokens(registry.TASKS["textvqa_val"]) == 32768
  assert inputs.QWEN2_5_VL.max_new_tokens(registry.TASKS["pope"]) is None
  assert inputs.QWEN2_5_VL.stops(("ASSISTANT:", "\n\n")) == ("ASSISTANT:",)
  # The image: JPEG quality 85, resized by qwen_vl_utils' rules into [256, 2048] merged tokens (PIL bicubic).
  image = pope.image(pope_example)
  raw = lmms_fixtures.decoded(1, (67, 85))
  # 67 x 85 px: 56 x 84 rounded, under min_pixels: scaled by sqrt(200704 / (67 x 85)) = 5.94 and rounded up to 28.
  assert image.shape == (15 * 28, 19 * 28, 3)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(raw).save(buffer, format="JPEG", quality=85)
  want = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").resize((19 * 28, 15 * 28), Image.BICUBIC))
  np.testing.assert_array_equal(image, want)
  count = backbone.inputs.image_tokens(model, processor, image)
  enc = processor(images=[image], text=[POPE_PROMPT], return_tensors="np")
  assert count == 15 * 19 == int((enc["input_ids"] == model.config.image_token_id).sum())
  assert plan.run_hash_fields(resolved, "pope")["min_pixels"] == 256 * 28 * 28


def test_smart_resize_and_the_token_counts_of_both_harnesses():
  lmms = inputs.QwenInputs.PIXELS["lmms_eval"]
  vlmevalkit = (1280 * 28 * 28, 16384 * 28 * 28)
  tokens = lambda hw, bounds: np.prod(inputs.smart_resize(*hw, *bounds)) // 28 ** 2
  assert tokens((480, 640), lmms) == 17 * 23 == 391
  assert [tokens(hw, vlmevalkit) for hw in ((1000, 1000), (480, 640), (1080, 1920))] == [1296, 1302, 2691]
  for hw in ((480, 640), (375, 500), (1080, 1920), (4000, 300), (50, 60), (8000, 8000)):
    for bounds in (lmms, vlmevalkit):
      assert inputs.smart_resize(*hw, *bounds) == hf_qwen_image.smart_resize(*hw, 28, *bounds)   # transformers'


def test_buckets_are_few_and_pad_under_a_quarter():
  assert [inputs.bucket(n) for n in (4, 16, 17, 256, 257, 391, 1296, 1302, 2048, 2691, 16384)] == [
      16, 16, 32, 256, 320, 448, 1536, 1536, 2048, 3072, 16384]
  counts = np.arange(1, 16385)
  buckets = np.array([inputs.bucket(int(n)) for n in counts])
  assert (buckets >= counts).all() and (buckets[counts >= 64] - counts[counts >= 64] < counts[counts >= 64] / 4).all()
  assert len(set(buckets[(counts > 256) & (counts <= 2048)])) == 12      # lmms-eval's range: 4 per doubling
  assert (np.diff(buckets) >= 0).all()


def test_block_layout_holds_each_image_at_its_block(model):
  """Per-image blocks (`layout(..., block=)`): each image's windows, frames and rotary ids are its own layout's
  (transformers' rules, tested in tests/models), shifted to its block; the padding forms windows and frames of its
  own, rotary ids 0, no image."""
  from models import qwen2_5_vl_vision as vision  # pylint: disable=g-import-not-at-top
  config, grid, block = model.config.vision, np.array([[1, 6, 10], [1, 4, 4]]), 96
  padded = vision.vision_layout(config, grid, 2 * block, block)
  unit = config.merge_unit
  start = 0
  for i, row in enumerate(grid):
    own = vision.vision_layout(config, row[None])
    n = len(own.window_index)
    np.testing.assert_array_equal(padded.window_index[start:start + n], own.window_index + i * block // unit)
    np.testing.assert_array_equal(padded.rotary[start * unit:(start + n) * unit], own.rotary)
    pad = slice(start + n, (i + 1) * block // unit)
    assert (padded.token_image[padded.window_index[pad]] == 2).all()
    assert (padded.rotary[pad.start * unit:pad.stop * unit] == 0).all()
    frames = padded.frame_segment
    assert not set(frames[pad.start * unit:pad.stop * unit]) & set(frames[start * unit:(start + n) * unit])
    start = (i + 1) * block // unit
  assert sorted(padded.window_index) == list(range(2 * block // unit))
  with pytest.raises(ValueError, match="block=32 must be a multiple of 4 holding each image's patches"):
    vision.vision_layout(config, grid, None, 32)


def test_backbone_defaults_and_bad_flags(qwen_ckpt, model):
  _, resolved, runs = _resolve(model, qwen_ckpt)
  assert resolved.targets == (256, 128) and resolved.nominal_tokens == 1296      # the paper's Table 2 budgets
  assert [r.name for r in runs] == ["full", "divprune@T=256", "divprune@T=128"]
  _, resolved, _ = _resolve(model, qwen_ckpt, keep_ratios=("0.5",))
  assert resolved.targets == (648,)                                               # of the nominal 1,296
  for kw, match in ((dict(tasks=("synthvqa",)), "runs the benchmark tasks"),
                    (dict(protocol="llava"), "no Qwen path"),
                    (dict(resolution="fixed_672"), "--resolution must be one of native")):
    with pytest.raises(ValueError, match=match):
      _resolve(model, qwen_ckpt, **kw)


VLMEVALKIT = dict(min_pixels=1280 * 28 * 28, max_pixels=16384 * 28 * 28)    # 1003520 / 12845056: the paper's 1,296


def test_pixel_bounds_reach_the_resize_and_the_processor(qwen_ckpt):
  """--min_pixels / --max_pixels (lmms-eval's model_args): a 640 x 480 image gets 391 tokens under the wrapper's
  defaults and 1,302 under VLMEvalKit's bounds, in the runner's resize and in transformers' image processor built
  with the same bounds (its own smart_resize then keeps the size)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)
  for hooks, (rows, cols) in ((inputs.QWEN2_5_VL, (17, 23)), (inputs.QwenInputs(**VLMEVALKIT), (31, 42))):
    bounds = hooks.pixels("lmms_eval")
    assert hf_qwen_image.smart_resize(480, 640, 28, *bounds) == (28 * rows, 28 * cols)     # transformers' rule
    resized = inputs.lmms_eval_image(image, *bounds)
    assert resized.shape == (28 * rows, 28 * cols, 3)
    processor = hooks.load_processor(qwen_ckpt, "lmms_eval")
    ip = processor.image_processor
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == bounds
    grid = processor.image_processor(images=[Image.fromarray(resized)], return_tensors="np")["image_grid_thw"]
    np.testing.assert_array_equal(grid, [[1, 2 * rows, 2 * cols]])        # 14-px patches, merged 2 x 2
    assert hooks.image_tokens(None, processor, resized) == rows * cols
  assert (17 * 23, 31 * 42) == (391, 1302)
  # A side floored to 0 (qwen_vl_utils' rule under a small max_pixels) is refused, naming the flag.
  with pytest.raises(ValueError, match="raise --max_pixels"):
    inputs.lmms_eval_image(np.zeros((20, 400, 3), np.uint8), 784, 784)


def test_pixel_flags_are_checked_and_hashed(qwen_ckpt, model):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["run", "--min_pixels=1003520", "--max_pixels=12845056"])
  try:
    assert plan.RunConfig.from_flags(flags.FLAGS).min_pixels == 1003520
    assert plan.RunConfig.from_flags(flags.FLAGS).max_pixels == 12845056
  finally:
    flags.FLAGS.unparse_flags()
  # LLaVA backbones take no pixel bounds: refused before anything loads, naming the flag.
  with pytest.raises(app.UsageError, match="--max_pixels: --backbone=llava_next's inputs take no pixel bounds"):
    runner_helpers.run_main("--backbone=llava_next", "--checkpoint=/nonesuch", "--max_pixels=1003520")
  for kw, match in ((dict(min_pixels=0), "--min_pixels must be an integer >= 1"),
                    (dict(max_pixels=700), "--max_pixels must be an integer >= 784"),
                    (dict(min_pixels=2000000), "--min_pixels=2000000 exceeds the lmms_eval max_pixels 1605632"),
                    (dict(min_pixels=20000, max_pixels=10000), "--min_pixels=20000 exceeds --max_pixels=10000")):
    with pytest.raises(ValueError, match=match):
      _resolve(model, qwen_ckpt, **kw)
  with pytest.raises(ValueError, match="--min_pixels: --backbone=llava_1_5's"):
    plan.backbone_of(plan.RunConfig(backbone="llava_1_5", min_pixels=1003520))
  # The bounds are hashed into the rows' keys: other bounds never share rows; the defaults given explicitly do.
  keys = {}
  for name, kw in (("default", {}), ("explicit", dict(min_pixels=200704, max_pixels=1605632)),
                   ("vlmevalkit", VLMEVALKIT), ("min only", dict(min_pixels=1003520))):
    _, resolved, runs = _resolve(model, qwen_ckpt, **kw)
    settings = plan.run_hash_fields(resolved, "pope")
    keys[name] = evaluate.run_hash(settings, runs[1], "pope")
    if name == "vlmevalkit":
      assert (settings["min_pixels"], settings["max_pixels"]) == (1003520, 12845056)
      assert json.loads(resolved.to_json())["run"]["max_pixels"] == 12845056       # the printed configuration
  assert keys["default"] == keys["explicit"] and len({keys["default"], keys["vlmevalkit"], keys["min only"]}) == 3


@pytest.mark.slow
def test_pruned_results_do_not_depend_on_the_bucket(qwen_ckpt, model):
  """The same prompts through the unpadded processor rows and padded to a larger bucket: the same kept tokens and
  logits (full model and DivPrune's Stage I)."""
  processor = qf.processor(qwen_ckpt)      # the tiny bounds (4 to 80 tokens): 8 and 6 tokens here
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in ((60, 100), (84, 56))]
  counts = [inputs.QWEN2_5_VL.image_tokens(model, processor, im) for im in images]
  assert counts == [8, 6]
  prompts = [qf.chat_prompt("Is there a dog?"), qf.chat_prompt("What colour is the large object on the left?")]
  divprune = pruning.method_config("divprune", family="qwen2_5_vl", target=6, num_layers=2, crops=1)
  enc = processor(images=images, text=prompts, return_tensors="np", padding=True)
  with jax.default_matmul_precision("float32"):
    for config in (plan.FULL, divprune):
      ref = pruning.forward(model, config, enc["input_ids"], enc["attention_mask"],
                            jnp.asarray(enc["pixel_values"], jnp.float32), image_grid_thw=enc["image_grid_thw"])
      for visual_len in (64,):                  # four times the runner's bucket (16) for these images
        arrays = inputs.QWEN2_5_VL.encode(model, processor, prompts, images, None, visual_len)
        assert arrays["pixel_values"].shape == (2, 4 * visual_len, 1176)
        assert arrays["input_ids"].shape[1] == inputs.text_bound(arrays, model.config.image_token_id) + visual_len
        out = pruning.forward(model, config, arrays["input_ids"], arrays["attention_mask"], arrays["pixel_values"],
                              **inputs.QWEN2_5_VL.prefill_args(model, arrays, visual_len))
        np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        if config is divprune:
          np.testing.assert_array_equal(out.stage1.kept, ref.stage1.kept)


@pytest.mark.slow
def test_pope_on_qwen_end_to_end_resume_and_score(qwen_ckpt, tmp_path, capsys):
  root, out = str(tmp_path / "data"), str(tmp_path / "out")
  _pope(root, 5)
  args = ["--backbone=qwen2_5_vl", f"--checkpoint={qwen_ckpt}", "--tasks=pope", f"--data_dir={root}",
          "--method=divprune", "--budget=8", "--limit=4", "--batch_size=2", "--max_new_tokens=3",
          f"--output_dir={out}"]
  runner_helpers.run_main(*args)
  printed = capsys.readouterr().out
  rows = runner_helpers.read_rows(out)
  assert sorted({r["run"] for r in rows}) == ["divprune@T=8", "full"] and len(rows) == 8
  assert all(r["prompt"] == POPE_PROMPT.replace("image 1", f"image {int(r['question_id']) - 100}") for r in rows)
  assert all(r["kept_per_layer"] == [8.0, 8.0] for r in rows if r["run"] != "full")
  full = [r for r in rows if r["run"] == "full"]
  assert all(r["kept_per_layer"] == [r["visual_tokens"]] * 2 and r["visual_tokens"] >= 256 for r in full)
  # The buckets: in the summary, the printed table and the manifest.
  with open(os.path.join(out, "manifest.json")) as f:
    manifest = json.load(f)
  compiled = manifest["compiled"]["pope"]
  assert set(compiled) == {"visual_buckets", "shapes", "programs"} and compiled["programs"] == 2 * len(
      compiled["shapes"])
  assert {int(k) for k in compiled["visual_buckets"]} <= {inputs.bucket(r["visual_tokens"]) for r in full}
  assert sum(compiled["visual_buckets"].values()) == 4
  with open(os.path.join(out, "summary_pope.md")) as f:
    assert "Compiled: visual tokens per image" in f.read()
  assert "Compiled: visual tokens per image" in printed
  assert manifest["tasks"]["pope"]["min_pixels"] == 256 * 28 * 28 and manifest["status"] == "complete"
  # The predictions file re-scores to the runner's metrics, in process and from the command line.
  from experiments import score  # pylint: disable=g-import-not-at-top
  path = os.path.join(out, "predictions", "pope", "divprune@T=8.jsonl")
  rescored = score.score(registry.TASKS["pope"], os.path.join(root, "POPE"), score.read_predictions(path),
                         "lmms_eval")
  want = registry.TASKS["pope"].score([r for r in rows if r["run"] == "divprune@T=8"], "lmms_eval")
  assert {k: v for k, v in rescored.items() if k not in ("scored", "missing")} == want
  cli = subprocess.run([sys.executable, "-m", "experiments.score", "--task=pope", f"--data_dir={root}/POPE",
                        f"--predictions={path}"], cwd=REPO, capture_output=True, text=True, check=True)
  assert json.loads(cli.stdout) == rescored
  # Resume: a rerun computes nothing, compiles nothing.
  mtime = os.path.getmtime(os.path.join(out, "results.jsonl"))
  runner_helpers.run_main(*args)
  assert os.path.getmtime(os.path.join(out, "results.jsonl")) == mtime
  with open(os.path.join(out, "manifest.json")) as f:
    assert json.load(f)["compiled"]["pope"] == {}


@pytest.mark.slow
def test_table2_methods_run_through_the_runner(tmp_path):
  """Table 2's methods on Qwen through the runner (a 4-layer tiny decoder, so TOPS runs its Table 10 shape as the
  named layers / stage2_keeps variant): TOPS (Stage I 2T, two Stage II steps), FastV (K = 2) and CDPruner's
  text-embedding fallback (labelled as such), each keeping what its schedule says in every layer (DivPrune: the
  end-to-end test above)."""
  _, directory = qf.tiny_qwen(tmp_path / "ckpt", text_layers=4)
  qf.save_chat_template(directory)
  root, out = str(tmp_path / "data"), str(tmp_path / "out")
  _pope(root, 2)
  runner_helpers.run_main("--backbone=qwen2_5_vl", f"--checkpoint={directory}", "--tasks=pope", f"--data_dir={root}",
                          "--method=tops,fastv,cdpruner", "--budget=8", "--limit=2", "--batch_size=2",
                          "--max_new_tokens=2", f"--output_dir={out}",
                          "--overrides=tops.layers=1+3,tops.stage2_keeps=6+2")
  rows = runner_helpers.read_rows(out)
  by_run = {}
  for r in rows:
    by_run.setdefault(r["run"], []).append(r)
  assert set(by_run) == {"full", "tops@T=8", "fastv@T=8", "cdpruner-text@T=8"}, set(by_run)
  assert all(len(v) == 2 for v in by_run.values())
  assert {r["method"] for r in by_run["cdpruner-text@T=8"]} == {"cdpruner-text"}     # never under CDPruner's name
  for r in by_run["tops@T=8"]:
    assert r["kept_per_layer"] == [16.0, 6.0, 6.0, 2.0], r["kept_per_layer"]
  for r, f in zip(by_run["fastv@T=8"], by_run["full"]):
    assert r["kept_per_layer"] == [f["visual_tokens"]] * 2 + [8.0, 8.0]
  assert all(r["kept_per_layer"] == [8.0] * 4 for r in by_run["cdpruner-text@T=8"])
