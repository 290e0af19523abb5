"""A made-up model family, written in this test folder only, to prove that a family is added as files.

"TinyCross" differs from CogVideoX exactly where the next families do: latents laid out (B, C, F, H, W);
self-attention over the video tokens only, cross-attention to the text with a key mask; the
conditioning is a pytree {"embeds": (B, L, D), "mask": (B, L)}; the localization mask comes from the
cross-attention (text keys only); flow-matching sampling; no VAE (pixel space). Nothing in unlearn_jax/
knows it: the test registers it with `unlearn_jax.families.register`.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.conversion import IDENTITY, LINEAR, Rule, RuleTable
from unlearn_jax.errors import ModelFamilyError
from unlearn_jax.families.base import EraserSite, Family, SamplerDefaults, TextSide, VideoShape
from unlearn_jax.models.hooks import NO_HOOKS, ConceptAttention
from unlearn_jax.models.layers import Dense, LayerNorm, attention

CLASS_NAME = "TinyCrossTransformer"
PIPELINE = "TinyCrossPipeline"


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    in_channels: int = 3
    heads: int = 3
    head_dim: int = 8
    text_dim: int = 32
    num_layers: int = 2
    patch: int = 2
    max_text_len: int = 16

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    def to_dict(self) -> dict:
        return {"_class_name": CLASS_NAME, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d, where="config"):
        if d.get("_class_name") not in (None, CLASS_NAME):
            raise ModelFamilyError(f"{where}: not a {CLASS_NAME}")
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclasses.dataclass(frozen=True)
class Runtime:
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32
    attention: str = "reference"
    attention_chunk: int | None = None
    remat: str = "none"
    mesh: object = None
    rules: tuple = ()


class Attention(nnx.Module):
    def __init__(self, dim, kv_dim, heads, rt, rngs):
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.heads = heads
        self.to_q = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_k = Dense(kv_dim, dim, ("embed", "heads"), **kw)
        self.to_v = Dense(kv_dim, dim, ("embed", "heads"), **kw)
        self.to_out = Dense(dim, dim, ("heads", "embed"), **kw)

    def split(self, y):
        return y.reshape(*y.shape[:2], self.heads, -1)

    def __call__(self, x, ctx=None, mask=None, concept_hook=None):
        ctx = x if ctx is None else ctx
        q, k, v = self.split(self.to_q(x)), self.split(self.to_k(ctx)), self.split(self.to_v(ctx))
        aux = None if concept_hook is None else concept_hook(
            ConceptAttention(q, k, text_start=0, text_len=k.shape[1], key_mask=mask))
        logits = jnp.einsum("bqnh,bknh->bnqk", q, k) * q.shape[-1] ** -0.5
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :], logits, -1e9)
        o = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(logits, -1), v)
        return self.to_out(o.reshape(*x.shape[:2], -1)), aux


class Block(nnx.Module):
    def __init__(self, cfg: TinyConfig, rt, rngs):
        self.norm1 = LayerNorm(cfg.dim, 1e-6, param_dtype=rt.param_dtype, rngs=rngs)
        self.attn1 = Attention(cfg.dim, cfg.dim, cfg.heads, rt, rngs)
        self.norm2 = LayerNorm(cfg.dim, 1e-6, param_dtype=rt.param_dtype, rngs=rngs)
        self.attn2 = Attention(cfg.dim, cfg.text_dim, cfg.heads, rt, rngs)
        self.ff_in = Dense(cfg.dim, 2 * cfg.dim, ("embed", "mlp"), rngs=rngs)
        self.ff_out = Dense(2 * cfg.dim, cfg.dim, ("mlp", "embed"), rngs=rngs)

    def __call__(self, h, temb, cond, hooks, extra):
        a, _ = self.attn1(self.norm1(h) + temb[:, None])
        a, attn_aux = hooks.video_attn(a, extra)  # the adapter site: self-attention output, video tokens only
        h = h + a
        concept = None
        if hooks.on_concept_attention is not None:
            concept = lambda view: hooks.concept(view, extra)  # noqa: E731
        c, concept_aux = self.attn2(self.norm2(h), cond["embeds"], cond["mask"], concept)
        h = h + c
        h = h + self.ff_out(jax.nn.gelu(self.ff_in(h)))
        return h, {"concept": concept_aux, "attn": attn_aux}


class TinyCrossTransformer(nnx.Module):
    def __init__(self, cfg: TinyConfig, *, rngs=None, runtime=Runtime(), **kw):
        rt = dataclasses.replace(runtime, **kw)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config, self.runtime = cfg, rt
        with nnx.use_eager_sharding(False):
            self.patch_in = Dense(cfg.in_channels * cfg.patch**2, cfg.dim, ("patch", "embed"), rngs=rngs)
            self.time = Dense(1, cfg.dim, ("freq", "embed"), rngs=rngs)

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r):
                return Block(cfg, rt, r)

            self.blocks = make(rngs)
            self.patch_out = Dense(cfg.dim, cfg.in_channels * cfg.patch**2, ("embed", "patch"), rngs=rngs)

    def token_grid(self, f, h, w):
        p = self.config.patch
        return f, h // p, w // p

    def forward(self, x, cond, t, hooks=None, extras=None):
        cfg, hooks = self.config, NO_HOOKS if hooks is None else hooks
        b, c, f, hh, ww = x.shape
        p = cfg.patch
        tok = x.reshape(b, c, f, hh // p, p, ww // p, p).transpose(0, 2, 3, 5, 1, 4, 6).reshape(b, -1, c * p * p)
        h = self.patch_in(tok)
        temb = jnp.sin(self.time(jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))[:, None] / 1000.0))
        graphdef, state = nnx.split(self.blocks)

        def body(h, xs):
            layer_state, extra = xs
            layer_state = hooks.layer(layer_state, extra, "attn1")
            return nnx.merge(graphdef, layer_state)(h, temb, cond, hooks, extra)

        h, aux = jax.lax.scan(body, h, (state, extras))
        out = self.patch_out(h).reshape(b, f, hh // p, ww // p, c, p, p).transpose(0, 4, 1, 2, 5, 3, 6)
        return out.reshape(b, c, f, hh, ww), aux

    def forward_inputs(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask):
        return (jnp.asarray(hidden_states), {"embeds": jnp.asarray(encoder_hidden_states),
                                             "mask": jnp.asarray(encoder_attention_mask, bool)},
                jnp.asarray(timestep))

    def __call__(self, *args):
        x, cond, t = self.forward_inputs(*args)
        return self.forward(x, cond, t)[0]


def rule_table(cfg: TinyConfig) -> RuleTable:
    rules = []
    for name in ("patch_in", "time", "patch_out"):
        rules += [Rule(f"{name}.weight", f"{name}.kernel", LINEAR), Rule(f"{name}.bias", f"{name}.bias", IDENTITY)]
    for mod in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                "attn2.to_out", "ff_in", "ff_out"):
        rules += [Rule(f"blocks.{{layer}}.{mod}.weight", f"blocks.{mod}.kernel", LINEAR),
                  Rule(f"blocks.{{layer}}.{mod}.bias", f"blocks.{mod}.bias", IDENTITY)]
    for n in ("norm1", "norm2"):
        rules += [Rule(f"blocks.{{layer}}.{n}.weight", f"blocks.{n}.scale", IDENTITY),
                  Rule(f"blocks.{{layer}}.{n}.bias", f"blocks.{n}.bias", IDENTITY)]
    return RuleTable(rules, cfg.num_layers, family="TinyCross transformer")


class TinyText(TextSide):
    """The pipeline's T5, run with the attention mask; the conditioning is {"embeds", "mask"}."""

    def __init__(self, folder: Path):
        from unlearn_jax.text_encoding import _load_tokenizer, encoder_fingerprint

        self.folder = Path(folder)
        self.tokenizer = _load_tokenizer(self.folder / "tokenizer")
        self.max_length = int(json.loads((self.folder / "transformer" / "config.json").read_text())["max_text_len"])
        self._fp = encoder_fingerprint(self.folder, self.max_length)
        self._encoder = None

    def encode(self, prompts, *, dtype=None, mesh=None):
        from unlearn_jax.models.t5 import load_text_encoder

        if self._encoder is None:
            self._encoder = load_text_encoder(self.folder / "text_encoder")
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="np")
        mask = tok.attention_mask.astype(bool)
        emb = np.asarray(self._encoder(tok.input_ids, mask), np.float32) * mask[..., None]
        return {"embeds": emb, "mask": mask}

    def fingerprint(self, dtype=None):
        return self._fp + "|tiny-cross"

    def concept_mask(self, prompts, phrases, fallback="all"):
        from unlearn_jax.prompts import concept_token_mask

        return concept_token_mask(self.tokenizer, list(prompts), phrases, self.max_length, fallback=fallback)


class TinyCrossFamily(Family):
    name = "tiny_cross"
    title = "TinyCross"
    transformer_class = CLASS_NAME
    pipeline_classes = (PIPELINE,)
    samplers = ("flow_euler",)
    latent_layout = "CFHW"
    published_prefix = "blocks.{layer}.attn1.adapter"

    def owns(self, config):
        return isinstance(config, TinyConfig)

    def transformer_config(self, d, where="config"):
        return TinyConfig.from_dict(dict(d), where)

    def abstract_transformer(self, cfg, **runtime):
        return nnx.eval_shape(lambda: TinyCrossTransformer(cfg, rngs=nnx.Rngs(0), **runtime))

    def build_transformer(self, cfg, seed=0, **runtime):
        return TinyCrossTransformer(cfg, rngs=nnx.Rngs(seed), **runtime)

    def transformer_rules(self, cfg):
        return rule_table(cfg)

    def token_grid(self, model, latent_shape):
        _, f, h, w = latent_shape
        return model.token_grid(f, h, w)

    def eraser_site_from_dict(self, config):
        d = int(config["heads"]) * int(config["head_dim"])
        return EraserSite(stack="blocks", num_layers=int(config["num_layers"]), dim=d, attention="attn1",
                          lora_targets={t: (d, d) for t in ("to_q", "to_k", "to_v", "to_out")},
                          torch_blocks="blocks", torch_attention="attn1",
                          torch_lora_modules={t: t for t in ("to_q", "to_k", "to_v", "to_out")}, torch_output="tensor")

    def text(self, pipeline_dir, cache=None):
        return TinyText(pipeline_dir)

    def vae_config(self, vae_dir):
        return None

    def video_shape(self, model_cfg, vae_cfg, num_frames=None, height=None, width=None):
        f, h, w = num_frames or 2, height or 8, width or 8
        return VideoShape(f, h, w, f, model_cfg.in_channels, h, w, layout="CFHW")

    def decode(self, vae, latents, shape, tiling, warn=None):
        x = np.asarray(latents, np.float32)[0]  # (C, F, H, W) pixels in [-1, 1]
        return np.ascontiguousarray(np.clip((x.transpose(1, 2, 3, 0) + 1) / 2, 0, 1))

    def sampler_defaults(self, model_cfg):
        return SamplerDefaults("flow_euler", num_steps=4, guidance_scale=4.0)


FAMILY = TinyCrossFamily()

FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def build_tiny_cross_pipeline(folder, seed: int = 0) -> Path:
    """A pipeline folder of the made-up family: the tiny T5 of helpers_text, a random TinyCross transformer
    written by the project's own saver (its rule table), a flow-matching scheduler, no VAE."""
    from helpers_text import build_tiny_pipeline

    from unlearn_jax.loading import save_transformer

    folder, _, enc = build_tiny_pipeline(folder, max_text_seq_length=None, seed=seed)
    cfg = TinyConfig(text_dim=enc.config.d_model)
    shutil.rmtree(folder / "transformer")  # build_tiny_pipeline's CogVideoX config stub
    save_transformer(FAMILY.build_transformer(cfg, seed=seed), folder / "transformer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(FLOW_SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": PIPELINE, "transformer": ["tiny", CLASS_NAME], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    return folder
