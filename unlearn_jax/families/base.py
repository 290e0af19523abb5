"""What a model family provides: the one interface the core (loading, sampling, the train step, erasers,
exports, generation, evaluation) talks to.

A family is a subclass of `Family` in a module of its own (`families/<name>.py`) that sets the
module constant `FAMILY = MyFamily()`; the registry (`families/__init__.py`) finds it there, or
it is registered with `families.register(...)` (a plugin, or a test's made-up family). Nothing
in the core changes for a new family.

This module imports no JAX: the PyTorch-side helpers read the eraser sites from it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

GUIDANCE_MODES = ("cfg", "embedding")


@dataclasses.dataclass(frozen=True)
class EraserSite:
    """Where erasers sit in a family's transformer, in JAX and in diffusers.

    JAX side (the project's own model):
      stack: attribute of the model holding the stacked blocks the erasers act in ("blocks").
      num_layers, dim: blocks in that stack; width of the attention output the adapter acts on.
      attention: in-block path of the attention module the erasers act on ("attn1"); LoRA targets
        are its projections `<attention>.<target>.kernel`, "attn" erasers fine-tune everything under it.
      lora_targets: target name -> (in features, out features).
    diffusers side (published eraser files, LoRA files, `unlearn_jax.torch.attach_erasers`):
      torch_blocks: module path of the block list ("transformer_blocks").
      torch_attention: module path of the attention inside a block ("attn1"); the published adapter
        is its child `adapter` (`Family.published_prefix`: `<torch_blocks>.{layer}.<torch_attention>.adapter`).
      torch_lora_modules: LoRA target name -> module under the attention ("to_out" -> "to_out.0").
      torch_output: how the attention module returns the video tokens the adapter acts on:
        "tuple_first" (a (video, text) tuple, CogVideoX) or "tensor" (video tokens only).
      lora_prefix: the key prefix of diffusers' LoRA files ("transformer").
    """

    stack: str
    num_layers: int
    dim: int
    attention: str
    lora_targets: Mapping[str, tuple[int, int]]
    torch_blocks: str
    torch_attention: str
    torch_lora_modules: Mapping[str, str]
    torch_output: str = "tuple_first"
    lora_prefix: str = "transformer"
    # the eraser kinds the model takes, and why others are not (the one-line refusal's reason)
    kinds: tuple[str, ...] = ("adapter", "lora", "attn", "full")
    kinds_reason: str = ""

    @property
    def published_prefix(self) -> str:
        """Key template of a published adapter module (`{layer}` is the block index)."""
        return f"{self.torch_blocks}.{{layer}}.{self.torch_attention}.adapter"

    def lora_module(self, target: str) -> str:
        """Module path template (under the transformer) of a LoRA target."""
        return f"{self.torch_blocks}.{{layer}}.{self.torch_attention}.{self.torch_lora_modules[target]}"


@dataclasses.dataclass(frozen=True)
class SamplerDefaults:
    """How the family's pipeline samples by default."""

    sampler: str           # a scheduler kind of `schedulers.KINDS`
    num_steps: int = 50
    guidance_scale: float = 6.0
    dynamic_cfg: bool = False


@dataclasses.dataclass(frozen=True)
class VideoShape:
    """Pixel size of the videos and the latent grid the sampler runs on.

    layout: the order of the latents' non-batch axes in the family's model ("FCHW": CogVideoX,
    "CFHW": Wan and HunyuanVideo)."""

    num_frames: int
    height: int
    width: int
    latent_frames: int      # including `pad_frames` (CogVideoX1.5 pads to its temporal patch)
    channels: int
    latent_height: int
    latent_width: int
    pad_frames: int = 0
    layout: str = "FCHW"

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """The latents of one video without the batch axis, in the model's layout."""
        f, c = self.latent_frames, self.channels
        return (f, c, self.latent_height, self.latent_width) if self.layout == "FCHW" else \
            (c, f, self.latent_height, self.latent_width)

    @property
    def noise_shape(self) -> tuple[int, int, int, int, int]:
        """(1, ...latent_shape): what the pipeline's `prepare_latents` draws for one video."""
        return (1, *self.latent_shape)


class TextSide:
    """A pipeline's text encoder(s) as the family's pipeline uses them (the interface; see
    `text_encoding.T5Text` for CogVideoX's)."""

    max_length: int  # text tokens the transformer sees (the conditioning's text length)

    def encode(self, prompts: Sequence[str], *, dtype=None, mesh=None):
        """The conditioning pytree of `prompts`: arrays with a leading prompt axis (numpy, float32
        where floating)."""
        raise NotImplementedError

    def fingerprint(self, dtype=None) -> str:
        """A digest of everything `encode` depends on (weights, tokenizer, lengths, dtype)."""
        raise NotImplementedError

    def concept_mask(self, prompts: Sequence[str], phrases, fallback: str = "all"):
        """(N, max_length) bool: the text positions (as the transformer sees the text) of each
        prompt's concept phrase."""
        raise NotImplementedError

    def token_encoder(self, dtype=None):
        """Optional, for the token-level red-team attacks (`attacks.tokens`, `attacks.ring_a_bell`): an
        object with `ids(prompts)`, `length(ids)`, `allowed`, `vocab_size`, `decode(tokens)` and a
        differentiable `encode(weights (N, L, V)) -> conditioning` (see `text_encoding.TokenEncoder`)."""
        from unlearn_jax.errors import UnlearnError

        raise UnlearnError(f"{type(self).__name__}: token-level attacks are not available for this text side "
                           "(the soft attack is)")


class Family:
    """A model family. Subclasses set the class attributes and implement the methods."""

    name: str = ""                      # "cogvideox": how configs and messages name it
    title: str = ""                     # "CogVideoX"
    transformer_class: str = ""         # diffusers `_class_name` of its transformer
    pipeline_classes: tuple[str, ...] = ()  # `_class_name` values of its model_index.json
    pipeline_parts: tuple[str, ...] = ("transformer", "tokenizer", "text_encoder")  # required sub-folders
    samplers: tuple[str, ...] = ()      # scheduler kinds its pipelines can sample with
    guidance: str = "cfg"               # "cfg": batched [uncond; cond] passes; "embedding": the model takes it
    latent_layout: str = "FCHW"
    # key template of the published (T2VUnlearning) adapter files of this family: the same as its
    # `EraserSite.published_prefix`, known without a model config (to recognise a file's family)
    published_prefix: str = ""

    # ---- the folder ----------------------------------------------------------------------------
    def check_folder(self, root: Path) -> None:
        """Refuses (one line) a pipeline folder of this family that the project cannot use as a whole
        (another task's pipeline, a missing part). Nothing to check by default."""

    def pipeline_transformer_config(self, root: Path, read_one):
        """The transformer config object of a pipeline folder; `read_one(folder)` reads one transformer
        folder's. Default: its transformer/ (a family whose pipeline holds several transformers, such as
        Wan 2.2 A14B's two experts, returns a config object covering all of them)."""
        return read_one(Path(root) / "transformer")

    def load_pipeline_transformer(self, root: Path, load_one):
        """The model of a pipeline folder; `load_one(folder)` loads one transformer folder (with the
        caller's dtype, mesh and runtime). Default: its transformer/."""
        return load_one(Path(root) / "transformer")

    # ---- the transformer -------------------------------------------------------------------
    def recognises(self, config: Mapping) -> bool:
        """Whether a transformer `config.json` without a `_class_name` is this family's (by its fields)."""
        return False

    def owns(self, config) -> bool:
        """Whether a transformer config object is this family's."""
        raise NotImplementedError

    def transformer_config(self, d: Mapping, where: str = "config"):
        raise NotImplementedError

    def abstract_transformer(self, cfg, **runtime):
        """The model with shapes only (no memory), built with `runtime` options."""
        raise NotImplementedError

    def build_transformer(self, cfg, seed: int = 0, **runtime):
        """A randomly initialised model (tests, toy worlds)."""
        raise NotImplementedError

    def transformer_rules(self, cfg):
        """The `conversion.RuleTable` of its diffusers transformer, used both ways."""
        raise NotImplementedError

    def token_grid(self, model, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """(frames, height, width) of video tokens for latents of `latent_shape` (no batch axis)."""
        raise NotImplementedError

    def eraser_site(self, cfg) -> EraserSite:
        """The site for a transformer config object of this family."""
        return self.eraser_site_from_dict(cfg.to_dict())

    def eraser_site_from_dict(self, config: Mapping) -> EraserSite:
        """The site for a diffusers `config.json` dict (no JAX needed: the PyTorch helpers use it)."""
        raise NotImplementedError

    # ---- text ------------------------------------------------------------------------------
    def text(self, pipeline_dir: Path, cache=None) -> TextSide:
        raise NotImplementedError

    # ---- VAE and video shapes --------------------------------------------------------------
    def vae_config(self, vae_dir: Path):
        raise NotImplementedError

    def load_vae(self, vae_dir: Path, dtype=None, mesh=None):
        raise NotImplementedError

    def check_tiling(self, vae_tiling) -> None:
        """Refuses (one line) a `vae_tiling` value the family's VAE does not take."""
        if vae_tiling is not None and not isinstance(vae_tiling, bool):
            from unlearn_jax.errors import UnlearnError

            raise UnlearnError(f"vae_tiling = {vae_tiling!r} is invalid; expected None, true or false")

    def video_shape(self, model_cfg, vae_cfg, num_frames=None, height=None, width=None) -> VideoShape:
        """The pipeline's video size (its defaults where None), checked against the VAE and patches."""
        raise NotImplementedError

    def decode(self, vae, latents, shape: VideoShape, tiling, warn=None):
        """Final latents (1, ...) -> frames (num_frames, H, W, 3) float32 in [0, 1], as the pipeline's
        `output_type="np"`. `vae` is None for pixel-space models. `warn(message)` reports a fallback."""
        raise NotImplementedError

    def noise_dtype(self, dtype: str) -> str:
        """The dtype the pipeline draws its initial noise and keeps its latents in, for a model run in
        `dtype` (CogVideoX: the model's; Wan: float32)."""
        return dtype

    # ---- sampling ----------------------------------------------------------------------------
    def sampler_defaults(self, model_cfg) -> SamplerDefaults:
        raise NotImplementedError

    def default_dynamic_cfg(self, sampler: str) -> bool:
        """Whether guidance follows the pipeline's dynamic ramp by default with this sampler."""
        return False

    def training_sampler(self, model_cfg) -> str:
        """The scheduler kind that samples x_t during erasure when the config names none."""
        return self.sampler_defaults(model_cfg).sampler

    def scheduler_config(self, config):
        """The `schedulers.SchedulerConfig` as the family's pipeline sets its scheduler up (read from the
        folder's scheduler config; HunyuanVideo passes its own sigmas). Unchanged by default."""
        return config

    # ---- guidance ----------------------------------------------------------------------------
    def with_guidance(self, cond, guidance_scale):
        """The conditioning of a pass at `guidance_scale`. Unchanged where guidance is a batched
        [uncond; cond] pass ("cfg"); a family whose model takes the guidance as an embedding writes
        the scale into its conditioning (works on numpy and traced arrays)."""
        return cond

    def guidance_boundary(self, model_cfg) -> float | None:
        """The timestep below which the pipeline guides with its second scale (`guidance_scale_2`), or
        None where one scale serves every step (the default). Wan 2.2 A14B: its expert boundary."""
        return None

    def cfg_scale(self, guidance_scale, true_cfg_scale=1.0):
        """The classifier-free scale the sampler batches [uncond; cond] passes with: the guidance scale
        for "cfg" families; where the guidance is an embedding, `true_cfg_scale` (1: one conditional
        pass, as the pipeline by default)."""
        return guidance_scale if self.guidance == "cfg" else true_cfg_scale

    # ---- messages ----------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"<family {self.name}: {self.transformer_class}>"


def leading_size(tree: Any) -> int:
    """The size of the leading (batch) axis shared by every array of a pytree."""
    import jax

    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("an empty conditioning pytree")
    return int(leaves[0].shape[0])


def take_rows(tree: Any, rows) -> Any:
    """Rows of a conditioning pytree: every leaf indexed on its leading axis."""
    import jax

    return jax.tree.map(lambda a: a[rows], tree)
