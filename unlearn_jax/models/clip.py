"""HunyuanVideo's second text encoder: transformers' `CLIPTextModel` (CLIP ViT-L/14's text tower), in Flax NNX.

Architecture (as `CLIPTextModel`): token + learned position embeddings -> N pre-LN layers
[LayerNorm -> causal self-attention -> residual; LayerNorm -> fc1 -> quick_gelu (or the
configured activation) -> fc2 -> residual] -> final LayerNorm. The pooled output is the final
state at one position per row, picked as transformers picks it:

* `eos_token_id == 2` (configs written before transformers PR #24773, CLIP-L's among them): the
  position of the largest token id (the end token is the largest id of CLIP's vocabulary);
* otherwise: the first position holding `eos_token_id` (position 0 when there is none).

HunyuanVideoPipeline tokenizes to 77 (padding "max_length", truncation) and calls the encoder
without an attention mask, keeping `pooler_output`; `CLIPTextEncoder(ids)` does the same and
returns `(last_hidden_state, pooled)`. An attention mask, when given, hides padded keys on top
of causality, as transformers does.

Precision: matmuls in `dtype`; the residual stream, the LayerNorms and the softmax in float32.
Outputs are float32. Layers are one stacked module run with `jax.lax.scan`.

Weights: `rule_table(config)` uses the names of published checkpoints (`text_model.` prefix, as
transformers v4 writes them); the loader also reads transformers v5's unprefixed names, and a
`CLIPTextModelWithProjection` or full `CLIPModel` folder (its projections and vision tower are
not part of the text encoder's outputs and are ignored).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unlearn_jax.conversion import LINEAR, Rule, RuleTable, SafetensorsReader, load_into
from unlearn_jax.dtypes import as_dtype
from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.jsonfiles import read_json_object
from unlearn_jax.models.layers import Dense, LayerNorm
from unlearn_jax.models.llama import KeyMappedReader, checkpoint_dtype, encoder_folder
from unlearn_jax.parallel import DEFAULT_RULES

__all__ = ["CLIPTextConfig", "CLIPTextEncoder", "abstract_clip_text_encoder", "clip_key_renamer",
           "create_clip_text_encoder", "load_clip_text_encoder", "pooled_positions", "rule_table"]

_TEXT_ARCHS = {"CLIPTextModel", "CLIPTextModelWithProjection"}
LEGACY_EOS_TOKEN_ID = 2  # transformers' marker of configs whose eos_token_id predates PR #24773

# transformers activation names -> jax functions (fp32 in, fp32 out)
_ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' `CLIPTextConfig` the encoder uses (same names, same defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512  # not used by the text model; kept so that to_dict round-trips
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def legacy_pooling(self) -> bool:
        """Pool at the largest token id (True) or at the first `eos_token_id` (False)."""
        return self.eos_token_id == LEGACY_EOS_TOKEN_ID

    def validate(self, where: str = "CLIP text config"):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UnlearnError(f"{where}: {name} = {v!r} must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise UnlearnError(f"{where}: hidden_size {self.hidden_size} is not a multiple of "
                               f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise UnlearnError(f"{where}: hidden_act {self.hidden_act!r} is not supported; "
                               f"use one of {sorted(_ACTIVATIONS)}")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise UnlearnError(f"{where}: eos_token_id = {self.eos_token_id!r} must be an integer "
                               "(the pooled output is read at the end token)")

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "config") -> "CLIPTextConfig":
        """Reads a transformers CLIP text (or full CLIP, by its text_config) config dict; `ModelFamilyError`
        for other models."""
        d = _clip_text_config(d, where)
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: d[k] for k in fields if d.get(k) is not None})
        except UnlearnError as e:
            raise UnlearnError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "CLIPTextConfig":
        return cls.from_dict(read_json_object(path, "text encoder config"), str(path))

    def to_dict(self) -> dict:
        """A config.json that transformers builds the same `CLIPTextModel` from."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **dataclasses.asdict(self)}


def _clip_text_config(d: Mapping, where: str) -> Mapping:
    """The text part of a config: itself, or a full CLIP config's `text_config`."""
    model_type = d.get("model_type")
    archs = list(d.get("architectures") or [])
    if model_type == "clip" and isinstance(d.get("text_config"), Mapping) and set(archs) <= {"CLIPModel"}:
        return d["text_config"]
    if model_type != "clip_text_model":
        what = f"model_type {model_type!r}" + (f" ({', '.join(archs)})" if archs else "")
        raise ModelFamilyError(f"{where}: {what} is not a CLIP text encoder; point to HunyuanVideo's text_encoder_2/")
    bad = [a for a in archs if a not in _TEXT_ARCHS]
    if bad:
        raise ModelFamilyError(f"{where}: architecture {bad[0]!r} is not a CLIP text model "
                               f"(expected one of {sorted(_TEXT_ARCHS)})")
    return d


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
def pooled_positions(input_ids, eos_token_id: int):
    """(B,) int32 position of the pooled state per row, transformers' rule (module docstring)."""
    ids = jnp.asarray(input_ids).astype(jnp.int32)
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(ids, axis=-1).astype(jnp.int32)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1).astype(jnp.int32)


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(d, d, ("embed", "heads"), **kw)
        self.k_proj = Dense(d, d, ("embed", "heads"), **kw)
        self.v_proj = Dense(d, d, ("embed", "heads"), **kw)
        self.out_proj = Dense(d, d, ("heads", "embed"), **kw)
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim

    def __call__(self, x, mask):
        """x (B, L, D); mask (B, L, L) bool (query, key)."""
        b, n, _ = x.shape
        shape = (b, n, self.heads, self.head_dim)
        q, k, v = self.q_proj(x).reshape(shape), self.k_proj(x).reshape(shape), self.v_proj(x).reshape(shape)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.head_dim ** -0.5
        logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, -1))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x).astype(jnp.float32)).astype(x.dtype))


class CLIPLayer(nnx.Module):
    """One `CLIPEncoderLayer`; the residual stream `h` is float32."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)
        self.self_attn = CLIPAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)
        self.mlp = CLIPMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h, mask):
        h = h + self.self_attn(self.layer_norm1(h).astype(self.dtype), mask).astype(jnp.float32)
        return h + self.mlp(self.layer_norm2(h).astype(self.dtype)).astype(jnp.float32)


class CLIPTextEncoder(nnx.Module):
    """`model(input_ids, attention_mask=None) -> (last_hidden_state (B, L, D), pooled (B, D))`, float32."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        d = config.hidden_size
        self.token_embedding = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"))(
            rngs.params(), (config.vocab_size, d), param_dtype))
        self.position_embedding = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(0.01), ("pos", "embed"))(
            rngs.params(), (config.max_position_embeddings, d), param_dtype))

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r):
            return CLIPLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=r)

        self.layers = make_layers(rngs)
        self.final_layer_norm = LayerNorm(d, config.layer_norm_eps, rngs=rngs)

    def check_inputs(self, ids_shape, mask_shape=None):
        ids_shape = tuple(ids_shape)
        if len(ids_shape) != 2 or min(ids_shape) < 1:
            raise UnlearnError(f"input_ids must be (batch, length), got shape {ids_shape}")
        if ids_shape[1] > self.config.max_position_embeddings:
            raise UnlearnError(f"input_ids have {ids_shape[1]} tokens, more than the encoder's "
                               f"max_position_embeddings={self.config.max_position_embeddings}; truncate them")
        if mask_shape is not None and tuple(mask_shape) != ids_shape:
            raise UnlearnError(f"attention_mask shape {tuple(mask_shape)} differs from input_ids {ids_shape}")

    def __call__(self, input_ids, attention_mask=None):
        self.check_inputs(jnp.shape(input_ids), None if attention_mask is None else jnp.shape(attention_mask))
        input_ids = jnp.asarray(input_ids)
        b, n = input_ids.shape
        h = (jnp.take(self.token_embedding[...], input_ids, axis=0).astype(jnp.float32)
             + self.position_embedding[...][:n].astype(jnp.float32)[None])
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool))[None], (b, n, n))
        if attention_mask is not None:
            mask = mask & jnp.asarray(attention_mask).astype(bool)[:, None, :]
        graphdef, state = nnx.split(self.layers)

        def body(hh, layer_state):
            return nnx.merge(graphdef, layer_state)(hh, mask), None

        h, _ = jax.lax.scan(body, h, state)
        h = self.final_layer_norm(h)
        pooled = jnp.take_along_axis(h, pooled_positions(input_ids, self.config.eos_token_id)[:, None, None], axis=1)
        return h, pooled[:, 0]


# --------------------------------------------------------------------------------------------
# Weight names (transformers <-> JAX)
# --------------------------------------------------------------------------------------------
PREFIX = "text_model."


def rule_table(config: CLIPTextConfig) -> RuleTable:
    """Published `CLIPTextModel` keys (`text_model.` prefix) <-> flat JAX leaf paths."""
    p, blk = PREFIX, f"{PREFIX}encoder.layers.{{layer}}"
    rules = [Rule(f"{p}embeddings.token_embedding.weight", "token_embedding"),
             Rule(f"{p}embeddings.position_embedding.weight", "position_embedding")]

    def dense(torch_name: str, jax_name: str):
        rules.append(Rule(f"{blk}.{torch_name}.weight", f"layers.{jax_name}.kernel", LINEAR))
        rules.append(Rule(f"{blk}.{torch_name}.bias", f"layers.{jax_name}.bias"))

    def norm(torch_name: str, jax_name: str, stacked: bool = True):
        pre, jpre = (f"{blk}.", "layers.") if stacked else (p, "")
        rules.append(Rule(f"{pre}{torch_name}.weight", f"{jpre}{jax_name}.scale"))
        rules.append(Rule(f"{pre}{torch_name}.bias", f"{jpre}{jax_name}.bias"))

    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
        dense(f"self_attn.{n}", f"self_attn.{n}")
    norm("layer_norm1", "layer_norm1")
    norm("layer_norm2", "layer_norm2")
    dense("mlp.fc1", "mlp.fc1")
    dense("mlp.fc2", "mlp.fc2")
    norm("final_layer_norm", "final_layer_norm", stacked=False)
    return RuleTable(rules, config.num_hidden_layers, family="CLIP text encoder")


# Parts of CLIPTextModelWithProjection / CLIPModel checkpoints that the text encoder's outputs do not use;
# `position_ids` is an integer buffer older exports saved.
_IGNORED = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")


def clip_key_renamer(key: str) -> str | None:
    """A checkpoint key -> the rule table's name (v5's unprefixed names gain `text_model.`), None to skip."""
    if key.startswith(_IGNORED) or key.endswith("embeddings.position_ids"):
        return None
    return key if key.startswith(PREFIX) else PREFIX + key


# --------------------------------------------------------------------------------------------
# Creating and loading
# --------------------------------------------------------------------------------------------
def create_clip_text_encoder(config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=None,
                             seed: int = 0) -> CLIPTextEncoder:
    """A randomly initialised encoder (tests, benchmarks)."""
    param_dtype = dtype if param_dtype is None else param_dtype
    with nnx.use_eager_sharding(False):
        return CLIPTextEncoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def abstract_clip_text_encoder(config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=None) -> CLIPTextEncoder:
    """The encoder with abstract (shape/dtype only) parameters: no memory, no compute."""
    param_dtype = dtype if param_dtype is None else param_dtype
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: CLIPTextEncoder(config, dtype=dtype, param_dtype=param_dtype,
                                                      rngs=nnx.Rngs(0)))


def load_clip_text_encoder(path: str | Path, dtype=None, mesh: jax.sharding.Mesh | None = None,
                           rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES, *,
                           param_dtype=None) -> CLIPTextEncoder:
    """Reads a transformers CLIP text encoder folder (or a pipeline folder with `text_encoder_2/`).

    `dtype` is the compute dtype, None: the checkpoint's (its token embedding's); `param_dtype`
    the storage dtype of the embedding and linear weights (default: `dtype`); LayerNorms stay
    float32. With a `mesh`, every weight is placed sharded by `rules`. Raises `ModelFamilyError`
    for a folder of another model and `ConversionError` listing every weight that does not fit.
    """
    folder = encoder_folder(path, "text_encoder_2", "CLIP text encoder")
    config = CLIPTextConfig.from_json(folder / "config.json")
    reader = SafetensorsReader(folder)
    try:
        view = KeyMappedReader(reader, clip_key_renamer, str(folder))
        dtype = checkpoint_dtype(view, f"{PREFIX}embeddings.token_embedding.weight", dtype)
        param_dtype = dtype if param_dtype is None else as_dtype(param_dtype)
        abstract = abstract_clip_text_encoder(config, dtype=dtype, param_dtype=param_dtype)
        # each leaf keeps the module's own dtype: the LayerNorms stay float32
        return load_into(abstract, view, rule_table(config), str(folder), dtype="model", mesh=mesh, rules=rules)
    finally:
        reader.close()
