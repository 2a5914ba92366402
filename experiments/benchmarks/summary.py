"""The papers' two relative-% summaries of a pruned run against the full model (`../shared/METHODS.md` section 4).

(a) ratio of means ("Rel" of TOPS and CDPruner): the mean of the pruned run's headline scores over the benchmarks
    divided by the full model's mean, MME as perception / 20 (so that it sits on the 0-100 scale of the others).
    The full model's mean is TOPS's "Acc" column (LLaVA-1.5-7B: 63.1 over GQA, SQA-IMG, TextVQA, POPE, MME-P,
    MMB, MMB-CN, MM-Vet).
(b) mean of per-benchmark ratios (VisionZip, DART): the mean over the benchmarks of pruned score / full score, MME as
    perception + cognition.

Headlines (`HEADLINES`, in the papers' units, %; MME in points): each benchmark column reads the first of its
sources that a run has; a source is one task metric, or the mean of several (POPE's three split tasks' F1 = the
pooled task's mean_f1, LLaVA's number). The tasks report fractions; the scale takes them to %.
  GQA: gqa accuracy.  SQA-IMG: scienceqa_img accuracy.  TextVQA: textvqa_val_ocr accuracy (LLaVA-1.5's 58.2 reads
  the OCR-token prompt), else textvqa_val (lmms-eval's default).  POPE: pope mean_f1, else the mean F1 of
  pope_adversarial, pope_popular and pope_random.  MME-P / MME-C: mme perception / cognition.  VQAv2: vqav2_val.
  MMB / MMB-CN: mmbench_en_dev / mmbench_cn_dev circular_accuracy (what lmms-eval's mmbench score and the OpenCompass
  server report; `mmbench="accuracy"` takes the single pass instead).  MM-Vet: the judge's score (0-100), which no
  local metric gives: a run's mmvet entry must carry "score", else MM-Vet is left out and named.
  MMStar: mmstar average.  AI2D: ai2d accuracy.  HallusionBench: hallusionbench_image aAcc.
A benchmark that either run lacks is left out of both summaries and named in `missing`.
Notes (`notes`): a POPE column scored under the llava protocol (its metrics carry `llava_file_questions`,
`experiments.benchmarks.pope`) is over lmms-lab's 9,000 questions, not the 8,910 of LLaVA's question file behind the
LLaVA-1.5 paper's POPE; the summary says so.
"""

import dataclasses
from typing import Mapping, Sequence

__all__ = ["HEADLINES", "TOPS_COLUMNS", "Relative", "headline_values", "relative", "format_relative"]

Scores = Mapping[str, Mapping[str, float]]     # task -> metric -> value (what Task.score returns, per task)

# column -> sources, first match wins; a source is ((task, metric), ...) averaged, times the scale.
HEADLINES: dict[str, tuple[tuple[tuple[tuple[str, str], ...], float], ...]] = {
    "GQA": (((("gqa", "accuracy"),), 100.0),),
    "SQA-IMG": (((("scienceqa_img", "accuracy"),), 100.0),),
    "TextVQA": (((("textvqa_val_ocr", "accuracy"),), 100.0), ((("textvqa_val", "accuracy"),), 100.0)),
    "POPE": (((("pope", "mean_f1"),), 100.0),
             ((("pope_adversarial", "f1"), ("pope_popular", "f1"), ("pope_random", "f1")), 100.0)),
    "MME-P": (((("mme", "perception"),), 1.0),),
    "MME-C": (((("mme", "cognition"),), 1.0),),
    "VQAv2": (((("vqav2_val", "accuracy"),), 100.0),),
    "MMB": (((("mmbench_en_dev", "circular_accuracy"),), 100.0),),
    "MMB-CN": (((("mmbench_cn_dev", "circular_accuracy"),), 100.0),),
    "MM-Vet": (((("mmvet", "score"),), 1.0),),
    "MMStar": (((("mmstar", "average"),), 100.0),),
    "AI2D": (((("ai2d", "accuracy"),), 100.0),),
    "HallusionBench": (((("hallusionbench_image", "aAcc"),), 100.0),),
}
TOPS_COLUMNS = ("GQA", "SQA-IMG", "TextVQA", "POPE", "MME-P", "MMB", "MMB-CN", "MM-Vet")   # TOPS's Table 1


def headline_values(scores: Scores, mmbench: str = "circular_accuracy") -> tuple[dict[str, float], dict[str, str]]:
  """A run's headline per benchmark column, in the papers' units, and the task(s) each came from."""
  if mmbench not in ("circular_accuracy", "accuracy"):
    raise ValueError(f"mmbench must be 'circular_accuracy' or 'accuracy', not {mmbench!r}")
  values, sources = {}, {}
  for column, candidates in HEADLINES.items():
    for source, scale in candidates:
      source = tuple((t, mmbench if t.startswith("mmbench_") else m) for t, m in source)
      if all(t in scores and m in scores[t] for t, m in source):
        values[column] = scale * sum(float(scores[t][m]) for t, m in source) / len(source)
        sources[column] = "+".join(f"{t}.{m}" for t, m in source)
        break
  return values, sources


@dataclasses.dataclass(frozen=True)
class Relative:
  """Both summaries of one run against the full model (in %), with what they were computed over."""
  ratio_of_means: float | None        # (a), MME-P / 20
  full_mean: float | None             # (a)'s denominator: the full model's "Acc"
  run_mean: float | None
  mean_of_ratios: float | None        # (b), MME-P + C
  columns_a: tuple[str, ...]
  columns_b: tuple[str, ...]
  sources: Mapping[str, str]
  missing: tuple[str, ...]            # benchmark columns that one of the runs lacks, each with the reason
  notes: tuple[str, ...] = ()         # what the numbers are over, where it differs from the papers' files


def _missing(column: str, full: Mapping[str, float], run: Mapping[str, float]) -> str:
  lacking = " and ".join(n for n, v in (("full", full), ("run", run)) if column not in v)
  judged = " (judged: pass the MM-Vet judge's score as mmvet['score'])" if column == "MM-Vet" else ""
  return f"{column}: not in the {lacking} scores{judged}"


def relative(full: Scores, run: Scores, columns: Sequence[str] | None = None,
             mmbench: str = "circular_accuracy") -> Relative:
  """(a) and (b) of `run` against `full` over `columns` (default: every headline column) that both runs have.

  MME enters (a) as MME-P / 20 and (b) as one benchmark, MME-P + MME-C (both needed); MME-C is not a column of (a).
  `missing` names each column left out that was asked for (`columns`), or that one run has, or whose task ran
  without the headline metric (MM-Vet without a judge's score).
  """
  full_v, sources = headline_values(full, mmbench)
  run_v, _ = headline_values(run, mmbench)
  wanted = [c for c in (columns or HEADLINES) if c != "MME-C"]
  unknown = sorted(set(wanted) - set(HEADLINES))
  if unknown:
    raise ValueError(f"unknown benchmark columns {unknown}; known: {sorted(HEADLINES)}")
  tasks = lambda c: {t for source, _ in HEADLINES[c] for t, _ in source}
  ran = set(full) | set(run)
  missing = [_missing(c, full_v, run_v) for c in wanted if (c not in full_v or c not in run_v)
             and (columns is not None or c in full_v or c in run_v or tasks(c) & ran)]
  columns_a = tuple(c for c in wanted if c in full_v and c in run_v)
  scaled = lambda v, c: v[c] / 20.0 if c == "MME-P" else v[c]
  full_mean = sum(scaled(full_v, c) for c in columns_a) / len(columns_a) if columns_a else None
  run_mean = sum(scaled(run_v, c) for c in columns_a) / len(columns_a) if columns_a else None
  ratios = {}
  for c in columns_a:
    if c == "MME-P":
      if "MME-C" not in full_v or "MME-C" not in run_v:
        missing.append("MME (b): " + _missing("MME-C", full_v, run_v).split(": ", 1)[1])
        continue
      if full_v["MME-P"] + full_v["MME-C"] == 0:
        missing.append("MME (b): the full model scores 0, no ratio")
        continue
      ratios["MME-P+C"] = (run_v["MME-P"] + run_v["MME-C"]) / (full_v["MME-P"] + full_v["MME-C"])
    elif full_v[c] == 0:
      missing.append(f"{c} (b): the full model scores 0, no ratio")
    else:
      ratios[c] = run_v[c] / full_v[c]
  return Relative(
      ratio_of_means=100.0 * run_mean / full_mean if columns_a and full_mean else None, full_mean=full_mean,
      run_mean=run_mean, mean_of_ratios=100.0 * sum(ratios.values()) / len(ratios) if ratios else None,
      columns_a=columns_a, columns_b=tuple(ratios), sources={c: sources[c] for c in columns_a},
      missing=tuple(missing), notes=_notes(columns_a, full, run))


def _notes(columns: Sequence[str], full: Scores, run: Scores) -> tuple[str, ...]:
  pope = {t for source, _ in HEADLINES["POPE"] for t, _ in source}
  sizes = {int(s[t]["llava_file_questions"]) for s in (full, run) for t in pope
           if "llava_file_questions" in s.get(t, {})}
  if "POPE" not in columns or not sizes:
    return ()
  held = " / ".join(f"{n:,}" for n in sorted(sizes))
  return (f"POPE (llava protocol) is scored on lmms-lab/POPE (9,000 questions, 3,000 per split); LLaVA's "
          f"llava_pope_test.jsonl, behind the LLaVA-1.5 paper's POPE, holds {held} (its random split differs from "
          "the current POPE release)",)


def format_relative(name: str, rel: Relative) -> str:
  """Two labelled lines (and the missing benchmarks) for a run's summary table."""
  cell = lambda v: "-" if v is None else f"{v:.1f}%"
  acc = "-" if rel.full_mean is None else f"{rel.full_mean:.1f}"
  lines = [f"{name}: Rel (a) ratio of means, MME-P/20 (TOPS, CDPruner) = {cell(rel.ratio_of_means)} "
           f"(full Acc {acc}) over {', '.join(rel.columns_a) or 'nothing'}",
           f"{name}: Rel (b) mean of per-benchmark ratios, MME-P+C (VisionZip, DART) = {cell(rel.mean_of_ratios)} "
           f"over {', '.join(rel.columns_b) or 'nothing'}"]
  if rel.missing:
    lines.append(f"{name}: left out: " + "; ".join(rel.missing))
  lines += [f"{name}: note: {note}" for note in rel.notes]
  return "\n".join(lines)
