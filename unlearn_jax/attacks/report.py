"""Attack results: the files `unlearn-jax attack` writes, and their rows in `unlearn-jax eval`'s table."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from unlearn_jax.errors import UnlearnError


def _same(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def load_attacks(dirs, model, erasers) -> list[dict]:
    """The attack.json of each folder, refused in one line when it was made on another model or other erasers
    (the rates would not be this evaluation's)."""
    out = []
    for d in dirs or ():
        path = Path(d) / "attack.json"
        if not path.is_file():
            raise UnlearnError(f"--attacks {d}: no attack.json (write one with unlearn-jax attack --out {d})")
        try:
            rec = json.loads(path.read_text())
            rec["results"]["erased"]["attack"]["rate"]
        except (ValueError, KeyError, TypeError) as e:
            raise UnlearnError(f"--attacks {d}: attack.json is not an attack result ({type(e).__name__}: {e})") from e
        for what, ours, theirs in (("model", model, rec.get("pipeline")), ("erasers", erasers, rec.get("erasers"))):
            if not _same(ours, theirs):
                raise UnlearnError(f"--attacks {d}: the attack was run on {what} {theirs}, this evaluation's is "
                                   f"{ours}")
        rec["folder"] = str(d)
        out.append(rec)
    return out


def attack_table(attacks: list[dict]) -> str:
    """A markdown table: per attack, the concept's success rate with and without the attack, both models."""
    if not attacks:
        return ""

    cell = _cell
    lines = ["attack success (a video showing the erased concept; Wilson 95% interval)", "",
             "| attack | concept | n | original, no attack | original, attacked | erased, no attack | erased, attacked |",
             "|---|---|---|---|---|---|---|"]
    for a in attacks:
        r, cfg = a["results"], a["config"]
        start = "benign" if cfg["method"] == "ring-a-bell" else cfg.get("start", "concept")
        lines.append(f"| {cfg['method']} (from {start} prompts) | {a['concept']} | {r['erased']['attack']['n']} | "
                     f"{cell(r['original']['no_attack'])} | {cell(r['original']['attack'])} | "
                     f"{cell(r['erased']['no_attack'])} | {cell(r['erased']['attack'])} |")
    return "\n".join(lines)


def _cell(c) -> str:
    return f"{c['rate']:.2f} [{c['interval'][0]:.2f}, {c['interval'][1]:.2f}]"


def format_results(out: dict) -> str:
    """The attack's table: per model, the concept's success rate without and under attack (and, when the attack
    started from benign prompts, with the concept named), the broken (toy) or per-frame nudity (NudeNet) rate."""
    r, cfg = out["results"], out["config"]
    start = "benign" if cfg["method"] == "ring-a-bell" else cfg.get("start", "concept")
    named = "named" in r["erased"]
    toy = r["erased"]["attack"].get("broken") is not None
    extra = "broken under attack" if toy else "nude frames under attack"
    head = "| model | " + ("concept named, no attack | " if named else "") + \
        f"start prompts ({start}), no attack | under attack | {extra} |"
    judge = "a valid video showing the concept" if toy else "a video with a NudeNet-flagged frame"
    lines = [f"attack `{cfg['method']}` on {out['concept']} ({r['erased']['attack']['n']} videos per cell; success = "
             f"{judge}, Wilson 95% interval)", "", head, "|---" * (5 if named else 4) + "|"]
    for name in ("original", "erased"):
        c = r[name]
        last = c["attack"]["broken"] if toy else c["attack"]["nudity_rate"]
        lines.append(f"| {name} | " + (f"{_cell(c['named'])} | " if named else "") +
                     f"{_cell(c['no_attack'])} | {_cell(c['attack'])} | {last:.2f} |")
    return "\n".join(lines)


def write_outputs(out_dir, out: dict) -> Sequence[Path]:
    """attack.json (everything), prompts.jsonl (one adversarial prompt per line, with the loss it reached),
    attack.md (the table), adversarial.csv (the typable adversarial prompts with their seeds: `unlearn-jax eval
    --prompts DIR/adversarial.csv` measures them on any model; not for `soft`), soft/<index>.npz (a real
    checkpoint's soft conditionings, `generate(prompt_embeds=...)` inputs) and, for the toy world,
    attack_sheet.png (per adversarial prompt, its first video from the original model above the erased one's)."""
    import csv
    import io

    from unlearn_jax.atomic import atomic_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "attack.json", out_dir / "prompts.jsonl", out_dir / "attack.md"]
    with atomic_file(paths[0], "w") as f:
        json.dump({k: v for k, v in out.items() if k not in ("sheet", "soft")}, f, indent=1)
    with atomic_file(paths[1], "w") as f:
        for rec in out["prompts"]:
            f.write(json.dumps({k: v for k, v in rec.items() if k != "history"}) + "\n")
    with atomic_file(paths[2], "w") as f:
        f.write(format_results(out) + "\n")
    if out["config"]["method"] != "soft":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["prompt", "seed", "start", "loss"])
        for rec in out["prompts"]:
            w.writerow([rec["adversarial"], rec.get("seed", ""), rec["start"], f"{rec['loss']:.6g}"])
        paths.append(out_dir / "adversarial.csv")
        with atomic_file(paths[-1], "w") as f:
            f.write(buf.getvalue())
    for rec, cond in zip(out["prompts"], out.get("soft") or ()):
        # a soft attack's conditioning (batch 1), loadable as `VideoGenerator.generate(prompt_embeds=...)`
        arrays = cond if isinstance(cond, dict) else {"prompt_embeds": cond}
        paths.append(out_dir / "soft" / f"{rec['index']:04d}.npz")
        with atomic_file(paths[-1], "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    if out.get("sheet"):
        from unlearn_jax.toy.evaluate import video_grid
        from unlearn_jax.video_io import write_png

        o, e = out["sheet"]["original"], out["sheet"]["erased"]
        paths.append(out_dir / "attack_sheet.png")
        write_png(paths[-1], video_grid(np.stack([o, e], 1).reshape(-1, *o.shape[1:])))
    return paths
