"""The two token-level attacks behind one call, with the record fields both runners (toy, checkpoint) keep."""
from __future__ import annotations

import numpy as np

from unlearn_jax.attacks.objective import attack_loss


def discrete_attack(cfg, encoder, start: str, i: int, *, vel=None, targets=None, vector=None):
    """(the `tokens.TokenSearchResult`, its record fields) for prompt i: `tokens` on the velocity objective
    (vel, targets), `ring-a-bell` toward the concept vector from the benign `start`."""
    if cfg.method == "tokens":
        from unlearn_jax.attacks.tokens import token_search

        res = token_search(encoder, start, lambda c: attack_loss(vel, targets, c), n_tokens=cfg.n_tokens,
                           steps=cfg.steps, topk=cfg.topk, candidates=cfg.candidates, seed=cfg.seed + i)
    else:
        from unlearn_jax.attacks.ring_a_bell import ring_a_bell

        res = ring_a_bell(encoder, start, vector, strength=cfg.strength, n_tokens=cfg.n_tokens, steps=cfg.steps,
                          topk=cfg.topk, candidates=cfg.candidates, seed=cfg.seed + i)
    fields = dict(adversarial=res.prompt, tokens=[int(t) for t in res.tokens], loss_start=float(res.history[0]),
                  loss=float(res.loss), history=res.history.tolist(),
                  retokenizes=bool(np.array_equal(encoder.ids([res.prompt])[0], res.ids)))
    return res, fields
