"""Evaluation reports: per-frame CSV, summary JSON, comparison table, contact sheet PNG.

Every file is written atomically (temporary name, then rename). Images are numpy arrays; Pillow
(installed with matplotlib, a core dependency) resizes thumbnails and writes the labels; the PNG is
written by `unlearn_jax.video_io.write_png` (re-exported here with `to_uint8`).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from unlearn_jax.atomic import atomic_file
from unlearn_jax.eval.metrics import resize_bilinear
from unlearn_jax.video_io import to_uint8, write_png  # noqa: F401  (re-exported: they used to live here)

BASE_COLUMNS = ("model", "prompt_set", "video", "name", "prompt", "seed", "frame")
BOX_COLOR = (255, 40, 40)


# ---------------------------------------------------------------------------------------------
# Tables


def write_per_frame_csv(path, rows: Sequence[Mapping], metric_columns: Sequence[str]) -> Path:
    """One row per (model, prompt set, video, frame): `BASE_COLUMNS` then `metric_columns`."""
    path = Path(path)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(BASE_COLUMNS) + list(metric_columns), extrasaction="ignore",
                       lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in w.fieldnames})
    with atomic_file(path, "w") as f:
        f.write(buf.getvalue())
    return path


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    return x


def write_json(path, obj) -> Path:
    """Writes `obj` as indented JSON (NaN / inf become null; numpy values become Python ones)."""
    path = Path(path)
    with atomic_file(path, "w") as f:
        json.dump(_json_safe(obj), f, indent=2)
        f.write("\n")
    return path


def write_text(path, text: str) -> Path:
    path = Path(path)
    with atomic_file(path, "w") as f:
        f.write(text)
    return path


def _fmt(v, scale) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v * scale:.2f}" if scale != 1.0 else f"{v:.4f}"


def relative_change(new, old) -> float | None:
    """(new - old) / |old|, or None when undefined."""
    if new is None or old is None or not math.isfinite(new) or not math.isfinite(old) or old == 0:
        return None
    return (new - old) / abs(old)


def comparison_table(summary: Mapping) -> str:
    """A Markdown table: one row per prompt set; per table value of every metric, one column per
    model and the relative change of each later model against the first.

    `summary` is the summary.json structure: ``models``, ``metrics[name]["table"]`` (lists of
    ``[key, label, scale]``) and ``results[prompt_set][model][metric][key]``.
    """
    models = list(summary["models"])
    header = ["prompt set", "videos"]
    cols = []  # (metric, key, scale)
    for mname, m in summary["metrics"].items():
        for key, label, scale in m["table"]:
            for model in models:
                header.append(f"{label} {model}")
                cols.append((mname, key, scale, model, None))
            for model in models[1:]:
                header.append(f"{label} change" if len(models) == 2 else f"{label} change {model}")
                cols.append((mname, key, scale, model, models[0]))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for set_name, per_model in summary["results"].items():
        first = per_model.get(models[0], {})
        row = [set_name, str(first.get("videos", ""))]
        for mname, key, scale, model, base in cols:
            val = per_model.get(model, {}).get(mname, {}).get(key)
            if base is None:
                row.append(_fmt(val, scale))
            else:
                ch = relative_change(val, per_model.get(base, {}).get(mname, {}).get(key))
                row.append("n/a" if ch is None else f"{ch * 100:+.1f}%")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Images


def resize(img: np.ndarray, height: int) -> np.ndarray:
    """An (H, W, 3) uint8 image scaled to `height` rows, aspect kept (bilinear)."""
    h, w = img.shape[:2]
    return resize_bilinear(img, max(1, int(round(w * height / h))), height)


def draw_rect(img: np.ndarray, box: Sequence[float], color=BOX_COLOR, thickness: int = 2) -> np.ndarray:
    """Draws the outline of box ``[x, y, w, h]`` (pixels) on an (H, W, 3) uint8 image in place."""
    h, w = img.shape[:2]
    x0, y0 = int(round(box[0])), int(round(box[1]))
    x1, y1 = int(round(box[0] + box[2])) - 1, int(round(box[1] + box[3])) - 1
    x0, x1 = max(0, min(x0, w - 1)), max(0, min(x1, w - 1))
    y0, y1 = max(0, min(y0, h - 1)), max(0, min(y1, h - 1))
    if x1 < x0 or y1 < y0:
        return img
    t = max(1, thickness)
    c = np.asarray(color, np.uint8)
    img[y0:min(y0 + t, y1 + 1), x0:x1 + 1] = c
    img[max(y1 - t + 1, y0):y1 + 1, x0:x1 + 1] = c
    img[y0:y1 + 1, x0:min(x0 + t, x1 + 1)] = c
    img[y0:y1 + 1, max(x1 - t + 1, x0):x1 + 1] = c
    return img


def _draw_text(img: np.ndarray, xy, text: str, color=(0, 0, 0)) -> np.ndarray:
    try:
        from PIL import Image, ImageDraw
    except ImportError:  # labels are a nicety
        return img
    im = Image.fromarray(img)
    ImageDraw.Draw(im).text(xy, text, fill=tuple(color))
    return np.asarray(im).copy()


def thumbnail(frame: np.ndarray, boxes: Sequence[Mapping], height: int) -> np.ndarray:
    """`frame` scaled to `height` with `boxes` (in the frame's pixels) drawn on it."""
    t = resize(frame, height).copy()
    s = height / frame.shape[0]
    for b in boxes:
        draw_rect(t, [v * s for v in b["box"]])
    return t


def contact_sheet(rows: Sequence[Mapping], label_width: int = 170, gap: int = 4,
                  background: int = 255) -> np.ndarray:
    """A grid image, (H, W, 3) uint8. Each row is ``{"label": str (may hold newlines), "frames":
    [(h, w, 3) uint8]}``
    (thumbnails of one height per row; boxes already drawn) or ``{"title": str}`` for a heading."""
    title_h = 20
    widths = [gap + sum(f.shape[1] + gap for f in r["frames"]) for r in rows if "frames" in r]
    width = label_width + (max(widths) if widths else gap)
    heights = [title_h if "title" in r else (max(f.shape[0] for f in r["frames"]) if r["frames"] else 0) + gap
               for r in rows]
    sheet = np.full((gap + sum(heights), width, 3), background, np.uint8)
    y = gap
    for r, h in zip(rows, heights):
        if "title" in r:
            sheet = _draw_text(sheet, (gap, y + 4), r["title"])
        else:
            sheet = _draw_text(sheet, (gap, y + 4), r.get("label", ""))
            x = label_width + gap
            for f in r["frames"]:
                sheet[y:y + f.shape[0], x:x + f.shape[1]] = f
                x += f.shape[1] + gap
        y += h
    return sheet
