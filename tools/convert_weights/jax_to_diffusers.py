#!/usr/bin/env python
"""Export an unlearn-jax checkpoint to the PyTorch world.

    python tools/convert_weights/jax_to_diffusers.py CKPT OUT --format diffusers [--dtype bfloat16]

--format diffusers: a transformer folder that `CogVideoXTransformer3DModel.from_pretrained` loads.
"""
import argparse
import sys
import time

FORMATS = ("diffusers", "t2vunlearning", "lora")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("ckpt", help="an unlearn-jax checkpoint folder (or any folder load_transformer reads)")
    ap.add_argument("out", help="output folder (written atomically)")
    ap.add_argument("--format", default="diffusers", choices=FORMATS)
    ap.add_argument("--dtype", default=None, help="write tensors in this dtype; default: the checkpoint's")
    args = ap.parse_args(argv)
    from unlearn_jax.errors import UnlearnError
    from unlearn_jax.loading import load_transformer, save_transformer

    try:
        if args.format != "diffusers":
            raise UnlearnError(f"--format {args.format}: exporting erasers is not available yet in this version; "
                               "use --format diffusers")
        t0 = time.perf_counter()
        save_transformer(load_transformer(args.ckpt, progress=True), args.out, dtype=args.dtype)
    except UnlearnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
