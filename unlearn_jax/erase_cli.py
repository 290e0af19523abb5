"""`unlearn-jax erase --config CFG [--config.a.b=v ...]`: runs (or resumes) an erasure (`erase.Run`)."""
from __future__ import annotations

import json
import sys


def register(sub):
    p = sub.add_parser("erase", help="erase concepts: unlearn-jax erase --config configs/X.py [--config.a.b=v ...]")
    p.add_argument("--config", required=True, help="an ml-collections config file (configs/*.py)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main, takes_config_overrides=True)


def _main(args) -> int:
    from unlearn_jax.config import load_config
    from unlearn_jax.erase import run_erase

    cfg = load_config(args.config, getattr(args, "config_overrides", []))
    summary = run_erase(cfg, progress=not args.no_progress)
    table = summary.pop("table", None)
    print(json.dumps(summary, indent=2))
    if table:
        print(table)
    if summary.get("erasure_target") == "NOT met":
        print("the training completed but the erasure target was NOT met (see the table and eval.json)",
              file=sys.stderr)
    if summary["status"] == "interrupted":
        from unlearn_jax.exit_codes import SIGTERM

        print(f"stopped at step {summary['step']} (SIGTERM); the checkpoint is saved: rerun the same command to resume",
              file=sys.stderr)
        return SIGTERM  # 128 + 15: a scheduler must not read an interrupted run as a finished one
    return 0
