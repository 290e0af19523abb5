"""The JAX Wan transformer equals diffusers' WanTransformer3DModel (fp32; bf16 within tolerance), its weights
round-trip bit-exactly, its rule table covers the full-size models, and its hooks sit where documented."""
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

from helpers_wan import TEXT_LEN, VARIANTS, build_torch, inputs, tiny_config, torch_forward
from unlearn_jax.conversion import plan_import
from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.models.hooks import Hooks
from unlearn_jax import load_transformer as load_wan_transformer  # the one loader, through the Wan family
from unlearn_jax import save_transformer as save_wan_transformer
from unlearn_jax.conversion import module_targets as param_targets
from unlearn_jax.models.wan import CLASS_NAME, WanConfig, abstract_model, rule_table

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "model_configs"
FULL_CONFIGS = sorted(p.name for p in CONFIGS.glob("wan*_transformer.json"))
TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved(request, tmp_path_factory):
    cfg = tiny_config(request.param)
    tmodel = build_torch(cfg)
    folder = tmp_path_factory.mktemp(request.param)
    tmodel.save_pretrained(folder)
    return request.param, cfg, tmodel, folder


def test_fp32_parity(saved):
    _, cfg, tmodel, folder = saved
    x, ctx, t = inputs(cfg, batch=2)
    ref = torch_forward(tmodel, x, ctx, t)
    out = np.asarray(load_wan_transformer(folder)(x, t, ctx))
    assert out.shape == ref.shape == (2, cfg["out_channels"], *x.shape[2:])
    np.testing.assert_allclose(out, ref, **TOL)


def test_reference_and_chunked_attention_paths(saved):
    _, cfg, tmodel, folder = saved
    x, ctx, t = inputs(cfg, batch=2, seed=3)
    ref = torch_forward(tmodel, x, ctx, t)
    out = np.asarray(load_wan_transformer(folder, attention="reference", remat="full")(x, t, ctx))
    np.testing.assert_allclose(out, ref, **TOL)
    # 7-row query blocks over 45 (or 30) video tokens: several blocks, the last one padded.
    chunked = np.asarray(load_wan_transformer(folder, attention="chunked", attention_chunk=7, remat="dots")(x, t, ctx))
    np.testing.assert_allclose(chunked, ref, **TOL)
    np.testing.assert_allclose(chunked, out, atol=2e-6, rtol=1e-6)


def test_bf16_within_tolerance(saved):
    """bf16 weights and compute (norms, modulation, RoPE, softmax in fp32) against the fp32 reference:
    max abs error <= 5% of max |v|, correlation > 0.999."""
    _, cfg, tmodel, folder = saved
    x, ctx, t = inputs(cfg, batch=2, seed=5)
    ref = torch_forward(tmodel, x, ctx, t)
    model = load_wan_transformer(folder, dtype="bfloat16")
    assert model.blocks.attn1.to_q.kernel[...].dtype == jnp.bfloat16
    out = np.asarray(model(x, t, ctx)).astype(np.float32)
    err = np.abs(out - ref).max()
    assert err <= 0.05 * np.abs(ref).max(), err
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.999


def test_per_token_timesteps_equal_diffusers(tmp_path):
    """Wan 2.2 TI2V's expand_timesteps path: timestep (B, tokens), per-token modulation."""
    cfg = tiny_config("wan22_5b")
    tmodel = build_torch(cfg, seed=2)
    tmodel.save_pretrained(tmp_path)
    x, ctx, _ = inputs(cfg, batch=2, seed=6)
    model = load_wan_transformer(tmp_path)
    tokens = int(np.prod(model.token_grid(*x.shape[2:])))
    t_tok = np.random.default_rng(1).uniform(0, 1000, size=(2, tokens)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model(x, t_tok, ctx)), torch_forward(tmodel, x, ctx, t_tok), **TOL)
    # The text-to-video pipeline's per-token timesteps are all equal: the same as (B,) timesteps.
    t = np.array([250.0, 700.0], np.float32)
    same = np.repeat(t[:, None], tokens, axis=1)
    np.testing.assert_allclose(np.asarray(model(x, same, ctx)), np.asarray(model(x, t, ctx)), atol=2e-6, rtol=1e-6)
    # A scalar broadcasts over the batch exactly.
    np.testing.assert_array_equal(np.asarray(model(x, 500, ctx)), np.asarray(model(x, np.array([500, 500]), ctx)))


def test_other_sizes_and_text_length(tmp_path):
    cfg = tiny_config("wan21")
    tmodel = build_torch(cfg, seed=1)
    tmodel.save_pretrained(tmp_path)
    model = load_wan_transformer(tmp_path)
    x, ctx, t = inputs(cfg, batch=1, frames=5, height=4, width=14, text_len=11, seed=2)
    np.testing.assert_allclose(np.asarray(model(x, t, ctx)), torch_forward(tmodel, x, ctx, t), **TOL)


def _tensors(folder: Path) -> dict:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("variant,dtype", [("wan21", torch.float32), ("wan22_5b", torch.bfloat16),
                                           ("no_cross_norm_pt2", torch.float16)])
def test_round_trip_bit_exact(tmp_path, variant, dtype):
    cfg = tiny_config(variant)
    src, out = tmp_path / "src", tmp_path / "out"
    build_torch(cfg).to(dtype).save_pretrained(src)
    model = load_wan_transformer(src)  # dtype=None keeps the checkpoint's dtype
    save_wan_transformer(model, out)
    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    with pytest.raises(UnlearnError):  # an existing output is replaced only when asked
        save_wan_transformer(model, out)
    save_wan_transformer(model, out, overwrite=True)
    saved_cfg, orig_cfg = (json.loads((f / "config.json").read_text()) for f in (out, src))
    for k, v in orig_cfg.items():
        if not k.startswith("_"):
            assert saved_cfg[k] == v, k


def test_saved_folder_loads_in_diffusers_and_matches(tmp_path):
    from diffusers import WanTransformer3DModel

    cfg = tiny_config("wan22_5b")
    build_torch(cfg, seed=3).save_pretrained(tmp_path / "pipe" / "transformer")
    model = load_wan_transformer(tmp_path / "pipe")  # a pipeline folder: its transformer/
    save_wan_transformer(model, tmp_path / "out")
    back = WanTransformer3DModel.from_pretrained(tmp_path / "out").eval()
    x, ctx, t = inputs(cfg, batch=1)
    np.testing.assert_allclose(torch_forward(back, x, ctx, t), np.asarray(model(x, t, ctx)), **TOL)


@pytest.mark.parametrize("name", FULL_CONFIGS)
def test_rule_table_covers_full_size_models(name):
    """Every key of the real model maps to a JAX leaf of the right shape and back, every leaf is covered
    and carries logical axes (built on the meta device / as shapes: no weights allocated)."""
    from diffusers import WanTransformer3DModel

    raw = json.loads((CONFIGS / name).read_text())
    with torch.device("meta"):
        tmodel = WanTransformer3DModel(**{k: v for k, v in raw.items() if not k.startswith("_")})
    shapes = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    cfg = WanConfig.from_dict(raw, name)
    table = rule_table(cfg)
    abstract = abstract_model(cfg)
    targets = param_targets(abstract)
    plan = plan_import(table, shapes, targets, name)  # raises listing every problem
    assert sum(len(v) for v in plan.values()) == len(shapes)
    assert all(plan[p] for p in targets)
    for e in table.entries():
        leaf = targets[e.jax_path].shape
        assert e.transform.torch_shape(leaf[1:] if e.layer is not None else leaf) == shapes[e.torch_key], e.torch_key
    assert sum(int(np.prod(s)) for s in shapes.values()) == sum(int(np.prod(t.shape)) for t in targets.values())
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), (path, axes)
    assert "blocks.attn1.to_q.kernel" in targets  # where LoRA erasers find the self-attention


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------
def _forward(model, x, ctx, t, hooks=None, extras=None):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, x, c, t, e: nnx.merge(graphdef, s).forward(x, c, t, hooks, e))
    return f(state, jnp.asarray(x), jnp.asarray(ctx), jnp.asarray(t), extras)


@pytest.fixture(scope="module")
def hooked():
    cfg = tiny_config("wan21")
    tmodel = build_torch(cfg, seed=7)
    with tempfile.TemporaryDirectory() as d:
        tmodel.save_pretrained(d)
        model = load_wan_transformer(d)
    return cfg, tmodel, model, inputs(cfg, batch=2, seed=8)


def test_erasers_off_and_zero_adapter_are_exact(hooked):
    cfg, _, model, (x, ctx, t) = hooked
    plain = np.asarray(model(x, t, ctx))
    xj, cj, tj = model.forward_inputs(hidden_states=x, timestep=t, encoder_hidden_states=ctx)
    assert (xj.shape, cj.shape, tj.shape) == (x.shape, ctx.shape, t.shape)
    v, aux = _forward(model, x, ctx, t)
    np.testing.assert_array_equal(np.asarray(v), plain)
    assert aux == {"concept": None, "attn": None}
    L, D = cfg["num_layers"], model.config.inner_dim

    def adapter(a, extra):
        o = jnp.tanh(a @ extra["w"]) @ extra["u"]
        return a + o, jnp.mean(jnp.square(o), axis=-1)

    zero = {"w": jnp.ones((L, D, 5)) * 0.1, "u": jnp.zeros((L, 5, D))}
    v0, aux0 = _forward(model, x, ctx, t, Hooks(on_video_attn=adapter), zero)
    np.testing.assert_array_equal(np.asarray(v0), plain)
    tokens = int(np.prod(model.token_grid(*x.shape[2:])))
    assert aux0["attn"].shape == (L, 2, tokens) and aux0["concept"] is None
    # A non-zero adapter acts on attn1's output in every layer.
    some = {"w": zero["w"], "u": jnp.full((L, 5, D), 0.05)}
    v1, _ = _forward(model, x, ctx, t, Hooks(on_video_attn=adapter), some)
    assert np.abs(np.asarray(v1) - plain).max() > 1e-3


def test_edit_layer_hook_reaches_attn1_projections(hooked):
    cfg, _, model, (x, ctx, t) = hooked
    L, D = cfg["num_layers"], model.config.inner_dim
    delta = jnp.asarray(np.random.default_rng(0).standard_normal((L, D, D)) * 0.05, jnp.float32)

    def edit(layer_state, extra, attention):
        assert attention == "attn1"
        flat = []
        for p, var in nnx.to_flat_state(layer_state):
            key = ".".join(map(str, p))
            flat.append((p, var.replace(var[...] + extra) if key == f"{attention}.to_q.kernel" else var))
        return nnx.from_flat_state(flat)

    v, _ = _forward(model, x, ctx, t, Hooks(edit_layer=edit), delta)
    kernel = model.blocks.attn1.to_q.kernel
    original = kernel[...]
    kernel[...] = original + delta
    try:
        merged = np.asarray(model(x, t, ctx))
    finally:
        kernel[...] = original
    np.testing.assert_allclose(np.asarray(v), merged, atol=1e-6, rtol=1e-6)


def test_concept_hook_sees_cross_attention_after_qk_norm(hooked):
    cfg, tmodel, model, (x, ctx, t) = hooked
    heads, hd, L = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["num_layers"]
    seen = {}

    def concept(view, extra):
        seen.update(text_start=view.text_start, text_len=view.text_len, key_mask=view.key_mask)
        return {"q": view.video_queries, "k": view.keys}

    _, aux = _forward(model, x, ctx, t, Hooks(on_concept_attention=concept), None)
    tokens = int(np.prod(model.token_grid(*x.shape[2:])))
    assert aux["concept"]["q"].shape == (L, 2, tokens, heads, hd)
    assert aux["concept"]["k"].shape == (L, 2, TEXT_LEN, heads, hd)
    assert seen == {"text_start": 0, "text_len": TEXT_LEN, "key_mask": None} and aux["attn"] is None
    # The same arrays as diffusers' attn2 norm_q / norm_k outputs.
    captured, handles = {}, []
    for i, blk in enumerate(tmodel.blocks):
        for n in ("norm_q", "norm_k"):
            handles.append(getattr(blk.attn2, n).register_forward_hook(
                lambda m, a, out, key=(i, n): captured.__setitem__(key, out.detach().numpy())))
    try:
        torch_forward(tmodel, x, ctx, t)
    finally:
        for h in handles:
            h.remove()
    for i in range(L):
        np.testing.assert_allclose(np.asarray(aux["concept"]["q"][i]).reshape(2, tokens, -1), captured[i, "norm_q"],
                                   **TOL)
        np.testing.assert_allclose(np.asarray(aux["concept"]["k"][i]).reshape(2, TEXT_LEN, -1),
                                   captured[i, "norm_k"], **TOL)


def test_remat_gradient_equals(hooked):
    _, _, model, (x, ctx, t) = hooked
    _, state = nnx.split(model)

    def grad(policy):
        graphdef, _ = nnx.split(abstract_model(model.config, remat=policy))
        f = lambda s, xx: jnp.sum(jnp.sin(nnx.merge(graphdef, s).forward(xx, ctx, t)[0]))  # noqa: E731
        return np.asarray(jax.jit(jax.grad(f, argnums=1))(state, jnp.asarray(x)))

    np.testing.assert_allclose(grad("attn_out"), grad("none"), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_config_errors_are_one_line(tmp_path):
    base = tiny_config("wan21")
    for bad, match in ((dict(image_dim=1280), "image-to-video"), (dict(added_kv_proj_dim=36), "image-to-video"),
                       (dict(qk_norm="rms_norm"), "qk_norm"), (dict(patch_size=[1, 2]), "patch_size"),
                       (dict(attention_head_dim=11), "attention_head_dim")):
        with pytest.raises(UnlearnError, match=match) as e:
            WanConfig.from_dict({**base, **bad})
        assert "\n" not in str(e.value)
    with pytest.raises(ModelFamilyError, match="CogVideoXTransformer3DModel, not a WanTransformer3DModel"):
        WanConfig.from_dict({"_class_name": "CogVideoXTransformer3DModel"})
    assert WanConfig.from_dict({"_class_name": CLASS_NAME, **base}).to_dict()["patch_size"] == [1, 2, 2]
    with pytest.raises(UnlearnError, match="no such file or folder"):
        load_wan_transformer(tmp_path / "nope")


def test_bad_inputs_get_clear_errors(hooked):
    _, _, model, (x, ctx, t) = hooked
    for args, match in (((x[:, :3], t, ctx), "channels"), ((x[..., :5], t, ctx), "multiple of patch_size"),
                        ((x[0], t, ctx), "hidden_states must be"), ((x, t, ctx[..., :3]), "encoder_hidden_states"),
                        ((x, t, ctx[:1]), "encoder_hidden_states"), ((x, np.zeros((2, 4)), ctx), "timestep"),
                        ((x, np.zeros(3), ctx), "timestep")):
        with pytest.raises(UnlearnError, match=match) as e:
            model(*args)
        assert "\n" not in str(e.value)
