"""What an erasure run trains on: prompt pools, their embeddings and concept-token positions.

Everything here is prepared once on the host. `EraseData.batch(step)` is a pure function of
the step (and the run's seed), so a resumed run draws exactly the batches the uninterrupted
run would have drawn.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from unlearn_jax.errors import UnlearnError
from unlearn_jax.families.base import take_rows as take


@dataclasses.dataclass
class ConceptSpec:
    phrase: str
    type: str = "generic"
    eta: float | None = None
    preserve: tuple = ()
    prompts: tuple = ()  # extra user prompts for the pool
    aliases: tuple = ()  # other phrases of the concept (synonyms) whose tokens are also its tokens


@dataclasses.dataclass
class EraseData:
    names: list[str]
    etas: np.ndarray  # (num_concepts,)
    embeds: object  # the family's conditioning pytree of every prompt of every pool, leading axis P
    prompts: list[str]
    concept_idx: np.ndarray  # (P, K) int32 text positions of the concept phrase (padded)
    concept_valid: np.ndarray  # (P, K) bool
    pools: list[np.ndarray]  # per concept: rows of `embeds` in its prompt pool
    preserve: list[np.ndarray]  # per concept: rows of its preservation prompts (may be empty)
    uncond: object  # the empty prompt's conditioning, leading axis 1
    seed: int = 0

    def rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 0x5EED, step])

    def batch(self, step: int, batch_size: int, num_sampler_steps: int) -> dict:
        """The host-side inputs of training step `step`: one concept per sample, drawn uniformly."""
        rng = self.rng(step)
        ks = rng.integers(0, len(self.names), size=batch_size)
        rows = np.array([rng.choice(self.pools[k]) for k in ks])
        pre_rows = np.array([rng.choice(self.preserve[k]) if len(self.preserve[k]) else -1 for k in ks])
        j = int(rng.integers(0, num_sampler_steps))
        return {
            "ctx": take(self.embeds, rows),
            "concept_idx": self.concept_idx[rows],
            "concept_valid": self.concept_valid[rows],
            "eta": self.etas[ks].astype(np.float32),
            "pre_ctx": take(self.embeds, np.maximum(pre_rows, 0)),
            "pre_valid": (pre_rows >= 0).astype(np.float32),
            "uncond": self.uncond,
            "j": np.int32(j),
            "concept": ks.astype(np.int32),
        }

    @property
    def has_preservation(self) -> bool:
        return any(len(p) for p in self.preserve)


def indices_from_mask(mask: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) bool token mask -> (N, K) positions (first K set positions, padded with 0) and validity."""
    n = mask.shape[0]
    idx = np.zeros((n, max_tokens), np.int32)
    valid = np.zeros((n, max_tokens), bool)
    for i in range(n):
        pos = np.flatnonzero(mask[i])[:max_tokens]
        idx[i, : len(pos)] = pos
        valid[i, : len(pos)] = True
    return idx, valid


def concept_specs(concepts: Sequence) -> list[ConceptSpec]:
    """Concept entries of a config (dicts / ConfigDicts) -> validated specs."""
    out = []
    for i, c in enumerate(concepts):
        c = dict(c)
        if not c.get("phrase"):
            raise UnlearnError(f"config.concepts[{i}]: a concept needs a non-empty 'phrase'")
        unknown = set(c) - {f.name for f in dataclasses.fields(ConceptSpec)}
        if unknown:
            raise UnlearnError(f"config.concepts[{i}]: unknown keys {sorted(unknown)}")
        c["preserve"] = tuple(c.get("preserve") or ())
        c["prompts"] = tuple(c.get("prompts") or ())
        c["aliases"] = tuple(c.get("aliases") or ())
        out.append(ConceptSpec(**c))
    if not out:
        raise UnlearnError("config.concepts is empty: name at least one concept to erase")
    return out


def prompt_pools_for(specs: list[ConceptSpec], prompts_file: str | None, augment: str, n_augment: int, seed: int
                     ) -> list[tuple[list[str], list[str]]]:
    """Per concept: (prompt pool, preservation prompts). The phrase itself is always in its pool."""
    from unlearn_jax import prompts as P

    from_file = {}
    if prompts_file:
        from_file = P.prompt_pools(P.read_prompts(prompts_file))
    out = []
    for s in specs:
        pool = [s.phrase, *s.prompts]
        pre = list(s.preserve)
        if s.phrase in from_file:
            pool += [p for p in from_file[s.phrase]["prompts"] if p not in pool]
            pre += [p for p in from_file[s.phrase]["preserve"] if p not in pre]
        elif augment == "offline":
            recs = P.augment_offline(P.Concept(s.phrase, s.type if s.type in P.CONCEPT_TYPES else "generic"),
                                     n_augment, seed=seed)
            pool += [r.prompt for r in recs if r.prompt not in pool]
        elif augment not in ("none", "file"):
            raise UnlearnError(f"config.prompts.augment={augment!r}: choose none, offline or file")
        out.append((pool, pre))
    return out


def build_erase_data(pipeline_dir: str | Path, specs: list[ConceptSpec], *, default_eta: float, prompts_file=None,
                     augment: str = "none", n_augment: int = 0, max_concept_tokens: int = 16,
                     token_fallback: str = "all", cache_dir=None, text_dtype=None, seed: int = 0) -> EraseData:
    """Encodes every prompt with the pipeline's own text side (its family's: CogVideoX's T5, ...),
    through the embedding cache."""
    from unlearn_jax import families
    from unlearn_jax.prompts import EmbeddingCache

    pipeline_dir = Path(pipeline_dir)
    family = families.of_folder(pipeline_dir)
    missing = [p for p in family.pipeline_parts if p != "transformer" and not (pipeline_dir / p).is_dir()]
    if missing:
        raise UnlearnError(f"{pipeline_dir}: config.model.path must be a pipeline folder with "
                           f"{' and '.join(p + '/' for p in missing)} (the prompts are encoded with its text encoder)")
    text = family.text(pipeline_dir)
    pools = prompt_pools_for(specs, prompts_file, augment, n_augment, seed)
    prompts, rows, pre_rows, owner = [], [], [], []
    for k, (pool, pre) in enumerate(pools):
        rows.append(np.arange(len(prompts), len(prompts) + len(pool)))
        prompts += pool
        owner += [k] * len(pool)
        pre_rows.append(np.arange(len(prompts), len(prompts) + len(pre)))
        prompts += pre
        owner += [-1] * len(pre)
    max_length = text.max_length
    fp = text.fingerprint(dtype=text_dtype)

    def encode(batch):
        return text.encode(list(batch), dtype=text_dtype)

    all_prompts = prompts + [""]
    if cache_dir is not None:
        embeds = EmbeddingCache(cache_dir).get_or_encode(all_prompts, fp, encode)
    else:
        embeds = encode(all_prompts)
    import jax

    embeds = jax.tree.map(lambda a: np.asarray(a, np.float32) if np.issubdtype(np.asarray(a).dtype, np.floating)
                          or np.asarray(a).dtype.name == "bfloat16" else np.asarray(a), embeds)
    mask = np.zeros((len(prompts), max_length), bool)
    concept_rows = [i for i, o in enumerate(owner) if o >= 0]
    for i in concept_rows:
        spec = specs[owner[i]]
        # Any alias's tokens count; the fallback (no phrase found at all) applies to the main phrase.
        row = np.zeros(max_length, bool)
        for phrase in (spec.phrase, *spec.aliases):
            row |= text.concept_mask([prompts[i]], [phrase], fallback="none")[0]
        if not row.any():
            row = text.concept_mask([prompts[i]], [spec.phrase], fallback=token_fallback)[0]
        mask[i] = row
    idx, valid = indices_from_mask(mask, max_concept_tokens)
    etas = np.array([s.eta if s.eta is not None else default_eta for s in specs], np.float32)
    n = len(prompts)
    return EraseData([s.phrase for s in specs], etas, take(embeds, slice(0, n)), prompts, idx, valid, rows, pre_rows,
                     take(embeds, slice(n, n + 1)), seed)
