"""The baselines and the method side by side on the toy world: the README's comparison table.

    python tools/toy/compare_methods.py [--only NAME ...] [--n 64] [--out runs/toy_world/compare/table.md]

Every row is one command of the project, run in its own process, with the same evaluation (the
same n prompts per concept and synonym split, the same noise, the base model beside it):
- negative-prompt / safree: `unlearn-jax eval --method ... --erased-concepts colour:red` (inference
  only: the concept's train synonyms as the concept words);
- esd / ours: `unlearn-jax erase --config ...` (training, then its own before/after evaluation).
A row whose results exist is not rerun (delete its folder to redo it). The time column is the
training steps plus the method's generation of the evaluation videos (the base model's generation
and compilation are not counted).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from unlearn_jax.toy.evaluate import write_table  # noqa: E402
OUT = ROOT / "runs" / "toy_world" / "compare"
CONCEPT = "colour:red"
# name -> (kind, config file or method, README row label)
ROWS = {
    "negative-prompt": ("eval", "negative-prompt", "negative prompt (the concept's words; inference only)"),
    "safree": ("eval", "safree", "SAFREE-style filtering of the text conditioning, with its negative prompt "
                                 "(inference only)"),
    "safree-filter-only": ("eval", "safree --safree-filter-only", "SAFREE's filtering alone, no negative prompt"),
    "esd": ("erase", "configs/toy_world/baselines/esd_red.py", "ESD-style: attention weights fine-tuned, no L_loc, no L_pre"),
    "ours": ("erase", "configs/toy_world/fixed_steps.py", "this project: adapter erasers, L_loc, L_pre, 150 fixed steps "
                                                         "(fixed_steps.py)"),
    "ours-check": ("erase", "configs/toy_world/erase_red.py", "this project, the one recipe: the concept's word, "
                                                              "stopped by the in-run check (the main job)"),
}


def folder(name: str) -> Path:
    return OUT / name


def result_file(name: str) -> Path:
    return folder(name) / ("toy_eval.json" if ROWS[name][0] == "eval" else "eval.json")


def run(name: str, n: int):
    if result_file(name).is_file():
        return
    kind, what, _ = ROWS[name]
    if kind == "eval":
        cmd = ["eval", "--model", str(ROOT / "assets" / "toy_world"), "--method", *what.split(), "--erased-concepts", CONCEPT,
               "--n", str(n), "--out-dir", str(folder(name)), "--no-progress"]
    else:
        cmd = ["erase", "--config", str(ROOT / what), f"--config.workdir={folder(name)}",
               f"--config.evaluate.n={n}", "--no-progress"]
    subprocess.run([sys.executable, "-m", "unlearn_jax.cli", *cmd], check=True, cwd=ROOT)


def row(name: str) -> tuple[str, dict]:
    res = json.loads(result_file(name).read_text())
    cmp, erased = res["comparison"], res["erased"]
    cells = {s: cmp["rates"][CONCEPT][s] for s in ("train", "heldout")}
    train_s = 0.0
    metrics = folder(name) / "metrics.jsonl"
    if metrics.is_file():
        train_s = sum(json.loads(line)["seconds"] for line in metrics.read_text().splitlines() if line.strip())
    gen_s = erased["settings"]["generation_seconds"]
    mean_broken = erased["mean_broken"]
    base_broken = res["original"]["mean_broken"] if "original" in res else res["base"]["mean_broken"]
    figures = {"erased_still": {s: c["still"] for s, c in cells.items()}, "max_other_drop": cmp["max_other_drop"],
               "max_broken_increase": cmp["max_broken_increase"], "mean_broken": mean_broken,
               "base_mean_broken": base_broken, "train_seconds": train_s, "generation_seconds": gen_s,
               "target_met": cmp["target_met"]}
    line = "| " + " | ".join([
        ROWS[name][2],
        " / ".join(f"{cells[s]['base']:.2f} → {cells[s]['still']:.2f}" for s in ("train", "heldout")),
        f"{cmp['max_other_drop']:.2f}",
        " / ".join(f"{base_broken[s]:.2f} → {mean_broken[s]:.2f}" for s in ("train", "heldout"))
        + f" (max +{cmp['max_broken_increase']:.2f})",
        "met" if cmp["target_met"] else "NOT met",
        f"{train_s:.0f} + {gen_s:.0f}",
    ]) + " |"
    return line, figures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(ROWS), help="run these (default: all)")
    ap.add_argument("--n", type=int, default=64, help="prompts per concept and synonym split (default 64)")
    ap.add_argument("--out", default=str(OUT / "table.md"))
    a = ap.parse_args(argv)
    names = a.only or list(ROWS)
    for name in names:
        print(f"== {name}", flush=True)
        run(name, a.n)
    lines = ["| method | red: base → erased (broken counted as not erased), train / held-out | largest drop of another "
             "concept | broken videos, mean over concepts: base → method, train / held-out | target | time (s): "
             "training + generation |", "|---|---|---|---|---|---|"]
    figures = {}
    for name in names:
        line, figures[name] = row(name)
        lines.append(line)
    print(write_table(a.out, lines, figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
