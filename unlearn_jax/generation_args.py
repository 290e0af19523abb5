"""The generation and metric options `unlearn-jax eval` and `unlearn-jax attack` share, and what they build:
the resolved sampling plan, the original and the erased model's generators, the metrics."""
from __future__ import annotations

import argparse
from pathlib import Path

from unlearn_jax.errors import UnlearnError


def add_metric_args(p):
    m = p.add_argument_group("metric models")
    m.add_argument("--metrics", default="nudity", help="comma-separated: nudity, face, object (default nudity)")
    m.add_argument("--nudenet-model", default=None, help="an ONNX NudeNet detector (default: nudenet's bundled 320n)")
    m.add_argument("--nudity-min-score", type=float, default=None, help="extra score cut above nudenet's own")
    m.add_argument("--arcface", default=None, help="face metric: an ArcFace ONNX model")
    m.add_argument("--face-refs", default=None, help="face metric: reference images, REFS/<identity>/*.png")
    m.add_argument("--face-identity", default=None, help="face metric: score every video against this identity")
    m.add_argument("--classifier", default=None, help="object metric: an ImageNet classifier ONNX model")
    m.add_argument("--classifier-index-offset", type=int, default=0, help="object metric: class index offset")
    m.add_argument("--erased", default=None, help="face/object metrics: the erased identity or class")
    return m


def add_generation_args(p, steps_flag: str = "--steps"):
    """steps_flag: the denoising-steps option's name (`attack` keeps --steps for its optimisation)."""
    s = p.add_argument_group("generation")
    s.add_argument(steps_flag, dest="sampling_steps", type=int, default=None,
                   help="denoising steps (default: the pipeline's, 50 for CogVideoX; the toy world 25)")
    s.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's, 6 for "
                                                                 "CogVideoX and the toy world)")
    s.add_argument("--guidance-2", type=float, default=None, help="Wan 2.2 A14B: the low-noise expert's guidance "
                                                                   "(guidance_scale_2; default: --guidance)")
    s.add_argument("--eraser-scale", type=float, default=None, help="the erased model's eraser output scale (the "
                                                                     "published scripts' eraser weight); default: "
                                                                     "the folder's")
    s.add_argument("--true-cfg", type=float, default=None, help="HunyuanVideo: classifier-free guidance over the "
                                                                 "embedded guidance (true_cfg_scale; default 1 = off)")
    s.add_argument("--sampler", default=None, help="the family's samplers (CogVideoX: ddim | dpm); default: the "
                                                   "pipeline's (CogVideoX: ddim for 2B, dpm for RoPE models)")
    s.add_argument("--dynamic-cfg", default=None, action=argparse.BooleanOptionalAction,
                   help="the pipeline's cosine guidance ramp (default: on with dpm)")
    s.add_argument("--num-frames", type=int, default=None)
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    s.add_argument("--noise", default="jax", choices=["jax", "torch"], help="see `unlearn-jax sample --help`")
    s.add_argument("--negative-prompt", default="")
    s.add_argument("--batch-size", type=int, default=1, help="videos generated together")
    return s


def resolve_plan(a, model: Path):
    """The `SamplingPlan` of the parsed options (every one checked before any weight is read)."""
    from unlearn_jax.generate import SamplingPlan

    for name, v in (("--batch-size", a.batch_size), ("denoising steps", a.sampling_steps)):
        if v is not None and v < 1:
            raise UnlearnError(f"{name} must be >= 1, got {v}")
    return SamplingPlan.resolve(model, erasers=a.erasers, dtype=a.dtype, sampler=a.sampler,
                                num_steps=a.sampling_steps, guidance_scale=a.guidance, use_dynamic_cfg=a.dynamic_cfg,
                                num_frames=a.num_frames, height=a.height, width=a.width, noise=a.noise,
                                batch_size=a.batch_size, true_cfg_scale=a.true_cfg, eraser_scale=a.eraser_scale,
                                guidance_scale_2=a.guidance_2)


def build_metrics_from_args(a):
    from unlearn_jax.eval.metrics import build_metrics

    metrics = build_metrics(a.metrics, nudenet_model=a.nudenet_model, nudity_min_score=a.nudity_min_score,
                            arcface=a.arcface, face_refs=a.face_refs, face_identity=a.face_identity,
                            classifier=a.classifier, classifier_index_offset=a.classifier_index_offset,
                            erased=a.erased)
    if not metrics:
        raise UnlearnError(f"--metrics {a.metrics}: no metric can run (see the messages above)")
    return metrics


def generators(plan, *, progress: bool = True) -> dict:
    """{"original": ..., "erased": ...} generators of the plan (only "original" without erasers): the original
    is the erased model's base, so the transformer, VAE and text encoder are loaded once."""
    from unlearn_jax.generate import VideoGenerator
    from unlearn_jax.text_encoding import EncoderCache

    first = VideoGenerator.from_plan(plan, progress=progress, encoder_cache=EncoderCache(max_entries=1))
    if plan.erasers is None:
        return {"original": first}
    return {"original": first.with_model(first.model.base), "erased": first}
