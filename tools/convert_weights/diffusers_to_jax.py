#!/usr/bin/env python
"""Convert a diffusers CogVideoX transformer folder (or a pipeline folder) to an unlearn-jax orbax checkpoint.

    python tools/convert_weights/diffusers_to_jax.py SRC OUT [--dtype bfloat16]

`unlearn_jax.load_transformer(OUT)` then reads it directly into its shardings (fast repeated loads).
"""
import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("src", help="diffusers transformer folder, or a pipeline folder with transformer/")
    ap.add_argument("out", help="output folder (written atomically)")
    ap.add_argument("--dtype", default=None, help="cast parameters (float32|bfloat16|float16); default: keep")
    args = ap.parse_args(argv)
    from unlearn_jax.errors import UnlearnError
    from unlearn_jax.loading import load_transformer, save_orbax

    try:
        t0 = time.perf_counter()
        model = load_transformer(args.src, dtype=args.dtype, progress=True)
        save_orbax(model, args.out)
    except UnlearnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
