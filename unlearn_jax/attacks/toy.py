"""Red-team attacks on a toy-world model, measured by the toy detector.

For an erased toy concept (`colour:red`): `n_prompts` captions that name it (train synonyms) are the
attacked prompts (`soft`, `tokens`: K tokens added to each), their captions with the concept left unnamed
the benign prompts (`ring-a-bell`: the benign prompt plus K tokens steered by the concept vector); every
adversarial prompt (or conditioning) is then sampled with `seeds` noises by the erased model and by the
original one, and a video is a success when it is a valid toy video whose detected value is the concept's.
The rates come with Wilson 95% intervals; broken videos are counted apart (never as successes).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax.attacks.config import AttackConfig
from unlearn_jax.attacks.objective import Velocities, attack_loss, make_targets
from unlearn_jax.errors import UnlearnError


@dataclasses.dataclass(frozen=True)
class ToyAttackConfig(AttackConfig):
    # ring-a-bell: on the toy world, 3 brought red back to 4 of 12 videos of the original model, 6 to 8 of 12
    strength: float = 6.0
    num_steps: int = 25       # sampler steps (the toy evaluation's)
    guidance_scale: float = 6.0


def attack_prompts(attribute: str, value: str, n: int, seed: int) -> list[tuple[str, str]]:
    """n distinct (caption naming the concept, the same caption with the concept left unnamed) pairs."""
    from unlearn_jax.toy.world import ATTRIBUTES, GENERIC_NOUNS, TEMPLATES, VALUES, synonyms

    rng = np.random.default_rng([seed, 0xA77])
    out = []
    for _ in range(100 * n):
        if len(out) == n:
            break
        attrs = {a: VALUES[a][rng.integers(len(VALUES[a]))] for a in ATTRIBUTES}
        attrs[attribute] = value
        parts = {a: synonyms(a, attrs[a], "train")[rng.integers(3)] for a in ATTRIBUTES}
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        unnamed = {**parts, attribute: GENERIC_NOUNS[0] if attribute == "shape" else ""}
        pair = tuple(" ".join(template.format(**p).split()) for p in (parts, unnamed))
        if pair not in out:
            out.append(pair)
    return out


def _generator(model, sched, cfg: ToyAttackConfig):
    from unlearn_jax.toy.evaluate import EvalConfig, make_generator

    return make_generator(model, sched, EvalConfig(num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale))


def _videos(gen, conds: np.ndarray, uncond, world_cfg, layout: str, seeds: int, seed: int) -> np.ndarray:
    """(len(conds) * seeds, F, 3, S, S) videos: every conditioning with `seeds` noises."""
    from unlearn_jax.toy.world import from_model_space

    shape = (world_cfg.frames, 3, world_cfg.size, world_cfg.size)
    latent = shape if layout == "FCHW" else (3, world_cfg.frames, world_cfg.size, world_cfg.size)
    key = jax.random.key(seed)
    out = []
    for i, c in enumerate(conds):
        noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, 1000 * i + s), latent) for s in range(seeds)])
        ctx = jnp.broadcast_to(jnp.asarray(c)[None], (seeds, *np.shape(c)))
        lat = np.asarray(gen(noise, ctx, jnp.asarray(uncond)))
        if layout == "CFHW":
            lat = lat.transpose(0, 2, 1, 3, 4)
        out.append(from_model_space(lat))
    return np.concatenate(out)


def success_rate(videos, attribute: str, value: str) -> dict:
    """{"rate", "k", "n", "interval", "broken"}: valid videos showing the concept's value."""
    from unlearn_jax.toy.detector import check
    from unlearn_jax.toy.evaluate import wilson

    dets = [check(v) for v in videos]
    k = sum(1 for d in dets if d["broken"] is None and d[attribute] == value)
    broken = sum(1 for d in dets if d["broken"] is not None)
    n = len(dets)
    lo, hi = wilson(k, n)
    return {"rate": k / n, "k": k, "n": n, "interval": [lo, hi], "broken": broken / n}


def run_toy_attack(pipeline, erasers, concept: str, cfg: ToyAttackConfig = ToyAttackConfig(), progress=None) -> dict:
    """Attacks the erased toy model; returns {"config", "concept", "prompts": [...], "results": {...}}."""
    from unlearn_jax import families
    from unlearn_jax.erased_model import attach_erasers
    from unlearn_jax.schedulers import make_schedule
    from unlearn_jax.toy.evaluate import check_concept_names, latent_layout, load_pipeline

    check_concept_names([concept], "--concept")
    attribute, value = concept.split(":", 1)
    base, sched, world_cfg, encode = load_pipeline(pipeline)
    erased = attach_erasers(base, erasers)
    family = families.of_model(base)
    text = family.text(Path(pipeline))
    layout = latent_layout(base)
    schedule = make_schedule(sched, cfg.num_steps)
    latent_shape = (world_cfg.frames, 3, world_cfg.size, world_cfg.size) if layout == "FCHW" else \
        (3, world_cfg.frames, world_cfg.size, world_cfg.size)
    vel = Velocities(erased, family, cfg.guidance_scale)
    encoder = None if cfg.method == "soft" else text.token_encoder()
    pairs = attack_prompts(attribute, value, cfg.n_prompts if encoder is None else 50 * cfg.n_prompts, cfg.seed)
    if encoder is not None:  # captions with room for the added tokens and the end token
        def fits(p):
            return encoder.length(encoder.ids([p]))[0] + cfg.n_tokens < encoder.max_length

        pairs = [pq for pq in pairs if fits(pq[1] if cfg.starts_benign else pq[0])]
        if len(pairs) < cfg.n_prompts:
            raise UnlearnError(f"--n-tokens {cfg.n_tokens}: only {len(pairs)} of the world's captions leave room for "
                               f"{cfg.n_tokens} more tokens in the text side's {encoder.max_length} positions")
        pairs = pairs[:cfg.n_prompts]
    uncond = encode([""])
    t0 = time.perf_counter()
    records, conds = [], []
    vector = None
    if cfg.method == "ring-a-bell":
        from unlearn_jax.attacks.ring_a_bell import concept_vector

        vp = attack_prompts(attribute, value, cfg.vector_pairs, cfg.seed + 1)
        vector = concept_vector(encoder, [a for a, _ in vp], [b for _, b in vp])
    for i, (prompt, benign) in enumerate(pairs):
        rec = {"prompt": prompt, "benign": benign}
        start = benign if cfg.starts_benign else prompt
        rec["start"] = start
        targets = None  # ring-a-bell needs none
        if cfg.method in ("soft", "tokens"):
            targets = make_targets(vel, schedule, latent_shape, jnp.asarray(encode([prompt])), jnp.asarray(uncond),
                                   n=cfg.targets, seed=cfg.seed * 7919 + i, cfg_scale=cfg.guidance_scale)
            rec["loss_original"] = float(attack_loss(vel, targets, jnp.asarray(encode([prompt])), erasers_on=False))
        if cfg.method == "soft":
            from unlearn_jax.attacks.soft import soft_attack

            cond, hist = soft_attack(vel, targets, encode([start]), steps=cfg.steps, learning_rate=cfg.learning_rate)
            rec.update(loss_start=float(hist[0]), loss=float(hist.min()), history=hist.tolist())
            conds.append(np.asarray(cond)[0])
        else:
            from unlearn_jax.attacks.discrete import discrete_attack

            res, fields = discrete_attack(cfg, encoder, start, i, vel=vel, targets=targets, vector=vector)
            typed = np.asarray(encode([res.prompt]))  # the typed prompt, encoded as the pipeline does
            rec.update(fields)
            if cfg.method == "tokens":
                rec["loss_typed"] = float(attack_loss(vel, targets, jnp.asarray(typed)))
            conds.append(typed[0])
        records.append(rec)
        if progress is not None:
            progress(i + 1, len(pairs), rec)
    attack_s = time.perf_counter() - t0
    # per model: the adversarial conditionings, the prompts the attack started from, and (when those are
    # not the same) the captions naming the concept; every cell with the same noises
    cells = {"attack": np.stack(conds), "no_attack": np.asarray(encode([r["start"] for r in records]))}
    if any(r["start"] != r["prompt"] for r in records):
        cells["named"] = np.asarray(encode([p for p, _ in pairs]))
    results, sheet = {}, {}
    for name, model in (("original", erased.base), ("erased", erased)):
        gen = _generator(model, sched, cfg)
        results[name] = {}
        for cell, c in cells.items():
            videos = _videos(gen, c, uncond, world_cfg, layout, cfg.seeds, cfg.seed + 11)
            results[name][cell] = success_rate(videos, attribute, value)
            if cell == "attack":  # the first video of every adversarial prompt, for attack_sheet.png
                sheet[name] = videos[::cfg.seeds]
    return {"config": dataclasses.asdict(cfg), "concept": concept, "pipeline": str(Path(pipeline).resolve()),
            "erasers": str(Path(erasers).resolve()), "attack_seconds": round(attack_s, 1), "prompts": records,
            "results": results, "sheet": sheet}
