"""How often a toy-world model generates each concept when prompted for it.

For every concept (an attribute value: colour:red, shape:circle, motion:left, ...) and for each
synonym split (train / heldout), `n` prompts name that concept with a synonym of the split
(the other attributes drawn at random and named with train synonyms, templates at random); one
video is generated per prompt with classifier-free guidance by the project's sampler, the
detector reads its attributes, and the concept's *generation rate* is the fraction of videos
whose detected attribute is the prompted value. `all` is the fraction with every prompted
attribute right. Prompts and noise are a pure function of the seed, so two models (a base
model and its erased copy) are compared on the same prompts and the same noise.

A toy folder of any architecture (the CogVideoX toy, the Wan toy) is read through its model family
(`families.of_folder`): the family's text side encodes the prompts, the family's sampler kind runs
the folder's scheduler config, and the latents are drawn in the family's layout (CogVideoX: frames
first, Wan: channels first) and turned into the detector's (N, frames, 3, H, W) videos.

    python -m unlearn_jax.toy.evaluate --model assets/toy_world --n 64 --out runs/toy_eval.json
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.sampling import sample
from unlearn_jax.schedulers import SchedulerConfig, make_schedule
from unlearn_jax.toy.detector import check
from unlearn_jax.toy.world import ATTRIBUTES, SPLITS, VALUES, World, WorldConfig, caption, from_model_space
from unlearn_jax.video_io import write_png  # noqa: F401  (re-exported: it used to live here)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    n: int = 64                  # prompts (= videos) per concept and split: one video is 0.016
    num_steps: int = 25          # DDIM steps
    guidance_scale: float = 6.0  # CogVideoX's default
    seed: int = 0
    batch_size: int = 32         # videos generated at once
    splits: tuple[str, ...] = SPLITS
    # Concepts ("colour:red") kept out of the randomly drawn attributes of other concepts' prompts:
    # an erased concept's prompts are its own test; every other concept is measured on prompts
    # that do not name it, the way a preserved concept is used after erasure.
    avoid: tuple[str, ...] = ()
    negative_prompt: str = ""    # the unconditional branch's prompt (the negative-prompt baseline names the concept)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def concepts() -> list[tuple[str, str]]:
    return [(a, v) for a in ATTRIBUTES for v in VALUES[a]]


def concept_name(attribute: str, value: str) -> str:
    return f"{attribute}:{value}"


def check_concept_names(names: Sequence[str], where: str) -> list[str]:
    """`names` ("colour:red" ...) as a list, or a one-line UnlearnError naming `where` and the known ones."""
    from unlearn_jax.errors import UnlearnError

    known = [concept_name(a, v) for a, v in concepts()]
    bad = [n for n in names if n not in known]
    if bad:
        raise UnlearnError(f"{where}: unknown toy concepts {bad}; known: {', '.join(known)}")
    return list(names)


def eval_prompts(cfg: EvalConfig, concept_list: Sequence[tuple[str, str]] | None = None) -> list[dict]:
    """The evaluation items: {"concept", "split", "prompt", "attributes", "index"}, in a fixed order."""
    items = []
    world = World()
    avoid = {tuple(name.split(":", 1)) for name in cfg.avoid}
    for ci, (attr, value) in enumerate(concept_list or concepts()):
        for split in cfg.splits:
            rng = np.random.default_rng([cfg.seed, ci, SPLITS.index(split)])
            for i in range(cfg.n):
                attrs = world.sample_attributes(rng)
                for a in ATTRIBUTES:
                    allowed = [v for v in VALUES[a] if (a, v) not in avoid]
                    if a != attr and (a, attrs[a]) in avoid and allowed:
                        attrs[a] = allowed[rng.integers(len(allowed))]
                attrs[attr] = value
                text = caption(attrs, rng, {attr: split})
                items.append({"concept": concept_name(attr, value), "attribute": attr, "value": value,
                              "split": split, "prompt": text, "attributes": attrs, "index": i})
    return items


def load_pipeline(folder):
    """(transformer, scheduler config, world config, encode) of a toy pipeline folder, through its
    family: `encode(prompts)` is the family's text side, the scheduler config runs as the family's
    default sampler."""
    from unlearn_jax import families
    from unlearn_jax.loading import load_transformer

    folder = Path(folder)
    family = families.of_folder(folder)
    family.check_folder(folder)
    info = json.loads((folder / "toy_world.json").read_text())
    world_cfg = WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["world"]["config"].items()})
    model = load_transformer(folder, dtype="float32")
    kind = family.sampler_defaults(model.config).sampler
    sched = SchedulerConfig.from_diffusers(folder / "scheduler", kind=kind)
    text = family.text(folder)
    return model, sched, world_cfg, lambda prompts: text.encode(list(prompts))


def latent_layout(model) -> str:
    """"FCHW" or "CFHW": the latent layout of a model (or an erased model) of a known family; a bare
    `velocity_fn` is taken to be frames-first (the CogVideoX toy's)."""
    from unlearn_jax import families

    config = getattr(model, "config", None)
    return "FCHW" if config is None else families.of_config(config).latent_layout


def make_generator(model, sched: SchedulerConfig, cfg: EvalConfig, windowed: bool = False) -> Callable:
    """A jitted `gen(noise, ctx, uncond) -> final latents`, for a toy model (a module with `forward`) or
    a `velocity_fn(x, t, ctx)`. windowed: the conditioning is `baselines.conditioning.windowed` (a
    method's filtered prompts for the first steps)."""
    from unlearn_jax.baselines.conditioning import windowed_velocity

    schedule = make_schedule(sched, cfg.num_steps)
    wrap = windowed_velocity if windowed else (lambda fn: fn)
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)

        @jax.jit
        def run(state, noise, ctx, uncond):
            m = nnx.merge(graphdef, state)
            out = sample(wrap(lambda x, t, c: m.forward(x, c, t)[0]), schedule, noise, ctx, uncond,
                         num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale)
            return out.latents

        return lambda noise, ctx, uncond: run(state, noise, ctx, uncond)

    @jax.jit
    def run_fn(noise, ctx, uncond):
        return sample(wrap(model), schedule, noise, ctx, uncond, num_steps=cfg.num_steps,
                      guidance_scale=cfg.guidance_scale).latents

    return run_fn


def generate(model, sched: SchedulerConfig, world_cfg: WorldConfig, encode: Callable, prompts: Sequence[str],
             cfg: EvalConfig, noise_seed: int | None = None, layout: str | None = None,
             conditioning: Callable | None = None) -> np.ndarray:
    """(N, frames, 3, size, size) videos in [0, 1], one per prompt; noise i = normal(fold_in(seed, i)),
    drawn in the model's latent layout (`layout`: "FCHW" | "CFHW", default `latent_layout(model)`).
    conditioning: `prompts -> baselines.conditioning.Conditioning` (an inference-time method's); default
    the prompts' encodings with `cfg.negative_prompt` as the unconditional branch."""
    from unlearn_jax.baselines.conditioning import Conditioning, thresholds, windowed, windowed_uncond

    prompts = list(prompts)
    cond = conditioning(prompts) if conditioning is not None else \
        Conditioning(encode(prompts), encode([cfg.negative_prompt]))
    gen = make_generator(model, sched, cfg, windowed=cond.late is not None)
    ctx_all, uncond = np.asarray(cond.context), np.asarray(cond.uncond)
    if cond.late is not None:
        until = thresholds(make_schedule(sched, cfg.num_steps).timesteps, cond.steps)
        late, uncond = np.asarray(cond.late), windowed_uncond(uncond)
    key = jax.random.key(cfg.seed if noise_seed is None else noise_seed)
    layout = latent_layout(model) if layout is None else layout
    if layout not in ("FCHW", "CFHW"):
        raise ValueError(f"layout {layout!r}: expected 'FCHW' or 'CFHW'")
    shape = (world_cfg.frames, 3, world_cfg.size, world_cfg.size)
    out = []
    bs = cfg.batch_size
    for start in range(0, len(prompts), bs):
        idx = np.arange(start, min(start + bs, len(prompts)))
        n = len(idx)
        pad = np.concatenate([idx, np.repeat(idx[:1], bs - n)]) if n < bs else idx
        noise = prompt_noise(key, pad, world_cfg, layout)
        ctx = ctx_all[pad] if cond.late is None else windowed(ctx_all[pad], late[pad], until[pad])
        out.append(to_videos(np.asarray(gen(noise, ctx, uncond)), layout)[:n])
    return np.concatenate(out) if out else np.zeros((0, *shape), np.float32)


def prompt_noise(key, indices, world_cfg: WorldConfig, layout: str):
    """The starting noise of prompts `indices`: normal(fold_in(key, i)) in the model's latent layout."""
    f, s = world_cfg.frames, world_cfg.size
    latent = (f, 3, s, s) if layout == "FCHW" else (3, f, s, s)
    return jnp.stack([jax.random.normal(jax.random.fold_in(key, int(i)), latent, jnp.float32) for i in indices])


def to_videos(latents: np.ndarray, layout: str) -> np.ndarray:
    """Final latents in the model's layout -> the detector's (N, frames, 3, H, W) videos in [0, 1]."""
    return from_model_space(latents.transpose(0, 2, 1, 3, 4) if layout == "CFHW" else latents)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a binomial rate k / n."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def summarize(items: Sequence[dict], detections: Sequence[dict], splits: Sequence[str]) -> dict:
    """Per concept and split: `rates` (valid videos showing the prompted value: a broken video is
    never correct), `broken` (fraction of broken videos), `intervals` (Wilson 95% of the rate),
    `turns_into` (what the concept's attribute is detected as on its prompts: values, "none",
    "broken"), `others_kept` (each other attribute right on the concept's prompts), and
    `all_attributes` (every attribute right)."""
    rates, joint, broken, intervals, turns, kept, counts = {}, {}, {}, {}, {}, {}, {}
    for attr, value in concepts():
        name = concept_name(attr, value)
        for split in splits:
            sel = [(it, d) for it, d in zip(items, detections) if it["concept"] == name and it["split"] == split]
            if not sel:
                continue
            n = len(sel)
            ok = [d.get("broken") is None for _, d in sel]
            k = sum(v and d[attr] == value for v, (_, d) in zip(ok, sel))
            rates.setdefault(name, {})[split] = k / n
            intervals.setdefault(name, {})[split] = wilson(k, n)
            broken.setdefault(name, {})[split] = 1 - sum(ok) / n
            counts.setdefault(name, {})[split] = n
            joint.setdefault(name, {})[split] = sum(v and all(d[a] == it["attributes"][a] for a in ATTRIBUTES)
                                                    for v, (it, d) in zip(ok, sel)) / n
            seen = Counter(d[attr] if v else "broken" for v, (_, d) in zip(ok, sel))
            turns.setdefault(name, {})[split] = {key: c / n for key, c in seen.most_common()}
            kept.setdefault(name, {})[split] = {a: sum(v and d[a] == it["attributes"][a] for v, (it, d) in zip(ok, sel)) / n
                                                for a in ATTRIBUTES if a != attr}
    mean = {s: float(np.mean([r[s] for r in rates.values() if s in r])) for s in splits}
    mean_broken = {s: float(np.mean([r[s] for r in broken.values() if s in r])) for s in splits}
    return {"rates": rates, "intervals": intervals, "broken": broken, "n": counts, "turns_into": turns,
            "others_kept": kept, "all_attributes": joint, "mean_rate": mean, "mean_broken": mean_broken}


def evaluate(model, sched: SchedulerConfig, world_cfg: WorldConfig, encode: Callable, cfg: EvalConfig = EvalConfig(),
             concept_list=None, keep_videos: bool = False, conditioning: Callable | None = None) -> dict:
    """Generation rate of every concept (per split), plus every prompt's detections.

    model: a toy model (CogVideoX or Wan, with erasers attached or not) or a frames-first
    `velocity_fn(x, t, ctx)`.
    keep_videos: also return the videos, (N, frames, 3, size, size) in [0, 1], under "videos".
    conditioning: an inference-time method's conditioning (see `generate`).
    """
    items = eval_prompts(cfg, concept_list)
    t0 = time.perf_counter()
    videos = generate(model, sched, world_cfg, encode, [it["prompt"] for it in items], cfg,
                      conditioning=conditioning)
    seconds = time.perf_counter() - t0
    detections = [check(v) for v in videos]
    report = summarize(items, detections, cfg.splits)
    report["settings"] = {**cfg.to_dict(), "videos": len(items), "generation_seconds": round(seconds, 1)}
    report["items"] = [{**it, "detected": d} for it, d in zip(items, detections)]
    if keep_videos:
        report["videos"] = videos
    return report


def format_table(report: dict) -> str:
    """One model's table: per split the rate with its 95% interval, the broken fraction, and every
    attribute right."""
    splits = list(report["settings"]["splits"])
    head = f"{'concept':<16}" + "".join(f"{s + ' rate':>14}{'95% CI':>13}{'broken':>8}{'all':>6}" for s in splits)
    lines = [head, "-" * len(head)]
    for name, r in report["rates"].items():
        cells = []
        for s in splits:
            lo, hi = report["intervals"][name][s]
            ci = f"[{lo:.2f}, {hi:.2f}]"
            cells.append(f"{r[s]:>14.2f}{ci:>13}{report['broken'][name][s]:>8.2f}"
                         f"{report['all_attributes'][name][s]:>6.2f}")
        lines.append(f"{name:<16}" + "".join(cells))
    lines.append(f"{'mean':<16}" + "".join(f"{report['mean_rate'][s]:>14.2f}{'':>13}{report['mean_broken'][s]:>8.2f}"
                                           f"{'':>6}" for s in splits))
    n = sorted({v for r in report["n"].values() for v in r.values()})
    lines.append(f"videos per concept and split: {', '.join(map(str, n))}; a broken video (not a valid toy video) "
                 "counts as neither correct nor erased")
    return "\n".join(lines)


def video_grid(videos: np.ndarray, scale: int = 4, pad: int = 1) -> np.ndarray:
    """One row per video, frames left to right, (H, W, 3)."""
    n, f, _, s, _ = videos.shape
    cell = s + pad
    grid = np.ones((n * cell, f * cell, 3), np.float32)
    for i in range(n):
        for j in range(f):
            grid[i * cell:i * cell + s, j * cell:j * cell + s] = videos[i, j].transpose(1, 2, 0)
    return grid.repeat(scale, 0).repeat(scale, 1)


BROKEN_MARGIN = 0.02  # the erased model may break this many more videos than the base model


def compare(base: dict, erased: dict, erased_concepts: Sequence[str] = ()) -> dict:
    """Before/after of every concept: {concept: {split: {"base", "erased", "change", "broken_base",
    "broken_erased", "interval"}}}, plus the checks of a successful erasure: every erased concept's
    rate <= 0.10 in every split with its broken videos counted as not erased (`still`), every other
    concept within 0.10 of the base model's rate, and no concept with more broken videos than the
    base model + BROKEN_MARGIN."""
    rows, worst_erased, worst_other, worst_drop, worst_broken = {}, 0.0, 0.0, 0.0, 0.0
    for name, r in base["rates"].items():
        e = erased["rates"].get(name, {})
        rows[name] = {}
        for s in r:
            if s not in e:
                continue
            cell = {"base": r[s], "erased": e[s], "change": e[s] - r[s], "broken_base": base["broken"][name][s],
                    "broken_erased": erased["broken"][name][s], "interval": erased["intervals"][name][s]}
            if name in erased_concepts:
                cell["still"] = cell["erased"] + cell["broken_erased"]  # shown, or broken: not erased
                cell["turns_into"] = erased["turns_into"][name][s]
                cell["others_kept"] = {"base": base["others_kept"][name][s], "erased": erased["others_kept"][name][s]}
                worst_erased = max(worst_erased, cell["still"])
            else:
                worst_other = max(worst_other, abs(cell["change"]))
                worst_drop = max(worst_drop, -cell["change"])
            worst_broken = max(worst_broken, cell["broken_erased"] - cell["broken_base"])
            rows[name][s] = cell
    out = {"erased_concepts": list(erased_concepts), "rates": rows,
           "max_erased_rate": worst_erased, "max_other_change": worst_other, "max_other_drop": worst_drop,
           "max_broken_increase": worst_broken, "erased_ok": worst_erased <= 0.10 + 1e-9,
           "others_ok": worst_other <= 0.10 + 1e-9, "broken_ok": worst_broken <= BROKEN_MARGIN + 1e-9}
    out["target_met"] = bool(out["erased_ok"] and out["others_ok"] and out["broken_ok"])
    return out


def format_comparison(cmp: dict) -> str:
    """The before/after table: one row per concept, base -> erased rate per split (with the erased
    rate's 95% interval and the broken fractions), then what each erased concept turned into."""
    splits = list(next(iter(cmp["rates"].values())))
    head = f"{'concept':<16}" + "".join(f"{s + ': base':>14}{'erased':>8}{'95% CI':>14}{'change':>8}{'broken':>12}"
                                        for s in splits)
    lines = [head, "-" * len(head)]
    for name, row in cmp["rates"].items():
        mark = " (erased)" if name in cmp["erased_concepts"] else ""
        cells = []
        for s in splits:
            c = row[s]
            lo, hi = c["interval"]
            ci = f"[{lo:.2f}, {hi:.2f}]"
            broken = f"{c['broken_base']:.2f}->{c['broken_erased']:.2f}"
            cells.append(f"{c['base']:>14.2f}{c['erased']:>8.2f}{ci:>14}{c['change']:>+8.2f}{broken:>12}")
        lines.append(f"{name:<16}" + "".join(cells) + mark)
    for name in cmp["erased_concepts"]:
        for s in splits:
            c = cmp["rates"].get(name, {}).get(s)
            if c is None:
                continue
            into = ", ".join(f"{k} {v:.2f}" for k, v in c["turns_into"].items())
            kept = ", ".join(f"{a} {c['others_kept']['base'][a]:.2f}->{c['others_kept']['erased'][a]:.2f}"
                             for a in c["others_kept"]["base"])
            lines.append(f"{name} ({s}) is now detected as: {into}; its other attributes kept: {kept}")
    verdict = "met" if cmp["target_met"] else "NOT met"
    lines.append(f"erased concepts: max rate {cmp['max_erased_rate']:.2f} with broken videos counted as not erased "
                 f"(target <= 0.10: {'met' if cmp['erased_ok'] else 'NOT met'}); other concepts: max |change| "
                 f"{cmp['max_other_change']:.2f} (target <= 0.10: {'met' if cmp['others_ok'] else 'NOT met'}), "
                 f"largest drop {cmp['max_other_drop']:.2f}; broken videos: largest increase "
                 f"{cmp['max_broken_increase']:+.2f} (target <= +{BROKEN_MARGIN:.2f}: "
                 f"{'met' if cmp['broken_ok'] else 'NOT met'}); erasure target {verdict}")
    return "\n".join(lines)


def evaluate_erasure(pipeline, erasers, cfg: EvalConfig, erased_concepts: Sequence[str], base_report: dict | None = None,
                     concept_list: Sequence[tuple[str, str]] | None = None, keep_videos: bool = False) -> dict:
    """Evaluates the base model and the model with `erasers` (a folder or (EraserConfig, phi)) on
    the same prompts and noise, other concepts' prompts avoiding the erased ones.
    Returns {"base": report, "erased": report, "comparison": compare(...)} (`keep_videos`: each
    report also holds its "videos", as `evaluate`)."""
    from unlearn_jax.erased_model import attach_erasers

    cfg = dataclasses.replace(cfg, avoid=tuple(erased_concepts))
    model, sched, world_cfg, encode = load_pipeline(pipeline)
    if base_report is None:
        base_report = evaluate(model, sched, world_cfg, encode, cfg, concept_list, keep_videos)
    erased_report = evaluate(attach_erasers(model, erasers), sched, world_cfg, encode, cfg, concept_list,
                             keep_videos)
    return {"base": base_report, "erased": erased_report,
            "comparison": compare(base_report, erased_report, erased_concepts)}


def write_results(json_path, md_path, results: dict, table: str):
    """Writes an evaluation's results as JSON and its table as Markdown (each atomically)."""
    from unlearn_jax.atomic import atomic_file

    with atomic_file(json_path, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    with atomic_file(md_path, "w") as f:
        f.write(f"```\n{table}\n```\n")


def write_table(path, lines: Sequence[str], figures: dict) -> str:
    """A tool's README table: the Markdown lines at `path` and the figures beside it (`.json`), each written
    atomically; returns the text."""
    from unlearn_jax.atomic import atomic_file

    text = "\n".join(lines) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        f.write(text)
    with atomic_file(path.with_suffix(".json"), "w") as f:
        f.write(json.dumps(figures, indent=1) + "\n")
    return text


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Generation rate of every toy-world concept for a model.")
    p.add_argument("--model", default="assets/toy_world", help="toy pipeline folder")
    p.add_argument("--n", type=int, default=EvalConfig.n)
    p.add_argument("--steps", type=int, default=EvalConfig.num_steps)
    p.add_argument("--guidance", type=float, default=EvalConfig.guidance_scale)
    p.add_argument("--seed", type=int, default=EvalConfig.seed)
    p.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--png", default=None, help="write the first video of every concept/split as a PNG grid")
    a = p.parse_args(argv)
    cfg = EvalConfig(n=a.n, num_steps=a.steps, guidance_scale=a.guidance, seed=a.seed, batch_size=a.batch_size)
    model, sched, world_cfg, encode = load_pipeline(a.model)
    report = evaluate(model, sched, world_cfg, encode, cfg, keep_videos=True)
    videos = report.pop("videos")
    report["model"] = str(a.model)
    print(format_table(report))
    print(f"{len(videos)} videos generated in {report['settings']['generation_seconds']} s")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    if a.png:
        first = [i for i, it in enumerate(report["items"]) if it["index"] < 2]
        write_png(a.png, video_grid(videos[first]))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["BROKEN_MARGIN", "EvalConfig", "wilson", "check_concept_names", "compare", "concepts", "eval_prompts", "evaluate", "evaluate_erasure",
           "format_comparison", "format_table", "generate", "latent_layout", "load_pipeline", "main", "make_generator",
           "prompt_noise", "summarize", "to_videos",
           "video_grid", "write_png", "write_results", "write_table"]
