"""The GPU suite: the erasure's speed on one accelerator, in one short run.

    python benchmarks/gpu_suite.py [--out suite.json]      # CogVideoX-2B, 49 x 480 x 720, bf16, random weights
    python benchmarks/gpu_suite.py --size tiny             # the same code on a tiny model (the CPU check)

Builds the CogVideoX-2B transformer (the published config, tests/data/model_configs) with random
weights in bf16 on the default device, rank-128 adapter erasers, the 50-step DDIM schedule, and
random text embeddings (226 x 4096), then times, after one warm-up each (the best of --repeats):
- a CFG sampler step: the [uncond; cond] forward of the erased model at batch 2;
- the frozen passes (the [uncond; cond] frozen forward with the localization masks, the
  preservation forward), and the whole step with x_t given (`xt_source="frozen_bank"`): the
  trained pass (erased forward on [x_t; x_pre], the loss, the backward, Adam) is their difference;
- the whole step with `xt_source="current"` at j = 25 (the mean of j over 0..49): x_t and x_pre
  sampled with the erased / frozen model, then the step.
FLOPs come from XLA's cost analysis of each compiled function; MFU is FLOPs / seconds / the chip's
bf16 dense peak (a table by device kind; elsewhere the measured bf16 matmul throughput, labelled
so). It prints one table and one JSON line (also --out): MFU of the trained pass and of a sampler
step, seconds per erase iteration with the bank and with `current`, peak device memory, and the
projected time of a 500-step erasure. Targets on one H100/H200: trained pass >= 50% MFU, 500 steps
<= 20 min. Every compile is ahead of time and timed apart from the runs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "model_configs"
# bf16 dense peak FLOP/s per chip, by a substring of jax's device_kind (vendor data sheets)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12, "TPU v6": 918e12}
SIZES = {
    "full": dict(frames=49, height=480, width=720, overrides={}),
    # odd sizes on purpose: 3 latent frames of 4 x 6, 3 heads of 16, text 13 x 40
    "tiny": dict(frames=9, height=32, width=48,
                 overrides=dict(num_layers=2, num_attention_heads=3, attention_head_dim=16, text_embed_dim=40,
                                time_embed_dim=24, max_text_seq_length=13, sample_frames=9, sample_height=4,
                                sample_width=6)),
}
J, J_MEAN = 50, 25


def peak_flops(device, dtype) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) of `device` for `dtype` matmuls."""
    kind = getattr(device, "device_kind", "") or ""
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak, f"data sheet ({name} bf16 dense)"
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)).lower(a, a).compile()
    jax.block_until_ready(f(a, a))
    best = min(_timed(lambda: jax.block_until_ready(f(a, a))) for _ in range(5))
    return 2 * n**3 / best, f"measured ({n}^2 {jnp.dtype(dtype).name} matmul, fp32 accumulation, on {kind or device.platform})"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def build(size: str, dtype_name: str, attention: str, remat: str, rank: int):
    """(model, ErasureStep factory, inputs, latent shape, text length) of a suite size."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from unlearn_jax import families
    from unlearn_jax.erasers import EraserConfig, init_erasers
    from unlearn_jax.jsonfiles import read_json_object
    from unlearn_jax.schedulers import SchedulerConfig, make_schedule
    from unlearn_jax.train import ErasureStep, StepSettings, make_optimizer

    spec = SIZES[size]
    family = families.get("cogvideox")
    raw = {**read_json_object(CONFIGS / "cogvideox_2b_transformer.json"), **spec["overrides"]}
    cfg = family.transformer_config(raw, "cogvideox_2b_transformer.json")
    dtype = jnp.dtype(dtype_name)
    model = family.build_transformer(cfg, seed=0, dtype=dtype, param_dtype=dtype, attention=attention, remat=remat)
    vae_cfg = family.vae_config(_vae_folder())
    latent_shape = family.video_shape(cfg, vae_cfg, spec["frames"], spec["height"], spec["width"]).latent_shape
    eraser = EraserConfig("adapter", rank=rank)
    phi = init_erasers(eraser, model, jax.random.key(1))
    schedule = make_schedule(SchedulerConfig.from_diffusers(CONFIGS / "cogvideox_2b_scheduler.json"), J)
    optimizer = make_optimizer(1e-4)

    def step_for(xt_source):
        settings = StepSettings(num_sampler_steps=J, guidance_scale=6.0, xt_source=xt_source, alpha_loc=1.0,
                                beta_pre=1.0, mask_threshold=0.1)
        return ErasureStep(model, eraser, schedule, settings, optimizer, latent_shape)

    rng = np.random.default_rng(0)
    L, D = cfg.max_text_seq_length, cfg.text_embed_dim
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    batch = dict(ctx=cast(rng.standard_normal((1, L, D))), uncond=cast(rng.standard_normal((1, L, D))),
                 pre_ctx=cast(rng.standard_normal((1, L, D))), pre_valid=jnp.ones((1,), jnp.float32),
                 concept_idx=jnp.asarray([[2, 3, 4]], jnp.int32), concept_valid=jnp.ones((1, 3), bool),
                 eta=jnp.full((1,), 7.0, jnp.float32), j=jnp.int32(J_MEAN),
                 x_pre=jnp.asarray(rng.standard_normal((1, *latent_shape)), jnp.float32),
                 x_t=jnp.asarray(rng.standard_normal((1, *latent_shape)), jnp.float32),
                 t=jnp.asarray(int(schedule.sample_timesteps[J_MEAN]), jnp.int32))
    return model, phi, step_for, batch, latent_shape, L, optimizer


def _vae_folder():
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="gpu_suite_vae_"))
    (d / "config.json").write_text((CONFIGS / "cogvideox_2b_vae.json").read_text())
    return d


def run(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="full")
    ap.add_argument("--dtype", default="bfloat16", help="weights and compute (erasers and Adam stay fp32)")
    ap.add_argument("--attention", default="auto", help="auto: cuDNN flash attention on GPU, XLA elsewhere")
    ap.add_argument("--remat", default="dots", help="remat policy of the blocks (none | full | dots | ...)")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        raise SystemExit("--repeats must be >= 1")

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unlearn_jax import objectives as O
    from unlearn_jax.train import init_state

    t_start = time.perf_counter()
    device = jax.devices()[0]
    model, phi, step_for, batch, latent_shape, text_len, optimizer = build(a.size, a.dtype, a.attention, a.remat,
                                                                           a.rank)
    _, base = nnx.split(model)
    state = init_state(phi, optimizer, 0)
    bank, current = step_for("frozen_bank"), step_for("current")
    b = 1

    def sampler_step(base, phi, x, t, ctx, uncond):
        """One CFG step's model call: the erased model on [uncond; cond] (what sampling x_t runs j times)."""
        x2 = jnp.concatenate([x, x])
        return bank.velocity(base, phi, x2, jnp.concatenate([uncond, ctx]), jnp.broadcast_to(t, (2,)))[0]

    def frozen_passes(base, batch):
        """The step's frozen part, as ErasureStep.__call__ computes it (erasers off, no gradient)."""
        ctx, x_t, t = batch["ctx"], batch["x_t"], batch["t"]

        def concept_fn(view, extra):
            return O.concept_attention_map(view.select(slice(b, None)), batch["concept_idx"], batch["concept_valid"],
                                           bank.s.mask_key_chunk)
        v, aux = bank.velocity(base, None, jnp.concatenate([x_t, x_t]), jnp.concatenate([batch["uncond"], ctx]), t,
                               concept_fn=concept_fn)
        masks = O.localization_masks(aux["concept"], bank.grid, bank.s.mask_threshold, bank.s.mask_mode)
        v_pre = bank.velocity(base, None, batch["x_pre"], batch["pre_ctx"], t)[0]
        return jax.lax.stop_gradient((O.negative_target(v[:b], v[b:], batch["eta"]), masks, v_pre))

    parts = {
        "sampler_step": (sampler_step, (base, state.phi, batch["x_t"], batch["t"], batch["ctx"], batch["uncond"])),
        "frozen_passes": (frozen_passes, (base, batch)),
        "step_bank": (bank.__call__, (state, base, batch)),
        "step_current": (current.__call__, (state, base, batch)),
    }
    compiled, compile_s, flops, seconds = {}, {}, {}, {}
    for name, (fn, args) in parts.items():
        t0 = time.perf_counter()
        compiled[name] = jax.jit(fn).lower(*args).compile()
        compile_s[name] = round(time.perf_counter() - t0, 2)
        flops[name] = _flops(compiled[name])
        jax.block_until_ready(compiled[name](*args))  # warm-up
        # the best of the repeats: noise (another process, a page fault) only ever adds time, and the
        # trained pass is a difference of two timings
        seconds[name] = min(_timed(lambda: jax.block_until_ready(compiled[name](*args))) for _ in range(a.repeats))
    # the current step's while loops are counted once by the cost analysis: add the j sampler steps of
    # x_t (erased model) and of x_pre (frozen model) it runs
    flops["step_current"] += 2 * J_MEAN * flops["sampler_step"]
    trained_s = max(seconds["step_bank"] - seconds["frozen_passes"], 1e-9)
    trained_flops = flops["step_bank"] - flops["frozen_passes"]
    peak, peak_source = peak_flops(device, jnp.dtype(a.dtype))
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    peak_mem = (stats or {}).get("peak_bytes_in_use")
    grid = model.token_grid(latent_shape[0], latent_shape[2], latent_shape[3])
    result = dict(
        size=a.size, device=str(getattr(device, "device_kind", device.platform)), platform=device.platform,
        jax=jax.__version__, dtype=a.dtype, attention=a.attention, remat=a.remat, rank=a.rank,
        latent_shape=list(latent_shape), video_tokens=math.prod(grid), text_tokens=text_len,
        params=int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        peak_flops=peak, peak_source=peak_source, compile_s=compile_s,
        seconds={k: round(v, 4) for k, v in seconds.items()}, trained_pass_s=round(trained_s, 4),
        flops=flops, trained_pass_flops=trained_flops,
        mfu_sampler_step=flops["sampler_step"] / seconds["sampler_step"] / peak,
        mfu_trained_pass=trained_flops / trained_s / peak,
        mfu_step_current=flops["step_current"] / seconds["step_current"] / peak,
        iteration_s_bank=seconds["step_bank"], iteration_s_current=seconds["step_current"],
        projected_500_steps_min_bank=500 * seconds["step_bank"] / 60,
        projected_500_steps_min_current=500 * seconds["step_current"] / 60,
        peak_device_memory_gb=None if peak_mem is None else peak_mem / 1e9,
        targets=dict(mfu_trained_pass=0.5, projected_500_steps_min=20.0),
        wall_s=round(time.perf_counter() - t_start, 1))
    print(table(result))
    print(json.dumps(result))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(r: dict) -> str:
    mem = "n/a" if r["peak_device_memory_gb"] is None else f"{r['peak_device_memory_gb']:.1f} GB"
    rows = [
        ("device", f"{r['device']} ({r['platform']}), jax {r['jax']}, {r['dtype']}, attention {r['attention']}, "
                   f"remat {r['remat']}"),
        ("model", f"{r['params'] / 1e9:.2f}B params, {r['video_tokens']} video + {r['text_tokens']} text tokens"),
        ("peak", f"{r['peak_flops'] / 1e12:.0f} TFLOP/s ({r['peak_source']})"),
        ("CFG sampler step", f"{r['seconds']['sampler_step']:.3f} s, MFU {r['mfu_sampler_step']:.1%}"),
        ("trained pass", f"{r['trained_pass_s']:.3f} s, MFU {r['mfu_trained_pass']:.1%} (target 50%)"),
        ("iteration, frozen bank", f"{r['iteration_s_bank']:.3f} s; 500 steps {r['projected_500_steps_min_bank']:.1f} min"),
        ("iteration, current (j = 25)", f"{r['iteration_s_current']:.3f} s; 500 steps "
                                        f"{r['projected_500_steps_min_current']:.1f} min (target 20)"),
        ("peak device memory", mem),
        ("compile (s)", ", ".join(f"{k} {v}" for k, v in r["compile_s"].items())),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


if __name__ == "__main__":
    run(sys.argv[1:])
