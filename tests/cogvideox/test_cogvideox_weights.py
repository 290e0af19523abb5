"""Weight conversion for CogVideoX: bit-exact round trips, full-size coverage, sharded files, errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import unlearn_jax
from helpers_cogvideox import build_torch, inputs, tiny_config, torch_forward
from unlearn_jax.conversion import plan_import
from unlearn_jax.errors import ConversionError, ModelFamilyError, UnlearnError
from unlearn_jax.conversion import module_targets
from unlearn_jax.models.cogvideox import CogVideoXConfig, abstract_model, rule_table
from unlearn_jax.parallel import DEFAULT_RULES
from repo_paths import MODEL_CONFIGS, ROOT

CONFIGS = MODEL_CONFIGS


def _all_tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("variant,dtype", [("2b_sincos", torch.float32), ("5b_rope", torch.bfloat16),
                                           ("15_patch_t", torch.float16), ("learned_pos", torch.float32)])
def test_round_trip_bit_exact(tmp_path, variant, dtype):
    cfg = tiny_config(variant)
    src, out = tmp_path / "src", tmp_path / "out"
    build_torch(cfg).to(dtype).save_pretrained(src)
    model = unlearn_jax.load_transformer(src)  # dtype=None keeps the checkpoint's dtype
    unlearn_jax.save_transformer(model, out)
    _assert_same_tensors(_all_tensors(src), _all_tensors(out))
    saved_cfg = json.loads((out / "config.json").read_text())
    orig_cfg = json.loads((src / "config.json").read_text())
    for k, v in orig_cfg.items():
        if not k.startswith("_"):
            assert saved_cfg[k] == v, k


def test_saved_folder_loads_in_diffusers_and_matches(tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    cfg = tiny_config("5b_rope")
    build_torch(cfg, seed=3).save_pretrained(tmp_path / "src")
    model = unlearn_jax.load_transformer(tmp_path / "src")
    unlearn_jax.save_transformer(model, tmp_path / "out")
    back = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "out").eval()
    x, ctx, t = inputs(cfg, batch=1, frames=3)
    np.testing.assert_allclose(torch_forward(back, cfg, x, ctx, t), np.asarray(model(x, ctx, t)), atol=2e-5, rtol=1e-5)


def test_sharded_safetensors_with_index_and_pipeline_folder(tmp_path):
    cfg = tiny_config("2b_sincos")
    tmodel = build_torch(cfg, seed=2)
    tmodel.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="30KB")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert len(list((tmp_path / "pipe" / "transformer").glob("*.safetensors"))) > 1
    model = unlearn_jax.load_transformer(tmp_path / "pipe")
    x, ctx, t = inputs(cfg, batch=1)
    np.testing.assert_allclose(np.asarray(model(x, ctx, t)), torch_forward(tmodel, cfg, x, ctx, t),
                               atol=2e-5, rtol=1e-5)
    # Our own sharded writer: small max_shard_size -> several files + index, still bit-exact.
    unlearn_jax.save_transformer(model, tmp_path / "out", max_shard_size=30_000)
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").exists()
    _assert_same_tensors(_all_tensors(tmp_path / "pipe" / "transformer"), _all_tensors(tmp_path / "out"))


def test_convert_tools_orbax_round_trip(tmp_path):
    cfg = tiny_config("15_patch_t")
    src = tmp_path / "src"
    build_torch(cfg, seed=1).to(torch.bfloat16).save_pretrained(src)
    tools = ROOT / "tools" / "convert_weights"
    r = subprocess.run([sys.executable, tools / "diffusers_to_jax.py", src, tmp_path / "ckpt"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, tools / "jax_to_diffusers.py", tmp_path / "ckpt", tmp_path / "back",
                        "--format", "diffusers"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _assert_same_tensors(_all_tensors(src), _all_tensors(tmp_path / "back"))
    a = unlearn_jax.load_transformer(src)
    b = unlearn_jax.load_transformer(tmp_path / "ckpt")
    x, ctx, t = inputs(cfg, batch=1, frames=2)
    np.testing.assert_array_equal(np.asarray(a(x, ctx, t)), np.asarray(b(x, ctx, t)))


@pytest.mark.parametrize("name", ["cogvideox_2b_transformer.json", "cogvideox_5b_transformer.json",
                                  "cogvideox1.5_5b_transformer.json"])
def test_rule_table_covers_full_size_models(name):
    """Every key of the real model maps to a JAX leaf of the right shape, and every leaf is covered."""
    from diffusers import CogVideoXTransformer3DModel

    raw = json.loads((CONFIGS / name).read_text())
    with torch.device("meta"):
        tmodel = CogVideoXTransformer3DModel.from_config(raw)
    shapes = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    cfg = CogVideoXConfig.from_dict(raw)
    table = rule_table(cfg)
    targets = module_targets(abstract_model(cfg), rules=DEFAULT_RULES)
    plan = plan_import(table, shapes, targets, name)  # raises listing every problem
    assert sum(len(v) for v in plan.values()) == len(shapes)
    assert all(plan[p] for p in targets)
    # The export direction produces exactly the PyTorch shapes back.
    for e in table.entries():
        leaf = targets[e.jax_path].shape
        assert e.transform.torch_shape(leaf[1:] if e.layer is not None else leaf) == shapes[e.torch_key], e.torch_key
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    assert n_params == sum(int(np.prod(t.shape)) for t in targets.values())


def test_misfit_weights_listed_in_one_error(tmp_path):
    cfg = tiny_config("5b_rope")
    build_torch(cfg).save_pretrained(tmp_path)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    del sd["transformer_blocks.1.attn1.to_q.weight"]
    sd["transformer_blocks.0.attn1.to_k.weight"] = torch.zeros(3, 3)
    sd["some.extra.weight"] = torch.zeros(2)
    save_file(sd, f)
    with pytest.raises(ConversionError) as e:
        unlearn_jax.load_transformer(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "1 missing: transformer_blocks.1.attn1.to_q.weight" in msg
    assert "1 unexpected: some.extra.weight" in msg
    assert "transformer_blocks.0.attn1.to_k.weight: checkpoint (3, 3)" in msg


def test_other_family_and_bad_paths(tmp_path):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLCogVideoX"}))
    with pytest.raises(ModelFamilyError, match="AutoencoderKLCogVideoX, not a CogVideoXTransformer3DModel"):
        unlearn_jax.load_transformer(vae)
    with pytest.raises(UnlearnError, match="no such file"):
        unlearn_jax.load_transformer(tmp_path / "nope")
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    with pytest.raises(ModelFamilyError, match="without a transformer"):
        unlearn_jax.load_transformer(pipe)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(tiny_config("2b_sincos")))
    with pytest.raises(UnlearnError, match="no .safetensors weights"):
        unlearn_jax.load_transformer(empty)
    with pytest.raises(UnlearnError, match="dtype 'float8'"):
        unlearn_jax.load_transformer(empty, dtype="float8")


def test_bad_inputs_get_clear_errors(tmp_path):
    cfg = tiny_config("2b_sincos")
    build_torch(cfg).save_pretrained(tmp_path)
    model = unlearn_jax.load_transformer(tmp_path)
    x, ctx, t = inputs(cfg, batch=1)
    with pytest.raises(UnlearnError, match="channels"):
        model(x[:, :, :2], ctx, t)
    with pytest.raises(UnlearnError, match="max_text_seq_length=13"):
        model(x, ctx[:, :5], t)
    with pytest.raises(UnlearnError, match="multiples of patch_size"):
        model(x[..., :7], ctx, t)
