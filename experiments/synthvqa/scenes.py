"""Procedural scenes for the VQA benchmark: coloured shapes on plain, noisy or cluttered backgrounds.

Axes: H image height, W image width (pixels), 3 RGB channels.

A `Scene` is a plain description (objects with shape, colour, size, centre, drawn RGB and an optional small dot;
the background kind and its seed); `render(scene) -> uint8[H, W, 3]` is a pure function of it, so a scene stored as
JSON re-renders byte for byte. `sample_scene(rng, specs, config)` places objects chosen by the caller (the question
generators in `experiments.synthvqa.vqa` decide what must be in a scene) at random non-overlapping positions.

Choices made for the benchmark (no paper defines it):
- Every shape is drawn inside the axis-aligned box [cx - r, cx + r] x [cy - r, cy + r] (r = the size's radius) and
  boxes of different objects keep `gap` pixels apart, so objects never overlap or touch.
- Default image sizes (height, width) suit a vision crop of 48 px with `image_grid_pinpoints` that are multiples of
  48: 96x96, 96x144 and 144x96 tile exactly; 96x128 and 128x96 exercise the resize-and-pad path of anyres.
- Radii 7 (small) and 12 (large): at full resolution a large object covers about 3x3 patches of 8 px, a small one 2x2.
  The detail dot (radius 2, a 5-px disc) lives in one or two patches: it is the "few tokens" evidence.
- Object colours are jittered per object (+-`color_jitter` per channel) so colour is a category, not one RGB value;
  backgrounds and distractor strokes are grey (R = G = B) so they never carry an answer colour.
- Object popularity (`POPULARITY`): a fixed Zipf-like prior over the 49 (shape, colour) pairs, so "popular" POPE
  negatives are meaningful. Its order is a fixed permutation (seed 2606), the same in every split.
"""

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES", "COLORS", "COLOR_RGB", "SIZES", "BACKGROUNDS", "POPULARITY", "POPULARITY_PROBS", "ObjectSpec",
    "SceneObject", "Scene", "SceneConfig", "sample_scene", "render", "scene_to_dict", "scene_from_dict",
]

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring")
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple")
COLOR_RGB = {
    "red": (215, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 210, 40),
    "green": (50, 165, 60),
    "cyan": (40, 195, 210),
    "blue": (40, 70, 215),
    "purple": (140, 60, 190),
}
SIZES = ("small", "large")
BACKGROUNDS = ("plain", "noise", "clutter")


def _popularity() -> tuple[tuple[tuple[str, str], ...], np.ndarray]:
  pairs = [(s, c) for s in SHAPES for c in COLORS]
  order = np.random.default_rng(2606).permutation(len(pairs))
  ranked = tuple(pairs[i] for i in order)
  weights = 1.0 / (1.0 + np.arange(len(ranked))) ** 0.6
  return ranked, weights / weights.sum()


# (shape, colour) pairs, most popular first, and their prior probabilities.
POPULARITY, POPULARITY_PROBS = _popularity()


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
  """What the caller wants in the scene; `sample_scene` picks size, position and drawn colour."""
  shape: str
  color: str
  dot: str | None = None  # colour name of the small dot drawn at the object's centre, or None
  size: str | None = None  # None: small or large at random


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One drawn object. Centre (cx, cy) in pixels (x = column, y = row); it occupies [c - radius, c + radius]."""
  shape: str
  color: str
  size: str
  cx: int
  cy: int
  radius: int
  rgb: tuple[int, int, int]  # the exact colour drawn (nominal colour + jitter)
  dot: str | None = None
  dot_radius: int = 0

  @property
  def box(self) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), inclusive pixel bounds."""
    return self.cx - self.radius, self.cy - self.radius, self.cx + self.radius, self.cy + self.radius


@dataclasses.dataclass(frozen=True)
class Scene:
  height: int
  width: int
  objects: tuple[SceneObject, ...]
  background: str  # one of BACKGROUNDS
  background_seed: int  # seeds the background texture/strokes in `render`


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """Generator parameters. Image sizes are (height, width); radii in pixels per size name."""
  image_sizes: tuple[tuple[int, int], ...] = ((96, 96), (96, 144), (144, 96), (96, 128), (128, 96))
  radii: tuple[tuple[str, int], ...] = (("small", 7), ("large", 12))
  gap: int = 3
  border: int = 2
  dot_radius: int = 2
  color_jitter: int = 12
  backgrounds: tuple[str, ...] = BACKGROUNDS
  min_objects: int = 2
  max_objects: int = 6

  def __post_init__(self):
    if not self.image_sizes:
      raise ValueError("SceneConfig.image_sizes is empty")
    for hw in self.image_sizes:
      if len(hw) != 2 or min(hw) < 16:
        raise ValueError(f"SceneConfig.image_sizes entries must be (height, width) >= 16 px, got {hw}")
    names = [name for name, _ in self.radii]
    if sorted(names) != sorted(SIZES):
      raise ValueError(f"SceneConfig.radii must give a radius for each of {SIZES}, got {names}")
    if any(r < self.dot_radius + 3 for _, r in self.radii):
      raise ValueError(f"SceneConfig.radii {self.radii} must exceed dot_radius + 2 = {self.dot_radius + 2}")
    if unknown := set(self.backgrounds) - set(BACKGROUNDS):
      raise ValueError(f"SceneConfig.backgrounds: unknown kinds {sorted(unknown)}; choose from {BACKGROUNDS}")
    if not 1 <= self.min_objects <= self.max_objects:
      raise ValueError(f"SceneConfig needs 1 <= min_objects <= max_objects, got {self.min_objects}, "
                       f"{self.max_objects}")

  def radius(self, size: str) -> int:
    return dict(self.radii)[size]


def _check_spec(spec: ObjectSpec):
  if spec.shape not in SHAPES:
    raise ValueError(f"unknown shape {spec.shape!r}; choose from {SHAPES}")
  if spec.color not in COLORS:
    raise ValueError(f"unknown colour {spec.color!r}; choose from {COLORS}")
  if spec.dot is not None and spec.dot not in COLORS:
    raise ValueError(f"unknown dot colour {spec.dot!r}; choose from {COLORS}")
  if spec.size is not None and spec.size not in SIZES:
    raise ValueError(f"unknown size {spec.size!r}; choose from {SIZES}")


def _place(rng: np.random.Generator, radii: Sequence[int], height: int, width: int, gap: int, border: int,
           tries: int = 100, restarts: int = 100) -> list[tuple[int, int]]:
  """Random non-overlapping box centres by rejection sampling; restarts the whole layout when one object jams."""
  for _ in range(restarts):
    centres: list[tuple[int, int]] = []
    for r in radii:
      lo, hi_x, hi_y = r + border, width - 1 - r - border, height - 1 - r - border
      if hi_x < lo or hi_y < lo:
        raise ValueError(f"an object of radius {r} does not fit in a {height}x{width} image")
      for _ in range(tries):
        cx, cy = int(rng.integers(lo, hi_x + 1)), int(rng.integers(lo, hi_y + 1))
        if all(abs(cx - x) > r + q + gap or abs(cy - y) > r + q + gap for (x, y), q in zip(centres, radii)):
          centres.append((cx, cy))
          break
      else:
        break
    if len(centres) == len(radii):
      return centres
  raise ValueError(f"could not place {len(radii)} objects of radii {list(radii)} in a {height}x{width} image; "
                   "use larger images, smaller radii or fewer objects")


def sample_scene(rng: np.random.Generator, specs: Sequence[ObjectSpec], config: SceneConfig = SceneConfig(),
                 image_size: tuple[int, int] | None = None) -> Scene:
  """A scene holding exactly `specs` (in that order), with random sizes, positions, jitter and background."""
  if not specs:
    raise ValueError("sample_scene needs at least one object spec")
  for spec in specs:
    _check_spec(spec)
  if image_size is None:
    image_size = config.image_sizes[int(rng.integers(len(config.image_sizes)))]
  height, width = image_size
  sizes = [spec.size or SIZES[int(rng.integers(len(SIZES)))] for spec in specs]
  radii = [config.radius(s) for s in sizes]
  centres = _place(rng, radii, height, width, config.gap, config.border)
  objects = []
  for spec, size, r, (cx, cy) in zip(specs, sizes, radii, centres):
    jitter = rng.integers(-config.color_jitter, config.color_jitter + 1, size=3)
    rgb = tuple(int(v) for v in np.clip(np.array(COLOR_RGB[spec.color]) + jitter, 0, 255))
    objects.append(SceneObject(spec.shape, spec.color, size, cx, cy, r, rgb, spec.dot,
                               config.dot_radius if spec.dot else 0))
  background = config.backgrounds[int(rng.integers(len(config.backgrounds)))]
  return Scene(height, width, tuple(objects), background, int(rng.integers(2**31)))


def _background(scene: Scene) -> np.ndarray:
  """uint8[H, W, 3] grey background; strokes for "clutter" are drawn later, under the objects."""
  rng = np.random.default_rng(scene.background_seed)
  h, w = scene.height, scene.width
  if scene.background == "noise":
    cell = 8
    coarse = rng.uniform(150, 235, size=(-(-h // cell), -(-w // cell)))
    grey = np.kron(coarse, np.ones((cell, cell)))[:h, :w] + rng.normal(0.0, 8.0, size=(h, w))
  else:
    grey = np.full((h, w), rng.uniform(205, 245))
  grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
  return np.repeat(grey[:, :, None], 3, axis=2)


def _clutter(draw: ImageDraw.ImageDraw, scene: Scene):
  rng = np.random.default_rng([scene.background_seed, 1])
  h, w = scene.height, scene.width
  for _ in range(int(rng.integers(8, 17))):
    x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
    angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(8, 30)
    g = int(rng.integers(60, 170))
    draw.line([(x0, y0), (x0 + length * np.cos(angle), y0 + length * np.sin(angle))], fill=(g, g, g),
              width=int(rng.integers(1, 3)))
  for _ in range(int(rng.integers(3, 8))):
    x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1.5, 3.5)
    g = int(rng.integers(80, 190))
    draw.ellipse([x - r, y - r, x + r, y + r], fill=(g, g, g))


def _star(cx: float, cy: float, r: float, inner: float = 0.45) -> list[tuple[float, float]]:
  points = []
  for i in range(10):
    rad = r if i % 2 == 0 else r * inner
    a = -np.pi / 2 + i * np.pi / 5
    points.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
  return points


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject):
  cx, cy, r, fill = obj.cx, obj.cy, obj.radius, obj.rgb
  if obj.shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif obj.shape == "ring":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, round(0.4 * r)))
  elif obj.shape == "square":
    s = round(0.8 * r)
    draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
  elif obj.shape == "triangle":
    draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
  elif obj.shape == "star":
    draw.polygon(_star(cx, cy, r), fill=fill)
  elif obj.shape == "cross":
    a = round(0.33 * r)
    draw.rectangle([cx - r, cy - a, cx + r, cy + a], fill=fill)
    draw.rectangle([cx - a, cy - r, cx + a, cy + r], fill=fill)
  elif obj.shape == "diamond":
    draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fill)
  else:
    raise ValueError(f"unknown shape {obj.shape!r}; choose from {SHAPES}")
  if obj.dot is not None:
    d = obj.dot_radius
    draw.ellipse([cx - d, cy - d, cx + d, cy + d], fill=COLOR_RGB[obj.dot])


def render(scene: Scene) -> np.ndarray:
  """Draws `scene`: uint8[H, W, 3]. Pure function of the scene (same scene -> same bytes)."""
  if scene.background not in BACKGROUNDS:
    raise ValueError(f"unknown background {scene.background!r}; choose from {BACKGROUNDS}")
  image = Image.fromarray(_background(scene))
  draw = ImageDraw.Draw(image)
  if scene.background == "clutter":
    _clutter(draw, scene)
  for obj in scene.objects:
    _draw_object(draw, obj)
  return np.asarray(image, dtype=np.uint8).copy()


def scene_to_dict(scene: Scene) -> dict:
  """JSON-ready dict (tuples become lists)."""
  return dataclasses.asdict(scene)


def scene_from_dict(d: dict) -> Scene:
  objects = tuple(SceneObject(**{**o, "rgb": tuple(o["rgb"])}) for o in d["objects"])
  return Scene(int(d["height"]), int(d["width"]), objects, d["background"], int(d["background_seed"]))

