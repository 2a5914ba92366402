"""Procedural visual question answering: five question families over `experiments.synthvqa.scenes`, with exact splits.

Axes: H image height, W image width (pixels), 3 RGB channels.

(Over 400 lines on purpose: one benchmark, whose question generators, split files and scoring must change together.)

Every answer is one word from `answer_vocab()` and is scored by exact match. The families are attribute, counting,
existence (POPE), spatial and detail; `question_only_baseline` measures the best blind predictor and
`make_split(split, n, seed)` builds a split, byte-identical across calls. The family table (subtypes, examples,
answers, chance), how each family is drawn, `Example.evidence` and the splits: experiments/EXPERIMENTS.md#vqa.
"""

import dataclasses
import json
import os
import zlib
from typing import Iterator, Mapping, Sequence

import numpy as np

from experiments.synthvqa import scenes
from experiments.synthvqa.scenes import COLORS, SHAPES, ObjectSpec, Scene, SceneConfig

__all__ = [
    "FAMILIES", "SUBTYPES", "SPLITS", "NUMBER_WORDS", "CHANCE", "Example", "answer_vocab", "question_words",
    "parse_family_weights", "make_example", "make_split", "iter_split", "write_split", "read_split", "json_object_line",
    "reference", "referable", "majority_baseline", "question_only_baseline", "accuracy_by_family",
]

FAMILIES = ("attribute", "counting", "existence", "spatial", "detail")
SUBTYPES = {
    "attribute": ("color", "shape"),
    "counting": ("shape", "color", "total"),
    "existence": ("random", "popular", "adversarial"),
    "spatial": ("left", "right", "above", "below"),
    "detail": ("dot",),
}
SPLITS = ("train", "validation", "test")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
CHANCE = {"attribute": 1 / 7, "counting": 1 / 7, "existence": 1 / 2, "spatial": 1 / 2, "detail": 1 / 7}
PLURALS = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
_POPULAR_TOP = 5
_MAX_RESAMPLES = 1000
_RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_TEMPLATE_WORDS = ("what", "color", "shape", "is", "the", "object", "how", "many", "objects", "are", "there", "in",
                   "image", "a", "an", "left", "right", "of", "above", "below", "dot", "on", "?")


@dataclasses.dataclass(frozen=True)
class Example:
  """One question. image: uint8[H, W, 3] (= scenes.render(scene)); answer is one word of `answer_vocab()`."""
  image: np.ndarray
  question: str
  answer: str
  family: str
  subtype: str
  scene_id: str
  scene: Scene
  evidence: tuple[int, ...]  # indices into scene.objects the answer depends on


def answer_vocab() -> tuple[str, ...]:
  """Every possible answer, in a fixed order."""
  return COLORS + SHAPES + NUMBER_WORDS + ("yes", "no")


def question_words() -> tuple[str, ...]:
  """Every word a question can contain ("?" is a word of its own), in a fixed order."""
  words = list(_TEMPLATE_WORDS) + list(COLORS) + list(SHAPES) + [PLURALS[s] for s in SHAPES]
  return tuple(dict.fromkeys(words))


# --- references ----------------------------------------------------------------------------------------------------

def referable(scene: Scene, i: int) -> tuple[str, ...]:
  """The unambiguous noun phrases for object i: "star" if its shape is unique, "red star" if its pair is unique."""
  obj = scene.objects[i]
  phrases = []
  if sum(o.shape == obj.shape for o in scene.objects) == 1:
    phrases.append(obj.shape)
  if sum((o.shape, o.color) == (obj.shape, obj.color) for o in scene.objects) == 1:
    phrases.append(f"{obj.color} {obj.shape}")
  return tuple(phrases)


def reference(rng: np.random.Generator, scene: Scene, i: int) -> str:
  phrases = referable(scene, i)
  if not phrases:
    raise ValueError(f"object {i} of the scene cannot be referred to uniquely")
  return phrases[int(rng.integers(len(phrases)))]


# --- sampling helpers ----------------------------------------------------------------------------------------------

def _choice(rng: np.random.Generator, items: Sequence):
  return items[int(rng.integers(len(items)))]


def _prior_pair(rng: np.random.Generator) -> tuple[str, str]:
  return scenes.POPULARITY[int(rng.choice(len(scenes.POPULARITY), p=scenes.POPULARITY_PROBS))]


def _random_dot(rng: np.random.Generator, color: str, p: float = 0.5) -> str | None:
  if rng.random() >= p:
    return None
  return _choice(rng, [c for c in COLORS if c != color])


def _spec(rng: np.random.Generator, shape: str, color: str) -> ObjectSpec:
  return ObjectSpec(shape, color, _random_dot(rng, color))


def _prior_specs(rng: np.random.Generator, n: int, avoid_shape: str | None = None,
                 avoid_color: str | None = None) -> list[ObjectSpec]:
  specs = []
  while len(specs) < n:
    shape, color = _prior_pair(rng)
    if shape != avoid_shape and color != avoid_color:
      specs.append(_spec(rng, shape, color))
  return specs


def _num_objects(rng: np.random.Generator, config: SceneConfig, at_least: int = 0) -> int:
  return int(rng.integers(max(config.min_objects, at_least), config.max_objects + 1))


# --- families ------------------------------------------------------------------------------------------------------
# Each returns (scene, question, answer, subtype, evidence). `k` is the example's index within its family; it sets the
# exactly balanced parts (yes/no, counts, subtypes) so a split of n examples is balanced, not balanced on average.

def _attribute(rng, k, config):
  subtype = SUBTYPES["attribute"][k % 2]
  n = _num_objects(rng, config)
  if subtype == "color":
    shape, answer = _choice(rng, SHAPES), COLORS[(k // 2) % len(COLORS)]
    specs = [_spec(rng, shape, answer)] + _prior_specs(rng, n - 1, avoid_shape=shape)
    question = f"what color is the {shape}?"
  else:
    color, answer = _choice(rng, COLORS), SHAPES[(k // 2) % len(SHAPES)]
    specs = [_spec(rng, answer, color)] + _prior_specs(rng, n - 1, avoid_color=color)
    question = f"what shape is the {color} object?"
  scene = scenes.sample_scene(rng, specs, config)
  return scene, question, answer, subtype, (0,)


def _counting(rng, k, config):
  count = k % len(NUMBER_WORDS)
  if count > config.max_objects:
    raise ValueError(f"counting needs max_objects >= {len(NUMBER_WORDS) - 1}, got {config.max_objects}")
  subtypes = SUBTYPES["counting"] if count >= config.min_objects else SUBTYPES["counting"][:2]
  subtype = _choice(rng, subtypes)
  if subtype == "total":
    specs = _prior_specs(rng, count)
    question = "how many objects are there?"
    targets = list(range(count))
  else:
    n = _num_objects(rng, config, at_least=max(count, 1))
    if subtype == "shape":
      shape = _choice(rng, SHAPES)
      specs = [_spec(rng, shape, _choice(rng, COLORS)) for _ in range(count)]
      specs += _prior_specs(rng, n - count, avoid_shape=shape)
      question = f"how many {PLURALS[shape]} are there?"
    else:
      color = _choice(rng, COLORS)
      specs = [_spec(rng, _choice(rng, SHAPES), color) for _ in range(count)]
      specs += _prior_specs(rng, n - count, avoid_color=color)
      question = f"how many {color} objects are there?"
    order = rng.permutation(len(specs))
    specs = [specs[i] for i in order]
    targets = sorted(int(j) for j, i in enumerate(order) if i < count)
  scene = scenes.sample_scene(rng, specs, config)
  return scene, question, NUMBER_WORDS[count], subtype, tuple(targets)


def _existence(rng, k, config):
  answer = ("yes", "no")[k % 2]
  subtype = SUBTYPES["existence"][(k // 2) % 3]
  specs = _prior_specs(rng, _num_objects(rng, config))
  present = {(s.shape, s.color) for s in specs}
  if answer == "yes":
    shape, color = _choice(rng, sorted(present))
  else:
    absent = [p for p in scenes.POPULARITY if p not in present]  # popularity order
    if subtype == "random":
      candidates = absent
    elif subtype == "popular":
      candidates = absent[:_POPULAR_TOP]
    else:
      shapes, colors = {p[0] for p in present}, {p[1] for p in present}
      candidates = [p for p in absent if p[0] in shapes or p[1] in colors]
    shape, color = _choice(rng, candidates)
  scene = scenes.sample_scene(rng, specs, config)
  evidence = tuple(i for i, o in enumerate(scene.objects) if (o.shape, o.color) == (shape, color))
  article = "an" if color[0] in "aeiou" else "a"
  return scene, f"is there {article} {color} {shape} in the image?", answer, subtype, evidence


def _relations(a, b) -> list[str]:
  """Every relation of object a to object b along an axis where their boxes are disjoint."""
  rel = []
  if a.cx + a.radius < b.cx - b.radius:
    rel.append("left")
  if b.cx + b.radius < a.cx - a.radius:
    rel.append("right")
  if a.cy + a.radius < b.cy - b.radius:
    rel.append("above")
  if b.cy + b.radius < a.cy - a.radius:
    rel.append("below")
  return rel


def _spatial(rng, k, config):
  answer = ("yes", "no")[k % 2]
  if config.max_objects < 2:
    raise ValueError(f"spatial questions need max_objects >= 2, got {config.max_objects}")
  for _ in range(_MAX_RESAMPLES):
    scene = scenes.sample_scene(rng, _prior_specs(rng, _num_objects(rng, config, at_least=2)), config)
    named = [i for i in range(len(scene.objects)) if referable(scene, i)]
    pairs = [(i, j, rel) for i in named for j in named if i != j
             for rel in _relations(scene.objects[i], scene.objects[j])]
    if pairs:
      break
  else:
    raise ValueError(f"no scene with two separated, nameable objects in {_MAX_RESAMPLES} draws; check SceneConfig")
  i, j, rel = pairs[int(rng.integers(len(pairs)))]
  asked = rel if answer == "yes" else _OPPOSITE[rel]
  question = f"is the {reference(rng, scene, i)} {_RELATION_WORDS[asked]} the {reference(rng, scene, j)}?"
  return scene, question, answer, asked, (i, j)


def _detail(rng, k, config):
  answer = COLORS[k % len(COLORS)]
  shape, color = _choice(rng, SHAPES), _choice(rng, [c for c in COLORS if c != answer])
  for _ in range(_MAX_RESAMPLES):
    specs = [ObjectSpec(shape, color, answer)] + _prior_specs(rng, _num_objects(rng, config) - 1)
    scene = scenes.sample_scene(rng, specs, config)
    if referable(scene, 0):
      break
  else:
    raise ValueError(f"no scene with a nameable dotted object in {_MAX_RESAMPLES} draws; check SceneConfig")
  return scene, f"what color is the dot on the {reference(rng, scene, 0)}?", answer, "dot", (0,)


_FAMILY_FNS = {"attribute": _attribute, "counting": _counting, "existence": _existence, "spatial": _spatial,
               "detail": _detail}


# --- splits --------------------------------------------------------------------------------------------------------

def _split_code(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
  return zlib.crc32(split.encode())


def make_example(split: str, family: str, k: int, seed: int = 0, config: SceneConfig = SceneConfig()) -> Example:
  """The k-th example of `family` in `split`: a pure function of (seed, split, family, k, config)."""
  if family not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
  if k < 0 or seed < 0:
    raise ValueError(f"k and seed must be >= 0, got k={k}, seed={seed}")
  rng = np.random.default_rng(np.random.SeedSequence([seed, _split_code(split), FAMILIES.index(family), k]))
  scene, question, answer, subtype, evidence = _FAMILY_FNS[family](rng, k, config)
  return Example(scenes.render(scene), question, answer, family, subtype, f"{split}-{seed}-{family}-{k}", scene,
                 tuple(evidence))


def _family_counts(n: int, weights: Mapping[str, float]) -> dict[str, int]:
  if unknown := set(weights) - set(FAMILIES):
    raise ValueError(f"unknown families in weights: {sorted(unknown)}; choose from {FAMILIES}")
  w = np.array([float(weights.get(f, 0.0)) for f in FAMILIES])
  if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
    raise ValueError(f"family weights must be finite, >= 0 and not all zero, got {dict(weights)}")
  exact = n * w / w.sum()
  counts = np.floor(exact).astype(int)
  for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
    counts[i] += 1
  return dict(zip(FAMILIES, counts.tolist()))


def parse_family_weights(pairs: Sequence[str], name: str = "weights") -> dict[str, float] | None:
  """"family=weight" strings (a flag's list) -> `iter_split` weights over every family (unnamed: 1); None if empty.

  Raises ValueError, prefixed with `name`, for a malformed pair, an unknown family, a negative weight or all zero.
  """
  if not pairs:
    return None
  weights = {f: 1.0 for f in FAMILIES}
  for pair in pairs:
    family, sep, value = pair.partition("=")
    try:
      weight = float(value) if sep else -1.0
    except ValueError:
      weight = -1.0
    if not weight >= 0:
      raise ValueError(f"{name}: {pair!r} is not family=weight with a weight >= 0")
    if family not in weights:
      raise ValueError(f"{name}: unknown family {family!r}; choose from {FAMILIES}")
    weights[family] = weight
  if not any(weights.values()):
    raise ValueError(f"{name}: every family has weight 0")
  return weights


def iter_split(split: str, n: int, seed: int = 0, weights: Mapping[str, float] | None = None,
               config: SceneConfig = SceneConfig(), start: int = 0) -> Iterator[Example]:
  """Yields the n examples of `make_split` one at a time (for splits too big to hold in memory), from the
  `start`-th on (the ones before it are not generated)."""
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  if not 0 <= start <= n:
    raise ValueError(f"start must be in [0, n={n}], got {start}")
  counts = _family_counts(n, weights or {f: 1.0 for f in FAMILIES})
  slots = [(f, k) for f in FAMILIES for k in range(counts[f])]
  order = np.random.default_rng(np.random.SeedSequence([seed, _split_code(split), len(FAMILIES), n])).permutation(n)
  for i in order[start:]:
    yield make_example(split, *slots[i], seed=seed, config=config)


def make_split(split: str, n: int, seed: int = 0, weights: Mapping[str, float] | None = None,
               config: SceneConfig = SceneConfig()) -> list[Example]:
  """n examples of `split` ("train", "validation", "test"); family mixture `weights` (default uniform)."""
  return list(iter_split(split, n, seed, weights, config))


# --- on disk -------------------------------------------------------------------------------------------------------
# {data_dir}/{split}/images.npz: pixels uint8[sum H*W*3] (all images flattened), shapes int32[n, 3], offsets
# int64[n + 1]; {data_dir}/{split}/questions.jsonl: one JSON object per example, in the same order, with the scene.

def write_split(examples: Sequence[Example], data_dir: str, split: str) -> str:
  """Writes `examples` under data_dir/split; returns that directory."""
  _split_code(split)
  out = os.path.join(data_dir, split)
  os.makedirs(out, exist_ok=True)
  shapes = np.array([ex.image.shape for ex in examples], dtype=np.int32).reshape(-1, 3)
  offsets = np.concatenate([[0], np.cumsum(np.prod(shapes, axis=1, dtype=np.int64))]).astype(np.int64)
  pixels = np.concatenate([ex.image.reshape(-1) for ex in examples]) if examples else np.zeros(0, np.uint8)
  np.savez_compressed(os.path.join(out, "images.npz"), pixels=pixels, shapes=shapes, offsets=offsets)
  with open(os.path.join(out, "questions.jsonl"), "w") as f:
    for ex in examples:
      f.write(json.dumps({"question": ex.question, "answer": ex.answer, "family": ex.family, "subtype": ex.subtype,
                          "scene_id": ex.scene_id, "evidence": list(ex.evidence),
                          "scene": scenes.scene_to_dict(ex.scene)}) + "\n")
  return out


def json_object_line(line: str, where: str) -> dict:
  """One JSONL line that must hold a JSON object; ValueError naming `where` (file:line) otherwise."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
  return row


def _read_jsonl(path: str) -> list[dict]:
  """The JSON objects of a JSONL file, blank lines skipped; ValueError naming path:line for anything else."""
  with open(path, encoding="utf-8") as f:
    return [json_object_line(line, f"{path}:{number + 1}") for number, line in enumerate(f) if line.strip()]


def read_split(data_dir: str, split: str) -> list[Example]:
  """Reads what `write_split` wrote."""
  _split_code(split)
  path = os.path.join(data_dir, split)
  if not os.path.exists(os.path.join(path, "questions.jsonl")):
    raise ValueError(f"no benchmark split at {path} (expected images.npz and questions.jsonl); "
                     "write one with experiments.synthvqa.vqa.write_split")
  with np.load(os.path.join(path, "images.npz")) as data:
    pixels, shapes, offsets = data["pixels"], data["shapes"], data["offsets"]
  rows = _read_jsonl(os.path.join(path, "questions.jsonl"))
  if len(rows) != len(shapes):
    raise ValueError(f"{path}: {len(rows)} questions but {len(shapes)} images")
  examples = []
  for row, shape, lo, hi in zip(rows, shapes, offsets[:-1], offsets[1:]):
    image = pixels[lo:hi].reshape(tuple(shape))
    examples.append(Example(image, row["question"], row["answer"], row["family"], row["subtype"], row["scene_id"],
                            scenes.scene_from_dict(row["scene"]), tuple(row["evidence"])))
  return examples


# --- scoring -------------------------------------------------------------------------------------------------------

def _normalize(answer: str) -> str:
  return answer.strip().strip(".").lower()


def accuracy_by_family(examples: Sequence[Example], predictions: Sequence[str]) -> dict[str, float]:
  """Exact-match accuracy (case and a trailing period ignored) per family, plus "all" (mean over examples)."""
  if len(examples) != len(predictions):
    raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
  hits: dict[str, list[bool]] = {}
  for ex, pred in zip(examples, predictions):
    ok = _normalize(pred) == ex.answer
    hits.setdefault(ex.family, []).append(ok)
    hits.setdefault("all", []).append(ok)
  return {k: float(np.mean(v)) for k, v in hits.items()}


def majority_baseline(examples: Sequence[Example]) -> dict[str, float]:
  """Accuracy of always answering each family's most frequent answer (measured on `examples` itself)."""
  by_family: dict[str, dict[str, int]] = {}
  for ex in examples:
    counts = by_family.setdefault(ex.family, {})
    counts[ex.answer] = counts.get(ex.answer, 0) + 1
  best = {f: max(c, key=c.get) for f, c in by_family.items()}
  preds = [best[ex.family] for ex in examples]
  return accuracy_by_family(examples, preds)


def question_only_baseline(train: Sequence[Example], evaluate: Sequence[Example]) -> dict[str, float]:
  """Blind baseline: answer each question with its most frequent answer in `train` (unseen questions: the family's
  most frequent answer). The floor a model that looks at the image must clear."""
  per_question: dict[str, dict[str, int]] = {}
  per_family: dict[str, dict[str, int]] = {}
  for ex in train:
    for table, key in ((per_question, ex.question), (per_family, ex.family)):
      counts = table.setdefault(key, {})
      counts[ex.answer] = counts.get(ex.answer, 0) + 1
  preds = []
  for ex in evaluate:
    counts = per_question.get(ex.question) or per_family.get(ex.family)
    preds.append(max(counts, key=counts.get) if counts else "")
  return accuracy_by_family(evaluate, preds)
