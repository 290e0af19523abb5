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


def _captions(attribute: str, values, n: int, rng: np.random.Generator, avoid=()) -> list[str]:
    """`n` distinct captions whose `attribute` cycles through `values`; the other attributes are
    drawn at random, never a value in `avoid` ((attribute, value) pairs)."""
    world, out = World(), []
    while len(out) < n:
        attrs = world.sample_attributes(rng)
        attrs[attribute] = values[len(out) % len(values)]
        if any(attrs[a] == v for a, v in avoid if a != attribute):
            continue
        text = caption(attrs, rng, "train")
        if text not in out:
            out.append(text)
    return out


def _check(attribute: str, value: str):
    if attribute not in ATTRIBUTES or value not in VALUES[attribute]:
        known = ", ".join(f"{a}:{v}" for a in ATTRIBUTES for v in VALUES[a])
        raise ValueError(f"{attribute}:{value} is not a toy-world concept (known: {known})")


def concept_entry(attribute: str, value: str, *, augment: bool = True, num_prompts: int = 48,
                  num_preserve: int = 48, preserve: bool = True, seed: int = 0, eta: float | None = None,
                  avoid=()) -> dict:
    """One `config.concepts` entry erasing `attribute:value` from a toy-world model.

    avoid: other erased concepts ((attribute, value) pairs): the preservation prompts never show
    them (preserving "a red triangle" while erasing red would hold red in place).
    """
    _check(attribute, value)
    for a, v in avoid:
        _check(a, v)
    rng = np.random.default_rng([seed, ATTRIBUTES.index(attribute), VALUES[attribute].index(value)])
    words = concept_words(attribute, value, "train")
    others = [v for v in VALUES[attribute] if v != value and (attribute, v) not in set(avoid)]
    entry = {"phrase": synonyms(attribute, value, "train")[0], "type": "object", "aliases": list(words[1:]),
             "prompts": _captions(attribute, [value], num_prompts, rng) if augment else [],
             "preserve": _captions(attribute, others, num_preserve, rng, avoid) if preserve else []}
    if attribute == "motion":  # the phrase is "moving up": its direction words are the concept's tokens
        entry["aliases"] = list(words)
    if eta is not None:
        entry["eta"] = float(eta)
    return entry


def concept_entries(concepts, **kwargs) -> list[dict]:
    """Entries erasing several toy concepts ("colour:red" or (attribute, value)) in one run: each
    one's preservation prompts avoid all the others."""
    pairs = [tuple(c.split(":", 1)) if isinstance(c, str) else tuple(c) for c in concepts]
    return [concept_entry(a, v, avoid=[p for p in pairs if p != (a, v)], **kwargs) for a, v in pairs]


def ablation_config(config_file: str):
    """The config of an ablation file in configs/toy_world/ablations/ (pass its `__file__`): the
    bundled fixed_steps.py config beside it, with workdir runs/toy_world/ablations/<file stem> and
    only our eraser export. The ablation file then changes what it ablates."""
    from pathlib import Path

    from unlearn_jax.config import load_config

    path = Path(config_file).resolve()
    c = load_config(path.parents[1] / "fixed_steps.py")
    c.workdir = f"runs/toy_world/ablations/{path.stem}"
    c.export.formats = ["erasers"]
    return c


__all__ = ["ablation_config", "concept_entries", "concept_entry"]
