"""Tiny HunyuanVideo text encoders built with transformers (random weights) for parity tests.

Sizes are odd on purpose: hidden 60, 3 or 6 query heads over 1 or 3 key/value heads (GQA),
head_dim 20 or 14 (not hidden / heads), 13 tokens, 3 rows padded to different lengths.
"""
from __future__ import annotations

import numpy as np
import torch

LENGTH = 13
LLAMA_BASE = dict(vocab_size=101, hidden_size=60, intermediate_size=70, num_hidden_layers=4, rms_norm_eps=1e-5)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)
LLAMA_VARIANTS = {
    # HunyuanVideo's text encoder in small: no biases, default rope at theta 500000, 3 query heads per kv head.
    "gqa": dict(num_attention_heads=3, num_key_value_heads=1,
                rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
    # Llama 3.1-style rope scaling (wavelengths of 2pi*10000^(i/7) straddle both thresholds, 8 and 32), biases,
    # an explicit head_dim.
    "llama3_bias": dict(num_attention_heads=6, num_key_value_heads=3, head_dim=14, attention_bias=True,
                        mlp_bias=True, max_position_embeddings=64, rope_parameters=LLAMA3_ROPE),
}
# Rows of the padded batch: real tokens (right padding), and one left-padded row.
ROW_LENGTHS = (13, 10, 5)
LEFT_PAD = 3  # row 3: its first 3 positions are padding

CLIP_BASE = dict(vocab_size=99, hidden_size=60, intermediate_size=70, num_hidden_layers=3, num_attention_heads=3,
                 max_position_embeddings=15, bos_token_id=97, pad_token_id=1)
CLIP_VARIANTS = {
    # CLIP-L's config: eos_token_id 2, pooled at the largest id (the end token 98 here).
    "legacy_eos": dict(eos_token_id=2, hidden_act="quick_gelu"),
    # Newer configs: pooled at the first eos_token_id (a small id: the largest-id rule would miss it).
    "eos_id": dict(eos_token_id=5, hidden_act="gelu"),
}
CLIP_END = {"legacy_eos": 98, "eos_id": 5}


def randomize_(model, seed: int = 0):
    """Noise of a size that makes every part matter: norm weights 1 + noise, biases 0.1 noise,
    embeddings unit noise, linears 1/sqrt(fan_in). Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * z if ("norm" in name and name.endswith("weight")) else 0.1 * z)
            elif "embed" in name:
                p.copy_(z)
            else:
                p.copy_(z / np.sqrt(p.shape[-1]))
    return model


def llama_config(variant: str, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA_BASE, **LLAMA_VARIANTS[variant], **overrides})


def tiny_llama(variant: str, seed: int = 0, cls=None):
    """A randomized tiny transformers LlamaModel (or `cls`, e.g. LlamaForCausalLM) in eval mode."""
    from transformers import LlamaModel

    torch.manual_seed(seed)
    return randomize_((cls or LlamaModel)(llama_config(variant)), seed).eval()


def tiny_clip(variant: str, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return randomize_(CLIPTextModel(CLIPTextConfig(**CLIP_BASE, **CLIP_VARIANTS[variant])), seed).eval()


def llama_inputs(seed: int = 0):
    """(ids (4, 13), mask (4, 13)): rows of ROW_LENGTHS real tokens then padding, and a left-padded row."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, LLAMA_BASE["vocab_size"], size=(len(ROW_LENGTHS) + 1, LENGTH))
    mask = np.zeros_like(ids)
    for row, n in enumerate(ROW_LENGTHS):
        mask[row, :n] = 1
    mask[-1, LEFT_PAD:] = 1
    ids[mask == 0] = 0
    return ids, mask


def clip_inputs(variant: str, seed: int = 0):
    """(ids (3, 13), mask) as CLIP's tokenizer pads: [bos, text, end, end...], [bos, text, end, pad...], and a
    row with no end token."""
    rng = np.random.RandomState(seed)
    end = CLIP_END[variant]
    ids = rng.randint(6, 90, size=(3, LENGTH))
    ids[:, 0] = CLIP_BASE["bos_token_id"]
    ids[0, 6:] = end
    ids[1, 9], ids[1, 10:] = end, CLIP_BASE["pad_token_id"]
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    mask[1, 10:] = 0
    return ids, mask
