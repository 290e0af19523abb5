"""The T5 v1.1 text encoder (CogVideoX's T5-XXL) and its UMT5 variant (Wan's), in Flax NNX.

Architecture (encoder only, as transformers' `T5EncoderModel` / `UMT5EncoderModel`):
token embedding (not scaled) -> N pre-norm blocks [RMS norm -> self-attention with a learned
relative position bias, no 1/sqrt(d) scaling -> residual; RMS norm -> (gated) feed-forward ->
residual] -> final RMS norm. Linears have no bias. T5 computes the position bias in the first
block and shares it with every block; UMT5 gives every block its own bias table.

Precision: matmuls run in `dtype` (float32 or bfloat16). The residual stream, the norms, the
position bias, the softmax and the feed-forward output projection `wo` stay in float32 (the
last as transformers keeps `wo` in fp32 for half-precision T5). The encoder returns float32.

Blocks are created stacked (one leaf per parameter with a leading layer axis) and run with
`jax.lax.scan`, so compile time does not grow with depth.

Weights: `rule_table(config)` maps transformers' key names to the flat JAX leaf paths and is
used for import (`load_text_encoder`) and export (`conversion.iter_torch_tensors`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.conversion import LINEAR, Rule, RuleTable, SafetensorsReader, load_into
from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.models.layers import Dense
from unlearn_jax.parallel import DEFAULT_RULES

# model_type -> (variant, architectures whose encoder we can read)
_FAMILIES = {
    "t5": ("t5", {"T5EncoderModel", "T5ForConditionalGeneration", "T5Model"}),
    "umt5": ("umt5", {"UMT5EncoderModel", "UMT5ForConditionalGeneration", "UMT5Model"}),
}

# transformers activation names -> jax functions
_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    variant: str = "t5"  # "t5": one position-bias table (first block), "umt5": one per block
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    activation: str = "gelu_new"
    gated: bool = True

    def __post_init__(self):
        if self.variant not in ("t5", "umt5"):
            raise UnlearnError(f"T5 encoder variant {self.variant!r} is not 't5' or 'umt5'")
        if self.activation not in _ACTIVATIONS:
            raise UnlearnError(f"T5 encoder activation {self.activation!r} is not supported; "
                               f"use one of {sorted(_ACTIVATIONS)}")

    @property
    def per_layer_bias(self) -> bool:
        return self.variant == "umt5"

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_dict(cls, cfg: Mapping, where: str = "config") -> "T5EncoderConfig":
        """Reads a transformers T5Config / UMT5Config dict; raises `ModelFamilyError` for other families."""
        model_type = cfg.get("model_type")
        archs = list(cfg.get("architectures") or [])
        if model_type not in _FAMILIES:
            what = f"model_type {model_type!r}" + (f" ({', '.join(archs)})" if archs else "")
            raise ModelFamilyError(f"{where}: {what} is not a T5/UMT5 text encoder; "
                                   f"point to the pipeline's text_encoder/ folder")
        variant, ok_archs = _FAMILIES[model_type]
        bad = [a for a in archs if a not in ok_archs]
        if bad:
            raise ModelFamilyError(f"{where}: architecture {bad[0]!r} is not a {model_type} encoder "
                                   f"(expected one of {sorted(ok_archs)})")
        if cfg.get("is_decoder"):
            raise ModelFamilyError(f"{where}: config says is_decoder=true; a T5 encoder is needed")
        defaults = _T5_DEFAULTS if variant == "t5" else _UMT5_DEFAULTS

        def get(name):
            value = cfg.get(name)
            return defaults[name] if value is None else value

        proj = str(get("feed_forward_proj"))
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise UnlearnError(f"{where}: feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'")
        activation = "gelu_new" if proj == "gated-gelu" else parts[-1]
        try:
            return cls(
                variant=variant,
                vocab_size=int(get("vocab_size")),
                d_model=int(get("d_model")),
                d_kv=int(get("d_kv")),
                d_ff=int(get("d_ff")),
                num_layers=int(get("num_layers")),
                num_heads=int(get("num_heads")),
                relative_attention_num_buckets=int(get("relative_attention_num_buckets")),
                relative_attention_max_distance=int(get("relative_attention_max_distance")),
                layer_norm_epsilon=float(get("layer_norm_epsilon")),
                activation=activation,
                gated=parts[0] == "gated" and len(parts) == 2,
            )
        except UnlearnError as e:
            raise UnlearnError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "T5EncoderConfig":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise UnlearnError(f"{path}: no config.json; point to a transformers text encoder folder") from None
        except (OSError, ValueError) as e:
            raise UnlearnError(f"{path}: not a readable JSON config ({e})") from None
        if not isinstance(cfg, dict):
            raise UnlearnError(f"{path}: not a JSON object")
        return cls.from_dict(cfg, where=str(path))


# transformers' defaults for fields a config.json may leave out
_T5_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    layer_norm_epsilon=1e-6, feed_forward_proj="relu")
_UMT5_DEFAULTS = dict(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu")


# --------------------------------------------------------------------------------------------
# Relative position buckets (host-side: lengths are static)
# --------------------------------------------------------------------------------------------
def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int,
                              bidirectional: bool = True) -> np.ndarray:
    """(q_len, k_len) int32 bucket ids of `key_pos - query_pos`, T5's binning.

    Half of the buckets (per direction) are exact small distances, the rest logarithmic bins up
    to `max_distance`. The log is taken in float32, as the PyTorch reference does, so that
    positions on a bin edge fall on the same side.
    """
    rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        dist = np.abs(rel)
    else:
        dist = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    small = dist < max_exact
    ratio = np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact)
    scaled = np.log(ratio) / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return (buckets + np.where(small, dist, large)).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class T5LayerNorm(nnx.Module):
    """T5's norm: scale by the root mean square (no mean subtraction, no bias); fp32, returns fp32."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",))(
            rngs.params(), (dim,), jnp.float32))

    def __call__(self, x):
        x = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)


class RelativePositionBias(nnx.Module):
    """A learned (num_buckets, num_heads) table; returns the (heads, q, k) fp32 score bias."""

    def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs):
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.embedding = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(config.d_model ** -0.5),
                                                         ("relpos_buckets", "heads"))(
            rngs.params(), (self.num_buckets, config.num_heads), jnp.float32))

    def __call__(self, q_len: int, k_len: int):
        ids = relative_position_buckets(q_len, k_len, self.num_buckets, self.max_distance, bidirectional=True)
        table = self.embedding[...].astype(jnp.float32)
        return jnp.transpose(jnp.take(table, jnp.asarray(ids), axis=0), (2, 0, 1))


class T5SelfAttention(nnx.Module):
    def __init__(self, config: T5EncoderConfig, *, own_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        d, inner = config.d_model, config.inner_dim
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = Dense(d, inner, ("embed", "heads"), **kw)
        self.k = Dense(d, inner, ("embed", "heads"), **kw)
        self.v = Dense(d, inner, ("embed", "heads"), **kw)
        self.o = Dense(inner, d, ("heads", "embed"), **kw)
        self.rel_bias = RelativePositionBias(config, rngs=rngs) if own_bias else None
        self.num_heads, self.d_kv = config.num_heads, config.d_kv

    def __call__(self, x, bias=None, mask=None):
        """x (B, L, D); bias (H, L, L) fp32 or None (then the own table is used); mask (B, L) bool keys."""
        b, n, _ = x.shape
        shape = (b, n, self.num_heads, self.d_kv)
        q, k, v = (self.q(x).reshape(shape), self.k(x).reshape(shape), self.v(x).reshape(shape))
        if self.rel_bias is not None:
            bias = self.rel_bias(n, n)
        # T5 folds the scale into its weights: no 1/sqrt(d_kv) here.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + bias[None]
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, self.num_heads * self.d_kv)
        return self.o(out)


class T5FeedForward(nnx.Module):
    def __init__(self, config: T5EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, f = config.d_model, config.d_ff
        if config.gated:
            self.wi_0 = Dense(d, f, ("embed", "mlp"), **kw)
            self.wi_1 = Dense(d, f, ("embed", "mlp"), **kw)
            self.wi = None
        else:
            self.wi = Dense(d, f, ("embed", "mlp"), **kw)
            self.wi_0 = self.wi_1 = None
        # the output projection computes in fp32 (transformers keeps T5's `wo` in fp32)
        self.wo = Dense(f, d, ("mlp", "embed"), **{**kw, "dtype": jnp.float32})
        self.act = _ACTIVATIONS[config.activation]

    def __call__(self, x):
        if self.wi is not None:
            h = self.act(self.wi(x))
        else:
            h = self.act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h)


class T5Block(nnx.Module):
    def __init__(self, config: T5EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.attn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, rngs=rngs)
        self.attn = T5SelfAttention(config, own_bias=config.per_layer_bias, dtype=dtype, param_dtype=param_dtype,
                                    rngs=rngs)
        self.ffn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, rngs=rngs)
        self.ffn = T5FeedForward(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h, bias, mask):
        h = h + self.attn(self.attn_norm(h).astype(self.dtype), bias, mask).astype(jnp.float32)
        return h + self.ffn(self.ffn_norm(h).astype(self.dtype)).astype(jnp.float32)


class T5Encoder(nnx.Module):
    """`model(input_ids, attention_mask=None) -> (B, L, d_model)` float32 last hidden state."""

    def __init__(self, config: T5EncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.shared = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed"))(
            rngs.params(), (config.vocab_size, config.d_model), param_dtype))
        self.rel_bias = None if config.per_layer_bias else RelativePositionBias(config, rngs=rngs)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return T5Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, token_weights=None):
        """token_weights: (B, L, vocab) float instead of `input_ids` (a relaxed one-hot; the input embeddings
        are `token_weights @ shared`), so that the encoding is differentiable in the tokens (red-team attacks)."""
        if token_weights is not None:
            w = jnp.asarray(token_weights, jnp.float32)
            n = w.shape[1]
            h = jnp.einsum("blv,vd->bld", w, self.shared[...].astype(jnp.float32))
        else:
            input_ids = jnp.asarray(input_ids)
            n = input_ids.shape[1]
            h = jnp.take(self.shared[...], input_ids, axis=0).astype(jnp.float32)
        mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        bias = None if self.rel_bias is None else self.rel_bias(n, n)
        graphdef, state = nnx.split(self.blocks)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, bias, mask), None

        h, _ = jax.lax.scan(body, h, state)
        return self.final_norm(h)


# --------------------------------------------------------------------------------------------
# Weight names (transformers <-> JAX)
# --------------------------------------------------------------------------------------------
def rule_table(config: T5EncoderConfig) -> RuleTable:
    """transformers `T5EncoderModel` / `UMT5EncoderModel` keys <-> flat JAX leaf paths."""
    blk = "encoder.block.{layer}.layer"
    rules = [
        Rule("shared.weight", "shared"),
        Rule(f"{blk}.0.layer_norm.weight", "blocks.attn_norm.scale"),
        Rule(f"{blk}.0.SelfAttention.q.weight", "blocks.attn.q.kernel", LINEAR),
        Rule(f"{blk}.0.SelfAttention.k.weight", "blocks.attn.k.kernel", LINEAR),
        Rule(f"{blk}.0.SelfAttention.v.weight", "blocks.attn.v.kernel", LINEAR),
        Rule(f"{blk}.0.SelfAttention.o.weight", "blocks.attn.o.kernel", LINEAR),
        Rule(f"{blk}.1.layer_norm.weight", "blocks.ffn_norm.scale"),
    ]
    if config.gated:
        rules += [Rule(f"{blk}.1.DenseReluDense.wi_0.weight", "blocks.ffn.wi_0.kernel", LINEAR),
                  Rule(f"{blk}.1.DenseReluDense.wi_1.weight", "blocks.ffn.wi_1.kernel", LINEAR)]
    else:
        rules.append(Rule(f"{blk}.1.DenseReluDense.wi.weight", "blocks.ffn.wi.kernel", LINEAR))
    rules.append(Rule(f"{blk}.1.DenseReluDense.wo.weight", "blocks.ffn.wo.kernel", LINEAR))
    if config.per_layer_bias:
        rules.append(Rule(f"{blk}.0.SelfAttention.relative_attention_bias.weight", "blocks.attn.rel_bias.embedding"))
    else:
        rules.append(Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                          "rel_bias.embedding"))
    rules.append(Rule("encoder.final_layer_norm.weight", "final_norm.scale"))
    return RuleTable(rules, config.num_layers, family=f"{config.variant} text encoder")


class _EncoderCheckpoint:
    """A reader's view of a transformers T5 checkpoint as the rule table names it.

    The token embedding is stored as `shared.weight`, `encoder.embed_tokens.weight` (the same
    tensor, tied) or both: `shared.weight` is used if present, else the encoder's copy. A full
    encoder-decoder checkpoint's `decoder.*` and `lm_head.weight` are not part of the encoder.
    """

    _ALIAS = "encoder.embed_tokens.weight"

    def __init__(self, reader: SafetensorsReader):
        self.reader = reader
        keys = [k for k in reader.keys() if not (k.startswith("decoder.") or k == "lm_head.weight")]
        self._names = {}
        for k in keys:
            if k == self._ALIAS:
                if "shared.weight" not in keys:
                    self._names["shared.weight"] = k
            else:
                self._names[k] = k

    def keys(self):
        return list(self._names)

    def shape(self, key):
        return self.reader.shape(self._names[key])

    def dtype(self, key):
        return self.reader.dtype(self._names[key])

    def get(self, key, *args, **kwargs):
        return self.reader.get(self._names[key], *args, **kwargs)


# --------------------------------------------------------------------------------------------
# Creating and loading
# --------------------------------------------------------------------------------------------
def create_text_encoder(config: T5EncoderConfig, *, dtype=jnp.float32, param_dtype=None, seed: int = 0
                        ) -> T5Encoder:
    """A randomly initialised encoder (tests, benchmarks)."""
    param_dtype = dtype if param_dtype is None else param_dtype
    with nnx.use_eager_sharding(False):
        return T5Encoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def abstract_text_encoder(config: T5EncoderConfig, *, dtype=jnp.float32, param_dtype=None) -> T5Encoder:
    """The encoder with abstract (shape/dtype only) parameters: no memory, no compute."""
    param_dtype = dtype if param_dtype is None else param_dtype
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: T5Encoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def param_leaves(model: nnx.Module) -> dict[str, jax.Array]:
    """Flat {dotted path: array} of the model's parameters (the rule table's JAX side)."""
    return {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _encoder_folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UnlearnError(f"{path}: no such folder; point to a transformers text encoder folder "
                           f"(e.g. a pipeline's text_encoder/)")
    if not (path / "config.json").exists() and (path / "text_encoder" / "config.json").exists():
        return path / "text_encoder"
    return path


def load_text_encoder(path: str | Path, dtype=None, mesh: jax.sharding.Mesh | None = None,
                      rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES, *, param_dtype=None) -> T5Encoder:
    """Reads a transformers T5/UMT5 encoder folder (or a pipeline folder with `text_encoder/`).

    `dtype` is the compute dtype (default float32); `param_dtype` the storage dtype of the
    linear and embedding weights (default: `dtype`); norms and position biases stay float32.
    With a `mesh`, every weight is placed sharded by `rules` (logical axis -> mesh axis).
    Raises `ModelFamilyError` for a folder of another model family and `ConversionError`
    listing every missing, unexpected or misshaped weight.
    """
    folder = _encoder_folder(path)
    config = T5EncoderConfig.from_json(folder / "config.json")
    dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
    param_dtype = dtype if param_dtype is None else jnp.dtype(param_dtype)
    abstract = abstract_text_encoder(config, dtype=dtype, param_dtype=param_dtype)
    reader = SafetensorsReader(folder)
    try:
        # each leaf keeps the module's own dtype: norms and position biases stay float32
        return load_into(abstract, _EncoderCheckpoint(reader), rule_table(config), str(folder), dtype="model",
                         mesh=mesh, rules=rules)
    finally:
        reader.close()
