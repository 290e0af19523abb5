"""Toy-world ablation: erase red and the triangle in one run (one concept drawn per step).

    unlearn-jax erase --config configs/toy_world/ablations/two_concepts.py
(all ablations and their README table: python tools/toy/run_ablations.py)
"""
from unlearn_jax.toy.erasure import ablation_config, concept_entries


def get_config():
    c = ablation_config(__file__)
    # each concept's preservation prompts avoid the other (no "green triangle" held while erasing triangles)
    c.concepts = concept_entries(["colour:red", "shape:triangle"])
    # two concepts share the steps and the batch: a larger batch and more steps (README: what was tried)
    c.train.batch_size = 8
    c.train.num_steps = 450
    c.evaluate.erased_concepts = ["colour:red", "shape:triangle"]
    return c
