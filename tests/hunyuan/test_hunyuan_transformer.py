"""The JAX HunyuanVideo transformer equals diffusers' HunyuanVideoTransformer3DModel (fp32; bf16 within tolerance),
its weights round-trip bit-exactly, its rule table covers the full-size model, and its hooks sit where documented:
in the single-stream blocks, on the video part of the attention output and on the q/k the softmax sees."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

from helpers_hunyuan import LENGTHS, TEXT_LEN, VARIANTS, build_torch, cond_of, inputs, tiny_config, torch_forward
from unlearn_jax.conversion import SafetensorsReader, load_into, module_targets, plan_import, write_module
from unlearn_jax.errors import ModelFamilyError, UnlearnError
from unlearn_jax.models.hooks import Hooks
from unlearn_jax.models.hunyuan_video import CLASS_NAME, HunyuanVideoConfig, abstract_model, rule_table
from unlearn_jax.objectives import concept_attention_map

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "model_configs"
FULL_CONFIG = CONFIGS / "hunyuan_video_transformer.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
TOL = dict(atol=2e-5, rtol=1e-5)
# q/k after the per-head RMS norm (10 channels) are unit-scale, up to ~3: the norm divides the hidden states'
# rounding by each head's small RMS, so they agree to ~1e-5 relative, not to the velocity's 2e-5 absolute.
QK_TOL = dict(atol=1e-4, rtol=1e-4)


def load(folder: Path, dtype=None, **runtime):
    """The model of a diffusers folder through the rule table (what the family's loader will do)."""
    cfg = HunyuanVideoConfig.from_json(folder / "config.json")
    if dtype is not None:
        runtime = {"dtype": dtype, "param_dtype": dtype, **runtime}
    reader = SafetensorsReader(folder)
    try:
        return load_into(abstract_model(cfg, **runtime), reader, rule_table(cfg), str(folder), dtype=dtype)
    finally:
        reader.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each variant's torch model and its saved folder, built once."""
    out = {}
    for name in sorted(VARIANTS):
        cfg = tiny_config(name)
        tmodel = build_torch(cfg)
        folder = tmp_path_factory.mktemp(name)
        tmodel.save_pretrained(folder)
        out[name] = (cfg, tmodel, folder)
    return out


@pytest.mark.parametrize("variant,runtime", [
    ("distilled", {}),
    # the pure-XLA paths: 7-row query blocks over the joint sequence (45 video + 7 text tokens: the last block
    # padded) under the "dots" remat policy, and the einsum path under full remat
    ("distilled", dict(attention="chunked", attention_chunk=7, remat="dots")),
    ("no_guidance_pt2", dict(attention="reference", remat="full")),
], ids=["distilled-xla", "distilled-chunked-dots", "no_guidance_pt2-reference-full"])
def test_fp32_parity(built, variant, runtime):
    cfg, tmodel, folder = built[variant]
    args = inputs(cfg, batch=2, seed=3)
    ref = torch_forward(tmodel, args)
    out = np.asarray(load(folder, **runtime)(**args))
    assert out.shape == ref.shape == (2, cfg["out_channels"] or cfg["in_channels"], *args["hidden_states"].shape[2:])
    np.testing.assert_allclose(out, ref, **TOL)


def test_bf16_within_tolerance(built):
    """bf16 weights and compute (norms, modulation, RoPE, softmax in fp32) against the fp32 reference:
    max abs error <= 5% of max |v|, correlation > 0.999."""
    cfg, tmodel, folder = built["distilled"]
    args = inputs(cfg, batch=2, seed=5)
    ref = torch_forward(tmodel, args)
    model = load(folder, dtype=jnp.bfloat16)
    assert model.single_blocks.attn.to_q.kernel[...].dtype == jnp.bfloat16
    out = np.asarray(model(**args)).astype(np.float32)
    err = np.abs(out - ref).max()
    assert err <= 0.05 * np.abs(ref).max(), err
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.999


def test_padding_takes_no_part(built):
    """The text after each row's length changes nothing (token refiner, pooled mean, joint keys), in diffusers
    and here; a row padded to 7 gives what its 4 real tokens give unpadded."""
    cfg, tmodel, folder = built["distilled"]
    model = load(folder)
    args = inputs(cfg, batch=2, seed=4)
    noisy = dict(args, encoder_hidden_states=args["encoder_hidden_states"].copy())
    noisy["encoder_hidden_states"][1, LENGTHS[1]:] = 7.0
    base = np.asarray(model(**args))
    np.testing.assert_array_equal(np.asarray(model(**noisy)), base)
    np.testing.assert_allclose(torch_forward(tmodel, noisy), torch_forward(tmodel, args), atol=1e-6)
    row = {k: v[1:] for k, v in args.items()}
    row["encoder_hidden_states"] = row["encoder_hidden_states"][:, :LENGTHS[1]]
    row["encoder_attention_mask"] = row["encoder_attention_mask"][:, :LENGTHS[1]]
    np.testing.assert_allclose(torch_forward(tmodel, row), base[1:], **TOL)


def test_attention_key_mask_on_every_cpu_path():
    """layers.attention's key mask (any pattern, per batch row) on the einsum, chunked and XLA paths equals a
    masked softmax; an all-true mask equals no mask."""
    from unlearn_jax.models.layers import attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, n, 3, 4)).astype(np.float32) for n in (5, 9, 9))
    mask = np.ones((2, 9), bool)
    mask[0, 7:] = False
    mask[1, [1, 4, 8]] = False  # not a prefix
    logits = np.einsum("bqnh,bknh->bnqk", q, k) / 2.0
    p = np.exp(np.where(mask[:, None, None], logits, -np.inf) - logits.max(-1, keepdims=True))
    want = np.einsum("bnqk,bknh->bqnh", p / p.sum(-1, keepdims=True), v)
    for impl in ("reference", "chunked", "xla"):
        got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl, chunk=2, key_mask=mask)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=1e-6, err_msg=impl)
        full = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl, chunk=2, key_mask=np.ones((2, 9), bool))
        np.testing.assert_allclose(np.asarray(full), np.asarray(attention(q, k, v, impl, chunk=2)), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,dtype", [("distilled", torch.float32), ("no_guidance_pt2", torch.bfloat16)])
def test_round_trip_bit_exact(tmp_path, variant, dtype):
    from diffusers import HunyuanVideoTransformer3DModel

    cfg = tiny_config(variant)
    src, out = tmp_path / "src", tmp_path / "out"
    build_torch(cfg, seed=2).to(dtype).save_pretrained(src)
    model = load(src)  # dtype=None keeps the checkpoint's dtype
    out.mkdir()
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    write_module(out, model, rule_table(model.config), WEIGHTS)
    a, b = load_file(src / WEIGHTS), load_file(out / WEIGHTS)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    back = HunyuanVideoTransformer3DModel.from_pretrained(out)  # our config.json is diffusers'
    orig = json.loads((src / "config.json").read_text())
    for k, v in orig.items():
        if not k.startswith("_"):
            got = back.config[k]
            assert (list(got) if isinstance(got, tuple) else got) == v, k


def test_rule_table_covers_full_size_model():
    """Every key of the 13B guidance-distilled model maps to a JAX leaf of the right shape and back, every leaf
    is covered and carries logical axes (built on the meta device / as shapes: no weights allocated)."""
    from diffusers import HunyuanVideoTransformer3DModel

    raw = json.loads(FULL_CONFIG.read_text())
    with torch.device("meta"):
        tmodel = HunyuanVideoTransformer3DModel(**{k: v for k, v in raw.items() if not k.startswith("_")})
    shapes = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    cfg = HunyuanVideoConfig.from_dict(raw, FULL_CONFIG.name)
    assert cfg.to_dict() == {**raw, "rope_axes_dim": list(raw["rope_axes_dim"])}
    table = rule_table(cfg)
    abstract = abstract_model(cfg)
    targets = module_targets(abstract)
    plan = plan_import(table, shapes, targets, FULL_CONFIG.name)  # raises listing every problem
    assert sum(len(v) for v in plan.values()) == len(shapes)
    assert all(plan[p] for p in targets)
    entries = table.entries()
    assert sorted(e.torch_key for e in entries) == sorted(shapes)
    for e in entries:
        leaf = targets[e.jax_path].shape
        assert e.transform.torch_shape(leaf[1:] if e.layer is not None else leaf) == shapes[e.torch_key], e.torch_key
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert n == sum(int(np.prod(t.shape)) for t in targets.values()) and 12.5e9 < n < 13.5e9
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), (path, axes)
    # The three stacks keep their own depths; keys past a stack's end are not claimed.
    assert (targets["refiner.blocks.attn.to_q.kernel"].shape[0], targets["dual_blocks.attn.to_q.kernel"].shape[0],
            targets["single_blocks.attn.to_q.kernel"].shape[0]) == (2, 20, 40)
    assert table.match("transformer_blocks.20.attn.to_q.weight") is None
    assert table.match("single_transformer_blocks.39.attn.to_q.weight").jax_path == "single_blocks.attn.to_q.kernel"
    assert table.match("context_embedder.token_refiner.refiner_blocks.2.norm1.weight") is None


# --------------------------------------------------------------------------------------------
# Hooks (the single-stream blocks)
# --------------------------------------------------------------------------------------------
def _forward(model, args, hooks=None, extras=None):
    graphdef, state = nnx.split(model)
    x, cond, t = model.forward_inputs(**args)
    f = jax.jit(lambda s, x, c, t, e: nnx.merge(graphdef, s).forward(x, c, t, hooks, e))
    return f(state, x, cond, t, extras)


@pytest.fixture(scope="module")
def hooked(built):
    cfg, tmodel, folder = built["distilled"]
    model = load(folder)
    args = inputs(cfg, batch=2, seed=8)
    n_video = int(np.prod(model.token_grid(*args["hidden_states"].shape[2:])))
    return cfg, tmodel, model, args, n_video


def _add_to_video_attn(a, extra):
    """The video_attn hook of both tests below (one program, compiled once): adds `extra`, reports its energy."""
    return a + extra, jnp.mean(jnp.square(extra), axis=-1)


def test_erasers_off_and_zero_adapter_are_exact(hooked):
    cfg, _, model, args, n_video = hooked
    plain = np.asarray(model(**args))
    x, cond, t = model.forward_inputs(**args)
    _, aux = jax.eval_shape(lambda: model.forward(x, cond, t))  # no hooks: no aux (traced only, not compiled)
    assert aux == {"concept": None, "attn": None}
    S, D = cfg["num_single_layers"], model.config.inner_dim
    v0, aux0 = _forward(model, args, Hooks(on_video_attn=_add_to_video_attn), jnp.zeros((S, 2, n_video, D)))
    np.testing.assert_array_equal(np.asarray(v0), plain)
    assert aux0["attn"].shape == (S, 2, n_video) and aux0["concept"] is None


def test_video_attn_hook_sits_on_the_single_blocks_attention(hooked):
    """Adding a tensor to the video part of single block i's attention output equals diffusers with a forward hook
    on `single_transformer_blocks[i].attn` adding it to the first element of the returned (video, text)."""
    cfg, tmodel, model, args, n_video = hooked
    S, D, layer = cfg["num_single_layers"], model.config.inner_dim, 1
    add = np.random.default_rng(0).standard_normal((2, n_video, D)).astype(np.float32) * 0.3
    extras = jnp.zeros((S, 2, n_video, D)).at[layer].set(add)
    v, aux = _forward(model, args, Hooks(on_video_attn=_add_to_video_attn), extras)
    np.testing.assert_allclose(np.asarray(aux["attn"][layer]), np.mean(np.square(add), -1), rtol=1e-6)
    assert not np.asarray(aux["attn"][0]).any()
    handle = tmodel.single_transformer_blocks[layer].attn.register_forward_hook(
        lambda m, a, out: (out[0] + torch.from_numpy(add), out[1]))
    try:
        ref = torch_forward(tmodel, args)
    finally:
        handle.remove()
    np.testing.assert_allclose(np.asarray(v), ref, **TOL)
    assert np.abs(ref - torch_forward(tmodel, args)).max() > 1e-3  # the addition matters


def test_edit_layer_hook_reaches_the_single_blocks_projections(hooked):
    cfg, _, model, args, _ = hooked
    S, D = cfg["num_single_layers"], model.config.inner_dim
    delta = jnp.asarray(np.random.default_rng(1).standard_normal((S, D, D)) * 0.05, jnp.float32)

    def edit(layer_state, extra, attention):
        assert attention == "attn"
        flat = []
        for p, var in nnx.to_flat_state(layer_state):
            key = ".".join(map(str, p))
            flat.append((p, var.replace(var[...] + extra) if key == f"{attention}.to_q.kernel" else var))
        return nnx.from_flat_state(flat)

    v, _ = _forward(model, args, Hooks(edit_layer=edit), delta)
    kernel = model.single_blocks.attn.to_q.kernel
    original = kernel[...]
    kernel[...] = original + delta
    try:
        merged = np.asarray(model(**args))
    finally:
        kernel[...] = original
    np.testing.assert_allclose(np.asarray(v), merged, atol=1e-6, rtol=1e-6)
    assert np.abs(merged - np.asarray(model(**args))).max() > 1e-3


def _torch_single_qk(tmodel, args, monkeypatch):
    """(query, key, key mask) of every single-stream block's softmax in diffusers, in call order."""
    import diffusers.models.transformers.transformer_hunyuan_video as hv

    calls, original = [], hv.dispatch_attention_fn

    def spy(query, key, value, attn_mask=None, **kw):
        calls.append((query.numpy().copy(), key.numpy().copy(), attn_mask.numpy().copy()))
        return original(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(hv, "dispatch_attention_fn", spy)
    torch_forward(tmodel, args)
    monkeypatch.undo()
    return calls[tmodel.config.num_layers:]  # the dual-stream blocks come first


def _text_probs(q, k, mask, n_video: int):
    """softmax over the masked keys, the video queries' columns of the text keys: (B, heads, N_video, L)."""
    logits = np.einsum("bqnh,bknh->bnqk", q[:, :n_video], k) / np.sqrt(q.shape[-1])
    logits = np.where(mask.reshape(mask.shape[0], 1, 1, -1), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True))[..., n_video:]


def test_concept_hook_sees_the_softmax_over_the_text(hooked, monkeypatch):
    """The view's q/k are diffusers' q/k after the RMS norms and RoPE, the text keys after the video ones, the key
    mask diffusers' mask; the objective's concept map over that view is the model's own softmax columns."""
    cfg, tmodel, model, args, n_video = hooked
    S, heads, L = cfg["num_single_layers"], cfg["num_attention_heads"], TEXT_LEN
    idx = jnp.array([[1, 5], [0, 3]])  # concept tokens per row; row 1's second is real (length 4)
    valid = jnp.array([[True, True], [True, True]])
    seen = {}

    def concept(view, extra):
        seen.update(text_start=view.text_start, text_len=view.text_len)
        return {"q": view.video_queries, "k": view.keys, "mask": view.key_mask,
                "map": concept_attention_map(view, idx, valid, key_chunk=16)}

    _, aux = _forward(model, args, Hooks(on_concept_attention=concept), None)
    assert seen == {"text_start": n_video, "text_len": L} and aux["attn"] is None
    assert aux["concept"]["q"].shape == (S, 2, n_video, heads, cfg["attention_head_dim"])
    assert aux["concept"]["k"].shape == (S, 2, n_video + L, heads, cfg["attention_head_dim"])
    calls = _torch_single_qk(tmodel, args, monkeypatch)
    assert len(calls) == S
    for i, (tq, tk, tmask) in enumerate(calls):
        mask = np.asarray(aux["concept"]["mask"][i])
        np.testing.assert_array_equal(mask, tmask.reshape(2, -1))
        assert mask[1].sum() == n_video + LENGTHS[1]
        np.testing.assert_allclose(np.asarray(aux["concept"]["q"][i]), tq[:, :n_video], **QK_TOL)
        np.testing.assert_allclose(np.asarray(aux["concept"]["k"][i]), tk, **QK_TOL)
        probs = _text_probs(tq, tk, tmask, n_video)  # (B, heads, N_video, L)
        assert probs[1, ..., LENGTHS[1]:].max() == 0.0  # padded text keys take no mass
        want = np.stack([probs[b][..., np.asarray(idx[b])].sum(-1).mean(0) for b in range(2)])
        np.testing.assert_allclose(np.asarray(aux["concept"]["map"][i]), want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_config_errors_are_one_line():
    base = tiny_config()
    for bad, match in ((dict(image_condition_type="latent_concat"), "image-to-video"),
                       (dict(image_condition_type="token_replace"), "image-to-video"),
                       (dict(qk_norm="layer_norm"), "qk_norm"), (dict(rope_axes_dim=[2, 4, 6]), "sums to 12"),
                       (dict(rope_axes_dim=[3, 3, 4]), "even"), (dict(num_single_layers=0), "num_single_layers"),
                       (dict(patch_size=0), "patch_size")):
        with pytest.raises(UnlearnError, match=match) as e:
            HunyuanVideoConfig.from_dict({**base, **bad})
        assert "\n" not in str(e.value)
    with pytest.raises(ModelFamilyError, match="WanTransformer3DModel, not a HunyuanVideoTransformer3DModel"):
        HunyuanVideoConfig.from_dict({"_class_name": "WanTransformer3DModel"})
    cfg = HunyuanVideoConfig.from_dict({"_class_name": CLASS_NAME, **base})
    assert cfg.rope_axes_dim == (2, 4, 4) and cfg.to_dict()["rope_axes_dim"] == [2, 4, 4]
    assert (cfg.mlp_dim, cfg.refiner_mlp_dim) == (75, 120)


def test_bad_inputs_get_clear_errors(hooked):
    _, _, model, args, _ = hooked
    x, text = args["hidden_states"], args["encoder_hidden_states"]
    for change, match in ((dict(hidden_states=x[:, :3]), "channels"), (dict(hidden_states=x[..., :5]), "multiple"),
                          (dict(hidden_states=x[0]), "hidden_states must be"),
                          (dict(encoder_hidden_states=text[..., :3]), "encoder_hidden_states"),
                          (dict(encoder_hidden_states=text[:1]), "encoder_hidden_states"),
                          (dict(encoder_attention_mask=args["encoder_attention_mask"][:, :3]),
                           "encoder_attention_mask"),
                          (dict(pooled_projections=args["pooled_projections"][:, :2]), "pooled_projections"),
                          (dict(guidance=None), "guidance_embeds"), (dict(guidance=np.zeros(3)), "guidance"),
                          (dict(timestep=np.zeros((2, 4))), "timestep")):
        with pytest.raises(UnlearnError, match=match) as e:
            model(**{**args, **change})
        assert "\n" not in str(e.value)
    with pytest.raises(UnlearnError, match="lacks \\['pooled'\\]"):
        model.forward(jnp.asarray(x), {k: v for k, v in cond_of(args).items() if k != "pooled"}, args["timestep"])
