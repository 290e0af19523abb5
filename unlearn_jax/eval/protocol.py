"""The evaluation protocol, independent of how videos are made.

``evaluate_prompt_sets`` generates the videos of every prompt set with every model (e.g.
``{"original": fn, "erased": fn}``, each ``fn(prompts, seeds) -> (N, F, H, W, 3)`` float in
[0, 1]), runs every metric on every frame and writes, under `out_dir`:

- ``records/<model>/<prompt set>/<index>.json``: each video's per-frame records, written as soon
  as the video is measured; a rerun with the same prompts, seeds and metric settings skips the
  videos that have one (resume), and ``<index>.thumbs.npy`` beside the videos shown on the sheet;
- ``per_frame.csv``: one row per model x prompt set x video x frame;
- ``summary.json``: per prompt set and model, every metric's summary, with the settings;
- ``comparison.md``: the comparison table (also printed);
- ``contact_sheet.png``: sampled frames of a few videos per prompt set, one row per model, with
  the detection boxes drawn.

``load_prompt_set`` (from `unlearn_jax.prompt_sets`, re-exported here) reads the published prompt
CSVs (bundled in unlearn_jax/data/prompt_sets/, loadable by name).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from unlearn_jax.atomic import atomic_file
from unlearn_jax.errors import UnlearnError
from unlearn_jax.eval import report
from unlearn_jax.eval.metrics import Metric
# The prompt CSV reader lives in unlearn_jax.prompt_sets (shared with `unlearn-jax sample`); its
# names stay importable from here.
from unlearn_jax.prompt_sets import DEFAULT_SEED, SEED_COLUMNS, load_prompt_set, prompt_set_name  # noqa: F401
from unlearn_jax.video_io import to_uint8, write_png

# ---------------------------------------------------------------------------------------------
# Driver


def _roundtrip(obj):
    return json.loads(json.dumps(report._json_safe(obj)))


def _record_path(out_dir: Path, model: str, set_name: str, index: int) -> Path:
    return out_dir / "records" / model / set_name / f"{index:05d}.json"


def _sheet_indices(n: int, k: int) -> list[int]:
    if n <= 0 or k <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(k, n))})


def _load_valid(path: Path, item: Mapping, metric_settings: Mapping, need_thumbs: bool):
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("item", {}).get("prompt") != item["prompt"] or rec.get("item", {}).get("seed") != item["seed"]:
        return None
    for name, settings in metric_settings.items():
        if rec.get("metrics", {}).get(name, {}).get("settings") != settings:
            return None
    if need_thumbs and not path.with_suffix(".thumbs.npy").is_file():
        return None
    return rec


def _check_inputs(generate_fns, prompt_sets, metrics):
    if not generate_fns:
        raise UnlearnError("evaluation needs at least one model to generate videos")
    if not metrics:
        raise UnlearnError("evaluation needs at least one metric")
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise UnlearnError(f"metric names repeat: {names}")
    cols = [c for m in metrics for c in m.columns]
    clash = sorted({c for c in cols if cols.count(c) > 1} | (set(cols) & set(report.BASE_COLUMNS)))
    if clash:
        raise UnlearnError(f"metric columns clash: {clash}")
    for name in list(generate_fns) + list(prompt_sets):
        if not name or "/" in name or name.startswith("."):
            raise UnlearnError(f"model and prompt set names must be plain folder names, got {name!r}")


def evaluate_prompt_sets(generate_fns: Mapping[str, Callable], prompt_sets: Mapping[str, Sequence[Mapping] | str | Path],
                         metrics: Sequence[Metric], out_dir, *, batch_size: int = 1, resume: bool = True,
                         sheet_videos: int = 3, sheet_frames: int = 4, thumb_height: int = 120,
                         settings: Mapping | None = None, on_videos: Callable | None = None,
                         log: Callable[[str], None] = print) -> dict:
    """Generates, measures and reports every prompt set with every model; returns the summary.

    `generate_fns`: ``{model name: fn(prompts, seeds) -> (N, F, H, W, 3) float [0, 1] (or uint8)}``
    ("original" first, then "erased": the table's change column compares later models with the
    first). `prompt_sets`: ``{name: items}`` (items as `load_prompt_set` returns) or
    ``{name: csv path}``. `on_videos(model, set_name, items, videos_uint8)` is called after each
    batch (e.g. to save the videos). With `resume`, videos that already have a record with the same
    prompt, seed and metric settings are not generated again.
    """
    out_dir = Path(out_dir)
    sets = {name: (load_prompt_set(v) if isinstance(v, (str, Path)) else list(v)) for name, v in prompt_sets.items()}
    _check_inputs(generate_fns, sets, metrics)
    if int(batch_size) < 1:
        raise UnlearnError(f"batch_size must be >= 1, got {batch_size}")
    metric_settings = {m.name: _roundtrip(m.settings()) for m in metrics}

    for set_name, items in sets.items():
        if not items:
            raise UnlearnError(f"prompt set {set_name} has no prompts")
        sheet = set(_sheet_indices(len(items), sheet_videos))
        for model, fn in generate_fns.items():
            todo = []
            for pos, item in enumerate(items):
                path = _record_path(out_dir, model, set_name, pos)
                if not (resume and _load_valid(path, item, metric_settings, pos in sheet)):
                    todo.append(pos)
            done = len(items) - len(todo)
            if done:
                log(f"[{set_name}] {model}: {done}/{len(items)} videos already measured")
            for b in range(0, len(todo), int(batch_size)):
                batch = todo[b:b + int(batch_size)]
                bitems = [items[p] for p in batch]
                videos = np.asarray(fn([it["prompt"] for it in bitems], [it["seed"] for it in bitems]))
                if videos.ndim != 5 or videos.shape[0] != len(batch) or videos.shape[-1] != 3:
                    raise UnlearnError(f"model {model!r} returned videos of shape {videos.shape} for "
                                       f"{len(batch)} prompts; expected ({len(batch)}, F, H, W, 3)")
                videos = to_uint8(videos)
                if on_videos is not None:
                    on_videos(model, set_name, bitems, videos)
                per_metric = {m.name: m.per_frame(videos, bitems) for m in metrics}
                for j, pos in enumerate(batch):
                    path = _record_path(out_dir, model, set_name, pos)
                    nframes = videos.shape[1]
                    rec = {"model": model, "prompt_set": set_name, "index": pos, "item": dict(bitems[j]),
                           "frames": nframes, "frame_size": list(videos.shape[2:4]),
                           "metrics": {m.name: {"settings": metric_settings[m.name], "frames": per_metric[m.name][j]}
                                       for m in metrics}}
                    if pos in sheet:
                        fidx = _sheet_indices(nframes, sheet_frames)
                        thumbs = np.stack([report.resize(videos[j, f], thumb_height) for f in fidx])
                        with atomic_file(path.with_suffix(".thumbs.npy"), "wb") as f:
                            np.save(f, thumbs)
                        rec["thumb_frames"] = fidx
                    report.write_json(path, rec)
                log(f"[{set_name}] {model}: {done + b + len(batch)}/{len(items)} videos")

    return write_reports(out_dir, list(generate_fns), sets, metrics, settings=settings,
                         sheet_videos=sheet_videos, log=log)


def _load_records(out_dir: Path, models, sets, metric_settings):
    recs = {}
    for set_name, items in sets.items():
        for model in models:
            lst = []
            for pos, item in enumerate(items):
                rec = _load_valid(_record_path(out_dir, model, set_name, pos), item, metric_settings, False)
                if rec is None:
                    raise UnlearnError(f"no valid record for {model} / {set_name} / video {pos} in {out_dir}/records")
                lst.append(rec)
            recs[(set_name, model)] = lst
    return recs


def write_reports(out_dir, models: Sequence[str], sets: Mapping[str, Sequence[Mapping]], metrics: Sequence[Metric],
                  *, settings: Mapping | None = None, sheet_videos: int = 3,
                  log: Callable[[str], None] = print) -> dict:
    """Builds per_frame.csv, summary.json, comparison.md and contact_sheet.png from the records."""
    out_dir = Path(out_dir)
    metric_settings = {m.name: _roundtrip(m.settings()) for m in metrics}
    recs = _load_records(out_dir, models, sets, metric_settings)

    rows = []
    results: dict = {}
    for set_name in sets:
        results[set_name] = {}
        for model in models:
            lst = recs[(set_name, model)]
            res = {"videos": len(lst), "frames": sum(r["frames"] for r in lst)}
            for m in metrics:
                res[m.name] = m.summarize([r["metrics"][m.name]["frames"] for r in lst])
            results[set_name][model] = res
            for r in lst:
                it = r["item"]
                for f in range(r["frames"]):
                    row = {"model": model, "prompt_set": set_name, "video": r["index"],
                           "name": it.get("name") or f"{r['index']:04d}", "prompt": it["prompt"],
                           "seed": it["seed"], "frame": f}
                    for m in metrics:
                        fr = r["metrics"][m.name]["frames"]
                        if f < len(fr):
                            row.update({c: fr[f].get(c) for c in m.columns})
                    rows.append(row)

    summary = {
        "models": list(models),
        "prompt_sets": {k: {"videos": len(v)} for k, v in sets.items()},
        "metrics": {m.name: {"settings": metric_settings[m.name], "table": [list(t) for t in m.table]}
                    for m in metrics},
        "settings": dict(settings or {}),
        "results": results,
    }
    report.write_per_frame_csv(out_dir / "per_frame.csv", rows, [c for m in metrics for c in m.columns])
    report.write_json(out_dir / "summary.json", summary)
    table = report.comparison_table(_roundtrip(summary))
    report.write_text(out_dir / "comparison.md", table)
    log(table.rstrip("\n"))

    sheet_rows = []
    for set_name, items in sets.items():
        for pos in _sheet_indices(len(items), sheet_videos):
            prompt = items[pos]["prompt"]
            sheet_rows.append({"title": f"{set_name} #{pos} seed {items[pos]['seed']}: "
                                        f"{prompt[:110]}{'...' if len(prompt) > 110 else ''}"})
            for model in models:
                r = recs[(set_name, model)][pos]
                tpath = _record_path(out_dir, model, set_name, pos).with_suffix(".thumbs.npy")
                if "thumb_frames" not in r or not tpath.is_file():
                    continue
                thumbs = np.load(tpath)
                scale = thumbs.shape[1] / r["frame_size"][0]
                frames = []
                for t, f in zip(thumbs, r["thumb_frames"]):
                    t = t.copy()
                    for m in metrics:
                        fr = r["metrics"][m.name]["frames"]
                        for b in (fr[f].get("boxes", []) if f < len(fr) else []):
                            report.draw_rect(t, [v * scale for v in b["box"]])
                    frames.append(t)
                label = "\n".join([model, f"frames {', '.join(str(f) for f in r['thumb_frames'])}"]
                                  + [x for x in (m.video_label(r["metrics"][m.name]["frames"]) for m in metrics) if x])
                sheet_rows.append({"label": label, "frames": frames})
    if any("frames" in r for r in sheet_rows):
        write_png(out_dir / "contact_sheet.png", report.contact_sheet(sheet_rows))
    return summary
