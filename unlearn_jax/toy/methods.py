"""The inference-time baselines on a toy pipeline folder: what each feeds the sampler, and its
evaluation beside the original model's (as `evaluate.evaluate_erasure` does for trained erasers).

    unlearn-jax eval --model assets/toy_world --method safree --erased-concepts colour:red --out-dir DIR
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from unlearn_jax.baselines import INFERENCE_METHODS
from unlearn_jax.toy import evaluate as E


def concept_words(erased_concepts: Sequence[str]) -> list[str]:
    """The words that describe toy concepts (for the inference-time methods): their train synonyms."""
    from unlearn_jax.toy.world import synonyms

    return [w for name in erased_concepts for w in synonyms(*name.split(":", 1), "train")]


def method_conditioning(pipeline, method: str, words: Sequence[str], cfg: E.EvalConfig, safree_cfg=None):
    """(eval config, conditioning or None) of an inference-time method on a toy pipeline folder:
    "negative-prompt" names the concept words in the unconditional branch; "safree" filters the
    prompts' conditioning (`baselines.safree`). The toy vocabulary has no comma: words are joined by spaces."""
    from unlearn_jax import families
    from unlearn_jax.baselines.safree import Safree, SafreeConfig
    from unlearn_jax.errors import UnlearnError

    if method not in INFERENCE_METHODS:
        raise UnlearnError(f"method {method!r}: expected one of {', '.join(INFERENCE_METHODS)}")
    if not words:
        raise UnlearnError(f"the {method} baseline needs the words that describe the concept")
    if method == "negative-prompt":
        return dataclasses.replace(cfg, negative_prompt=" ".join(words)), None
    safree_cfg = SafreeConfig(joiner=" ", adaptive=False) if safree_cfg is None else safree_cfg
    text = families.of_folder(Path(pipeline)).text(Path(pipeline))
    safree = Safree(text.token_encoder(), lambda p: text.encode(list(p)), words, safree_cfg)
    return cfg, (lambda prompts: safree.conditioning(prompts, cfg.num_steps)[0])


def evaluate_method(pipeline, method: str, words: Sequence[str], cfg: E.EvalConfig, erased_concepts: Sequence[str],
                    base_report: dict | None = None, concept_list=None, keep_videos: bool = False,
                    safree_cfg=None) -> dict:
    """`evaluate_erasure` for an inference-time method (`method_conditioning`): the base model as it
    is, then the same model with the method, on the same prompts and noise."""
    cfg = dataclasses.replace(cfg, avoid=tuple(erased_concepts))
    model, sched, world_cfg, encode = E.load_pipeline(pipeline)
    if base_report is None:
        base_report = E.evaluate(model, sched, world_cfg, encode, cfg, concept_list, keep_videos)
    mcfg, conditioning = method_conditioning(pipeline, method, words, cfg, safree_cfg)
    report = E.evaluate(model, sched, world_cfg, encode, mcfg, concept_list, keep_videos, conditioning=conditioning)
    return {"base": base_report, "erased": report, "comparison": E.compare(base_report, report, erased_concepts)}


__all__ = ["INFERENCE_METHODS", "concept_words", "evaluate_method", "method_conditioning"]
