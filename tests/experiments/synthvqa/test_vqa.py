"""Tests for experiments.synthvqa.vqa: every answer re-derived from the Scene by an independent parser, splits,
storage."""

import collections
import dataclasses
import hashlib
import re

import numpy as np
import pytest

from experiments.synthvqa import scenes, vqa
from experiments.synthvqa.scenes import COLOR_RGB, COLORS, SHAPES

N = 280  # 56 per family: multiples of 14 and 7 keep every balanced quantity exact


@pytest.fixture(scope="module")
def test_split():
  return vqa.make_split("test", N, seed=0)


def _resolve(scene, phrase):
  """Index of the unique object named by "shape" or "colour shape"; fails the test when not unique."""
  words = phrase.split()
  if len(words) == 1:
    hits = [i for i, o in enumerate(scene.objects) if o.shape == words[0]]
  else:
    hits = [i for i, o in enumerate(scene.objects) if (o.color, o.shape) == (words[0], words[1])]
  assert len(hits) == 1, (phrase, scene)
  return hits[0]


def _rel_holds(a, b, rel):
  return {"left": a.cx + a.radius < b.cx - b.radius, "right": a.cx - a.radius > b.cx + b.radius,
          "above": a.cy + a.radius < b.cy - b.radius, "below": a.cy - a.radius > b.cy + b.radius}[rel]


def _derive(ex):
  """(answer, evidence) from the question text and the scene objects alone."""
  objs = ex.scene.objects
  plural = {s + "s": s for s in SHAPES} | {"crosses": "cross"}
  number = ("zero", "one", "two", "three", "four", "five", "six")
  q = ex.question
  if m := re.fullmatch(r"what color is the dot on the (\w+(?: \w+)?)\?", q):
    i = _resolve(ex.scene, m[1])
    return objs[i].dot, (i,)
  if m := re.fullmatch(r"what color is the (\w+)\?", q):
    i = _resolve(ex.scene, m[1])
    return objs[i].color, (i,)
  if m := re.fullmatch(r"what shape is the (\w+) object\?", q):
    hits = [i for i, o in enumerate(objs) if o.color == m[1]]
    assert len(hits) == 1
    return objs[hits[0]].shape, (hits[0],)
  if q == "how many objects are there?":
    return number[len(objs)], tuple(range(len(objs)))
  if m := re.fullmatch(r"how many (\w+) objects are there\?", q):
    hits = tuple(i for i, o in enumerate(objs) if o.color == m[1])
    return number[len(hits)], hits
  if m := re.fullmatch(r"how many (\w+) are there\?", q):
    hits = tuple(i for i, o in enumerate(objs) if o.shape == plural[m[1]])
    return number[len(hits)], hits
  if m := re.fullmatch(r"is there an? (\w+) (\w+) in the image\?", q):
    hits = tuple(i for i, o in enumerate(objs) if (o.color, o.shape) == (m[1], m[2]))
    return ("yes" if hits else "no"), hits
  if m := re.fullmatch(r"is the (\w+(?: \w+)?) (left of|right of|above|below) the (\w+(?: \w+)?)\?", q):
    i, j = _resolve(ex.scene, m[1]), _resolve(ex.scene, m[3])
    rel = m[2].split()[0]
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}[rel]
    holds, contrary = _rel_holds(objs[i], objs[j], rel), _rel_holds(objs[i], objs[j], opposite)
    assert holds != contrary, "spatial question must be unambiguous"
    return ("yes" if holds else "no"), (i, j)
  raise AssertionError(f"unparsed question {q!r}")


def test_answers_rederived_from_scene(test_split):
  for ex in test_split:
    answer, evidence = _derive(ex)
    assert ex.answer == answer, (ex.question, ex.answer, answer)
    assert ex.evidence == evidence, (ex.question, ex.evidence, evidence)


def test_images_are_renders_of_their_scenes(test_split):
  for ex in test_split[:60]:
    assert ex.image.dtype == np.uint8 and ex.image.shape == (ex.scene.height, ex.scene.width, 3)
    assert ex.image.tobytes() == scenes.render(ex.scene).tobytes()


def test_same_seed_identical_bytes_and_questions(test_split):
  again = vqa.make_split("test", N, seed=0)
  assert [(e.question, e.answer, e.family, e.subtype, e.scene_id) for e in again] == \
         [(e.question, e.answer, e.family, e.subtype, e.scene_id) for e in test_split]
  assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(again, test_split))
  other = vqa.make_split("test", 20, seed=1)
  assert not {e.image.tobytes() for e in other} & {e.image.tobytes() for e in test_split}


def test_splits_disjoint(test_split):
  def digests(examples):
    return {hashlib.sha256(e.image.tobytes()).hexdigest() for e in examples}
  train, val = vqa.make_split("train", N, seed=0), vqa.make_split("validation", N, seed=0)
  d_train, d_val, d_test = digests(train), digests(val), digests(test_split)
  assert len(d_test) == N
  assert not d_train & d_val and not d_train & d_test and not d_val & d_test
  assert not {e.scene_id for e in train} & {e.scene_id for e in test_split}


def test_every_family_and_subtype_balanced(test_split):
  families = collections.Counter(e.family for e in test_split)
  assert families == {f: N // 5 for f in vqa.FAMILIES}
  subtypes = {(e.family, e.subtype) for e in test_split}
  assert subtypes == {(f, s) for f in vqa.FAMILIES for s in vqa.SUBTYPES[f]}
  for family in ("existence", "spatial"):
    answers = collections.Counter(e.answer for e in test_split if e.family == family)
    assert answers == {"yes": N // 10, "no": N // 10}
  pope = collections.Counter((e.subtype, e.answer) for e in test_split if e.family == "existence")
  assert len(pope) == 6 and max(pope.values()) - min(pope.values()) <= 1
  for family, values in (("counting", vqa.NUMBER_WORDS), ("detail", COLORS)):
    answers = collections.Counter(e.answer for e in test_split if e.family == family)
    assert answers == {v: N // 5 // len(values) for v in values}
  attribute = collections.Counter(e.answer for e in test_split if e.family == "attribute")
  assert attribute == {v: N // 5 // 14 for v in COLORS + SHAPES}
  for acc in vqa.majority_baseline(test_split).values():
    assert acc <= 0.5


def test_pope_negatives_absent_and_typed(test_split):
  for ex in test_split:
    if ex.family != "existence" or ex.answer != "no":
      continue
    color, shape = re.fullmatch(r"is there an? (\w+) (\w+) in the image\?", ex.question).groups()
    present = {(o.shape, o.color) for o in ex.scene.objects}
    assert (shape, color) not in present
    if ex.subtype == "popular":
      absent = [p for p in scenes.POPULARITY if p not in present]
      assert (shape, color) in absent[:5]
    if ex.subtype == "adversarial":
      assert any(s == shape or c == color for s, c in present)


def test_spatial_answers_agree_with_centres(test_split):
  for ex in test_split:
    if ex.family != "spatial":
      continue
    a, b = (ex.scene.objects[i] for i in ex.evidence)
    truth = {"left": a.cx < b.cx, "right": a.cx > b.cx, "above": a.cy < b.cy, "below": a.cy > b.cy}[ex.subtype]
    assert ex.answer == ("yes" if truth else "no")


def test_detail_dot_in_pixels_and_differs_from_object(test_split):
  for ex in test_split:
    if ex.family != "detail":
      continue
    obj = ex.scene.objects[ex.evidence[0]]
    assert obj.dot == ex.answer and obj.color != ex.answer
    d = obj.dot_radius
    patch = ex.image[obj.cy - d:obj.cy + d + 1, obj.cx - d:obj.cx + d + 1]
    assert np.all(patch == np.array(COLOR_RGB[ex.answer]), axis=-1).sum() >= (2 * d + 1) ** 2 // 2
    # The dot is a small part of the image: the answer lives in a few pixels.
    assert (2 * d + 1) ** 2 < 0.005 * ex.image.shape[0] * ex.image.shape[1]


def test_named_object_colour_at_its_position(test_split):
  for ex in test_split:
    if ex.family != "attribute":
      continue
    obj = ex.scene.objects[ex.evidence[0]]
    x0, y0, x1, y1 = obj.box
    box = ex.image[y0:y1 + 1, x0:x1 + 1].astype(int)
    near = np.abs(box - np.array(COLOR_RGB[obj.color])).max(-1) <= 12
    assert near.mean() >= 0.2


def test_vocabulary_covers_questions_and_answers(test_split):
  words = set(vqa.question_words())
  for ex in test_split:
    assert ex.answer in vqa.answer_vocab()
    assert set(ex.question.replace("?", " ?").split()) <= words, ex.question
  assert len(set(vqa.answer_vocab())) == len(vqa.answer_vocab())


def test_write_read_round_trip(tmp_path, test_split):
  part = test_split[:25]
  vqa.write_split(part, str(tmp_path), "test")
  back = vqa.read_split(str(tmp_path), "test")
  assert len(back) == len(part)
  for a, b in zip(part, back):
    assert a.image.shape == b.image.shape and a.image.tobytes() == b.image.tobytes()
    assert (a.question, a.answer, a.family, a.subtype, a.scene_id, a.evidence, a.scene) == \
           (b.question, b.answer, b.family, b.subtype, b.scene_id, b.evidence, b.scene)
  with pytest.raises(ValueError, match="no benchmark split"):
    vqa.read_split(str(tmp_path), "train")


def test_weights_and_prefix_stability():
  only = vqa.make_split("train", 12, seed=3, weights={"detail": 1.0})
  assert {e.family for e in only} == {"detail"}
  mixed = vqa.make_split("train", 13, seed=3, weights={"detail": 1.0, "counting": 3.0})
  counts = collections.Counter(e.family for e in mixed)
  assert counts == {"detail": 3, "counting": 10}
  # The k-th example of a family does not depend on n or the mixture.
  by_id = {e.scene_id: e for e in mixed}
  for e in only:
    if e.scene_id in by_id:
      assert e.image.tobytes() == by_id[e.scene_id].image.tobytes() and e.question == by_id[e.scene_id].question


def test_scoring():
  examples = vqa.make_split("validation", 70, seed=0)
  perfect = vqa.accuracy_by_family(examples, [e.answer.upper() + "." for e in examples])
  assert all(v == 1.0 for v in perfect.values())
  yes = vqa.accuracy_by_family(examples, ["yes"] * len(examples))
  expected = np.mean([e.answer == "yes" for e in examples if e.family == "existence"])
  assert yes["existence"] == expected == 0.5 and yes["counting"] == 0.0


def test_question_only_baseline_uses_per_question_then_family_majority():
  base = vqa.make_example("train", "existence", 0)
  def ex(q, a):
    return dataclasses.replace(base, question=q, answer=a)
  train = [ex("q1", "yes"), ex("q1", "yes"), ex("q1", "no"), ex("q2", "no"), ex("q2", "no"), ex("q2", "no")]
  evaluate = [ex("q1", "yes"), ex("q1", "no"), ex("q3", "no")]  # q3 unseen: family majority "no"
  assert vqa.question_only_baseline(train, evaluate) == {"existence": 2 / 3, "all": 2 / 3}


def test_iter_split_start_skips_without_changing_the_stream():
  whole = [e.scene_id for e in vqa.iter_split("train", 15, seed=2)]
  assert [e.scene_id for e in vqa.iter_split("train", 15, seed=2, start=9)] == whole[9:]
  assert list(vqa.iter_split("train", 15, seed=2, start=15)) == []
  with pytest.raises(ValueError, match="start"):
    next(vqa.iter_split("train", 15, start=16))


def test_parse_family_weights():
  assert vqa.parse_family_weights([]) is None
  weights = vqa.parse_family_weights(["detail=2", "counting=0.5"])
  assert weights == {"attribute": 1.0, "counting": 0.5, "existence": 1.0, "spatial": 1.0, "detail": 2.0}
  counts = collections.Counter(e.family for e in vqa.make_split("train", 110, weights=weights))
  assert counts == {"attribute": 20, "counting": 10, "existence": 20, "spatial": 20, "detail": 40}
  for pairs, match in ((["detail"], "'detail' is not family=weight"), (["detail=x"], "'detail=x' is not"),
                       (["detail=-1"], "weight >= 0"), (["ocr=1"], "unknown family 'ocr'"),
                       ([f"{f}=0" for f in vqa.FAMILIES], "every family has weight 0")):
    with pytest.raises(ValueError, match=f"--mix: .*{match}"):
      vqa.parse_family_weights(pairs, "--mix")


def test_bad_input_raises():
  with pytest.raises(ValueError, match="split"):
    vqa.make_split("dev", 3)
  with pytest.raises(ValueError, match="unknown families"):
    vqa.make_split("train", 3, weights={"ocr": 1.0})
  with pytest.raises(ValueError, match="weights"):
    vqa.make_split("train", 3, weights={"detail": 0.0})
  with pytest.raises(ValueError, match="family"):
    vqa.make_example("train", "ocr", 0)
  with pytest.raises(ValueError, match="predictions"):
    vqa.accuracy_by_family(vqa.make_split("train", 2), ["yes"])
