"""Benchmark: one erasure iteration (docs/METHOD.md §2, §4, §5), JAX against the PyTorch reference, on this machine.

    python benchmarks/erase_iteration.py [--j 10] [--repeats 3] [--attention xla,reference] [--layers 8] [--heads 8]

The iteration is split into
  (a) sample: x_t by j DDIM steps (of J = 50) with classifier-free guidance, uncond+cond batched, with the
      current erased model;
  (b) frozen: the frozen [uncond; cond] pass on x_t, the localization masks from the conditional half's
      q/k, v_neg, and the frozen preservation pass on x_pre;
  (c) trained: the erased forward on [x_t; x_pre] (adapter outputs collected), the loss, the backward and
      the (clipped) Adam step on the adapters.
JAX: (a) is `ErasureStep.sample_xt` jitted; (b) is the frozen part of `ErasureStep.__call__` jitted on its
own; (c) is NOT run on its own: it is the jitted `ErasureStep.__call__` with xt_source="frozen_bank" (which
does (b) + (c)) minus (b). PyTorch: `unlearn_jax.torch.reference.ReferenceIteration` on the diffusers model
(`torch.no_grad()` for (a) and (b)), each part timed directly.

A small CogVideoX-shaped model (5B-style with RoPE; width heads*64, time_embed_dim 512, text_embed_dim
4096, 226 text tokens, 5 latent frames of 16x24), the same random weights on both sides (diffusers writes
them, unlearn-jax reads them), fp32, batch 1, rank-128 adapters. JAX and PyTorch runs are interleaved per
repeat (the machine may be shared), every JAX attention implementation of `--attention` against the same
PyTorch runs; medians of `--repeats` after one warm-up; JAX compile time (AOT
`lower().compile()`) reported separately. The warm-up also checks that both sides compute the same
iteration (x_t after j steps, loss terms, mask fraction). Prints one JSON line.
"""
import argparse
from pathlib import Path
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from bench_model import add_shape_args, diffusers_model

SCHEDULER_JSON = str(Path(__file__).resolve().parents[1] / "tests" / "data" / "model_configs" /
                     "cogvideox_2b_scheduler.json")


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001 - informational only
        return "unavailable"


def main():
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50, help="J, the sampler's step count")
    ap.add_argument("--j", type=int, default=10, help="sampler steps taken to reach x_t (fixed on both sides)")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", default="xla,reference",
                    help="JAX attention implementation(s) (load_transformer), comma-separated: each one is timed "
                         "against the same PyTorch runs ('auto' is 'xla' on CPU)")
    ap.add_argument("--scheduler", default=SCHEDULER_JSON)
    args = ap.parse_args()
    load_start = os.getloadavg()
    uptime_start = _uptime()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    import unlearn_jax
    from unlearn_jax import objectives as O
    from unlearn_jax.erasers import EraserConfig, count_params, init_erasers
    from unlearn_jax.schedulers import SchedulerConfig, make_schedule
    from unlearn_jax.torch.reference import ReferenceIteration
    from unlearn_jax.train import ErasureStep, StepSettings, init_state, make_optimizer

    tmodel, n_params = diffusers_model(args)
    latent_shape = (args.frames, 16, args.height, args.width)
    b, L, D = 1, args.text_len, 4096

    # ---- inputs (shared by both sides) -----------------------------------------------------------
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((b, *latent_shape), np.float32)
    batch = dict(
        ctx=rng.standard_normal((b, L, D), np.float32),
        uncond=rng.standard_normal((1, L, D), np.float32),
        pre_ctx=rng.standard_normal((b, L, D), np.float32),
        pre_valid=np.ones((b,), np.float32),
        concept_idx=np.array([[2, 3, 4]], np.int32),
        concept_valid=np.array([[True, True, True]]),
        eta=np.full((b,), 7.0, np.float32),
        j=np.int32(args.j),
        x_pre=rng.standard_normal((b, *latent_shape), np.float32),
    )

    # ---- JAX: one set of jitted parts per attention implementation ---------------------------------
    impls = [a.strip() for a in args.attention.split(",") if a.strip()]
    d = tempfile.mkdtemp(prefix="erase_bench_")
    try:
        tmodel.save_pretrained(d)
        models = {impl: unlearn_jax.load_transformer(d, attention=impl) for impl in impls}
    finally:
        shutil.rmtree(d, ignore_errors=True)
    ec = EraserConfig("adapter", rank=args.rank)
    phi = init_erasers(ec, models[impls[0]], jax.random.key(1))
    sched_cfg = SchedulerConfig.from_diffusers(args.scheduler)
    settings = StepSettings(num_sampler_steps=args.steps, guidance_scale=args.guidance, xt_source="frozen_bank",
                            alpha_loc=1.0, beta_pre=1.0, mask_threshold=0.1)
    optimizer = make_optimizer(1e-4)
    state = init_state(phi, optimizer, 0)
    key = jax.random.key(2)
    j_arr = jnp.int32(args.j)
    compile_s = {}

    def build_jax(impl):
        """The jitted (a), (b) and full frozen_bank step of one attention implementation, AOT-compiled."""
        model = models[impl]
        _, base = nnx.split(model)
        step = ErasureStep(model, ec, make_schedule(sched_cfg, args.steps), settings, optimizer, latent_shape)

        def frozen_passes(base, x_t, t, batch):
            """(b) exactly as ErasureStep.__call__ does it (erasers off, gradients stopped)."""
            nb = x_t.shape[0]
            ctx = batch["ctx"]

            def concept_fn(view, extra):
                return O.concept_attention_map(view.select(slice(nb, None)), batch["concept_idx"],
                                               batch["concept_valid"], settings.mask_key_chunk)
            v, aux = step.velocity(base, None, jnp.concatenate([x_t, x_t]),
                                   jnp.concatenate([jnp.broadcast_to(batch["uncond"], ctx.shape), ctx]), t,
                                   concept_fn=concept_fn)
            v_neg = O.negative_target(v[:nb], v[nb:], batch["eta"])
            masks = O.localization_masks(aux["concept"], step.grid, settings.mask_threshold, settings.mask_mode)
            v_pre = step.velocity(base, None, batch["x_pre"], batch["pre_ctx"], t)[0]
            return jax.lax.stop_gradient((v_neg, masks, v_pre))

        cs = compile_s.setdefault(impl, {})

        def aot(name, fn, *a):
            t0 = time.perf_counter()
            c = jax.jit(fn).lower(*a).compile()
            cs[name] = round(time.perf_counter() - t0, 2)
            return c

        sample_c = aot("sample", step.sample_xt, base, state.phi, noise, batch["ctx"], batch["uncond"], j_arr, key)
        if "x_t" not in batch:  # x_t for (b) and (c) on both sides: the first implementation's sample
            x_t_j, t_j = sample_c(base, state.phi, noise, batch["ctx"], batch["uncond"], j_arr, key)
            batch["x_t"], batch["t"] = np.asarray(x_t_j), np.asarray(t_j)
        jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
        frozen_c = aot("frozen", frozen_passes, base, jbatch["x_t"], jbatch["t"], jbatch)
        full_c = aot("full_step_frozen_bank", step.__call__, state, base, jbatch)
        return {
            "sample": lambda: jax.block_until_ready(
                sample_c(base, state.phi, noise, batch["ctx"], batch["uncond"], j_arr, key)),
            "frozen": lambda: jax.block_until_ready(frozen_c(base, jbatch["x_t"], jbatch["t"], jbatch)),
            "full_or_trained": lambda: jax.block_until_ready(full_c(state, base, jbatch)),
        }

    jax_fns = {impl: build_jax(impl) for impl in impls}
    t_int = int(batch["t"])

    # ---- PyTorch ----------------------------------------------------------------------------------
    ref = ReferenceIteration(tmodel, phi, latent_shape=latent_shape, alpha_loc=1.0, beta_pre=1.0, mask_threshold=0.1,
                             guidance_scale=args.guidance, num_sampler_steps=args.steps, scheduler=args.scheduler,
                             learning_rate=1e-4, grad_clip=settings.grad_clip)
    tx_t, tx_pre = torch.from_numpy(batch["x_t"].copy()), torch.from_numpy(batch["x_pre"].copy())
    tbatch = {**batch, "x_pre": tx_pre}
    shared = {}

    def torch_sample():
        return ref.sample_xt(noise, batch["ctx"], batch["uncond"], args.j)

    def torch_frozen():
        shared["frozen"] = ref.frozen_passes(tx_t, t_int, tbatch)
        return shared["frozen"]

    def torch_trained():
        terms = ref.loss_and_grads(tx_t, t_int, tbatch, shared["frozen"])
        terms["grad_norm"] = ref.adam_step()
        return terms

    # ---- warm-up, with the parity check of the two iterations ------------------------------------
    part_names = ("sample", "frozen", "full_or_trained")
    torch_fns = {"sample": torch_sample, "frozen": torch_frozen, "full_or_trained": torch_trained}
    warm_t = {name: torch_fns[name]() for name in part_names}
    tx_sampled, t_torch = warm_t["sample"]
    tfrozen, tterms = warm_t["frozen"], warm_t["full_or_trained"]
    parity = {"t_jax": t_int, "t_torch": int(t_torch), "x_t_max_abs": float(np.abs(batch["x_t"]).max()),
              "mask_fraction_torch": float(tfrozen["masks"].mean()),
              # with the zero-initialised up-projection, loss_loc is 0 and loss_pre rounding noise on both sides
              "loss_terms_torch": {k: tterms[k] for k in ("loss", "loss_unlearn", "loss_loc", "loss_pre", "grad_norm")}}
    for impl, fns in jax_fns.items():
        (jx, _), (_, jmasks, _), (_, jm) = (fns[name]() for name in part_names)
        parity[impl] = {
            "x_t_max_abs_diff": float(np.abs(np.asarray(jx) - tx_sampled.numpy()).max()),
            "mask_fraction": float(np.asarray(jmasks).mean()),
            "loss_terms": {k: float(jm[k]) for k in parity["loss_terms_torch"]},
            "loss_rel_diff": abs(float(jm["loss"]) - tterms["loss"]) / max(abs(tterms["loss"]), 1e-30),
            "grad_norm_rel_diff": abs(float(jm["grad_norm"]) - tterms["grad_norm"]) / max(tterms["grad_norm"], 1e-30),
        }

    # ---- timed repeats, JAX and PyTorch interleaved -----------------------------------------------
    sides = {**{f"jax_{impl}": fns for impl, fns in jax_fns.items()}, "torch": torch_fns}
    times = {side: {name: [] for name in part_names} for side in sides}
    for _ in range(args.repeats):
        for side, fns in sides.items():
            for name in part_names:
                t0 = time.perf_counter()
                fns[name]()
                times[side][name].append(time.perf_counter() - t0)
    ref.close()
    med = {side: {k: statistics.median(v) for k, v in ts.items()} for side, ts in times.items()}
    tm = med["torch"]
    torch_s = {"sample": tm["sample"], "frozen": tm["frozen"], "trained": tm["full_or_trained"]}
    torch_s["total"] = sum(torch_s.values())
    r4 = lambda x: round(x, 4)  # noqa: E731
    jax_s, speedup = {}, {}
    for impl in impls:
        m = med[f"jax_{impl}"]
        js = {"sample": m["sample"], "frozen": m["frozen"], "trained": m["full_or_trained"] - m["frozen"]}
        js["total"] = m["sample"] + m["full_or_trained"]
        js["full_step_frozen_bank"] = m["full_or_trained"]
        jax_s[impl] = {k: r4(v) for k, v in js.items()}
        speedup[impl] = {k: round(torch_s[k] / js[k], 2) if js[k] > 0 else None for k in torch_s}
    best = max(impls, key=lambda i: speedup[i]["total"])
    out = {
        "jax_s": jax_s,
        "torch_s": {k: r4(v) for k, v in torch_s.items()},
        "speedup": speedup,
        "jax_trained_method": "median(jitted ErasureStep frozen_bank step) - median(jitted frozen passes)",
        "jax_compile_s": compile_s,
        "target_speedup": 1.5,
        "target_met": {impl: speedup[impl]["total"] >= 1.5 for impl in impls},
        "best_attention": best,
        "raw_s": {side: {k: [r4(x) for x in v] for k, v in ts.items()} for side, ts in times.items()},
        "parity": parity,
        "params": n_params, "params_M": round(n_params / 1e6, 1), "adapter_params": count_params(phi),
        "tokens": args.text_len + args.frames * (args.height // 2) * (args.width // 2),
        "config": {"layers": args.layers, "heads": args.heads, "width": args.heads * 64, "frames": args.frames,
                   "height": args.height, "width_latent": args.width, "text_len": args.text_len, "rank": args.rank,
                   "J": args.steps, "j": args.j, "guidance": args.guidance, "batch": b, "dtype": "float32",
                   "attention": impls},
        "repeats": args.repeats,
        "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend(),
        "jax_version": jax.__version__, "torch_version": torch.__version__,
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "uptime_start": uptime_start, "uptime_end": _uptime(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
