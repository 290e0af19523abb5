"""The two-expert Wan 2.2 T2V-A14B end to end on a tiny pipeline (two experts, boundary_ratio 0.875, the A14B
scheduler): sampling equals `WanPipeline` with the switch and a second guidance scale; one erasure step at a t
above the boundary equals a PyTorch reference on the high-noise expert and leaves the low expert's rows of phi
and of the Adam moments bit for bit, and one below it changes only the low rows; a short erase run exports LoRA
files, merged experts and eraser folders that a stock WanPipeline loads with the JAX erased velocity on either
side of the boundary; one-line refusals."""
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import unlearn_jax
from helpers_wan_pipeline import FRAMES, HEIGHT, WIDTH, build_wan_a14b_pipeline, pipeline_frames
from test_wan_erasure_step import ALPHA, BETA, C_FRAMES, H, TAU, W, WanReference, _batch, _rel
from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.erasers import EraserConfig, init_erasers, take_layers
from unlearn_jax.generate import SamplingPlan, VideoGenerator
from unlearn_jax.models.wan import WanTransformer
from unlearn_jax.models.wan_experts import WanExperts
from unlearn_jax.schedulers import SchedulerConfig, make_schedule
from unlearn_jax.train import ErasureStep, StepSettings, init_state, make_optimizer

# 3 UniPC steps with the A14B scheduler (flow shift 3) run at t = 999 | 857, 600: the boundary 875 switches
# from the high-noise expert to the low-noise one after the first step
RATIO, STEPS, GUIDANCE, GUIDANCE_2 = 0.875, 3, 5.0, 2.0
PROMPTS, SEEDS = ["a red cat on a sofa", "the dog"], [3, 11]
T_HIGH, T_LOW = 900.0, 613.0  # one step on each side of the boundary


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    folder, pipe = build_wan_a14b_pipeline(tmp_path_factory.mktemp("a14b") / "pipe", RATIO)
    return folder, pipe, unlearn_jax.load_transformer(folder, dtype="float32")


def _stock_pipeline(folder, sub=""):
    """A stock WanPipeline of the folder's two transformers (no text side: the tests call the transformers)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    load = lambda name: WanTransformer3DModel.from_pretrained(folder / sub, subfolder=name)  # noqa: E731
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=load("transformer"),
                       transformer_2=load("transformer_2"), boundary_ratio=RATIO)


def _inputs(model, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, model.config.in_channels, 2, 4, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 9, model.config.text_dim)).astype(np.float32)
    return x, ctx


def _torch_velocity(tm, x, ctx, t):
    with torch.no_grad():
        return tm(torch.from_numpy(x), torch.full((x.shape[0],), t), torch.from_numpy(ctx),
                  return_dict=False)[0].numpy()


def _check_experts(pipe, erased_fn, x, ctx):
    """The pipeline's transformer at T_HIGH and transformer_2 at T_LOW give the JAX erased velocity."""
    for tm, t in ((pipe.transformer, T_HIGH), (pipe.transformer_2, T_LOW)):
        np.testing.assert_allclose(_torch_velocity(tm, x, ctx, t), erased_fn(t), atol=1e-5, rtol=0)


def test_loads_both_experts_and_samples_as_the_wan_pipeline(a14b):
    folder, pipe, model = a14b
    assert isinstance(model, WanExperts) and model.config.boundary == 875.0
    assert isinstance(unlearn_jax.load_transformer(folder / "transformer"), WanTransformer)  # one expert alone
    gen = VideoGenerator.from_pipeline(folder, dtype="float32", num_steps=STEPS, guidance_scale=GUIDANCE,
                                       guidance_scale_2=GUIDANCE_2, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                                       noise="torch", progress=False)
    ts = np.asarray(gen.schedule.timesteps)
    assert ts[0] >= 875 > ts[1]  # the run switches experts after its first step
    assert gen.settings()["guidance_scale_2"] == GUIDANCE_2
    got = gen.generate(PROMPTS, SEEDS)
    want = pipeline_frames(pipe, PROMPTS, SEEDS, STEPS, GUIDANCE, guidance_2=GUIDANCE_2)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # the second scale is in play: the pipeline at guidance_scale_2 = guidance_scale gives other frames
    one_scale = pipeline_frames(pipe, PROMPTS[:1], SEEDS[:1], STEPS, GUIDANCE)
    assert np.abs(one_scale[0] - want[0]).max() > 1e-3


def _rows(tree, rows):
    return [np.asarray(a)[rows] for a in jax.tree.leaves(tree)]


def _adam(opt_state):
    """The Adam part (count, mu, nu) of the optimizer's chained state."""
    return next(s for s in opt_state if hasattr(s, "mu"))


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_erasure_step_trains_only_the_expert_that_serves_t(a14b):
    folder, pipe, model = a14b
    L = model.config.expert_layers
    hi, lo = slice(0, L), slice(L, 2 * L)
    ec = EraserConfig("adapter", rank=6)
    phi = init_erasers(ec, model, jax.random.key(3))
    k = jax.random.key(4)  # a non-zero up-projection so every term carries gradient signal
    phi["up"]["kernel"] = 0.05 * jax.random.normal(k, phi["up"]["kernel"].shape)
    phi["up"]["bias"] = 0.05 * jax.random.normal(jax.random.fold_in(k, 1), phi["up"]["bias"].shape)
    sched = make_schedule(SchedulerConfig.from_diffusers(folder / "scheduler" / "scheduler_config.json",
                                                         kind="unipc"), 8)
    # no clipping: Adam's first moment after one step from zero is 0.1 x the gradient
    opt = make_optimizer(1e-4, grad_clip=0.0)
    c = model.config.in_channels
    step = ErasureStep(model, ec, sched, StepSettings(xt_source="frozen_bank", alpha_loc=ALPHA, beta_pre=BETA,
                                                      mask_threshold=TAU, num_sampler_steps=8),
                       opt, (c, C_FRAMES, H, W))
    _, base = nnx.split(model)
    state = init_state(phi, opt, 0)
    run = jax.jit(step)
    batch = _batch({"in_channels": c, "text_dim": model.config.text_dim})
    new, metrics = run(state, base, {**batch, "t": np.float32(T_HIGH)})

    ref = WanReference(pipe.transformer, take_layers(phi, hi), step.grid)  # the high-noise expert
    try:
        ref_terms, ref_mask, ref_grads = ref.terms({**batch, "t": np.float32(T_HIGH)})
    finally:
        for h in ref.handles:
            h.remove()
    assert 0.0 < float(metrics["mask_fraction"]) < 1.0
    np.testing.assert_allclose(float(metrics["mask_fraction"]), ref_mask, rtol=0, atol=1e-7)
    for name, v in ref_terms.items():
        assert v > 0 and _rel(metrics[name], v) <= 1e-5, (name, float(metrics[name]), v)
    adam = _adam(new.opt_state)
    grads = jax.tree.map(lambda m: np.asarray(m)[hi] / 0.1, adam.mu)
    for g, rg in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert _rel(g, rg) <= 1e-5, _rel(g, rg)
    # the low expert's rows of phi and of both moments: untouched, bit for bit
    old_adam = _adam(state.opt_state)
    for now, before in ((new.phi, state.phi), (adam.mu, old_adam.mu), (adam.nu, old_adam.nu)):
        assert _same(_rows(now, lo), _rows(before, lo))
        assert not _same(_rows(now, hi), _rows(before, hi))

    # below the boundary: only the low rows move; the step counter is shared
    newer, _ = run(new, base, {**batch, "t": np.float32(T_LOW)})
    adam2 = _adam(newer.opt_state)
    for now, before in ((newer.phi, new.phi), (adam2.mu, adam.mu), (adam2.nu, adam.nu)):
        assert _same(_rows(now, hi), _rows(before, hi))
        assert not _same(_rows(now, lo), _rows(before, lo))
    assert int(adam2.count) == 2 and int(newer.step) == 2


def test_adapter_exports_per_expert_attach_to_a_stock_pipeline(a14b, tmp_path):
    import unlearn_jax.torch as ujt
    from unlearn_jax import export
    from unlearn_jax.erased_model import attach_erasers
    from unlearn_jax.eraser_io import load_erasers, save_erasers

    folder, _, model = a14b
    ec = EraserConfig("adapter", rank=5, scale=0.8)
    phi = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape),
                       init_erasers(ec, model, jax.random.key(2)))
    x, ctx = _inputs(model)
    erased = attach_erasers(model, (ec, phi))
    want = {t: np.asarray(erased(x, np.full((2,), t, np.float32), ctx)) for t in (T_HIGH, T_LOW)}
    export.export_t2vunlearning(tmp_path / "published", ec, phi, model, readme=True)
    save_erasers(tmp_path / "ours", ec, phi, model)
    assert json.loads((tmp_path / "ours" / "eraser_config.json").read_text())["experts"] == ["transformer",
                                                                                              "transformer_2"]
    back_cfg, back = load_erasers(tmp_path / "published", model)  # one published folder per expert, read back
    assert back_cfg.scale == 1.0  # the published format folds the scale into `up`
    for group, s in (("down", 1.0), ("up", 0.8)):
        for leaf in ("kernel", "bias"):
            np.testing.assert_allclose(back[group][leaf], s * np.asarray(phi[group][leaf]), rtol=1e-6, atol=1e-7)
    pipe = _stock_pipeline(folder)
    for src in ("published", "ours"):
        ujt.attach_erasers(pipe, tmp_path / src)
        assert len(ujt.attached_erasers(pipe)) == 2 * model.config.expert_layers
        _check_experts(pipe, lambda t: want[t], x, ctx)
        ujt.detach_erasers(pipe)
    with pytest.raises(UnlearnError, match="pass that pipeline") as e:
        ujt.attach_erasers(pipe.transformer, tmp_path / "ours")
    assert "\n" not in str(e.value)


def test_erase_run_exports_load_in_a_stock_pipeline(a14b, tmp_path):
    from helpers_erase import tiny_erase_config

    import unlearn_jax.torch as ujt
    from unlearn_jax.erase import run_erase
    from unlearn_jax.erased_model import attach_erasers
    from unlearn_jax.eraser_io import expert_lora_weights, load_erasers

    folder, _, model = a14b
    cfg = tiny_erase_config(folder, tmp_path / "run", **{
        "train.num_steps": 8, "video.num_frames": FRAMES, "video.height": HEIGHT, "video.width": WIDTH,
        "eraser.kind": "lora", "sampler.guidance_scale_2": GUIDANCE_2})
    cfg.export.formats = ["erasers", "lora", "diffusers"]
    summary = run_erase(cfg, progress=False)
    assert summary["status"] == "completed"
    out = tmp_path / "run" / "export"
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ec, phi = load_erasers(out / "erasers")
    assert ec.kind == "lora"
    L = model.config.expert_layers
    # an expert's rows move exactly when a step's t was on its side of the boundary (B starts at zero)
    for rows, served in ((slice(0, L), any(r["t"] >= 875 for r in recs)), (slice(L, 2 * L),
                                                                          any(r["t"] < 875 for r in recs))):
        moved = any(np.abs(np.asarray(ab["b"])[rows]).max() > 0 for ab in phi.values())
        assert moved == served, (rows, [r["t"] for r in recs])

    x, ctx = _inputs(model, seed=2)
    erased = attach_erasers(model, (ec, phi))
    want = {t: np.asarray(erased(x, np.full((2,), t, np.float32), ctx)) for t in (T_HIGH, T_LOW)}
    pipe = _stock_pipeline(folder)
    pipe.load_lora_weights(str(out / "lora"), weight_name=expert_lora_weights("transformer"))
    pipe.load_lora_weights(str(out / "lora"), weight_name=expert_lora_weights("transformer_2"),
                           load_into_transformer_2=True)
    _check_experts(pipe, lambda t: want[t], x, ctx)
    assert "load_into_transformer_2=True" in (out / "lora" / "README.md").read_text()
    _check_experts(_stock_pipeline(out / "diffusers"), lambda t: want[t], x, ctx)  # merged, both experts
    merged = unlearn_jax.load_transformer(out / "diffusers")
    assert isinstance(merged, WanExperts) and merged.config.boundary == 875.0
    stock = _stock_pipeline(folder)
    ujt.attach_erasers(stock, out / "erasers")
    _check_experts(stock, lambda t: want[t], x, ctx)
    with pytest.raises(ModelFamilyError, match="two-expert") as e:  # both experts' erasers on one of them
        load_erasers(out / "erasers", model.high)
    assert "\n" not in str(e.value)


def test_one_line_refusals(a14b, tmp_path):
    from helpers_erase import tiny_erase_config

    from unlearn_jax.erase import run_erase

    folder, _, model = a14b
    for kind in ("attn", "full"):
        with pytest.raises(UnlearnError, match="adapter or lora") as e:
            init_erasers(EraserConfig(kind), model, jax.random.key(0))
        assert "\n" not in str(e.value)
    cfg = tiny_erase_config(folder, tmp_path / "run", **{"eraser.kind": "full"})
    with pytest.raises(UnlearnError, match="config.eraser.kind 'full': the two-expert"):
        run_erase(cfg, progress=False)  # refused from the configs, before any weight is read
    x, ctx = _inputs(model)
    with pytest.raises(UnlearnError, match="per-token timesteps"):
        model.forward(x, ctx, np.zeros((2, 16), np.float32))
    with pytest.raises(UnlearnError, match="has no effect"):
        SamplingPlan.resolve(folder, guidance_scale=1.0, guidance_scale_2=3.0)

    index = json.loads((folder / "model_index.json").read_text())
    one = tmp_path / "one"
    shutil.copytree(folder, one, ignore=shutil.ignore_patterns("transformer_2"))
    (one / "model_index.json").write_text(json.dumps({**index, "transformer_2": [None, None]}))
    with pytest.raises(UnlearnError, match="one stage") as e:
        SamplingPlan.resolve(one, guidance_scale_2=3.0)
    assert "\n" not in str(e.value)
    missing = tmp_path / "missing"
    shutil.copytree(one, missing)
    (missing / "model_index.json").write_text(json.dumps(index))
    for call in (SamplingPlan.resolve, unlearn_jax.load_transformer):
        with pytest.raises(ModelFamilyError, match="transformer_2/ folder is missing") as e:
            call(missing)
        assert "\n" not in str(e.value)
