#!/usr/bin/env python
"""Export an unlearn-jax checkpoint or eraser folder to the PyTorch world.

    python tools/convert_weights/jax_to_diffusers.py CKPT OUT --format diffusers|t2vunlearning|lora
                                                     [--base BASE_MODEL_DIR] [--dtype bfloat16] [--overwrite]

CKPT is a transformer checkpoint (an orbax checkpoint of ours, or any folder load_transformer reads) or
an eraser folder (eraser_config.json + erasers.safetensors, or the published T2VUnlearning format).

--format diffusers      transformer checkpoint: a folder the family's diffusers class `from_pretrained` loads.
                        lora / attn / full erasers: the same, with the erasers merged into --base's weights.
                        adapter erasers: the eraser folder `unlearn_jax.torch.attach_erasers` reads (a stock
                        diffusers folder cannot hold an adapter), with a README on how to load it.
--format t2vunlearning  adapter erasers: eraser_config.json + eraser_weights.pt (+ .safetensors), the layout
                        of the T2VUnlearning authors' inference scripts.
--format lora           LoRA erasers: pytorch_lora_weights.safetensors for the pipeline's `load_lora_weights`.

An existing OUT is never replaced unless it is an earlier output of unlearn-jax and --overwrite is
given; a file or a folder holding anything else is refused. Weights and erasers must be floating
point. Exit codes: unlearn_jax.exit_codes (2: a mistake to fix, said in one line).
"""
import argparse
import sys
import time

FORMATS = ("diffusers", "t2vunlearning", "lora")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("ckpt", help="a transformer checkpoint folder or an eraser folder")
    ap.add_argument("out", help="output folder (written atomically; must not exist, or see --overwrite)")
    ap.add_argument("--format", default="diffusers", choices=FORMATS)
    ap.add_argument("--base", default=None,
                    help="the base diffusers transformer (or pipeline) folder the erasers were trained on: checks "
                         "the erasers against it; needed to merge lora/attn/full erasers (--format diffusers)")
    ap.add_argument("--dtype", default=None, help="write tensors in this dtype; default: the checkpoint's")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace OUT if it is an output unlearn-jax wrote (never anything else)")
    args = ap.parse_args(argv)
    from unlearn_jax.tool_edges import run_tool

    return run_tool(lambda: _run(args))


def _run(args):
    from unlearn_jax.tool_edges import check_output

    t0 = time.perf_counter()
    check_output(args.out, args.overwrite, inputs=[args.ckpt, args.base])  # before the slow part
    from unlearn_jax.dtypes import as_dtype

    as_dtype(args.dtype, "--dtype")
    note = _convert(args)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)")
    if note:
        print(note)


def _convert(args) -> str | None:
    from unlearn_jax.atomic import write_dir
    from unlearn_jax.eraser_io import is_eraser_folder, load_erasers, stored_base_config
    from unlearn_jax.export import export
    from unlearn_jax.errors import UnlearnError
    from unlearn_jax.loading import load_transformer, save_transformer

    if not is_eraser_folder(args.ckpt):
        if args.format != "diffusers":
            raise UnlearnError(f"{args.ckpt}: a transformer checkpoint, not an eraser folder (no eraser_config.json); "
                               f"--format {args.format} exports erasers")
        if args.base is not None:
            raise UnlearnError("--base is for eraser folders; a transformer checkpoint is converted as it is")
        model = load_transformer(args.ckpt, progress=True)
        write_dir(args.out, lambda folder: save_transformer(model, folder, dtype=args.dtype), overwrite=args.overwrite)
        return None
    base = load_transformer(args.base, progress=True) if args.base is not None else None
    cfg, phi = load_erasers(args.ckpt, base)
    model = base if base is not None else stored_base_config(args.ckpt)
    if model is None:
        raise UnlearnError(f"{args.ckpt}: a published-format eraser folder records no base model: give the base "
                           "model with --base BASE_MODEL_DIR")
    write_dir(args.out, lambda folder: export(folder, args.format, cfg, phi, model, base_model=base, dtype=args.dtype),
              overwrite=args.overwrite)
    if cfg.kind == "adapter":
        return (f"load it in diffusers with: import unlearn_jax.torch; "
                f"unlearn_jax.torch.attach_erasers(pipe.transformer, {str(args.out)!r})")
    if args.format == "lora":
        return f"load it in diffusers with: pipe.load_lora_weights({str(args.out)!r})"
    return None


if __name__ == "__main__":
    sys.exit(main())
