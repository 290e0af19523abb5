"""`unlearn-jax eval`: the original and the erased model on the same prompts and seeds, measured.

Published prompt sets (a real CogVideoX pipeline):
    unlearn-jax eval --model PIPELINE_DIR --erasers ERASERS_DIR --out-dir DIR \
        --prompts nudity_cogvideox [--prompts nudity-ring-a-bell | F.csv ...] --metrics nudity
writes DIR/per_frame.csv, summary.json, comparison.md (printed) and contact_sheet.png
(unlearn_jax.eval.protocol); `--save-videos` also keeps every video as DIR/videos/<model>/<set>/<name>.mp4.

The toy world (a pipeline folder with toy_world.json, e.g. assets/toy_world), no --prompts:
    unlearn-jax eval --model assets/toy_world --erasers ERASERS_DIR --out-dir DIR [--erased-concepts colour:red]
writes DIR/toy_eval.json (both models' rates and every prompt's detections), toy_eval.md (the
before/after table, printed) and toy_sheet.png (first videos of every concept, base above erased).
Without --erasers, only the original model is measured.
"""
from __future__ import annotations

from pathlib import Path

from unlearn_jax.errors import UnlearnError
from unlearn_jax.generation_args import add_generation_args, add_metric_args
from unlearn_jax.results_dir import check_results_dir, claim_results_dir


def register(sub):
    p = sub.add_parser("eval", help="measure the original and the erased model on prompt sets (or the toy world)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a diffusers pipeline folder (CogVideoX, ...; or the toy world's)")
    p.add_argument("--erasers", default=None, help="trained erasers; without it only the original model is measured")
    p.add_argument("--out-dir", required=True, help="results go here (reruns resume)")
    g = p.add_argument_group("prompt sets (real models)")
    g.add_argument("--prompts", action="append", default=[], help="a prompt CSV (repeatable; name = file stem)")
    g.add_argument("--prompt-column", default="prompt", help="the CSV column used as the prompt")
    g.add_argument("--limit", type=int, default=None, help="only the first N prompts of each set")
    g.add_argument("--save-videos", action="store_true", help="also write every video as an MP4")
    g.add_argument("--overwrite", action="store_true",
                   help="start over when --out-dir holds results made with other settings (default: refuse)")
    g.add_argument("--seed", type=int, default=42, help="seed of prompt i in sets without a seed column: seed + i")
    add_metric_args(p)
    add_generation_args(p)
    t = p.add_argument_group("toy world")
    t.add_argument("--n", type=int, default=64, help="prompts per concept and synonym split (default 64)")
    t.add_argument("--erased-concepts", nargs="*", default=[],
                   help="toy concepts the erasers remove (colour:red ...): judged <= 10%%, kept out of other prompts")
    p.add_argument("--attacks", nargs="*", default=[],
                   help="folders written by `unlearn-jax attack` on the same --model and --erasers: their success "
                        "rates join the table")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(a) -> int:
    model = Path(a.model)
    if not model.is_dir():
        raise UnlearnError(f"--model {model}: no such pipeline folder")
    if a.erasers is not None and not Path(a.erasers).is_dir():
        raise UnlearnError(f"--erasers {a.erasers}: no such folder")
    for name, v in (("--n", a.n), ("--batch-size", a.batch_size), ("--steps", a.sampling_steps), ("--limit", a.limit)):
        if v is not None and v < 1:
            raise UnlearnError(f"{name} must be >= 1, got {v}")
    from unlearn_jax.attacks.report import load_attacks

    if a.attacks and a.erasers is None:
        raise UnlearnError("--attacks needs --erasers (the erased model they attacked)")
    a.attack_results = load_attacks(a.attacks, model, a.erasers)  # checked before anything is generated
    if not a.prompts:
        if not (model / "toy_world.json").is_file():
            raise UnlearnError(f"{model} is not a toy-world pipeline: name the prompt sets to evaluate with --prompts "
                               "(a bundled set by name, e.g. nudity_cogvideox, or a CSV file)")
        return _toy(a, model)
    if a.erased_concepts:
        raise UnlearnError("--erased-concepts is for the toy world (no --prompts)")
    return _prompt_sets(a, model)


def _toy(a, model: Path) -> int:
    import numpy as np

    from unlearn_jax.toy import evaluate as E
    from unlearn_jax.video_io import write_png

    erased_concepts = E.check_concept_names(a.erased_concepts, "--erased-concepts")
    if erased_concepts and a.erasers is None:
        raise UnlearnError("--erased-concepts needs --erasers")
    _check_out_dir(Path(a.out_dir), "toy_eval.json")
    cfg = E.EvalConfig(n=a.n, num_steps=a.sampling_steps or E.EvalConfig.num_steps,
                       guidance_scale=E.EvalConfig.guidance_scale if a.guidance is None else a.guidance)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if a.erasers is None:
        net, sched, world_cfg, encode = E.load_pipeline(model)
        base = E.evaluate(net, sched, world_cfg, encode, cfg, keep_videos=True)
        videos = {"original": base.pop("videos")}
        result = {"model": str(model), "erasers": None, "original": base}
        table = E.format_table(base)
    else:
        both = E.evaluate_erasure(model, a.erasers, cfg, erased_concepts, keep_videos=True)
        base, erased = both["base"], both["erased"]
        videos = {"original": base.pop("videos"), "erased": erased.pop("videos")}
        result = {"model": str(model), "erasers": a.erasers, "original": base, "erased": erased,
                  "comparison": both["comparison"]}
        table = E.format_comparison(both["comparison"])
        if a.attack_results:
            from unlearn_jax.attacks.report import attack_table

            result["attacks"] = [{k: v for k, v in r.items() if k != "prompts"} for r in a.attack_results]
            table = f"{table}\n\n{attack_table(a.attack_results)}"
    E.write_results(out / "toy_eval.json", out / "toy_eval.md", result, table)
    first = [i for i, it in enumerate(base["items"]) if it["index"] == 0 and it["split"] == "train"]
    rows = np.concatenate([videos[k][first][:, None] for k in videos], axis=1).reshape(-1, *videos["original"].shape[1:])
    write_png(out / "toy_sheet.png", E.video_grid(rows))
    print(table)
    print(f"wrote {out / 'toy_eval.json'}, {out / 'toy_eval.md'}, {out / 'toy_sheet.png'}")
    return 0


def _prompt_sets(a, model: Path) -> int:
    from unlearn_jax.eval.protocol import evaluate_prompt_sets, load_prompt_set, prompt_set_name
    from unlearn_jax.generation_args import build_metrics_from_args, generators, resolve_plan

    sets = {}
    for path in a.prompts:
        name = prompt_set_name(path)
        if name in sets:
            raise UnlearnError(f"--prompts: two prompt sets are named {name!r}")
        sets[name] = load_prompt_set(path, limit=a.limit, prompt_column=a.prompt_column, default_seed=a.seed)
    metrics = build_metrics_from_args(a)
    plan = resolve_plan(a, model)
    gens = generators(plan, progress=not a.no_progress)

    def fn(gen):
        return lambda prompts, seeds: gen.generate(prompts, seeds, a.negative_prompt)

    on_videos = None
    if a.save_videos:
        from unlearn_jax.video_io import write_mp4

        def on_videos(model_name, set_name, items, videos):
            for it, v in zip(items, videos):
                write_mp4(Path(a.out_dir) / "videos" / model_name / set_name / f"{it.get('name', it['index'])}.mp4", v)

    settings = {"model": str(model), "erasers": a.erasers, "generation": plan.settings(),
                "negative_prompt": a.negative_prompt}
    _claim_out_dir(Path(a.out_dir), settings, a.overwrite)
    evaluate_prompt_sets({k: fn(g) for k, g in gens.items()}, sets, metrics, a.out_dir, batch_size=a.batch_size,
                         settings=settings, on_videos=on_videos)
    print(f"wrote {Path(a.out_dir) / 'summary.json'}, per_frame.csv, comparison.md, contact_sheet.png")
    if a.attack_results:
        from unlearn_jax.atomic import atomic_file
        from unlearn_jax.attacks.report import attack_table

        table = attack_table(a.attack_results)
        with atomic_file(Path(a.out_dir) / "attacks.md", "w") as f:
            f.write(table + "\n")
        print(table)
        print(f"wrote {Path(a.out_dir) / 'attacks.md'}")
    return 0


SETTINGS_FILE = "eval_settings.json"


def _check_out_dir(out: Path, ours: str):
    """The results are written under fixed names: never into a file or into a folder of the user's (one
    that holds files but not `ours`, the file an earlier evaluation there wrote)."""
    check_results_dir(out, [ours], flag="--out-dir", command="eval")


def _claim_out_dir(out: Path, settings: dict, overwrite: bool):
    """Records the generation settings in out/eval_settings.json. Stored per-video results are
    reused on a rerun only when they were made with the same settings (the protocol itself checks
    prompts, seeds and metric settings)."""
    claim_results_dir(out, SETTINGS_FILE, settings, overwrite, flag="--out-dir", command="eval",
                      results=("records", "videos"))


__all__ = ["register"]
