"""`unlearn-jax erase`: the training loop around the pure step, with everything at the edges.

Resumable (orbax checkpoints of phi, Adam state, step and RNG; the data position is a pure
function of the step), logs `metrics.jsonl`, stops cleanly on SIGTERM (saving first) and on a
non-finite loss (keeping the last good checkpoint), plots the loss curves and the masks, and
exports the erasers at the end.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np

from unlearn_jax.atomic import atomic_file
from unlearn_jax.errors import UnlearnError
from unlearn_jax.families.base import take_rows

LOGGED = ("loss", "loss_unlearn", "loss_loc", "loss_pre", "grad_norm", "t", "j", "mask_fraction",
          "adversarial", "loss_adv", "attack_start", "attack_loss")  # the last four: config.robust runs


def robust_cost(history) -> dict:
    """Mean seconds of the adversarial and of the plain steps of this process's records (the first step of
    the run, which compiles, left out): what config.robust costs per step."""
    recs = history[1:]
    out = {}
    for name, flag in (("adversarial_step_s", 1), ("plain_step_s", 0)):
        secs = [r["seconds"] for r in recs if r.get("adversarial") == flag]
        out[name] = round(sum(secs) / len(secs), 4) if secs else None
    return out


class NonFiniteLoss(UnlearnError):
    from unlearn_jax.exit_codes import NON_FINITE_LOSS as exit_code


def prepare_workdir(workdir: Path) -> Path:
    """The workdir, created if needed; a path that is a file or cannot be written is one line."""
    import os

    if workdir.exists() and not workdir.is_dir():
        raise UnlearnError(f"config.workdir={workdir}: exists and is a file; give a folder")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UnlearnError(f"config.workdir={workdir}: cannot be created ({e.strerror})") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise UnlearnError(f"config.workdir={workdir}: is not writable; choose another --config.workdir")
    return workdir


def _maybe_init_distributed(cfg):
    import jax

    d = cfg.distributed
    if not d.enabled:
        return
    if d.cpu_collectives:  # only used by CPU devices; asking the backend here would initialise it too early
        jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    kw = {}
    if d.coordinator_address:
        kw = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes, process_id=d.process_id)
    jax.distributed.initialize(**kw)


def latent_shape(cfg, pipeline: Path, model) -> tuple[int, ...]:
    """The latents of one video (no batch axis, the family's layout) for the configured video size,
    checked as the family's pipeline checks it (VAE compression, patches)."""
    from unlearn_jax import families

    family = families.of_model(model)
    vae_dir = pipeline / "vae"
    vae_cfg = family.vae_config(vae_dir) if (vae_dir / "config.json").is_file() else None
    v = cfg.video
    try:
        shape = family.video_shape(model.config, vae_cfg, v.num_frames, v.height, v.width)
    except UnlearnError as e:
        raise UnlearnError(f"config.video: {e}") from None
    return shape.latent_shape


def pipeline_model_config(pipeline: Path):
    """(family, the config object of the pipeline's model) read from its config files, no weights; the
    config is None for a transformer folder that is not a diffusers one (an orbax checkpoint)."""
    from unlearn_jax import families
    from unlearn_jax.jsonfiles import read_json_object
    from unlearn_jax.loading import resolve_transformer_dir

    family = families.of_folder(pipeline)

    def read_one(folder):
        folder = resolve_transformer_dir(folder)
        if not (folder / "config.json").is_file():
            return None
        return family.transformer_config(read_json_object(folder / "config.json", "transformer config"),
                                         str(folder / "config.json"))

    folder = resolve_transformer_dir(pipeline)
    return family, (read_one(folder) if folder == Path(pipeline) else
                    family.pipeline_transformer_config(Path(pipeline), read_one))


def check_model_fits(cfg, pipeline: Path):
    """One line for a config the pipeline's model cannot train with: an eraser kind its site does not take
    (Wan 2.2 A14B: adapter or lora), a second guidance scale for a model with one stage."""
    from unlearn_jax.erasers import check_kind

    family, model_cfg = pipeline_model_config(pipeline)
    if model_cfg is None:
        return
    check_kind(cfg.eraser.kind, family.eraser_site(model_cfg), "config.eraser.kind")
    g2 = cfg.sampler.guidance_scale_2
    if g2 is not None and family.guidance_boundary(model_cfg) is None:
        raise UnlearnError(f"config.sampler.guidance_scale_2={g2}: applies to two-stage models (Wan 2.2 A14B's "
                           f"low-noise expert); this {family.title} model has one stage (leave it None)")


def scheduler_config(cfg, pipeline: Path, family=None):
    """The x_t sampler's scheduler: the pipeline's scheduler config run as `config.sampler.kind`, set
    up as the family's pipeline sets it."""
    from unlearn_jax.schedulers import SchedulerConfig

    path = pipeline / "scheduler" / "scheduler_config.json"
    if path.exists():
        sched = SchedulerConfig.from_diffusers(path, kind=cfg.sampler.kind)
    else:
        sched = SchedulerConfig().replace(kind=cfg.sampler.kind)
    return sched if family is None else family.scheduler_config(sched)


class Run:
    """Everything an erasure run holds; `train()` runs (or resumes) the loop."""

    def __init__(self, cfg, progress: bool = True):
        import jax

        from unlearn_jax.erase_checks import validate_erase_config

        validate_erase_config(cfg)  # every field, before any work
        self.cfg, self.progress = cfg, progress
        _maybe_init_distributed(cfg)
        self.is_main = jax.process_index() == 0
        self.workdir = prepare_workdir(Path(cfg.workdir))
        self.lock = None
        if self.is_main:  # one run per workdir: a second one is refused, naming the first
            from unlearn_jax.workdir_lock import WorkdirLock

            self.lock = WorkdirLock(self.workdir, "unlearn-jax erase").acquire()
        try:
            self._setup(cfg, progress)
        except BaseException:
            self.close()
            raise

    def close(self):
        """Releases the workdir (also done at the end of `train`)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _setup(self, cfg, progress: bool):
        import jax
        from flax import nnx

        from unlearn_jax import families
        from unlearn_jax.atomic import safe_child
        from unlearn_jax.erase_data import build_erase_data, concept_specs
        from unlearn_jax.erasers import LORA_TARGETS, EraserConfig, eraser_axes, init_erasers
        from unlearn_jax.loading import load_transformer, resolve_transformer_dir
        from unlearn_jax.parallel import DEFAULT_RULES, make_mesh, named_sharding
        from unlearn_jax.schedulers import make_schedule
        from unlearn_jax.train import StepSettings, init_state

        self.pipeline = Path(cfg.model.path)
        resolve_transformer_dir(self.pipeline)
        families.of_folder(self.pipeline).check_folder(self.pipeline)
        check_model_fits(cfg, self.pipeline)  # from the configs, before any weight is read
        # nothing of the run is written through a link out of its workdir
        self.checkpoint_dir = safe_child(self.workdir, "checkpoints")
        self.export_dir = safe_child(self.workdir, "export")
        self.rules = tuple(tuple(r) for r in cfg.mesh.rules) if cfg.mesh.rules else DEFAULT_RULES
        self.mesh = make_mesh(dict(cfg.mesh.shape))
        shards = self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1)
        if cfg.train.batch_size % shards and self.is_main:
            # The batch stays replicated where it does not split (correct, but the devices repeat work).
            print(f"note: train.batch_size={cfg.train.batch_size} does not split over data x fsdp = {shards} "
                  "devices; the batch is replicated", file=sys.stderr)
        self.model = load_transformer(self.pipeline, dtype=cfg.model.param_dtype, compute_dtype=cfg.model.dtype,
                                      mesh=self.mesh, rules=self.rules, attention=cfg.model.attention,
                                      attention_chunk=cfg.model.attention_chunk,
                                      remat=cfg.model.remat, progress=progress and self.is_main)
        self.latent_shape = latent_shape(cfg, self.pipeline, self.model)
        specs = concept_specs(cfg.concepts)
        cache = cfg.prompts.cache_dir or str(safe_child(self.workdir, "embedding_cache"))
        self.data = build_erase_data(self.pipeline, specs, default_eta=cfg.erase.eta, prompts_file=cfg.prompts.file,
                                     augment=cfg.prompts.augment, n_augment=cfg.prompts.num_augmented,
                                     max_concept_tokens=cfg.prompts.max_concept_tokens,
                                     token_fallback=cfg.prompts.token_fallback, cache_dir=cache,
                                     text_dtype=cfg.model.text_dtype, seed=cfg.seed)
        # LoRA on every projection the family's eraser attention has (HunyuanVideo's single-stream one has no to_out)
        site = families.of_model(self.model).eraser_site(self.model.config)
        self.eraser = EraserConfig(cfg.eraser.kind, rank=cfg.eraser.rank, scale=cfg.eraser.scale,
                                   lora_targets=tuple(t for t in LORA_TARGETS if t in site.lora_targets))
        self.settings = StepSettings(
            num_sampler_steps=cfg.sampler.num_steps, guidance_scale=cfg.sampler.guidance_scale,
            guidance_scale_2=cfg.sampler.guidance_scale_2,
            timestep_mode=cfg.sampler.timestep_mode, xt_source=cfg.sampler.xt_source,
            alpha_loc=cfg.erase.alpha_loc, beta_pre=cfg.erase.beta_pre if self.data.has_preservation else 0.0,
            mask_threshold=cfg.erase.mask_threshold, mask_mode=cfg.erase.mask_mode,
            robust_every=cfg.robust.every, robust_steps=cfg.robust.steps, robust_lr=cfg.robust.learning_rate,
            robust_weight=cfg.robust.weight,
            mask_key_chunk=cfg.erase.mask_key_chunk, grad_clip=cfg.train.grad_clip)
        if cfg.sampler.kind is None:  # resolved here, so config.json records the sampler the run used
            cfg.sampler.kind = families.of_model(self.model).training_sampler(self.model.config)
        self.schedule = make_schedule(scheduler_config(cfg, self.pipeline, families.of_model(self.model)),
                                      cfg.sampler.num_steps)
        _, self.base = nnx.split(self.model)

        # Trainable state, fp32, sharded like the model (logical axes -> mesh).
        phi = init_erasers(self.eraser, self.model, jax.random.key(cfg.seed))
        axes = eraser_axes(self.eraser, phi, self.model)
        self.phi_sharding = jax.tree.map(lambda a, x: named_sharding(a, x.shape, self.mesh, self.rules), axes, phi,
                                         is_leaf=lambda a: isinstance(a, tuple))
        phi = jax.device_put(phi, self.phi_sharding)
        state = init_state(phi, self._optimizer(cfg.train.learning_rate), cfg.seed)
        repl = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        # Adam moments share phi's layout; counters and the RNG are replicated.
        self.state_sharding = jax.tree.map(
            lambda x: x.sharding if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) else repl,
            state)
        self.state = jax.device_put(state, self.state_sharding)
        self.batch_axes = named_sharding(("batch",), (cfg.train.batch_size,), self.mesh, self.rules).spec[0]
        self._set_learning_rate(cfg.train.learning_rate)  # the optimizer, the step and its jitted form
        self.bank = None
        if self.settings.xt_source == "frozen_bank":
            self.bank = self._build_bank()
        self.checker = None  # config.check: built in train(), once the outputs' requirements are checked

    def _build_checker(self):
        from unlearn_jax.toy.run_check import CheckSettings, ToyCheck

        e = self.cfg.evaluate
        return ToyCheck(self.pipeline, self.step_fn.velocity, self.base, list(e.erased_concepts),
                        CheckSettings.from_config(self.cfg.check), e.num_steps, e.guidance_scale)

    def _optimizer(self, lr: float):
        from unlearn_jax.train import make_optimizer

        t = self.cfg.train
        return make_optimizer(lr, t.adam_b1, t.adam_b2, t.adam_eps, t.weight_decay, t.grad_clip)

    def _set_learning_rate(self, lr: float):
        """Builds the optimizer and the jitted step for a learning rate (at setup, and again at the in-run
        check's revert); Adam's state has the same structure at every rate, so a restored state carries over."""
        import jax

        from unlearn_jax.train import ErasureStep

        self.optimizer = self._optimizer(lr)
        self.step_fn = ErasureStep(self.model, self.eraser, self.schedule, self.settings, self.optimizer,
                                   self.latent_shape)
        self.jit_step = jax.jit(self.step_fn, donate_argnums=(0,), out_shardings=(self.state_sharding, None))

    # ---- data placement ------------------------------------------------------------------------
    def _place(self, arr, batched: bool):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        arr = np.asarray(arr)
        spec = PartitionSpec(self.batch_axes, *([None] * (arr.ndim - 1))) if batched and arr.ndim else PartitionSpec()
        sharding = NamedSharding(self.mesh, spec)
        # Every process holds the same host batch (a pure function of the step) and feeds its shard.
        return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])

    def host_batch(self, step: int) -> dict:
        b = self.data.batch(step, self.cfg.train.batch_size, self.cfg.sampler.num_steps)
        if self.bank is not None:
            rng = self.data.rng(step)
            rng.integers(0, 2**31, size=7)  # decorrelate from the draws of `batch`
            j = int(b["j"])
            entries = [rng.integers(0, self.bank["x"].shape[1]) for _ in range(len(b["concept"]))]
            b["x_t"] = np.stack([self.bank["x"][k, e, j] for k, e in zip(b["concept"], entries)])
            b["x_pre"] = np.stack([self.bank["x_pre"][k, e, j] for k, e in zip(b["concept"], entries)])
            b["t"] = np.float32(np.asarray(self.schedule.sample_timesteps)[j])
            # The bank's prompts are the pool's first entries: train on the prompt that made x_t.
            rows = np.array([self.bank["rows"][k][e] for k, e in zip(b["concept"], entries)])
            pre_rows = np.array([self.bank["pre_rows"][k][e] for k, e in zip(b["concept"], entries)])
            b["ctx"], b["concept_idx"], b["concept_valid"] = (take_rows(self.data.embeds, rows),
                                                              self.data.concept_idx[rows],
                                                              self.data.concept_valid[rows])
            b["pre_ctx"] = take_rows(self.data.embeds, np.maximum(pre_rows, 0))
            b["pre_valid"] = (pre_rows >= 0).astype(np.float32)
        import jax

        scalar = {"j", "t", "uncond"}
        return {k: jax.tree.map(lambda a, k=k: self._place(a, k not in scalar), v) for k, v in b.items()
                if k != "concept"}

    def _build_bank(self) -> dict:
        """Frozen-model trajectories, sampled once: x_t is then read instead of sampled every step."""
        import jax
        import jax.numpy as jnp
        from tqdm.auto import tqdm

        from unlearn_jax.sampling import sample_trajectory

        n = self.cfg.sampler.bank_size
        step = self.step_fn

        g, family = self.settings.guidance_scale, step.family

        @jax.jit
        def traj(base, noise, ctx, uncond, key):
            vel = lambda x, t, c: step.velocity(base, None, x, c, t)[0]  # noqa: E731
            return sample_trajectory(vel, self.schedule, noise, family.with_guidance(ctx, g),
                                     family.with_guidance(uncond, g), guidance_scale=family.cfg_scale(g), key=key,
                                     guidance_scale_2=step.guidance_2(), boundary=step.boundary)

        rng = np.random.default_rng([self.cfg.seed, 0xBA2C])
        xs, xps, rows_all, pre_all = [], [], [], []
        total = len(self.data.names) * n
        bar = tqdm(total=total, desc="frozen trajectory bank", disable=not (self.progress and self.is_main))
        for k in range(len(self.data.names)):
            rows = [int(rng.choice(self.data.pools[k])) for _ in range(n)]
            pre = [int(rng.choice(self.data.preserve[k])) if len(self.data.preserve[k]) else -1 for _ in range(n)]
            x_k, xp_k = [], []
            for e in range(n):
                key = jax.random.key(int(rng.integers(0, 2**31)))
                noise = jax.random.normal(key, (1, *self.latent_shape), jnp.float32)
                uncond = self.data.uncond
                x_k.append(np.asarray(traj(self.base, noise, take_rows(self.data.embeds, [rows[e]]), uncond,
                                           key))[:, 0])
                pctx = take_rows(self.data.embeds, [max(pre[e], 0)])
                xp_k.append(np.asarray(traj(self.base, jax.random.normal(jax.random.fold_in(key, 1), noise.shape),
                                            pctx, uncond, key))[:, 0])
                bar.update(1)
            xs.append(np.stack(x_k))
            xps.append(np.stack(xp_k))
            rows_all.append(rows)
            pre_all.append(pre)
        bar.close()
        return {"x": np.stack(xs), "x_pre": np.stack(xps), "rows": rows_all, "pre_rows": pre_all}

    # ---- checkpoints ---------------------------------------------------------------------------
    def _good_step(self) -> int | None:
        """The newest checkpoint whose files match their checksums; corrupt newer ones are set aside
        (renamed `<step>.corrupt`, never deleted), saying so. Called before the manager lists the steps."""
        from unlearn_jax.checkpoint_integrity import CheckpointCorrupt, check_steps, latest_good_step, quarantine

        good, message = latest_good_step(self.checkpoint_dir)
        if message and self.is_main:
            print(f"note: {message}", file=sys.stderr)
        if good is None and message:
            raise CheckpointCorrupt(f"{message}; move {self.checkpoint_dir} away to start the run again")
        if self.is_main:
            for step, v in check_steps(self.checkpoint_dir):
                if good is not None and step > good and not v.ok:
                    print(f"note: {v.step_dir} set aside as {quarantine(v.step_dir).name}", file=sys.stderr)
        if jax_process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("unlearn-jax checkpoint check")
        self.last_good = good
        return good

    def _manager(self):
        import orbax.checkpoint as ocp

        opts = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.train.keep_checkpoints, create=True)
        return ocp.CheckpointManager(self.checkpoint_dir.absolute(), options=opts)

    def _save(self, mngr, step: int):
        """Saves a step and writes its checksums; a step already saved (a rerun of a finished run) is kept."""
        import orbax.checkpoint as ocp

        from unlearn_jax.checkpoint_integrity import verify, write_manifest

        if step in mngr.all_steps() and verify(self.checkpoint_dir / str(step)).ok:
            return
        mngr.save(step, args=ocp.args.StandardSave(self.state), force=True)
        mngr.wait_until_finished()
        if self.is_main:
            write_manifest(self.checkpoint_dir / str(step))
        self.last_good = step

    def _restore(self, mngr, step: int | None) -> int:
        import jax
        import orbax.checkpoint as ocp

        if step is None:
            return 0
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state,
                                self.state_sharding)
        self.state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        return int(self.state.step)

    def _check_config_compatible(self):
        """A workdir's earlier run is resumed only with the fields that shape its trajectory unchanged."""
        from unlearn_jax.erase_checks import check_resume
        from unlearn_jax.jsonfiles import read_json_object

        path = self.workdir / "config.json"
        if not path.exists():
            return
        old = read_json_object(path, "run config (move the workdir away to start over)")
        check_resume(old, json.loads(self._config_json()), self.workdir)

    def _config_json(self) -> str:
        from unlearn_jax.config import to_json

        return to_json(self.cfg)

    # ---- the loop ------------------------------------------------------------------------------
    def train(self, stop_after_steps: int | None = None) -> dict:
        """Runs to `train.num_steps` (or `stop_after_steps` more steps); resumes from the latest good
        checkpoint; a finished run only completes what is missing (export, evaluation). Releases the
        workdir at the end."""
        try:
            return self._train(stop_after_steps)
        finally:
            self.close()

    def _train(self, stop_after_steps: int | None) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._check_config_compatible()
        self._check_outputs()
        if self.is_main:
            with atomic_file(self.workdir / "config.json", "w") as f:
                f.write(self._config_json())
        good = self._good_step()
        mngr = self._manager()
        start = self._restore(mngr, good)
        metrics_path = self.workdir / "metrics.jsonl"
        history = _read_metrics(metrics_path, below=start)
        if self.is_main:
            _write_metrics(metrics_path, history)
        if cfg.check.every and self.checker is None:
            self.checker = self._build_checker()
        checks = Checks(self, mngr, start) if self.checker is not None else None
        end = cfg.train.num_steps if stop_after_steps is None else min(cfg.train.num_steps, start + stop_after_steps)
        if checks is not None and checks.final is not None:
            end = start  # an in-run check already ended this run: only what is missing is done
        stop = {"signal": None}
        old_handler = None
        if threading_is_main():
            old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("signal", "SIGTERM"))
        status, step = "completed", start
        bar = tqdm(total=cfg.train.num_steps, initial=start, desc="erase", disable=not (self.progress and self.is_main))
        log = open(metrics_path, "a") if self.is_main else None
        try:
            while step < end:
                t0 = time.perf_counter()
                batch = self.host_batch(step)
                new_state, m = self.jit_step(self.state, self.base, batch)
                m = {k: _scalar(v) for k, v in m.items()}
                if not math.isfinite(m["loss"]):
                    # The donated old state is gone; the last verified checkpoint is kept as it is.
                    status = "non_finite"
                    kept = (f"{self.checkpoint_dir} keeps the last verified checkpoint (step {self.last_good})"
                            if self.last_good is not None else "no checkpoint was written yet")
                    raise NonFiniteLoss(f"step {step}: loss is {m['loss']} (terms: "
                                        f"{ {k: m[k] for k in ('loss_unlearn', 'loss_loc', 'loss_pre')} }); the run "
                                        f"stopped and {kept}. Lower train.learning_rate or erase.eta and resume")
                self.state = new_state
                step += 1
                rec = {"step": step, **{k: m[k] for k in LOGGED if k in m},
                       "seconds": round(time.perf_counter() - t0, 4)}
                history.append(rec)
                if log is not None and (step % cfg.train.log_every == 0 or step == end):
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix({k: f"{m[k]:.3g}" for k in ("loss", "loss_unlearn", "loss_loc", "loss_pre")})
                if checks is not None and (step % cfg.check.every == 0 or step == cfg.train.num_steps):
                    back = checks.at(step, last=step == cfg.train.num_steps)
                    if back is not None:  # reverted: the steps after `back` are trained again, more gently
                        history = [r for r in history if r["step"] <= back]
                        if log is not None:
                            log.close()
                            _write_metrics(metrics_path, history)
                            log = open(metrics_path, "a")
                        bar.n = step = back
                        bar.refresh()
                    if checks.final is not None:
                        break
                elif checks is None and step % cfg.train.checkpoint_every == 0 and step < end:
                    self._save(mngr, step)
                if stop["signal"]:
                    status = "interrupted"
                    break
            step = int(self.state.step)
            self._save(mngr, step)
        finally:
            bar.close()
            if log is not None:
                log.close()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
            mngr.close()
        summary = {"status": status, "step": step, "workdir": str(self.workdir)}
        if cfg.robust.every:
            summary["robust_cost"] = robust_cost(history)
        if checks is not None:
            summary["check"] = checks.summary()
        self.plot(history)  # every process joins the mask computation; the main one writes
        finished = step >= cfg.train.num_steps or (checks is not None and checks.final is not None)
        if status == "completed" and finished:
            phi = _gather(self.state.phi)  # collective: every process takes part
            if self.is_main:
                summary["exports"] = self.export(phi)
                if cfg.evaluate.toy_world:
                    summary.update(self.evaluate_toy_world(phi, summary.get("check")))
        return summary

    # ---- outputs -------------------------------------------------------------------------------
    def _check_outputs(self):
        """What the outputs need of this machine and this model, checked before training, not found wrong
        after it (the values themselves: `erase_checks.validate_erase_config`)."""
        import importlib.util

        if "t2vunlearning" in self.cfg.export.formats and importlib.util.find_spec("torch") is None:
            raise UnlearnError("config.export.formats: t2vunlearning writes eraser_weights.pt, which needs PyTorch "
                               "(pip install 'unlearn-jax[torch]'), or leave that format out")
        e = self.cfg.evaluate
        if not e.toy_world:
            return
        from unlearn_jax.toy import evaluate as toy_eval

        if not (self.pipeline / "toy_world.json").is_file():
            raise UnlearnError(f"config.evaluate.toy_world: {self.pipeline} is not a toy-world pipeline "
                               "(no toy_world.json); evaluate real models with `unlearn-jax eval`")
        toy_eval.check_concept_names(e.erased_concepts, "config.evaluate.erased_concepts")

    def evaluate_toy_world(self, phi, check: dict | None = None) -> dict:
        """The before/after table of a toy-world run (config.evaluate): eval.json and eval.md (with the in-run
        check's outcome when the run had one)."""
        from unlearn_jax.toy import evaluate as toy_eval

        e = self.cfg.evaluate
        cfg = toy_eval.EvalConfig(n=e.n, num_steps=e.num_steps, guidance_scale=e.guidance_scale, seed=e.seed)
        out = toy_eval.evaluate_erasure(self.pipeline, (self.eraser, phi), cfg, list(e.erased_concepts))
        table = toy_eval.format_comparison(out["comparison"])
        if check is not None:
            out["in_run_check"] = check
            table += f"\nin-run check: {check['outcome']}"
        toy_eval.write_results(self.workdir / "eval.json", self.workdir / "eval.md", out, table)
        # "completed" says the training ran to its end; whether it erased is this (also in eval.json)
        target = "met" if out["comparison"]["target_met"] else "NOT met"
        return {"evaluation": str(self.workdir / "eval.json"), "erasure_target": target, "table": table}

    def plot(self, history: list[dict]):
        from unlearn_jax.plots import plot_losses, plot_masks

        masks = self.probe_masks() if self.settings.alpha_loc and self.eraser.kind == "adapter" else None
        if not self.is_main:
            return
        if history:
            plot_losses(history, self.workdir / "loss_curves.png")
        if masks is not None:
            plot_masks(masks, self.workdir / "masks.png", self.data.names[0])

    def probe_masks(self):
        """Per-layer localization masks of the frozen model on the first concept's phrase (for the plot)."""
        import jax
        import jax.numpy as jnp

        from unlearn_jax import objectives as O

        s, step = self.settings, self.step_fn
        row = int(self.data.pools[0][0])

        @jax.jit
        def masks(base, x, ctx, idx, valid):
            def concept(view, extra):
                return O.concept_attention_map(view, idx, valid, s.mask_key_chunk)

            _, aux = step.velocity(base, None, x, ctx, self.schedule.sample_timesteps[s.num_sampler_steps // 2],
                                   concept_fn=concept)
            return O.localization_masks(aux["concept"], step.grid, s.mask_threshold, s.mask_mode)


        x = jax.random.normal(jax.random.key(self.cfg.seed), (1, *self.latent_shape), jnp.float32)
        m = masks(self.base, x, take_rows(self.data.embeds, [row]), self.data.concept_idx[row][None],
                  self.data.concept_valid[row][None])
        m = _gather(m)
        return m[:, 0].reshape(m.shape[0], *step.grid)

    def export(self, phi) -> list[str]:
        """Writes the configured export formats of the trained erasers `phi` (host arrays)."""
        from unlearn_jax import eraser_io, export
        from unlearn_jax.atomic import safe_child

        out = []
        # replaces an earlier export of this run (a rerun), never anything else, never through a link
        kw = dict(overwrite=True, root=self.workdir)
        for fmt in self.cfg.export.formats:
            target = safe_child(self.export_dir, fmt)
            if fmt == "erasers":
                eraser_io.save_erasers(target, self.eraser, phi, self.model.config, **kw)
            elif fmt == "t2vunlearning":
                export.export_t2vunlearning(target, self.eraser, phi, self.model, readme=True, **kw)
            elif fmt == "lora":
                export.export_lora(target, self.eraser, phi, self.model, readme=True, **kw)
            elif fmt == "diffusers":
                export.export_merged(target, self.model, self.eraser, phi, **kw)
            out.append(str(target))
        return out


class Checks:
    """The in-run check's decisions for one run (config.check), kept in <workdir>/checks.jsonl so a resumed run
    continues with the same learning rate, reverts and verdict. With checks on, checkpoints are written at the
    checks that pass (and at the start), so the newest passing one is the state to go back to."""

    def __init__(self, run: "Run", mngr, start: int):
        self.run, self.mngr = run, mngr
        self.path = run.workdir / "checks.jsonl"
        self.records = _read_records(self.path)
        last = self.records[-1] if self.records else {}
        self.lr_scale, self.reverts = last.get("lr_scale", 1.0), last.get("reverts", 0)
        self.final = last.get("final")
        self.good = last.get("good_step", 0)
        self.streak = last.get("streak", 0)  # checks in a row that found the concept gone
        from unlearn_jax.toy.run_check import CheckSettings

        self.settings = CheckSettings.from_config(run.cfg.check)
        if self.lr_scale != 1.0:
            run._set_learning_rate(run.cfg.train.learning_rate * self.lr_scale)
        if start == 0 and not self.records:
            run._save(mngr, 0)  # the untrained erasers: where a revert before any passing check goes back to

    def _write(self, rec: dict):
        self.records.append(rec)
        if self.run.is_main:
            _write_metrics(self.path, self.records)

    def at(self, step: int, last: bool) -> int | None:
        """Judges the erasers at `step`; returns the step the run went back to, or None. Sets `final` when the
        run ends here (the target reached, too many reverts, or the last step)."""
        run, k = self.run, self.settings
        verdict = run.checker.judge_phi(run.base, run.state.phi)
        rec = {"step": step, **verdict, "lr_scale": self.lr_scale}
        back = None
        if not verdict["harmed"]:
            run._save(self.mngr, step)
            self.good = step
            rec["action"] = "kept"
            self.streak = self.streak + 1 if verdict["reached"] else 0
            if verdict["reached"] and self.streak >= k.confirm:
                self.final = f"target reached at step {step}"
                rec["action"] = "target reached: the run ends here"
            else:
                if verdict["reached"]:
                    rec["action"] = f"gone ({self.streak} of {k.confirm} checks in a row): kept"
                if last:
                    self.final = (f"train.num_steps={step} reached without the target confirmed (erased rate "
                                  f"{verdict['erased_rate']:.2f}, gone at {self.streak} of {k.confirm} checks in a row)")
        else:
            self.reverts += 1
            self.streak = 0
            back = self.good
            run._restore(self.mngr, back)
            for s in self.mngr.all_steps():  # the states after the one gone back to are not this run's any more
                if s > back:
                    self.mngr.delete(s)
            if self.reverts > k.max_reverts or last:
                self.final = (f"harm found {self.reverts} times (other concepts, or the concept's own videos broken); "
                              f"stopped at the last state that passed (step {back})")
                rec["action"] = "stopped"
            else:
                self.lr_scale *= k.lr_decay
                run._set_learning_rate(run.cfg.train.learning_rate * self.lr_scale)
                rec["action"] = f"reverted to step {back}, learning rate x{self.lr_scale:g}"
        rec.update(reverts=self.reverts, good_step=self.good, streak=self.streak, final=self.final)
        self._write(rec)
        if run.is_main:
            print(f"check at step {step}: erased {verdict['erased_rate']:.2f} (broken {verdict['erased_broken']:.2f}), "
                  f"other concepts pooled drop {verdict['pooled_drop']:+.2f} (largest {verdict['max_drop']:.2f} {verdict['max_drop_concept']}), "
                  f"broken {verdict['broken_increase']:+.2f}: {rec['action']}"
                  + (f" ({'; '.join(verdict['reasons'])})" if verdict.get("reasons") else ""), file=sys.stderr)
        return back

    def summary(self) -> dict:
        outcome = self.final or "not ended (resume to continue)"
        return {"outcome": outcome, "reached": bool(self.final and self.final.startswith("target reached")),
                "checks": len(self.records), "reverts": self.reverts, "learning_rate_scale": self.lr_scale,
                "final_step": self.good, "log": str(self.path)}


def _read_records(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file, one per line (a torn last line is skipped); none if it is missing."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _gather(tree):
    """Host copies of (possibly multi-process) arrays; a collective when arrays span processes."""
    import jax

    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def _scalar(x) -> float:
    """A replicated scalar's value, read from this process's own shard (valid across hosts)."""
    shards = getattr(x, "addressable_shards", None)
    return float(np.asarray(shards[0].data)) if shards else float(x)


def jax_process_count() -> int:
    import jax

    return jax.process_count()


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _read_metrics(path: Path, below: int) -> list[dict]:
    """Logged records of steps <= `below` (a resumed run rewrites what came after its checkpoint)."""
    return [r for r in _read_records(path) if r.get("step", 0) <= below]


def _write_metrics(path: Path, records: list[dict]):
    with atomic_file(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


EXPORT_FORMATS = ("erasers", "t2vunlearning", "lora", "diffusers")


def run_erase(cfg, progress: bool = True, stop_after_steps: int | None = None) -> dict:
    return Run(cfg, progress=progress).train(stop_after_steps)
