"""SAFREE-style training-free filtering of the text conditioning (Yoon et al., ICLR 2025), for a
T5-conditioned video transformer (CogVideoX, Wan; the toy models).

SAFREE changes nothing in the model. For a prompt and a list of words that describe the concept
(for nudity e.g. "nudity, naked, sexual acts"), it
1. spans a *concept subspace* with the text encoder's embeddings of those words;
2. finds the prompt's *trigger tokens*: token i is masked out (replaced by the pad token) and the
   prompt re-encoded; when the masked prompt lies clearly farther from the concept subspace than
   the prompt does with any other token masked (distance >= (1 + alpha) x the mean of the others),
   token i is what brought the concept in;
3. replaces the conditioning at the trigger positions by its projection onto the span of the
   masked prompts (the prompt's own input space) with the concept subspace's component removed,
   and keeps every other position as it was;
4. uses the filtered conditioning only for the first steps of sampling (the layout is decided
   early): a fixed fraction of the steps, as their video code does, or (`adaptive`) their image
   code's "self-validating" window, which shrinks when the filtered prompt stays close to the
   original (1 - the mean cosine between them, through SAFREE's sigmoid);
5. with the concept words as the negative prompt of classifier-free guidance (their CogVideoX
   code does so).
SAFREE's latent re-attention (re-weighting a UNet's skip features in the Fourier domain, after
FreeU) has no counterpart in a transformer without skip connections and is left out.

Our choices where the published code is tied to CLIP: a prompt's summary vector is the mean of the
encoder's outputs over its tokens and end token (their CogVideoX port takes position 0, CLIP's
start token, which in T5 is just the first word), and token i sits at position i (their port keeps
CLIP's one-position offset of the start token, which T5 does not have). The window is a fraction
of the sampling steps, at most `max_window` (their CogVideoX run: 13 of 50 steps).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np

from unlearn_jax.baselines.conditioning import Conditioning
from unlearn_jax.errors import UnlearnError


@dataclasses.dataclass(frozen=True)
class SafreeConfig:
    alpha: float = 0.01            # trigger: masked distance >= (1 + alpha) x the others' mean (SAFREE's)
    max_window: float = 0.26       # at most this fraction of the steps is filtered (13 of 50, their video run)
    adaptive: bool = False         # True: the self-validating window of SAFREE's image code; False: max_window
                                   # throughout, as their video (CogVideoX) code runs it
    negative_prompt: bool = True   # the concept words as the negative prompt
    joiner: str = ", "             # between the words of the negative prompt (the toy vocabulary has no comma)


def projection(rows) -> np.ndarray:
    """(D, D) float64: the orthogonal projection onto the span of `rows` (k, D), i.e.
    R^T (R R^T)^+ R, computed from an SVD with pinv's rank cut."""
    r = np.asarray(rows, np.float64)
    if r.ndim != 2 or r.shape[0] == 0:
        raise ValueError(f"rows must be (k >= 1, D); got {r.shape}")
    _, s, vt = np.linalg.svd(r, full_matrices=False)
    keep = s > s.max(initial=0.0) * max(r.shape) * np.finfo(np.float64).eps
    basis = vt[keep]
    return basis.T @ basis


def distances(vectors, concept_projection) -> np.ndarray:
    """(n,) the distance of each vector (n, D) from the concept subspace: |(I - P_c) v|."""
    v = np.asarray(vectors, np.float64)
    return np.linalg.norm(v - v @ concept_projection, axis=-1)


def trigger_tokens(dist, alpha: float) -> np.ndarray:
    """(n,) bool: token i is a trigger when the prompt with it masked lies at least (1 + alpha) times
    farther from the concept subspace than the mean of the prompts with another token masked.
    With fewer than two tokens nothing can be compared: no trigger."""
    d = np.asarray(dist, np.float64)
    n = d.shape[0]
    if n < 2:
        return np.zeros((n,), bool)
    others = (d.sum() - d) / (n - 1)
    return d >= (1.0 + alpha) * others


def filtered(emb, triggers, concept_projection, input_projection) -> np.ndarray:
    """(L, D): `emb` (L, D) with the rows of the trigger positions ((n,) bool, positions 0..n-1)
    replaced by (I - P_c) P_in e; every other row unchanged."""
    e = np.asarray(emb, np.float64)
    proj = project_out(e, concept_projection, input_projection)
    out = e.copy()
    idx = np.flatnonzero(np.asarray(triggers, bool))
    out[idx] = proj[idx]
    return out.astype(np.float32)


def project_out(emb, concept_projection, input_projection) -> np.ndarray:
    """(I - P_c) P_in e for every row e of `emb` (L, D) (the projections are symmetric)."""
    inside = np.asarray(emb, np.float64) @ input_projection
    return inside - inside @ concept_projection


def window_steps(emb, projected, num_steps: int, cfg: SafreeConfig) -> int:
    """How many first sampling steps use the filtered conditioning. Adaptive: beta = 1 - the mean
    cosine between each token's embedding `emb` (n, D) and its projection `projected` (n, D), then
    SAFREE's sigmoid, max_window * num_steps * sigmoid(5 (10 beta - 5.333))."""
    top = cfg.max_window * num_steps
    if not cfg.adaptive:
        return int(round(top))
    e, p = np.asarray(emb, np.float64), np.asarray(projected, np.float64)
    cos = (e * p).sum(-1) / np.maximum(np.linalg.norm(e, axis=-1) * np.linalg.norm(p, axis=-1), 1e-12)
    beta = 1.0 - float(cos.mean()) if len(cos) else 0.0
    return int(round(top / (1.0 + math.exp(-5.0 * (10.0 * beta - 5.333)))))


def pooled(states, valid) -> np.ndarray:
    """(n, D): the mean of `states` (n, L, D) over each row's `valid` (n, L) positions."""
    s, v = np.asarray(states, np.float64), np.asarray(valid, np.float64)
    return (s * v[..., None]).sum(1) / np.maximum(v.sum(1, keepdims=True), 1.0)


class Safree:
    """SAFREE over a text side's `token_encoder()` (`text_encoding.TokenEncoder`): `conditioning(prompts,
    num_steps)` gives the filtered prompts, the original ones after each prompt's window, and the
    negative prompt's conditioning through `encode_text` (the text side's `encode`)."""

    def __init__(self, token_encoder, encode_text, concept_words: Sequence[str], cfg: SafreeConfig = SafreeConfig()):
        words = [w.strip() for w in concept_words if isinstance(w, str) and w.strip()]
        if not words:
            raise UnlearnError("SAFREE needs the words that describe the concept (e.g. --concept-words nudity naked)")
        if not 0.0 <= cfg.max_window <= 1.0:
            raise UnlearnError(f"SAFREE's max_window is a fraction of the steps in [0, 1]; got {cfg.max_window}")
        self.encoder, self.encode_text, self.words, self.cfg = token_encoder, encode_text, words, cfg
        ids = token_encoder.ids(words)
        states = np.asarray(jax.device_get(token_encoder.encode_ids(ids)))
        self.concept_projection = projection(pooled(states, self._valid(ids)))

    @property
    def negative_prompt(self) -> str:
        return self.cfg.joiner.join(self.words) if self.cfg.negative_prompt else ""

    def _valid(self, ids) -> np.ndarray:
        """(n, L) bool: each row's tokens and its end token."""
        n = self.encoder.length(ids)
        return np.arange(np.shape(ids)[1])[None] <= n[:, None]

    def filter_prompt(self, prompt: str, num_steps: int) -> dict:
        """{"context": (L, D) filtered, "original": (L, D), "steps": int, "triggers": [token strings]}."""
        ids = self.encoder.ids([prompt])
        n = int(self.encoder.length(ids)[0])
        original = np.asarray(jax.device_get(self.encoder.encode_ids(ids)))[0]
        if n == 0:
            return {"context": original, "original": original, "steps": 0, "triggers": []}
        masked = np.repeat(ids, n, axis=0)
        masked[np.arange(n), np.arange(n)] = self.encoder.pad_id
        states = np.asarray(jax.device_get(self.encoder.encode_ids(masked)))
        summary = pooled(states, self._valid(ids).repeat(n, 0))
        triggers = trigger_tokens(distances(summary, self.concept_projection), self.cfg.alpha)
        input_projection = projection(summary)
        context = filtered(original, triggers, self.concept_projection, input_projection)
        proj = project_out(original[:n], self.concept_projection, input_projection)
        steps = window_steps(original[:n], proj, num_steps, self.cfg) if triggers.any() else 0
        words = [self.encoder.decode([t]) for t in ids[0, :n][triggers]]
        return {"context": context, "original": original, "steps": steps, "triggers": words}

    def conditioning(self, prompts: Sequence[str], num_steps: int) -> tuple[Conditioning, list[dict]]:
        """The sampler's windowed conditioning of `prompts`, and per prompt {"steps", "triggers"}."""
        rows = [self.filter_prompt(p, num_steps) for p in prompts]
        uncond = np.asarray(self.encode_text([self.negative_prompt]), np.float32)
        cond = Conditioning(np.stack([r["context"] for r in rows]), uncond, np.stack([r["original"] for r in rows]),
                            np.asarray([r["steps"] for r in rows], np.int64))
        return cond, [{"steps": r["steps"], "triggers": r["triggers"]} for r in rows]


__all__ = ["Safree", "SafreeConfig", "distances", "filtered", "pooled", "project_out", "projection",
           "trigger_tokens", "window_steps"]
