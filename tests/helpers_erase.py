"""A tiny CogVideoX pipeline folder for erasure runs: tokenizer + T5 (tests/helpers_text.py) + transformer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from helpers_text import build_tiny_pipeline
from repo_paths import MODEL_CONFIGS, ROOT

TEXT_LEN = 16


def build_erase_pipeline(folder, seed: int = 0, **transformer_overrides) -> Path:
    from flax import nnx

    from unlearn_jax.loading import save_transformer
    from unlearn_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer

    folder, _, enc = build_tiny_pipeline(folder, max_text_seq_length=TEXT_LEN, seed=seed)
    cfg = CogVideoXConfig.from_dict(dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=enc.config.d_model, num_layers=2, sample_width=8, sample_height=8, sample_frames=5,
        max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=True, **transformer_overrides))
    shutil.rmtree(folder / "transformer")  # build_tiny_pipeline's config stub; the saver never replaces a folder
    save_transformer(CogVideoXTransformer(cfg, rngs=nnx.Rngs(seed)), folder / "transformer")
    (folder / "scheduler").mkdir(exist_ok=True)
    sched = json.loads((MODEL_CONFIGS / "cogvideox_2b_scheduler.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    return folder


def tiny_erase_config(pipeline, workdir, **overrides):
    """configs/tiny_test.py for `pipeline` and `workdir`, no exports, plus `field=value` overrides."""
    from unlearn_jax.config import apply_override, load_config

    c = load_config(ROOT / "configs" / "tiny_test.py")
    c.model.path = str(pipeline)
    c.workdir = str(workdir)
    c.export.formats = []
    for k, v in overrides.items():
        apply_override(c, f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}")
    return c
