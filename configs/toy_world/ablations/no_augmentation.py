"""Toy-world ablation: erase red with the bare phrase only (no paraphrase pool; train synonyms still mark its tokens).

    unlearn-jax erase --config configs/toy_world/ablations/no_augmentation.py
(all ablations and their README table: python tools/toy/run_ablations.py)
"""
from unlearn_jax.toy.erasure import ablation_config, concept_entry


def get_config():
    c = ablation_config(__file__)
    c.concepts = [concept_entry("colour", "red", augment=False)]
    return c
