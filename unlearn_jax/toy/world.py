"""A procedural toy world of tiny captioned videos, where concepts (and their erasure) can be measured.

Every video shows one object over a plain dark background: a shape (circle, square, triangle) of
a colour (red, green, blue, yellow) that moves one way (right, left, up, down). Captions name
the attributes with synonyms, in a few sentence templates; some attributes may be left unnamed
("a red object moving up"). Each attribute value has several *train* synonyms (the only ones the
toy model's training captions and an erasure run use) and one *held-out* synonym (only in
robustness evaluations; the toy text encoder places it next to its train synonyms, as a
pretrained encoder would).

    world = World()                       # the fixed settings (WorldConfig)
    for ex in world.recipe(seed=0, n=4):  # (video, caption, attributes)
        ex.video                          # (frames, 3, size, size) float32 in [0, 1]

Everything is a pure function of the seed: same seed, same videos and captions.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, NamedTuple

import numpy as np

ATTRIBUTES = ("colour", "shape", "motion")

# attribute -> value -> RGB (colour only)
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.12, 0.78, 0.16),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.12),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("right", "left", "up", "down")
VALUES: dict[str, tuple[str, ...]] = {"colour": tuple(PALETTE), "shape": SHAPES, "motion": MOTIONS}

# (train synonyms, held-out synonyms). Colour and shape synonyms are single words; motion
# synonyms are phrases whose direction word carries the meaning.
SYNONYMS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "colour": {
        "red": (("red", "crimson", "scarlet"), ("ruby",)),
        "green": (("green", "emerald", "lime"), ("jade",)),
        "blue": (("blue", "azure", "navy"), ("cobalt",)),
        "yellow": (("yellow", "golden", "lemon"), ("amber",)),
    },
    "shape": {
        "circle": (("circle", "ball", "disc"), ("orb",)),
        "square": (("square", "box", "block"), ("tile",)),
        "triangle": (("triangle", "wedge", "pyramid"), ("trigon",)),
    },
    "motion": {
        "right": (("moving right", "sliding to the right", "heading rightward"), ("heading eastward",)),
        "left": (("moving left", "sliding to the left", "heading leftward"), ("heading westward",)),
        "up": (("moving up", "rising upward", "heading upward"), ("heading northward",)),
        "down": (("moving down", "falling downward", "heading downward"), ("heading southward",)),
    },
}
# The word of each motion phrase that names the direction (the rest are generic verbs/fillers).
MOTION_WORDS = {
    "right": ("right", "rightward", "eastward"), "left": ("left", "leftward", "westward"),
    "up": ("up", "upward", "rising", "northward"), "down": ("down", "downward", "falling", "southward"),
}
# A noun for a caption that does not name the shape.
GENERIC_NOUNS = ("object", "shape", "thing")
TEMPLATES = (
    "a {colour} {shape} {motion}",
    "a {colour} {shape} is {motion}",
    "video of a {colour} {shape} {motion}",
    "there is a {colour} {shape} {motion}",
    "the {colour} {shape} {motion} on a dark background",
)

SPLITS = ("train", "heldout")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """The generator's settings (pixels: size x size, values in [0, 1])."""

    size: int = 20
    frames: int = 5
    radius: float = 5.0          # half the object's extent, in pixels
    radius_jitter: float = 0.3   # +- uniform jitter of the radius
    speed: float = 1.5           # pixels per frame along the motion's axis
    across_jitter: float = 2.0   # +- uniform offset from the centre line, across the motion (pixels)
    along_jitter: float = 1.0    # +- uniform offset of the start, along the motion (pixels)
    background: tuple[float, float, float] = (0.08, 0.08, 0.10)
    supersample: int = 4         # anti-aliasing: render at this factor, then average
    omit_prob: float = 0.15      # per attribute: chance a caption leaves it unnamed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Example(NamedTuple):
    video: np.ndarray            # (frames, 3, size, size) float32 in [0, 1]
    caption: str
    attributes: dict             # {"colour": ..., "shape": ..., "motion": ...}
    named: dict                  # {attribute: True if the caption names it}


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------
def synonyms(attribute: str, value: str, split: str = "train") -> tuple[str, ...]:
    """The synonyms (words or phrases) of one attribute value in a split ("train" / "heldout" / "all")."""
    train, held = SYNONYMS[attribute][value]
    return {"train": train, "heldout": held, "all": train + held}[split]


def concept_words(attribute: str, value: str, split: str = "all") -> tuple[str, ...]:
    """The single words that carry the value's meaning (colour/shape synonyms; motion direction words)."""
    if attribute != "motion":
        return synonyms(attribute, value, split)
    words = [w for p in synonyms(attribute, value, split) for w in p.split() if w in MOTION_WORDS[value]]
    return tuple(dict.fromkeys(words))


def vocabulary() -> list[str]:
    """Every word any caption (train or held-out) can contain, sorted."""
    words = set()
    for t in TEMPLATES:
        words.update(w for w in t.split() if not w.startswith("{"))
    words.update(GENERIC_NOUNS)
    for attr in ATTRIBUTES:
        for value in VALUES[attr]:
            for phrase in synonyms(attr, value, "all"):
                words.update(phrase.split())
    return sorted(words)


def concept_word_groups() -> dict[str, list[str]]:
    """{"colour:red": [words...], ...}: the words an encoder should place together."""
    out = {}
    for attr in ATTRIBUTES:
        for value in VALUES[attr]:
            out[f"{attr}:{value}"] = list(concept_words(attr, value, "all"))
    return out


def caption(attributes: Mapping[str, str], rng: np.random.Generator, split: str | Mapping[str, str] = "train",
            template: str | None = None, named: Mapping[str, bool] | None = None) -> str:
    """A caption naming `attributes` with synonyms of `split` (one split, or one per attribute);
    `named[attr]=False` leaves an attribute out."""
    named = {a: True for a in ATTRIBUTES} if named is None else named
    splits = {a: split for a in ATTRIBUTES} if isinstance(split, str) else {a: split.get(a, "train") for a in ATTRIBUTES}
    template = template if template is not None else TEMPLATES[rng.integers(len(TEMPLATES))]
    parts = {}
    for attr in ATTRIBUTES:
        if named.get(attr, True):
            options = synonyms(attr, attributes[attr], splits[attr])
            parts[attr] = options[rng.integers(len(options))]
        elif attr == "shape":
            parts[attr] = GENERIC_NOUNS[rng.integers(len(GENERIC_NOUNS))]
        else:
            parts[attr] = ""
    text = template.format(**parts)
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def shape_mask(shape: str, cx: float, cy: float, r: float, size: int, supersample: int = 4) -> np.ndarray:
    """(size, size) float coverage in [0, 1] of a shape centred at (cx, cy) (pixel units; pixel
    i covers [i, i+1))."""
    s = supersample
    coords = (np.arange(size * s) + 0.5) / s
    x, y = np.meshgrid(coords, coords, indexing="xy")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "triangle":
        # apex up at cy - 1.1 r, base at cy + 0.9 r, half-width 1.15 r at the base
        top, bottom = -1.1 * r, 0.9 * r
        frac = (dy - top) / (bottom - top)  # 0 at the apex, 1 at the base
        inside = (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * 1.15 * r)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.reshape(size, s, size, s).mean(axis=(1, 3)).astype(np.float32)


def track(motion: str, start: tuple[float, float], cfg: WorldConfig) -> np.ndarray:
    """(frames, 2) centre positions (x, y) of an object starting at `start`."""
    d = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}[motion]
    f = np.arange(cfg.frames, dtype=np.float64)[:, None]
    return np.asarray(start, np.float64)[None] + cfg.speed * f * np.asarray(d, np.float64)[None]


def render(attributes: Mapping[str, str], cfg: WorldConfig, rng: np.random.Generator) -> np.ndarray:
    """(frames, 3, size, size) float32 video of one object; position and size drawn from `rng`."""
    r = cfg.radius + rng.uniform(-cfg.radius_jitter, cfg.radius_jitter)
    travel = cfg.speed * (cfg.frames - 1)
    lo, hi = r + 0.5, cfg.size - r - 0.5
    # the track is centred on the canvas, then shifted by the jitters (kept inside the canvas)
    along_mid, mid = (lo + hi - travel) / 2, cfg.size / 2
    along = float(np.clip(along_mid + rng.uniform(-cfg.along_jitter, cfg.along_jitter), lo, max(lo, hi - travel)))
    across = float(np.clip(mid + rng.uniform(-cfg.across_jitter, cfg.across_jitter), lo, hi))
    motion = attributes["motion"]
    if motion in ("right", "down"):
        start_along = along
    else:
        start_along = along + travel
    start = (start_along, across) if motion in ("right", "left") else (across, start_along)
    colour = np.asarray(PALETTE[attributes["colour"]], np.float32)[:, None, None]
    bg = np.asarray(cfg.background, np.float32)[:, None, None]
    frames = []
    for cx, cy in track(motion, start, cfg):
        m = shape_mask(attributes["shape"], cx, cy, r, cfg.size, cfg.supersample)[None]
        frames.append(bg * (1 - m) + colour * m)
    return np.stack(frames).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The world and its data recipe
# --------------------------------------------------------------------------------------------
class World:
    def __init__(self, config: WorldConfig = WorldConfig()):
        self.config = config

    def sample_attributes(self, rng: np.random.Generator) -> dict:
        return {a: VALUES[a][rng.integers(len(VALUES[a]))] for a in ATTRIBUTES}

    def example(self, rng: np.random.Generator, attributes: Mapping[str, str] | None = None,
                split: str = "train", omit: bool = True) -> Example:
        """One (video, caption, attributes); `omit` lets the caption leave attributes unnamed."""
        attrs = dict(attributes) if attributes is not None else self.sample_attributes(rng)
        named = {a: not (omit and rng.random() < self.config.omit_prob) for a in ATTRIBUTES}
        text = caption(attrs, rng, split, named=named)
        return Example(render(attrs, self.config, rng), text, attrs, named)

    def recipe(self, seed: int, n: int | None = None, split: str = "train", omit: bool = True) -> Iterator[Example]:
        """The data recipe: an endless (or `n`-long) deterministic stream of examples for `seed`."""
        rng = np.random.default_rng(seed)
        i = 0
        while n is None or i < n:
            yield self.example(rng, split=split, omit=omit)
            i += 1

    def batch(self, seed: int, n: int, split: str = "train", omit: bool = True):
        """(videos (n, F, 3, S, S), captions [n], attributes [n]) from `recipe(seed, n)`."""
        exs = list(self.recipe(seed, n, split, omit))
        return np.stack([e.video for e in exs]), [e.caption for e in exs], [e.attributes for e in exs]

    def describe(self) -> dict:
        """Everything that defines the world, for `toy_world.json`."""
        return {
            "config": self.config.to_dict(),
            "palette": PALETTE,
            "values": {a: list(v) for a, v in VALUES.items()},
            "synonyms": {a: {v: {"train": list(s[0]), "heldout": list(s[1])} for v, s in d.items()}
                         for a, d in SYNONYMS.items()},
            "motion_words": {k: list(v) for k, v in MOTION_WORDS.items()},
            "generic_nouns": list(GENERIC_NOUNS),
            "templates": list(TEMPLATES),
        }


def to_model_space(video: np.ndarray) -> np.ndarray:
    """[0, 1] pixels -> the model's [-1, 1] space (same layout)."""
    return np.asarray(video, np.float32) * 2.0 - 1.0


def from_model_space(x: np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)



__all__ = ["ATTRIBUTES", "Example", "MOTIONS", "PALETTE", "SHAPES", "SPLITS", "SYNONYMS", "TEMPLATES", "VALUES",
           "World", "WorldConfig", "caption", "concept_word_groups", "concept_words", "from_model_space", "render",
           "shape_mask", "synonyms", "to_model_space", "vocabulary"]
