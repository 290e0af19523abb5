"""Tiny text-side models for tests: a trained T5 tokenizer, tiny T5/UMT5 encoders, a pipeline folder.

Everything is built locally (no hub access). Reusable by any test:

    tok = train_t5_tokenizer()
    model = tiny_t5_encoder("t5", vocab_size=len(tok))
    root = build_tiny_pipeline(tmp_path / "pipe", max_text_seq_length=16)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = (
    "a the of and in on with at by from to is are was dog cat bird horse fish tree river mountain city street "
    "car boat train house garden forest beach sky cloud rain snow sun moon star night day morning evening red "
    "blue green yellow white black small large old young happy quiet running walking flying swimming playing "
    "sitting standing jumping dancing singing person man woman child people camera video scene light shadow "
    "slowly quickly gently softly bright dark warm cold"
).split()

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2


def _sentences(words, n=400, seed=0):
    rng = np.random.RandomState(seed)
    out = [" ".join(words)]
    for _ in range(n):
        k = rng.randint(3, 12)
        out.append(" ".join(rng.choice(words, size=k)))
    return out


def train_t5_tokenizer(words=WORDS, vocab_size: int = 120, extra_ids: int = 0):
    """A Unigram (SentencePiece-style) tokenizer trained on sentences of `words`, as a transformers T5Tokenizer.

    <pad>=0, </s>=1, <unk>=2 as in T5; words are split on whitespace and marked with '▁'.
    """
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer
    from transformers import T5Tokenizer

    raw = Tokenizer(Unigram())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    trainer = UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token="<unk>",
                             show_progress=False)
    raw.train_from_iterator(_sentences(list(words)), trainer=trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(raw.to_str())["model"]["vocab"]]
    assert [p for p, _ in vocab[:3]] == list(SPECIAL_TOKENS), vocab[:3]
    return T5Tokenizer(vocab=vocab, extra_ids=extra_ids)


def tiny_encoder_config(variant: str = "t5", vocab_size: int = 100, **overrides):
    """A transformers T5Config / UMT5Config for a tiny encoder (d_model 32, 3 layers, 4 heads)."""
    from transformers import T5Config, UMT5Config

    kw = dict(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=20,
              feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    kw.update(overrides)
    return (T5Config if variant == "t5" else UMT5Config)(**kw)


def randomize_(model, seed: int = 0, scale: float = 0.5):
    """Overwrites every parameter with noise of a size that makes every part of the net matter.

    Norm weights become 1 + noise; linears get std `scale`/sqrt(fan_in); embeddings and
    position-bias tables std `scale`. Returns the model.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 2 and ("relative_attention_bias" in name or name.endswith("shared.weight")
                                  or "embed_tokens" in name):
                p.copy_(scale * noise)
            else:
                p.copy_(noise * scale / np.sqrt(p.shape[-1]))
    return model


def tiny_torch_encoder(variant: str = "t5", vocab_size: int = 100, seed: int = 0, **overrides):
    """A randomized tiny transformers T5EncoderModel / UMT5EncoderModel in eval mode."""
    import torch
    from transformers import T5EncoderModel, UMT5EncoderModel

    torch.manual_seed(seed)
    cls = T5EncoderModel if variant == "t5" else UMT5EncoderModel
    return randomize_(cls(tiny_encoder_config(variant, vocab_size, **overrides)), seed=seed).eval()


def build_tiny_pipeline(folder, *, max_text_seq_length: int | None = 16, variant: str = "t5", seed: int = 0,
                        max_shard_size=None):
    """A CogVideoX-like pipeline folder: tokenizer/, text_encoder/, transformer/config.json, model_index.json.

    Returns (folder, tokenizer, torch text encoder). `max_text_seq_length=None` leaves the key out
    of the transformer config.
    """
    folder = Path(folder)
    tok = train_t5_tokenizer()
    enc = tiny_torch_encoder(variant, vocab_size=len(tok), seed=seed)
    tok.save_pretrained(folder / "tokenizer")
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    enc.save_pretrained(folder / "text_encoder", **kw)
    tcfg = {"_class_name": "CogVideoXTransformer3DModel", "text_embed_dim": enc.config.d_model,
            "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8}
    if max_text_seq_length is not None:
        tcfg["max_text_seq_length"] = max_text_seq_length
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(tcfg, indent=2))
    arch = "T5EncoderModel" if variant == "t5" else "UMT5EncoderModel"
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "CogVideoXPipeline", "tokenizer": ["transformers", type(tok).__name__],
        "text_encoder": ["transformers", arch], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
    }, indent=2))
    return folder, tok, enc
