"""The `unlearn-jax` command line. Subcommands register themselves from their own modules."""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that provide `register(subparsers)`; a module that is not installed yet is skipped.
_SUBCOMMAND_MODULES = ("unlearn_jax.erase_cli", "unlearn_jax.demo", "unlearn_jax.prompts_cli", "unlearn_jax.sample_cli",
                       "unlearn_jax.eval_cli", "unlearn_jax.attack_cli")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="unlearn-jax", description="Concept erasure for text-to-video diffusion models")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.register(sub)
    return ap


def main(argv=None) -> int:
    from unlearn_jax.errors import UnlearnError

    from unlearn_jax.config import split_config_args

    argv, overrides = split_config_args(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    if overrides and not getattr(args, "takes_config_overrides", False):
        print(f"error: {args.command} takes no --config.* overrides", file=sys.stderr)
        return 2
    args.config_overrides = overrides
    from unlearn_jax import exit_codes

    try:
        return int(args.func(args) or 0)
    except UnlearnError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.for_exception(e)
    except OSError as e:  # a full disk, a read-only folder...: one line, and the files stay as they were
        print(f"error: {exit_codes.describe_os_error(e)}", file=sys.stderr)
        return exit_codes.for_exception(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return exit_codes.SIGINT


if __name__ == "__main__":
    sys.exit(main())
