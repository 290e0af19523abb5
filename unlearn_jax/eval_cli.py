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

Inference-time baselines (no --erasers): `--method negative-prompt` (the concept's words as the
negative prompt) or `--method safree` (SAFREE-style filtering of the prompt conditioning,
`baselines.safree`) against the original model, with `--concept-words W ...` (toy world: default the
erased concepts' train synonyms); the results are written as above, the method's model named after it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from unlearn_jax.errors import UnlearnError
from unlearn_jax.baselines import INFERENCE_METHODS
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
    b = p.add_argument_group("baselines (inference-time methods, compared with the original model)")
    b.add_argument("--method", choices=("erasers",) + INFERENCE_METHODS, default=None,
                   help="erasers (default with --erasers): the trained erasers; negative-prompt: the concept's words "
                        "as the negative prompt; safree: SAFREE-style filtering of the prompt conditioning")
    b.add_argument("--concept-words", nargs="+", default=None,
                   help="the words that describe the concept, for negative-prompt and safree (toy world: default the "
                        "erased concepts' train synonyms)")
    b.add_argument("--safree-window", type=float, default=None,
                   help="safree: the fraction of the denoising steps that see the filtered prompt (default 0.26)")
    b.add_argument("--safree-filter-only", action="store_true",
                   help="safree: the filtering alone, without the concept's words as the negative prompt")
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
    _check_method(a)
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


def _check_method(a):
    """--method / --erasers / --concept-words agree (one line each)."""
    if a.method is None:
        a.method = "erasers" if a.erasers is not None else None
    if a.method == "erasers" and a.erasers is None:
        raise UnlearnError("--method erasers needs --erasers DIR")
    if a.method in INFERENCE_METHODS:
        if a.erasers is not None:
            raise UnlearnError(f"--method {a.method} is an inference-time baseline on the original model: drop --erasers")
        if a.attacks:
            raise UnlearnError("--attacks measure trained erasers: use them with --erasers")
        if a.negative_prompt:
            raise UnlearnError(f"--method {a.method} makes its own negative prompt from the concept's words: "
                               "drop --negative-prompt")
        if a.prompts and not a.concept_words:
            raise UnlearnError(f"--method {a.method}: name the concept's words with --concept-words (e.g. nudity naked)")
    elif a.concept_words is not None or a.safree_window is not None or a.safree_filter_only:
        raise UnlearnError("--concept-words and the --safree-* options are for --method negative-prompt / safree")
    if a.safree_window is not None and (a.method != "safree" or not 0.0 <= a.safree_window <= 1.0):
        raise UnlearnError(f"--safree-window is a fraction in [0, 1] for --method safree; got {a.safree_window}")
    if a.safree_filter_only and a.method != "safree":
        raise UnlearnError("--safree-filter-only is an option of --method safree")


def _safree_config(a, joiner: str = ", "):
    from unlearn_jax.baselines.safree import SafreeConfig

    window = SafreeConfig.max_window if a.safree_window is None else a.safree_window
    return SafreeConfig(max_window=window, adaptive=False, joiner=joiner, negative_prompt=not a.safree_filter_only)


def _toy(a, model: Path) -> int:
    import numpy as np

    from unlearn_jax.toy import evaluate as E
    from unlearn_jax.toy import methods as M
    from unlearn_jax.video_io import write_png

    erased_concepts = E.check_concept_names(a.erased_concepts, "--erased-concepts")
    if erased_concepts and a.method is None:
        raise UnlearnError("--erased-concepts needs --erasers (or --method negative-prompt / safree)")
    words = a.concept_words
    if a.method in INFERENCE_METHODS and words is None:
        if not erased_concepts:
            raise UnlearnError(f"--method {a.method}: name the concept with --erased-concepts (or --concept-words)")
        words = M.concept_words(erased_concepts)
    _check_out_dir(Path(a.out_dir), "toy_eval.json")
    cfg = E.EvalConfig(n=a.n, num_steps=a.sampling_steps or E.EvalConfig.num_steps,
                       guidance_scale=E.EvalConfig.guidance_scale if a.guidance is None else a.guidance)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if a.method is None:
        net, sched, world_cfg, encode = E.load_pipeline(model)
        base = E.evaluate(net, sched, world_cfg, encode, cfg, keep_videos=True)
        videos = {"original": base.pop("videos")}
        result = {"model": str(model), "erasers": None, "original": base}
        table = E.format_table(base)
    else:
        if a.method == "erasers":
            both = E.evaluate_erasure(model, a.erasers, cfg, erased_concepts, keep_videos=True)
        else:
            both = M.evaluate_method(model, a.method, words, cfg, erased_concepts, keep_videos=True,
                                     safree_cfg=_safree_config(a, joiner=" ") if a.method == "safree" else None)
        base, erased = both["base"], both["erased"]
        videos = {"original": base.pop("videos"), "erased": erased.pop("videos")}
        result = {"model": str(model), "method": a.method, "erasers": a.erasers, "concept_words": words,
                  "safree": None if a.method != "safree" else dataclasses.asdict(_safree_config(a, joiner=" ")),
                  "original": base, "erased": erased, "comparison": both["comparison"]}
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
    if a.method == "safree":
        from unlearn_jax.families.base import TextSide

        text_cls = type(plan.folder.family.text(plan.folder.root))
        if text_cls.token_encoder is TextSide.token_encoder:
            raise UnlearnError(f"--method safree re-encodes prompts token by token: {plan.folder.family.title}'s text "
                               "side does not offer that (the negative-prompt baseline runs on it)")
    gens = generators(plan, progress=not a.no_progress)

    def fn(gen, negative_prompt=a.negative_prompt):
        return lambda prompts, seeds: gen.generate(prompts, seeds, negative_prompt)

    fns = {k: fn(g) for k, g in gens.items()}
    if a.method in INFERENCE_METHODS:
        gen = gens["original"]
        if a.method == "negative-prompt":
            fns["negative-prompt"] = fn(gen, ", ".join(a.concept_words))
        else:
            from unlearn_jax.baselines.safree import Safree

            text = plan.folder.family.text(plan.folder.root, cache=gen.encoder_cache)
            safree = Safree(text.token_encoder(dtype=gen.dtype), gen.encode, a.concept_words, _safree_config(a))
            fns["safree"] = lambda prompts, seeds: gen.generate(
                seeds=seeds, conditioning=safree.conditioning(prompts, gen.num_steps)[0])

    on_videos = None
    if a.save_videos:
        from unlearn_jax.video_io import write_mp4

        def on_videos(model_name, set_name, items, videos):
            for it, v in zip(items, videos):
                write_mp4(Path(a.out_dir) / "videos" / model_name / set_name / f"{it.get('name', it['index'])}.mp4", v)

    settings = {"model": str(model), "erasers": a.erasers, "generation": plan.settings(),
                "negative_prompt": a.negative_prompt, "method": a.method, "concept_words": a.concept_words,
                "safree_window": a.safree_window, "safree_filter_only": a.safree_filter_only}
    _claim_out_dir(Path(a.out_dir), settings, a.overwrite)
    evaluate_prompt_sets(fns, sets, metrics, a.out_dir, batch_size=a.batch_size,
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
