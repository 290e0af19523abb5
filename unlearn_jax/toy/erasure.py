"""Erasure runs on the toy world: the concept entries of a config (prompt pool, aliases, preservation).

A concept of the toy world is an attribute value ("colour", "red"). Its erasure entry names it
by its first train synonym, counts every train synonym's tokens as the concept's tokens
(`aliases`), and, with augmentation, pools captions that name it with train synonyms (the toy
stand-in for the method's LLM paraphrases). Preservation prompts name the attribute's other
values. Held-out synonyms never appear here: they only test the result.
"""
from __future__ import annotations

import numpy as np

from unlearn_jax.toy.world import ATTRIBUTES, VALUES, World, caption, concept_words, synonyms


def _captions(attribute: str, values, n: int, rng: np.random.Generator) -> list[str]:
    world, out = World(), []
    while len(out) < n:
        attrs = world.sample_attributes(rng)
        attrs[attribute] = values[len(out) % len(values)]
        text = caption(attrs, rng, "train")
        if text not in out:
            out.append(text)
    return out


def concept_entry(attribute: str, value: str, *, augment: bool = True, num_prompts: int = 48,
                  num_preserve: int = 48, preserve: bool = True, seed: int = 0, eta: float | None = None) -> dict:
    """One `config.concepts` entry erasing `attribute:value` from a toy-world model."""
    if attribute not in ATTRIBUTES or value not in VALUES[attribute]:
        known = ", ".join(f"{a}:{v}" for a in ATTRIBUTES for v in VALUES[a])
        raise ValueError(f"{attribute}:{value} is not a toy-world concept (known: {known})")
    rng = np.random.default_rng([seed, ATTRIBUTES.index(attribute), VALUES[attribute].index(value)])
    words = concept_words(attribute, value, "train")
    entry = {"phrase": synonyms(attribute, value, "train")[0], "type": "object", "aliases": list(words[1:]),
             "prompts": _captions(attribute, [value], num_prompts, rng) if augment else [],
             "preserve": (_captions(attribute, [v for v in VALUES[attribute] if v != value], num_preserve, rng)
                          if preserve else [])}
    if attribute == "motion":  # the phrase is "moving up": its direction words are the concept's tokens
        entry["aliases"] = list(words)
    if eta is not None:
        entry["eta"] = float(eta)
    return entry


__all__ = ["concept_entry"]
