"""Tests for experiments.analysis.report: summary numbers against loops written here, table and picture files, and the
token -> pixel geometry against transformers' own image processors (an image whose pixels encode their coordinates
goes through the processor; each patch's centre must read back the centre of the box `token_boxes` gives it)."""

import numpy as np
import pytest
from PIL import Image
from transformers import LlavaImageProcessorPil

from experiments import testbed
from experiments.analysis import pictures
from experiments.analysis import report
from experiments.testbed import vocab
from models import anyres
from models import llava_next

FAMILIES = ("attribute", "counting", "spatial")
LAYERS = 4


# --- summary ---------------------------------------------------------------------------------------------------------

def _row(run, method, budget, example, family, correct, rng, visual=200):
  kept = rng.uniform(0.05, 1.0, LAYERS) * visual if method != "full" else np.full(LAYERS, float(visual))
  return dict(key=f"h/{run}/{example}", run=run, method=method, budget=budget,
              keep_ratio=None if budget is None else budget / 180, example_id=example, family=family,
              subtype="x", correct=bool(correct), prediction="a", answer="a", visual_tokens=visual,
              kept_per_layer=kept.tolist(), tokens_per_layer=(kept + 20).tolist(),
              prefill_flops=float(rng.uniform(1e9, 3e9)), prefill_ms=float(rng.uniform(1.0, 5.0)))


def _rows(seed=0):
  """full on e0..e11 but e5; tops@40 on all 12 (e5 not shared); tops@20 partial (e0..e6); divprune@20 on e0..e11."""
  rng = np.random.default_rng(seed)
  rows = []
  runs = [("full", "full", None, [i for i in range(12) if i != 5]), ("tops@T=40", "tops", 40, range(12)),
          ("tops@T=20", "tops", 20, range(7)), ("divprune@T=20", "divprune", 20, range(12))]
  for run, method, budget, examples in runs:
    for i in examples:
      rows.append(_row(run, method, budget, f"e{i}", FAMILIES[i % 3], rng.random() < 0.6, rng,
                       visual=int(150 + 10 * i)))
  order = rng.permutation(len(rows))   # interleaved, as several runs appending to one log
  return [rows[i] for i in order]


def _reference(rows, run):
  """Both protocols, ratios and means, with plain loops."""
  mine = {r["example_id"]: r for r in rows if r["run"] == run}
  full = {r["example_id"]: r for r in rows if r["method"] == "full"}
  shared = sorted(set(mine) & set(full))
  run_acc, full_acc = {}, {}
  for family in FAMILIES:
    ids = [i for i in shared if full[i]["family"] == family]
    if ids:
      run_acc[family] = sum(mine[i]["correct"] for i in ids) / len(ids)
      full_acc[family] = sum(full[i]["correct"] for i in ids) / len(ids)
  fams = list(run_acc)
  rel_a = (sum(run_acc[f] for f in fams) / len(fams)) / (sum(full_acc[f] for f in fams) / len(fams))
  ok = [f for f in fams if full_acc[f] > 0]
  rel_b = sum(run_acc[f] / full_acc[f] for f in ok) / len(ok)
  flops = sum(mine[i]["prefill_flops"] for i in shared) / sum(full[i]["prefill_flops"] for i in shared)
  time = sum(mine[i]["prefill_ms"] for i in shared) / sum(full[i]["prefill_ms"] for i in shared)
  per_example = [sum(r["kept_per_layer"]) / len(r["kept_per_layer"]) for r in mine.values()]
  kept = sum(per_example) / len(per_example)
  visual = sum(r["visual_tokens"] for r in mine.values()) / len(mine)
  accuracy = {}
  for family in FAMILIES:
    ids = [i for i in mine if mine[i]["family"] == family]
    accuracy[family] = sum(mine[i]["correct"] for i in ids) / len(ids)
  overall = sum(r["correct"] for r in mine.values()) / len(mine)
  return dict(n=len(mine), n_shared=len(shared), rel_mean_score=rel_a, rel_mean_ratio=rel_b, flops_ratio=flops,
              time_ratio=time, kept_per_layer=kept, kept_fraction=kept / visual, accuracy=accuracy, overall=overall,
              prefill_flops=sum(r["prefill_flops"] for r in mine.values()) / len(mine))


def test_summary_matches_reference_loops():
  rows = _rows()
  entries = report.summary(rows)
  assert [e["run"] for e in entries] == ["full", "divprune@T=20", "tops@T=40", "tops@T=20"]
  for entry in entries:
    want = _reference(rows, entry["run"])
    assert entry["n"] == want["n"] and entry["n_shared"] == want["n_shared"], entry["run"]
    for field in ("rel_mean_score", "rel_mean_ratio", "flops_ratio", "time_ratio", "kept_per_layer",
                  "kept_fraction", "overall", "prefill_flops"):
      np.testing.assert_allclose(entry[field], want[field], rtol=1e-12, err_msg=f"{entry['run']} {field}")
    assert entry["accuracy"].keys() == want["accuracy"].keys()
    for family in FAMILIES:
      np.testing.assert_allclose(entry["accuracy"][family], want["accuracy"][family], rtol=1e-12)
  by_run = {e["run"]: e for e in entries}
  assert by_run["tops@T=40"]["n"] == 12 and by_run["tops@T=40"]["n_shared"] == 11   # e5 has no full row
  assert by_run["tops@T=20"]["n_shared"] == 6                                        # partial run: e0..e6 minus e5
  assert by_run["full"]["rel_mean_score"] == 1.0 and by_run["full"]["flops_ratio"] == 1.0
  assert by_run["full"]["kept_fraction"] == 1.0


def test_protocols_differ_and_zero_family_is_left_out_of_b():
  rng = np.random.default_rng(1)
  # full: attribute 2/2, counting 1/2, spatial 0/2; run: attribute 1/2, counting 1/2, spatial 1/2.
  outcomes = {"full": [1, 1, 1, 0, 0, 0], "r": [1, 0, 1, 0, 1, 0]}
  rows = [_row(run, "full" if run == "full" else "m", None if run == "full" else 8, f"e{i}", FAMILIES[i // 2], c, rng)
          for run, cs in outcomes.items() for i, c in enumerate(cs)]
  entry = {e["run"]: e for e in report.summary(rows)}["r"]
  np.testing.assert_allclose(entry["rel_mean_score"], (0.5 + 0.5 + 0.5) / 3 / ((1.0 + 0.5 + 0.0) / 3), rtol=1e-12)
  np.testing.assert_allclose(entry["rel_mean_ratio"], (0.5 / 1.0 + 0.5 / 0.5) / 2, rtol=1e-12)


def test_summary_without_full_run_has_no_relative_numbers():
  rows = [r for r in _rows() if r["method"] != "full"]
  for entry in report.summary(rows):
    assert entry["rel_mean_score"] is None and entry["rel_mean_ratio"] is None
    assert entry["flops_ratio"] is None and entry["time_ratio"] is None and entry["n_shared"] == 0
  with pytest.raises(ValueError, match="full"):
    report.plot(report.summary(rows), "/dev/null")


def _break(rows, how):
  rows = [dict(r) for r in rows]
  if how == "duplicate":
    rows.append(dict(rows[0]))
  elif how == "mixed_budget":
    other = next(i for i, r in enumerate(rows) if r["run"] == "tops@T=40")
    rows[other]["budget"] = 41
  elif how == "missing":
    del rows[3]["prefill_ms"]
  elif how == "two_full":
    rows += [dict(r, run="full2", key=r["key"] + "2") for r in rows if r["method"] == "full"]
  elif how == "same_method_budget":
    rows += [dict(r, run="tops@T=40b", key=r["key"] + "b") for r in rows if r["run"] == "tops@T=40"]
  elif how == "empty_layers":
    rows[2]["kept_per_layer"] = []
  return rows


@pytest.mark.parametrize("how, match", [("duplicate", "two rows"), ("mixed_budget", "mixes budget"),
                                        ("missing", "prefill_ms"), ("two_full", "more than one"),
                                        ("same_method_budget", "both method"), ("empty_layers", "kept_per_layer")])
def test_summary_rejects_bad_rows(how, match):
  with pytest.raises(ValueError, match=match):
    report.summary(_break(_rows(), how))
  with pytest.raises(ValueError, match="no result rows"):
    report.summary([])


def test_tables_have_one_line_per_run_in_order():
  entries = report.summary(_rows())
  shuffled = entries[::-1]
  lines = report.format_table(shuffled).splitlines()
  assert len(lines) == 1 + len(entries)
  header = lines[0].split()
  assert header[:4] == ["method", "T", "n", "kept%"] and header[4:7] == list(FAMILIES)
  assert "GFLOPs" in header
  assert [(ln.split()[0], ln.split()[1]) for ln in lines[1:]] == [
      ("full", "-"), ("divprune", "20"), ("tops", "40"), ("tops", "20")]
  # The partially shared runs show "n (shared)".
  assert "12 (11)" in lines[3] and "7 (6)" in lines[4]
  assert lines[1].split()[header.index("overall")] == f"{100 * entries[0]['overall']:.1f}"
  markdown = report.to_markdown(shuffled).splitlines()
  table = [ln for ln in markdown if ln.startswith("|")]
  assert len(table) == 2 + len(entries) and table[2].startswith("| full |")
  assert all(ln.count("|") == table[0].count("|") for ln in table)


def test_time_ratio_over_several_processes_is_starred():
  rows = _rows()
  entries = {e["run"]: e for e in report.summary([dict(r, process="A") for r in rows])}
  assert all(e["time_processes"] == 1 for e in entries.values())
  assert "*" not in report.format_table(list(entries.values())) + report.to_markdown(list(entries.values()))
  # A resumed tops@T=20: its e0..e2 timed by process B; everything else by A. divprune's shared rows and full's: A.
  resumed = [dict(r, process="B" if r["run"] == "tops@T=20" and r["example_id"] in ("e0", "e1", "e2") else "A")
             for r in rows]
  entries = report.summary(resumed)
  processes = {e["run"]: e["time_processes"] for e in entries}
  assert processes == {"full": 1, "divprune@T=20": 1, "tops@T=40": 1, "tops@T=20": 2}
  lines = report.format_table(entries).splitlines()
  assert len(lines) == 1 + len(entries) + 1
  starred = [ln.split()[:2] for ln in lines[1:-1] if ln.split()[-1].endswith("*")]
  assert starred == [["tops", "20"]]
  assert lines[-1].startswith("* time mixes prefill timings from 2 runner processes")
  tops20 = next(e for e in entries if e["run"] == "tops@T=20")
  assert lines[4].split()[-1] == f"{tops20['time_ratio']:.3f}*"
  markdown = report.to_markdown(entries).splitlines()
  assert markdown[-1] == lines[-1] and sum(ln.endswith("* |") for ln in markdown) == 1
  # Rows of older logs carry no process: together with new rows, they count as one more.
  mixed = [dict(r, process="A") if r["method"] == "full" else r for r in rows]
  assert {e["run"]: e["time_processes"] for e in report.summary(mixed)} == {
      "full": 1, "divprune@T=20": 2, "tops@T=40": 2, "tops@T=20": 2}


def test_flops_unit_follows_magnitude():
  rows = _rows()
  for r in rows:
    r["prefill_flops"] *= 1e4
  assert "TFLOPs" in report.format_table(report.summary(rows)).splitlines()[0]


def _png_size(path):
  with Image.open(path) as image:
    assert image.format == "PNG"
    image.load()
    return image.size


def test_plot_and_write_report(tmp_path):
  path = str(tmp_path / "plot.png")
  report.plot(report.summary(_rows()), path)
  assert _png_size(path) == (840, 540)
  paths = report.write_report(_rows(), str(tmp_path / "out"))
  assert sorted(paths) == ["json", "md", "png", "txt"]
  assert _png_size(paths["png"]) == (840, 540)


# --- pictures --------------------------------------------------------------------------------------------------------

def test_shade_and_kept_picture(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
  mask = rng.random((6, 5)) < 0.5
  want = np.empty_like(image)
  for y in range(6):
    for x in range(5):
      want[y, x] = image[y, x] if mask[y, x] else np.round(image[y, x] * 0.25)
  np.testing.assert_array_equal(pictures.shade(image, mask), want)
  np.testing.assert_array_equal(pictures.shade(image, mask.astype(np.float32) * 0.5 + 0.5),
                                np.round(image * np.where(mask, 1.0, 0.625)[..., None]).astype(np.uint8))
  images = [rng.integers(0, 256, (96, 144, 3), dtype=np.uint8), rng.integers(0, 256, (128, 96, 3), dtype=np.uint8)]
  masks = [[np.ones(im.shape[:2], bool) for im in images],
           [rng.random(im.shape[:2]) < 0.3 for im in images],
           [rng.random(im.shape[:2]).astype(np.float32) for im in images]]
  path = str(tmp_path / "kept.png")
  pictures.kept_picture(images, masks, ["full", "tops", "divprune"], path, row_titles=["a", "b"])
  assert _png_size(path) == (3 * 240, 2 * 240)
  with pytest.raises(ValueError, match="titles"):
    pictures.kept_picture(images, masks, ["full", "tops"], path)
  with pytest.raises(ValueError, match="mask"):
    pictures.kept_picture(images, [[m.T for m in masks[0]]], ["full"], path)


# --- token -> pixel geometry -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def config():
  return llava_next.LlavaNextConfig.from_hf(testbed.hf_config())


def _layout(config, size):
  return anyres.pack_layout(np.array([size]), config.image_grid_pinpoints, config.vision.image_size,
                            config.vision.patch_size)


def _coverage(size, boxes, slots):
  """int[H, W]: how many of the slots' boxes hold each pixel centre, by a loop over pixels."""
  h, w = size
  count = np.zeros((h, w), int)
  for s in slots:
    y0, x0, y1, x1 = boxes[s]
    for y in range(h):
      for x in range(w):
        count[y, x] += y0 <= y + 0.5 < y1 and x0 <= x + 0.5 < x1
  return count


@pytest.mark.parametrize("size, pad_cols", [((96, 144), 0), ((96, 128), 1)])
def test_token_boxes_tile_the_image_at_full_scale(config, size, pad_cols):
  """96x144 fits a pinpoint exactly; 96x128 is padded by one 8-px patch column each side and unpadded by the same.
  Either way every grid patch is an 8x8 pixel square, the packed slots go row by row over the unpadded map (a
  newline after each row), and the base crop's 6x6 patches cover the image in H/6 x W/6 boxes."""
  h, w = size
  layout = _layout(config, size)
  boxes = pictures.token_boxes(size, layout, 0, config)
  assert len(boxes) == layout.source.shape[1]
  want = [((t // 6) * h / 6, (t % 6) * w / 6, (t // 6 + 1) * h / 6, (t % 6 + 1) * w / 6) for t in range(36)]
  for y in range(h // 8):
    want += [(8.0 * y, 8.0 * x, 8.0 * y + 8, 8.0 * x + 8) for x in range(w // 8)] + [None]
  want += [None] * (len(boxes) - len(want))
  assert [b is None for b in boxes] == [b is None for b in want]
  np.testing.assert_allclose([b for b in boxes if b is not None], [b for b in want if b is not None], rtol=1e-12)
  assert layout.grid[0].tolist() == [2, 3] and pad_cols == (18 - w // 8) // 2
  grid = [s for s in range(len(boxes)) if layout.crop[0, s] > 0]
  base = [s for s in range(len(boxes)) if layout.crop[0, s] == 0]
  np.testing.assert_array_equal(_coverage(size, boxes, grid), np.ones(size, int))
  np.testing.assert_array_equal(_coverage(size, boxes, base), np.ones(size, int))
  np.testing.assert_array_equal(pictures.kept_mask(size, boxes, grid), np.ones(size, bool))


@pytest.mark.parametrize("size", [(60, 100), (100, 37), (144, 96), (96, 128), (80, 140)])
def test_token_boxes_match_the_processor(config, size):
  """Each patch of each crop the processor makes reads back (from a coordinate-coded image) the centre of its box."""
  h, w = size
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  image = np.stack([yy, xx, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
  processor = vocab.make_image_processor(config.vision.image_size, config.image_grid_pinpoints)
  pixels = np.asarray(processor(images=[image], return_tensors="np")["pixel_values"])[0]
  mean = np.asarray(processor.image_mean)[:, None, None]
  std = np.asarray(processor.image_std)[:, None, None]
  pixels = (pixels * std + mean) * 255.0
  layout = _layout(config, size)
  boxes = pictures.token_boxes(size, layout, 0, config)
  g, patch = 6, config.vision.patch_size
  checked = 0
  for s, box in zip(layout.source[0].tolist(), boxes):
    if s < 0:
      assert box is None
      continue
    y0, x0, y1, x1 = box
    assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
    if y0 == 0 or x0 == 0 or y1 == h or x1 == w:   # may be clipped, or read the processor's zero padding
      continue
    crop, token = divmod(s, g * g)
    py, px = divmod(token, g)
    centre = pixels[crop, :2, py * patch + 3:py * patch + 5, px * patch + 3:px * patch + 5].mean(axis=(1, 2)) + 0.5
    np.testing.assert_allclose(centre, [(y0 + y1) / 2, (x0 + x1) / 2], atol=0.75, err_msg=f"slot source {s}")
    checked += 1
  assert checked > 100


def test_token_boxes_base_crop_covers_whole_image(config):
  size = (100, 37)
  layout = _layout(config, size)
  boxes = pictures.token_boxes(size, layout, 0, config)
  base = [s for s in range(len(boxes)) if layout.crop[0, s] == 0]
  assert len(base) == 36
  np.testing.assert_array_equal(_coverage(size, boxes, base), np.ones(size, int))
  # The grid tiles the image resized to 100x37 -> 144x54, centred at x = 21..75 of a 96-px pinpoint (12 patch columns);
  # unpadding keeps feature columns 3..8 (int(37 * 18 / 100) = 6 of 12, centred), i.e. resized x 24..72, so image
  # pixels whose centres lie within 3 resized px (~2 original px) of the left/right edge are in no grid token.
  grid = [s for s in range(len(boxes)) if layout.crop[0, s] > 0]
  mask = pictures.kept_mask(size, boxes, grid)
  assert mask[:, 2:35].all() and not mask[:, :2].any() and not mask[:, 35:].any()


def test_token_boxes_rejects_a_layout_of_another_size(config):
  with pytest.raises(ValueError, match="not built for"):
    pictures.token_boxes((96, 96), _layout(config, (96, 144)), 0, config)
  with pytest.raises(ValueError, match="index"):
    pictures.token_boxes((96, 144), _layout(config, (96, 144)), 1, config)


@pytest.mark.parametrize("resize", ["center_crop", "pad"])
@pytest.mark.parametrize("size", [(60, 100), (100, 37), (90, 70), (48, 48)])
def test_grid_boxes_match_the_llava_processor(resize, size):
  h, w = size
  crop = {"height": 48, "width": 48}
  processor = LlavaImageProcessorPil(size={"shortest_edge": 48} if resize == "center_crop" else crop, crop_size=crop,
                                     do_pad=resize == "pad", do_center_crop=resize == "center_crop")
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  image = np.stack([yy, xx, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
  pixels = np.asarray(processor(images=[image], return_tensors="np")["pixel_values"])[0]
  pixels = (pixels * np.asarray(processor.image_std)[:, None, None] + np.asarray(processor.image_mean)[:, None, None])
  pixels = pixels * 255.0
  boxes = pictures.grid_boxes(size, 36, crop_size=48, resize=resize)
  checked = 0
  for t, box in enumerate(boxes):
    if box is None or box[0] == 0 or box[1] == 0 or box[2] == h or box[3] == w:
      continue
    py, px = divmod(t, 6)
    centre = pixels[:2, py * 8 + 3:py * 8 + 5, px * 8 + 3:px * 8 + 5].mean(axis=(1, 2)) + 0.5
    np.testing.assert_allclose(centre, [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], atol=0.75)
    checked += 1
  assert checked >= 8
  if resize == "pad":   # a patch row/column wholly in the padding has no box, exactly when the padding is that wide
    side = max(h, w)
    assert any(b is None for b in boxes) == ((side - min(h, w)) // 2 >= side / 6)


def test_kept_mask_uses_pixel_centres():
  rng = np.random.default_rng(0)
  size = (13, 17)
  boxes = []
  for _ in range(6):
    (y0, y1), (x0, x1) = np.sort(rng.uniform(0, 13, 2)), np.sort(rng.uniform(0, 17, 2))
    boxes.append((float(y0), float(x0), float(y1), float(x1)))
  boxes.append(None)
  kept = np.array([0, 2, 5, 6, -1], np.int32)   # a None box and a padding index add nothing
  want = _coverage(size, boxes, [0, 2, 5]) > 0
  np.testing.assert_array_equal(pictures.kept_mask(size, boxes, kept), want)
  with pytest.raises(ValueError, match="out of range"):
    pictures.kept_mask(size, boxes, [7])
  with pytest.raises(ValueError, match="integer"):
    pictures.kept_mask(size, boxes, np.array([0.0]))
  assert not pictures.kept_mask(size, boxes, np.zeros((0,), np.int32)).any()
