"""`unlearn-jax sample`: videos from prompts with a diffusers pipeline folder (any supported family), in JAX.

One prompt:
    unlearn-jax sample --model PIPELINE_DIR [--erasers DIR] --prompt "..." --out x.mp4 [--seed 42]
        [--frames-dir DIR]
A prompt file (CSV with a `prompt` column):
    unlearn-jax sample --model PIPELINE_DIR --prompts prompts.csv --out-dir DIR [--png-frames] [--overwrite]

Batch mode reads the CSV with `unlearn_jax.prompt_sets.load_prompt_set` (the evaluation's reader),
names each video `{case_number:04d}.mp4` (the CSV's `case_number` column) or `{row index:04d}.mp4`
(0-based), takes its seed from the `seed` or `evaluation_seed` column (else `--seed` + row index),
keeps `DIR/index.csv` (name, prompt, seed, path relative to DIR) of the videos present and
`DIR/sample_settings.json`, and skips videos already made with the same prompt, seed and
settings, so that an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path

from unlearn_jax.errors import UnlearnError

SETTINGS_FILE = "sample_settings.json"
INDEX_FILE = "index.csv"
INDEX_COLUMNS = ("name", "prompt", "seed", "path")


# --------------------------------------------------------------------------------------------
# The index of a batch folder
# --------------------------------------------------------------------------------------------
def read_index(out_dir: Path) -> dict[str, dict]:
    """name -> {"prompt", "seed", "path"} of an existing DIR/index.csv (empty when absent)."""
    path = out_dir / INDEX_FILE
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UnlearnError(f"{path}: unreadable index ({e}); remove it or use --overwrite") from None
    out = {}
    for r in rows:
        if not all(k in r for k in INDEX_COLUMNS):
            raise UnlearnError(f"{path}: not an index written by unlearn-jax sample; remove it or use --overwrite")
        out[r["name"]] = {"prompt": r["prompt"], "seed": r["seed"], "path": r["path"]}
    return out


def write_index(out_dir: Path, rows: list[dict]):
    from unlearn_jax.atomic import atomic_file

    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(INDEX_COLUMNS)
    for r in rows:
        w.writerow([r["name"], r["prompt"], r["seed"], r["path"]])
    with atomic_file(out_dir / INDEX_FILE, "w") as f:
        f.write(buf.getvalue())


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
def _pos_int(flag: str, value):
    if value is None:
        return None
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise UnlearnError(f"{flag} {value!r} is not an integer") from None
    if v < 1:
        raise UnlearnError(f"{flag} {v} must be >= 1")
    return v


def _float(flag: str, value, positive: bool = False):
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UnlearnError(f"{flag} {value!r} is not a number") from None
    if not math.isfinite(v) or (positive and v <= 0):
        raise UnlearnError(f"{flag} {value!r} must be a finite{' positive' if positive else ''} number")
    return v


def _check_mode(a) -> str:
    if a.prompt is not None and a.prompts is not None:
        raise UnlearnError("give either --prompt (one video) or --prompts FILE.csv (a batch), not both")
    if a.prompt is None and a.prompts is None:
        raise UnlearnError("nothing to sample: give --prompt TEXT --out X.mp4, or --prompts FILE.csv --out-dir DIR")
    if a.prompt is not None:
        if a.out is None:
            raise UnlearnError("--prompt needs --out X.mp4")
        if a.out_dir is not None:
            raise UnlearnError("--out-dir is for --prompts; with --prompt use --out X.mp4")
        if a.png_frames:
            raise UnlearnError("--png-frames is for --prompts; with --prompt use --frames-dir DIR")
        if Path(a.out).suffix.lower() != ".mp4":
            raise UnlearnError(f"--out {a.out}: the video file name must end in .mp4")
        if Path(a.out).is_dir():
            raise UnlearnError(f"--out {a.out} is a folder; give a file name ending in .mp4")
        if Path(a.out).exists() and not a.overwrite:
            raise UnlearnError(f"--out {a.out} exists; pass --overwrite to replace it, or choose another file")
        if a.frames_dir is not None:
            from unlearn_jax.atomic import check_output_dir

            check_output_dir(a.frames_dir, a.overwrite, flag="--overwrite")  # a user's folder is never replaced
        return "single"
    if a.out_dir is None:
        raise UnlearnError("--prompts needs --out-dir DIR")
    if a.out is not None:
        raise UnlearnError("--out is for --prompt; with --prompts use --out-dir DIR")
    if a.frames_dir is not None:
        raise UnlearnError("--frames-dir is for --prompt; with --prompts use --png-frames (DIR/frames/<name>/)")
    out_dir = Path(a.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UnlearnError(f"--out-dir {a.out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / SETTINGS_FILE).is_file() \
            and not (out_dir / INDEX_FILE).is_file():
        # videos are named 0000.mp4 ...: never written into a folder of the user's
        raise UnlearnError(f"--out-dir {a.out_dir} holds files that unlearn-jax sample did not write; choose an "
                           "empty or new folder")
    return "batch"


def _plan(a):
    from unlearn_jax.generate import SamplingPlan

    return SamplingPlan.resolve(
        a.model, erasers=a.erasers, dtype=a.dtype, sampler=a.sampler, num_steps=_pos_int("--steps", a.steps),
        guidance_scale=_float("--guidance", a.guidance), use_dynamic_cfg=a.dynamic_cfg,
        num_frames=_pos_int("--num-frames", a.num_frames), height=_pos_int("--height", a.height),
        width=_pos_int("--width", a.width), noise=a.noise, vae_tiling=a.vae_tiling,
        batch_size=_pos_int("--batch-size", a.batch_size), true_cfg_scale=_float("--true-cfg", a.true_cfg),
        eraser_scale=_float("--eraser-scale", a.eraser_scale), guidance_scale_2=_float("--guidance-2", a.guidance_2))


def _run_settings(a, plan) -> dict:
    return {"model": str(Path(a.model).resolve()), "erasers": None if a.erasers is None else str(Path(a.erasers).resolve()),
            **plan.settings(), "negative_prompt": a.negative_prompt, "fps": a.fps}


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def register(sub):
    p = sub.add_parser(
        "sample", help="generate videos from prompts with a diffusers pipeline folder (JAX)",
        description="Generate videos with a diffusers pipeline folder (optionally with trained erasers): "
                    "one prompt (--prompt ... --out x.mp4) or a CSV of prompts (--prompts F.csv --out-dir DIR).")
    p.add_argument("--model", required=True, help="a diffusers pipeline folder (CogVideoX, ...; its family is read "
                                                  "from model_index.json / the transformer's config)")
    p.add_argument("--erasers", default=None, help="a folder of trained erasers to attach")
    p.add_argument("--prompt", default=None, help="one prompt (with --out)")
    p.add_argument("--out", default=None, help="the video to write (.mp4), with --prompt")
    p.add_argument("--frames-dir", default=None, help="with --prompt: also write every frame as a PNG here")
    p.add_argument("--prompts", default=None, help="a CSV with a 'prompt' column (with --out-dir)")
    p.add_argument("--out-dir", default=None, help="with --prompts: videos, index.csv and the settings go here")
    p.add_argument("--png-frames", action="store_true", help="with --prompts: also write PNG frames to DIR/frames/<name>/")
    p.add_argument("--overwrite", action="store_true",
                   help="--prompt: replace an existing --out file (and a --frames-dir this command wrote); --prompts: "
                        "regenerate videos that are already there")
    p.add_argument("--seed", default="42", help="seed of --prompt; with --prompts, seeds are --seed + row index "
                                                "unless the CSV has a seed or evaluation_seed column (default 42)")
    p.add_argument("--negative-prompt", default="", help="the unconditional prompt of guidance (default: empty)")
    p.add_argument("--steps", default=None, help="denoising steps (default: the pipeline's, 50 for CogVideoX)")
    p.add_argument("--guidance", default=None, help="guidance scale (default: the pipeline's, 6 for CogVideoX; "
                                                    "HunyuanVideo: the embedded guidance, 6)")
    p.add_argument("--guidance-2", default=None, help="Wan 2.2 A14B: the guidance of the low-noise expert's steps "
                                                      "(the pipeline's guidance_scale_2; default: --guidance)")
    p.add_argument("--eraser-scale", default=None, help="the erasers' output scale (the published scripts' eraser "
                                                        "weight; 0 = off); default: the eraser folder's (1)")
    p.add_argument("--true-cfg", default=None, help="HunyuanVideo: classifier-free guidance with --negative-prompt "
                                                    "over the embedded guidance (the pipeline's true_cfg_scale; "
                                                    "default 1 = off)")
    p.add_argument("--sampler", default=None,
                   help="the family's samplers (CogVideoX: ddim | dpm); default: the pipeline's (CogVideoX: ddim for "
                        "models without rotary embeddings (2B), dpm for RoPE models (5B, 1.5))")
    p.add_argument("--dynamic-cfg", default=None, action=argparse.BooleanOptionalAction,
                   help="the pipeline's cosine guidance ramp (default: on with dpm, off with ddim)")
    p.add_argument("--num-frames", default=None, help="frames per video (default: the model's, 49 for CogVideoX)")
    p.add_argument("--height", default=None, help="video height in pixels (default: the model's, 480)")
    p.add_argument("--width", default=None, help="video width in pixels (default: the model's, 720)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--noise", default="jax", choices=["jax", "torch"],
                   help="jax: jax.random.normal(key(seed)); torch: torch.Generator('cpu').manual_seed(seed) draws "
                        "exactly as diffusers (needs PyTorch)")
    p.add_argument("--batch-size", default="1", help="videos sampled together (default 1)")
    p.add_argument("--vae-tiling", default=None, action=argparse.BooleanOptionalAction,
                   help="decode large frames in tiles, as vae.enable_tiling() (default: on)")
    p.add_argument("--fps", default="8", help="frames per second of the MP4 (default 8, CogVideoX's)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(a) -> int:
    from unlearn_jax.prompt_sets import check_seed, load_prompt_set

    mode = _check_mode(a)
    a.fps = _float("--fps", a.fps, positive=True)
    seed = check_seed(a.seed, "--seed")
    if mode == "single":
        plan = _plan(a)
        return _single(a, plan, seed)
    rows = load_prompt_set(a.prompts, default_seed=seed)
    plan = _plan(a)
    return _batch(a, plan, rows)


def _generator(a, plan):
    from unlearn_jax.generate import VideoGenerator

    return VideoGenerator.from_plan(plan, progress=not a.no_progress)


def _single(a, plan, seed: int) -> int:
    from unlearn_jax.video_io import write_frames_png, write_mp4

    gen = _generator(a, plan)
    frames = gen.generate([a.prompt], [seed], a.negative_prompt)[0]
    out = write_mp4(a.out, frames, fps=a.fps)
    summary = {"video": str(out), "prompt": a.prompt, "seed": seed, "frames": int(frames.shape[0]),
               "height": int(frames.shape[1]), "width": int(frames.shape[2])}
    if a.frames_dir is not None:
        summary["frames_dir"] = str(write_frames_png(a.frames_dir, frames, overwrite=a.overwrite, flag="--overwrite"))
    summary["settings"] = _run_settings(a, plan)
    print(json.dumps(summary, indent=2))
    return 0


def _batch(a, plan, rows: list[dict]) -> int:
    from unlearn_jax.atomic import atomic_file
    from unlearn_jax.video_io import write_frames_png, write_mp4

    out_dir = Path(a.out_dir)
    settings = _run_settings(a, plan)
    settings_path = out_dir / SETTINGS_FILE
    previous = {}
    if not a.overwrite:
        if settings_path.is_file():
            try:
                old = json.loads(settings_path.read_text())
            except (OSError, ValueError) as e:
                raise UnlearnError(f"{settings_path}: unreadable ({e}); use --overwrite or another --out-dir") from None
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                k = diff[0]
                raise UnlearnError(f"{out_dir} holds videos sampled with other settings ({k}: {old.get(k)!r} there, "
                                   f"{settings.get(k)!r} now); use --overwrite to replace them or another --out-dir")
            previous = read_index(out_dir)
        elif (out_dir / INDEX_FILE).exists():
            raise UnlearnError(f"{out_dir} has an {INDEX_FILE} but no {SETTINGS_FILE}; use --overwrite or another "
                               "--out-dir")

    def done(r) -> bool:
        old = previous.get(r["name"])
        if old is None or old["prompt"] != r["prompt"] or old["seed"] != str(r["seed"]):
            return False
        if not (out_dir / f"{r['name']}.mp4").is_file():
            return False
        return not a.png_frames or (out_dir / "frames" / r["name"]).is_dir()

    finished = {r["name"] for r in rows if done(r)}
    todo = [r for r in rows if r["name"] not in finished]

    def index_rows():
        return [{**r, "path": f"{r['name']}.mp4"} for r in rows if r["name"] in finished]

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(settings_path, "w") as f:
        f.write(json.dumps(settings, indent=2) + "\n")
    write_index(out_dir, index_rows())
    if todo:
        gen = _generator(a, plan)
        for j, frames in gen.iter_videos([r["prompt"] for r in todo], [r["seed"] for r in todo], a.negative_prompt):
            r = todo[j]
            write_mp4(out_dir / f"{r['name']}.mp4", frames, fps=a.fps)
            if a.png_frames:
                write_frames_png(out_dir / "frames" / r["name"], frames, overwrite=True)  # inside our out-dir
            finished.add(r["name"])
            write_index(out_dir, index_rows())
    print(json.dumps({"out_dir": str(out_dir), "videos": len(rows), "generated": len(todo),
                      "skipped": len(rows) - len(todo), "index": str(out_dir / INDEX_FILE)}, indent=2))
    return 0


__all__ = ["read_index", "register", "write_index"]
