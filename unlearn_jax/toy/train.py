"""Training of the toy text-to-video model: the standard v-prediction diffusion loss on the world's
videos (CogVideoX toy), or flow matching (Wan toy), with caption dropout (empty prompt) for
classifier-free guidance.

One step (CogVideoX): a fresh batch from the world's data recipe (seeded by step), captions
tokenised and encoded by the frozen text encoder exactly as `encode_prompts` does (padding, end
token, no attention mask), a timestep t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 and loss mean((model(x_t, ctx, t) - v)^2); AdamW
with warmup and cosine decay, gradient clipping, and an exponential moving average of the weights,
which is what gets saved.

One step (Wan): the same batch, the captions encoded as `text_encoding.WanT5Text` does (cleaned,
tokenised with the attention mask, the encoder run with it, states zero after each prompt's
length, `max_text_seq_length` positions), a noise level s from `FlowConfig` (the scheduler's
shifted uniform, or logit-normal), x_t = (1 - s) x0 + s eps, target velocity eps - x0 and loss
mean((model(x_t, ctx, 1000 s) - (eps - x0))^2), latents laid out (B, 3, frames, H, W).
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
from unlearn_jax.text_encoding import tokenize_prompts, wan_prompt_clean
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


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """How the Wan toy's flow-matching training draws the noise level s in (0, 1)."""

    timesteps: str = "shifted_uniform"  # u ~ U(0, 1), s = shift u / (1 + (shift - 1) u): the sampler's own spacing
    shift: float | None = None          # None: the model config's flow_shift
    logit_mean: float = 0.0             # timesteps="logit_normal": s = sigmoid(N(mean, std)), then shifted
    logit_std: float = 1.0
    encode_length: int = 16             # text positions the encoder runs on (every caption fits; the rest is zeros)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FLOW_TIMESTEPS = ("shifted_uniform", "logit_normal")


def flow_sigmas(key, n: int, flow: FlowConfig, shift: float):
    """(n,) noise levels s in (0, 1) as `flow` says."""
    if flow.timesteps == "logit_normal":
        u = jax.nn.sigmoid(flow.logit_mean + flow.logit_std * jax.random.normal(key, (n,), jnp.float32))
    else:
        u = jax.random.uniform(key, (n,), jnp.float32, 1e-3, 1.0)
    return shift * u / (1 + (shift - 1) * u)


def make_schedule_fn(cfg: TrainConfig):
    decay = max(cfg.steps - cfg.warmup, 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.warmup + decay,
                                              end_value=cfg.lr * cfg.min_lr_ratio)


def batch_data(world: World, step: int, cfg: TrainConfig):
    """(videos (B, frames, 3, size, size) in [0, 1], captions) of training step `step`, the dropped
    captions empty (deterministic in seed and step)."""
    videos, captions, _ = world.batch(seed=cfg.seed * 1_000_003 + step, n=cfg.batch_size, split="train")
    rng = np.random.default_rng([cfg.seed, step, 7])
    drop = rng.random(cfg.batch_size) < cfg.caption_dropout
    return videos, ["" if d else c for c, d in zip(captions, drop)]


def batch_inputs(world: World, tokenizer, max_length: int, step: int, cfg: TrainConfig):
    """(x0 in model space, token ids) of training step `step` (deterministic in seed and step)."""
    videos, captions = batch_data(world, step, cfg)
    return to_model_space(videos), tokenize_prompts(tokenizer, captions, max_length)


def wan_tokens(tokenizer, captions, max_length: int, encode_length: int):
    """(ids, mask), each (N, encode_length), of captions tokenised as `WanT5Text` does (cleaned,
    padded to `max_length` with the mask); every caption must fit in `encode_length` tokens (the
    encoder runs with the mask, so the positions after them only ever give the zeros put there)."""
    tok = tokenizer([wan_prompt_clean(c) for c in captions], padding="max_length", max_length=max_length,
                    truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="np")
    ids, mask = np.asarray(tok.input_ids, np.int32), np.asarray(tok.attention_mask, bool)
    if mask[:, encode_length:].any():
        raise ValueError(f"a caption is longer than encode_length={encode_length} tokens")
    return ids[:, :encode_length], mask[:, :encode_length]


def wan_context(encoder, ids, mask, max_length: int):
    """The Wan text conditioning (N, max_length, d) of (ids, mask) from `wan_tokens` (jittable)."""
    states = jnp.where(mask[..., None], encoder(ids, mask), 0.0)
    return jnp.pad(states, ((0, 0), (0, max_length - ids.shape[1]), (0, 0)))


def wan_batch_inputs(world: World, tokenizer, max_length: int, step: int, cfg: TrainConfig, flow: FlowConfig):
    """(x0 in model space (B, 3, frames, size, size), ids, mask) of training step `step`."""
    videos, captions = batch_data(world, step, cfg)
    ids, mask = wan_tokens(tokenizer, captions, max_length, flow.encode_length)
    return np.ascontiguousarray(to_model_space(videos).transpose(0, 2, 1, 3, 4)), ids, mask


def train(out_dir, *, world_cfg: WorldConfig = WorldConfig(), model_cfg=toy_model.ToyModelConfig(),
          cfg: TrainConfig = TrainConfig(), command: str | None = None, workdir=None, overwrite: bool = False,
          flow: FlowConfig = FlowConfig()) -> dict:
    """Trains the toy model and writes the pipeline folder `out_dir` (`overwrite`: replace an earlier
    toy pipeline of this project there); returns the training record. The architecture is the
    model config's (`ToyModelConfig`: CogVideoX, `WanToyModelConfig`: Wan, trained as `flow` says)."""
    wan = model_cfg.arch == "wan"
    world = World(world_cfg)
    words = vocabulary()
    tokenizer = toy_model.build_tokenizer(words)
    encoder = toy_model.build_text_encoder(model_cfg, tokenizer, concept_word_groups(), seed=cfg.seed)
    model = toy_model.create_transformer(model_cfg, world_cfg.size, world_cfg.frames, seed=cfg.seed)
    max_len = model_cfg.max_text_seq_length

    enc_graph, enc_state = nnx.split(encoder)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(make_schedule_fn(cfg), b1=0.9, b2=0.99, weight_decay=cfg.weight_decay))
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.copy, params)

    if wan:
        if flow.timesteps not in FLOW_TIMESTEPS:
            raise ValueError(f"flow.timesteps {flow.timesteps!r}: expected one of {FLOW_TIMESTEPS}")
        shift = float(model_cfg.flow_shift if flow.shift is None else flow.shift)

        def noised(x0, batch, key):
            ids, mask = batch
            ctx = jax.lax.stop_gradient(wan_context(nnx.merge(enc_graph, enc_state), ids, mask, max_len))
            k1, k2 = jax.random.split(key)
            s = flow_sigmas(k1, x0.shape[0], flow, shift)
            eps = jax.random.normal(k2, x0.shape, jnp.float32)
            sb = s[:, None, None, None, None]
            return (1 - sb) * x0 + sb * eps, ctx, s * 1000.0, eps - x0

        batch_tokenizer = toy_model.build_tokenizer(words)  # its own: a used fast tokenizer saves its padding state

        def inputs(step):
            x0, ids, mask = wan_batch_inputs(world, batch_tokenizer, max_len, step, cfg, flow)
            return jnp.asarray(x0), (jnp.asarray(ids), jnp.asarray(mask))
    else:
        sched = SchedulerConfig.from_diffusers(toy_model.SCHEDULER_CONFIG)
        abar = jnp.asarray(alphas_cumprod(sched), jnp.float32)
        T = sched.num_train_timesteps

        def noised(x0, ids, key):
            ctx = jax.lax.stop_gradient(nnx.merge(enc_graph, enc_state)(ids))
            k1, k2 = jax.random.split(key)
            t = jax.random.randint(k1, (x0.shape[0],), 0, T)
            eps = jax.random.normal(k2, x0.shape, jnp.float32)
            a = abar[t][:, None, None, None, None]
            xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
            v = jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0
            return xt, ctx, t, v

        def inputs(step):
            x0, ids = batch_inputs(world, tokenizer, max_len, step, cfg)
            return jnp.asarray(x0), jnp.asarray(ids)

    @jax.jit
    def step_fn(params, opt_state, ema, x0, text, key, step):
        xt, ctx, t, v = noised(x0, text, key)

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

    save_kw = {"model_cfg": model_cfg} if wan else {}
    key = jax.random.key(cfg.seed)
    history, t0, losses = [], time.perf_counter(), []
    metrics_f = None
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        metrics_f = open(Path(workdir) / "metrics.jsonl", "w")
    done = 0
    for step in range(cfg.steps):
        x0, text = inputs(step)
        params, opt_state, ema, loss, gnorm = step_fn(params, opt_state, ema, x0, text,
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
                                     "world": world.describe(), "model": model_cfg.to_dict()}, overwrite=True,
                                    **save_kw)
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
    if wan:
        record["training"]["flow"] = {**flow.to_dict(), "shift_used": shift}
        record["training"]["objective"] = ("flow matching: x_t = (1 - s) x0 + s eps, target eps - x0, model "
                                           "timestep 1000 s, s drawn as training.flow says")
        record["data_recipe"]["function"] = ("unlearn_jax.toy.train.wan_batch_inputs -> "
                                             "unlearn_jax.toy.world.World.batch")
        record["data_recipe"]["pixels"] = ("model space = 2 * pixel - 1, layout (B, 3, frames, size, size) "
                                           "(Wan's CFHW); no VAE")
        record["data_recipe"]["text"] = (f"as text_encoding.WanT5Text: cleaned, tokenised with the attention mask, "
                                         f"encoder run with it, states zero after each prompt, {max_len} positions")
    toy_model.save_pipeline(out_dir, final, encoder, tokenizer, record, overwrite=overwrite, **save_kw)
    return record


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Train the toy-world text-to-video model (CPU, minutes).")
    p.add_argument("--arch", choices=toy_model.ARCHS, default="cogvideox",
                   help="the transformer architecture (default cogvideox: assets/toy_world; wan: assets/toy_world_wan)")
    p.add_argument("--out", default=None, help="default: assets/toy_world (cogvideox), assets/toy_world_wan (wan)")
    p.add_argument("--workdir", default=None, help="default: runs/toy_train (cogvideox), runs/toy_train_wan (wan)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--time-limit-min", type=float, default=None)
    p.add_argument("--num-layers", type=int, default=None, help="default 4")
    p.add_argument("--head-dim", type=int, default=None, help="default 32")
    p.add_argument("--heads", type=int, default=None, help="default 3")
    w = p.add_argument_group("wan")
    w.add_argument("--ffn-dim", type=int, default=toy_model.WanToyModelConfig.ffn_dim)
    w.add_argument("--patch", type=int, default=toy_model.WanToyModelConfig.patch_size[1],
                   help="spatial patch (the temporal one is 1)")
    w.add_argument("--flow-shift", type=float, default=toy_model.WanToyModelConfig.flow_shift,
                   help="the scheduler's flow_shift (sampling)")
    w.add_argument("--timesteps", choices=FLOW_TIMESTEPS, default=FlowConfig.timesteps,
                   help="how training draws the noise level s")
    w.add_argument("--train-shift", type=float, default=None,
                   help="the shift applied to the training noise levels (default: --flow-shift)")
    w.add_argument("--text-length", type=int, default=toy_model.WanToyModelConfig.max_text_seq_length,
                   help="text positions (must be what the Wan family encodes at: 512)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a toy pipeline this project wrote")
    a = p.parse_args(argv)
    wan = a.arch == "wan"
    out = a.out or ("assets/toy_world_wan" if wan else "assets/toy_world")
    workdir = a.workdir or ("runs/toy_train_wan" if wan else "runs/toy_train")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                      time_limit_s=None if a.time_limit_min is None else 60 * a.time_limit_min)
    sizes = {"num_layers": a.num_layers, "head_dim": a.head_dim, "heads": a.heads}
    if wan:
        names = {"num_layers": "num_layers", "head_dim": "attention_head_dim", "heads": "num_attention_heads"}
        mcfg = toy_model.WanToyModelConfig(
            ffn_dim=a.ffn_dim, patch_size=(1, a.patch, a.patch), flow_shift=a.flow_shift,
            max_text_seq_length=a.text_length, **{names[k]: v for k, v in sizes.items() if v is not None})
    else:
        d = toy_model.ToyModelConfig()
        mcfg = dataclasses.replace(d, num_layers=a.num_layers or d.num_layers, head_dim=a.head_dim or d.head_dim,
                                   width_heads=a.heads or d.width_heads)
    command = " ".join(["python tools/toy/train_toy_model.py"] + list(sys.argv[1:] if argv is None else argv))
    from unlearn_jax.atomic import check_output_dir

    check_output_dir(out, a.overwrite, flag="--overwrite")  # before the training, not after it
    rec = train(out, model_cfg=mcfg, cfg=cfg, command=command, workdir=workdir, overwrite=a.overwrite,
                flow=FlowConfig(timesteps=a.timesteps, shift=a.train_shift))
    t = rec["training"]
    print(json.dumps({k: t[k] for k in ("steps_done", "seconds", "final_loss", "transformer_params")}))
    return 0


__all__ = ["FLOW_TIMESTEPS", "FlowConfig", "TrainConfig", "batch_data", "batch_inputs", "flow_sigmas", "main",
           "train", "wan_batch_inputs", "wan_context", "wan_tokens"]


if __name__ == "__main__":
    sys.exit(main())
