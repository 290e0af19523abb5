"""The `tokens` attack: K adversarial tokens added to a prompt, found by a greedy coordinate search guided by
the gradient with respect to the tokens' one-hot weights (GCG-style), so the result is a prompt a user could
type.

Each step: the gradient of the loss with respect to the one-hot rows of the K adversarial positions ranks,
per position, the `topk` allowed tokens that most decrease it (first-order); `candidates` single-token swaps
are drawn from those and evaluated exactly; the best replaces the current tokens when it is lower. The loss
is any differentiable function of the text side's conditioning: `objective.attack_loss` (the erased model's
velocity against the original's, `tokens`) or an embedding distance (`ring_a_bell`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax.errors import UnlearnError


@dataclasses.dataclass
class TokenSearchResult:
    tokens: np.ndarray         # (K,) the adversarial token ids
    ids: np.ndarray            # (L,) the whole prompt's token ids
    prompt: str                # the text (the starting prompt and the decoded adversarial tokens)
    loss: float                # at `ids`
    history: np.ndarray        # (steps + 1,) the current loss after each step


def insert_slots(ids: np.ndarray, at: int, tokens: np.ndarray) -> np.ndarray:
    """`ids` (L,) with `tokens` inserted at position `at` (the rest shifted right, cut at L)."""
    L = len(ids)
    return np.concatenate([ids[:at], tokens, ids[at:]])[:L].astype(np.int32)


def token_search(encoder, prompt: str, cond_loss: Callable, *, n_tokens: int = 3, steps: int = 30, topk: int = 16,
                 candidates: int = 32, seed: int = 0, init_tokens=None, progress=None) -> TokenSearchResult:
    """Minimises `cond_loss(cond batch 1) -> scalar` over K tokens added to `prompt` (before its end token).

    encoder: the family text side's `token_encoder()` (`text_encoding.TokenEncoder`)."""
    ids0 = encoder.ids([prompt])[0]
    at = int(encoder.length(ids0[None])[0])
    L, K, V = len(ids0), int(n_tokens), int(encoder.vocab_size)
    if K < 1:
        raise UnlearnError(f"n_tokens = {n_tokens}: an attack adds at least one token")
    if at + K >= L:
        raise UnlearnError(f"the prompt has {at} tokens; {K} more do not fit the text side's {L} positions")
    allowed = np.zeros(V, bool)
    allowed[encoder.allowed] = True
    rng = np.random.default_rng(seed)
    cur = np.asarray(init_tokens if init_tokens is not None else rng.choice(encoder.allowed, size=K), np.int32)
    pos = np.arange(at, at + K)

    def weights(all_ids):  # (B, L) -> (B, L, V) one-hot
        return jax.nn.one_hot(all_ids, V, dtype=jnp.float32)

    @jax.jit
    def loss_and_grad(all_ids):
        def f(w):
            return cond_loss(encoder.encode(w))
        w = weights(all_ids[None])
        loss, g = jax.value_and_grad(f)(w)
        return loss, g[0]

    @jax.jit
    def batch_losses(all_ids):  # (B, L) -> (B,)
        return jax.lax.map(lambda row: cond_loss(encoder.encode(weights(row[None]))), all_ids)

    full = insert_slots(ids0, at, cur)
    loss, grad = loss_and_grad(jnp.asarray(full))
    loss = float(loss)
    history = [loss]
    for _ in range(steps):
        g = np.asarray(grad)[pos]                      # (K, V): d loss / d one-hot weight
        g = np.where(allowed[None], g, np.inf)
        top = np.argsort(g, axis=1)[:, :topk]          # per position, the most promising tokens
        cands = np.repeat(full[None], candidates, axis=0)
        which = rng.integers(0, K, size=candidates)
        cands[np.arange(candidates), pos[which]] = top[which, rng.integers(0, top.shape[1], size=candidates)]
        losses = np.asarray(batch_losses(jnp.asarray(cands)))
        best = int(np.argmin(losses))
        if losses[best] < loss:
            full, loss = cands[best], float(losses[best])
            _, grad = loss_and_grad(jnp.asarray(full))
        history.append(loss)
        if progress is not None:
            progress(loss)
    tokens = full[pos]
    text = f"{prompt} {encoder.decode(tokens)}".strip()
    return TokenSearchResult(tokens, full, text, loss, np.asarray(history, np.float32))
