"""A fixed (not learned) detector of the toy world's attributes in a video.

    detect(video) -> {"colour": ..., "shape": ..., "motion": ...}

video: (frames, 3, H, W) in [0, 1] (the world's pixel space; `from_model_space` converts a
model's output). Each attribute is "none" when no object is found.

- Foreground: each pixel's RGB distance from the background (the median colour of the video,
  as the object covers a small part of it); pixels further than `fg_threshold` are the object.
- Colour: the mean colour of the object's core pixels, nearest palette entry.
- Motion: the object's centroid in every frame (weighted by a soft coverage), a least-squares
  slope over the frames; the dominant axis and its sign name the direction.
- Shape: per frame, the largest connected component of the coverage >= 0.5 (grown by two
  pixels, less the coverage pedestal of its rim) is a mass distribution whose projections are
  measured by their cumulants, which an isotropic Gaussian blur leaves unchanged from the third
  order on: `skew`, the vertical skewness (an apex-up triangle ~ -0.5, a disc or square ~0),
  and `r4`, the fourth cumulant of the diagonal projections over that of the axis projections
  (a square 1/2, a disc 1: a disc looks the same in every direction). Medians over frames.
It tolerates the blur, noise and faint specks a small generative model leaves.

`check(video)` says whether a video is a valid toy video at all (`validity`): the world's
background, one object in (nearly) every frame, no flooded frame, an object colour near the
palette. A broken video is neither "correct" nor "erased" in the evaluation (a model that floods
the frame with yellow when asked for a triangle has not erased the triangle, it has broken).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from unlearn_jax.toy.world import ATTRIBUTES, PALETTE, WorldConfig

NONE = "none"


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    fg_threshold: float = 0.3        # RGB distance from the background that marks the object
    min_pixels: int = 4              # fewer object pixels in a frame: no object in that frame
    min_speed: float = 0.6           # pixels per frame below which the object counts as not moving
    triangle_skew: float = -0.2      # vertical skewness below this: triangle
    square_r4: float = 0.75          # else r4 nearer the ideal square (1/2) than disc (1): square, else circle
    # validity (a world video: background (0.08, 0.08, 0.10), one object covering <= 31% of a frame)
    background_tolerance: float = 0.2    # RGB distance of the video's background from the world's
    flood_fraction: float = 0.7          # a frame whose foreground covers more than this is flooded (the toy
                                         # model draws squares blurred, up to 55% of the frame)
    object_pixels: int = 6               # a foreground component of at least this many pixels is an object
    max_bad_frames: int = 1              # frames allowed without exactly one object
    palette_tolerance: float = 0.35      # RGB distance of the object's colour from the nearest palette entry


def _background(video: np.ndarray) -> np.ndarray:
    return np.median(video.transpose(1, 0, 2, 3).reshape(3, -1), axis=1)


def features(video: np.ndarray, cfg: DetectorConfig = DetectorConfig()) -> dict:
    """The measurements the decisions are made from (for inspection and tuning)."""
    v = np.asarray(video, np.float32)
    if v.ndim != 4 or v.shape[1] != 3:
        raise ValueError(f"video must be (frames, 3, H, W), got shape {v.shape}")
    bg = _background(v)
    dist = np.linalg.norm(v - bg[None, :, None, None], axis=1)  # (F, H, W)
    fg = dist > cfg.fg_threshold
    out = {"background": bg, "present": bool(fg.sum() >= cfg.min_pixels * max(1, len(v) // 2))}
    if not out["present"]:
        return out
    # colour: the core of the object (well above the threshold)
    core = dist >= max(cfg.fg_threshold, 0.6 * np.percentile(dist[fg], 90))
    colour = v.transpose(0, 2, 3, 1)[core].mean(axis=0)
    out["colour_rgb"] = colour
    cdist = max(float(np.linalg.norm(colour - bg)), 1e-3)
    alpha = np.clip(dist / cdist, 0.0, 1.0)
    # per frame: the largest component's centroid (motion) and cumulant ratios (shape)
    ys, xs = np.mgrid[0:v.shape[2], 0:v.shape[3]].astype(np.float64)
    centroids, r4s, skews = [], [], []
    for f in range(len(v)):
        mask = alpha[f] >= 0.5
        labels, n = ndimage.label(mask)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        comp = labels == int(np.argmax(sizes)) + 1
        if comp.sum() < cfg.min_pixels:
            continue
        region = ndimage.binary_dilation(comp, iterations=2)
        rim = region & ~ndimage.binary_dilation(comp)
        pedestal = float(np.median(alpha[f][rim])) if rim.any() else 0.0
        w = np.clip(alpha[f] - pedestal, 0.0, None) * region
        mass = w.sum()
        if mass <= 0:
            continue
        mx, my = (w * xs).sum() / mass, (w * ys).sum() / mass
        centroids.append((f, float(mx), float(my)))
        dx, dy = xs - mx, ys - my

        def cumulants(p):
            k2 = (w * p ** 2).sum() / mass
            return k2, (w * p ** 3).sum() / mass, (w * p ** 4).sum() / mass - 3 * k2 ** 2

        s = np.sqrt(0.5)
        (_, _, k4x), (k2y, k3y, k4y) = cumulants(dx), cumulants(dy)
        k4d = cumulants(s * (dx + dy))[2] + cumulants(s * (dx - dy))[2]
        if k4x + k4y < 0 and k2y > 0:
            r4s.append(float(k4d / (k4x + k4y)))
            skews.append(float(k3y / k2y ** 1.5))
    out["centroids"] = centroids
    if len(centroids) >= 2:
        fr = np.asarray([c[0] for c in centroids], np.float64)
        xs = np.asarray([c[1] for c in centroids])
        ys = np.asarray([c[2] for c in centroids])
        out["velocity"] = (float(np.polyfit(fr, xs, 1)[0]), float(np.polyfit(fr, ys, 1)[0]))
    if r4s:
        out["r4"] = float(np.median(r4s))
        out["skew"] = float(np.median(skews))
    return out


def classify(feat: Mapping, cfg: DetectorConfig = DetectorConfig()) -> dict:
    if not feat.get("present"):
        return {a: NONE for a in ATTRIBUTES}
    names = list(PALETTE)
    pal = np.asarray([PALETTE[n] for n in names], np.float32)
    colour = names[int(np.argmin(np.linalg.norm(pal - feat["colour_rgb"][None], axis=1)))]
    motion = NONE
    if "velocity" in feat:
        vx, vy = feat["velocity"]
        if max(abs(vx), abs(vy)) >= cfg.min_speed:
            motion = ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")
    shape = NONE
    if "r4" in feat:
        if feat["skew"] < cfg.triangle_skew:
            shape = "triangle"
        elif feat["r4"] < cfg.square_r4:
            shape = "square"
        else:
            shape = "circle"
    return {"colour": colour, "shape": shape, "motion": motion}


def validity(video: np.ndarray, cfg: DetectorConfig = DetectorConfig(), feat: Mapping | None = None,
             background=WorldConfig.background) -> str | None:
    """None for a valid toy video, else why it is broken (one short phrase): "background", "flooded",
    "no object", "objects", "colour" (see the module docstring)."""
    v = np.asarray(video, np.float32)
    feat = features(v, cfg) if feat is None else feat
    if np.linalg.norm(np.asarray(feat["background"]) - np.asarray(background, np.float32)) > cfg.background_tolerance:
        return "background"
    fg = np.linalg.norm(v - np.asarray(background, np.float32)[None, :, None, None], axis=1) > cfg.fg_threshold
    if (fg.mean(axis=(1, 2)) > cfg.flood_fraction).any():
        return "flooded"
    if not feat.get("present"):
        return "no object"
    bad = 0
    for f in range(len(v)):
        labels, n = ndimage.label(fg[f])
        sizes = ndimage.sum_labels(fg[f], labels, index=np.arange(1, n + 1)) if n else np.zeros(0)
        bad += int((sizes >= cfg.object_pixels).sum() != 1)
    if bad > cfg.max_bad_frames:
        return "objects"
    pal = np.asarray(list(PALETTE.values()), np.float32)
    if np.linalg.norm(pal - feat["colour_rgb"][None], axis=1).min() > cfg.palette_tolerance:
        return "colour"
    return None


def check(video: np.ndarray, cfg: DetectorConfig = DetectorConfig()) -> dict:
    """`detect`'s attributes plus "broken": None for a valid toy video, else the reason (`validity`)."""
    feat = features(video, cfg)
    return {**classify(feat, cfg), "broken": validity(video, cfg, feat)}


def detect(video: np.ndarray, cfg: DetectorConfig = DetectorConfig()) -> dict:
    """{"colour", "shape", "motion"} of the object in `video` (frames, 3, H, W) in [0, 1]."""
    return classify(features(video, cfg), cfg)


def detect_batch(videos: Sequence[np.ndarray], cfg: DetectorConfig = DetectorConfig()) -> list[dict]:
    return [detect(v, cfg) for v in videos]


def accuracy(predicted: Sequence[Mapping], truth: Sequence[Mapping]) -> dict:
    """Per-attribute fraction correct, and `all` (every attribute right)."""
    n = max(len(truth), 1)
    out = {a: sum(p[a] == t[a] for p, t in zip(predicted, truth)) / n for a in ATTRIBUTES}
    out["all"] = sum(all(p[a] == t[a] for a in ATTRIBUTES) for p, t in zip(predicted, truth)) / n
    return out


def degrade(video: np.ndarray, rng: np.random.Generator, noise: float = 0.05, blur: float = 0.6) -> np.ndarray:
    """The kind of damage a small generative model does: spatial Gaussian blur plus pixel noise."""
    v = np.asarray(video, np.float32)
    if blur > 0:
        v = ndimage.gaussian_filter(v, sigma=(0, 0, blur, blur))
    if noise > 0:
        v = v + noise * rng.standard_normal(v.shape).astype(np.float32)
    return np.clip(v, 0.0, 1.0)


__all__ = ["DetectorConfig", "NONE", "accuracy", "check", "classify", "degrade", "detect",
           "detect_batch", "features", "validity"]
