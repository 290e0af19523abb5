"""`unlearn-jax demo`: the weight path end to end on a tiny, locally built CogVideoX (nothing downloaded).

Builds a random tiny CogVideoX transformer, writes it as a diffusers folder, reads it back (also
through an orbax checkpoint), runs the forward and checks that every copy gives the same velocity.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

TINY = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
            text_embed_dim=32, num_layers=4, sample_width=16, sample_height=12, sample_frames=9,
            max_text_seq_length=24, use_rotary_positional_embeddings=True)


def run(workdir: str | Path, seed: int = 0) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from unlearn_jax.loading import load_transformer, save_orbax, save_transformer
    from unlearn_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer

    work = Path(workdir)
    cfg = CogVideoXConfig.from_dict(TINY)
    t0 = time.perf_counter()
    model = CogVideoXTransformer(cfg, rngs=nnx.Rngs(seed))
    save_transformer(model, work / "transformer", overwrite=True)  # a rerun replaces its own outputs only
    save_orbax(model, work / "orbax", overwrite=True)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 3, cfg.in_channels, cfg.sample_height, cfg.sample_width), np.float32)
    ctx = rng.standard_normal((1, cfg.max_text_seq_length, cfg.text_embed_dim), np.float32)
    t = np.array([500])
    outs = {name: np.asarray(m(x, ctx, t)) for name, m in
            (("built", model), ("diffusers_folder", load_transformer(work / "transformer")),
             ("orbax", load_transformer(work / "orbax")))}
    same = all(np.array_equal(outs["built"], o) for o in outs.values())
    report = {"workdir": str(work), "params": int(sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))),
              "velocity_shape": list(outs["built"].shape), "velocity_std": float(outs["built"].std()),
              "all_copies_equal": bool(same), "seconds": round(time.perf_counter() - t0, 2)}
    (work / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def register(sub):
    p = sub.add_parser("demo", help="build a tiny CogVideoX, save/convert/reload it and run it (no downloads)")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a: _main(a))


def _main(args) -> int:
    report = run(args.workdir, args.seed)
    print(json.dumps(report, indent=2))
    return 0 if report["all_copies_equal"] else 1
