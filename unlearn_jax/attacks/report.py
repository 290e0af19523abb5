"""Attack results (the `attack.json` files `unlearn-jax attack` writes) as rows of `unlearn-jax eval`'s table."""
from __future__ import annotations

import json
from pathlib import Path

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

    def cell(c):
        return f"{c['rate']:.2f} [{c['interval'][0]:.2f}, {c['interval'][1]:.2f}]"

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
