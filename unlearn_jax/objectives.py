"""The erasure objective (docs/METHOD.md §2, §4, §5): negatively guided target, localization masks and
loss, preservation loss. Pure functions of arrays."""
from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_MODES = ("per_layer", "average")


def negative_target(v_uncond, v_cond, eta):
    """v_neg = v_u - eta * (v_c - v_u); eta may be per sample (B,)."""
    eta = jnp.asarray(eta, jnp.float32)
    eta = eta.reshape(eta.shape + (1,) * (v_cond.ndim - eta.ndim))
    v_u, v_c = v_uncond.astype(jnp.float32), v_cond.astype(jnp.float32)
    return v_u - eta * (v_c - v_u)


def _logsumexp_chunked(q, k, scale, chunk: int, key_mask=None):
    """logsumexp over keys of (q . k) * scale without materialising all key columns at once.

    q (B, M, N, H), k (B, S, N, H) -> (B, N, M), running max/sum over key chunks (flash-style).
    key_mask (B, S) bool: keys outside it take no part (None: every key)."""
    b, s, n, h = k.shape
    pad = (-s) % chunk
    kp = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    valid = jnp.broadcast_to(jnp.arange(s + pad) < s, (b, s + pad))
    if key_mask is not None:
        valid = valid & jnp.pad(jnp.asarray(key_mask, bool), ((0, 0), (0, pad)))
    kc = kp.reshape(b, -1, chunk, n, h).swapaxes(0, 1)  # (C, B, chunk, N, H)
    vc = valid.reshape(b, -1, chunk).swapaxes(0, 1)  # (C, B, chunk)

    def body(carry, xs):
        m, acc = carry
        kk, vv = xs
        logits = jnp.einsum("bmnh,bknh->bnmk", q, kk, preferred_element_type=jnp.float32) * scale
        logits = jnp.where(vv[:, None, None, :], logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(-1))
        # a chunk with no valid key leaves m at -inf: keep exp() finite there
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        acc = acc * jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf)) + jnp.exp(logits - safe[..., None]).sum(-1)
        return (m_new, acc), None

    init = (jnp.full((b, n, q.shape[1]), -jnp.inf, jnp.float32), jnp.zeros((b, n, q.shape[1]), jnp.float32))
    (m, acc), _ = jax.lax.scan(body, init, (kc, vc))
    return jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(acc)


def concept_attention_map(view, concept_idx, concept_valid, key_chunk: int = 1024):
    """Attention mass from every video query onto the concept's text tokens, mean over heads.

    view: a `models.hooks.ConceptAttention` (video queries, every key they attend to, where the
        text sits among the keys, the key mask): the same function serves joint attention with the
        text first (CogVideoX) or last (HunyuanVideo) and cross-attention over text keys (Wan).
    concept_idx (B, K) int: positions of the concept's tokens within the text, padded;
    concept_valid (B, K) bool.
    Returns (B, N_video) = sum over concept tokens of mean-over-heads softmax(q k^T / sqrt(H)).
    Only the K concept columns and the softmax normaliser are computed.
    """
    q, k = view.video_queries.astype(jnp.float32), view.keys.astype(jnp.float32)
    scale = q.shape[-1] ** -0.5
    lse = _logsumexp_chunked(q, k, scale, min(key_chunk, k.shape[1]), view.key_mask)  # (B, N, Nv)
    text = k[:, view.text_start:view.text_start + view.text_len]
    kc = jnp.take_along_axis(text, concept_idx[:, :, None, None], axis=1)  # (B, K, N, H)
    logits = jnp.einsum("bmnh,bknh->bnmk", q, kc) * scale
    probs = jnp.exp(logits - lse[..., None]) * concept_valid[:, None, None, :]
    return probs.sum(-1).mean(1)


def normalise_map(m, grid: tuple[int, int, int], eps: float = 1e-6):
    """Min-max normalise per token-frame over (H, W): (B, N_video) -> (B, F, H, W)."""
    f, h, w = grid
    m = m.reshape(m.shape[0], f, h, w)
    lo = m.min(axis=(2, 3), keepdims=True)
    hi = m.max(axis=(2, 3), keepdims=True)
    return (m - lo) / (hi - lo + eps)


def localization_masks(maps, grid, threshold: float, mode: str = "per_layer"):
    """Binary concept masks from per-layer maps (L, B, N_video) -> (L, B, N_video) float {0, 1}.

    per_layer: threshold each layer's normalised map; average: threshold the mean of the
    normalised maps and use it for every layer."""
    soft = jax.vmap(lambda m: normalise_map(m, grid))(maps)  # (L, B, F, H, W)
    if mode == "average":
        soft = jnp.broadcast_to(soft.mean(0, keepdims=True), soft.shape)
    elif mode not in MASK_MODES:
        raise ValueError(f"mask_mode {mode!r}: choose one of {MASK_MODES}")
    return (soft >= threshold).astype(jnp.float32).reshape(maps.shape)


def localization_loss(adapter_energy, masks):
    """L_loc: per layer, the mean over background tokens of mean_d(o^2); averaged over layers and batch.

    adapter_energy (L, B, N_video): each token's mean_d(o_l^2) (or the outputs o_l themselves,
    (L, B, N_video, D), whose energy is then taken here); masks (L, B, N_video), 1 = concept region."""
    if adapter_energy.ndim == masks.ndim + 1:
        adapter_energy = jnp.mean(jnp.square(adapter_energy.astype(jnp.float32)), axis=-1)
    bg = 1.0 - masks
    per = (bg * adapter_energy.astype(jnp.float32)).sum(-1) / (bg.sum(-1) + 1e-9)  # (L, B)
    return per.mean()


def mse(a, b):
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))
