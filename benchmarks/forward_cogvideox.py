"""Benchmark: forward time of the JAX CogVideoX transformer against diffusers' on the same machine.

    python benchmarks/forward_cogvideox.py [--layers 8] [--heads 8] [--frames 5] [--height 16] [--width 24] [--repeats 5]

A small CogVideoX-shaped model (5B-style with RoPE; width heads*64, 226 text tokens), the same
random weights in both (diffusers writes them, unlearn-jax reads them), fp32, batch 1. Reports
the median of `--repeats` timed calls after a warm-up (JAX compile time reported separately).
"""
import argparse
import json
import os
import statistics
import tempfile
import time

from bench_model import add_shape_args, diffusers_model


def main():
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attention", default="xla")
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    import unlearn_jax

    tmodel, n_params = diffusers_model(args)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, args.frames, 16, args.height, args.width), np.float32)
    ctx = rng.standard_normal((1, args.text_len, 4096), np.float32)
    t = np.array([500])
    gh, gw = args.height // 2, args.width // 2
    rope = get_3d_rotary_pos_embed(64, get_resize_crop_region_for_grid((gh, gw), gw, gh), (gh, gw), args.frames)

    def torch_call():
        with torch.no_grad():
            return tmodel(torch.from_numpy(x), torch.from_numpy(ctx), torch.from_numpy(t), image_rotary_emb=rope,
                          return_dict=False)[0]

    with tempfile.TemporaryDirectory() as d:
        tmodel.save_pretrained(d)
        jmodel = unlearn_jax.load_transformer(d, attention=args.attention)

    def jax_call():
        return jax.block_until_ready(jmodel(x, ctx, t))

    t0 = time.perf_counter()
    jax_call()
    compile_s = time.perf_counter() - t0
    torch_call()

    def timeit(fn):
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    tj, tt = timeit(jax_call), timeit(torch_call)
    diff = float(np.abs(np.asarray(jax_call()) - torch_call().numpy()).max())
    print(json.dumps({"params_M": round(n_params / 1e6, 1), "tokens": args.text_len + args.frames * gh * gw,
                      "jax_s": round(tj, 4), "torch_s": round(tt, 4), "jax_speedup": round(tt / tj, 2),
                      "jax_first_call_s": round(compile_s, 2), "max_abs_diff": diff,
                      "torch_threads": torch.get_num_threads(), "nproc": os.cpu_count(),
                      "jax_backend": jax.default_backend()}))


if __name__ == "__main__":
    main()
