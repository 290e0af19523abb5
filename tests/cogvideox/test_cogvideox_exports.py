"""Erasers leave JAX and run in stock diffusers: adapter (unlearn_jax.torch), LoRA (load_lora_weights), merged
weights (from_pretrained), and the published T2VUnlearning format both ways."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from diffusers import CogVideoXTransformer3DModel

import unlearn_jax
import unlearn_jax.torch as ujt
from helpers_cogvideox import build_torch, inputs, tiny_config, torch_forward
from unlearn_jax import erased_model, eraser_io, export
from unlearn_jax.erasers import EraserConfig, eraser_hooks, init_erasers
from unlearn_jax.errors import UnlearnError
from unlearn_jax.models.cogvideox import CogVideoXConfig
from repo_paths import ROOT

CFG = tiny_config("5b_rope")  # RoPE: the rotary embedding is passed to diffusers as the pipeline does
ATOL = 1e-5
RANK = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "transformer"
    build_torch(CFG, seed=3).save_pretrained(folder)
    return folder, unlearn_jax.load_transformer(folder)


@pytest.fixture(scope="module")
def data():
    return inputs(CFG, batch=2, frames=3)


def stock(folder) -> CogVideoXTransformer3DModel:
    return CogVideoXTransformer3DModel.from_pretrained(folder).eval()


def random_phi(kind, model, seed, scale=1.0, targets=("to_q", "to_k", "to_v", "to_out")):
    """Erasers whose every leaf is random (the zero-initialised `up` / LoRA `b` too), so all of them matter;
    attn / full erasers are the base weights plus noise. numpy noise: no compilation per shape."""
    cfg = EraserConfig(kind=kind, rank=RANK, scale=scale, lora_targets=tuple(targets))
    rng = np.random.default_rng(seed)
    shapes = eraser_io.eraser_shapes(cfg, model)
    if kind in ("attn", "full"):
        weights = {".".join(map(str, p)): np.asarray(v[...])
                   for p, v in nnx.to_flat_state(nnx.state(model.blocks, nnx.Param))}
        flat = {k: weights[k] + 0.05 * rng.standard_normal(s, np.float32) for k, s in shapes.items()}
    else:
        # a wide spread into the adapter's GELU, where its exact (erf) and tanh forms differ
        std = {k: 2.0 if k.startswith("down") else 0.3 for k in shapes}
        flat = {k: std[k] * rng.standard_normal(s, np.float32) for k, s in shapes.items()}
    return cfg, jax.tree.map(jnp.asarray, eraser_io.unflatten_phi(cfg, flat))


@pytest.mark.parametrize("kind", ["adapter", "lora", "attn", "full"])
def test_eraser_shapes_match_init(base, kind):
    """eraser_io's expected shapes are exactly the layout erasers.init_erasers makes."""
    model = base[1]
    cfg = EraserConfig(kind=kind, rank=RANK, lora_targets=("to_k", "to_out"))
    init = jax.eval_shape(lambda: init_erasers(cfg, model, jax.random.key(0)))
    flat = {k: tuple(v.shape) for k, v in eraser_io.flatten_phi(init).items()}
    assert flat == eraser_io.eraser_shapes(cfg, model) == eraser_io.eraser_shapes(cfg, model.config)
    assert jax.tree.structure(eraser_io.unflatten_phi(cfg, eraser_io.flatten_phi(init))) == jax.tree.structure(init)


_JITTED: dict = {}


def jax_velocity(model, cfg, phi, data, scale=None):
    """model.forward with the erasers' hooks (jitted once per model and eraser config)."""
    key = (id(model), cfg)
    if key not in _JITTED:
        graphdef, state = nnx.split(model)

        @jax.jit
        def run(state, phi, x, ctx, t, s):
            return nnx.merge(graphdef, state).forward(x, ctx, t, *eraser_hooks(cfg, phi, s))[0]

        _JITTED[key] = (run, state)
    run, state = _JITTED[key]
    x, ctx, t = (jnp.asarray(a) for a in data)
    return np.asarray(run(state, phi, x, ctx, t, jnp.float32(cfg.scale if scale is None else scale)))


def velocity(tmodel, data):
    return torch_forward(tmodel, CFG, *data)


def close(got, want, atol=ATOL):
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


# --------------------------------------------------------------------------------------------
# adapter -> unlearn_jax.torch.attach_erasers on a stock diffusers transformer
# --------------------------------------------------------------------------------------------
def test_adapter_in_stock_diffusers(base, data, tmp_path):
    folder, model = base
    cfg, phi = random_phi("adapter", model, 0, scale=0.7)
    want = jax_velocity(model, cfg, phi, data)
    tm = stock(folder)
    plain = velocity(tm, data)
    assert np.abs(want - plain).max() > 1e-2  # the erasers change the output

    ours, pub = tmp_path / "ours", tmp_path / "pub"
    eraser_io.save_erasers(ours, cfg, phi, model.config)
    export.export_t2vunlearning(pub, cfg, phi, model)  # the scale is folded into `up`
    pt_only = tmp_path / "pt_only"
    shutil.copytree(pub, pt_only)
    (pt_only / "eraser_weights.safetensors").unlink()
    for src in (ours, pub, pt_only):
        ujt.attach_erasers(tm, src)
        close(velocity(tm, data), want)
        ujt.detach_erasers(tm)
        np.testing.assert_array_equal(velocity(tm, data), plain)

    # the transformer's state dict names the adapters as the published files do; scale override; pipeline
    ujt.attach_erasers(tm, ours, scale=0.3)
    assert "transformer_blocks.1.attn1.adapter.up.weight" in tm.state_dict()
    close(velocity(tm, data), jax_velocity(model, cfg, phi, data, scale=0.3))
    ujt.set_eraser_scale(tm, 0.0)
    np.testing.assert_array_equal(velocity(tm, data), plain)
    with pytest.raises(UnlearnError, match="already attached"):
        ujt.attach_erasers(tm, ours)
    ujt.detach_erasers(tm)
    assert not any(".adapter." in k for k in tm.state_dict())

    # the JAX erased model: load_transformer(erasers=...) and the jitted __call__
    erased = unlearn_jax.load_transformer(folder, erasers=ours)
    assert isinstance(erased, erased_model.ErasedTransformer)
    close(np.asarray(erased(*data)), want)
    close(np.asarray(erased(*data, erasers_on=False)), np.asarray(model(*data)), atol=0)
    close(np.asarray(erased(*data, scale=0.3)), jax_velocity(model, cfg, phi, data, scale=0.3))


def test_erased_model_sharded(base, data, tmp_path):
    """load_transformer(mesh=..., erasers=...) shards the erasers like the weights; same velocity."""
    from unlearn_jax.parallel import make_mesh

    folder, model = base
    cfg, phi = random_phi("lora", model, 8, targets=("to_q", "to_out"))
    eraser_io.save_erasers(tmp_path / "ours", cfg, phi, model.config)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    erased = unlearn_jax.load_transformer(folder, mesh=mesh, erasers=tmp_path / "ours")
    a = erased.phi["to_q"]["a"][...]
    assert a.sharding.mesh.shape == mesh.shape and "fsdp" in a.sharding.spec
    close(np.asarray(erased(*data)), jax_velocity(model, cfg, phi, data))


# --------------------------------------------------------------------------------------------
# LoRA -> diffusers' own LoRA loader, our torch helper, merged weights
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora(base):
    cfg, phi = random_phi("lora", base[1], 1, scale=0.5, targets=("to_q", "to_v", "to_out"))
    return cfg, phi


def test_lora_exports(base, data, lora, tmp_path):
    folder, model = base
    cfg, phi = lora
    want = jax_velocity(model, cfg, phi, data)
    assert np.abs(want - np.asarray(model(*data))).max() > 1e-2

    export.export_lora(tmp_path / "lora", cfg, phi, model)
    from safetensors.numpy import load_file

    sd = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert sd["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"].shape == (RANK, 32)
    assert sd["transformer.transformer_blocks.1.attn1.to_out.0.lora_B.weight"].shape == (32, RANK)
    assert len(sd) == 2 * 3 * CFG["num_layers"]

    # merged into a plain diffusers folder
    export.export_merged(tmp_path / "merged", model, cfg, phi)
    close(velocity(stock(tmp_path / "merged"), data), want)
    close(np.asarray(erased_model.attach_erasers(model, (cfg, phi)).merged()(*data)), want)

    # our eraser folder in the torch helper
    eraser_io.save_erasers(tmp_path / "ours", cfg, phi, model.config)
    tm = ujt.attach_erasers(stock(folder), tmp_path / "ours")
    close(velocity(tm, data), want)


def test_lora_in_diffusers_lora_loader(base, data, lora, tmp_path):
    import peft  # noqa: F401  (diffusers loads LoRA weights through peft; a test dependency)
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    folder, model = base
    cfg, phi = lora
    want = jax_velocity(model, cfg, phi, data)
    export.export_lora(tmp_path / "lora", cfg, phi, model)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=stock(folder),
                             scheduler=CogVideoXDDIMScheduler())
    pipe.load_lora_weights(tmp_path / "lora")
    close(velocity(pipe.transformer, data), want)


# --------------------------------------------------------------------------------------------
# fine-tuned weights -> merged diffusers folder
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["full", "attn"])
def test_finetuned_merged(base, data, kind, tmp_path):
    folder, model = base
    cfg, phi = random_phi(kind, model, 2)
    want = jax_velocity(model, cfg, phi, data)
    assert np.abs(want - np.asarray(model(*data))).max() > 1e-2
    export.export_merged(tmp_path / "merged", model, cfg, phi)
    close(velocity(stock(tmp_path / "merged"), data), want)
    # our folder round-trips exactly
    eraser_io.save_erasers(tmp_path / "ours", cfg, phi, model.config)
    cfg2, phi2 = eraser_io.load_erasers(tmp_path / "ours", model)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, phi2, phi)


# --------------------------------------------------------------------------------------------
# a whole CogVideoXPipeline generation with the exported adapters attached
# --------------------------------------------------------------------------------------------
def test_pipeline_generation_with_adapter(base, tmp_path):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    folder, model = base
    cfg, phi = random_phi("adapter", model, 3)
    export.export_t2vunlearning(tmp_path / "pub", cfg, phi, model)
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), latent_channels=CFG["in_channels"],
                                 layers_per_block=1, norm_num_groups=4, sample_height=64, sample_width=96).eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=stock(folder),
                             scheduler=CogVideoXDDIMScheduler())
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, CFG["max_text_seq_length"], CFG["text_embed_dim"], generator=g)
    neg = torch.randn(1, CFG["max_text_seq_length"], CFG["text_embed_dim"], generator=g)

    def generate():
        out = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=64, width=96, num_frames=9,
                   num_inference_steps=2, guidance_scale=6.0, output_type="np",
                   generator=torch.Generator().manual_seed(1))
        return np.asarray(out.frames)

    plain = generate()
    ujt.attach_erasers(pipe, tmp_path / "pub")  # a pipeline works as well as its transformer
    erased = generate()
    ujt.detach_erasers(pipe)
    assert plain.shape == erased.shape == (1, 9, 64, 96, 3)
    assert np.isfinite(erased).all()
    assert np.abs(plain - erased).max() > 1e-3
    np.testing.assert_array_equal(generate(), plain)


# --------------------------------------------------------------------------------------------
# the published T2VUnlearning format
# --------------------------------------------------------------------------------------------
class _AuthorsAdapter(torch.nn.Module):  # the layout of the authors' AdapterEraser (state dict names)
    def __init__(self, dim, rank):
        super().__init__()
        self.down = torch.nn.Linear(dim, rank)
        self.act = torch.nn.GELU()
        self.up = torch.nn.Linear(rank, dim)


def _authors_folder(folder: Path, num_layers=2, dim=32, rank=RANK, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    ckpt = {f"transformer_blocks.{i}.attn1.adapter": _AuthorsAdapter(dim, rank).to(dtype).state_dict()
            for i in range(num_layers)}
    torch.save(ckpt, folder / "eraser_weights.pt")
    (folder / "eraser_config.json").write_text(json.dumps({"eraser_type": "adapter", "eraser_rank": rank}))
    return ckpt


def test_published_round_trip(base, data, tmp_path):
    folder, model = base
    cfg, phi = random_phi("adapter", model, 4)
    pub = tmp_path / "pub"
    export.export_t2vunlearning(pub, cfg, phi, model)
    assert json.loads((pub / "eraser_config.json").read_text()) == {"eraser_type": "adapter", "eraser_rank": RANK}
    ckpt = torch.load(pub / "eraser_weights.pt", weights_only=True)
    assert sorted(ckpt) == [f"transformer_blocks.{i}.attn1.adapter" for i in range(2)]
    assert {k: tuple(v.shape) for k, v in ckpt["transformer_blocks.0.attn1.adapter"].items()} == {
        "down.weight": (RANK, 32), "down.bias": (RANK,), "up.weight": (32, RANK), "up.bias": (32,)}
    # JAX -> .pt -> JAX and JAX -> .safetensors -> JAX are bit-exact
    cfg_st, phi_st = eraser_io.load_erasers(pub, model)
    (pub / "eraser_weights.safetensors").unlink()
    cfg_pt, phi_pt = eraser_io.load_erasers(pub, model)
    assert cfg_pt == cfg_st == cfg
    jax.tree.map(np.testing.assert_array_equal, phi_pt, phi)
    jax.tree.map(np.testing.assert_array_equal, phi_st, phi)

    # a folder written by a plain torch.save of the authors' structure
    authors = tmp_path / "authors"
    sd = _authors_folder(authors)
    cfg_a, phi_a = eraser_io.load_erasers(authors)  # without a model: checked against itself
    np.testing.assert_array_equal(phi_a["down"]["kernel"][1], sd["transformer_blocks.1.attn1.adapter"]["down.weight"].T)
    np.testing.assert_array_equal(phi_a["up"]["bias"][0], sd["transformer_blocks.0.attn1.adapter"]["up.bias"])
    erased = unlearn_jax.load_transformer(folder, erasers=authors)
    want = jax_velocity(model, cfg_a, phi_a, data)
    close(np.asarray(erased(*data)), want, atol=1e-6)
    tm = ujt.attach_erasers(stock(folder), authors)
    close(velocity(tm, data), want)

    # the authors ran bf16: such files import exactly (bf16 -> fp32 is exact)
    sd16 = _authors_folder(tmp_path / "bf16", dtype=torch.bfloat16, seed=1)
    _, phi16 = eraser_io.load_erasers(tmp_path / "bf16", model)
    np.testing.assert_array_equal(phi16["up"]["kernel"][0],
                                  sd16["transformer_blocks.0.attn1.adapter"]["up.weight"].float().numpy().T)


# --------------------------------------------------------------------------------------------
# files that do not fit: one clear line each
# --------------------------------------------------------------------------------------------
class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bad_eraser_files(base, tmp_path):
    folder, model = base
    cfg, phi = random_phi("adapter", model, 5)
    pub, ours = tmp_path / "pub", tmp_path / "ours"
    export.export_t2vunlearning(pub, cfg, phi, model)
    (pub / "eraser_weights.safetensors").unlink()
    eraser_io.save_erasers(ours, cfg, phi, model.config)

    def variant(src, name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    def expect(folder_, pattern, target=model):
        with pytest.raises(UnlearnError, match=pattern) as e:
            eraser_io.load_erasers(folder_, target)
        return one_line(e)

    good_pt = (pub / "eraser_weights.pt").read_bytes()
    bad = variant(pub, "truncated_pt")
    (bad / "eraser_weights.pt").write_bytes(good_pt[: len(good_pt) // 2])
    expect(bad, "corrupt or truncated")
    bad = variant(pub, "corrupt_pt")
    (bad / "eraser_weights.pt").write_bytes(np.random.default_rng(0).bytes(3000))
    expect(bad, "corrupt or truncated")
    bad = variant(pub, "evil_pt")
    torch.save({"transformer_blocks.0.attn1.adapter": {"down.weight": Evil()}}, bad / "eraser_weights.pt")
    expect(bad, "weights_only=True.*objects other than tensors")

    st = (ours / "erasers.safetensors").read_bytes()
    bad = variant(ours, "truncated_st")
    (bad / "erasers.safetensors").write_bytes(st[: len(st) - 100])
    expect(bad, "truncated")
    bad = variant(ours, "corrupt_st")
    (bad / "erasers.safetensors").write_bytes(b"\xff" * 64)
    expect(bad, "not a readable safetensors")

    for src, name in ((pub, "rank_pub"), (ours, "rank_ours")):
        bad = variant(src, name)
        conf = json.loads((bad / "eraser_config.json").read_text())
        conf["eraser_rank"] = 8
        (bad / "eraser_config.json").write_text(json.dumps(conf))
        expect(bad, "eraser_rank 8, but the weights have rank 4")

    deeper = CogVideoXConfig.from_dict({**CFG, "num_layers": 3})
    wider = CogVideoXConfig.from_dict({**CFG, "attention_head_dim": 8})
    for src in (pub, ours):
        expect(src, "2 blocks of width 32, but the model has 3 blocks of width 32", deeper)
        expect(src, "2 blocks of width 32, but the model has 2 blocks of width 16", wider)

    (tmp_path / "empty").mkdir()
    expect(tmp_path / "empty", "not an eraser folder")
    bad = variant(pub, "kind")
    (bad / "eraser_config.json").write_text(json.dumps({"eraser_type": "lora", "eraser_rank": 4}))
    expect(bad, "adapter erasers only")
    bad = variant(pub, "no_weights")
    (bad / "eraser_weights.pt").unlink()
    expect(bad, "no eraser weights")

    # the torch helper says the same
    tm = stock(folder)
    for src, pattern in ((variant(pub, "t_evil") / "eraser_weights.pt", None),):
        torch.save({"x": {"w": Evil()}}, src)
        with pytest.raises(UnlearnError, match="objects other than tensors") as e:
            ujt.attach_erasers(tm, src.parent)
        one_line(e)
    with pytest.raises(UnlearnError, match="corrupt or truncated") as e:
        ujt.attach_erasers(tm, tmp_path / "truncated_pt")
    one_line(e)
    torch.manual_seed(0)
    deep_torch = CogVideoXTransformer3DModel(**{**CFG, "num_layers": 3})
    for src in (pub, ours):
        with pytest.raises(UnlearnError, match="2 blocks of width 32, but this one has 3 blocks") as e:
            ujt.attach_erasers(deep_torch, src)
        one_line(e)
    with pytest.raises(UnlearnError, match="eraser_rank 8, but the weights have rank 4"):
        ujt.attach_erasers(tm, tmp_path / "rank_pub")
    assert not ujt.attached_erasers(tm)

    # exports of the wrong kind
    with pytest.raises(UnlearnError, match="adapter erasers only"):
        export.export_t2vunlearning(tmp_path / "x", EraserConfig(kind="lora", rank=4), {}, model)
    with pytest.raises(UnlearnError, match="cannot be merged"):
        export.export_merged(tmp_path / "x", model, cfg, phi)
    with pytest.raises(UnlearnError, match="exports LoRA erasers"):
        export.export_lora(tmp_path / "x", cfg, phi, model)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# tools/convert_weights/jax_to_diffusers.py on eraser folders
# --------------------------------------------------------------------------------------------
def _tool():
    path = ROOT / "tools" / "convert_weights" / "jax_to_diffusers.py"
    spec = importlib.util.spec_from_file_location("jax_to_diffusers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_tool_exports_erasers(base, data, lora, tmp_path, capsys):
    folder, model = base
    main = _tool()
    a_cfg, a_phi = random_phi("adapter", model, 6)
    f_cfg, f_phi = random_phi("full", model, 7)
    l_cfg, l_phi = lora
    for name, (c, p) in {"adapter": (a_cfg, a_phi), "full": (f_cfg, f_phi), "lora": (l_cfg, l_phi)}.items():
        eraser_io.save_erasers(tmp_path / name, c, p, model.config)

    assert main([str(tmp_path / "adapter"), str(tmp_path / "a_diff"), "--format", "diffusers"]) == 0
    assert "unlearn_jax.torch.attach_erasers" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "a_diff").iterdir()} == {
        "eraser_config.json", "eraser_weights.pt", "eraser_weights.safetensors", "README.md", ".unlearn-jax"}
    tm = ujt.attach_erasers(stock(folder), tmp_path / "a_diff")
    close(velocity(tm, data), jax_velocity(model, a_cfg, a_phi, data))

    assert main([str(tmp_path / "adapter"), str(tmp_path / "a_pub"), "--format", "t2vunlearning",
                 "--base", str(folder)]) == 0
    _, phi_back = eraser_io.load_erasers(tmp_path / "a_pub", model)
    jax.tree.map(np.testing.assert_array_equal, phi_back, a_phi)

    assert main([str(tmp_path / "lora"), str(tmp_path / "l_lora"), "--format", "lora"]) == 0
    assert (tmp_path / "l_lora" / "pytorch_lora_weights.safetensors").exists()

    assert main([str(tmp_path / "full"), str(tmp_path / "f_diff"), "--format", "diffusers", "--base",
                 str(folder)]) == 0
    close(velocity(stock(tmp_path / "f_diff"), data), jax_velocity(model, f_cfg, f_phi, data))

    capsys.readouterr()
    assert main([str(tmp_path / "full"), str(tmp_path / "nope"), "--format", "diffusers"]) == 2
    assert "--base" in capsys.readouterr().err
    assert main([str(tmp_path / "adapter"), str(tmp_path / "nope"), "--format", "lora"]) == 2
    assert "t2vunlearning" in capsys.readouterr().err
    assert main([str(folder), str(tmp_path / "nope"), "--format", "lora"]) == 2
    assert "not an eraser folder" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()
