"""The toy world: generator, captions, detector, and the bundled toy text-to-video model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from unlearn_jax.toy import world as W
from unlearn_jax.toy.detector import accuracy, degrade, detect, detect_batch
from repo_paths import TOY_WORLD

ASSET = TOY_WORLD


# --------------------------------------------------------------------------------------------
# Generator and captions
# --------------------------------------------------------------------------------------------
def test_recipe_is_deterministic():
    world = W.World()
    v1, c1, a1 = world.batch(seed=3, n=6)
    v2, c2, a2 = world.batch(seed=3, n=6)
    np.testing.assert_array_equal(v1, v2)
    assert c1 == c2 and a1 == a2
    v3, c3, _ = world.batch(seed=4, n=6)
    assert not np.array_equal(v1, v3) and c1 != c3
    cfg = world.config
    assert v1.shape == (6, cfg.frames, 3, cfg.size, cfg.size) and v1.dtype == np.float32
    assert v1.min() >= 0.0 and v1.max() <= 1.0


def _concept_words(split):
    return {w: (a, v) for a in W.ATTRIBUTES for v in W.VALUES[a] for w in W.concept_words(a, v, split)}


def test_captions_name_their_attributes():
    world = W.World()
    train_words, held_words = _concept_words("train"), _concept_words("heldout")
    vocab = set(W.vocabulary())
    seen_omitted = False
    for ex in world.recipe(seed=0, n=300):
        words = ex.caption.split()
        assert set(words) <= vocab, ex.caption
        assert not set(words) & set(held_words), f"held-out synonym in a training caption: {ex.caption}"
        named = {train_words[w] for w in words if w in train_words}
        # every concept word in the caption is the video's own attribute value ...
        assert all(ex.attributes[a] == v for a, v in named), (ex.caption, ex.attributes)
        # ... and exactly the attributes marked as named are named
        assert {a for a, _ in named} == {a for a in W.ATTRIBUTES if ex.named[a]}, (ex.caption, ex.named)
        seen_omitted |= not all(ex.named.values())
    assert seen_omitted
    rng = np.random.default_rng(0)
    for _ in range(50):
        attrs = world.sample_attributes(rng)
        text = W.caption(attrs, rng, "heldout")
        named = {held_words[w] for w in text.split() if w in held_words}
        assert {a for a, _ in named} == set(W.ATTRIBUTES) and all(attrs[a] == v for a, v in named), text


def test_every_value_has_train_and_heldout_synonyms():
    for attr in W.ATTRIBUTES:
        for value in W.VALUES[attr]:
            train, held = W.synonyms(attr, value, "train"), W.synonyms(attr, value, "heldout")
            assert len(train) >= 3 and len(held) >= 1 and not set(train) & set(held)
            assert W.concept_words(attr, value, "heldout")


def test_video_shows_its_attributes():
    world = W.World()
    rng = np.random.default_rng(1)
    ex = world.example(rng, attributes={"colour": "red", "shape": "square", "motion": "right"})
    bg = np.asarray(world.config.background)[:, None, None]
    cover = np.linalg.norm(ex.video - bg[None], axis=1)  # (F, H, W), proportional to the coverage
    obj = cover > 0.3
    xs = [(f * np.arange(f.shape[1])).sum() / f.sum() for f in cover]
    assert np.allclose(np.diff(xs), world.config.speed, atol=0.05), xs  # moves right at its speed
    pix = ex.video.transpose(0, 2, 3, 1)[obj]
    assert pix[:, 0].mean() > 0.8 and pix[:, 1:].mean() < 0.2  # red


# --------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise,blur", [(0.0, 0.0), (0.05, 0.6), (0.08, 0.9)])
def test_detector_accuracy_on_ground_truth(noise, blur):
    videos, _, attrs = W.World().batch(seed=11, n=240)
    rng = np.random.default_rng(0)
    if noise or blur:
        videos = [degrade(v, rng, noise=noise, blur=blur) for v in videos]
    acc = accuracy(detect_batch(videos), attrs)
    assert min(acc[a] for a in W.ATTRIBUTES) >= 0.95, acc


def test_detector_reports_empty_video():
    v = np.broadcast_to(np.asarray(W.WorldConfig().background, np.float32)[None, :, None, None], (5, 3, 24, 24))
    assert detect(v) == {"colour": "none", "shape": "none", "motion": "none"}


# --------------------------------------------------------------------------------------------
# The bundled toy model (assets/toy_world)
# --------------------------------------------------------------------------------------------


def test_bundled_folder_layout_and_size():
    for sub in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer",
                "scheduler/scheduler_config.json", "model_index.json", "toy_world.json"):
        assert (ASSET / sub).exists(), sub
    size = sum(p.stat().st_size for p in ASSET.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, size
    info = json.loads((ASSET / "toy_world.json").read_text())
    assert info["world"]["config"] == W.WorldConfig().to_dict() | {"background": list(W.WorldConfig().background)}
    assert info["training"]["command"] and info["data_recipe"]


def test_bundled_tokenizer_is_word_level_and_encoder_matches_training():
    from unlearn_jax.text_encoding import _load_tokenizer, encode_prompts, tokenize_prompts
    from unlearn_jax.toy import model as toy_model

    tok = _load_tokenizer(ASSET / "tokenizer")
    for w in W.vocabulary():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    info = json.loads((ASSET / "toy_world.json").read_text())
    mcfg = toy_model.ToyModelConfig(**info["model"])
    prompts = ["a red circle moving right", "there is a cobalt tile heading northward", ""]
    emb = encode_prompts(ASSET, prompts)
    assert emb.shape == (3, mcfg.max_text_seq_length, mcfg.text_dim)
    # the saved encoder is the one training used
    built = toy_model.build_text_encoder(mcfg, tok, W.concept_word_groups(), seed=info["training"]["seed"])
    ref = np.asarray(built(tokenize_prompts(tok, prompts, mcfg.max_text_seq_length)))
    np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-5)


def test_bundled_text_encoder_loads_in_transformers():
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, T5EncoderModel

    from unlearn_jax.text_encoding import encode_prompts

    enc = T5EncoderModel.from_pretrained(ASSET / "text_encoder").eval()
    tok = AutoTokenizer.from_pretrained(ASSET / "tokenizer")
    prompts = ["a golden wedge falling downward", "video of a lime ball"]
    length = json.loads((ASSET / "transformer" / "config.json").read_text())["max_text_seq_length"]
    ids = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = enc(ids).last_hidden_state.numpy()
    np.testing.assert_allclose(encode_prompts(ASSET, prompts), ref, rtol=1e-4, atol=1e-4)


def test_bundled_model_generates_the_prompted_colour():
    """A short generation through the project's sampler; the prompted colour comes out most times."""
    from unlearn_jax import load_transformer
    from unlearn_jax.toy.evaluate import EvalConfig, generate, load_pipeline

    model, sched, world_cfg, encode = load_pipeline(ASSET)
    assert model is not None and load_transformer(ASSET).config.in_channels == 3
    rng = np.random.default_rng(5)
    colours = list(W.PALETTE) * 2
    prompts = []
    for c in colours:
        attrs = W.World().sample_attributes(rng)
        attrs["colour"] = c
        prompts.append(W.caption(attrs, rng))
    cfg = EvalConfig(num_steps=12, guidance_scale=5.0, batch_size=len(prompts), seed=1)
    videos = generate(model, sched, world_cfg, encode, prompts, cfg)
    assert videos.shape == (len(prompts), world_cfg.frames, 3, world_cfg.size, world_cfg.size)
    assert np.all(np.isfinite(videos))
    hits = sum(detect(v)["colour"] == c for v, c in zip(videos, colours))
    assert hits >= 6, f"{hits}/8 videos show the prompted colour"
