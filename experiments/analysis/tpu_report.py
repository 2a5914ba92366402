"""Reading `experiments.tpu_compile`'s rows: one line per program, the per-program table, and the summary BUILD.md
keeps (memory per chip, fits, the loop-aware cost ratios of the pruned prefills to the full one, the largest batch).

Plain Python over the JSONL rows (no jax, no libtpu): `python -m experiments.tpu_compile ... --output=rows.jsonl`
writes them; `summary(rows)` is what it prints at the end of a sweep.
"""

import json
import math
import os
import re
from typing import Any, Iterable, Sequence

__all__ = ["load", "done_runs", "line", "table", "summary", "largest_batch_table"]

Row = dict[str, Any]


def load(path: str) -> list[Row]:
  """The rows of a JSONL file (none when it does not exist). A line that is not JSON names the file and line."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, encoding="utf-8") as f:
    for number, text in enumerate(f, 1):
      if not text.strip():
        continue
      try:
        rows.append(json.loads(text))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not a JSON row ({e.msg}); a sweep interrupted mid-write leaves a broken "
                         "last line: delete it and rerun, the sweep resumes") from None
  return rows


def _key(r: Row) -> tuple:
  return (r.get("backbone"), r.get("shape"), r.get("topology"), r.get("mesh"), r.get("batch"), r.get("dtype"),
          tuple(sorted(r.get("overrides") or ())))


def done_runs(rows: Iterable[Row], backbone, shape, topology, mesh, batch, dtype,
              overrides=()) -> set[tuple[str, int | None]]:
  """(method, target) runs of one sweep point (overrides included) that `rows` already holds: both programs, or an
  error row."""
  want = (backbone, shape, topology, mesh, batch, dtype, tuple(sorted(overrides)))
  programs: dict[tuple, set[str]] = {}
  for r in rows:
    if _key(r) == want and "method" in r and r.get("kind", "run") == "run":
      programs.setdefault((r["method"], r.get("target")), set()).add(r["program"] if "error" not in r else "error")
  return {k for k, p in programs.items() if {"prefill", "decode_step"} <= p or "error" in p}


def _gib(n) -> str:
  return "—" if n is None else f"{n / 2**30:.2f}"


def line(r: Row) -> str:
  name = f"{r.get('method', '')}{'' if r.get('target') is None else '@' + str(r['target'])} {r['program']}"
  where = f"{r.get('shape')} {r['topology']} {r['mesh']} b{r.get('batch')}"
  if "error" in r:
    return f"{where} {name}: error: {r['error'].splitlines()[0][:300]}"
  c = r["collectives"]
  return (f"{where} {name}: args {_gib(r['argument_bytes'])} out {_gib(r['output_bytes'])} "
          f"temp {_gib(r['temp_bytes'])} total {_gib(r['total_bytes'])} GiB of {_gib(r['hbm_bytes'])} "
          f"(fits: {r['fits']}); loops applied: {r['loop_flops'] / 1e12:.3g} TFLOPs, "
          f"{r['loop_hbm_bytes'] / 1e9:.3g} GB HBM, {r['collective_bytes'] / 1e9:.3g} GB collectives, roofline "
          f"{r['roofline_s'] * 1e3:.3g} ms; XLA (loops once) {r['flops'] or 0:.3g} flops; {r['while_loops']} loops; "
          f"all-gather {c['all-gather']} all-reduce {c['all-reduce']} reduce-scatter {c['reduce-scatter']} "
          f"all-to-all {c['all-to-all']}; weights gathered {len(r['weight_all_gathers'])}; "
          f"compile {r['compile_s']:.1f} s")


def table(rows: Sequence[Row]) -> str:
  """Markdown: one line per program (GiB and loop-aware cost per chip; errors in the last column)."""
  head = ["shape", "topology", "mesh", "batch", "method", "T", "program", "args GiB", "out GiB", "temp GiB",
          "total GiB", "fits", "TFLOPs", "HBM GB", "coll. GB", "roofline ms", "XLA GFLOPs (loops once)", "AG", "AR",
          "weights AG", "compile s", "error"]
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    if r.get("kind", "run") != "run":
      continue
    cells = [r.get("shape", ""), r["topology"], r["mesh"], str(r.get("batch")), r.get("method", "—"),
             str(r.get("target") or "—"), r["program"]]
    if "error" in r:
      cells += ["—"] * 14 + [r["error"].splitlines()[0][:200].replace("|", "/")]
    else:
      c = r["collectives"]
      cells += [_gib(r["argument_bytes"]), _gib(r["output_bytes"]), _gib(r["temp_bytes"]), _gib(r["total_bytes"]),
                "yes" if r["fits"] else "NO", f"{r['loop_flops'] / 1e12:.2f}", f"{r['loop_hbm_bytes'] / 1e9:.1f}",
                f"{r['collective_bytes'] / 1e9:.1f}", f"{r['roofline_s'] * 1e3:.1f}", f"{(r['flops'] or 0) / 1e9:.0f}",
                str(c["all-gather"]), str(c["all-reduce"]), str(len(r["weight_all_gathers"])),
                f"{r['compile_s']:.0f}", ""]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def _ratio(a, b) -> str:
  return "—" if a is None or b is None or not b else f"{a / b:.3f}"


def summary(rows: Sequence[Row], methods: Sequence[str] = ("tops", "visionzip")) -> str:
  """Markdown: one line per (shape, topology, mesh, batch): each program's total GiB per chip (NO when it does not
  fit, OOM when the compiler refused it), and each method's prefill cost over the full prefill's, loop-aware:
  TFLOPs and roofline seconds (estimates from the compiled TPU program, not measurements)."""
  points: dict[tuple, dict[tuple, Row]] = {}
  for r in rows:
    if r.get("kind", "run") == "run" and "method" in r:
      points.setdefault(_key(r), {})[(r["method"], r.get("target"), r.get("program"))] = r
  targets = sorted({r.get("target") for r in rows if r.get("target") is not None})

  def cell(r: Row | None) -> str:
    if r is None:
      return "—"
    if "error" in r:
      return "OOM" if "RESOURCE_EXHAUSTED" in r["error"] or "memory" in r["error"].lower() else "error"
    return f"{r['total_bytes'] / 2**30:.2f}" + ("" if r["fits"] else " NO")

  runs = [("full", None)] + [(m, t) for m in methods for t in targets]
  head = ["shape", "topology", "mesh", "batch"]
  for m, t in runs:
    label = m if t is None else f"{m}@{t}"
    head += [f"{label} prefill GiB", f"{label} decode GiB"]
  for m, t in runs[1:]:
    head += [f"{m}@{t} / full TFLOPs", f"{m}@{t} / full roofline"]
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for key, got in points.items():
    _, shape, topology, mesh, batch, _, _ = key
    mesh_error = next((r for r in got.values() if r.get("program") == "all" and "method" not in r), None)
    cells = [shape, topology, mesh, str(batch)]
    for m, t in runs:
      cells += [cell(got.get((m, t, "prefill")) or got.get((m, t, "all"))), cell(got.get((m, t, "decode_step")))]
    full = got.get(("full", None, "prefill"))
    for m, t in runs[1:]:
      mine = got.get((m, t, "prefill"))
      ok = full is not None and mine is not None and "error" not in full and "error" not in mine
      cells += [_ratio(mine["loop_flops"], full["loop_flops"]) if ok else "—",
                _ratio(mine["roofline_s"], full["roofline_s"]) if ok else "—"]
    if mesh_error:
      cells = [shape, topology, mesh, str(batch)] + ["—"] * (len(head) - 4)
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def _why_not(text: str | None) -> str:
  """A largest-batch row's reason, its "P / D bytes over H" (prefill, decode, HBM) written in GiB."""
  if not text:
    return "—"
  oom = re.search(r"HLO temporaries \(([\d.]+\w)\) exceeds available HBM \(([\d.]+\w)\)", text)
  if oom:
    return f"compiler: {oom.group(1)} needed, {oom.group(2)} available"
  m = re.fullmatch(r"(\d+|None) / (\d+|None) bytes over (\d+)", text.strip())
  if not m:
    return text.replace("|", "/")[:120]
  p, d, h = (None if g == "None" else int(g) for g in m.groups())
  return f"prefill {_gib(p)} / decode {_gib(d)} GiB over {_gib(h)}"


def largest_batch_table(rows: Sequence[Row]) -> str:
  """Markdown: the `kind == "largest_batch"` rows (`experiments.tpu_compile.largest_batch`)."""
  head = ["shape", "topology", "mesh", "method", "largest batch that fits", "its prefill GiB", "its decode GiB",
          "next batch", "why not", "compiles"]
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    if r.get("kind") != "largest_batch":
      continue
    label = r["method"] if r.get("target") is None else f"{r['method']}@{r['target']}"
    out.append("| " + " | ".join([
        r["shape"], r["topology"], r["mesh"], label,
        str(r["largest"] or "none") + ("" if r.get("bracketed") else " (next not bracketed)"), _gib(r.get("prefill_bytes")),
        _gib(r.get("decode_bytes")), str(r.get("next") or "—"), _why_not(r.get("why_not")),
        str(r.get("compiles"))]) + " |")
  return "\n".join(out)


def affine_batch(total_a: float, batch_a: int, total_b: float, batch_b: int, hbm: float, step: int) -> int:
  """The largest multiple of `step` whose bytes, on the line through (batch_a, total_a) and (batch_b, total_b),
  stay within `hbm` (0 when not even `step` does)."""
  slope = (total_b - total_a) / (batch_b - batch_a)
  if slope <= 0:
    return batch_b
  best = batch_a + (hbm - total_a) / slope
  return max(0, int(math.floor(best / step)) * step)
