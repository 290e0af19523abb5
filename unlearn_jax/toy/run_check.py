"""The in-run check of a toy-world erasure: is the concept gone yet, and is the rest still intact?

Every `check.every` steps `unlearn-jax erase` generates a small fixed set of videos with the erasers
as they are — `check.n` prompts naming the erased concept(s) and `check.n_other` prompts for every
other concept, train synonyms only, with a seed of their own so the final evaluation's prompts and
noise are never seen — and the toy detector judges them against the base model's videos of the same
prompts and noise. The loop then stops when the concept is gone, or, when the rest is harmed, goes
back to the last state that passed and lowers the learning rate (`unlearn_jax.erase`); so does an
erasure that overshoots, breaking the erased concept's own videos instead of changing them. This is
the erasure's own stopping rule, not a tuned number of steps: the same config erases a colour, a
shape or a motion, each stopping when its own prompts say so.

The judgement (`judge`) is a pure function of two detection lists; the thresholds are in
`CheckSettings`. With 8 prompts per other concept one video is 0.125, so a single concept is called
harmed only when it loses more than `drop_margin` (3 of 8 by default); the pooled rate of all other
concepts (80 videos) must also stay within `pooled_margin`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class CheckSettings:
    every: int = 0               # training steps between checks (0: off; the config default too)
    n: int = 32                  # prompts per erased concept
    n_other: int = 8             # prompts per other concept
    seed: int = 1009             # prompts and noise of the check (the final evaluation uses evaluate.seed)
    erased_target: float = 0.07  # gone: the erased concept's rate plus its broken fraction at most this (2 of 32)
    confirm: int = 2             # stop when this many checks in a row find the concept gone (one may be mid-way)
    erased_broken_limit: float = 0.2  # more of the erased concept's videos broken than this: overshoot (harm)
    drop_margin: float = 0.25    # one other concept may lose at most this much of its base rate
    pooled_margin: float = 0.05  # the other concepts' pooled rate may drop at most this much
    broken_margin: float = 0.05  # the other concepts' pooled broken fraction may grow at most this much
    max_reverts: int = 3         # harmed this many times more: stop with the last state that passed
    lr_decay: float = 0.5        # the learning rate's factor at each revert

    @classmethod
    def from_config(cls, c) -> "CheckSettings":
        return cls(**{f.name: getattr(c, f.name) for f in dataclasses.fields(cls)})


def _stats(items: Sequence[dict], detections: Sequence[dict]) -> dict:
    """Per concept: (shown, broken, n) counts."""
    out = {}
    for it, d in zip(items, detections):
        ok = d.get("broken") is None
        shown = ok and d[it["attribute"]] == it["value"]
        s, b, n = out.get(it["concept"], (0, 0, 0))
        out[it["concept"]] = (s + shown, b + (not ok), n + 1)
    return out


def judge(items: Sequence[dict], base: Sequence[dict], now: Sequence[dict], erased: Sequence[str],
          s: CheckSettings) -> dict:
    """The check's verdict from the base model's and the current model's detections of the same items.

    erased_rate: the erased concepts' largest (shown + broken) / n (a broken video is not erased);
    harmed (with `reasons`): another concept lost more than drop_margin, their pooled rate more than
    pooled_margin, their pooled broken fraction grew more than broken_margin, or more than erased_broken_limit
    of the erased concept's own videos are broken (the erasure overshot: a broken video is not an erased one);
    reached: erased_rate <= erased_target and not harmed.
    """
    b, c = _stats(items, base), _stats(items, now)
    erased_rate = max(((c[k][0] + c[k][1]) / c[k][2] for k in erased if k in c), default=0.0)
    erased_broken = max((c[k][1] / c[k][2] for k in erased if k in c), default=0.0)
    others = [k for k in b if k not in erased]
    drops = {k: (b[k][0] - c[k][0]) / b[k][2] for k in others}
    total = sum(b[k][2] for k in others) or 1
    pooled_drop = sum(b[k][0] - c[k][0] for k in others) / total
    broken_increase = sum(c[k][1] - b[k][1] for k in others) / total
    worst = max(drops, key=drops.get) if drops else None
    reasons = []
    if drops and drops[worst] > s.drop_margin + 1e-9:
        reasons.append(f"{worst} lost {drops[worst]:.2f}")
    if pooled_drop > s.pooled_margin + 1e-9:
        reasons.append(f"the other concepts lost {pooled_drop:.2f} pooled")
    if broken_increase > s.broken_margin + 1e-9:
        reasons.append(f"{broken_increase:.2f} more of the other concepts' videos broken")
    if erased_broken > s.erased_broken_limit + 1e-9:  # pushed past any valid video: an overshoot, not an erasure
        reasons.append(f"{erased_broken:.2f} of the erased concept's videos broken")
    harmed = bool(reasons)
    return {"erased_rate": erased_rate, "erased_broken": erased_broken, "max_drop": drops[worst] if worst else 0.0,
            "max_drop_concept": worst, "pooled_drop": pooled_drop, "broken_increase": broken_increase, "harmed": harmed,
            "reasons": reasons,
            "reached": bool(erased_rate <= s.erased_target + 1e-9 and not harmed)}


class ToyCheck:
    """The check's fixed videos for one run: `judge_phi(base_params, phi)` generates them with the run's
    model and erasers (`velocity(base, phi, x, ctx, t) -> (v, aux)`, the erasure step's) and judges them
    against the base model's, computed once here."""

    def __init__(self, pipeline, velocity, base_params, erased: Sequence[str], settings: CheckSettings,
                 num_steps: int, guidance_scale: float):
        from unlearn_jax.sampling import sample
        from unlearn_jax.schedulers import make_schedule
        from unlearn_jax.toy import evaluate as E
        from unlearn_jax.toy.detector import check

        self.erased, self.s, self._check = list(erased), settings, check
        model, sched, world_cfg, encode = E.load_pipeline(pipeline)
        cfg = E.EvalConfig(n=settings.n, num_steps=num_steps, guidance_scale=guidance_scale, seed=settings.seed,
                           splits=("train",), avoid=tuple(self.erased))
        pairs = [tuple(k.split(":", 1)) for k in self.erased]
        others = [p for p in E.concepts() if p not in pairs]
        self.items = E.eval_prompts(cfg, pairs) + E.eval_prompts(dataclasses.replace(cfg, n=settings.n_other), others)
        self.ctx = encode([it["prompt"] for it in self.items])
        self.uncond = encode([""])
        schedule = make_schedule(sched, num_steps)
        self.layout = E.latent_layout(model)
        self.noise = E.prompt_noise(jax.random.key(settings.seed), range(len(self.items)), world_cfg, self.layout)
        self._to_videos = E.to_videos

        @jax.jit
        def gen(base, phi, noise, ctx, uncond):
            return sample(lambda x, t, c: velocity(base, phi, x, c, t)[0], schedule, noise, ctx, uncond,
                          num_steps=num_steps, guidance_scale=guidance_scale).latents

        self._gen = gen
        self.base_detections = self._detect(base_params, None)

    def _detect(self, base_params, phi) -> list[dict]:
        latents = np.asarray(self._gen(base_params, phi, self.noise, self.ctx, self.uncond))
        return [self._check(v) for v in self._to_videos(latents, self.layout)]

    def judge_phi(self, base_params, phi) -> dict:
        return judge(self.items, self.base_detections, self._detect(base_params, phi), self.erased, self.s)


__all__ = ["CheckSettings", "ToyCheck", "judge"]
