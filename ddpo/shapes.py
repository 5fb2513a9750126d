"""The shapes world: a caption grammar, a procedural renderer and an exact checker.

A miniature of GenEval for CPU experiments. Scenes are one to four flat shapes (circle, square,
triangle) in four named colours on a white background, described by captions from a small
grammar:

- counting: ``"a red circle"``, ``"two blue squares"``, ... up to four objects of one kind;
- relations: ``"a red circle left of a blue square"`` (``left of``, ``right of``, ``above``,
  ``below``; the two objects have different colours).

``render`` draws a scene (used to pretrain the tiny model and to train the learned scorer);
``detect`` finds the objects of an image (colour by hue, connected components, shape by the best
overlap with the three templates fitted to the component's box); ``check`` compares them with the
caption attribute by attribute. The checker is exact on rendered scenes (tests/test_shapes.py).

Colour-shape pairings in ``HELDOUT_PAIRS`` never occur in the RL training prompts
(``split(scene) == "train"``); every prompt that uses one is held out. Pretraining sees the whole
grammar, so the held-out set measures whether what RL taught (counting, placing) carries over to
pairings RL never drew.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (230, 200, 20),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUND = (255, 255, 255)
HELDOUT_PAIRS = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "circle")})
ATTRIBUTES = ("colour", "shape", "count", "position")

# detection thresholds (see detect): a pixel belongs to an object when it is saturated and not dark
MIN_SATURATION = 0.45
MIN_VALUE = 0.3
MIN_AREA = 6  # pixels: smaller colour specks are noise, not objects
MIN_TEMPLATE_IOU = 0.6  # a component that fits no template this well is a blob of no shape


def _hue(rgb) -> np.ndarray:
    """Hue in [0, 1) of RGB values in [0, 1] (last axis)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = rgb.max(-1)
    delta = high - rgb.min(-1)
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(high == r, ((g - b) / safe) % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return np.where(delta > 0, hue / 6.0, 0.0)


COLOUR_NAMES = tuple(COLOURS)
COLOUR_HUES = np.array([float(_hue(np.array(c) / 255.0)) for c in COLOURS.values()])


@dataclass(frozen=True)
class Spec:
    colour: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class Scene:
    """What a caption asks for: one spec (counting) or two specs and a relation."""

    specs: tuple[Spec, ...]
    relation: str | None = None

    @property
    def caption(self) -> str:
        def phrase(spec: Spec) -> str:
            noun = spec.shape + ("s" if spec.count > 1 else "")
            return f"{NUMBER_WORDS[spec.count]} {spec.colour} {noun}"

        if self.relation is None:
            return phrase(self.specs[0])
        return f"{phrase(self.specs[0])} {self.relation} {phrase(self.specs[1])}"

    @property
    def kind(self) -> str:
        if self.relation is not None:
            return "relation"
        return "single" if self.specs[0].count == 1 else "counting"

    @property
    def pairs(self) -> set[tuple[str, str]]:
        return {(s.colour, s.shape) for s in self.specs}


def parse(caption: str) -> Scene:
    """The scene a caption of the grammar describes; ``ValueError`` for anything else."""
    words = caption.strip().lower().split()
    numbers = {w: n for n, w in NUMBER_WORDS.items()} | {"an": 1, "one": 1}

    def phrase(tokens: list[str]) -> Spec:
        if len(tokens) != 3 or tokens[0] not in numbers or tokens[1] not in COLOURS:
            raise ValueError(f"not a shapes caption: {caption!r}")
        count, noun = numbers[tokens[0]], tokens[2]
        shape = noun[:-1] if count > 1 and noun.endswith("s") else noun
        if shape not in SHAPES or (count > 1) != noun.endswith("s"):
            raise ValueError(f"not a shapes caption: {caption!r}")
        return Spec(tokens[1], shape, count)

    if len(words) == 3:
        return Scene((phrase(words),))
    for relation in RELATIONS:
        rel = relation.split()
        if len(words) == 6 + len(rel) and words[3 : 3 + len(rel)] == rel:
            first, second = phrase(words[:3]), phrase(words[3 + len(rel) :])
            if first.count != 1 or second.count != 1 or first.colour == second.colour:
                raise ValueError(
                    f"not a shapes caption (relations hold between single objects of two colours): {caption!r}"
                )
            return Scene((first, second), relation)
    raise ValueError(f"not a shapes caption: {caption!r}")


def all_scenes() -> list[Scene]:
    """Every scene of the grammar, in a fixed order (48 counting + 432 relation scenes)."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    scenes = [Scene((Spec(c, s, n),)) for c, s in pairs for n in NUMBER_WORDS]
    for relation in RELATIONS:
        for c1, s1 in pairs:
            for c2, s2 in pairs:
                if c1 != c2:
                    scenes.append(Scene((Spec(c1, s1), Spec(c2, s2)), relation))
    return scenes


# The testbed's noisy attribute (model=tiny_testbed, scripts/pretrain_testbed.py): each colour's
# partner. Pretraining renders a caption's objects in the partner colour at a known rate, so the
# base draws the named colour about half of the time. The slip is cyclic, not a swap: the words
# keep distinct meanings ("red" means red or yellow, "yellow" yellow or green), and guidance
# cannot undo it, because p(colour | caption) / p(colour) is the same for a colour and its partner.
COLOUR_SLIP = {"red": "yellow", "yellow": "green", "green": "blue", "blue": "red"}


def slipped(scene: Scene) -> Scene:
    """The scene with every object in its colour's partner (``COLOUR_SLIP``); the caption stays."""
    if scene.relation is not None:
        raise ValueError("the testbed world has single objects and counts only")
    spec = scene.specs[0]
    return Scene((Spec(COLOUR_SLIP[spec.colour], spec.shape, spec.count),))


def split(scene: Scene) -> str:
    """``"heldout"`` if the scene uses a held-out colour-shape pairing, else ``"train"``."""
    return "heldout" if scene.pairs & HELDOUT_PAIRS else "train"


def perturb(scene: Scene, rng: random.Random, attribute: str | None = None) -> Scene:
    """The scene with one attribute changed: ``colour``, ``shape``, ``count`` (counting scenes) or
    ``relation`` (relation scenes); a random one of these when ``attribute`` is None."""
    specs = list(scene.specs)
    options = ["colour", "shape"] + (["relation"] if scene.relation else ["count"])
    choice = attribute or rng.choice(options)
    i = rng.randrange(len(specs))
    spec = specs[i]
    if choice == "colour":
        taken = {s.colour for s in specs}
        colours = [c for c in COLOURS if c not in taken]
        specs[i] = Spec(rng.choice(colours), spec.shape, spec.count)
    elif choice == "shape":
        specs[i] = Spec(spec.colour, rng.choice([s for s in SHAPES if s != spec.shape]), spec.count)
    elif choice == "count":
        specs[i] = Spec(spec.colour, spec.shape, rng.choice([n for n in NUMBER_WORDS if n != spec.count]))
    else:
        relation = rng.choice([r for r in RELATIONS if r != scene.relation])
        return Scene(scene.specs, relation)
    return Scene(tuple(specs), scene.relation)


# ---------------------------------------------------------------------------------------------
# rendering


def shape_mask(shape: str, x0: float, y0: float, w: float, h: float, height: int, width: int) -> np.ndarray:
    """Boolean mask of ``shape`` in the box (x0, y0, w, h) on a height x width pixel grid.

    A pixel is inside when its centre is: circles are the ellipse inscribed in the box, squares
    the box, triangles point up with their base on the box's bottom edge.
    """
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    if shape == "square":
        return (xs >= x0) & (xs < x0 + w) & (ys >= y0) & (ys < y0 + h)
    cx, cy = x0 + w / 2, y0 + h / 2
    if shape == "circle":
        return ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1.0
    if shape == "triangle":
        depth = (ys - y0) / h
        return (depth >= 0) & (depth <= 1) & (np.abs(xs - cx) <= (w / 2) * depth)
    raise ValueError(f"unknown shape {shape!r}")


@dataclass(frozen=True)
class Placed:
    colour: str
    shape: str
    x0: int
    y0: int
    side: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.x0 + self.side / 2, self.y0 + self.side / 2


def _separated(a: Placed, b: Placed, gap: int) -> bool:
    return (
        a.x0 + a.side + gap <= b.x0
        or b.x0 + b.side + gap <= a.x0
        or a.y0 + a.side + gap <= b.y0
        or b.y0 + b.side + gap <= a.y0
    )


def relation_holds(relation: str, first: tuple[float, float], second: tuple[float, float]) -> bool:
    """Whether ``first`` (x, y centre) is ``relation`` ``second``: the offset along the relation's
    axis has the right sign and is larger than the offset across it (image y grows downwards)."""
    dx, dy = second[0] - first[0], second[1] - first[1]
    if relation == "left of":
        return dx > abs(dy)
    if relation == "right of":
        return -dx > abs(dy)
    if relation == "above":
        return dy > abs(dx)
    if relation == "below":
        return -dy > abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


def layout(
    scene: Scene,
    rng: random.Random,
    size: int = 32,
    min_side: int | None = None,
    max_side: int | None = None,
    gap: int = 2,
) -> list[Placed]:
    """Random non-overlapping placements of the scene's objects (relations hold with a margin)."""
    min_side = min_side or max(5, size * 3 // 16)
    max_side = max_side or max(min_side, size * 9 // 32)
    objects = [(s.colour, s.shape) for s in scene.specs for _ in range(s.count)]
    for _ in range(1000):
        placed: list[Placed] = []
        for colour, shape in objects:
            side = rng.randint(min_side, max_side)
            candidate = Placed(colour, shape, rng.randint(1, size - side - 1), rng.randint(1, size - side - 1), side)
            if any(not _separated(candidate, other, gap) for other in placed):
                break
            placed.append(candidate)
        else:
            if scene.relation is None:
                return placed
            (cx1, cy1), (cx2, cy2) = placed[0].centre, placed[1].centre
            # a clear relation: the axis offset at least a third of the image and twice the cross offset
            along = {"left of": cx2 - cx1, "right of": cx1 - cx2, "above": cy2 - cy1, "below": cy1 - cy2}[
                scene.relation
            ]
            across = abs(cy2 - cy1) if scene.relation in ("left of", "right of") else abs(cx2 - cx1)
            if along >= size / 3 and along >= 2 * across:
                return placed
    raise RuntimeError(f"could not lay out {scene.caption!r} on {size} px")


def render(placed: list[Placed], size: int = 32) -> np.ndarray:
    """An (size, size, 3) uint8 image of the placed objects on the background."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in placed:
        image[shape_mask(obj.shape, obj.x0, obj.y0, obj.side, obj.side, size, size)] = COLOURS[obj.colour]
    return image


def render_scene(scene: Scene, rng: random.Random, size: int = 32) -> np.ndarray:
    return render(layout(scene, rng, size), size)


# ---------------------------------------------------------------------------------------------
# detection and checking


@dataclass(frozen=True)
class Detected:
    colour: str
    shape: str | None  # None: a blob that fits no template
    centre: tuple[float, float]
    area: int
    iou: float


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask, as lists of (y, x)."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    components = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, pixels = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            pixels.append((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        components.append(pixels)
    return components


def classify_shape(pixels: list[tuple[int, int]]) -> tuple[str | None, float]:
    """The template (circle, square, triangle) fitted to the component's box that overlaps it best."""
    ys = np.array([p[0] for p in pixels])
    xs = np.array([p[1] for p in pixels])
    y0, x0 = ys.min(), xs.min()
    h, w = ys.max() - y0 + 1, xs.max() - x0 + 1
    crop = np.zeros((h, w), dtype=bool)
    crop[ys - y0, xs - x0] = True
    best, best_iou = None, 0.0
    for shape in SHAPES:
        template = shape_mask(shape, 0, 0, w, h, h, w)
        union = np.logical_or(crop, template).sum()
        iou = float(np.logical_and(crop, template).sum() / union) if union else 0.0
        if iou > best_iou:
            best, best_iou = shape, iou
    return (best if best_iou >= MIN_TEMPLATE_IOU else None), best_iou


def detect(image: np.ndarray) -> list[Detected]:
    """The objects of an (H, W, 3) uint8 image: saturated pixels, coloured by the nearest hue."""
    rgb = image.astype(np.float64) / 255.0
    high, low = rgb.max(-1), rgb.min(-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-8), 0.0)
    foreground = (saturation >= MIN_SATURATION) & (high >= MIN_VALUE)
    hue = _hue(rgb)
    distance = np.abs(hue[..., None] - COLOUR_HUES)
    nearest = np.minimum(distance, 1.0 - distance).argmin(-1)
    found = []
    for index, name in enumerate(COLOUR_NAMES):
        for pixels in _components(foreground & (nearest == index)):
            if len(pixels) < MIN_AREA:
                continue
            shape, iou = classify_shape(pixels)
            cy = float(np.mean([p[0] for p in pixels])) + 0.5
            cx = float(np.mean([p[1] for p in pixels])) + 0.5
            found.append(Detected(name, shape, (cx, cy), len(pixels), iou))
    return found


@dataclass
class Check:
    """The checker's verdict on one image: per-attribute results, a score and exact correctness."""

    colour: bool
    shape: bool
    count: bool
    position: bool | None  # None: the caption states no relation
    objects: list[Detected] = field(default_factory=list)

    @property
    def attributes(self) -> dict[str, bool]:
        values = {"colour": self.colour, "shape": self.shape, "count": self.count}
        if self.position is not None:
            values["position"] = self.position
        return values

    @property
    def score(self) -> float:
        """The fraction of the caption's attributes the image gets right (in [0, 1])."""
        values = list(self.attributes.values())
        return sum(values) / len(values)

    @property
    def correct(self) -> bool:
        return all(self.attributes.values())


def check(scene: Scene, objects: list[Detected]) -> Check:
    """Compare detected objects with a scene.

    - colour: every named colour is present;
    - shape: every named colour is present as the named shape;
    - count: exactly the stated number of each named object, and no other object;
    - position (relations only): some object of the first kind is in the relation to some object
      of the second kind.
    """
    colour = all(any(o.colour == s.colour for o in objects) for s in scene.specs)
    matching = [[o for o in objects if o.colour == s.colour and o.shape == s.shape] for s in scene.specs]
    shape = all(matching)
    count = all(len(m) == s.count for m, s in zip(matching, scene.specs)) and len(objects) == sum(
        s.count for s in scene.specs
    )
    position = None
    if scene.relation is not None:
        position = any(relation_holds(scene.relation, a.centre, b.centre) for a in matching[0] for b in matching[1])
    return Check(colour, shape, count, position, objects)


def check_image(image: np.ndarray, caption: str | Scene) -> Check:
    scene = parse(caption) if isinstance(caption, str) else caption
    return check(scene, detect(image))
