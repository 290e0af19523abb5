"""HunyuanVideo's first text encoder: transformers' `LlamaModel` (the language model of
LLaVA-Llama-3-8B), in Flax NNX.

Architecture (decoder only, as `LlamaModel`): token embedding -> N pre-norm layers [RMS norm ->
causal self-attention with grouped key/value heads (GQA) and rotary positions -> residual; RMS
norm -> SwiGLU MLP -> residual] -> final RMS norm. Positions are 0..L-1 whatever the mask (as
transformers without `position_ids`); the attention mask hides padded keys, on top of causality.

HunyuanVideoPipeline takes `hidden_states[-(num_hidden_layers_to_skip + 1)]` (skip 2 by default):
the output of a middle layer, before the final norm. `LlamaEncoder(ids, mask, layer=-3)` returns
exactly that hidden state and runs only the layers it needs.

Precision: matmuls run in `dtype`; the residual stream, the norms, the rotary embedding and the
softmax stay in float32. The encoder returns float32. Layers are one stacked module run with
`jax.lax.scan`.

Weights: `rule_table(config)` maps transformers' `LlamaModel` names to the flat JAX leaves.
`load_llama_encoder` also reads a `LlamaForCausalLM` folder (names under `model.`, `lm_head`
ignored) and a transformers LLaVA folder (`LlavaForConditionalGeneration`: its `text_config`,
names under `language_model.model.` or `model.language_model.`; the vision tower, projector and
`lm_head` ignored).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.conversion import LINEAR, Rule, RuleTable, SafetensorsReader, load_into
from unlearn_jax.dtypes import as_dtype
from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.jsonfiles import read_json_object
from unlearn_jax.models.layers import Dense
from unlearn_jax.parallel import DEFAULT_RULES

__all__ = ["KeyMappedReader", "Llama3RopeScaling", "LlamaConfig", "LlamaEncoder", "abstract_llama_encoder",
           "create_llama_encoder", "llama_key_renamer", "load_llama_encoder", "rope_inverse_frequencies",
           "rope_tables", "rule_table"]

_LLAMA_ARCHS = {"LlamaModel", "LlamaForCausalLM"}
_LLAVA_ARCHS = {"LlavaForConditionalGeneration"}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """The "llama3" rope_type: long wavelengths slowed by `factor`, a smooth blend in between."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of transformers' `LlamaConfig` the encoder uses (same names, same defaults)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as attention heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        # Derived defaults are filled in so the frozen config is complete (and hashes the same).
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        self.validate()

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self, where: str = "Llama config"):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UnlearnError(f"{where}: {name} = {v!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnlearnError(f"{where}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                               f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise UnlearnError(f"{where}: head_dim {self.head_dim} must be even (rotary embedding)")
        if self.hidden_act not in ("silu", "swish"):
            raise UnlearnError(f"{where}: hidden_act {self.hidden_act!r} is not supported (Llama's silu)")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise UnlearnError(f"{where}: rms_norm_eps and rope_theta must be positive")

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "config") -> "LlamaConfig":
        """Reads a transformers Llama (or LLaVA, by its text_config) config dict; `ModelFamilyError` for others."""
        d = _llama_text_config(d, where)
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "rope_theta"}
        kw = {k: d[k] for k in fields if d.get(k) is not None}
        kw["rope_theta"], kw["rope_scaling"] = _rope_from_dict(d, where)
        try:
            cfg = cls(**kw)
        except UnlearnError as e:
            raise UnlearnError(f"{where}: {e}") from None
        except TypeError as e:
            raise UnlearnError(f"{where}: not a Llama config ({e})") from None
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        return cls.from_dict(read_json_object(path, "text encoder config"), str(path))

    def to_dict(self) -> dict:
        """A config.json that transformers (v5) builds the same `LlamaModel` from."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        rope = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
        scaling = d.pop("rope_scaling")
        if scaling is not None:
            rope.update(rope_type="llama3", **dataclasses.asdict(scaling))
        return {"architectures": ["LlamaModel"], "model_type": "llama", **d, "rope_parameters": rope}


def _llama_text_config(d: Mapping, where: str) -> Mapping:
    """The Llama part of a config: itself, or a LLaVA config's `text_config`."""
    model_type = d.get("model_type")
    archs = list(d.get("architectures") or [])
    if model_type == "llava":
        bad = [a for a in archs if a not in _LLAVA_ARCHS]
        text = d.get("text_config")
        if bad or not isinstance(text, Mapping) or text.get("model_type", "llama") != "llama":
            raise ModelFamilyError(f"{where}: a LLaVA config without a Llama text_config "
                                   f"({', '.join(archs) or 'no architectures'}); a Llama text encoder is needed")
        return text
    if model_type != "llama":
        what = f"model_type {model_type!r}" + (f" ({', '.join(archs)})" if archs else "")
        raise ModelFamilyError(f"{where}: {what} is not a Llama text encoder; point to HunyuanVideo's text_encoder/")
    bad = [a for a in archs if a not in _LLAMA_ARCHS]
    if bad:
        raise ModelFamilyError(f"{where}: architecture {bad[0]!r} is not a Llama model "
                               f"(expected one of {sorted(_LLAMA_ARCHS)})")
    return d


def _rope_from_dict(d: Mapping, where: str) -> tuple[float, Llama3RopeScaling | None]:
    """(rope_theta, scaling) from transformers v5's `rope_parameters` or v4's `rope_theta` + `rope_scaling`."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise UnlearnError(f"{where}: rope_parameters / rope_scaling must be an object, got {params!r}")
    theta = params.get("rope_theta", d.get("rope_theta"))
    theta = 10000.0 if theta is None else float(theta)
    if float(params.get("partial_rotary_factor", d.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise UnlearnError(f"{where}: partial_rotary_factor is not supported (Llama rotates whole heads)")
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise UnlearnError(f"{where}: rope_type {kind!r} is not supported (only 'default' and 'llama3')")
    try:
        scaling = Llama3RopeScaling(
            factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings")
                                                 or d.get("max_position_embeddings") or 2048))
    except (KeyError, TypeError, ValueError) as e:
        raise UnlearnError(f"{where}: llama3 rope scaling needs factor, low_freq_factor and high_freq_factor "
                           f"({type(e).__name__}: {e})") from None
    if not scaling.high_freq_factor > scaling.low_freq_factor:
        raise UnlearnError(f"{where}: llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return theta, scaling


# --------------------------------------------------------------------------------------------
# Rotary embedding, computed on the host in float32 as transformers does
# --------------------------------------------------------------------------------------------
def rope_inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """(head_dim // 2,) float32 inverse frequencies, with the llama3 rescaling when configured."""
    f32 = np.float32
    dim = cfg.head_dim
    inv = (f32(1.0) / (f32(cfg.rope_theta) ** (np.arange(0, dim, 2).astype(f32) / f32(dim)))).astype(f32)
    s = cfg.rope_scaling
    if s is None:
        return inv
    # transformers' `_compute_llama3_parameters`, step by step in float32
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = (f32(2 * math.pi) / inv).astype(f32)
    scaled = np.where(wavelen > low_wavelen, inv / f32(s.factor), inv).astype(f32)
    smooth = ((f32(s.original_max_position_embeddings) / wavelen - f32(s.low_freq_factor))
              / f32(s.high_freq_factor - s.low_freq_factor)).astype(f32)
    blended = ((f32(1) - smooth) * scaled / f32(s.factor) + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, blended, scaled).astype(f32)


def rope_tables(cfg: LlamaConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (length, head_dim) float32 for positions 0..length-1 (both halves repeated)."""
    ang = np.arange(length, dtype=np.float32)[:, None] * rope_inverse_frequencies(cfg)[None, :]
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x, cos, sin):
    """Rotates the two halves of each head of x (B, L, N, H) by (L, H) tables, in float32."""
    xf = x.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


def causal_padding_mask(attention_mask, batch: int, length: int):
    """(B, L, L) bool: query i sees key j when j <= i and key j is not padding."""
    causal = jnp.tril(jnp.ones((length, length), bool))[None]
    if attention_mask is None:
        return jnp.broadcast_to(causal, (batch, length, length))
    return causal & jnp.asarray(attention_mask).astype(bool)[:, None, :]


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class RMSNorm(nnx.Module):
    """Llama's RMS norm (no mean, no bias), computed in fp32; returns fp32."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",))(
            rngs.params(), (dim,), jnp.float32))

    def __call__(self, x):
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return y * self.scale[...].astype(jnp.float32)


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Dense(d, cfg.num_attention_heads * hd, ("embed", "heads"), **kw)
        self.k_proj = Dense(d, cfg.num_key_value_heads * hd, ("embed", "heads"), **kw)
        self.v_proj = Dense(d, cfg.num_key_value_heads * hd, ("embed", "heads"), **kw)
        self.o_proj = Dense(cfg.num_attention_heads * hd, d, ("heads", "embed"), **kw)
        self.kv_heads, self.groups, self.head_dim = cfg.num_key_value_heads, cfg.groups, hd

    def __call__(self, x, cos, sin, mask):
        """x (B, L, D); cos/sin (L, head_dim); mask (B, L, L) bool."""
        b, n, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, n, self.kv_heads * self.groups, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, n, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, n, self.kv_heads, self.head_dim)
        # Query head h reads key/value head h // groups (transformers' repeat_kv order).
        q = q.reshape(b, n, self.kv_heads, self.groups, self.head_dim)
        logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * self.head_dim ** -0.5
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, n, -1)
        return self.o_proj(out)


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Dense(d, f, ("embed", "mlp"), **kw)
        self.up_proj = Dense(d, f, ("embed", "mlp"), **kw)
        self.down_proj = Dense(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x):
        h = jax.nn.silu(self.gate_proj(x).astype(jnp.float32)) * self.up_proj(x).astype(jnp.float32)
        return self.down_proj(h.astype(x.dtype))


class LlamaLayer(nnx.Module):
    """One `LlamaDecoderLayer`; the residual stream `h` is float32."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs)
        self.mlp = LlamaMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h, cos, sin, mask):
        h = h + self.self_attn(self.input_layernorm(h).astype(self.dtype), cos, sin, mask).astype(jnp.float32)
        return h + self.mlp(self.post_attention_layernorm(h).astype(self.dtype)).astype(jnp.float32)


class LlamaEncoder(nnx.Module):
    """`model(input_ids, attention_mask=None, layer=-1)` = `model.hidden_state(...)` -> (B, L, hidden_size) float32.

    `layer` indexes transformers' `hidden_states` (output_hidden_states=True): 0 is the token
    embedding, k (0 < k < num_hidden_layers) the output of decoder layer k-1, num_hidden_layers
    (= -1) the final-normed last hidden state; negative values count from the end.
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed"))(
            rngs.params(), (config.vocab_size, config.hidden_size), param_dtype))

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r):
            return LlamaLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=r)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs)

    def hidden_state_index(self, layer: int) -> int:
        """`layer` as a non-negative index into the num_hidden_layers + 1 hidden states."""
        n = self.config.num_hidden_layers + 1
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or not -n <= layer < n:
            raise UnlearnError(f"layer {layer!r} is not a hidden-state index of this encoder: "
                               f"{-n}..{n - 1} (0 = embeddings, -1 = after the final norm)")
        return int(layer) % n

    def check_inputs(self, ids_shape, mask_shape=None):
        ids_shape = tuple(ids_shape)
        if len(ids_shape) != 2 or min(ids_shape) < 1:
            raise UnlearnError(f"input_ids must be (batch, length), got shape {ids_shape}")
        if mask_shape is not None and tuple(mask_shape) != ids_shape:
            raise UnlearnError(f"attention_mask shape {tuple(mask_shape)} differs from input_ids {ids_shape}")

    def __call__(self, input_ids, attention_mask=None, layer: int = -1):
        return self.hidden_state(input_ids, attention_mask, layer)

    def hidden_state(self, input_ids, attention_mask=None, layer: int = -1):
        """transformers' `hidden_states[layer]` (B, L, hidden_size) float32; runs the first `layer` layers only."""
        self.check_inputs(jnp.shape(input_ids), None if attention_mask is None else jnp.shape(attention_mask))
        index = self.hidden_state_index(layer)
        input_ids = jnp.asarray(input_ids)
        b, n = input_ids.shape
        h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(jnp.float32)
        if index == 0:
            return h
        mask = causal_padding_mask(attention_mask, b, n)
        cos, sin = (jnp.asarray(t) for t in rope_tables(self.config, n))
        graphdef, state = nnx.split(self.layers)

        def body(hh, i):
            # One layer's weights indexed out of the stack: running the first `index` layers copies none.
            layer_state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), state)
            return nnx.merge(graphdef, layer_state)(hh, cos, sin, mask), None

        h, _ = jax.lax.scan(body, h, jnp.arange(min(index, self.config.num_hidden_layers)))
        return self.norm(h) if index == self.config.num_hidden_layers else h


# --------------------------------------------------------------------------------------------
# Weight names (transformers <-> JAX)
# --------------------------------------------------------------------------------------------
def rule_table(config: LlamaConfig) -> RuleTable:
    """transformers `LlamaModel` keys <-> flat JAX leaf paths."""
    rules = [Rule("embed_tokens.weight", "embed_tokens")]

    def dense(torch_name: str, jax_name: str, bias: bool):
        rules.append(Rule(f"layers.{{layer}}.{torch_name}.weight", f"layers.{jax_name}.kernel", LINEAR))
        if bias:
            rules.append(Rule(f"layers.{{layer}}.{torch_name}.bias", f"layers.{jax_name}.bias"))

    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        dense(f"self_attn.{n}", f"self_attn.{n}", config.attention_bias)
    for n in ("gate_proj", "up_proj", "down_proj"):
        dense(f"mlp.{n}", f"mlp.{n}", config.mlp_bias)
    rules += [Rule("layers.{layer}.input_layernorm.weight", "layers.input_layernorm.scale"),
              Rule("layers.{layer}.post_attention_layernorm.weight", "layers.post_attention_layernorm.scale"),
              Rule("norm.weight", "norm.scale")]
    return RuleTable(rules, config.num_hidden_layers, family="Llama text encoder")


class KeyMappedReader:
    """A reader's view with its tensors renamed to the rule table's names (`rename(key)` -> name, or
    None to leave the tensor out); two tensors under one name are an `UnlearnError`."""

    def __init__(self, reader, rename: Callable[[str], str | None], where: str):
        self.reader = reader
        self._names: dict[str, str] = {}
        for key in reader.keys():
            name = rename(key)
            if name is None:
                continue
            if name in self._names:
                raise UnlearnError(f"{where}: tensors {self._names[name]} and {key} both give {name}; keep one")
            self._names[name] = key

    def keys(self):
        return list(self._names)

    def shape(self, key):
        return self.reader.shape(self._names[key])

    def dtype(self, key):
        return self.reader.dtype(self._names[key])

    def get(self, key, *args, **kwargs):
        return self.reader.get(self._names[key], *args, **kwargs)


# Where the Llama tensors sit in each checkpoint layout, and what else a layout holds that is not read.
_PREFIXES = ("", "model.", "language_model.model.", "model.language_model.")
_IGNORED = ("lm_head.", "language_model.lm_head.", "vision_tower.", "model.vision_tower.",
            "multi_modal_projector.", "model.multi_modal_projector.")


def llama_key_renamer(keys: Sequence[str], where: str) -> Callable[[str], str | None]:
    """Strips the one prefix under which `keys` hold the token embedding; drops the heads and vision
    parts of causal-LM / LLaVA checkpoints and rotary buffers of old exports."""
    found = [p for p in _PREFIXES if f"{p}embed_tokens.weight" in set(keys)]
    if len(found) > 1:
        raise UnlearnError(f"{where}: the token embedding is stored under several prefixes {found}; keep one model")
    prefix = found[0] if found else ""

    def rename(key: str) -> str | None:
        if key.startswith(_IGNORED) or key.endswith("rotary_emb.inv_freq"):
            return None
        return key[len(prefix):] if key.startswith(prefix) else key

    return rename


# --------------------------------------------------------------------------------------------
# Creating and loading
# --------------------------------------------------------------------------------------------
def create_llama_encoder(config: LlamaConfig, *, dtype=jnp.float32, param_dtype=None, seed: int = 0) -> LlamaEncoder:
    """A randomly initialised encoder (tests, benchmarks)."""
    param_dtype = dtype if param_dtype is None else param_dtype
    with nnx.use_eager_sharding(False):
        return LlamaEncoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def abstract_llama_encoder(config: LlamaConfig, *, dtype=jnp.float32, param_dtype=None) -> LlamaEncoder:
    """The encoder with abstract (shape/dtype only) parameters: no memory, no compute."""
    param_dtype = dtype if param_dtype is None else param_dtype
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: LlamaEncoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def encoder_folder(path: str | Path, subfolder: str, what: str) -> Path:
    """`path` itself, or `path/subfolder` of a pipeline folder; one-line errors for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise UnlearnError(f"{path}: no such folder; point to a transformers {what} folder "
                           f"(e.g. a pipeline's {subfolder}/)")
    if (path / "config.json").exists():
        return path
    if (path / subfolder / "config.json").exists():
        return path / subfolder
    raise UnlearnError(f"{path}: no config.json (nor {subfolder}/config.json); point to a transformers {what} folder")


def checkpoint_dtype(reader, key: str, dtype) -> np.dtype:
    """`dtype` if given, else the dtype `key` is stored in (float64 read as float32; float32 when absent,
    the load then lists what is missing)."""
    dtype = as_dtype(dtype)
    if dtype is not None:
        return dtype
    if key not in reader.keys():
        return np.dtype(np.float32)
    stored = np.dtype(reader.dtype(key))
    return np.dtype(np.float32) if stored == np.float64 else stored


def load_llama_encoder(path: str | Path, dtype=None, mesh: jax.sharding.Mesh | None = None,
                       rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES, *, param_dtype=None) -> LlamaEncoder:
    """Reads a transformers Llama text encoder folder (or a pipeline folder with `text_encoder/`).

    `dtype` is the compute dtype, None: the checkpoint's (its token embedding's); `param_dtype`
    the storage dtype of the embedding and linear weights (default: `dtype`); norms stay float32.
    With a `mesh`, every weight is placed sharded by `rules` (logical axis -> mesh axis).
    Raises `ModelFamilyError` for a folder of another model and `ConversionError` listing every
    missing, unexpected or misshaped weight.
    """
    folder = encoder_folder(path, "text_encoder", "Llama text encoder")
    config = LlamaConfig.from_json(folder / "config.json")
    reader = SafetensorsReader(folder)
    try:
        view = KeyMappedReader(reader, llama_key_renamer(reader.keys(), str(folder)), str(folder))
        dtype = checkpoint_dtype(view, "embed_tokens.weight", dtype)
        param_dtype = dtype if param_dtype is None else as_dtype(param_dtype)
        abstract = abstract_llama_encoder(config, dtype=dtype, param_dtype=param_dtype)
        # each leaf keeps the module's own dtype: the norms stay float32
        return load_into(abstract, view, rule_table(config), str(folder), dtype="model", mesh=mesh, rules=rules)
    finally:
        reader.close()
