"""`unlearn-jax sample` and `unlearn_jax.generate.VideoGenerator`: videos equal to diffusers'
CogVideoXPipeline (DDIM and DPM with dynamic CFG, tiny transformer + tiny VAE + tiny T5, fp32),
torch-seeded noise equal to diffusers' draws, the toy world (no VAE), MP4/PNG output and the CLI
(single prompt, batch with resume, one-line errors)."""
from __future__ import annotations

import csv
import json
import re

import jax
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline

from helpers_cogvideox import CFG_2B, CFG_5B, FRAMES, HEIGHT, LATENT, STEPS, TEXT_LEN, WIDTH  # noqa: F401
from helpers_cogvideox import build_video_pipeline as _build
from unlearn_jax.cli import main as cli_main
from unlearn_jax.errors import UnlearnError
from unlearn_jax.families.cogvideox import decoded_frames
from unlearn_jax.generate import SamplingPlan, VideoGenerator, jax_noise, torch_noise
from unlearn_jax.video_io import read_mp4, write_mp4
from repo_paths import MODEL_CONFIGS, ROOT

TOY = ROOT / "assets" / "toy_world"
CONFIGS = MODEL_CONFIGS


@pytest.fixture(scope="module")
def pipe_2b(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("p2b") / "pipe", rope=False)


@pytest.fixture(scope="module")
def pipe_5b(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("p5b") / "pipe", rope=True)


def _torch_pipeline(parts, kind):
    _, tok, enc, tm, vae = parts
    cfg = {k: v for k, v in (CFG_5B if kind == "dpm" else CFG_2B).items() if not k.startswith("_")}
    sched = (CogVideoXDPMScheduler if kind == "dpm" else CogVideoXDDIMScheduler).from_config(cfg)
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=enc, vae=vae, transformer=tm, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_defaults_follow_the_model(pipe_2b, pipe_5b):
    p2 = SamplingPlan.resolve(pipe_2b[0])
    assert (p2.sampler, p2.use_dynamic_cfg, p2.dtype, p2.noise) == ("ddim", False, "bfloat16", "jax")
    # the pipeline's size: sample_frames, sample_height/width times the VAE's 8
    assert (p2.shape.num_frames, p2.shape.height, p2.shape.width) == (FRAMES, HEIGHT, WIDTH)
    assert p2.shape.noise_shape == (1, *LATENT)
    assert p2.scheduler.kind == "ddim" and p2.scheduler.snr_shift_scale == 3.0
    p5 = SamplingPlan.resolve(pipe_5b[0])
    assert (p5.sampler, p5.use_dynamic_cfg) == ("dpm", True)
    assert p5.scheduler.kind == "dpm" and p5.scheduler.snr_shift_scale == 1.0   # betas etc. from the folder
    assert SamplingPlan.resolve(pipe_5b[0], sampler="ddim").use_dynamic_cfg is False
    with torch.no_grad():   # the frame count rule the size check uses is the VAE's
        for f in (1, 2, 3, 4):
            assert pipe_2b[4].decode(torch.zeros(1, 4, f, 1, 1)).sample.shape[2] == decoded_frames(f, 2)
    toy = SamplingPlan.resolve(TOY)   # no vae/: pixels, the toy world's 5 frames of 20x20
    assert toy.folder.vae is None and toy.sampler == "ddim"
    assert (toy.shape.num_frames, toy.shape.height, toy.shape.width, toy.shape.channels) == (5, 20, 20, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_frames=6), "temporal compression 4"),
    (dict(num_frames=5), "use 1 + a multiple of 8, e.g. 1 or 9"),   # 2 latent frames decode to 8 frames
    (dict(height=36), "height = 36 is not a multiple of 16"),
    (dict(width=0), "width = 0 is invalid"),
    (dict(sampler="euler"), "sampler = 'euler'"),
    (dict(noise="numpy"), "noise = 'numpy'"),
    (dict(num_steps=0), "num_steps = 0"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(dtype="int8"), "dtype = 'int8'"),
    (dict(erasers="/nonexistent/erasers"), "no such eraser folder"),
])
def test_argument_errors_are_one_line(pipe_2b, kwargs, match):
    with pytest.raises(UnlearnError, match=re.escape(match)) as e:
        SamplingPlan.resolve(pipe_2b[0], **kwargs)
    assert "\n" not in str(e.value)


def test_folder_errors(tmp_path, pipe_2b):
    with pytest.raises(UnlearnError, match="no such folder"):
        SamplingPlan.resolve(tmp_path / "nope")
    (tmp_path / "half" / "transformer").mkdir(parents=True)
    with pytest.raises(UnlearnError, match="no tokenizer/, text_encoder/ folder"):
        SamplingPlan.resolve(tmp_path / "half")
    # a model_index.json that names a VAE the folder lacks
    import shutil

    folder = tmp_path / "novae"
    shutil.copytree(pipe_2b[0], folder, ignore=shutil.ignore_patterns("vae"))
    (folder / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKLCogVideoX"]}))
    with pytest.raises(UnlearnError, match="names a VAE but there is no vae/"):
        SamplingPlan.resolve(folder)
    # without a VAE the transformer must take RGB pixels
    (folder / "model_index.json").write_text(json.dumps({"vae": [None, None]}))
    with pytest.raises(UnlearnError, match="in_channels 3"):
        SamplingPlan.resolve(folder)


def test_ddim_videos_equal_the_pipeline(pipe_2b):
    """2B-like (sin-cos positions, DDIM, constant CFG), two prompts in one batch, our T5 encoding of the
    prompts and of the negative prompt, against CogVideoXPipeline(prompt=..., output_type="np")."""
    prompts = ["a red dog in the garden", "a small boat at night"]
    neg = "dark cold"
    lat = np.random.default_rng(0).standard_normal((2, *LATENT)).astype(np.float32)
    final = []
    ref = _torch_pipeline(pipe_2b, "ddim")(
        prompt=prompts, negative_prompt=neg, latents=torch.from_numpy(lat), num_frames=FRAMES, height=HEIGHT,
        width=WIDTH, num_inference_steps=STEPS, guidance_scale=6.0, max_sequence_length=TEXT_LEN,
        output_type="np", callback_on_step_end=lambda p, i, t, kw: final.append(kw["latents"].numpy()) or {}).frames
    gen = VideoGenerator.from_pipeline(pipe_2b[0], dtype="float32", num_steps=STEPS, batch_size=2, progress=False)
    out = gen.generate(prompts, negative_prompt=neg, latents=lat)
    assert out.shape == ref.shape == (2, FRAMES, HEIGHT, WIDTH, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    assert 0 <= out.min() and out.max() <= 1 and out.std() > 0.01
    # the latents alone are the pipeline's output_type="latent" (its last step's latents)
    np.testing.assert_allclose(gen.generate_latents(prompts, negative_prompt=neg, latents=lat), final[-1],
                               atol=2e-5, rtol=1e-5)


def test_dpm_dynamic_cfg_videos_equal_the_pipeline(pipe_5b):
    """5B-like (RoPE, DPM with its stochastic steps, dynamic CFG), precomputed embeddings, the step noise
    drawn from the same torch generator as the pipeline's (noise="torch")."""
    rng = np.random.default_rng(1)
    d = pipe_5b[2].config.d_model
    pe = rng.standard_normal((1, TEXT_LEN, d)).astype(np.float32)
    ne = rng.standard_normal((1, TEXT_LEN, d)).astype(np.float32)
    lat = rng.standard_normal((1, *LATENT)).astype(np.float32)
    ref = _torch_pipeline(pipe_5b, "dpm")(
        prompt_embeds=torch.from_numpy(pe), negative_prompt_embeds=torch.from_numpy(ne),
        latents=torch.from_numpy(lat), num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
        guidance_scale=6.0, use_dynamic_cfg=True, generator=torch.Generator().manual_seed(123),
        output_type="np").frames
    gen = VideoGenerator.from_pipeline(pipe_5b[0], dtype="float32", num_steps=STEPS, noise="torch", progress=False)
    assert gen.sampler == "dpm" and gen.use_dynamic_cfg
    out = gen.generate(seeds=[123], latents=lat, prompt_embeds=pe, negative_prompt_embeds=ne)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # the step noise matters: another seed gives another video
    other = gen.generate(seeds=[124], latents=lat, prompt_embeds=pe, negative_prompt_embeds=ne)
    assert np.abs(other - out).max() > 1e-3

    # noise="torch" without latents: the whole run (initial latents and every step's noise) is what
    # diffusers draws for generator=torch.Generator("cpu").manual_seed(seed)
    ref_lat = _torch_pipeline(pipe_5b, "dpm")(
        prompt_embeds=torch.from_numpy(pe), negative_prompt_embeds=torch.from_numpy(ne), num_frames=FRAMES,
        height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=6.0, use_dynamic_cfg=True,
        generator=torch.Generator("cpu").manual_seed(2**40 + 5), output_type="latent").frames.numpy()
    got = gen.generate_latents(seeds=[2**40 + 5], prompt_embeds=pe, negative_prompt_embeds=ne)
    np.testing.assert_allclose(got, ref_lat, atol=2e-5, rtol=1e-5)


def test_torch_noise_is_the_pipelines(pipe_2b):
    pipe = _torch_pipeline(pipe_2b, "ddim")
    for seed, dtype, tdtype in ((7, "float32", torch.float32), (90939, "bfloat16", torch.bfloat16)):
        want = pipe.prepare_latents(1, 4, FRAMES, HEIGHT, WIDTH, tdtype, "cpu",
                                    torch.Generator("cpu").manual_seed(seed)).float().numpy()
        got, steps = torch_noise(seed, (1, *LATENT), dtype)
        assert steps is None
        np.testing.assert_array_equal(got, want)


def test_jax_noise_is_a_function_of_the_seed():
    shape = (1, *LATENT)
    a = jax_noise(5, shape)
    np.testing.assert_array_equal(a, np.asarray(jax.random.normal(jax.random.key(5), shape)))
    assert not np.array_equal(jax_noise(2**32, shape), jax_noise(0, shape))   # 64-bit seeds are not truncated


def test_toy_world_samples_as_the_toy_generator():
    """No VAE: the latents are the pixels. Drawn from seeds inside the jit (batch of 2, one padded
    slot), the videos equal the toy world's own generator on the same noise."""
    from unlearn_jax.toy import evaluate as toy

    prompts = ["a red circle moving left", "a blue square moving up", "a green triangle"]
    seeds = [0, 1, 2**33 + 1]
    gen = VideoGenerator.from_pipeline(TOY, dtype="float32", num_steps=3, batch_size=2, progress=False)
    videos = gen.generate(prompts, seeds)
    assert videos.shape == (3, 5, 20, 20, 3) and videos.std() > 0.01
    # the toy generator, given the initial noise jax_noise(seed) documents, makes the same videos
    noise = np.concatenate([jax_noise(s, gen.shape.noise_shape) for s in seeds])
    model, sched, world_cfg, encode = toy.load_pipeline(TOY)

    ref = toy.make_generator(model, sched, toy.EvalConfig(num_steps=3))(noise, encode(prompts), encode([""]))
    np.testing.assert_allclose(videos, toy.from_model_space(np.asarray(ref)).transpose(0, 1, 3, 4, 2), atol=1e-5)


def test_mp4_round_trip(tmp_path):
    v = np.zeros((4, 20, 22, 3), np.float32)
    v[..., 0] = np.linspace(0, 1, 22)
    v[2:, ..., 2] = 0.8
    path = write_mp4(tmp_path / "a.mp4", v, fps=8)
    back = read_mp4(path)
    assert back.shape == (4, 20, 22, 3) and back.dtype == np.uint8
    assert np.abs(back.astype(np.float32) / 255 - v).mean() < 0.02
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]   # no temporary file left behind
    assert read_mp4(write_mp4(tmp_path / "odd.mp4", np.full((2, 21, 15, 3), 128, np.uint8))).shape == (2, 21, 15, 3)
    with pytest.raises(UnlearnError, match="end in .mp4"):
        write_mp4(tmp_path / "a.avi", v)
    with pytest.raises(UnlearnError, match=r"\(frames, height, width, 3\)"):
        write_mp4(tmp_path / "b.mp4", v[0])


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------
def _cli(capsys, *args):
    rc = cli_main(["sample", "--model", str(TOY), "--steps", "2", "--dtype", "float32", "--no-progress", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_single_prompt(tmp_path, capsys):
    rc, out, err = _cli(capsys, "--prompt", "a red circle moving left", "--out", str(tmp_path / "v" / "x.mp4"),
                        "--seed", "3", "--frames-dir", str(tmp_path / "frames"), "--fps", "4")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["seed"] == 3 and summary["settings"]["sampler"] == "ddim"
    video = read_mp4(tmp_path / "v" / "x.mp4")
    assert video.shape == (5, 20, 20, 3)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir() if p.name != ".unlearn-jax") == [f"{i:05d}.png" for i in range(5)]


def test_cli_batch_resume_and_index(tmp_path, capsys):
    csv_path = tmp_path / "p.csv"
    # a byte-order mark, CRLF ends, an unnamed index column, case numbers and evaluation seeds
    csv_path.write_bytes("\ufeff,case_number,prompt,class,evaluation_seed\r\n0,1,a red circle,x,11\r\n"
                         "1,2,\"a blue square, moving up\",x,12\r\n2,10,a green triangle,y,13\r\n".encode())
    out_dir = tmp_path / "out"
    rc, out, err = _cli(capsys, "--prompts", str(csv_path), "--out-dir", str(out_dir), "--png-frames",
                        "--batch-size", "2")
    assert rc == 0, err
    assert json.loads(out)["generated"] == 3
    names = ["0001", "0002", "0010"]
    for n in names:
        assert read_mp4(out_dir / f"{n}.mp4").shape == (5, 20, 20, 3)
        assert len([p for p in (out_dir / "frames" / n).iterdir() if p.name != ".unlearn-jax"]) == 5
    with open(out_dir / "index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    assert [r["name"] for r in index] == names and [r["seed"] for r in index] == ["11", "12", "13"]
    assert index[1]["prompt"] == "a blue square, moving up" and index[2]["path"] == "0010.mp4"
    assert json.loads((out_dir / "sample_settings.json").read_text())["num_steps"] == 2
    # a rerun skips everything (nothing is loaded or rewritten)
    mtimes = {n: (out_dir / f"{n}.mp4").stat().st_mtime_ns for n in names}
    rc, out, err = _cli(capsys, "--prompts", str(csv_path), "--out-dir", str(out_dir), "--png-frames")
    assert rc == 0 and json.loads(out)["generated"] == 0 and json.loads(out)["skipped"] == 3
    assert mtimes == {n: (out_dir / f"{n}.mp4").stat().st_mtime_ns for n in names}
    # a missing video is made again; other settings are refused unless --overwrite
    (out_dir / "0002.mp4").unlink()
    rc, out, err = _cli(capsys, "--prompts", str(csv_path), "--out-dir", str(out_dir))
    assert rc == 0 and json.loads(out)["generated"] == 1 and (out_dir / "0002.mp4").is_file()
    assert mtimes["0001"] == (out_dir / "0001.mp4").stat().st_mtime_ns
    rc, out, err = _cli(capsys, "--prompts", str(csv_path), "--out-dir", str(out_dir), "--guidance", "3")
    assert rc == 2 and "other settings (guidance_scale" in err and err.count("\n") == 1


def test_cli_batch_seeds_without_seed_column(tmp_path, capsys):
    """A file without a seed column: --seed + row index (the evaluation's convention), names by row."""
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("prompt\na red circle\na blue square\n")
    rc, out, err = _cli(capsys, "--prompts", str(csv_path), "--out-dir", str(tmp_path / "o"), "--seed", "5")
    assert rc == 0, err
    with open(tmp_path / "o" / "index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    assert [(r["name"], r["seed"]) for r in index] == [("0000", "5"), ("0001", "6")]


def _one_line_error(capsys, *args, match):
    rc, out, err = _cli(capsys, *args)
    assert rc == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err


def test_cli_errors(tmp_path, capsys):
    good = tmp_path / "p.csv"
    good.write_text("prompt,seed\na red circle,1\n")
    _one_line_error(capsys, "--prompt", "x", match="--prompt needs --out")
    _one_line_error(capsys, "--prompt", "x", "--prompts", str(good), "--out", "a.mp4", match="not both")
    _one_line_error(capsys, match="nothing to sample")
    _one_line_error(capsys, "--prompts", str(good), match="--prompts needs --out-dir")
    _one_line_error(capsys, "--prompt", "x", "--out", str(tmp_path / "x.avi"), match="must end in .mp4")
    _one_line_error(capsys, "--prompt", "x", "--out", str(tmp_path / "x.mp4"), "--seed", "abc",
                    match="--seed = 'abc' is not an integer")
    _one_line_error(capsys, "--prompt", "x", "--out", str(tmp_path / "x.mp4"), "--height", "22",
                    match="height = 22 is not a multiple of 4")
    _one_line_error(capsys, "--prompt", "x", "--out", str(tmp_path / "x.mp4"), "--steps", "many",
                    match="--steps 'many' is not an integer")
    no_prompt = tmp_path / "np.csv"
    no_prompt.write_text("text,seed\nhello,1\n")
    _one_line_error(capsys, "--prompts", str(no_prompt), "--out-dir", str(tmp_path / "o"), match="no 'prompt' column")
    bad_seed = tmp_path / "bs.csv"
    bad_seed.write_text("prompt,seed\na,1\nb,two\n")
    _one_line_error(capsys, "--prompts", str(bad_seed), "--out-dir", str(tmp_path / "o"),
                    match="line 3: seed = 'two' is not an integer")
    _one_line_error(capsys, "--prompts", str(tmp_path / "missing.csv"), "--out-dir", str(tmp_path / "o"),
                    match="missing.csv does not exist")
    rc = cli_main(["sample", "--model", str(tmp_path / "nomodel"), "--prompt", "x", "--out", str(tmp_path / "y.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and "no such folder" in err and err.count("\n") == 1
    assert not list(tmp_path.glob("*.mp4")) and not (tmp_path / "o").exists()
