"""Tests for experiments.synthvqa.scenes: placement, rendering checked pixel by pixel against the Scene description."""

import dataclasses
import json

import numpy as np
import pytest

from experiments.synthvqa import scenes
from experiments.synthvqa.scenes import COLOR_RGB, COLORS, SHAPES, ObjectSpec, SceneConfig


def _random_specs(rng, n, dot_p=0.5):
  return [ObjectSpec(SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))],
                     COLORS[rng.integers(len(COLORS))] if rng.random() < dot_p else None) for _ in range(n)]


def _scenes(count=40, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    specs = [s if s.dot != s.color else ObjectSpec(s.shape, s.color, None) for s in _random_specs(rng, 6)]
    out.append(scenes.sample_scene(rng, specs))
  return out


def _outside_boxes(scene):
  mask = np.ones((scene.height, scene.width), bool)
  for o in scene.objects:
    x0, y0, x1, y1 = o.box
    mask[y0:y1 + 1, x0:x1 + 1] = False
  return mask


def test_same_seed_same_scene_and_bytes():
  a = scenes.sample_scene(np.random.default_rng(7), _random_specs(np.random.default_rng(1), 5))
  b = scenes.sample_scene(np.random.default_rng(7), _random_specs(np.random.default_rng(1), 5))
  assert a == b
  assert scenes.render(a).tobytes() == scenes.render(b).tobytes()
  c = scenes.sample_scene(np.random.default_rng(8), _random_specs(np.random.default_rng(1), 5))
  assert scenes.render(a).tobytes() != scenes.render(c).tobytes()


def test_json_round_trip_rerenders_identically():
  for scene in _scenes(10):
    back = scenes.scene_from_dict(json.loads(json.dumps(scenes.scene_to_dict(scene))))
    assert back == scene
    assert scenes.render(back).tobytes() == scenes.render(scene).tobytes()


def test_objects_keep_specs_sizes_and_do_not_overlap():
  config = SceneConfig()
  rng = np.random.default_rng(3)
  for h, w in config.image_sizes:
    for _ in range(30):  # six large objects on every image size: the densest case
      specs = [ObjectSpec(s.shape, s.color, None, "large") for s in _random_specs(rng, config.max_objects)]
      scene = scenes.sample_scene(rng, specs, config, image_size=(h, w))
      assert (scene.height, scene.width) == (h, w)
      assert [(o.shape, o.color, o.size) for o in scene.objects] == [(s.shape, s.color, "large") for s in specs]
      for i, a in enumerate(scene.objects):
        assert a.radius == config.radius("large")
        x0, y0, x1, y1 = a.box
        assert x0 >= 0 and y0 >= 0 and x1 < w and y1 < h
        for b in scene.objects[i + 1:]:
          sep = a.radius + b.radius + config.gap
          assert abs(a.cx - b.cx) > sep or abs(a.cy - b.cy) > sep


def test_render_shape_dtype_and_sizes_from_config():
  sizes = {(s.height, s.width) for s in _scenes(60)}
  assert sizes <= set(SceneConfig().image_sizes) and len(sizes) >= 3
  image = scenes.render(_scenes(1)[0])
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_object_colour_is_drawn_inside_its_box_and_nowhere_else():
  for scene in _scenes():
    image = scenes.render(scene).astype(int)
    outside = _outside_boxes(scene)
    for o in scene.objects:
      nominal = np.array(COLOR_RGB[o.color])
      assert np.abs(np.array(o.rgb) - nominal).max() <= SceneConfig().color_jitter
      x0, y0, x1, y1 = o.box
      same = np.all(image == np.array(o.rgb), axis=-1)
      inside = same[y0:y1 + 1, x0:x1 + 1].sum()
      assert inside >= 0.2 * (2 * o.radius + 1) ** 2, (o, inside)
      assert not same[outside].any()


def test_background_outside_objects_is_grey():
  for scene in _scenes():
    image = scenes.render(scene)
    rest = image[_outside_boxes(scene)]
    assert (rest[:, 0] == rest[:, 1]).all() and (rest[:, 1] == rest[:, 2]).all(), scene.background


def test_dot_pixels_present_at_centre():
  seen = 0
  for scene in _scenes():
    image = scenes.render(scene)
    for o in scene.objects:
      if o.dot is None:
        continue
      seen += 1
      d = o.dot_radius
      patch = image[o.cy - d:o.cy + d + 1, o.cx - d:o.cx + d + 1]
      assert np.all(patch == np.array(COLOR_RGB[o.dot]), axis=-1).sum() >= (2 * d + 1) ** 2 // 2
      assert np.all(image[o.cy, o.cx] == COLOR_RGB[o.dot])
  assert seen > 20


def test_every_shape_and_background_renders_differently():
  rng = np.random.default_rng(0)
  images = []
  for shape in SHAPES:
    scene = scenes.sample_scene(rng, [ObjectSpec(shape, "red", size="large")], image_size=(96, 96))
    scene = scenes.Scene(96, 96, (dataclasses.replace(scene.objects[0], cx=48, cy=48),), "plain", 0)
    images.append(np.all(scenes.render(scene) == np.array(scene.objects[0].rgb), axis=-1))
  for i in range(len(images)):
    for j in range(i + 1, len(images)):
      assert (images[i] != images[j]).sum() > 20, (SHAPES[i], SHAPES[j])
  kinds = {s.background for s in _scenes(30)}
  assert kinds == set(scenes.BACKGROUNDS)


def test_bad_input_raises():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="shape"):
    scenes.sample_scene(rng, [ObjectSpec("hexagon", "red")])
  with pytest.raises(ValueError, match="colour"):
    scenes.sample_scene(rng, [ObjectSpec("star", "pink")])
  with pytest.raises(ValueError, match="at least one"):
    scenes.sample_scene(rng, [])
  with pytest.raises(ValueError, match="place"):
    scenes.sample_scene(rng, [ObjectSpec("star", "red", size="large")] * 6, image_size=(30, 30))
  with pytest.raises(ValueError, match="image_sizes"):
    SceneConfig(image_sizes=((8, 96),))
  with pytest.raises(ValueError, match="backgrounds"):
    SceneConfig(backgrounds=("plain", "stripes"))


def test_popularity_is_a_distribution_over_all_pairs():
  assert sorted(scenes.POPULARITY) == sorted((s, c) for s in SHAPES for c in COLORS)
  p = scenes.POPULARITY_PROBS
  np.testing.assert_allclose(p.sum(), 1.0, rtol=0, atol=1e-12)
  assert np.all(np.diff(p) < 0)
