"""Training of the toy text-to-video model: the standard v-prediction diffusion loss on the world's
videos, with caption dropout (empty prompt) for classifier-free guidance.

One step: a fresh batch from the world's data recipe (seeded by step), captions tokenised and
encoded by the frozen text encoder exactly as `encode_prompts` does (padding, end token, no
attention mask), a timestep t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 and loss mean((model(x_t, ctx, t) - v)^2); AdamW with
warmup and cosine decay, gradient clipping, and an exponential moving average of the weights,
which is what gets saved.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unlearn_jax.schedulers import SchedulerConfig, alphas_cumprod
from unlearn_jax.text_encoding import tokenize_prompts
from unlearn_jax.toy import model as toy_model
from unlearn_jax.toy.world import World, WorldConfig, concept_word_groups, to_model_space, vocabulary

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    seed: int = 0
    time_limit_s: float | None = None   # stop early (and save) once training has run this long
    log_every: int = 50
    checkpoint_every: int = 400         # also write the EMA pipeline to workdir/checkpoint (0: never)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_schedule_fn(cfg: TrainConfig):
    decay = max(cfg.steps - cfg.warmup, 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.warmup + decay,
                                              end_value=cfg.lr * cfg.min_lr_ratio)


def batch_inputs(world: World, tokenizer, max_length: int, step: int, cfg: TrainConfig):
    """(x0 in model space, token ids) of training step `step` (deterministic in seed and step)."""
    videos, captions, _ = world.batch(seed=cfg.seed * 1_000_003 + step, n=cfg.batch_size, split="train")
    rng = np.random.default_rng([cfg.seed, step, 7])
    drop = rng.random(cfg.batch_size) < cfg.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop)]
    return to_model_space(videos), tokenize_prompts(tokenizer, captions, max_length)


def train(out_dir, *, world_cfg: WorldConfig = WorldConfig(), model_cfg=toy_model.ToyModelConfig(),
          cfg: TrainConfig = TrainConfig(), command: str | None = None, workdir=None, overwrite: bool = False) -> dict:
    """Trains the toy model and writes the pipeline folder `out_dir` (`overwrite`: replace an earlier
    toy pipeline of this project there); returns the training record."""
    world = World(world_cfg)
    words = vocabulary()
    tokenizer = toy_model.build_tokenizer(words)
    encoder = toy_model.build_text_encoder(model_cfg, tokenizer, concept_word_groups(), seed=cfg.seed)
    model = toy_model.create_transformer(model_cfg, world_cfg.size, world_cfg.frames, seed=cfg.seed)
    max_len = model_cfg.max_text_seq_length
    sched = SchedulerConfig.from_diffusers(toy_model.SCHEDULER_CONFIG)
    abar = jnp.asarray(alphas_cumprod(sched), jnp.float32)
    T = sched.num_train_timesteps

    enc_graph, enc_state = nnx.split(encoder)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(make_schedule_fn(cfg), b1=0.9, b2=0.99, weight_decay=cfg.weight_decay))
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.copy, params)

    @jax.jit
    def step_fn(params, opt_state, ema, x0, ids, key, step):
        ctx = jax.lax.stop_gradient(nnx.merge(enc_graph, enc_state)(ids))
        k1, k2 = jax.random.split(key)
        t = jax.random.randint(k1, (x0.shape[0],), 0, T)
        eps = jax.random.normal(k2, x0.shape, jnp.float32)
        a = abar[t][:, None, None, None, None]
        xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
        v = jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0

        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            pred = m.forward(xt, ctx, t)[0]
            return jnp.mean((pred.astype(jnp.float32) - v) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        d = jnp.minimum(cfg.ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
        return params, opt_state, ema, loss, optax.global_norm(grads)

    key = jax.random.key(cfg.seed)
    history, t0, losses = [], time.perf_counter(), []
    metrics_f = None
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        metrics_f = open(Path(workdir) / "metrics.jsonl", "w")
    done = 0
    for step in range(cfg.steps):
        x0, ids = batch_inputs(world, tokenizer, max_len, step, cfg)
        params, opt_state, ema, loss, gnorm = step_fn(params, opt_state, ema, jnp.asarray(x0), jnp.asarray(ids),
                                                      jax.random.fold_in(key, step), step)
        done = step + 1
        losses.append(float(loss))
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = {"step": done, "loss": float(np.mean(losses[-cfg.log_every:])), "grad_norm": float(gnorm),
                   "seconds": round(time.perf_counter() - t0, 1)}
            history.append(rec)
            log.info("step %d loss %.4f grad_norm %.3f %.0fs", done, rec["loss"], rec["grad_norm"], rec["seconds"])
            if metrics_f is not None:
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
        if workdir is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            toy_model.save_pipeline(Path(workdir) / "checkpoint", nnx.merge(graphdef, ema, rest), encoder, tokenizer,
                                    {"format": "unlearn-jax toy world (training checkpoint)", "step": done,
                                     "world": world.describe(), "model": model_cfg.to_dict()}, overwrite=True)
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"toy training: the loss is {losses[-1]} at step {done}; lower --lr")
        if cfg.time_limit_s is not None and time.perf_counter() - t0 > cfg.time_limit_s:
            log.info("time limit reached after %d steps", done)
            break
    seconds = time.perf_counter() - t0
    if metrics_f is not None:
        metrics_f.close()
    final = nnx.merge(graphdef, ema, rest)
    record = {
        "format": "unlearn-jax toy world",
        "world": world.describe(),
        "model": model_cfg.to_dict(),
        "training": {**cfg.to_dict(), "steps_done": done, "seconds": round(seconds, 1),
                     "final_loss": history[-1]["loss"] if history else None, "transformer_params": n_params,
                     "saved_weights": "exponential moving average", "command": command,
                     "platform": jax.default_backend(), "history": history},
        "data_recipe": {
            "function": "unlearn_jax.toy.train.batch_inputs -> unlearn_jax.toy.world.World.batch",
            "batch_seed": "train.seed * 1000003 + step",
            "split": "train (held-out synonyms never appear in training captions)",
            "caption_dropout": f"caption replaced by the empty prompt with probability {cfg.caption_dropout}, "
                               "rng default_rng([seed, step, 7])",
            "pixels": "model space = 2 * pixel - 1, layout (B, frames, 3, size, size); no VAE",
        },
        "text_encoder": "random frozen T5 blocks (output projections scaled by text_block_scale); token "
                        "embeddings: one random direction per concept (world.concept_word_groups), each "
                        "synonym = sqrt(1 - s^2) * direction + s * own direction, s = synonym_spread, "
                        "seed = train.seed",
    }
    toy_model.save_pipeline(out_dir, final, encoder, tokenizer, record, overwrite=overwrite)
    return record


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Train the toy-world text-to-video model (CPU, minutes).")
    p.add_argument("--out", default="assets/toy_world")
    p.add_argument("--workdir", default="runs/toy_train")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--time-limit-min", type=float, default=None)
    p.add_argument("--num-layers", type=int, default=toy_model.ToyModelConfig.num_layers)
    p.add_argument("--head-dim", type=int, default=toy_model.ToyModelConfig.head_dim)
    p.add_argument("--heads", type=int, default=toy_model.ToyModelConfig.width_heads)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a toy pipeline this project wrote")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                      time_limit_s=None if a.time_limit_min is None else 60 * a.time_limit_min)
    mcfg = dataclasses.replace(toy_model.ToyModelConfig(), num_layers=a.num_layers, head_dim=a.head_dim,
                               width_heads=a.heads)
    command = " ".join(["python tools/toy/train_toy_model.py"] + list(sys.argv[1:] if argv is None else argv))
    from unlearn_jax.atomic import check_output_dir

    check_output_dir(a.out, a.overwrite, flag="--overwrite")  # before the training, not after it
    rec = train(a.out, model_cfg=mcfg, cfg=cfg, command=command, workdir=a.workdir, overwrite=a.overwrite)
    t = rec["training"]
    print(json.dumps({k: t[k] for k in ("steps_done", "seconds", "final_loss", "transformer_params")}))
    return 0


__all__ = ["TrainConfig", "batch_inputs", "main", "train"]


if __name__ == "__main__":
    sys.exit(main())
