"""Text-to-video generation in JAX from a diffusers pipeline folder of any supported family (`unlearn-jax sample`).

    gen = VideoGenerator.from_pipeline("/models/CogVideoX-2b", erasers="runs/nudity/export/erasers")
    videos = gen.generate(["a cat on a sofa"], seeds=[42])   # (1, 49, 480, 720, 3) float32 in [0, 1]

It computes what the family's pipeline `__call__` computes, with the project's parts, each the
folder's family provides (`families`): the prompt conditioning (CogVideoX: the T5 embeddings of
`text_encoding.encode_prompts`, the pipeline's `encode_prompt`), the guided sampler
(`sampling.sample`, the pipeline's denoising loop: one batched [uncond; cond] call per step, the
dynamic-CFG ramp), the JAX transformer (with trained erasers when asked) and the JAX VAE; frames
are post-processed as the pipeline's `output_type="np"` (CogVideoX: latents -> 1/scaling_factor ->
VAE decode -> (x/2 + 0.5).clip(0, 1) -> (F, H, W, 3)). A CogVideoX folder without `vae/` (the
bundled toy world) samples pixels directly: its "latents" are frames in [-1, 1], returned as
clip((x + 1) / 2, 0, 1).

Defaults follow the pipeline and the models' own examples (CogVideoX's here):
- video size: the pipeline's, from the transformer config (`sample_frames`, `sample_height` and
  `sample_width` times the VAE's spatial factor): 49 frames of 480x720 for CogVideoX-2B/5B.
  For CogVideoX1.5 pass the size its model card recommends (e.g. 81 frames, 768x1360).
- sampler: CogVideoXDDIMScheduler for models without rotary embeddings (2B) and
  CogVideoXDPMScheduler for RoPE models (5B, 1.5), as CogVideo's demo and the diffusers docs
  recommend; either takes its betas, spacing and SNR shift from the folder's `scheduler/`.
- dynamic CFG: on with DPM, off with DDIM (as those examples run them).
- VAE tiling: as `pipe.vae.enable_tiling()` (the CogVideo demo's setting): frames larger than
  the VAE's tile (half its sample size) are decoded in overlapping tiles, which bounds memory;
  `vae_tiling=False` decodes whole frames, as a plain pipeline call does.

Noise, one seed per video:
- `noise="jax"`: the initial latents are `jax.random.normal(jax.random.key(seed), (1, F, C, h, w))`
  (float32; seeds >= 2**32 use both 32-bit words of the seed, as `jax.random.key` does with
  64-bit mode on); DPM's per-step noise is `normal(fold_in(key(seed), i + 1))` for step i.
- `noise="torch"` (needs PyTorch): exactly what diffusers draws for
  `generator=torch.Generator("cpu").manual_seed(seed)` in a pipeline call for that one video in
  the same dtype: the initial latents `randn_tensor((1, F, C, h, w))` of `prepare_latents`
  (times the schedulers' init_noise_sigma, 1.0), then DPM's per-step draws in the order its
  `step` makes them. Seeds therefore reproduce a diffusers run's noise bit for bit.
Either way a video depends on its own prompt and seed only, never on the batch it ran in.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax import families
from unlearn_jax.baselines.conditioning import thresholds, windowed, windowed_uncond, windowed_velocity
from unlearn_jax.checks import finite_number as _number
from unlearn_jax.checks import positive_int as _int
from unlearn_jax.dtypes import dtype_name as _dtype_name
from unlearn_jax.errors import UnlearnError
from unlearn_jax.families.base import VideoShape, leading_size
from unlearn_jax.families.base import take_rows as take
from unlearn_jax.prompt_sets import MAX_SEED, check_seed  # noqa: F401  (re-exported: they used to live here)
from unlearn_jax.sampling import sample, uses_cfg
from unlearn_jax.schedulers import SchedulerConfig, make_schedule

log = logging.getLogger(__name__)

NOISE_SOURCES = ("jax", "torch")


# --------------------------------------------------------------------------------------------
# Argument checks (one-line errors)
# --------------------------------------------------------------------------------------------
def _check_noise(noise: str):
    if noise not in NOISE_SOURCES:
        raise UnlearnError(f"noise = {noise!r} is invalid; expected one of {', '.join(NOISE_SOURCES)}")
    if noise == "torch" and importlib.util.find_spec("torch") is None:
        raise UnlearnError("noise='torch' reproduces torch.Generator draws and needs PyTorch "
                           "(pip install -e '.[torch]'); use noise='jax' otherwise")


# --------------------------------------------------------------------------------------------
# The pipeline folder
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PipelineFolder:
    """The parts of a diffusers pipeline folder that sampling reads, and the family that reads them."""

    root: Path
    family: families.Family
    transformer: Path
    scheduler_config: Path
    vae: Path | None          # None: the transformer works on pixels (no VAE)

    @classmethod
    def open(cls, path) -> "PipelineFolder":
        root = Path(path)
        hint = "point to a diffusers pipeline folder (transformer/, scheduler/, tokenizer/, text_encoder/, vae/)"
        if not root.exists():
            raise UnlearnError(f"{root}: no such folder; {hint}")
        if not root.is_dir():
            raise UnlearnError(f"{root}: not a folder; {hint}")
        # the parts every family's pipeline has, before the family is read from them
        missing = [p for p in ("transformer", "tokenizer", "text_encoder") if not (root / p).is_dir()]
        if missing:
            raise UnlearnError(f"{root}: no {'/, '.join(missing)}/ folder; {hint}")
        family = families.of_folder(root)
        missing = [p for p in family.pipeline_parts if not (root / p).is_dir()]
        if missing:
            raise UnlearnError(f"{root}: no {'/, '.join(missing)}/ folder; point to a diffusers {family.title} "
                               f"pipeline folder ({', '.join(p + '/' for p in family.pipeline_parts)} scheduler/)")
        sched = root / "scheduler" / "scheduler_config.json"
        if not sched.is_file():
            raise UnlearnError(f"{root}: no scheduler/scheduler_config.json; {hint}")
        named_vae = None
        if (root / "model_index.json").is_file():
            from unlearn_jax.jsonfiles import read_json_object

            entry = read_json_object(root / "model_index.json").get("vae")
            named_vae = isinstance(entry, list) and len(entry) == 2 and entry[1] is not None
        vae = root / "vae"
        if not vae.is_dir():
            if named_vae:
                raise UnlearnError(f"{root}: model_index.json names a VAE but there is no vae/ folder")
            vae = None
        elif not (vae / "config.json").is_file():
            raise UnlearnError(f"{vae}: no config.json (a diffusers VAE folder)")
        family.check_folder(root)
        return cls(root, family, root / "transformer", sched, vae)

    def transformer_config(self):
        """The config object of the pipeline's model (the family's: Wan 2.2 A14B's covers both experts)."""
        return self.family.pipeline_transformer_config(self.root, self._read_transformer_config)

    def _read_transformer_config(self, folder: Path):
        from unlearn_jax.families import ORBAX_MARKER
        from unlearn_jax.jsonfiles import read_json_object

        if (folder / "config.json").is_file():
            path = folder / "config.json"
            return self.family.transformer_config(read_json_object(path, "transformer config"), str(path))
        if (folder / ORBAX_MARKER).is_file():
            meta = read_json_object(folder / ORBAX_MARKER)
            return self.family.transformer_config(meta.get("config", {}), str(folder / ORBAX_MARKER))
        raise UnlearnError(f"{folder}: no config.json (a diffusers {self.family.transformer_class} folder)")

    def vae_config(self):
        return None if self.vae is None else self.family.vae_config(self.vae)


def video_shape(model_cfg, vae_cfg, num_frames=None, height=None, width=None) -> VideoShape:
    """The pipeline's video size for a transformer config of any family (`Family.video_shape`)."""
    return families.of_config(model_cfg).video_shape(model_cfg, vae_cfg, num_frames, height, width)


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------
def jax_keys(seeds: Sequence[int]) -> jax.Array:
    """(N,) PRNG keys: `jax.random.key(seed)` for each seed (both 32-bit words for seeds >= 2**32)."""
    seeds = [check_seed(s) for s in seeds]
    if jax.config.jax_default_prng_impl == "threefry2x32":
        words = np.array([[s >> 32, s & 0xFFFFFFFF] for s in seeds], np.uint32).reshape(len(seeds), 2)
        return jax.random.wrap_key_data(words)
    if any(s >= 2**32 for s in seeds):
        raise UnlearnError(f"seeds >= 2**32 need the default threefry PRNG (jax_default_prng_impl is "
                           f"{jax.config.jax_default_prng_impl!r})")
    return jnp.stack([jax.random.key(s) for s in seeds])


def jax_noise(seed: int, shape) -> np.ndarray:
    """The initial latents of `noise="jax"`: `normal(key(seed), shape)`, float32."""
    return np.asarray(jax.random.normal(jax_keys([seed])[0], tuple(shape), jnp.float32))


_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def torch_noise(seed: int, shape, dtype: str = "float32", *, initial: bool = True, dpm_timesteps=None,
                num_train_timesteps: int = 1000) -> tuple[np.ndarray | None, np.ndarray | None]:
    """What diffusers draws from `torch.Generator("cpu").manual_seed(seed)` in a CogVideoX pipeline
    call for one video, in the pipeline's dtype, as float32 arrays (exact: bf16/fp16 widen losslessly).

    initial: the latents `prepare_latents` draws (`randn_tensor(shape)`; False when the caller
    passes `latents=` to the pipeline, which then draws nothing).
    dpm_timesteps: the (N,) timesteps of a CogVideoXDPMScheduler run: then also the per-step noise
    its `step` draws (one normal per step, a second one, the one used, on steps that take the
    second-order update: every step but the first whose `t - T // N` is >= 0). Returns
    (initial latents or None, (N, *shape) step noise or None).
    """
    import torch

    g = torch.Generator("cpu").manual_seed(check_seed(seed))
    tdtype = getattr(torch, _TORCH_DTYPES[_dtype_name(dtype)])
    shape = tuple(int(s) for s in shape)

    def draw():
        return torch.randn(shape, generator=g, device="cpu", dtype=tdtype).float().numpy()

    init = draw() if initial else None
    steps = None
    if dpm_timesteps is not None:
        ts = [int(t) for t in np.asarray(dpm_timesteps)]
        out = []
        for i, t in enumerate(ts):
            z = draw()
            if i > 0 and t - num_train_timesteps // len(ts) >= 0:
                z = draw()
            out.append(z)
        steps = np.stack(out)
    return init, steps


# --------------------------------------------------------------------------------------------
# Resolved settings (checked before any weight is read)
# --------------------------------------------------------------------------------------------
def _settings(sampler, num_steps, guidance_scale, use_dynamic_cfg, shape: VideoShape, dtype, noise, has_vae,
              vae_tiling, true_cfg_scale: float = 1.0, guidance_scale_2: float | None = None) -> dict:
    tiling = True if vae_tiling is None else vae_tiling
    out = {"sampler": sampler, "num_steps": int(num_steps), "guidance_scale": float(guidance_scale),
           "use_dynamic_cfg": bool(use_dynamic_cfg), "num_frames": shape.num_frames, "height": shape.height,
           "width": shape.width, "dtype": dtype, "noise": noise, "vae": bool(has_vae),
           "vae_tiling": (tiling if isinstance(tiling, bool) else dataclasses.asdict(tiling)) if has_vae else None}
    if true_cfg_scale != 1.0:  # only where used, so that earlier runs' settings still match
        out["true_cfg_scale"] = float(true_cfg_scale)
    if guidance_scale_2 is not None:  # two-stage models only, resolved (None = guidance_scale)
        out["guidance_scale_2"] = float(guidance_scale_2)
    return out


def _second_scale(family, model_cfg, guidance_scale: float, guidance_scale_2) -> float | None:
    """The scale below the model's guidance boundary, resolved as the pipeline does (None = guidance_scale);
    None for a model with one stage, which refuses a second scale in one line."""
    boundary = family.guidance_boundary(model_cfg)
    if boundary is None:
        if guidance_scale_2 is not None:
            raise UnlearnError(f"guidance_scale_2 = {guidance_scale_2!r} applies to two-stage models (Wan 2.2 A14B's "
                               f"low-noise expert); this {family.title} model has one stage")
        return None
    if guidance_scale_2 is None:
        return guidance_scale
    value = _number("guidance_scale_2", guidance_scale_2)
    if not uses_cfg(family.cfg_scale(guidance_scale)) and value != guidance_scale:
        raise UnlearnError(f"guidance_scale_2 = {value} has no effect with guidance_scale = {guidance_scale}: the "
                           "pipeline guides (either stage) only when guidance_scale > 1")
    return value


def _true_cfg(family, true_cfg_scale) -> float:
    """The classifier-free scale over the embedded guidance (HunyuanVideoPipeline's `true_cfg_scale`)."""
    if true_cfg_scale is None:
        return 1.0
    value = _number("true_cfg_scale", true_cfg_scale)
    if family.guidance != "embedding" and value != 1.0:
        raise UnlearnError(f"true_cfg_scale = {value} applies to models that take the guidance as an embedding "
                           f"(HunyuanVideo); {family.title}'s guidance_scale is already classifier-free guidance")
    return value


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """Every choice of a sampling run, resolved and checked from a pipeline folder's configs
    (no weights read): what `VideoGenerator.from_pipeline` loads and runs."""

    folder: PipelineFolder
    erasers: Path | None
    sampler: str
    scheduler: SchedulerConfig
    num_steps: int
    guidance_scale: float
    use_dynamic_cfg: bool
    shape: VideoShape
    dtype: str
    noise: str
    vae_tiling: object
    batch_size: int
    true_cfg_scale: float = 1.0
    eraser_scale: float | None = None  # None: the eraser folder's scale
    guidance_scale_2: float | None = None  # two-stage models: the scale below the boundary (resolved); else None

    @classmethod
    def resolve(cls, path, *, erasers=None, dtype="bfloat16", sampler: str | None = None, num_steps: int | None = None,
                guidance_scale: float | None = None, use_dynamic_cfg: bool | None = None,
                num_frames: int | None = None, height: int | None = None, width: int | None = None,
                noise: str = "jax", vae_tiling=None, batch_size: int = 1,
                true_cfg_scale: float | None = None, eraser_scale: float | None = None,
                guidance_scale_2: float | None = None) -> "SamplingPlan":
        """None = the family pipeline's default (sampler, steps, guidance, dynamic CFG, video size).
        true_cfg_scale: classifier-free guidance with the negative prompt over the embedded guidance of a
        guidance-distilled model (HunyuanVideoPipeline's `true_cfg_scale`; 1 = off, its default).
        eraser_scale: the erasers' output scale (the "eraser weight" of the authors' scripts; 0 = off);
        None: the eraser folder's (1 for the published format).
        guidance_scale_2: the guidance of the steps below the model's boundary (Wan 2.2 A14B: the low-noise
        expert's; the pipeline's `guidance_scale_2`); None = guidance_scale. Refused for one-stage models."""
        folder = PipelineFolder.open(path)
        family = folder.family
        dtype = _dtype_name(dtype)
        model_cfg = folder.transformer_config()
        vae_cfg = folder.vae_config()
        defaults = family.sampler_defaults(model_cfg)
        if sampler is None:
            sampler = defaults.sampler
        if sampler not in family.samplers:
            raise UnlearnError(f"sampler = {sampler!r} is invalid; expected one of {', '.join(family.samplers)} "
                               f"(the samplers of {family.title} pipelines)")
        if use_dynamic_cfg is None:
            use_dynamic_cfg = family.default_dynamic_cfg(sampler)
        elif not isinstance(use_dynamic_cfg, (bool, np.bool_)):
            raise UnlearnError(f"use_dynamic_cfg = {use_dynamic_cfg!r} is invalid; expected true or false")
        num_steps = _int("num_steps", defaults.num_steps if num_steps is None else num_steps)
        guidance_scale = _number("guidance_scale", defaults.guidance_scale if guidance_scale is None else guidance_scale)
        batch_size = _int("batch_size", batch_size)
        guidance_scale_2 = _second_scale(family, model_cfg, guidance_scale, guidance_scale_2)
        true_cfg_scale = _true_cfg(family, true_cfg_scale)
        if eraser_scale is not None:
            eraser_scale = _number("eraser_scale", eraser_scale)
            if erasers is None:
                raise UnlearnError("eraser_scale is set but no erasers are given")
        _check_noise(noise)
        family.check_tiling(vae_tiling)
        shape = family.video_shape(model_cfg, vae_cfg, num_frames, height, width)
        if vae_cfg is None and shape.channels != 3:
            raise UnlearnError(f"{folder.root}: no vae/ folder, so the transformer must work on RGB pixels "
                               f"(in_channels 3); it has in_channels {shape.channels}")
        if erasers is not None:
            erasers = Path(erasers)
            if not erasers.is_dir():
                raise UnlearnError(f"{erasers}: no such eraser folder")
        scheduler = family.scheduler_config(SchedulerConfig.from_diffusers(folder.scheduler_config, kind=sampler))
        return cls(folder, erasers, sampler, scheduler, num_steps, guidance_scale, bool(use_dynamic_cfg), shape,
                   dtype, noise, vae_tiling, batch_size, true_cfg_scale, eraser_scale, guidance_scale_2)

    def settings(self) -> dict:
        """The settings that determine the videos (besides prompts, seeds and weights)."""
        out = _settings(self.sampler, self.num_steps, self.guidance_scale, self.use_dynamic_cfg, self.shape,
                        self.dtype, self.noise, self.folder.vae is not None, self.vae_tiling, self.true_cfg_scale,
                        self.guidance_scale_2)
        if self.eraser_scale is not None:
            out["eraser_scale"] = self.eraser_scale
        return out


def _given_conditioning(value, what: str):
    """A user's precomputed conditioning: an (N, L, D) embeddings array, or a dict of arrays (N, ...)."""
    if isinstance(value, dict):
        if not value:
            raise UnlearnError(f"{what}: an empty dict")
        out = {k: np.asarray(v) for k, v in value.items()}
        out = {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in out.items()}
        sizes = {v.shape[0] if v.ndim else None for v in out.values()}
        if len(sizes) != 1 or None in sizes:
            raise UnlearnError(f"{what}: every array needs the same leading (prompt) axis; got "
                               f"{ {k: v.shape for k, v in out.items()} }")
        return out
    ctx = np.asarray(value, np.float32)
    if ctx.ndim != 3:
        raise UnlearnError(f"{what} must be (N, text_len, dim); got shape {ctx.shape}")
    return ctx


def _is_windowed(cond) -> bool:
    return isinstance(cond, dict) and set(cond) == {"early", "late", "until"}


def _cast(cond, dtype):
    """The conditioning's floating leaves in the compute dtype (masks and ids keep theirs)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, cond)


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------
class VideoGenerator:
    """Prompts + seeds -> videos, with a model, a scheduler and (optionally) a VAE held in memory.

    Build it with `from_pipeline`. The sampler is jitted once per batch shape with the model's
    parameters as an argument (never baked in as constants); batches of `batch_size` videos run
    together (the last one padded). `generate` returns every video at once; `iter_videos`
    yields them one at a time for long runs.
    """

    def __init__(self, model, scheduler: SchedulerConfig, shape: VideoShape, *, pipeline_dir=None, vae=None,
                 sampler: str | None = None, num_steps: int = 50, guidance_scale: float = 6.0,
                 use_dynamic_cfg: bool = False, dtype: str = "float32", noise: str = "jax", vae_tiling=None,
                 batch_size: int = 1, mesh=None, progress: bool = True, encoder_cache=None,
                 true_cfg_scale: float = 1.0, guidance_scale_2: float | None = None):
        """true_cfg_scale: CFG with the negative prompt over the embedded guidance (embedding-guided
        families, as HunyuanVideoPipeline's; 1 = off). encoder_cache: a `text_encoding.EncoderCache` to share the loaded T5 with other generators
        (e.g. an original and an erased model in one evaluation); default: this generator's own.
        guidance_scale_2: the guidance below the model's boundary (two-stage models such as Wan 2.2 A14B,
        whose boundary the model gives); None = guidance_scale, as the pipeline."""
        self.family = families.of_model(model)
        self.model, self.scheduler, self.shape, self.vae = model, scheduler, shape, vae
        self.pipeline_dir = None if pipeline_dir is None else Path(pipeline_dir)
        self.sampler = scheduler.kind if sampler is None else sampler
        if self.sampler != scheduler.kind:
            raise UnlearnError(f"sampler {self.sampler!r} but a {scheduler.kind!r} scheduler config")
        self.num_steps = _int("num_steps", num_steps)
        self.guidance_scale, self.use_dynamic_cfg = _number("guidance_scale", guidance_scale), bool(use_dynamic_cfg)
        self.dtype, self.noise = _dtype_name(dtype), noise
        _check_noise(noise)
        self.vae_tiling = True if vae_tiling is None else vae_tiling
        self.batch_size, self.mesh, self.progress = _int("batch_size", batch_size), mesh, progress
        self.schedule = make_schedule(scheduler, self.num_steps)
        self.true_cfg_scale = _true_cfg(self.family, true_cfg_scale)
        self.cfg = uses_cfg(self.family.cfg_scale(self.guidance_scale, self.true_cfg_scale))
        self.boundary = self.family.guidance_boundary(model.config)
        self.guidance_scale_2 = _second_scale(self.family, model.config, self.guidance_scale, guidance_scale_2)
        self._encoder_cache = encoder_cache
        self._neg_cache: dict[str, np.ndarray] = {}
        self._warned_tiling = False
        self._graphdef, self._state = nnx.split(model)
        self._jitted = jax.jit(self._make_run())
        self._compiled: dict = {}

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, path, *, erasers=None, dtype="bfloat16", sampler: str | None = None,
                      num_steps: int | None = None, guidance_scale: float | None = None,
                      use_dynamic_cfg: bool | None = None, num_frames: int | None = None,
                      height: int | None = None, width: int | None = None, noise: str = "jax", vae_tiling=None,
                      batch_size: int = 1, mesh=None, progress: bool = True, true_cfg_scale: float | None = None,
                      guidance_scale_2: float | None = None, **runtime) -> "VideoGenerator":
        """Reads a diffusers pipeline folder of any supported family (CogVideoX: transformer/, scheduler/,
        tokenizer/, text_encoder/ and vae/, which may be absent for pixel-space models).

        erasers: a folder of trained erasers (ours or the published format) to attach.
        dtype: parameters and compute of the transformer, text encoder and VAE (the pipeline's
            torch_dtype): "bfloat16" (default), "float32" or "float16".
        sampler / num_steps / guidance_scale: None = the family pipeline's defaults (CogVideoX: DDIM for
            models without RoPE, DPM for RoPE models; 50 steps; guidance 6).
        use_dynamic_cfg: None = the family's default for the sampler (CogVideoX: on for DPM, off for DDIM).
        guidance_scale_2: two-stage models (Wan 2.2 A14B): the low-noise stage's guidance (None = guidance_scale).
        num_frames / height / width: None = the pipeline's defaults (transformer config).
        noise: "jax" or "torch" (see the module docstring).
        vae_tiling: None/True tile frames larger than the VAE's tile (`enable_tiling()`), False
            never, or a `cogvideox_vae.TileSpec`.
        runtime: `attention=`, `remat=` ... for `load_transformer`.
        Every argument is checked (one-line `UnlearnError`) before any weight is read.
        """
        plan = SamplingPlan.resolve(path, erasers=erasers, dtype=dtype, sampler=sampler, num_steps=num_steps,
                                    guidance_scale=guidance_scale, use_dynamic_cfg=use_dynamic_cfg,
                                    num_frames=num_frames, height=height, width=width, noise=noise,
                                    vae_tiling=vae_tiling, batch_size=batch_size, true_cfg_scale=true_cfg_scale,
                                    guidance_scale_2=guidance_scale_2)
        return cls.from_plan(plan, mesh=mesh, progress=progress, **runtime)

    @classmethod
    def from_plan(cls, plan: "SamplingPlan", *, mesh=None, progress: bool = True, encoder_cache=None,
                  **runtime) -> "VideoGenerator":
        """Loads the weights a resolved `SamplingPlan` names."""
        from unlearn_jax.loading import load_transformer

        model = load_transformer(plan.folder.root, dtype=plan.dtype, mesh=mesh, erasers=plan.erasers, **runtime)
        if plan.eraser_scale is not None:
            model.eraser_config = dataclasses.replace(model.eraser_config, scale=plan.eraser_scale)
        vae = None
        if plan.folder.vae is not None:
            vae = plan.folder.family.load_vae(plan.folder.vae, dtype=plan.dtype, mesh=mesh)
        return cls(model, plan.scheduler, plan.shape, pipeline_dir=plan.folder.root, vae=vae, sampler=plan.sampler,
                   num_steps=plan.num_steps, guidance_scale=plan.guidance_scale, use_dynamic_cfg=plan.use_dynamic_cfg,
                   dtype=plan.dtype, noise=plan.noise, vae_tiling=plan.vae_tiling, batch_size=plan.batch_size,
                   mesh=mesh, progress=progress, encoder_cache=encoder_cache, true_cfg_scale=plan.true_cfg_scale,
                   guidance_scale_2=plan.guidance_scale_2)

    def with_model(self, model) -> "VideoGenerator":
        """A generator with every setting of this one (and its VAE and text encoder) around another model of
        the same configuration: e.g. an erased model's base."""
        return VideoGenerator(model, self.scheduler, self.shape, pipeline_dir=self.pipeline_dir, vae=self.vae,
                              sampler=self.sampler, num_steps=self.num_steps, guidance_scale=self.guidance_scale,
                              use_dynamic_cfg=self.use_dynamic_cfg, dtype=self.dtype, noise=self.noise,
                              vae_tiling=self.vae_tiling, batch_size=self.batch_size, mesh=self.mesh,
                              progress=self.progress, encoder_cache=self.encoder_cache,
                              true_cfg_scale=self.true_cfg_scale, guidance_scale_2=self.guidance_scale_2)

    def settings(self) -> dict:
        """The settings that determine the videos (besides prompts, seeds and weights)."""
        return _settings(self.sampler, self.num_steps, self.guidance_scale, self.use_dynamic_cfg, self.shape,
                         self.dtype, self.noise, self.vae is not None, self.vae_tiling, self.true_cfg_scale,
                         self.guidance_scale_2)

    # ---- the jitted sampler ------------------------------------------------------------------
    def _make_run(self):
        graphdef, schedule, family, guidance = self._graphdef, self.schedule, self.family, self.guidance_scale
        num_steps, dyn, dtype = self.num_steps, self.use_dynamic_cfg, jnp.dtype(self.dtype)
        # embedding-guided families: the scale in the conditioning, one pass (or true CFG over it)
        g = family.cfg_scale(guidance, self.true_cfg_scale)
        # two-stage models: the second stage's classifier-free scale below the model's boundary
        g2 = None if self.guidance_scale_2 is None else family.cfg_scale(self.guidance_scale_2, self.true_cfg_scale)
        boundary = self.boundary
        latent_dtype = jnp.dtype(self.family.noise_dtype(self.dtype))  # the pipeline's latents between steps
        item_shape = self.shape.noise_shape[1:]
        needs_noise = schedule.needs_noise

        def run(state, noise, keys, ctx, uncond, step_noise):
            """noise (B, F, C, h, w) or None (drawn from keys); step_noise (N, B, ...) or None (from keys)."""
            if noise is None:
                noise = jax.vmap(lambda k: jax.random.normal(k, item_shape, jnp.float32))(keys)
            if needs_noise and step_noise is None:
                step_noise = jax.vmap(lambda i: jax.vmap(lambda k: jax.random.normal(
                    jax.random.fold_in(k, i + 1), item_shape, jnp.float32))(keys))(jnp.arange(num_steps))
            model = nnx.merge(graphdef, state)
            velocity = lambda x, t, c: model.forward(x, c, t)[0]  # noqa: E731

            def prepare(c):
                return None if c is None else _cast(family.with_guidance(c, guidance), dtype)

            if _is_windowed(ctx):  # an inference-time method's conditioning (baselines.conditioning)
                prepare_rows = prepare

                def prepare(c):  # the window's timesteps stay float32
                    return None if c is None else {"early": prepare_rows(c["early"]), "late": prepare_rows(c["late"]),
                                                   "until": c["until"]}

                velocity = windowed_velocity(velocity)
            out = sample(velocity, schedule, noise.astype(latent_dtype), prepare(ctx), prepare(uncond),
                         num_steps=num_steps, guidance_scale=g,
                         use_dynamic_cfg=dyn, step_noise=step_noise if needs_noise else None, guidance_scale_2=g2,
                         boundary=boundary)
            return out.latents.astype(jnp.float32)

        return run

    def _run(self, *args):
        """The jitted sampler, compiled ahead of time once per input shapes so that a generation that
        cannot fit in memory is refused before it runs (`memory.check_fits`)."""
        from unlearn_jax.memory import check_fits

        key = jax.tree.structure(args), tuple((np.shape(x), str(np.asarray(x).dtype) if not hasattr(x, "dtype")
                                               else str(x.dtype)) for x in jax.tree.leaves(args))
        if key not in self._compiled:
            compiled = self._jitted.lower(*args).compile()
            s = self.shape
            check_fits(compiled, f"sampling {self.batch_size} video(s) of {s.num_frames} frames at {s.height}x{s.width}",
                       "use fewer frames, a smaller size or --batch-size 1 (or attention='chunked' for long videos)")
            self._compiled[key] = compiled
        return self._compiled[key](*args)

    # ---- text ------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]):
        """The family's conditioning of `prompts` (CogVideoX: (N, L, D) float32 prompt embeddings,
        `CogVideoXPipeline.encode_prompt`), encoded in this dtype."""
        if self.pipeline_dir is None:
            raise UnlearnError("this generator has no pipeline folder to encode prompts with; pass prompt_embeds")
        text = self.family.text(self.pipeline_dir, cache=self.encoder_cache)
        return text.encode(list(prompts), dtype=self.dtype, mesh=self.mesh)

    @property
    def encoder_cache(self):
        """The `EncoderCache` holding this generator's T5 (created on first use)."""
        from unlearn_jax.text_encoding import EncoderCache

        if self._encoder_cache is None:
            self._encoder_cache = EncoderCache(max_entries=1)
        return self._encoder_cache

    def release_text_encoder(self):
        """Frees the loaded text encoder (it is loaded again when needed)."""
        self._encoder_cache = None

    def _negative(self, negative_prompt: str) -> np.ndarray:
        if negative_prompt not in self._neg_cache:
            self._neg_cache = {negative_prompt: self.encode([negative_prompt])}
        return self._neg_cache[negative_prompt]

    # ---- inputs ----------------------------------------------------------------------------
    def _inputs(self, prompts, seeds, negative_prompt, latents, prompt_embeds, negative_prompt_embeds,
                conditioning=None):
        shape = self.shape.noise_shape
        if conditioning is not None:
            if prompt_embeds is not None or negative_prompt_embeds is not None:
                raise UnlearnError("pass a method's conditioning or prompt_embeds / negative_prompt_embeds, not both")
            prompt_embeds = conditioning.context
            negative_prompt_embeds = conditioning.uncond
        if prompt_embeds is not None:
            ctx = _given_conditioning(prompt_embeds, "prompt_embeds")
            if prompts is not None and len(prompts) != leading_size(ctx):
                raise UnlearnError(f"{len(prompts)} prompts but {leading_size(ctx)} prompt_embeds")
        else:
            if prompts is None:
                raise UnlearnError("pass prompts or prompt_embeds")
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            ctx = self.encode(prompts) if prompts else np.zeros((0, 1, 1), np.float32)  # encode checks them
        n = leading_size(ctx)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (n, *shape[1:]):
                raise UnlearnError(f"latents must have shape {(n, *shape[1:])} (N, {', '.join(self.shape.layout)}) "
                                   f"for these settings; got {latents.shape}")
        if seeds is None:
            if latents is None:
                raise UnlearnError("pass one seed per video (seeds=) or the initial latents (latents=)")
            seeds = list(range(n))   # only DPM's per-step noise uses them then
        if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
            seeds = [seeds]
        seeds = [check_seed(s, f"seed {i}") for i, s in enumerate(seeds)]
        if len(seeds) != n:
            raise UnlearnError(f"{n} prompts but {len(seeds)} seeds; pass one seed per prompt")
        uncond = None
        if self.cfg:
            if negative_prompt_embeds is not None and not isinstance(negative_prompt_embeds, dict):
                uncond = np.asarray(negative_prompt_embeds, np.float32)
                if uncond.ndim == 2:
                    uncond = uncond[None]
                if not isinstance(ctx, np.ndarray) or uncond.ndim != 3 or uncond.shape[0] not in (1, n) \
                        or uncond.shape[1:] != ctx.shape[1:]:
                    want = f"(1 or {n}, {ctx.shape[1]}, {ctx.shape[2]})" if isinstance(ctx, np.ndarray) else \
                        "a conditioning dict like prompt_embeds"
                    raise UnlearnError(f"negative_prompt_embeds must be {want}; got {uncond.shape}")
            elif negative_prompt_embeds is not None:
                uncond = _given_conditioning(negative_prompt_embeds, "negative_prompt_embeds")
                ok = isinstance(ctx, dict) and set(uncond) == set(ctx) and all(
                    uncond[k].shape[1:] == ctx[k].shape[1:] and uncond[k].shape[0] in (1, n) for k in ctx)
                if not ok:
                    raise UnlearnError("negative_prompt_embeds must hold the same arrays as prompt_embeds, with "
                                       f"batch 1 or {n}")
            else:
                if not isinstance(negative_prompt, str):
                    raise UnlearnError(f"negative_prompt must be a string, not {type(negative_prompt).__name__}")
                uncond = self._negative(negative_prompt)
        if conditioning is not None and conditioning.late is not None:
            late = _given_conditioning(conditioning.late, "the conditioning after the window")
            if jax.tree.map(np.shape, late) != jax.tree.map(np.shape, ctx):
                raise UnlearnError("a windowed conditioning's two parts must have the same shapes")
            steps = np.asarray(conditioning.steps)
            if steps.shape != (n,):
                raise UnlearnError(f"a windowed conditioning needs one window length per prompt ({n}); got {steps.shape}")
            ctx = windowed(ctx, late, thresholds(self.schedule.timesteps, steps))
            uncond = None if uncond is None else windowed_uncond(uncond)
        return ctx, uncond, latents, seeds

    def _noise_for(self, seed: int, have_latents: bool):
        """(initial noise or None, step noise or None) for one video, on the host (torch) or
        None/None when the jitted sampler draws them from the key (jax)."""
        if self.noise == "jax":
            return None, None
        dpm = self.schedule.needs_noise
        init, steps = torch_noise(seed, self.shape.noise_shape, self.family.noise_dtype(self.dtype),
                                  initial=not have_latents,
                                  dpm_timesteps=np.asarray(self.schedule.timesteps) if dpm else None,
                                  num_train_timesteps=self.scheduler.num_train_timesteps)
        return init, steps

    # ---- generation ------------------------------------------------------------------------
    def iter_latents(self, prompts=None, seeds=None, negative_prompt: str = "", *, latents=None, prompt_embeds=None,
                     negative_prompt_embeds=None, conditioning=None) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (index, final latents (1, F, C, h, w) float32) per video, in order: what
        `CogVideoXPipeline(..., output_type="latent")` returns (padding frames included).
        conditioning: an inference-time method's `baselines.conditioning.Conditioning` instead of the
        prompts' own (e.g. SAFREE's filtered prompts for the first steps of each video)."""
        ctx, uncond, latents, seeds = self._inputs(prompts, seeds, negative_prompt, latents, prompt_embeds,
                                                   negative_prompt_embeds, conditioning)
        n, bs = leading_size(ctx), self.batch_size
        bar = None
        if self.progress and n:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, unit="video", desc="sampling", dynamic_ncols=True)
        try:
            for start in range(0, n, bs):
                idx = list(range(start, min(start + bs, n)))
                pad = idx + [idx[0]] * (bs - len(idx))
                noise = None if latents is None else latents[pad]
                keys = jax_keys([seeds[i] for i in pad]) if self.noise == "jax" else None
                step_noise = None
                if self.noise == "torch":
                    drawn = [self._noise_for(seeds[i], latents is not None) for i in pad]
                    if noise is None:
                        noise = np.concatenate([d[0] for d in drawn])
                    if self.schedule.needs_noise:
                        step_noise = np.stack([d[1][:, 0] for d in drawn], axis=1)   # (N, B, F, C, h, w)
                u = uncond if uncond is None or leading_size(uncond) == 1 else take(uncond, pad)
                out = self._run(self._state, noise, keys, take(ctx, pad), u, step_noise)
                out = np.asarray(jax.device_get(out))
                for j, i in enumerate(idx):
                    yield i, out[j:j + 1]
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def decode(self, latents) -> np.ndarray:
        """Final latents (1, ...) -> frames (num_frames, H, W, 3) float32 in [0, 1], as the pipeline's
        `output_type="np"` (the family's decoding: CogVideoX drops CogVideoX1.5's padding frames first)."""
        return self.family.decode(self.vae, latents, self.shape, self.vae_tiling, warn=self._warn_once)

    def _warn_once(self, message: str):
        if not self._warned_tiling:
            log.warning("%s", message)
            self._warned_tiling = True

    def iter_videos(self, prompts=None, seeds=None, negative_prompt: str = "", **kw) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (index, frames (F, H, W, 3) float32 in [0, 1]) per video, in order."""
        for i, lat in self.iter_latents(prompts, seeds, negative_prompt, **kw):
            yield i, self.decode(lat)

    def generate_latents(self, prompts=None, seeds=None, negative_prompt: str = "", *, latents=None,
                         prompt_embeds=None, negative_prompt_embeds=None) -> np.ndarray:
        """(N, F, C, h, w) float32 final latents (the pipeline's `output_type="latent"`)."""
        out = [lat for _, lat in self.iter_latents(prompts, seeds, negative_prompt, latents=latents,
                                                    prompt_embeds=prompt_embeds,
                                                    negative_prompt_embeds=negative_prompt_embeds)]
        return np.concatenate(out) if out else np.zeros((0, *self.shape.noise_shape[1:]), np.float32)

    def generate(self, prompts=None, seeds=None, negative_prompt: str = "", *, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, conditioning=None) -> np.ndarray:
        """(N, F, H, W, 3) float32 videos in [0, 1], one per prompt and seed.

        latents: (N, F, C, h, w) initial noise instead of drawing it from the seeds (seeds then
            default to 0..N-1; DPM still draws its per-step noise from them).
        prompt_embeds / negative_prompt_embeds: precomputed (N, L, D) / (1 or N, L, D) embeddings
            instead of encoding `prompts` / `negative_prompt`.
        """
        out = [v for _, v in self.iter_videos(prompts, seeds, negative_prompt, latents=latents,
                                              prompt_embeds=prompt_embeds,
                                              negative_prompt_embeds=negative_prompt_embeds,
                                              conditioning=conditioning)]
        s = self.shape
        return np.stack(out) if out else np.zeros((0, s.num_frames, s.height, s.width, 3), np.float32)


__all__ = ["MAX_SEED", "NOISE_SOURCES", "PipelineFolder", "SamplingPlan", "VideoGenerator", "VideoShape", "check_seed",
           "jax_keys", "jax_noise", "torch_noise", "video_shape"]
