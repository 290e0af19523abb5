"""Runs the bundled toy-world erasure and its ablations, then writes the README's ablation table.

    python tools/toy/run_ablations.py [--only NAME ...] [--out runs/toy_world/ablations/table.md]

Each run is `unlearn-jax erase --config configs/toy_world/...` in its own process (its
before/after evaluation is part of the run: <workdir>/eval.json); the table reads those files.
A run whose eval.json exists is not rerun (delete its workdir to redo it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = {  # name -> (config file, README row label)
    "default": ("configs/toy_world/fixed_steps.py", "adapter eraser, augmentation, L_loc, L_pre, x_t from the erased model"),
    "no_augmentation": ("configs/toy_world/ablations/no_augmentation.py", "no prompt augmentation"),
    "no_localization": ("configs/toy_world/ablations/no_localization.py", "no localization (α = 0)"),
    "no_preservation": ("configs/toy_world/ablations/no_preservation.py", "no preservation (β = 0)"),
    "frozen_bank": ("configs/toy_world/ablations/frozen_bank.py", "`xt_source = frozen_bank`"),
    "lora": ("configs/toy_world/ablations/lora.py", "LoRA instead of the adapter"),
    "full": ("configs/toy_world/ablations/full.py", "full fine-tuning instead of the adapter"),
    "two_concepts": ("configs/toy_world/ablations/two_concepts.py", "two concepts in one run (red + triangle)"),
}


def workdir(name: str) -> Path:
    return ROOT / "runs" / "toy_world" / ("fixed_steps" if name == "default" else f"ablations/{name}")


def run(name: str) -> float | None:
    """Runs one config unless its eval.json exists; returns the wall time of the run (s)."""
    if (workdir(name) / "eval.json").is_file():
        return None
    cmd = [sys.executable, "-m", "unlearn_jax.cli", "erase", "--config", str(ROOT / RUNS[name][0]), "--no-progress",
           f"--config.workdir={workdir(name)}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    (workdir(name) / "wall_seconds.txt").write_text(f"{seconds:.0f}\n")
    return seconds


def row(name: str) -> str:
    ev = json.loads((workdir(name) / "eval.json").read_text())["comparison"]
    # older eval.json files lack the drop: recompute it from the rates
    drop = max(0.0, *(-cell["change"] for c, row in ev["rates"].items() if c not in ev["erased_concepts"]
               for cell in row.values()))
    erased = ev["erased_concepts"]
    others = [c for c in ev["rates"] if c not in erased]

    def mean(concepts, split, key):
        vals = [ev["rates"][c][split][key] for c in concepts]
        return sum(vals) / len(vals)

    steps = [json.loads(line) for line in (workdir(name) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_s = sum(r["seconds"] for r in steps)
    wall = workdir(name) / "wall_seconds.txt"
    wall_s = wall.read_text().strip() if wall.is_file() else "?"
    cells = [RUNS[name][1],
             " / ".join(f"{mean(erased, s, 'base'):.2f} → {mean(erased, s, 'erased'):.2f}" for s in ("train", "heldout")),
             " / ".join(f"{mean(others, s, 'base'):.2f} → {mean(others, s, 'erased'):.2f}" for s in ("train", "heldout")),
             f"{ev['max_other_change']:.2f} / {drop:.2f}", f"{len(steps)}", f"{train_s:.0f}", wall_s]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(RUNS), help="run these (default: all)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "toy_world" / "ablations" / "table.md"))
    a = ap.parse_args(argv)
    names = a.only or list(RUNS)
    for name in names:
        print(f"== {name}", flush=True)
        run(name)
    lines = ["| run | erased concept(s): base → erased, train / held-out synonyms | other concepts: base → erased, "
             "train / held-out | another concept's max abs change / largest drop | steps | training steps (s) | whole run incl. "
             "compilation and evaluation (s) |", "|---|---|---|---|---|---|---|"]
    lines += [row(n) for n in names]
    text = "\n".join(lines) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
