"""Per-device memory of a full-size erasure train step on an 8-device mesh, without a GPU: CogVideoX-5B
at 49x480x720 (`--model cogvideox_5b`, the default), Wan 2.1-14B at 81x480x832 (`wan21_14b`), Wan 2.2
TI2V-5B at 121x704x1280 (`wan22_5b`), HunyuanVideo 13B at 61x544x960 (`hunyuan_video`); each model's video size is its default (`--frames/--height/--width`).

The step (`train.ErasureStep`: x_t sampled with the current erased model by the 50-step DDIM CFG loop,
the frozen passes with the localization masks, the preservation pass, the gradient and the Adam
update) is compiled ahead of time for 8 simulated host devices from abstract inputs only
(ShapeDtypeStructs with their NamedShardings; no weight is ever allocated; the model built through its
family, `families.get(...)`, from the full-size config in tests/data/model_configs), and XLA's buffer
assignment is read back from `compiled.memory_analysis()`:

    argument, output, temp, generated code and alias (donated) bytes, per device;
    total = argument + output - alias + temp + generated code.

bf16 is compiled as float16 by default (--half): the same 2 bytes per element, but XLA:CPU keeps
float16 as float16, while it rewrites every bfloat16 op to float32 (its float-normalization pass;
the CPU dot emitter has no bf16) and hoists an f32 copy of every stacked bf16 weight out of the
layer scan and sampler loops, i.e. +2x the base weights and 2x every bf16 activation: a CPU
artifact that a GPU/TPU compile (native bf16) does not have. `adapter_dp_full_cpu_bf16` shows it.

Attention runs on the library's "chunked" path (`attention="chunked"`: query blocks of
--attention-chunk rows, default 256, one (B, 48, block, 17776) fp32 logits block live at a time,
recomputed per block in the backward pass) instead of "xla", which on CPU materialises the whole
(B, 48, 17776, 17776) matrix (~30 GB per layer). A fused flash kernel (cuDNN on GPU, Splash on TPU)
keeps no logits block at all, so the smaller the block, the closer the figure is to a flash run.

The figures are the CPU compiler's buffer assignment for the SPMD-partitioned per-device program:
a proxy for a GPU/TPU compile (other fusions, other scheduling, collectives overlapped), not a
measurement on one. On a GPU, JAX preallocates 75% of its memory by default: raise
XLA_PYTHON_CLIENT_MEM_FRACTION (e.g. 0.95) before reading "fits in 80 GB" as "runs".

    python benchmarks/memory_plan.py                 # every configuration, one subprocess each
    python benchmarks/memory_plan.py --only adapter_dp_full,full_fsdp_full
    python benchmarks/memory_plan.py --model wan21_14b --only adapter_fsdp_full,adapter_dp_full,full_fsdp_full
    python benchmarks/memory_plan.py --list

Prints one JSON line per configuration and a markdown table at the end.
"""
from __future__ import annotations

import os

_DEVICES = 8
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "model_configs"
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Model:
    family: str
    transformer: str  # config files in CONFIG_DIR
    vae: str
    scheduler: str
    sampler: str
    frames: int
    height: int
    width: int
    text_len: int
    boundary_ratio: float | None = None  # two experts of the transformer config (Wan 2.2 A14B), switched here


MODELS = {
    "cogvideox_5b": Model("cogvideox", "cogvideox_5b_transformer.json", "cogvideox_2b_vae.json",
                          "cogvideox_5b_scheduler.json", "ddim", 49, 480, 720, 226),
    "wan21_14b": Model("wan", "wan2.1_t2v_14b_transformer.json", "wan21_vae.json", "wan21_scheduler.json", "unipc",
                       81, 480, 832, 512),
    "wan22_5b": Model("wan", "wan2.2_ti2v_5b_transformer.json", "wan22_vae.json", "wan22_ti2v_5b_scheduler.json",
                      "unipc", 121, 704, 1280, 512),
    # both experts (the same config), the size configs/wan22_a14b_nudity.py trains at
    "wan22_a14b": Model("wan", "wan2.2_t2v_a14b_transformer.json", "wan21_vae.json", "wan22_scheduler.json", "unipc",
                        81, 480, 832, 512, boundary_ratio=0.875),
    # the size configs/hunyuan_video_nudity.py trains at (the pipeline's default is 129 x 720 x 1280)
    "hunyuan_video": Model("hunyuan_video", "hunyuan_video_transformer.json", "hunyuan_video_vae.json",
                           "hunyuan_video_scheduler.json", "flow_euler", 61, 544, 960, 256),
}


def _vae_config(family, path: Path):
    """The VAE config object of `family` read from a config file (a VAE folder's config.json)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(path.read_text())
        return family.vae_config(Path(d))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    eraser: str  # adapter | full
    mesh: str  # dp (data=8) | fsdp (fsdp=8)
    batch: int  # global batch (prompts per step)
    remat: str
    note: str
    alpha_loc: float = 1.0
    mask_key_chunk: int = 1024
    half: str | None = None  # the 16-bit dtype compiled (None: --half)
    attention_chunk: int | None = None  # None: --attention-chunk
    rules: tuple = ()  # (logical, mesh axis) pairs overriding parallel.DEFAULT_RULES


ADALN_FSDP = (("adaln", ("tensor", "fsdp")),)  # also split the AdaNorm modulation weights over fsdp


CASES = [
    Case("adapter_dp_full", "adapter", "dp", 8, "full",
         "data parallel: weights replicated, batch 8 = one sample per device"),
    Case("adapter_dp_dots_no_batch", "adapter", "dp", 8, "dots_no_batch",
         "data parallel: weights replicated, batch 8 = one sample per device"),
    Case("adapter_fsdp_full", "adapter", "fsdp", 1, "full",
         "FSDP: weights split 8 ways, batch 1 replicated (the default erase config)"),
    Case("adapter_fsdp_dots_no_batch", "adapter", "fsdp", 1, "dots_no_batch",
         "FSDP: weights split 8 ways, batch 1 replicated (the default erase config)"),
    Case("adapter_fsdp_b8_full", "adapter", "fsdp", 8, "full",
         "FSDP: weights split 8 ways, batch 8 = one sample per device"),
    Case("adapter_fsdp_full_adaln_fsdp", "adapter", "fsdp", 1, "full",
         "as adapter_fsdp_full with the rule adaln -> (tensor, fsdp)", rules=ADALN_FSDP),
    Case("full_fsdp_full", "full", "fsdp", 1, "full",
         "full fine-tune, FSDP: base + fp32 copies + Adam split 8 ways, batch 1 replicated"),
    Case("full_fsdp_dots_no_batch", "full", "fsdp", 1, "dots_no_batch",
         "full fine-tune, FSDP: base + fp32 copies + Adam split 8 ways, batch 1 replicated"),
    Case("full_fsdp_b8_full", "full", "fsdp", 8, "full",
         "full fine-tune, FSDP: base + fp32 copies + Adam split 8 ways, batch 8 = one sample per device"),
    Case("full_fsdp_full_adaln_fsdp", "full", "fsdp", 1, "full",
         "as full_fsdp_full with the rule adaln -> (tensor, fsdp)", rules=ADALN_FSDP),
    # The chunked attention's query block (per live buffer: one (B, 48, block, 17776) fp32 logits block):
    Case("adapter_dp_full_attnchunk1024", "adapter", "dp", 8, "full",
         "as adapter_dp_full with attention_chunk=1024", attention_chunk=1024),
    Case("adapter_fsdp_full_attnchunk1024", "adapter", "fsdp", 1, "full",
         "as adapter_fsdp_full with attention_chunk=1024", attention_chunk=1024),
    Case("full_fsdp_full_attnchunk1024", "full", "fsdp", 1, "full",
         "as full_fsdp_full with attention_chunk=1024", attention_chunk=1024),
    Case("adapter_dp_full_noloc_attnchunk1024", "adapter", "dp", 8, "full",
         "as adapter_dp_full_noloc with attention_chunk=1024", alpha_loc=0.0, attention_chunk=1024),
    Case("adapter_dp_full_noloc_attnchunk128", "adapter", "dp", 8, "full",
         "as adapter_dp_full_noloc with attention_chunk=128", alpha_loc=0.0, attention_chunk=128),
    # The localization mask's key-chunked softmax normaliser (objectives.concept_attention_map):
    Case("adapter_dp_full_maskchunk256", "adapter", "dp", 8, "full",
         "as adapter_dp_full with erase.mask_key_chunk=256", mask_key_chunk=256),
    Case("adapter_dp_full_maskchunk4096", "adapter", "dp", 8, "full",
         "as adapter_dp_full with erase.mask_key_chunk=4096", mask_key_chunk=4096),
    Case("adapter_dp_full_noloc", "adapter", "dp", 8, "full",
         "as adapter_dp_full with alpha_loc=0 (no masks, no concept attention map)", alpha_loc=0.0),
    # What XLA:CPU does to real bf16 (see the module docstring): the CPU artifact, not a GPU estimate.
    Case("adapter_dp_full_cpu_bf16", "adapter", "dp", 8, "full",
         "as adapter_dp_full compiled with real bfloat16 (XLA:CPU upcasts it to f32)", half="bfloat16"),
]
DEFAULT_CASES = [c.name for c in CASES]


def _sds(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def analyse(case: Case, args) -> dict:
    """Builds the abstract step inputs for `case`, compiles the step and returns its memory figures."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from unlearn_jax import families
    from unlearn_jax.conversion import module_targets
    from unlearn_jax.erasers import EraserConfig, eraser_axes, init_erasers
    from unlearn_jax.jsonfiles import read_json_object
    from unlearn_jax.parallel import DEFAULT_RULES, make_mesh, named_sharding
    from unlearn_jax.schedulers import SchedulerConfig, make_schedule
    from unlearn_jax.train import ErasureStep, StepSettings, init_state, make_optimizer

    t0 = time.perf_counter()
    assert jax.device_count() == _DEVICES, jax.devices()
    spec = MODELS[args.model]
    family = families.get(spec.family)
    path = CONFIG_DIR / spec.transformer
    cfg = family.transformer_config(read_json_object(path, "transformer config"), str(path))
    if spec.boundary_ratio is not None:
        from unlearn_jax.models.wan_experts import WanExpertsConfig

        cfg = WanExpertsConfig(cfg, cfg, spec.boundary_ratio)
    override = dict(case.rules)
    rules = tuple((k, override.pop(k, v)) for k, v in DEFAULT_RULES) + tuple(override.items())
    chunk = case.attention_chunk or args.attention_chunk
    mesh = make_mesh({"data": _DEVICES, "fsdp": 1, "tensor": 1} if case.mesh == "dp"
                     else {"data": 1, "fsdp": _DEVICES, "tensor": 1})
    half_name = case.half or args.half
    bf16 = jnp.dtype(half_name)  # the "bf16" weights/compute/text embeddings (float16 stand-in by default)
    model = family.abstract_transformer(cfg, dtype=bf16, param_dtype=bf16, attention="chunked",
                                        attention_chunk=chunk, remat=case.remat, mesh=mesh, rules=tuple(rules))

    # Frozen base weights: bf16, each leaf sharded from its logical axes (as loading.load_transformer does).
    targets = module_targets(model, dtype=bf16, mesh=mesh, rules=rules)
    graphdef, state = nnx.split(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        tgt = targets.get(key)
        if tgt is not None:
            var = var.replace(_sds(tgt.shape, tgt.dtype, tgt.sharding))
        flat.append((path, var))
    base = nnx.from_flat_state(flat)

    # Trainable erasers (fp32) + Adam moments, sharded like the model; counters/RNG replicated.
    ec = EraserConfig(case.eraser, rank=args.rank)
    phi = jax.eval_shape(lambda st: init_erasers(ec, nnx.merge(graphdef, st), jax.random.key(0)), state)
    axes = eraser_axes(ec, phi, model)
    phi_sh = jax.tree.map(lambda a, x: named_sharding(a, x.shape, mesh, rules), axes, phi,
                          is_leaf=lambda a: isinstance(a, tuple))
    optimizer = make_optimizer(1e-4, grad_clip=1.0)
    repl = NamedSharding(mesh, PartitionSpec())
    state_abs = jax.eval_shape(lambda p: init_state(p, optimizer, 0), phi)
    opt_abs = optax.tree_map_params(optimizer, lambda x, s: _sds(x.shape, x.dtype, s), state_abs.opt_state, phi_sh,
                                    transform_non_params=lambda x: _sds(x.shape, x.dtype, repl))
    state_abs = state_abs._replace(
        step=_sds(state_abs.step.shape, state_abs.step.dtype, repl),
        phi=jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), phi, phi_sh),
        opt_state=opt_abs, rng=_sds(state_abs.rng.shape, state_abs.rng.dtype, repl))
    state_sh = jax.tree.map(lambda x: x.sharding, state_abs)

    # The batch, placed like erase.Run._place: batched keys split over data x fsdp when they divide.
    ctx_dim = getattr(cfg, "text_embed_dim", None) or cfg.text_dim
    b, text_len, kc = case.batch, spec.text_len, args.concept_tokens
    bspec = named_sharding(("batch",), (b,), mesh, rules).spec[0]

    def batched(shape, dtype):
        return _sds(shape, dtype, NamedSharding(mesh, PartitionSpec(bspec, *([None] * (len(shape) - 1)))))

    def cond(n, place):
        if spec.family != "hunyuan_video":
            return place((n, text_len, ctx_dim), bf16)
        return {"text": place((n, text_len, ctx_dim), bf16), "mask": place((n, text_len), jnp.int32),
                "pooled": place((n, cfg.pooled_projection_dim), bf16), "guidance": place((n,), jnp.float32)}

    batch = dict(
        ctx=cond(b, batched), pre_ctx=cond(b, batched),
        uncond=cond(1, lambda shape, dtype: _sds(shape, dtype, repl)), pre_valid=batched((b,), jnp.float32),
        concept_idx=batched((b, kc), jnp.int32), concept_valid=batched((b, kc), jnp.bool_),
        eta=batched((b,), jnp.float32), j=_sds((), jnp.int32, repl))

    video = family.video_shape(cfg, _vae_config(family, CONFIG_DIR / spec.vae), args.frames or spec.frames,
                               args.height or spec.height, args.width or spec.width)
    latent_shape = video.latent_shape
    sched_cfg = family.scheduler_config(SchedulerConfig.from_diffusers(CONFIG_DIR / spec.scheduler, kind=spec.sampler))
    settings = StepSettings(num_sampler_steps=50, guidance_scale=6.0 if family.guidance == "embedding" else 3.0, xt_source="current", alpha_loc=case.alpha_loc,
                            beta_pre=1.0, mask_key_chunk=case.mask_key_chunk, grad_clip=1.0)
    step = ErasureStep(model, ec, make_schedule(sched_cfg, 50), settings, optimizer, latent_shape)

    t_build = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0,), out_shardings=(state_sh, None)).lower(state_abs, base, batch)
    t_lower = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter()
    ma = compiled.memory_analysis()

    def leaf_bytes(tree):  # per-device bytes of an abstract sharded tree
        total = 0
        for x in jax.tree.leaves(tree):
            shard = x.sharding.shard_shape(x.shape)
            total += jnp.dtype(x.dtype).itemsize * math.prod(shard)
        return total

    video_tokens = math.prod(family.token_grid(model, latent_shape))
    # the self-attention's sequence: [text; video] (CogVideoX), [video; text] (HunyuanVideo), video (Wan)
    tokens = video_tokens + (text_len if spec.family in ("cogvideox", "hunyuan_video") else 0)
    arg, out, tmp = ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes
    code, alias = ma.generated_code_size_in_bytes, ma.alias_size_in_bytes
    total = arg + out - alias + tmp + code
    return dict(
        model=args.model, video=[video.num_frames, video.height, video.width],
        config=case.name, half_dtype_compiled=half_name, eraser=case.eraser,
        rank=args.rank if case.eraser == "adapter" else None,
        mesh=dict(mesh.shape), layout=case.note, global_batch=b,
        per_device_batch=b // _DEVICES if bspec else b, remat=case.remat, attention="chunked",
        attention_chunk=chunk, rules_override=[list(r) for r in case.rules], alpha_loc=case.alpha_loc, beta_pre=1.0,
        mask_key_chunk=case.mask_key_chunk, latent_shape=list(latent_shape), tokens=tokens,
        trainable_params=int(sum(x.size for x in jax.tree.leaves(phi))),
        base_weights_gb=leaf_bytes(base) / GB, train_state_gb=leaf_bytes(state_abs) / GB,
        argument_gb=arg / GB, output_gb=out / GB, temp_gb=tmp / GB, generated_code_gb=code / GB,
        alias_gb=alias / GB, total_gb=total / GB, total_gib=total / 2**30, fits_80gb=total < 80 * GB,
        build_s=round(t_build - t0, 1), lower_s=round(t_lower - t_build, 1), compile_s=round(t_compile - t_lower, 1),
        device=str(jax.devices()[0].platform), jax=jax.__version__)


# ---- the driver: one subprocess per configuration, watched for time and RAM -------------------
def _rss_gb(pid: int) -> float:
    """Resident memory of `pid` and its children (GB)."""
    total = 0
    try:
        out = subprocess.run(["ps", "-o", "rss=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        kids = [int(x) for x in out.split()]
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        total += sum(kids)
    except (OSError, ValueError):
        pass
    return total * 1024 / GB


def run_case(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--rank", str(args.rank),
           "--attention-chunk", str(args.attention_chunk), "--concept-tokens", str(args.concept_tokens),
           "--half", args.half]
    for flag, v in (("--frames", args.frames), ("--height", args.height), ("--width", args.width)):
        if v:
            cmd += [flag, str(v)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, why = [0.0], [None]

    def watch():
        while proc.poll() is None:
            rss = _rss_gb(proc.pid)
            peak[0] = max(peak[0], rss)
            elapsed = time.perf_counter() - t0
            if rss > args.max_rss_gb:
                why[0] = f"host RSS {rss:.1f} GB over the {args.max_rss_gb} GB limit"
            elif elapsed > args.timeout:
                why[0] = f"not compiled within {args.timeout} s"
            if why[0]:
                proc.kill()
                return
            time.sleep(1.0)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    th.join()
    wall = round(time.perf_counter() - t0, 1)
    rec = None
    for line in stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
    if rec is None:
        rec = dict(config=name, error=why[0] or f"exit {proc.returncode}: " + stderr.strip()[-1500:])
    rec.update(host_peak_rss_gb=round(peak[0], 2), wall_s=wall)
    return rec


def table(rows: list[dict]) -> str:
    head = ("| config | layout | batch (global / per device) | remat | args GB | out GB | alias GB | temp GB | "
            "code GB | **total GB / device** | total GiB | fits 80 GB |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error'][:120]} |" + " |" * 10)
            continue
        mesh = "data=8" if r["mesh"].get("data", 1) > 1 else "fsdp=8"
        lines.append(
            f"| {r['config']} | {r['eraser']}, {mesh} | {r['global_batch']} / {r['per_device_batch']} | {r['remat']} | "
            f"{r['argument_gb']:.2f} | {r['output_gb']:.2f} | {r['alias_gb']:.2f} | {r['temp_gb']:.2f} | "
            f"{r['generated_code_gb']:.3f} | **{r['total_gb']:.2f}** | {r['total_gib']:.2f} | "
            f"{'yes' if r['fits_80gb'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(DEFAULT_CASES), help="comma-separated configuration names")
    p.add_argument("--list", action="store_true")
    p.add_argument("--model", choices=sorted(MODELS), default="cogvideox_5b")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--frames", type=int, default=None, help="pixel frames (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="default: the model's")
    p.add_argument("--width", type=int, default=None, help="default: the model's")
    p.add_argument("--attention-chunk", type=int, default=256,
                   help="query block of the chunked attention (smaller = closer to a flash kernel's memory)")
    p.add_argument("--half", choices=("float16", "bfloat16"), default="float16",
                   help="16-bit dtype compiled for the bf16 weights and compute (float16: same bytes, kept 16-bit "
                        "by XLA:CPU; bfloat16: XLA:CPU upcasts it to f32)")
    p.add_argument("--concept-tokens", type=int, default=16, help="concept_idx width (prompts.max_concept_tokens)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    p.add_argument("--max-rss-gb", type=float, default=16.0, help="host RAM limit per configuration")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    by_name = {c.name: c for c in CASES}
    if args.list:
        for c in CASES:
            print(f"{c.name}: {c.note}")
        return
    if args.child:
        print(json.dumps(analyse(by_name[args.child], args)), flush=True)
        return
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        p.error(f"unknown configurations {unknown}; --list shows them")
    rows = []
    for n in names:
        rec = run_case(n, args)
        print(json.dumps(rec), flush=True)
        rows.append(rec)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
