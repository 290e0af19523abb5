"""The family layer: the registry, and a made-up family added from files of this test folder alone
(no edits to unlearn_jax/) that goes through erase -> export -> sample like CogVideoX does."""
import json

import jax
import numpy as np
import pytest

import unlearn_jax
from helpers_tiny_family import CLASS_NAME, FAMILY, build_tiny_cross_pipeline
from repo_paths import TOY_WORLD
from unlearn_jax import families
from unlearn_jax.cli import main
from unlearn_jax.errors import ModelFamilyError


def test_registry_finds_the_family_of_a_folder_and_refuses_others(tmp_path):
    fam = families.of_folder(TOY_WORLD)
    assert fam.name == "cogvideox" and families.of_folder(TOY_WORLD / "transformer") is fam
    assert families.of_model(unlearn_jax.load_transformer(TOY_WORLD)) is fam
    other = tmp_path / "other"
    (other / "transformer").mkdir(parents=True)
    (other / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SomeOtherTransformer"}))
    with pytest.raises(ModelFamilyError, match="SomeOtherTransformer, not a CogVideoXTransformer3DModel") as e:
        families.of_folder(other)
    assert "\n" not in str(e.value) and "CogVideoX (CogVideoXTransformer3DModel)" in str(e.value)
    with pytest.raises(ModelFamilyError, match="SomeOtherTransformer"):
        unlearn_jax.load_transformer(other)


@pytest.fixture
def tiny_family(tmp_path):
    families.register(FAMILY)
    try:
        yield build_tiny_cross_pipeline(tmp_path / "pipe")
    finally:
        families.unregister(FAMILY.name)


def test_a_made_up_family_erases_exports_and_samples(tiny_family, tmp_path, capsys):
    from helpers_erase import tiny_erase_config

    from unlearn_jax.config import to_json
    from unlearn_jax.eraser_io import load_erasers

    pipe = tiny_family
    assert families.of_folder(pipe) is FAMILY
    # the erase run, from a config file and overrides, exactly as for CogVideoX
    cfg = tiny_erase_config(pipe, tmp_path / "run", **{"train.num_steps": 6, "sampler.guidance_scale": 4.0})
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("import json\nfrom ml_collections import ConfigDict\n"
                        f"def get_config():\n    return ConfigDict(json.loads({to_json(cfg)!r}))\n")
    assert main(["erase", "--config", str(cfg_file), "--no-progress",
                 "--config.export.formats=['erasers', 't2vunlearning']"]) == 0
    run = tmp_path / "run"
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["sampler"]["kind"] == "flow_euler"  # the family's training sampler
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    # the localization mask came from the cross-attention over the masked text keys
    assert all(0.0 < r["mask_fraction"] < 1.0 for r in recs)
    assert all(r["loss_unlearn"] > 0 and r["loss_loc"] >= 0 and r["loss_pre"] >= 0 for r in recs)

    # exports: ours and the published layout under the family's own keys, the same erasers
    cfg_e, phi = load_erasers(run / "export" / "erasers")
    _, phi_pub = load_erasers(run / "export" / "t2vunlearning")
    jax.tree.map(np.testing.assert_array_equal, phi_pub, phi)
    assert np.abs(phi["up"]["kernel"]).max() > 0  # trained
    import torch

    keys = torch.load(run / "export" / "t2vunlearning" / "eraser_weights.pt", weights_only=True)
    assert sorted(keys) == ["blocks.0.attn1.adapter", "blocks.1.attn1.adapter"]

    # the erased model in the public API: same call as the family's model, erasers on / off
    erased = unlearn_jax.load_transformer(pipe, erasers=run / "export" / "erasers")
    assert type(erased.base).__name__ == CLASS_NAME
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 2, 8, 8)).astype(np.float32)
    emb = rng.standard_normal((1, 16, erased.config.text_dim)).astype(np.float32)
    mask = np.arange(16)[None] < 5
    on = np.asarray(erased(x, 500.0, emb, mask))
    off = np.asarray(erased(x, 500.0, emb, mask, erasers_on=False))
    np.testing.assert_array_equal(off, np.asarray(erased.base(x, 500.0, emb, mask)))
    assert np.abs(on - off).max() > 1e-6

    # sampling with the family's defaults (flow Euler, its steps and guidance), base and erased
    capsys.readouterr()
    assert main(["sample", "--model", str(pipe), "--prompt", "a red cat", "--out", str(tmp_path / "base.mp4"),
                 "--dtype", "float32", "--no-progress"]) == 0
    assert main(["sample", "--model", str(pipe), "--erasers", str(run / "export" / "erasers"), "--prompt",
                 "a red cat", "--out", str(tmp_path / "erased.mp4"), "--dtype", "float32", "--no-progress"]) == 0
    from unlearn_jax.video_io import read_mp4

    base, erased_video = read_mp4(tmp_path / "base.mp4"), read_mp4(tmp_path / "erased.mp4")
    assert base.shape == erased_video.shape and base.shape[:3] == (2, 8, 8)
    from unlearn_jax.generate import VideoGenerator

    gen = VideoGenerator.from_pipeline(pipe, dtype="float32", progress=False)
    assert (gen.sampler, gen.num_steps, gen.guidance_scale) == ("flow_euler", 4, 4.0)
    gen_e = VideoGenerator.from_pipeline(pipe, erasers=run / "export" / "erasers", dtype="float32", progress=False)
    v0, v1 = gen.generate(["a red cat"], [3]), gen_e.generate(["a red cat"], [3])
    assert v0.shape == (1, 2, 8, 8, 3) and np.abs(v0 - v1).max() > 1e-4
