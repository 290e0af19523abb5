"""One recipe, every concept: erase each of the 11 toy concepts with configs/toy_world/erase.py, the README's table.

    python tools/toy/sweep_concepts.py [--config configs/toy_world/erase.py] [--only shape:triangle ...]
                                       [--n 64] [--out runs/toy_world/sweep/table.md]

Each row is one project command in its own process, the concept the only thing named:
`unlearn-jax erase --config <config>:<concept> --config.workdir=<out>/<attribute>_<value>`; the run stops
when its in-run check finds the concept gone, then evaluates every concept with the base and the
erased model (n prompts per concept and synonym split). A row whose eval.json exists is not rerun
(delete its folder to redo it). `--config configs/toy_world/wan/erase.py` sweeps the Wan toy.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from unlearn_jax.toy.evaluate import concept_name, concepts, write_table  # noqa: E402


def run(config: str, concept: str, workdir: Path, n: int) -> float:
    """Runs one erasure unless its results exist; returns its wall time (0 when it was not rerun)."""
    if (workdir / "eval.json").is_file():
        return 0.0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unlearn_jax.cli", "erase", "--config", f"{config}:{concept}",
                    f"--config.workdir={workdir}", f"--config.evaluate.n={n}", "--no-progress"], check=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    (workdir / "wall_seconds.txt").write_text(f"{seconds:.0f}\n")
    return seconds


def row(concept: str, workdir: Path) -> tuple[str, dict]:
    res = json.loads((workdir / "eval.json").read_text())
    cmp, check = res["comparison"], res.get("in_run_check", {})
    cells = cmp["rates"][concept]
    into = cells["train"]["turns_into"]
    top = ", ".join(f"{k} {v:.2f}" for k, v in list(into.items())[:2])
    wall = workdir / "wall_seconds.txt"
    figures = {"still": {s: c["still"] for s, c in cells.items()}, "max_other_drop": cmp["max_other_drop"],
               "max_other_change": cmp["max_other_change"], "max_broken_increase": cmp["max_broken_increase"],
               "turns_into": into, "check": check, "target_met": cmp["target_met"],
               "wall_seconds": float(wall.read_text()) if wall.is_file() else None}
    line = "| " + " | ".join([
        concept,
        " / ".join(f"{cells[s]['base']:.2f} → {cells[s]['still']:.2f}" for s in ("train", "heldout")),
        top,
        f"{cmp['max_other_change']:.2f}",
        f"{cmp['max_broken_increase']:+.2f}",
        f"{check.get('final_step', '?')} ({check.get('reverts', 0)} reverts)",
        "met" if cmp["target_met"] else "NOT met",
        f"{figures['wall_seconds']:.0f}" if figures["wall_seconds"] else "?",
    ]) + " |"
    return line, figures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [concept_name(a, v) for a, v in concepts()]
    ap.add_argument("--config", default="configs/toy_world/erase.py", help="a config whose get_config takes the concept")
    ap.add_argument("--only", nargs="*", choices=names, help="these concepts (default: all 11)")
    ap.add_argument("--n", type=int, default=64, help="prompts per concept and synonym split (default 64)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "toy_world" / "sweep" / "table.md"))
    a = ap.parse_args(argv)
    out = Path(a.out).resolve().parent
    chosen = a.only or names
    for concept in chosen:
        print(f"== {concept}", flush=True)
        run(a.config, concept, out / concept.replace(":", "_"), a.n)
    lines = ["| erased concept | base → erased (broken counted as not erased), train / held-out | what its prompts "
             "now show (train) | another concept's largest change | broken videos: largest increase | steps "
             "(stopped by the check) | target | wall time (s) |", "|---|---|---|---|---|---|---|---|"]
    figures = {}
    for concept in chosen:
        line, figures[concept] = row(concept, out / concept.replace(":", "_"))
        lines.append(line)
    met = sum(f["target_met"] for f in figures.values())
    lines.append(f"\ntarget met for {met} of {len(figures)} concepts (n = {a.n} per concept and split)")
    print(write_table(a.out, lines, figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
