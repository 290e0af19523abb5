"""`unlearn-jax attack`: red-team attacks on an erased model (see `unlearn_jax.attacks`).

The toy world (a folder with toy_world.json; the toy detector judges the videos):
    unlearn-jax attack --model assets/toy_world --erasers RUN/export/erasers --concept colour:red \
        --method tokens|soft|ring-a-bell --out DIR

A real pipeline folder (CogVideoX, Wan, HunyuanVideo; NudeNet judges the videos), the attacked prompts
from a prompt set (ring-a-bell: the set's benign counterparts, the bundled nudity-ring-a-bell's
"normal prompt"):
    unlearn-jax attack --model PIPELINE_DIR --erasers ERASERS_DIR --concept nudity \
        --prompts nudity-ring-a-bell --method tokens|soft|ring-a-bell --out DIR [--n-prompts 8 --seeds 1]

writes DIR/attack.json (settings, every attacked prompt with its loss history, the success rates),
DIR/prompts.jsonl (one adversarial prompt per line, with the loss it reached), DIR/adversarial.csv (the
typable prompts with their seeds, for `unlearn-jax eval --prompts`), DIR/attack.md (the table: the
concept's success rate without and under attack, for the original and the erased model, with Wilson 95%
intervals and the broken-video fraction (toy) or the per-frame nudity rate (NudeNet)); the toy world also
DIR/attack_sheet.png (each adversarial prompt's first video, the original model's above the erased
one's), a real pipeline DIR/measure/ (the evaluation's records, per_frame.csv, summary.json,
contact_sheet.png; a rerun resumes there) and, for soft, DIR/soft/<index>.npz (the conditionings).
`unlearn-jax eval --attacks DIR` adds the rates to its table.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from unlearn_jax.generation_args import add_generation_args, add_metric_args


def register(sub):
    p = sub.add_parser("attack", help="red-team attacks on an erased model (soft / tokens / ring-a-bell)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the base pipeline folder")
    p.add_argument("--erasers", required=True, help="the erasers to attack (ours or the published format)")
    p.add_argument("--concept", required=True, help="the erased concept (toy world: attribute:value, e.g. colour:red; "
                                                    "a real pipeline: its name, e.g. nudity)")
    p.add_argument("--method", default="tokens", help="soft | tokens | ring-a-bell (default tokens)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-prompts", type=int, default=8, help="attacked prompts (default 8; a real pipeline: the "
                                                            "first of --prompts)")
    p.add_argument("--seeds", type=int, default=None, help="videos per adversarial prompt and model (default: 8 in "
                                                           "the toy world, 1 on a real pipeline)")
    p.add_argument("--n-tokens", type=int, default=3, help="tokens / ring-a-bell: tokens added (default 3)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default: soft 100, tokens 20, "
                                                           "ring-a-bell 30)")
    p.add_argument("--strength", type=float, default=None, help="ring-a-bell: how far along the concept vector "
                                                                "(default 6 in the toy world, 3 on a real pipeline)")
    p.add_argument("--start", default="concept", help="soft / tokens: start from the prompt naming the concept "
                                                    "(concept, default) or from its benign counterpart (benign)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier attack's files in --out")
    p.add_argument("--no-progress", action="store_true")
    r = p.add_argument_group("real pipelines: the attacked prompts")
    r.add_argument("--prompts", default=None, help="a prompt CSV or a bundled set (nudity-ring-a-bell, "
                                                   "nudity_cogvideox, ...)")
    r.add_argument("--prompt-column", default="prompt", help="the CSV column of the prompts naming the concept")
    r.add_argument("--benign-column", default="normal prompt", help="the CSV column of each prompt's benign "
                                                                    "counterpart (ring-a-bell, --start benign)")
    r.add_argument("--save-videos", action="store_true", help="also write every video as an MP4 under DIR/videos")
    add_metric_args(p)
    add_generation_args(p, steps_flag="--sampling-steps")
    p.set_defaults(func=run)


SETTINGS_FILE = "attack_settings.json"  # written first: the folder is an attack's even before attack.json


def _check_out(out: Path, overwrite: bool):
    from unlearn_jax.errors import UnlearnError
    from unlearn_jax.results_dir import check_results_dir

    check_results_dir(out, ["attack.json", SETTINGS_FILE], flag="--out", command="attack")
    if (out / "attack.json").exists() and not overwrite:
        raise UnlearnError(f"--out {out} holds an earlier attack (attack.json); pass --overwrite to replace it")


def run(a) -> int:
    from unlearn_jax.attacks.report import format_results, write_outputs
    from unlearn_jax.errors import UnlearnError

    model, erasers, out = Path(a.model), Path(a.erasers), Path(a.out)
    if not model.is_dir():
        raise UnlearnError(f"--model {model}: no such folder")
    if not erasers.is_dir():
        raise UnlearnError(f"--erasers {erasers}: no such folder")
    common = dict(method=a.method, n_prompts=a.n_prompts, n_tokens=a.n_tokens, steps=a.steps, seed=a.seed,
                  start=a.start)
    if a.seeds is not None:
        common["seeds"] = a.seeds
    if a.strength is not None:
        common["strength"] = a.strength
    if (model / "toy_world.json").is_file():
        result = _toy(a, model, erasers, out, common)
    else:
        result = _checkpoint(a, model, out, common)
    write_outputs(out, result)
    print(format_results(result))
    print(f"wrote {out / 'attack.json'}, attack.md, prompts.jsonl")
    return 0


def _toy(a, model, erasers, out, common):
    from unlearn_jax.attacks.toy import ToyAttackConfig, run_toy_attack
    from unlearn_jax.errors import UnlearnError
    from unlearn_jax.toy.evaluate import check_concept_names

    if a.prompts is not None:
        raise UnlearnError("--prompts is for real pipelines; the toy world's attacked prompts are its captions")
    cfg = ToyAttackConfig(**common)
    check_concept_names([a.concept], "--concept")
    _check_out(out, a.overwrite)

    def progress(i, n, rec):
        if not a.no_progress:
            shown = rec.get("adversarial", "(soft conditioning)")
            print(f"[{i}/{n}] loss {rec['loss_start']:.4g} -> {rec['loss']:.4g}: {shown}", flush=True)

    return run_toy_attack(model, erasers, a.concept, cfg, progress=progress)


def _checkpoint(a, model, out, common):
    from unlearn_jax.attacks.checkpoint import CheckpointAttackConfig, require_nudity, run_checkpoint_attack
    from unlearn_jax.errors import UnlearnError
    from unlearn_jax.generation_args import build_metrics_from_args, resolve_plan
    from unlearn_jax.prompt_sets import column_key, load_prompt_set

    if a.prompts is None:
        raise UnlearnError(f"--model {model} is not a toy-world folder: name the attacked prompts with --prompts "
                           "(a CSV, or a bundled set such as nudity-ring-a-bell)")
    cfg = CheckpointAttackConfig(**common, benign_column=column_key(a.benign_column))
    items = load_prompt_set(a.prompts, limit=cfg.n_prompts, prompt_column=a.prompt_column)
    plan = resolve_plan(a, model)   # every generation option checked before any weight is read
    require_nudity([m.strip() for m in a.metrics.split(",")])  # before the metrics' models load
    metrics = build_metrics_from_args(a)
    _check_out(out, a.overwrite)
    _claim(out, {"model": str(model.resolve()), "erasers": str(Path(a.erasers).resolve()), "concept": a.concept,
                 "prompts": a.prompts, "config": dataclasses.asdict(cfg), "generation": plan.settings(),
                 "negative_prompt": a.negative_prompt}, a.overwrite)
    on_videos = None
    if a.save_videos:
        from unlearn_jax.video_io import write_mp4

        def on_videos(model_name, set_name, its, videos):
            for it, v in zip(its, videos):
                write_mp4(out / "videos" / model_name / set_name / f"{it['name']}.mp4", v)

    return run_checkpoint_attack(plan, items, a.concept, cfg, metrics, out, negative_prompt=a.negative_prompt,
                                 progress=not a.no_progress, on_videos=on_videos)


def _claim(out: Path, settings: dict, overwrite: bool):
    """Records the attack's settings in out/attack_settings.json. An interrupted run with the same settings
    resumes its measurement (out/measure); other settings need --overwrite, which removes the earlier
    measurement, videos and soft conditionings (folders this command wrote)."""
    from unlearn_jax.results_dir import claim_results_dir

    claim_results_dir(out, SETTINGS_FILE, settings, overwrite, flag="--out", command="attack",
                      results=("measure", "videos", "soft"))
