"""The Wan family end to end: `unlearn-jax sample` equals `WanPipeline(output_type="np")` (Wan 2.1 and the
2.2 TI2V-5B text-to-video path), folders that are not text-to-video Wan pipelines are refused in one line,
and an erasure runs, exports and loads back in diffusers."""
import json
import shutil

import numpy as np
import pytest
import torch

from helpers_wan_pipeline import FRAMES, HEIGHT, WIDTH, build_wan_pipeline, pipeline_frames
from unlearn_jax import families
from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.generate import SamplingPlan, VideoGenerator

PROMPTS, SEEDS, STEPS, GUIDANCE = ["a red cat on a sofa", "the dog"], [3, 11], 3, 5.0


@pytest.fixture(scope="module", params=["wan21", "wan22_5b"])
def wan(request, tmp_path_factory):
    folder, pipe = build_wan_pipeline(tmp_path_factory.mktemp(request.param) / "pipe", request.param)
    return request.param, folder, pipe


def test_sample_equals_the_wan_pipeline(wan):
    name, folder, pipe = wan
    assert families.of_folder(folder).name == "wan"
    gen = VideoGenerator.from_pipeline(folder, dtype="float32", num_steps=STEPS, guidance_scale=GUIDANCE,
                                       num_frames=FRAMES, height=HEIGHT, width=WIDTH, noise="torch", progress=False)
    assert gen.sampler == "unipc" and gen.shape.latent_shape[0] == pipe.vae.config.z_dim
    got = gen.generate(PROMPTS, SEEDS)
    want = pipeline_frames(pipe, PROMPTS, SEEDS, STEPS, GUIDANCE)
    assert got.shape == want.shape == (2, FRAMES, HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(got[0] - got[1]).max() > 1e-3  # prompts and seeds matter


def test_wan_pipeline_defaults_and_bad_folders(wan, tmp_path):
    name, folder, _ = wan
    plan = SamplingPlan.resolve(folder)
    assert (plan.sampler, plan.num_steps, plan.guidance_scale) == ("unipc", 50, 5.0)
    assert (plan.shape.num_frames, plan.shape.height, plan.shape.width) == (81, 480, 832)  # WanPipeline's
    with pytest.raises(UnlearnError, match="1 \\+ a multiple of 4"):
        SamplingPlan.resolve(folder, num_frames=6)
    if name != "wan21":
        return
    i2v = tmp_path / "i2v"
    shutil.copytree(folder, i2v)
    index = json.loads((i2v / "model_index.json").read_text())
    (i2v / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanImageToVideoPipeline"}))
    with pytest.raises(ModelFamilyError, match="WanImageToVideoPipeline") as e:
        SamplingPlan.resolve(i2v)
    assert "\n" not in str(e.value)
    a14b = tmp_path / "a14b"
    shutil.copytree(folder, a14b)
    (a14b / "model_index.json").write_text(json.dumps({**index, "transformer_2": ["diffusers", "WanTransformer3DModel"],
                                                       "boundary_ratio": 0.875}))
    with pytest.raises(ModelFamilyError, match="transformer_2/ folder is missing"):
        SamplingPlan.resolve(a14b)
    mismatch = tmp_path / "mismatch"
    shutil.copytree(folder, mismatch)
    vcfg = json.loads((mismatch / "vae" / "config.json").read_text())
    (mismatch / "vae" / "config.json").write_text(json.dumps({**vcfg, "z_dim": vcfg["z_dim"] + 2,
                                                              "latents_mean": [0.0] * (vcfg["z_dim"] + 2),
                                                              "latents_std": [1.0] * (vcfg["z_dim"] + 2)}))
    with pytest.raises(ModelFamilyError, match="different Wan models"):
        SamplingPlan.resolve(mismatch)
    tcfg = json.loads((folder / "transformer" / "config.json").read_text())
    with pytest.raises(ModelFamilyError, match="image-to-video Wan transformer"):  # Wan 2.2 I2V-A14B's input
        families.get("wan").transformer_config({**tcfg, "in_channels": 36, "out_channels": 16})


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    return build_wan_pipeline(tmp_path_factory.mktemp("wan21_erase") / "pipe", "wan21")


def test_wan_erasure_runs_exports_and_loads_in_diffusers(wan21, tmp_path):
    from helpers_erase import tiny_erase_config

    import unlearn_jax
    import unlearn_jax.torch as ujt
    from unlearn_jax.erase import run_erase
    from unlearn_jax.eraser_io import load_erasers

    folder, pipe = wan21
    cfg = tiny_erase_config(folder, tmp_path / "run", **{"train.num_steps": 3, "video.num_frames": FRAMES,
                                                         "video.height": HEIGHT, "video.width": WIDTH})
    cfg.export.formats = ["erasers", "t2vunlearning"]
    summary = run_erase(cfg, progress=False)
    assert summary["status"] == "completed"
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sampler"]["kind"] == "unipc"
    assert all(0.0 < r["mask_fraction"] < 1.0 and r["loss_unlearn"] > 0 for r in recs)
    # the trained erasers in a stock diffusers Wan transformer give the JAX erased velocity
    cfg_e, phi = load_erasers(tmp_path / "run" / "export" / "erasers")
    assert np.abs(phi["up"]["kernel"]).max() > 0
    erased = unlearn_jax.load_transformer(folder, erasers=tmp_path / "run" / "export" / "erasers")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, pipe.vae.config.z_dim, 2, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 9, erased.config.text_dim)).astype(np.float32)
    t = np.array([700.0, 300.0], np.float32)
    want = np.asarray(erased(x, t, ctx))
    assert np.abs(want - np.asarray(erased(x, t, ctx, erasers_on=False))).max() > 1e-6
    for src in ("erasers", "t2vunlearning"):
        tm = ujt.attach_erasers(pipe.transformer, tmp_path / "run" / "export" / src)
        with torch.no_grad():
            got = tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), return_dict=False)[0].numpy()
        ujt.detach_erasers(tm)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
