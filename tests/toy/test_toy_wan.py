"""The Wan-architecture toy model (assets/toy_world_wan): read through the Wan family, sampled, erased.

The folder is a `WanPipeline` layout (no vae/: pixels); the same toy world, the same frozen text
encoder as the CogVideoX toy, encoded the Wan way. The erasure test runs the fixed-step recipe
(configs/toy_world/fixed_steps.py) on the Wan toy cut short and judges it on two concepts.
"""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from unlearn_jax import families
from unlearn_jax.toy import evaluate as E
from unlearn_jax.toy import model as M
from unlearn_jax.toy import train as T
from unlearn_jax.toy.world import vocabulary
from repo_paths import ROOT, TOY_WORLD

WAN_TOY = ROOT / "assets" / "toy_world_wan"


def test_wan_toy_folder_is_a_wan_pipeline_read_by_the_wan_family():
    fam = families.of_folder(WAN_TOY)
    assert fam.name == "wan"
    fam.check_folder(WAN_TOY)
    index = json.loads((WAN_TOY / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["vae"] == [None, None]
    assert not (WAN_TOY / "vae").exists()
    info = M.read_world_info(WAN_TOY)
    assert info["model"]["arch"] == "wan"
    config = json.loads((WAN_TOY / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel" and config["in_channels"] == config["out_channels"] == 3
    # the text length the model was trained at is the one the family encodes at
    text = fam.text(WAN_TOY)
    assert text.max_length == config["max_text_seq_length"] == info["model"]["max_text_seq_length"]
    M.check_text_length(WAN_TOY, info["model"]["max_text_seq_length"])
    with pytest.raises(Exception, match="trained with 12 text positions"):
        M.check_text_length(WAN_TOY, 12)
    # the same frozen "pretrained" encoder and tokenizer vocabulary as the CogVideoX toy
    assert (WAN_TOY / "text_encoder" / "model.safetensors").read_bytes() == \
        (TOY_WORLD / "text_encoder" / "model.safetensors").read_bytes()
    model, sched, world_cfg, _ = E.load_pipeline(WAN_TOY)
    assert sched.kind == "unipc" and sched.flow_shift == info["model"]["flow_shift"]
    assert E.latent_layout(model) == "CFHW"
    shape = fam.video_shape(model.config, None, world_cfg.frames, world_cfg.size, world_cfg.size)
    assert shape.latent_shape == (3, world_cfg.frames, world_cfg.size, world_cfg.size)


def test_training_encodes_prompts_as_the_family_text_side():
    """What the model was trained on (train.wan_tokens -> wan_context) is what the family feeds it."""
    from unlearn_jax.models.t5 import load_text_encoder

    prompts = ["a red circle moving up", "", "the ruby orb heading westward on a dark background",
               "there is a crimson wedge sliding to the right"]
    want = families.of_folder(WAN_TOY).text(WAN_TOY).encode(prompts)
    length = want.shape[1]
    ids, mask = T.wan_tokens(M.build_tokenizer(vocabulary()), prompts, length, T.FlowConfig.encode_length)
    got = np.asarray(T.wan_context(load_text_encoder(WAN_TOY / "text_encoder"), jnp.asarray(ids), jnp.asarray(mask),
                                   length))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert not want[:, T.FlowConfig.encode_length:].any()


def test_wan_toy_samples_the_prompted_colours():
    cfg = E.EvalConfig(n=4, splits=("train",), batch_size=8)
    model, sched, world_cfg, encode = E.load_pipeline(WAN_TOY)
    rep = E.evaluate(model, sched, world_cfg, encode, cfg, concept_list=[("colour", "red"), ("colour", "blue")],
                     keep_videos=True)
    videos = rep["videos"]
    assert videos.shape == (8, world_cfg.frames, 3, world_cfg.size, world_cfg.size)
    assert np.isfinite(videos).all() and videos.std() > 0.05
    assert rep["rates"]["colour:red"]["train"] >= 0.75 and rep["rates"]["colour:blue"]["train"] >= 0.75


def test_tiny_wan_toy_trains_and_saves_a_wan_pipeline(tmp_path):
    cfg = T.TrainConfig(steps=2, batch_size=2, log_every=1, checkpoint_every=0)
    mcfg = M.WanToyModelConfig(num_layers=1, num_attention_heads=1, attention_head_dim=12, ffn_dim=16, freq_dim=8)
    rec = T.train(tmp_path / "toy", model_cfg=mcfg, cfg=cfg)
    assert rec["model"]["arch"] == "wan" and rec["training"]["steps_done"] == 2
    assert rec["training"]["flow"]["timesteps"] == T.FlowConfig.timesteps
    assert families.of_folder(tmp_path / "toy").name == "wan"
    sched = json.loads((tmp_path / "toy" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "UniPCMultistepScheduler" and sched["flow_shift"] == mcfg.flow_shift
    model, _, _, encode = E.load_pipeline(tmp_path / "toy")
    assert model.config.num_layers == 1 and encode(["a red ball"]).shape == (1, mcfg.max_text_seq_length, 64)


def test_short_erasure_of_the_wan_toy_acts_on_red_and_keeps_green(tmp_path):
    """The erasure's machinery on the Wan architecture: red's prompts change, green's do not.

    Not asserted, because it is not true: that red is *erased*. With the CogVideoX toy's recipe the
    Wan toy's red videos break instead (noisy patches, about half of them invalid after 150 steps;
    README, The Wan toy), and a broken video is not an erased one: `still` (rate + broken) stays up.
    """
    from helpers_erase import short_toy_erasure

    # the fixed-step recipe (captions, x_t from the erased model) on the Wan toy: 40 steps change red's videos
    cmp = short_toy_erasure(ROOT / "configs" / "toy_world" / "fixed_steps.py", tmp_path / "run", steps=40,
                            model_path=ROOT / "assets" / "toy_world_wan")
    red, green = cmp["rates"]["colour:red"], cmp["rates"]["colour:green"]
    for split in ("train", "heldout"):
        assert red[split]["base"] >= 0.75
        assert red[split]["erased"] <= red[split]["base"] - 0.3, (split, red)  # fewer valid red videos
        assert red[split]["still"] == red[split]["erased"] + red[split]["broken_erased"]
        assert green[split]["erased"] >= green[split]["base"] - 0.25, (split, green)
        assert green[split]["broken_erased"] <= green[split]["broken_base"] + 0.15, (split, green)
