"""Reports of an experiment run: the summary table, the relative-accuracy plot and the kept-token pictures.

Axes: H image height, W image width (pixels), N packed image slots of one image, K kept slots, L decoder layers,
R pictured images (rows), C pictured methods (columns).

    rows = results.read_rows("runs/testbed/results.jsonl")
    table = report.summary(rows)                      # one dict per run, full first
    print(report.format_table(table))                 # fixed-width text; report.to_markdown(table) for BUILD.md
    report.plot(table, "relative_accuracy.png")
    boxes = report.token_boxes((h, w), layout, i, model.config)     # LLaVA-NeXT: pixel box per packed slot
    boxes = report.grid_boxes((h, w), 576, crop_size=336)            # LLaVA-1.5: pixel box per patch
    report.kept_picture(images, [[report.kept_mask((h, w), boxes, kept), ...], ...], titles, "kept_tokens.png")

Input rows are the runner's JSONL rows (one per evaluated example; see `REQUIRED`). Choices made here (the papers
define the two relative-accuracy protocols, METHODS.md section 4, not the rest):
- A run is the set of rows with one `run` name; it must have one method, budget and keep_ratio, and one row per
  example. The unpruned reference is the run whose method is "full" (at most one).
- Per-family and overall accuracies are over all of a run's own examples (`n`). Everything compared with the full
  run (both relative accuracies, the FLOPs and time ratios) is over the examples both runs hold (`n_shared`), so a
  partially finished run is compared fairly; with no full run those fields are None.
- rel_mean_score (protocol a, TOPS / CDPruner): mean over families of the run's accuracy / the same mean for full.
  rel_mean_ratio (protocol b, VisionZip / DART): mean over families of (run accuracy / full accuracy); a family on
  which the full model scores 0 has no ratio and is left out of (b) (None if every family is).
  Families weigh equally in both, whatever their example counts; overall accuracy weighs examples equally.
- kept_per_layer: mean over examples of the mean over layers of `kept_per_layer` (the visual tokens each decoder
  layer processed, so in-LLM pruning counts by how many layers it spares); kept_fraction = kept_per_layer / the
  mean of `visual_tokens` over the same examples (a ratio of means). This is what the table's kept% and the plot's
  x axis show; the nominal `keep_ratio` is carried along but not plotted.
- Time ratio: sum of `prefill_ms` over the shared examples / full's sum over the same examples. Rows name the
  runner process that timed them (`process`); a ratio over rows of several processes (a resumed run) is starred in
  the tables, with a footnote, since timings of different processes are not comparable.

Pictures. A kept token is drawn as the pixels of the original image its vision patch saw. For LLaVA-NeXT anyres
(`token_boxes`) the base crop's tokens saw the whole image squeezed into one crop, so each covers a coarse box
(H/g x W/g pixels, g patches per crop side); the grid crops' tokens saw the image at full resolution, so each covers
a fine box. `kept_mask` paints the union of the kept tokens' boxes, coarse and fine together; pass only the slots of
one kind (`layout.crop == 0` or `> 0`) to see one scale. Figures are drawn on matplotlib's Agg canvas directly (no
pyplot, no global backend switch).
"""

import json
import math
import os
import textwrap
from typing import Any, Iterable, Mapping, Sequence

from matplotlib import figure as figure_lib
from matplotlib import ticker
from matplotlib.backends import backend_agg
import numpy as np

from experiments import vqa
from models import anyres

__all__ = [
    "REQUIRED", "summary", "format_table", "to_markdown", "plot", "write_report", "token_boxes", "grid_boxes",
    "slot_boxes",
    "kept_mask", "shade", "kept_picture",
]

REQUIRED = ("run", "method", "budget", "keep_ratio", "example_id", "family", "correct", "visual_tokens",
            "kept_per_layer", "prefill_flops", "prefill_ms")
FULL = "full"
DPI = 120
PLOT_SIZE = (7.0, 4.5)     # inches: 840 x 540 px at DPI
CELL_SIZE = 2.0            # inches per picture cell: 240 x 240 px at DPI


# --- summary ---------------------------------------------------------------------------------------------------------

def _check_rows(rows: Sequence[Mapping[str, Any]]):
  if not rows:
    raise ValueError("summary: no result rows")
  for number, row in enumerate(rows):
    missing = [k for k in REQUIRED if k not in row]
    if missing:
      raise ValueError(f"summary: row {number} (key {row.get('key')!r}) lacks {missing}")
    kept = row["kept_per_layer"]
    if not isinstance(kept, (list, tuple)) or not kept:
      raise ValueError(f"summary: row {number} (key {row.get('key')!r}) has kept_per_layer {kept!r}; expected a "
                       "non-empty list (one count per decoder layer)")
    if not isinstance(row["correct"], (bool, np.bool_)):
      raise ValueError(f"summary: row {number} (key {row.get('key')!r}) has correct={row['correct']!r}; "
                       "expected a bool")
    if row["visual_tokens"] <= 0:
      raise ValueError(f"summary: row {number} (key {row.get('key')!r}) has visual_tokens={row['visual_tokens']}")


def _family_order(families: Iterable[str]) -> list[str]:
  """The benchmark's families in `vqa.FAMILIES` order, then any others alphabetically."""
  present = set(families)
  return [f for f in vqa.FAMILIES if f in present] + sorted(present - set(vqa.FAMILIES))


def _sort_key(entry: Mapping[str, Any]):
  budget = entry["budget"]
  return (entry["method"] != FULL, entry["method"], -(math.inf if budget is None else budget), entry["run"])


def _group(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Mapping[str, Any]]]:
  """run name -> {example_id: row}; one method/budget/keep_ratio per run, one row per example."""
  runs: dict[str, dict[str, Mapping[str, Any]]] = {}
  for row in rows:
    by_id = runs.setdefault(row["run"], {})
    if row["example_id"] in by_id:
      raise ValueError(f"summary: run {row['run']!r} has two rows for example {row['example_id']!r}")
    first = next(iter(by_id.values()), row)
    for field in ("method", "budget", "keep_ratio"):
      if row[field] != first[field]:
        raise ValueError(f"summary: run {row['run']!r} mixes {field} {first[field]!r} and {row[field]!r}")
    by_id[row["example_id"]] = row
  fulls = [name for name, by_id in runs.items() if next(iter(by_id.values()))["method"] == FULL]
  if len(fulls) > 1:
    raise ValueError(f"summary: more than one run of method {FULL!r}: {fulls}")
  seen: dict[tuple[str, Any], str] = {}
  for name, by_id in runs.items():
    first = next(iter(by_id.values()))
    ident = (first["method"], first["budget"])
    if ident in seen:
      raise ValueError(f"summary: runs {seen[ident]!r} and {name!r} are both method {ident[0]!r} at budget "
                       f"{ident[1]!r}; summarise them separately")
    seen[ident] = name
  return runs


def _family_accuracy(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  correct: dict[str, list[bool]] = {}
  for row in rows:
    correct.setdefault(row["family"], []).append(bool(row["correct"]))
  return {f: float(np.mean(correct[f])) for f in _family_order(correct)}


def _relative(run: Mapping[str, Mapping[str, Any]], full: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  shared = [i for i in run if i in full]
  out = dict(n_shared=len(shared), rel_mean_score=None, rel_mean_ratio=None, flops_ratio=None, time_ratio=None,
             time_processes=0)
  if not shared:
    return out
  out["time_processes"] = _process_count([run[i] for i in shared] + [full[i] for i in shared])
  mine = _family_accuracy([run[i] for i in shared])
  ref = _family_accuracy([full[i] for i in shared])
  ref_mean = float(np.mean(list(ref.values())))
  if ref_mean > 0:
    out["rel_mean_score"] = float(np.mean(list(mine.values()))) / ref_mean
  ratios = [mine[f] / ref[f] for f in ref if ref[f] > 0]
  if ratios:
    out["rel_mean_ratio"] = float(np.mean(ratios))
  ref_flops = sum(full[i]["prefill_flops"] for i in shared)
  if ref_flops > 0:
    out["flops_ratio"] = sum(run[i]["prefill_flops"] for i in shared) / ref_flops
  ref_ms = sum(full[i]["prefill_ms"] for i in shared)
  if ref_ms > 0:
    out["time_ratio"] = sum(run[i]["prefill_ms"] for i in shared) / ref_ms
  return out


def _process_count(rows: Iterable[Mapping[str, Any]]) -> int:
  """Runner processes that measured these rows' prefill_ms (rows without `process`, from older logs, count as one
  unknown process)."""
  return len({row.get("process") for row in rows})


def summary(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One entry per run, sorted full first, then by method, then budget descending.

  Each entry: run, method, budget, keep_ratio, n, accuracy {family: acc} and overall (over the run's n examples);
  n_shared, rel_mean_score (protocol a), rel_mean_ratio (protocol b), flops_ratio, time_ratio (over the examples
  shared with the full run; None without one), time_processes (runner processes whose timings time_ratio mixes; 0
  without a full run); kept_per_layer, visual_tokens, kept_fraction, prefill_flops, prefill_ms (means over the
  run's examples). Accuracies and ratios are fractions (1.0 = 100%).
  """
  rows = list(rows)
  _check_rows(rows)
  runs = _group(rows)
  fulls = [by_id for by_id in runs.values() if next(iter(by_id.values()))["method"] == FULL]
  full = fulls[0] if fulls else None
  entries = []
  for name, by_id in runs.items():
    examples = list(by_id.values())
    first = examples[0]
    kept = float(np.mean([np.mean(r["kept_per_layer"]) for r in examples]))
    visual = float(np.mean([r["visual_tokens"] for r in examples]))
    entry = dict(run=name, method=first["method"], budget=first["budget"], keep_ratio=first["keep_ratio"],
                 n=len(examples), accuracy=_family_accuracy(examples),
                 overall=float(np.mean([bool(r["correct"]) for r in examples])),
                 kept_per_layer=kept, visual_tokens=visual, kept_fraction=kept / visual,
                 prefill_flops=float(np.mean([r["prefill_flops"] for r in examples])),
                 prefill_ms=float(np.mean([r["prefill_ms"] for r in examples])))
    if full is None:
      entry.update(n_shared=0, rel_mean_score=None, rel_mean_ratio=None, flops_ratio=None, time_ratio=None,
                   time_processes=0)
    else:
      entry.update(_relative(by_id, full))
    entries.append(entry)
  return sorted(entries, key=_sort_key)


# --- table -----------------------------------------------------------------------------------------------------------

def _flops_unit(entries: Sequence[Mapping[str, Any]]) -> tuple[str, float]:
  top = max((e["prefill_flops"] for e in entries), default=0.0)
  for name, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9)):
    if top >= scale:
      return name, scale
  return "MFLOPs", 1e6


MIXED_TIME = "*"


def _time_cell(entry: Mapping[str, Any]) -> str:
  if entry["time_ratio"] is None:
    return "-"
  return f"{entry['time_ratio']:.3f}" + (MIXED_TIME if entry.get("time_processes", 1) > 1 else "")


def _footnotes(entries: Sequence[Mapping[str, Any]]) -> list[str]:
  """Why a time cell is starred: its rows (or full's) were timed by more than one runner process (a resumed or
  extended run), and warm-up, load and machine differ between processes."""
  mixed = [e["time_processes"] for e in entries if e["time_ratio"] is not None and e.get("time_processes", 1) > 1]
  if not mixed:
    return []
  span = str(min(mixed)) if min(mixed) == max(mixed) else f"{min(mixed)}-{max(mixed)}"
  return [f"{MIXED_TIME} time mixes prefill timings from {span} runner processes (a resumed run); for comparable "
          "times, run into a fresh --output_dir."]


def _cells(entries: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
  """Header and one row of strings per run (sorted), shared by the text and Markdown tables."""
  entries = sorted(entries, key=_sort_key)
  families = _family_order(f for e in entries for f in e["accuracy"])
  unit, scale = _flops_unit(entries)

  def pct(x):
    return "-" if x is None else f"{100 * x:.1f}"

  def ratio(x):
    return "-" if x is None else f"{x:.3f}"

  header = ["method", "T", "n", "kept%", *families, "overall", "rel(a)%", "rel(b)%", "kept/layer", unit, "flops",
            "time"]
  body = []
  for e in entries:
    n = str(e["n"]) if e["n_shared"] in (0, e["n"]) else f"{e['n']} ({e['n_shared']})"
    body.append([e["method"], "-" if e["budget"] is None else str(e["budget"]), n, pct(e["kept_fraction"]),
                 *(pct(e["accuracy"].get(f)) for f in families), pct(e["overall"]), pct(e["rel_mean_score"]),
                 pct(e["rel_mean_ratio"]), f"{e['kept_per_layer']:.1f}", f"{e['prefill_flops'] / scale:.2f}",
                 ratio(e["flops_ratio"]), _time_cell(e)])
  return header, body


def format_table(entries: Sequence[Mapping[str, Any]]) -> str:
  """Fixed-width text: a header line, then one line per run (full first, then method, budget descending).

  Columns: method, T (budget), n (examples; "n (shared)" when only some are shared with full), kept% (kept_fraction),
  accuracy per family and overall (%), rel(a)% (protocol a), rel(b)% (protocol b), kept/layer, prefill FLOPs per
  example (unit by magnitude), flops and time (prefill FLOPs and time ratios vs full). A time ratio whose rows were
  timed by more than one runner process is starred, and a footnote line follows the table.
  """
  if not entries:
    raise ValueError("format_table: empty summary")
  header, body = _cells(entries)
  widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
  lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
           for r in [header, *body]]
  return "\n".join([line.rstrip() for line in lines] + _footnotes(entries))


def to_markdown(entries: Sequence[Mapping[str, Any]]) -> str:
  """The `format_table` columns as a Markdown table, followed by a line saying what rel(a) and rel(b) are."""
  if not entries:
    raise ValueError("to_markdown: empty summary")
  header, body = _cells(entries)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in body]
  lines.append("")
  lines.append("rel(a): mean family accuracy / full's (TOPS, CDPruner protocol); rel(b): mean over families of "
               "accuracy / full's (VisionZip, DART protocol); both over the examples shared with the full run. "
               "kept%: visual tokens per decoder layer (mean over layers) / visual tokens of the image. "
               "flops, time: prefill FLOPs and time / full's.")
  lines += _footnotes(entries)
  return "\n".join(lines)


# --- plot ------------------------------------------------------------------------------------------------------------

def _new_figure(width_in: float, height_in: float):
  fig = figure_lib.Figure(figsize=(width_in, height_in), dpi=DPI)
  backend_agg.FigureCanvasAgg(fig)
  return fig


def plot(entries: Sequence[Mapping[str, Any]], path: str, title: str | None = None):
  """PNG (840 x 540 px): relative accuracy (protocol a) vs kept fraction, log-x, one line per method, full at 100%."""
  full = [e for e in entries if e["method"] == FULL]
  pruned = [e for e in entries if e["method"] != FULL]
  if not full:
    raise ValueError(f"plot: the summary has no {FULL!r} run to be relative to")
  if not pruned:
    raise ValueError("plot: the summary has no pruned run")
  fig = _new_figure(*PLOT_SIZE)
  ax = fig.add_subplot()
  ax.axhline(100.0, color="black", linestyle="--", linewidth=1.0, label=f"{FULL} (100%)")
  markers = "osD^v<>pPX*h"
  methods = sorted({e["method"] for e in pruned})
  for m, method in enumerate(methods):
    points = sorted((e["kept_fraction"], e["rel_mean_score"]) for e in pruned
                    if e["method"] == method and e["rel_mean_score"] is not None)
    if points:
      x, y = zip(*points)
      ax.plot(np.multiply(x, 100.0), np.multiply(y, 100.0), marker=markers[m % len(markers)], label=method)
  ax.set_xscale("log")
  percent = ticker.FuncFormatter(lambda value, _: f"{value:g}")
  ax.xaxis.set_major_formatter(percent)
  ax.xaxis.set_minor_formatter(percent)
  ax.set_xlabel("visual tokens kept per decoder layer (% of the image's tokens, log scale)")
  ax.set_ylabel("relative accuracy (%), protocol (a): mean score / full's")
  ax.set_title(title or "Relative accuracy vs visual tokens kept")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)


def write_report(rows: Iterable[Mapping[str, Any]], directory: str, name: str = "summary") -> dict[str, str]:
  """Writes {name}.json, {name}.txt, {name}.md and relative_accuracy_{name}.png (if there is a full and a pruned
  run) under `directory`; returns {kind: path}."""
  entries = summary(rows)
  os.makedirs(directory, exist_ok=True)
  paths = {kind: os.path.join(directory, f"{name}.{kind}") for kind in ("json", "txt", "md")}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(entries, f, indent=2, sort_keys=True)
  with open(paths["txt"], "w", encoding="utf-8") as f:
    f.write(format_table(entries) + "\n")
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write(to_markdown(entries) + "\n")
  methods = {e["method"] for e in entries}
  if FULL in methods and len(methods) > 1:
    paths["png"] = os.path.join(directory, f"relative_accuracy_{name}.png")
    plot(entries, paths["png"])
  return paths


# --- token -> pixel geometry -----------------------------------------------------------------------------------------

Box = tuple[float, float, float, float] | None


def _clip_box(y0: float, x0: float, y1: float, x1: float, height: int, width: int) -> Box:
  y0, y1 = max(y0, 0.0), min(y1, float(height))
  x0, x1 = max(x0, 0.0), min(x1, float(width))
  return (y0, x0, y1, x1) if y1 > y0 and x1 > x0 else None


def token_boxes(image_size, layout: anyres.PackLayout, index: int, config) -> list[Box]:
  """Pixel box (y0, x0, y1, x1) in the original image of every packed slot of image `index` of a LLaVA-NeXT layout.

  image_size: the image's (height, width), as the processor saw it; layout: `model.pack_layout(image_sizes)`;
  config: a `LlavaNextConfig` (reads `image_grid_pinpoints`, `vision.image_size`, `vision.patch_size`).
  Returns a list of length N: half-open float boxes clipped to the image, None for newline and padding slots.
  Geometry as `LlavaNextImageProcessorPil` (through `anyres.crop_grid`): the base crop (crop 0) is the
  whole image stretched to the crop, so its patches cover coarse boxes; the grid crops tile the image resized to fit
  the best pinpoint and centred with zero padding, so their patches cover fine boxes. Unpadding works on whole
  patches (transformers' `unpad_image`): a kept patch that straddles the padding is clipped to the image, and for a
  padded size the cut can also drop the patches holding a thin strip (under one patch) at the image's edges, which
  then only the base crop covers.
  """
  height, width = anyres._size(image_size)  # pylint: disable=protected-access
  pinpoints = tuple(map(tuple, config.image_grid_pinpoints))
  crop, patch = config.vision.image_size, config.vision.patch_size
  source = np.asarray(layout.source)
  if source.ndim != 2 or not 0 <= index < source.shape[0]:
    raise ValueError(f"token_boxes: index {index} is not an image of a layout with source shape {source.shape}")
  count = anyres.num_image_features((height, width), pinpoints, crop, patch)
  # The processor's resize-and-pad geometry, shared with the testbed's patch labels.
  rows, cols, new_h, new_w, pad_y, pad_x = anyres.crop_grid((height, width), pinpoints, crop)
  if int(layout.counts[index]) != count or tuple(np.asarray(layout.grid[index]).tolist()) != (rows, cols):
    raise ValueError(f"token_boxes: layout image {index} ({int(layout.counts[index])} slots, grid "
                     f"{tuple(np.asarray(layout.grid[index]).tolist())}) was not built for a {height}x{width} image "
                     f"({count} slots, grid {(rows, cols)})")
  g = crop // patch
  t = g * g
  boxes: list[Box] = []
  for s in source[index].tolist():
    if s < 0:
      boxes.append(None)
      continue
    c, token = divmod(s, t)
    py, px = divmod(token, g)
    if c == 0:
      sy, sx = height / crop, width / crop
      boxes.append(_clip_box(py * patch * sy, px * patch * sx, (py + 1) * patch * sy, (px + 1) * patch * sx,
                             height, width))
      continue
    r, cc = divmod(c - 1, cols)
    ty, tx = r * crop + py * patch - pad_y, cc * crop + px * patch - pad_x     # in the resized image
    sy, sx = height / new_h, width / new_w
    boxes.append(_clip_box(ty * sy, tx * sx, (ty + patch) * sy, (tx + patch) * sx, height, width))
  return boxes


def grid_boxes(image_size, num_patches: int, crop_size: int | None = None, resize: str = "center_crop") -> list[Box]:
  """Pixel box of each of the g x g patches (row-major) of a single-crop model (LLaVA-1.5), in original pixels.

  resize: "center_crop" (CLIP / llava-hf processors: shorter side resized to the crop, then a centre crop; the
  image beyond the crop is never seen), "pad" (original LLaVA: padded to a centred square, then resized; patches
  wholly in the padding get None) or "stretch" (resized to a square). crop_size: the vision crop in pixels
  (`config.vision.image_size`); with it "center_crop" follows the processor's integer rounding of the resized size and
  the crop offset exactly, without it the geometry is continuous (edges off by under one resized pixel). "pad" and
  "stretch" are exact either way.
  """
  height, width = anyres._size(image_size)  # pylint: disable=protected-access
  g = math.isqrt(num_patches) if num_patches > 0 else 0
  if g == 0 or g * g != num_patches:
    raise ValueError(f"grid_boxes: num_patches must be a positive square, got {num_patches}")
  if crop_size is not None and crop_size <= 0:
    raise ValueError(f"grid_boxes: crop_size must be positive, got {crop_size}")
  if resize == "center_crop":
    short = min(height, width)
    if crop_size is None:
      top, left, step_y, step_x = (height - short) / 2, (width - short) / 2, short / g, short / g
    else:   # transformers: shorter side -> crop, longer -> int(crop * long / short); crop offset (new - crop) // 2
      new_h, new_w = (crop_size, int(crop_size * width / height)) if height <= width else (
          int(crop_size * height / width), crop_size)
      sy, sx = height / new_h, width / new_w
      top, left = (new_h - crop_size) // 2 * sy, (new_w - crop_size) // 2 * sx
      step_y, step_x = crop_size / g * sy, crop_size / g * sx
  elif resize == "pad":
    side = max(height, width)
    top, left, step_y, step_x = -((side - height) // 2), -((side - width) // 2), side / g, side / g
  elif resize == "stretch":
    top, left, step_y, step_x = 0.0, 0.0, height / g, width / g
  else:
    raise ValueError(f"grid_boxes: resize must be 'center_crop', 'pad' or 'stretch', got {resize!r}")
  return [_clip_box(top + y * step_y, left + x * step_x, top + (y + 1) * step_y, left + (x + 1) * step_x,
                    height, width) for y in range(g) for x in range(g)]


def slot_boxes(image_size, layout: anyres.PackLayout, index: int, config) -> list[Box]:
  """The pixel box of every packed slot of image `index`, for either family: a layout with grid crops is LLaVA-NeXT's
  anyres packing (`token_boxes`); a single-crop layout (`models.llava.single_crop_layout`) is LLaVA-1.5's patch grid
  behind the CLIP processor's shortest-edge resize and centre crop (`grid_boxes`)."""
  if int(np.prod(np.asarray(layout.grid)[index])) > 0:
    return token_boxes(image_size, layout, index, config)
  return grid_boxes(image_size, int(np.asarray(layout.counts)[index]), crop_size=config.vision.image_size)


def kept_mask(image_size, boxes: Sequence[Box], kept_slots) -> np.ndarray:
  """bool[H, W]: the union of the boxes of the kept slots (int[K] indices into `boxes`; negative entries are padding
  and skipped; slots without a box, e.g. newlines, add nothing). A pixel is covered when its centre lies in a box."""
  height, width = anyres._size(image_size)  # pylint: disable=protected-access
  kept = np.asarray(kept_slots).reshape(-1)
  if kept.size and not np.issubdtype(kept.dtype, np.integer):
    raise ValueError(f"kept_mask: kept_slots must be integer slot indices, got dtype {kept.dtype}")
  if kept.size and int(kept.max()) >= len(boxes):
    raise ValueError(f"kept_mask: slot {int(kept.max())} is out of range for {len(boxes)} boxes")
  mask = np.zeros((height, width), bool)
  for s in kept.tolist():
    if s < 0 or boxes[s] is None:
      continue
    y0, x0, y1, x1 = boxes[s]
    # Pixel i (centre i + 0.5) is inside [a, b) iff ceil(a - 0.5) <= i < ceil(b - 0.5).
    r0, r1 = math.ceil(y0 - 0.5), math.ceil(y1 - 0.5)
    c0, c1 = math.ceil(x0 - 0.5), math.ceil(x1 - 0.5)
    mask[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = True
  return mask


# --- pictures --------------------------------------------------------------------------------------------------------

def shade(image: np.ndarray, mask: np.ndarray, dim: float = 0.25) -> np.ndarray:
  """uint8[H, W, 3] image with pixels outside the kept area scaled by `dim`; mask: bool or float[H, W] in [0, 1]
  (1 = kept), a float mask blends linearly."""
  image = np.asarray(image)
  mask = np.asarray(mask)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"shade: image must be uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
  if mask.shape != image.shape[:2]:
    raise ValueError(f"shade: mask must be [{image.shape[0]}, {image.shape[1]}] like the image, got {mask.shape}")
  weight = mask.astype(np.float32)
  if np.any(weight < 0) or np.any(weight > 1):
    raise ValueError("shade: mask values must lie in [0, 1]")
  factor = dim + (1.0 - dim) * weight
  return np.round(image.astype(np.float32) * factor[..., None]).astype(np.uint8)


def kept_picture(images: Sequence[np.ndarray], kept_masks: Sequence[Sequence[np.ndarray]], titles: Sequence[str],
                 path: str, row_titles: Sequence[str] | None = None, dim: float = 0.25):
  """PNG grid: row r = images[r], column c = method c; each cell the image with the pixels outside
  kept_masks[c][r] dimmed.

  images: R uint8[H_r, W_r, 3] (sizes may differ); kept_masks: C lists (one per method, as titles) of R bool or
  float[H_r, W_r] masks; titles: C column titles; row_titles: optional R labels. The PNG is
  (C * 240) x (R * 240) pixels; each cell's caption gives the share of the image's pixels kept.
  """
  num_rows, num_cols = len(images), len(kept_masks)
  if num_rows == 0 or num_cols == 0:
    raise ValueError(f"kept_picture: need at least one image and one method, got {num_rows} and {num_cols}")
  if len(titles) != num_cols:
    raise ValueError(f"kept_picture: {len(titles)} titles for {num_cols} methods")
  if row_titles is not None and len(row_titles) != num_rows:
    raise ValueError(f"kept_picture: {len(row_titles)} row titles for {num_rows} images")
  for c, masks in enumerate(kept_masks):
    if len(masks) != num_rows:
      raise ValueError(f"kept_picture: method {titles[c]!r} has {len(masks)} masks for {num_rows} images")
  fig = _new_figure(num_cols * CELL_SIZE, num_rows * CELL_SIZE)
  axes = fig.subplots(num_rows, num_cols, squeeze=False)
  for r, image in enumerate(images):
    for c in range(num_cols):
      ax = axes[r, c]
      mask = np.asarray(kept_masks[c][r])
      ax.imshow(shade(image, mask, dim), interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_xlabel(f"{100 * float(np.mean(mask.astype(np.float32))):.0f}% of pixels", fontsize="x-small")
      if r == 0:
        ax.set_title(titles[c], fontsize="small")
      if c == 0 and row_titles is not None:
        ax.set_ylabel(textwrap.fill(row_titles[r], 30), fontsize="x-small")
  fig.tight_layout(pad=0.4)
  fig.savefig(path, dpi=DPI)
