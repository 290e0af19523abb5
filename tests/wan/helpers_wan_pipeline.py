"""Tiny Wan pipeline folders (UMT5 + transformer + VAE + UniPC, random weights) and their diffusers twins."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from repo_paths import MODEL_CONFIGS

# (transformer variant of helpers_wan, VAE variant of helpers_wan_vae, expand_timesteps of the pipeline)
PIPELINES = {"wan21": ("wan21", "wan21", False), "wan22_5b": ("wan22_5b", "wan22", True)}
# pixels: 5 frames (2 latent frames), 32 x 64 (2.1: 4 x 8 latents, 2 x 4 tokens; 2.2: 2 x 4 latents, 1 x 2 tokens)
FRAMES, HEIGHT, WIDTH = 5, 32, 64


def build_wan_pipeline(folder, name: str = "wan21", seed: int = 0):
    """Writes a tiny WanPipeline folder; returns (folder, the diffusers WanPipeline of the same parts)."""
    import torch
    from diffusers import UniPCMultistepScheduler, WanPipeline

    import helpers_wan
    import helpers_wan_vae
    from helpers_text import build_tiny_pipeline

    t_variant, v_variant, expand = PIPELINES[name]
    folder, tok, enc = build_tiny_pipeline(folder, max_text_seq_length=None, variant="umt5", seed=seed)
    shutil.rmtree(folder / "transformer")
    vae = helpers_wan_vae.build_torch(v_variant, seed=seed)
    cfg = helpers_wan.tiny_config(t_variant, text_dim=enc.config.d_model, in_channels=vae.config.z_dim,
                                  out_channels=vae.config.z_dim)
    tm = helpers_wan.build_torch(cfg, seed=seed + 1)
    tm.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    sched_cfg = json.loads((MODEL_CONFIGS / ("wan22_ti2v_5b_scheduler.json" if expand else
                                             "wan21_scheduler.json")).read_text())
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "expand_timesteps": expand, "boundary_ratio": None,
        "tokenizer": ["transformers", type(tok).__name__], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "UniPCMultistepScheduler"]}))
    pipe = WanPipeline(tokenizer=tok, text_encoder=enc, transformer=tm, vae=vae,
                       scheduler=UniPCMultistepScheduler.from_config(sched_cfg), expand_timesteps=expand)
    pipe.set_progress_bar_config(disable=True)
    return Path(folder), pipe


def pipeline_frames(pipe, prompts, seeds, steps: int, guidance: float, negative: str = "",
                    guidance_2: float | None = None) -> np.ndarray:
    """What `WanPipeline(..., output_type="np")` returns, one call per video (its own generator each);
    guidance_2: the two-expert pipeline's `guidance_scale_2`."""
    import torch

    second = {} if guidance_2 is None else {"guidance_scale_2": guidance_2}
    out = []
    for p, s in zip(prompts, seeds):
        with torch.no_grad():
            r = pipe(prompt=p, negative_prompt=negative, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                     num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(s), **second)
        out.append(np.asarray(r.frames[0], np.float32))
    return np.stack(out)


def build_wan_a14b_pipeline(folder, boundary_ratio: float = 0.875, seed: int = 0):
    """A tiny two-expert WanPipeline folder (Wan 2.2 T2V-A14B's layout: transformer/ the high-noise expert,
    transformer_2/ the low-noise one, `boundary_ratio` in model_index.json, the A14B scheduler config); returns
    (folder, the diffusers WanPipeline of the same parts)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    import helpers_wan

    folder, one = build_wan_pipeline(folder, "wan21", seed=seed)
    config = {k: v for k, v in one.transformer.config.items() if not k.startswith("_")}
    low = helpers_wan.build_torch(config, seed=seed + 7)
    low.save_pretrained(folder / "transformer_2")
    sched_cfg = json.loads((MODEL_CONFIGS / "wan22_scheduler.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": boundary_ratio,
                                                         "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    pipe = WanPipeline(tokenizer=one.tokenizer, text_encoder=one.text_encoder, transformer=one.transformer,
                       transformer_2=low, vae=one.vae, scheduler=UniPCMultistepScheduler.from_config(sched_cfg),
                       boundary_ratio=boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    return Path(folder), pipe
