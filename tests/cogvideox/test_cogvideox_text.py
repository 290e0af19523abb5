"""encode_prompts against CogVideoXPipeline.encode_prompt, the encoder fingerprint, the encoder cache."""
from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers_text import WORDS, build_tiny_pipeline
from unlearn_jax.errors import UnlearnError
from unlearn_jax.text_encoding import EncoderCache, encode_prompts, encoder_fingerprint, resolve_max_length

MAX_LEN = 16
PROMPTS = [
    "a red dog running in the forest",
    "",  # the unconditional prompt
    "zebra",  # letters outside the tokenizer's alphabet -> <unk>
    " ".join(WORDS[:40]),  # far longer than MAX_LEN tokens: truncated
    "a happy child playing with a small boat on the river at night",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "cogvideox", max_text_seq_length=MAX_LEN)


def _reference(folder, enc, prompts, max_length):
    """diffusers' CogVideoXPipeline.encode_prompt on the folder's own tokenizer and encoder."""
    from diffusers import CogVideoXPipeline
    from transformers import T5Tokenizer

    tok = T5Tokenizer.from_pretrained(folder / "tokenizer")
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=enc, vae=None, transformer=None, scheduler=None)
    with torch.no_grad():
        emb, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=max_length,
                                    device=torch.device("cpu"), dtype=torch.float32)
    return emb.numpy()


def test_matches_pipeline_encode_prompt(pipeline):
    folder, tok, enc = pipeline
    assert len(tok(PROMPTS[3]).input_ids) > MAX_LEN
    cache = EncoderCache()
    got = encode_prompts(folder, PROMPTS, batch_size=2, cache=cache)  # max length from transformer/config.json
    want = _reference(folder, enc, PROMPTS, MAX_LEN)
    assert got.shape == (len(PROMPTS), MAX_LEN, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # one prompt at a time and a batch give the same rows
    np.testing.assert_allclose(encode_prompts(folder, PROMPTS[1], cache=cache)[0], want[1], atol=1e-5, rtol=0)
    # an explicit max length overrides the config
    short = encode_prompts(folder, PROMPTS, max_length=9, cache=cache)
    np.testing.assert_allclose(short, _reference(folder, enc, PROMPTS, 9), atol=1e-5, rtol=0)
    assert len(cache) == 1
    assert encode_prompts(folder, [], cache=cache).shape == (0, MAX_LEN, 32)


def test_bf16_close_to_fp32(pipeline):
    folder, _, _ = pipeline
    cache = EncoderCache()
    ref = encode_prompts(folder, PROMPTS[:2], cache=cache)
    got = encode_prompts(folder, PROMPTS[:2], dtype=jnp.bfloat16, cache=cache)
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


def test_max_length_default(tmp_path):
    (tmp_path / "transformer").mkdir()
    assert resolve_max_length(tmp_path) == 226
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"max_text_seq_length": 77}))
    assert resolve_max_length(tmp_path) == 77
    assert resolve_max_length(tmp_path, 12) == 12
    with pytest.raises(UnlearnError):
        resolve_max_length(tmp_path, 0)


def test_cache_reuses_and_evicts(pipeline, tmp_path):
    folder, _, _ = pipeline
    cache = EncoderCache(max_entries=1)
    first = cache.get(folder)
    assert cache.get(folder) is first
    bf16 = cache.get(folder, dtype="bfloat16")
    assert bf16 is not first and len(cache) == 1
    assert cache.get(folder) is not first  # evicted, loaded again
    # a rewritten folder is not served from the cache
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    cache2 = EncoderCache(max_entries=2)
    a = cache2.get(copy)
    cfg = copy / "text_encoder" / "config.json"
    cfg.write_text(cfg.read_text() + "\n")
    assert cache2.get(copy) is not a and len(cache2) == 1
    cache.clear()
    assert len(cache) == 0


def test_fingerprint(pipeline, tmp_path):
    folder, _, _ = pipeline
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    fp = encoder_fingerprint(folder, MAX_LEN)
    assert fp == encoder_fingerprint(copy, MAX_LEN) == encoder_fingerprint(folder)  # default: config's 16
    assert fp != encoder_fingerprint(folder, MAX_LEN + 1)
    assert fp != encoder_fingerprint(folder, MAX_LEN, dtype="bfloat16")

    # one weight byte changed, same size and mtime
    weights = copy / "text_encoder" / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = encoder_fingerprint(copy, MAX_LEN)
    assert changed != fp

    # a tokenizer file changed
    shutil.copytree(folder, tmp_path / "copy2")
    tj = tmp_path / "copy2" / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(tj.read_text())
    cfg["model_max_length"] = 12345
    tj.write_text(json.dumps(cfg))
    assert encoder_fingerprint(tmp_path / "copy2", MAX_LEN) not in (fp, changed)


def test_large_file_fingerprint_sees_header_and_sampled_data(tmp_path):
    from unlearn_jax.conversion import write_safetensors

    root = tmp_path / "p"
    (root / "tokenizer").mkdir(parents=True)
    (root / "text_encoder").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    arr = np.zeros((1 << 20,), np.float32)  # 4 MiB: sampled, not hashed in full
    path = root / "text_encoder" / "model.safetensors"
    write_safetensors(path, {"w": arr})
    fp = encoder_fingerprint(root, 8)
    arr[0] = 1.0  # first data block is always sampled
    write_safetensors(path, {"w": arr})
    assert encoder_fingerprint(root, 8) != fp
    write_safetensors(path, {"v": np.zeros((1 << 20,), np.float32)})  # renamed tensor: header differs
    assert encoder_fingerprint(root, 8) != fp


def test_user_errors(tmp_path, pipeline):
    with pytest.raises(UnlearnError, match="tokenizer/"):
        encode_prompts(tmp_path, ["a dog"])
    with pytest.raises(UnlearnError, match="no such folder"):
        encode_prompts(tmp_path / "nope", ["a dog"])
    folder, _, _ = pipeline
    with pytest.raises(UnlearnError, match="prompt 1"):
        encode_prompts(folder, ["a dog", 3], cache=EncoderCache())
