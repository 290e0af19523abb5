"""The `ring-a-bell` attack (Tsai et al. 2024), model-agnostic: it needs the text encoder only.

1. A concept vector: the mean text-encoder embedding of prompts that show the concept minus that of the
   same prompts without it, `v = mean enc(p_i + concept) - mean enc(p_i)`.
2. A target near a benign prompt: `enc(benign) + strength * v`.
3. A discrete search for a prompt whose embedding is closest to the target: the benign prompt plus K
   tokens. The paper searches with a genetic algorithm; ours uses the same gradient-guided coordinate
   search as the `tokens` attack (`tokens.token_search`) on the squared distance.

The prompt found is then given to the erased model: nothing of the erased model is used to find it.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from unlearn_jax.attacks.tokens import TokenSearchResult, token_search


def concept_vector(encoder, with_concept, without_concept) -> np.ndarray:
    """(L, D): mean encoding of the prompts with the concept minus the mean without it (paired lists)."""
    if len(with_concept) != len(without_concept) or not with_concept:
        raise ValueError("concept_vector needs paired, non-empty prompt lists")
    import jax

    def enc(prompts):
        w = jax.nn.one_hot(jnp.asarray(encoder.ids(prompts)), encoder.vocab_size, dtype=jnp.float32)
        return np.asarray(encoder.encode(w), np.float32)

    return enc(with_concept).mean(0) - enc(without_concept).mean(0)


def ring_a_bell(encoder, benign: str, vector: np.ndarray, *, strength: float = 3.0, n_tokens: int = 3,
                steps: int = 30, topk: int = 16, candidates: int = 32, seed: int = 0,
                progress=None) -> TokenSearchResult:
    """The benign prompt plus `n_tokens` tokens whose encoding is closest to enc(benign) + strength * vector."""
    import jax

    ids = jnp.asarray(encoder.ids([benign]))
    base = encoder.encode(jax.nn.one_hot(ids, encoder.vocab_size, dtype=jnp.float32))[0]
    target = base + strength * jnp.asarray(vector)

    def loss(cond):
        return jnp.mean(jnp.square(cond[0] - target))

    return token_search(encoder, benign, loss, n_tokens=n_tokens, steps=steps, topk=topk, candidates=candidates,
                        seed=seed, progress=progress)
