"""HunyuanVideo's text side, as `HunyuanVideoPipeline.encode_prompt` computes it.

- The Llama text encoder (`text_encoder/`, `tokenizer/`): each prompt is put into the pipeline's
  template, tokenized to `crop_start + 256` tokens (right padding, truncation, the attention mask),
  run with the mask, and the hidden states `hidden_states[-(skip + 1)]` (skip 2: two layers before
  the end, before the final norm) are kept; the template's first `crop_start` tokens (95 for the
  Llama-3 tokenizer of the published checkpoint) are cropped off the states and the mask.
- CLIP-L (`text_encoder_2/`, `tokenizer_2/`): the prompt tokenized to 77 tokens (padding, truncation)
  and run without a mask; its pooled output.
- The guidance the pipeline gives the model as an embedding: 1000 x the guidance scale per prompt
  (the sampler and the erasure step set it, `families.hunyuan_video.with_guidance`).

The conditioning is {"text": (N, 256, D) float32, "mask": (N, 256) int32, "pooled": (N, D2) float32,
"guidance": (N,) float32}. The concept mask marks the concept's tokens among the 256 positions the
transformer sees (after the crop).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from unlearn_jax.errors import UnlearnError
from unlearn_jax.families.base import TextSide

# HunyuanVideoPipeline's DEFAULT_PROMPT_TEMPLATE (its instruction text, needed verbatim: the model was
# trained on it) and the number of its tokens the pipeline crops with the Llama-3 tokenizer.
DEFAULT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
DEFAULT_CROP_START = 95
MAX_LENGTH = 256        # max_sequence_length: the text tokens the transformer sees
CLIP_LENGTH = 77
HIDDEN_LAYERS_TO_SKIP = 2
_FINGERPRINT_VERSION = b"unlearn-jax/hunyuan-video-text/v1"
PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


def _folders(pipeline_dir) -> Path:
    root = Path(pipeline_dir)
    if not root.is_dir():
        raise UnlearnError(f"{root}: no such folder; point to a HunyuanVideo pipeline folder")
    missing = [p for p in PARTS if not (root / p).is_dir()]
    if missing:
        raise UnlearnError(f"{root}: no {', '.join(p + '/' for p in missing)} folder; a HunyuanVideo pipeline folder "
                           f"holds {', '.join(p + '/' for p in PARTS)}")
    return root


def _load_tokenizer(folder: Path):
    from unlearn_jax.text_encoding import _load_tokenizer as load

    return load(folder)


class LoadedEncoders:
    """Both tokenizers and both text encoders of a pipeline folder, with their jitted forwards."""

    def __init__(self, root: Path, dtype=None, mesh=None, layer: int = -(HIDDEN_LAYERS_TO_SKIP + 1)):
        from unlearn_jax.models.clip import load_clip_text_encoder
        from unlearn_jax.models.llama import load_llama_encoder
        from unlearn_jax.text_encoding import _dtype

        self.dtype, self.mesh = _dtype(dtype), mesh
        self.tokenizer = _load_tokenizer(root / "tokenizer")
        self.tokenizer_2 = _load_tokenizer(root / "tokenizer_2")
        llama = load_llama_encoder(root / "text_encoder", dtype=self.dtype, mesh=mesh)
        clip = load_clip_text_encoder(root / "text_encoder_2", dtype=self.dtype, mesh=mesh)
        self.dim, self.pooled_dim = llama.config.hidden_size, clip.config.hidden_size
        ld, self.llama_state = nnx.split(llama)
        cd, self.clip_state = nnx.split(clip)

        @jax.jit
        def llama_forward(state, ids, mask):
            return nnx.merge(ld, state).hidden_state(ids, mask, layer)

        @jax.jit
        def clip_forward(state, ids):
            return nnx.merge(cd, state)(ids)[1]

        self._llama, self._clip = llama_forward, clip_forward

    def _put(self, *arrays):
        if self.mesh is None:
            return arrays
        repl = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return tuple(jax.device_put(a, repl) for a in arrays)

    def llama(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        ids, mask = self._put(np.asarray(ids, np.int32), np.asarray(mask, np.int32))
        return np.asarray(jax.device_get(self._llama(self.llama_state, ids, mask)), np.float32)

    def clip(self, ids: np.ndarray) -> np.ndarray:
        (ids,) = self._put(np.asarray(ids, np.int32))
        return np.asarray(jax.device_get(self._clip(self.clip_state, ids)), np.float32)


def _check_prompts(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise UnlearnError(f"prompts must be strings; prompt {bad[0]} is {type(prompts[bad[0]]).__name__}")
    return prompts


TEMPLATE_FILE = "prompt_template.json"


def folder_template(root: Path) -> dict:
    """The pipeline call's text settings a folder asks for: `<pipeline>/prompt_template.json`
    ({"template", "crop_start", "max_sequence_length"}, each optional; diffusers ignores the file),
    for a folder sampled with another `prompt_template` / `max_sequence_length` than the defaults."""
    from unlearn_jax.jsonfiles import read_json_object

    path = Path(root) / TEMPLATE_FILE
    if not path.is_file():
        return {}
    d = read_json_object(path, "prompt template")
    unknown = sorted(set(d) - {"template", "crop_start", "max_sequence_length"})
    if unknown:
        raise UnlearnError(f"{path}: unknown key {unknown[0]!r}; expected template, crop_start, max_sequence_length")
    out = {k: d[k] for k in ("template", "crop_start") if k in d}
    if "max_sequence_length" in d:
        out["max_length"] = d["max_sequence_length"]
    return out


class HunyuanText(TextSide):
    """A HunyuanVideo pipeline folder's text side (see the module docstring).

    template / crop_start / max_length: the pipeline call's `prompt_template` and `max_sequence_length`;
    None: the folder's `prompt_template.json` if it has one, else the pipeline's defaults. A template
    must hold one `{}` (the prompt)."""

    def __init__(self, pipeline_dir, *, template: str | None = None, crop_start: int | None = None,
                 max_length: int | None = None, cache=None):
        from unlearn_jax.checks import positive_int

        self.pipeline_dir = _folders(pipeline_dir)
        given = folder_template(self.pipeline_dir)
        template = given.get("template", DEFAULT_TEMPLATE) if template is None else template
        crop_start = given.get("crop_start", DEFAULT_CROP_START) if crop_start is None else crop_start
        max_length = given.get("max_length", MAX_LENGTH) if max_length is None else max_length
        if not isinstance(template, str) or template.count("{}") != 1:
            raise UnlearnError("the prompt template must be a string with exactly one {} (where the prompt goes)")
        if isinstance(crop_start, bool) or not isinstance(crop_start, int) or crop_start < 0:
            raise UnlearnError(f"crop_start = {crop_start!r} is invalid; expected an integer >= 0")
        self.template, self.crop_start = template, crop_start
        self.max_length = positive_int("max_length", max_length)
        self.cache = cache  # a `text_encoding.EncoderCache` (None: the module-level one)
        self._tokenizers = None

    # ---- tokenization ----------------------------------------------------------------------
    @property
    def tokenizers(self):
        if self._tokenizers is None:
            self._tokenizers = (_load_tokenizer(self.pipeline_dir / "tokenizer"),
                                _load_tokenizer(self.pipeline_dir / "tokenizer_2"))
        return self._tokenizers

    def _llama_inputs(self, prompts: Sequence[str], tokenizer=None):
        tok = tokenizer or self.tokenizers[0]
        out = tok([self.template.format(p) for p in prompts], max_length=self.crop_start + self.max_length,
                  padding="max_length", truncation=True, return_attention_mask=True, return_tensors="np")
        return np.asarray(out.input_ids, np.int32), np.asarray(out.attention_mask, np.int32)

    def _clip_inputs(self, prompts: Sequence[str], tokenizer=None):
        tok = tokenizer or self.tokenizers[1]
        out = tok(list(prompts), padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="np")
        return np.asarray(out.input_ids, np.int32)

    # ---- encoding ----------------------------------------------------------------------------
    def encode(self, prompts, *, dtype=None, mesh=None, batch_size: int = 8) -> dict:
        prompts = _check_prompts(prompts)
        if batch_size < 1:
            raise UnlearnError(f"batch_size must be >= 1, got {batch_size}")
        from unlearn_jax.text_encoding import DEFAULT_CACHE

        enc = (DEFAULT_CACHE if self.cache is None else self.cache).get(
            self.pipeline_dir, dtype=dtype, mesh=mesh, loader=LoadedEncoders,
            parts=(("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")))
        n, c = len(prompts), self.crop_start
        if not n:
            return {"text": np.zeros((0, self.max_length, enc.dim), np.float32),
                    "mask": np.zeros((0, self.max_length), np.int32),
                    "pooled": np.zeros((0, enc.pooled_dim), np.float32), "guidance": np.zeros((0,), np.float32)}
        ids, mask = self._llama_inputs(prompts, enc.tokenizer)
        clip_ids = self._clip_inputs(prompts, enc.tokenizer_2)
        bs = min(batch_size, n)
        text, pooled = [], []
        for start in range(0, n, bs):
            i, m, ci = ids[start:start + bs], mask[start:start + bs], clip_ids[start:start + bs]
            k = len(i)
            if k < bs:  # one compiled shape for every batch
                pad = lambda a: np.concatenate([a, np.repeat(a[:1], bs - k, 0)])  # noqa: E731
                i, m, ci = pad(i), pad(m), pad(ci)
            text.append(enc.llama(i, m)[:k, c:])
            pooled.append(enc.clip(ci)[:k])
        from unlearn_jax.families.hunyuan_video import DEFAULT_GUIDANCE, GUIDANCE_FACTOR

        return {"text": np.concatenate(text), "mask": mask[:, c:].copy(), "pooled": np.concatenate(pooled),
                "guidance": np.full((n,), GUIDANCE_FACTOR * DEFAULT_GUIDANCE, np.float32)}

    def fingerprint(self, dtype=None) -> str:
        from unlearn_jax.text_encoding import _dtype, _hash_safetensors, _weight_files

        h = hashlib.sha256(_FINGERPRINT_VERSION)
        h.update(repr((self.template, self.crop_start, self.max_length, CLIP_LENGTH, HIDDEN_LAYERS_TO_SKIP,
                       _dtype(dtype).name)).encode())
        for part in PARTS:
            folder = self.pipeline_dir / part
            for p in sorted(folder.iterdir()):
                if p.suffix == ".safetensors":
                    continue
                if p.is_file():
                    h.update(part.encode() + p.name.encode() + p.read_bytes())
            if part.startswith("text_encoder"):
                for w in _weight_files(folder):
                    _hash_safetensors(h, w)
        return h.hexdigest()

    # ---- the concept's positions -------------------------------------------------------------
    def concept_mask(self, prompts, phrases, fallback: str = "all") -> np.ndarray:
        """(N, max_length) bool: the tokens of each prompt's concept phrase among the positions the
        transformer sees (the template's tokens cropped). Matching as `prompts.concept_token_indices`
        (case-insensitive, word boundaries, a token counts if its span overlaps an occurrence), only
        inside the prompt's part of the templated text."""
        from unlearn_jax.prompts import _select, find_phrase_spans

        if fallback not in ("all", "none"):
            raise UnlearnError(f"unknown concept-token fallback {fallback!r}; use 'all' or 'none'")
        prompts = _check_prompts(prompts)
        phrases = [phrases] * len(prompts) if isinstance(phrases, str) else list(phrases)
        if len(phrases) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(phrases)} phrases")
        tok = self.tokenizers[0]
        head = self.template.index("{}")
        out = np.zeros((len(prompts), self.max_length), bool)
        for row, (prompt, phrase) in enumerate(zip(prompts, phrases)):
            text = self.template.format(prompt)
            enc = tok(text, max_length=self.crop_start + self.max_length, padding="max_length", truncation=True,
                      return_offsets_mapping=True, return_special_tokens_mask=True, return_attention_mask=True)
            offsets = [tuple(o) for o in enc["offset_mapping"]][self.crop_start:]
            special = enc["special_tokens_mask"][self.crop_start:]
            attn = enc["attention_mask"][self.crop_start:]
            # the prompt's own tokens: inside its span of the templated text, not special, not padding
            content = [bool(a) and not s and e > head and b < head + len(prompt)
                       for (b, e), s, a in zip(offsets, special, attn)]
            spans = [(head + s, head + e) for s, e in find_phrase_spans(prompt, phrase)]
            chosen = _select(offsets, content, spans)
            if not chosen and fallback == "all":
                chosen = [i for i, c in enumerate(content) if c]
            out[row, chosen] = True
        return out
