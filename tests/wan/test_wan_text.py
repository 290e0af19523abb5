"""Wan's text side equals `WanPipeline.encode_prompt`: cleaned prompts, UMT5 run with the mask, the states
cut at each prompt's length and zero-padded; its concept positions and fingerprint."""
import numpy as np
import pytest
import torch

from helpers_text import build_tiny_pipeline
from unlearn_jax.text_encoding import EncoderCache, T5Text, WanT5Text, wan_prompt_clean

PROMPTS = ["a red cat   on a  sofa", "the dog", "a blue &amp; green bird flying over the red cat and a dog on a sofa", ""]
LENGTH = 19  # odd, and shorter than the longest prompt (truncation)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder, tok, enc = build_tiny_pipeline(tmp_path_factory.mktemp("wan") / "pipe", max_text_seq_length=None,
                                           variant="umt5")
    return folder, tok, enc


def test_wan_text_equals_the_pipelines_encode_prompt(pipe):
    from diffusers import WanPipeline

    folder, tok, enc = pipe
    ref_pipe = WanPipeline(tokenizer=tok, text_encoder=enc, transformer=None, vae=None, scheduler=None)
    with torch.no_grad():
        want, _ = ref_pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=LENGTH,
                                         device=torch.device("cpu"), dtype=torch.float32)
    text = WanT5Text(folder, max_length=LENGTH, cache=EncoderCache())
    got = text.encode(PROMPTS, batch_size=3)  # batches of 3: the last one padded
    assert got.shape == tuple(want.shape) == (4, LENGTH, enc.config.d_model)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
    lens = (np.abs(got).sum(-1) > 0).sum(1)
    assert lens[0] < lens[2] == LENGTH and np.all(got[1, lens[1]:] == 0)  # cut and zero-padded, as there
    # the masked encoder differs from CogVideoX's unmasked path, and so does the fingerprint
    plain = T5Text(folder, max_length=LENGTH, cache=text.cache).encode(PROMPTS[:1])
    assert np.abs(plain[0] - got[0]).max() > 1e-3
    assert text.fingerprint() != T5Text(folder, max_length=LENGTH).fingerprint()


def test_wan_concept_positions_follow_the_cleaned_prompt(pipe):
    folder, _, _ = pipe
    text = WanT5Text(folder, max_length=LENGTH)
    assert wan_prompt_clean("  a &amp;amp;  b\n c ") == "a & b c"
    mask = text.concept_mask(["a   red cat on a sofa"], ["red  cat"])
    ids = text.tokenizer(["a red cat on a sofa"]).input_ids[0]
    marked = [ids[i] for i in np.flatnonzero(mask[0])]
    words = text.tokenizer.decode(marked)
    assert mask.shape == (1, LENGTH) and marked
    assert "red" in words and "cat" in words and "sofa" not in words and "on" not in words.split()
