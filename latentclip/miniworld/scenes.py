"""The mini-world: seeded 64x64 scenes of flat shapes, their caption grammar and its parser.

A caption describes the *whole* scene: "a red circle" is true of a scene holding exactly one red
circle and nothing else, "two blue squares" of exactly two blue squares. The same grammar parses
prompts back into a :class:`Spec` that the renderer can draw and the judge can check.

Grammar::

    single   := "a" COLOR SHAPE | "a" COLOR "object" | "a" SHAPE
    count    := ("two" | "three") COLOR SHAPE "s"
    relation := "a" COLOR SHAPE REL "a" COLOR SHAPE
    REL      := "to the left of" | "to the right of" | "above" | "below"
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
RELATIONS = ("to the left of", "to the right of", "above", "below")
COUNTS = ("one", "two", "three")
#: Reference RGB of each colour; objects are drawn within +-12 of it.
RGB = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 80, 215), "yellow": (235, 200, 35)}
#: Scene kinds of the training stream and their probabilities.
KIND_PROBS = {"single": 0.3, "count": 0.2, "relation": 0.5}
#: Minimum centre distance along the dominant axis of a relation, in pixels.
MIN_REL_DIST = 20


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    x: float  # centre, pixels
    y: float
    size: float  # half extent, pixels


@dataclass
class Scene:
    objects: list
    background: tuple
    kind: str
    relation: tuple | None = None  # (index a, relation, index b): objects[a] REL objects[b]


@dataclass(frozen=True)
class Spec:
    """What a caption asserts. ``color``/``shape`` None means "any"."""
    kind: str  # single | count | relation
    color: str | None = None
    shape: str | None = None
    count: int = 1
    relation: str | None = None
    color2: str | None = None
    shape2: str | None = None


# -- captions ------------------------------------------------------------------------------------
def plural(shape: str) -> str:
    return shape + "s"


def caption(spec: Spec) -> str:
    """The grammar's sentence for a spec."""
    if spec.kind == "single":
        if spec.shape is None:
            return f"a {spec.color} object"
        if spec.color is None:
            return f"a {spec.shape}"
        return f"a {spec.color} {spec.shape}"
    if spec.kind == "count":
        if spec.count == 1:
            return f"a {spec.color} {spec.shape}"
        return f"{COUNTS[spec.count - 1]} {spec.color} {plural(spec.shape)}"
    return f"a {spec.color} {spec.shape} {spec.relation} a {spec.color2} {spec.shape2}"


_C = "|".join(COLORS)
_S = "|".join(SHAPES)
_R = "|".join(RELATIONS)
_PATTERNS = [
    ("relation", re.compile(rf"^an? ({_C}) ({_S}) ({_R}) an? ({_C}) ({_S})$")),
    ("count", re.compile(rf"^(two|three) ({_C}) ({_S})s$")),
    ("single", re.compile(rf"^(?:a|an|one) ({_C}) ({_S})$")),
    ("color", re.compile(rf"^(?:a|an|one) ({_C}) object$")),
    ("shape", re.compile(rf"^(?:a|an|one) ({_S})$")),
]


def parse(text: str) -> Spec:
    """Parse a grammar prompt into a Spec; InputError naming the prompt if it is not one."""
    t = " ".join(str(text).lower().replace(",", " ").split()).rstrip(".")
    for kind, pat in _PATTERNS:
        m = pat.match(t)
        if not m:
            continue
        g = m.groups()
        if kind == "relation":
            return Spec("relation", g[0], g[1], 2, g[2], g[3], g[4])
        if kind == "count":
            return Spec("count", g[1], g[2], COUNTS.index(g[0]) + 1)
        if kind == "single":
            return Spec("single", g[0], g[1])
        if kind == "color":
            return Spec("single", color=g[0])
        return Spec("single", shape=g[0])
    raise InputError(f"prompt {text!r} is not in the mini-world grammar; expected e.g. 'a red circle', "
                     "'two blue squares', 'a red object' or 'a green triangle to the left of a yellow circle'")


def relation_of(a: Obj, b: Obj) -> str:
    """The one relation that holds for a REL b: the dominant axis of their centre offset decides."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _matches(o: Obj, color, shape) -> bool:
    return (color is None or o.color == color) and (shape is None or o.shape == shape)


def holds(scene: Scene, spec: Spec) -> bool:
    """Whether a caption's spec is true of a scene (captions describe the whole scene)."""
    objs = scene.objects
    if spec.kind in ("single", "count"):
        return len(objs) == spec.count and all(_matches(o, spec.color, spec.shape) for o in objs)
    if len(objs) != 2:
        return False
    for a, b in ((objs[0], objs[1]), (objs[1], objs[0])):
        if _matches(a, spec.color, spec.shape) and _matches(b, spec.color2, spec.shape2) and relation_of(a, b) == spec.relation:
            return True
    return False


def true_captions(scene: Scene) -> list[str]:
    """Every caption of the grammar that is true of a scene (the truth table's row)."""
    o = scene.objects
    if len(o) == 1:
        return [caption(Spec("single", o[0].color, o[0].shape)), caption(Spec("single", color=o[0].color)),
                caption(Spec("single", shape=o[0].shape))]
    if scene.kind == "count":
        return [caption(Spec("count", o[0].color, o[0].shape, len(o)))]
    a, b = o
    out = [caption(Spec("relation", a.color, a.shape, 2, relation_of(a, b), b.color, b.shape)),
           caption(Spec("relation", b.color, b.shape, 2, relation_of(b, a), a.color, a.shape))]
    return list(dict.fromkeys(out))


def all_captions() -> list[str]:
    """Every sentence of the grammar, in a fixed order."""
    out = [caption(Spec("single", c, s)) for c in COLORS for s in SHAPES]
    out += [caption(Spec("single", color=c)) for c in COLORS] + [caption(Spec("single", shape=s)) for s in SHAPES]
    out += [caption(Spec("count", c, s, n)) for n in (2, 3) for c in COLORS for s in SHAPES]
    out += [caption(Spec("relation", c1, s1, 2, r, c2, s2)) for c1 in COLORS for s1 in SHAPES for r in RELATIONS
            for c2 in COLORS for s2 in SHAPES if (c1, s1) != (c2, s2)]
    return out


# -- sampling ------------------------------------------------------------------------------------
def _free(objs, x, y, s, gap=4.0) -> bool:
    return all(np.hypot(o.x - x, o.y - y) >= (o.size + s) * 1.15 + gap for o in objs)


def _place(rng, s, objs, tries=200):
    lo, hi = s + 2, SIZE - 3 - s
    for _ in range(tries):
        x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if _free(objs, x, y, s):
            return x, y
    return None


def random_spec(rng: np.random.Generator, kind: str | None = None) -> Spec:
    """A random fully specified spec of the training distribution."""
    if kind is None:
        kind = rng.choice(list(KIND_PROBS), p=list(KIND_PROBS.values()))
    c, s = COLORS[rng.integers(4)], SHAPES[rng.integers(3)]
    if kind == "single":
        return Spec("single", c, s)
    if kind == "count":
        return Spec("count", c, s, int(rng.integers(2, 4)))
    while True:
        c2, s2 = COLORS[rng.integers(4)], SHAPES[rng.integers(3)]
        if (c2, s2) != (c, s):
            break
    return Spec("relation", c, s, 2, RELATIONS[rng.integers(4)], c2, s2)


def render_spec(spec: Spec, rng: np.random.Generator) -> Scene:
    """A random scene of which ``spec`` is true (unspecified colours/shapes drawn at random)."""
    bg = tuple(int(v) for v in rng.integers(222, 250, size=3))
    pick_c = lambda c: c if c is not None else COLORS[rng.integers(4)]  # noqa: E731
    pick_s = lambda s: s if s is not None else SHAPES[rng.integers(3)]  # noqa: E731
    if spec.kind == "single":
        s = rng.uniform(6, 14)
        x, y = _place(rng, s, [])
        return Scene([Obj(pick_s(spec.shape), pick_c(spec.color), x, y, s)], bg, "single")
    if spec.kind == "count":
        color, shape = pick_c(spec.color), pick_s(spec.shape)
        while True:
            objs = []
            for _ in range(spec.count):
                s = rng.uniform(6, 9)
                pos = _place(rng, s, objs)
                if pos is None:
                    break
                objs.append(Obj(shape, color, pos[0], pos[1], s))
            if len(objs) == spec.count:
                return Scene(objs, bg, "count" if spec.count > 1 else "single")
    c1, s1, c2, s2 = pick_c(spec.color), pick_s(spec.shape), pick_c(spec.color2), pick_s(spec.shape2)
    while True:
        sa, sb = rng.uniform(6, 10), rng.uniform(6, 10)
        d = rng.uniform(MIN_REL_DIST, 44)
        off = rng.uniform(-0.45, 0.45) * d
        horizontal = spec.relation in ("to the left of", "to the right of")
        sign = 1.0 if spec.relation in ("to the left of", "above") else -1.0  # b lies at +d from a
        dx, dy = (sign * d, off) if horizontal else (off, sign * d)
        ax = rng.uniform(sa + 2, SIZE - 3 - sa)
        ay = rng.uniform(sa + 2, SIZE - 3 - sa)
        a = Obj(s1, c1, ax, ay, sa)
        b = Obj(s2, c2, ax + dx, ay + dy, sb)
        inside = sb + 2 <= b.x <= SIZE - 3 - sb and sb + 2 <= b.y <= SIZE - 3 - sb
        if inside and _free([a], b.x, b.y, sb) and relation_of(a, b) == spec.relation:
            objs, rel = ([a, b], (0, spec.relation, 1)) if rng.random() < 0.5 else ([b, a], (1, spec.relation, 0))
            return Scene(objs, bg, "relation", rel)


def random_scene(rng: np.random.Generator, kind: str | None = None) -> Scene:
    return render_spec(random_spec(rng, kind), rng)


# -- drawing -------------------------------------------------------------------------------------
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def shape_mask(o: Obj) -> np.ndarray:
    """Boolean mask of one object (circle: radius s; square: half side 0.85 s; triangle: apex up)."""
    dx, dy = _XX - o.x, _YY - o.y
    if o.shape == "circle":
        return dx * dx + dy * dy <= o.size * o.size
    if o.shape == "square":
        h = 0.85 * o.size
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    # isosceles triangle with base 2s at y+s*0.9 and apex at y-s*0.9
    h = 0.9 * o.size
    t = (dy + h) / (2 * h)  # 0 at apex, 1 at base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * o.size)


def draw(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as a uint8 HxWx3 image; colours jitter by up to +-12 per channel with ``rng``."""
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = scene.background
    for o in scene.objects:
        rgb = np.array(RGB[o.color], np.int32)
        if rng is not None:
            rgb = rgb + rng.integers(-12, 13, size=3)
        img[shape_mask(o)] = np.clip(rgb, 0, 255).astype(np.uint8)
    return img


@dataclass
class Batch:
    images: np.ndarray  # uint8 [N, 64, 64, 3]
    scenes: list = field(default_factory=list)
    captions: list = field(default_factory=list)  # one training caption per scene


def make_batch(seed: int, n: int, kind: str | None = None) -> Batch:
    """``n`` scenes from one seed, each with one caption drawn from its true captions."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, kind) for _ in range(n)]
    images = np.stack([draw(s, rng) for s in scenes])
    caps = []
    for s in scenes:
        tc = true_captions(s)
        # full descriptions most of the time, partial ones ("a red object") sometimes
        caps.append(tc[0] if len(tc) == 1 or rng.random() < 0.6 else tc[int(rng.integers(1, len(tc)))])
    return Batch(images, scenes, caps)


def render_prompts(prompts: list[str], seed: int, per_prompt: int = 1) -> Batch:
    """Scenes drawn from prompts of the grammar (each prompt ``per_prompt`` times)."""
    rng = np.random.default_rng(seed)
    specs = [parse(p) for p in prompts]
    scenes, caps = [], []
    for p, spec in zip(prompts, specs):
        for _ in range(per_prompt):
            scenes.append(render_spec(spec, rng))
            caps.append(p)
    return Batch(np.stack([draw(s, rng) for s in scenes]), scenes, caps)
