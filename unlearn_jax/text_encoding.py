"""Prompt embeddings from a pipeline folder's T5 text encoder, as CogVideoX's pipeline computes them.

`encode_prompts` reproduces `CogVideoXPipeline.encode_prompt` (`_get_t5_prompt_embeds`): the
pipeline's own tokenizer (`tokenizer/`), padding to `max_length` with truncation and the end
token added, and the encoder run on the token ids alone: the pipeline passes no attention mask,
so the padding tokens take part in attention, and so they do here.

`encoder_fingerprint` identifies everything the embeddings depend on (weights, encoder config,
tokenizer files, max length), for caches of embeddings to key on.

Loaded encoders are kept in an explicit `EncoderCache` (by default one entry, as a T5-XXL is
large), so that repeated calls in one process do not reload the weights.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax.errors import UnlearnError
from unlearn_jax.families.base import TextSide

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 226  # CogVideoX: the transformer's max_text_seq_length
_FINGERPRINT_VERSION = b"unlearn-jax/t5-prompt-embeddings/v1"
_SAMPLE_BLOCKS = 16  # content hash: this many evenly spaced blocks of every weights file
_SAMPLE_BLOCK_BYTES = 1 << 16


# --------------------------------------------------------------------------------------------
# Pipeline folder layout
# --------------------------------------------------------------------------------------------
def _folders(pipeline_dir: str | os.PathLike) -> tuple[Path, Path, Path]:
    root = Path(pipeline_dir)
    if not root.is_dir():
        raise UnlearnError(f"{root}: no such folder; point to a pipeline folder with tokenizer/ and text_encoder/")
    tok, enc = root / "tokenizer", root / "text_encoder"
    for sub in (tok, enc):
        if not sub.is_dir():
            raise UnlearnError(f"{root}: no {sub.name}/ folder; point to a pipeline folder "
                               f"with tokenizer/ and text_encoder/")
    return root, tok, enc


def resolve_max_length(pipeline_dir: str | os.PathLike, max_length: int | None = None) -> int:
    """`max_length` if given, else the transformer config's `max_text_seq_length`, else 226."""
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise UnlearnError(f"max_length must be a positive integer, got {max_length!r}")
        return int(max_length)
    cfg_path = Path(pipeline_dir) / "transformer" / "config.json"
    if cfg_path.exists():
        try:
            value = json.loads(cfg_path.read_text()).get("max_text_seq_length")
        except (OSError, ValueError, AttributeError) as e:
            raise UnlearnError(f"{cfg_path}: not a readable JSON config ({e})") from None
        if value is not None:
            return resolve_max_length(pipeline_dir, value)
    return DEFAULT_MAX_LENGTH


def _dtype(dtype) -> jnp.dtype:
    from unlearn_jax.dtypes import as_dtype

    return jnp.dtype(as_dtype("float32" if dtype is None else dtype))


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------
def _weight_files(enc: Path) -> list[Path]:
    return sorted(p for p in enc.iterdir() if p.is_file() and (p.name.endswith(".safetensors")
                                                                 or p.name.endswith(".safetensors.index.json")
                                                                 or p.name == "config.json"))


def _hash_safetensors(h, path: Path):
    """Header in full, plus a sampled hash of the data (every byte of a small file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        header = f.read(n) if 0 < n <= 100_000_000 else b""
        h.update(head + header)
        start = 8 + len(header)
        data = size - start
        if data <= _SAMPLE_BLOCKS * _SAMPLE_BLOCK_BYTES:
            h.update(f.read())
            return
        step = (data - _SAMPLE_BLOCK_BYTES) / (_SAMPLE_BLOCKS - 1)
        for i in range(_SAMPLE_BLOCKS):
            f.seek(start + int(i * step))
            h.update(f.read(_SAMPLE_BLOCK_BYTES))


def encoder_fingerprint(pipeline_dir: str | os.PathLike, max_length: int | None = None, *, dtype=None) -> str:
    """A hex digest of everything the prompt embeddings depend on.

    Covers the text encoder's config.json, safetensors index and safetensors files (name, size,
    full header with every tensor's name/shape/dtype/offsets, and the data: all of it for small
    files, 16 evenly spaced 64 KiB blocks of large ones), every tokenizer file in full, the
    resolved max length and, if given, the compute dtype. Independent of paths and mtimes, so a
    copied pipeline folder keeps its fingerprint.
    """
    _, tok, enc = _folders(pipeline_dir)
    h = hashlib.sha256(_FINGERPRINT_VERSION)
    h.update(f"|max_length={resolve_max_length(pipeline_dir, max_length)}".encode())
    if dtype is not None:
        h.update(f"|dtype={_dtype(dtype).name}".encode())
    for p in _weight_files(enc):
        h.update(f"|text_encoder/{p.name}:{p.stat().st_size}:".encode())
        if p.name.endswith(".safetensors"):
            _hash_safetensors(h, p)
        else:
            h.update(p.read_bytes())
    for p in sorted(q for q in tok.iterdir() if q.is_file() and not q.name.startswith(".")):
        h.update(f"|tokenizer/{p.name}:{p.stat().st_size}:".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Loaded encoders
# --------------------------------------------------------------------------------------------
class LoadedEncoder:
    """A pipeline's tokenizer and text encoder, with the encoder's jitted forward."""

    def __init__(self, pipeline_dir: str | os.PathLike, dtype=None, mesh: jax.sharding.Mesh | None = None):
        from unlearn_jax.models.t5 import load_text_encoder

        _, tok, enc = _folders(pipeline_dir)
        self.tokenizer = _load_tokenizer(tok)
        self.dtype = _dtype(dtype)
        self.mesh = mesh
        model = load_text_encoder(enc, dtype=self.dtype, mesh=mesh)
        self.d_model, self.vocab_size = model.config.d_model, model.config.vocab_size
        self.graphdef, self.state = nnx.split(model)
        graphdef = self.graphdef

        @jax.jit
        def forward(state, input_ids, attention_mask):
            return nnx.merge(graphdef, state)(input_ids, attention_mask)

        self._forward = forward

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Last hidden states (N, L, d_model) float32; `attention_mask` (N, L) as transformers takes it
        (CogVideoX's pipeline passes none: padding tokens take part in attention)."""
        ids = np.asarray(input_ids, np.int32)
        mask = None if attention_mask is None else np.asarray(attention_mask, bool)
        if self.mesh is not None:
            repl = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            ids = jax.device_put(ids, repl)
            mask = None if mask is None else jax.device_put(mask, repl)
        return np.asarray(jax.device_get(self._forward(self.state, ids, mask)), np.float32)


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; the user's fix is the same
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnlearnError(f"{folder}: cannot load the tokenizer ({msg})") from None


def _folder_signature(enc: Path, tok: Path) -> tuple:
    """Cheap identity of the files (name, size, mtime): a rewritten folder is loaded again."""
    out = []
    for sub in (enc, tok):
        for p in sorted(sub.iterdir()):
            if p.is_file():
                st = p.stat()
                out.append((sub.name, p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


class EncoderCache:
    """Loaded encoders by (pipeline folder, dtype, mesh, loader), least recently used dropped past
    `max_entries`. The loader is the family's (`LoadedEncoder`, the T5 of CogVideoX and Wan, by default);
    `parts` are the (encoder, tokenizer) sub-folders whose files identify a loaded entry."""

    def __init__(self, max_entries: int = 1):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[tuple, object] = collections.OrderedDict()

    def get(self, pipeline_dir: str | os.PathLike, dtype=None, mesh: jax.sharding.Mesh | None = None, *,
            loader=None, parts=(("text_encoder", "tokenizer"),)):
        if loader is None:
            root, _, _ = _folders(pipeline_dir)
            loader = LoadedEncoder
        else:
            root = Path(pipeline_dir)
        sig = sum((_folder_signature(root / e, root / t) for e, t in parts), ())
        key = (str(root.resolve()), _dtype(dtype).name, mesh, f"{loader.__module__}.{loader.__qualname__}", sig)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        # drop stale entries of the same folder/dtype/mesh/loader before loading a new one
        for k in [k for k in self._entries if k[:4] == key[:4]]:
            del self._entries[k]
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
        entry = loader(root, dtype=dtype, mesh=mesh)
        self._entries[key] = entry
        return entry

    def clear(self):
        self._entries.clear()

    def __len__(self):
        return len(self._entries)


DEFAULT_CACHE = EncoderCache(max_entries=1)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------
def tokenize_prompts(tokenizer, prompts: Sequence[str], max_length: int) -> np.ndarray:
    """(N, max_length) int32 token ids, as CogVideoX's pipeline tokenizes (and warns on truncation)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="np").input_ids
    full = tokenizer(list(prompts), add_special_tokens=True).input_ids
    cut = [i for i, t in enumerate(full) if len(t) > max_length]
    if cut:
        log.warning("%d prompt(s) longer than max_length=%d tokens were truncated (first: prompt %d)",
                    len(cut), max_length, cut[0])
    return np.asarray(ids, np.int32)


def encode_prompts(pipeline_dir: str | os.PathLike, prompts: str | Sequence[str], *, max_length: int | None = None,
                   dtype=None, mesh: jax.sharding.Mesh | None = None, batch_size: int = 8,
                   cache: EncoderCache | None = None) -> np.ndarray:
    """(N, max_length, d_model) float32 prompt embeddings, equal to `CogVideoXPipeline.encode_prompt`.

    `max_length` defaults to the pipeline transformer's `max_text_seq_length` (226 for
    CogVideoX). `dtype` is the encoder's compute dtype (float32 default, or bfloat16); the result
    is float32 either way. Prompts are encoded `batch_size` at a time (the last batch padded, so
    one compiled shape serves every batch). `cache` (default: a module-level one-entry cache)
    keeps the loaded encoder between calls.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise UnlearnError(f"prompts must be strings; prompt {bad[0]} is {type(prompts[bad[0]]).__name__}")
    if batch_size < 1:
        raise UnlearnError(f"batch_size must be >= 1, got {batch_size}")
    length = resolve_max_length(pipeline_dir, max_length)
    encoder = (DEFAULT_CACHE if cache is None else cache).get(pipeline_dir, dtype=dtype, mesh=mesh)
    if not prompts:
        return np.zeros((0, length, encoder.d_model), np.float32)
    ids = tokenize_prompts(encoder.tokenizer, prompts, length)
    bs = min(batch_size, len(prompts))
    out = []
    for start in range(0, len(ids), bs):
        chunk = ids[start:start + bs]
        n = len(chunk)
        if n < bs:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], bs - n, axis=0)])
        out.append(encoder(chunk)[:n])
    return np.concatenate(out)


class T5Text(TextSide):
    """A pipeline's T5 text side as `CogVideoXPipeline` uses it: the prompt embeddings (N, L, D),
    padded to `max_length`, no attention mask (the conditioning pytree is that one array)."""

    def __init__(self, pipeline_dir: str | os.PathLike, max_length: int | None = None,
                 cache: EncoderCache | None = None):
        self.pipeline_dir = _folders(pipeline_dir)[0]
        self.max_length = resolve_max_length(self.pipeline_dir, max_length)
        self.cache = cache
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self.pipeline_dir / "tokenizer")
        return self._tokenizer

    def encode(self, prompts, *, dtype=None, mesh=None, batch_size: int = 8) -> np.ndarray:
        return encode_prompts(self.pipeline_dir, prompts, max_length=self.max_length, dtype=dtype, mesh=mesh,
                              batch_size=batch_size, cache=self.cache)

    def fingerprint(self, dtype=None) -> str:
        return encoder_fingerprint(self.pipeline_dir, self.max_length, dtype=dtype)

    def concept_mask(self, prompts, phrases, fallback: str = "all") -> np.ndarray:
        from unlearn_jax.prompts import concept_token_mask

        return concept_token_mask(self.tokenizer, list(prompts), phrases, self.max_length, fallback=fallback)

    def token_encoder(self, dtype=None) -> "TokenEncoder":
        """This text side as a differentiable function of its tokens (red-team attacks)."""
        return TokenEncoder(self, dtype=dtype, masked=False)


class TokenEncoder:
    """A T5 text side as a function of (relaxed) tokens: `encode(weights (N, L, V)) -> conditioning`, equal
    to the text side's `encode` for one-hot weights of its own token ids; differentiable in the weights.

    masked=False: CogVideoX's pipeline (no attention mask, padding takes part); True: Wan's (the mask, the
    states zeroed after each prompt's length)."""

    def __init__(self, text: "T5Text", dtype=None, masked: bool = False):
        enc = (DEFAULT_CACHE if text.cache is None else text.cache).get(text.pipeline_dir, dtype=dtype)
        self.text, self.tokenizer, self.masked = text, enc.tokenizer, masked
        self.max_length, self.vocab_size = text.max_length, enc.vocab_size
        self._graphdef, self._state = enc.graphdef, enc.state
        specials = set(getattr(self.tokenizer, "all_special_ids", ()) or ())
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._encode_ids = None
        # the tokens an attack may choose: the tokenizer's own vocabulary (the checkpoint's embedding table
        # can be larger), no special tokens, and with a SentencePiece vocabulary only word-initial pieces
        # ("▁word"): a prompt typed from those tokenizes back to the same tokens, where a lone "n" or "g"
        # piece would join its neighbour
        n = min(self.vocab_size, len(self.tokenizer))
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(n)))
        words = [i for i, t in enumerate(pieces) if i not in specials and isinstance(t, str) and t.startswith("▁")
                 and len(t) > 1]
        self.allowed = np.asarray(words or [i for i in range(n) if i not in specials], np.int32)

    def ids(self, prompts) -> np.ndarray:
        """(N, L) int32: the prompts tokenized as the pipeline does."""
        prompts = [wan_prompt_clean(p) for p in prompts] if self.masked else list(prompts)
        return tokenize_prompts(self.tokenizer, prompts, self.max_length)

    def length(self, ids) -> np.ndarray:
        """(N,) the tokens before each row's end token (where adversarial tokens are inserted)."""
        ids = np.asarray(ids)
        is_eos = ids == self.eos_id
        return np.where(is_eos.any(1), is_eos.argmax(1), ids.shape[1]).astype(np.int32)

    def decode(self, tokens) -> str:
        return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True).strip()

    def _mask(self, ids):
        """(N, L) bool: each row's tokens through its end token (Wan's attention mask)."""
        is_eos = (ids == self.eos_id).astype(jnp.int32)
        return jnp.cumsum(is_eos, axis=1) - is_eos == 0

    def encode_ids(self, ids):
        """(N, L) int token ids -> (N, L, D) float32: what `encode` gives for their one-hot rows, without
        building them (a real vocabulary makes one-hot rows of every position too large)."""
        if self._encode_ids is None:
            graphdef, masked = self._graphdef, self.masked

            @jax.jit
            def run(state, ids):
                model = nnx.merge(graphdef, state)
                if not masked:
                    return model(ids, None).astype(jnp.float32)
                mask = self._mask(ids)
                return jnp.where(mask[..., None], model(ids, mask).astype(jnp.float32), 0.0)

            self._encode_ids = run
        return self._encode_ids(self._state, jnp.asarray(ids, jnp.int32))

    def encode(self, weights):
        """weights (N, L, V) float (one-hot rows give the text side's own embeddings) -> (N, L, D) float32."""
        model = nnx.merge(self._graphdef, self._state)
        if not self.masked:
            return model(None, None, token_weights=weights)
        mask = self._mask(jnp.argmax(weights, -1))
        out = model(None, mask, token_weights=weights)
        return jnp.where(mask[..., None], out, 0.0)


# --------------------------------------------------------------------------------------------
# Wan's text side: UMT5 with the attention mask, embeddings cut at each prompt's length
# --------------------------------------------------------------------------------------------
WAN_MAX_LENGTH = 512  # WanPipeline's max_sequence_length


def wan_prompt_clean(text: str) -> str:
    """WanPipeline's `prompt_clean`: ftfy's fix_text (when installed, as there), HTML entities
    unescaped twice, whitespace runs collapsed."""
    import html
    import re

    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # diffusers skips it too when ftfy is missing
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def encode_length(longest: int, max_length: int, smallest: int = 16) -> int:
    """The positions a masked encoder runs over for a batch whose longest prompt has `longest`
    tokens: the next power of two (at least `smallest`), at most `max_length`."""
    n = smallest
    while n < longest:
        n *= 2
    return min(n, max_length)


class WanT5Text(T5Text):
    """A Wan pipeline's UMT5 as `WanPipeline.encode_prompt` uses it: the cleaned prompt tokenized to
    512 tokens with the mask, the encoder run with the mask, the hidden states kept up to each
    prompt's length and zero after it. The conditioning is that (N, 512, 4096) array."""

    def __init__(self, pipeline_dir: str | os.PathLike, max_length: int = WAN_MAX_LENGTH,
                 cache: EncoderCache | None = None):
        super().__init__(pipeline_dir, max_length, cache)

    def encode(self, prompts, *, dtype=None, mesh=None, batch_size: int = 8) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise UnlearnError(f"prompts must be strings; prompt {bad[0]} is {type(prompts[bad[0]]).__name__}")
        if batch_size < 1:
            raise UnlearnError(f"batch_size must be >= 1, got {batch_size}")
        encoder = (DEFAULT_CACHE if self.cache is None else self.cache).get(self.pipeline_dir, dtype=dtype, mesh=mesh)
        if not prompts:
            return np.zeros((0, self.max_length, encoder.d_model), np.float32)
        tok = encoder.tokenizer([wan_prompt_clean(p) for p in prompts], padding="max_length",
                                max_length=self.max_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="np")
        ids, mask = np.asarray(tok.input_ids, np.int32), np.asarray(tok.attention_mask, bool)
        bs = min(batch_size, len(prompts))
        out = []
        for start in range(0, len(ids), bs):
            i, m = ids[start:start + bs], mask[start:start + bs]
            n = len(i)
            if n < bs:  # one compiled shape for every batch
                i, m = np.concatenate([i, np.repeat(i[:1], bs - n, 0)]), np.concatenate([m, np.repeat(m[:1], bs - n, 0)])
            # With the mask no valid position attends to a padded one (and T5's position bias is
            # relative), so the encoder runs over the batch's longest prompt only, rounded up to a
            # power of two (few compiled lengths); the rest is the zeros the pipeline puts there.
            length = encode_length(int(m.sum(axis=1).max()), self.max_length)
            e = np.zeros((bs, self.max_length, encoder.d_model), np.float32)
            e[:, :length] = encoder(i[:, :length], m[:, :length])
            out.append(e[:n])
        emb = np.concatenate(out)
        # the pipeline keeps each prompt's first seq_len states and pads with zeros (right padding: the mask)
        return np.where(mask[..., None], emb, np.float32(0.0))

    def fingerprint(self, dtype=None) -> str:
        # a tag of its own: the same encoder gives other embeddings than CogVideoX's unmasked path
        return hashlib.sha256(b"wan-umt5-masked|" + encoder_fingerprint(self.pipeline_dir, self.max_length,
                                                                         dtype=dtype).encode()).hexdigest()

    def token_encoder(self, dtype=None) -> "TokenEncoder":
        # the mask is each prompt's tokens through its end token (right padding); the pipeline's prompt
        # cleaning is applied to a prompt's text, so attack prompts are cleaned before they are tokenized
        return TokenEncoder(self, dtype=dtype, masked=True)

    def concept_mask(self, prompts, phrases, fallback: str = "all") -> np.ndarray:
        phrases = [phrases] if isinstance(phrases, str) else list(phrases)
        return super().concept_mask([wan_prompt_clean(p) for p in prompts], [wan_prompt_clean(p) for p in phrases],
                                    fallback)
