"""`unlearn-jax attack`: red-team attacks on an erased model (see `unlearn_jax.attacks`).

    unlearn-jax attack --model assets/toy_world --erasers RUN/export/erasers --concept colour:red \
        --method tokens|soft|ring-a-bell --out DIR

writes DIR/attack.json (settings, every attacked prompt with its loss history, the success rates),
DIR/prompts.jsonl (one adversarial prompt per line, with the loss it reached), DIR/attack.md (the
table: the concept's success rate without and under attack, for the original and the erased model, with
Wilson 95% intervals and the broken-video fraction) and DIR/attack_sheet.png (each adversarial prompt's
first video, the original model's above the erased one's). `unlearn-jax eval --attacks DIR` adds the
rates to its table. Toy-world pipelines (a folder with toy_world.json):
the toy detector judges the videos.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub):
    p = sub.add_parser("attack", help="red-team attacks on an erased model (soft / tokens / ring-a-bell)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the base pipeline folder")
    p.add_argument("--erasers", required=True, help="the erasers to attack (ours or the published format)")
    p.add_argument("--concept", required=True, help="the erased concept (toy world: attribute:value, e.g. colour:red)")
    p.add_argument("--method", default="tokens", help="soft | tokens | ring-a-bell (default tokens)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-prompts", type=int, default=8, help="attacked prompts (default 8)")
    p.add_argument("--seeds", type=int, default=8, help="videos per adversarial prompt and model (default 8)")
    p.add_argument("--n-tokens", type=int, default=3, help="tokens / ring-a-bell: tokens added (default 3)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default: soft 100, tokens 20, "
                                                           "ring-a-bell 30)")
    p.add_argument("--strength", type=float, default=6.0, help="ring-a-bell: how far along the concept vector "
                                                               "(default 6)")
    p.add_argument("--start", default="concept", help="soft / tokens: start from the caption naming the concept "
                                                    "(concept, default) or from it with the concept unnamed (benign)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier attack's files in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(a) -> int:
    from unlearn_jax.attacks.toy import ToyAttackConfig, format_results, run_toy_attack, write_outputs
    from unlearn_jax.errors import UnlearnError
    from unlearn_jax.toy.evaluate import check_concept_names

    model, erasers, out = Path(a.model), Path(a.erasers), Path(a.out)
    if not model.is_dir():
        raise UnlearnError(f"--model {model}: no such folder")
    if not erasers.is_dir():
        raise UnlearnError(f"--erasers {erasers}: no such folder")
    if not (model / "toy_world.json").is_file():
        raise UnlearnError(f"--model {model}: the attack command measures toy-world pipelines (toy_world.json) so "
                           "far; for a real checkpoint attack the conditioning in Python (unlearn_jax.attacks) and "
                           "measure the prompts with `unlearn-jax eval`")
    cfg = ToyAttackConfig(method=a.method, n_prompts=a.n_prompts, seeds=a.seeds, n_tokens=a.n_tokens, steps=a.steps,
                          strength=a.strength, seed=a.seed, start=a.start)
    check_concept_names([a.concept], "--concept")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "attack.json").is_file())):
        raise UnlearnError(f"--out {out} exists and holds files that unlearn-jax attack did not write; choose an "
                           "empty or new folder")
    if (out / "attack.json").exists() and not a.overwrite:
        raise UnlearnError(f"--out {out} holds an earlier attack (attack.json); pass --overwrite to replace it")

    def progress(i, n, rec):
        if not a.no_progress:
            shown = rec.get("adversarial", "(soft conditioning)")
            print(f"[{i}/{n}] loss {rec['loss_start']:.4g} -> {rec['loss']:.4g}: {shown}", flush=True)

    result = run_toy_attack(model, erasers, a.concept, cfg, progress=progress)
    write_outputs(out, result)
    print(format_results(result))
    return 0
