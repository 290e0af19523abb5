"""A tiny CogVideoX pipeline folder for erasure runs: tokenizer + T5 (tests/helpers_text.py) + transformer;
and a toy-world erase config cut short, judged on red and green (`short_toy_erasure`)."""
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


def short_toy_erasure(config_file, workdir, steps: int, n: int = 8, model_path=None) -> dict:
    """A toy-world erase config cut to `steps` steps (erasers only, no built-in evaluation, no in-run check;
    `model_path`: another toy pipeline), then the base-vs-erased comparison on red and green (n prompts per
    split), printed and returned."""
    from unlearn_jax.config import load_config
    from unlearn_jax.erase import run_erase
    from unlearn_jax.toy import evaluate as E

    c = load_config(config_file)
    c.workdir = str(workdir)
    if model_path is not None:
        c.model.path = str(model_path)
    c.train.num_steps = steps
    c.train.checkpoint_every = 1000
    c.export.formats = ["erasers"]
    c.evaluate.toy_world = False
    c.check.every = 0  # a fixed number of steps: no in-run check
    assert run_erase(c, progress=False)["status"] == "completed"
    out = E.evaluate_erasure(c.model.path, Path(workdir) / "export" / "erasers", E.EvalConfig(n=n), ["colour:red"],
                             concept_list=[("colour", "red"), ("colour", "green")])
    print(E.format_comparison(out["comparison"]))
    return out["comparison"]


def random_erasers(pipeline: Path, out: Path, seed: int = 0) -> Path:
    """An adapter eraser folder for `pipeline` whose up-projections are random (so it changes outputs)."""
    import jax
    import numpy as np

    from unlearn_jax import eraser_io
    from unlearn_jax.erasers import EraserConfig, init_erasers
    from unlearn_jax.loading import load_transformer

    model = load_transformer(pipeline, dtype="float32")
    cfg = EraserConfig("adapter", rank=4)
    phi = init_erasers(cfg, model, jax.random.key(seed))
    phi = jax.tree.map(lambda a: np.asarray(a) + 0.3 * np.random.default_rng(seed).standard_normal(a.shape), phi)
    return eraser_io.save_erasers(out, cfg, jax.tree.map(lambda a: np.asarray(a, np.float32), phi), model.config)
