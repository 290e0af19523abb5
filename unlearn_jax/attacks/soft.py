"""The `soft` attack: the prompt's conditioning itself optimised (continuous embeddings, no tokens).

Adam on every floating leaf of the conditioning (the family's embeddings; HunyuanVideo's guidance leaf is
rewritten by the family and gets no gradient), from the encoding of a starting prompt, to minimise
`objective.attack_loss`. An upper bound of what a prompt can do: it says whether the concept is still
reachable in the weights, not whether a user could type it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unlearn_jax.attacks.objective import Targets, Velocities, attack_loss


def soft_attack(vel: Velocities, targets: Targets, start_cond, *, steps: int = 100, learning_rate: float = 1e-2,
                erasers_on: bool = True, progress=None):
    """(the best conditioning seen (batch 1), loss history (steps + 1,): the loss before each update and after
    the last): Adam on the floating leaves of `start_cond`."""
    start = jax.tree.map(jnp.asarray, start_cond)
    floating = jax.tree.map(lambda a: jnp.issubdtype(a.dtype, jnp.floating), start)
    params = jax.tree.map(lambda a, f: a.astype(jnp.float32) if f else a, start, floating)
    tx = optax.adam(learning_rate)
    trainable = jax.tree.map(lambda a, f: a if f else None, params, floating)
    opt = tx.init(trainable)

    def merge(tr):
        return jax.tree.map(lambda a, t, f: t if f else a, params, tr, floating)

    @jax.jit
    def step(tr, opt):
        loss, g = jax.value_and_grad(lambda p: attack_loss(vel, targets, merge(p), erasers_on))(tr)
        upd, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, upd), opt, loss

    # history[i]: the loss at the conditioning after i updates; the best one seen is returned (Adam's first
    # steps can raise the loss from a start that is already near the target)
    history, best, best_loss = [], trainable, np.inf
    for _ in range(steps + 1):
        new, new_opt, loss = step(trainable, opt)
        loss = float(loss)  # at `trainable`, before this update
        history.append(loss)
        if loss < best_loss:
            best, best_loss = trainable, loss
        if progress is not None:
            progress(loss)
        if len(history) == steps + 1:
            break
        trainable, opt = new, new_opt
    return jax.tree.map(np.asarray, merge(best)), np.asarray(history, np.float32)
