"""Reports of an experiment run: the summary table and the relative-accuracy plot.

Axes: H image height, W image width (pixels), N packed image slots of one image, K kept slots, L decoder layers,
R pictured images (rows), C pictured methods (columns).

    rows = results.read_rows("runs/testbed/results.jsonl")
    table = report.summary(rows)                      # one dict per run, full first
    print(report.format_table(table))                 # fixed-width text; report.to_markdown(table) for BUILD.md
    report.plot(table, "relative_accuracy.png")

Input rows are the runner's JSONL rows (one per evaluated example; see `REQUIRED`). Choices made here (the papers
define the two relative-accuracy protocols, METHODS.md section 4, not the rest):
- A run is the set of rows with one `run` name; it must have one method, budget (the rows' key for the target) and
  keep_ratio, and one row per example. The unpruned reference is the run whose method is "full" (at most one).
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

The kept-token pictures are `experiments.analysis.pictures`. Figures are drawn on matplotlib's Agg canvas directly (no
pyplot, no global backend switch).
"""

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from matplotlib import figure as figure_lib
from matplotlib import ticker
from matplotlib.backends import backend_agg
import numpy as np

from experiments.synthvqa import vqa

__all__ = ["REQUIRED", "summary", "format_table", "to_markdown", "plot", "write_report", "new_figure"]

REQUIRED = ("run", "method", "budget", "keep_ratio", "example_id", "family", "correct", "visual_tokens",
            "kept_per_layer", "prefill_flops", "prefill_ms")
FULL = "full"
DPI = 120
PLOT_SIZE = (7.0, 4.5)     # inches: 840 x 540 px at DPI
CELL_SIZE = 2.0            # inches per picture cell (experiments.analysis.pictures): 240 x 240 px at DPI


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
  target = entry["budget"]
  return (entry["method"] != FULL, entry["method"], -(math.inf if target is None else target), entry["run"])


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
  """One entry per run, sorted full first, then by method, then target ("budget") descending.

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
  """Fixed-width text: a header line, then one line per run (full first, then method, target descending).

  Columns: method, T (the target, the rows' "budget"), n (examples; "n (shared)" when only some are shared with
  full), kept% (kept_fraction), accuracy per family and overall (%), rel(a)% (protocol a), rel(b)% (protocol b),
  kept/layer, prefill FLOPs per example (unit by magnitude), flops and time (prefill FLOPs and time ratios vs full). A
  time ratio whose rows were timed by more than one runner process is starred, and a footnote line follows the table.
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

def new_figure(width_in: float, height_in: float):
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
  fig = new_figure(*PLOT_SIZE)
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
