"""POPE (object hallucination, yes/no) on lmms-lab/POPE: the pooled test split and the three sampling splits.

Layout (the card's `configs:` yaml, lmms-lab/POPE and lmms-lab-encoder/POPE): the default config is
`data/test-0000{0,1,2}-of-00003.parquet` (9,000 rows, the three samplings pooled; the `category` column names the
sampling); the `Full` config holds the splits adversarial / popular / random (3,000 rows each) under `Full/`, whose
file names were not visible to us (`split_files` reads them from the card). Columns (card of giobin/POPE, a copy):
id, question_id, question, answer ('yes'/'no'), image_source, image, category, all strings but the image.

Protocols (read at LLaVA c121f04 and lmms-eval 75571cf):
  prompt: the same for both: the question, stripped, then "\\nAnswer the question using a single word or phrase."
    (lmms-eval `tasks/pope/utils.py` + yaml; LLaVA's `llava_pope_test.jsonl` is in its eval.zip, not the repository:
    its text follows docs/Evaluation.md's short-answer format [unverified]).
  max_new_tokens: 128 both (the yamls; LLaVA's `model_vqa_loader.py` default). Stop strings: none (the yamls set no
    `until`, and lmms-eval's llava wrapper does not cut at its default "\\n\\n").
  parser "llava" (`llava/eval/eval_pope.py`): keep the text before the first ".", drop commas, split on single
    spaces; "no" if one of the words is "No", "no" or "not", else "yes". Anything that is not a no is a yes.
  parser "lmms_eval" (`pope_process_results`): the generation lowercased and stripped, compared verbatim with
    "yes"/"no"; any other reply is wrong and counts as neither a positive nor a negative prediction.
  metrics, yes is the positive class: accuracy, precision TP/(TP+FP), recall TP/(TP+FN), F1 and yes_ratio, the
    fraction of *predictions* that are "yes" (what LLaVA prints). A zero denominator gives 0 (lmms-eval's rule; LLaVA
    divides and would raise). lmms-eval's `pope_yes_ratio` is computed from the ground truth, so it is always 0.5 on
    POPE: a bug. We do not report it as the yes-ratio; the "lmms_eval" protocol reports it separately as
    `label_yes_ratio`, plus `unparsed`, the replies that were neither yes nor no.
  LLaVA evaluates each sampling separately and the LLaVA-1.5 paper reports the mean F1 of the three; lmms-eval's
  `pope` task scores the 9,000 rows pooled. The pooled task reports both: the pooled metrics, each split's metrics as
  "{split}/{metric}", and `mean_f1` over the splits present.
  Questions: LLaVA's `llava_pope_test.jsonl` (eval.zip) holds 8,910 questions, not lmms-lab's 9,000: its random
  split differs from the current POPE release (compared in issue 27). The llava protocol here runs lmms-lab's rows,
  so its POPE is not over the LLaVA-1.5 paper's questions; its metrics carry `llava_file_questions` = 8,910 (the
  size of LLaVA's file, a constant), which the relative summary turns into a note (`summary.relative`).
"""

import functools
from typing import Any, Iterator, Mapping, Sequence

from experiments.benchmarks import base, rowio

__all__ = ["SUFFIX", "SPLITS", "LLAVA_FILE_QUESTIONS", "TASKS", "parse_llava", "parse_lmms_eval",
           "confusion_metrics"]

SUFFIX = "\nAnswer the question using a single word or phrase."
SPLITS = ("adversarial", "popular", "random")
_COLUMNS = {"question_id": rowio.ID, "question": rowio.PROMPT, "answer": rowio.TEXT, "category": rowio.TEXT}
LLAVA_FILE_QUESTIONS = 8910   # LLaVA's llava_pope_test.jsonl; lmms-lab/POPE has 9,000 (its random split differs)


def parse_llava(generation: str) -> str:
  """LLaVA's lenient yes/no reading (`eval_pope.py`): "yes" or "no", never anything else."""
  text = generation.split(".")[0] if "." in generation else generation
  words = text.replace(",", "").split(" ")
  return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_lmms_eval(generation: str) -> str:
  """lmms-eval's strict reading: lowercased and stripped; the metric compares it verbatim with yes/no."""
  return generation.lower().strip()


_parse = base.parser_by_protocol(llava=parse_llava, lmms_eval=parse_lmms_eval)


def confusion_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """POPE's metrics of parsed predictions against 'yes'/'no' labels (yes positive).

  A prediction that is neither 'yes' nor 'no' is wrong, and is none of TP, FP, TN, FN.
  """
  if not labels:
    raise ValueError("POPE: no rows to score")
  pairs = list(zip(predictions, labels))
  tp = sum(p == "yes" and l == "yes" for p, l in pairs)
  fp = sum(p == "yes" and l == "no" for p, l in pairs)
  fn = sum(p == "no" and l == "yes" for p, l in pairs)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  return {
      "accuracy": sum(p == l for p, l in pairs) / len(pairs),
      "precision": precision,
      "recall": recall,
      "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
      "yes_ratio": sum(p == "yes" for p in predictions) / len(pairs),
  }


def _score(rows: Sequence[Mapping[str, Any]], protocol: str, pooled: bool) -> dict[str, float]:
  predictions = [_parse(r["prediction"], r["meta"], protocol) for r in rows]
  labels = [r["target"] for r in rows]
  out = confusion_metrics(predictions, labels)
  if protocol == "lmms_eval":
    out["label_yes_ratio"] = sum(l == "yes" for l in labels) / len(labels)  # lmms-eval's `pope_yes_ratio`
    out["unparsed"] = float(sum(p not in ("yes", "no") for p in predictions))
  else:
    out["llava_file_questions"] = float(LLAVA_FILE_QUESTIONS)
  if pooled:
    f1s = []
    for split in SPLITS:
      chosen = [i for i, r in enumerate(rows) if r["meta"]["category"] == split]
      if chosen:
        metrics = confusion_metrics([predictions[i] for i in chosen], [labels[i] for i in chosen])
        out.update({f"{split}/{k}": v for k, v in metrics.items()})
        f1s.append(metrics["f1"])
    unknown = sorted({r["meta"]["category"] for r in rows} - set(SPLITS))
    if unknown:
      raise ValueError(f"POPE: rows of unknown category {unknown}; expected {SPLITS}")
    out["mean_f1"] = sum(f1s) / len(f1s)
    out["splits"] = float(len(f1s))
  return out


def _examples(data_dir: str, protocol: str, with_images: bool, config: str | None,
              split: str) -> Iterator[base.Example]:
  rowio.check_protocol(protocol)
  for _, where, row, image in rowio.split_rows(data_dir, config, split, _COLUMNS, with_images, "question_id"):
    answer = row["answer"].lower().strip()
    if answer not in ("yes", "no"):
      raise ValueError(f"{where}: answer {row['answer']!r} is not yes/no")
    if row["category"] not in SPLITS:   # the pooled scores group by it: named now, not after the split ran
      raise ValueError(f"{where}: category {row['category']!r} is not one of {SPLITS}")
    yield base.Example(question_id=row["question_id"], image=image, text=row["question"].strip() + SUFFIX,
                       target=answer, meta={"category": row["category"]}, source=where)


def _task(name: str, config: str | None, split: str, num_rows: int) -> base.Task:
  pooled = config is None
  return base.Task(
      name=name, repo="lmms-lab/POPE", folder="POPE", config=config, split=split, num_rows=num_rows,
      id_source="question_id", max_new_tokens={"llava": 128, "lmms_eval": 128}, stop=(),
      image_aspect={"llava": "pad", "lmms_eval": "pad"},
      examples=functools.partial(_examples, config=config, split=split), parse=_parse,
      score=functools.partial(_score, pooled=pooled))


TASKS = {
    "pope": _task("pope", None, "test", 9000),
    "pope_adversarial": _task("pope_adversarial", "Full", "adversarial", 3000),
    "pope_popular": _task("pope_popular", "Full", "popular", 3000),
    "pope_random": _task("pope_random", "Full", "random", 3000),
}
