#!/usr/bin/env python
"""Convert a diffusers CogVideoX transformer folder (or a pipeline folder) to an unlearn-jax orbax checkpoint.

    python tools/convert_weights/diffusers_to_jax.py SRC OUT [--dtype bfloat16] [--overwrite]

`unlearn_jax.load_transformer(OUT)` then reads it directly into its shardings (fast repeated loads).
An existing OUT is never replaced unless it is an earlier output of unlearn-jax and --overwrite is
given; a file or a folder holding anything else is refused. Exit codes: unlearn_jax.exit_codes.
"""
import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("src", help="diffusers transformer folder, or a pipeline folder with transformer/")
    ap.add_argument("out", help="output folder (written atomically; must not exist, or see --overwrite)")
    ap.add_argument("--dtype", default=None, help="cast parameters (float32|bfloat16|float16); default: keep")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace OUT if it is an output unlearn-jax wrote (never anything else)")
    args = ap.parse_args(argv)
    from unlearn_jax.tool_edges import run_tool

    return run_tool(lambda: _convert(args))


def _convert(args):
    from unlearn_jax.tool_edges import check_output

    t0 = time.perf_counter()
    check_output(args.out, args.overwrite, inputs=[args.src])  # before the slow part
    from unlearn_jax.atomic import write_dir
    from unlearn_jax.dtypes import as_dtype
    from unlearn_jax.loading import load_transformer, save_orbax

    as_dtype(args.dtype, "--dtype")
    model = load_transformer(args.src, dtype=args.dtype, progress=True)
    write_dir(args.out, lambda folder: save_orbax(model, folder), overwrite=args.overwrite)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
